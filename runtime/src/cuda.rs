//! Finding a CUDA driver at run time (cudarc with dynamic loading: building needs no CUDA).

/// Why the cuda backend is unavailable on this machine.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libcuda could not be loaded or initialised.
    #[error("no usable CUDA driver: {0} (use --backend cpu, or run on a machine with an NVIDIA GPU and driver)")]
    NoDriver(String),
}

/// Loads libcuda and initialises the driver, touching no device (a process that runs on
/// GPU 5 creates no context on GPU 0).
pub fn init() -> Result<(), CudaError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result =
        std::panic::catch_unwind(|| cudarc::driver::result::init().map_err(|e| e.to_string()));
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CudaError::NoDriver(e)),
        Err(_) => Err(CudaError::NoDriver("libcuda.so was not found".into())),
    }
}

/// Loads libcuda, initialises it and returns the name of device 0.
pub fn probe() -> Result<String, CudaError> {
    // cudarc panics when the shared library is missing; turn that into an error.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| e.to_string())?;
        ctx.name().map_err(|e| e.to_string())
    });
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(e)) => Err(CudaError::NoDriver(e)),
        Err(_) => Err(CudaError::NoDriver("libcuda.so was not found".into())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_never_panics() {
        match super::probe() {
            Ok(name) => assert!(!name.is_empty()),
            Err(e) => assert!(e.to_string().contains("no usable CUDA driver")),
        }
    }
}
