//! A program compiled for the host CPU: every kernel generated through MLIR and LLVM and
//! JIT-compiled, matmuls on the GEMM library of `memc-runtime`. This is the cpu backend of
//! `memc train --backend cpu` until executables are emitted ahead of time; values live in one
//! buffer each (the arena of the memory plan comes with the runtime's program format).

use std::collections::HashMap;

use memc_ir::{DType, Graph, Op, ValueId};
use memc_runtime::gemm::{matmul, GemmType};

use crate::fuse::{fuse, Kernel};
use crate::jit::with_host_jit;
use crate::kernel::{elementwise_mlir, KernelError, Lowerer};
use crate::ops::op_mlir;

/// How a kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// A generated kernel, called through the JIT.
    Generated,
    /// A matrix product on the GEMM library.
    Gemm,
}

/// The compiled program.
pub struct HostProgram {
    kernels: Vec<Kernel>,
    io: Vec<(Vec<ValueId>, Vec<ValueId>)>,
    runs: Vec<Run>,
    lowered: Vec<(String, String)>,
}

/// Buffers by value: inputs, params, constants, and every result once computed.
pub type Store = HashMap<ValueId, Vec<u8>>;

impl HostProgram {
    /// Fuses `g` and generates, lowers and translates every kernel.
    pub fn compile(g: &Graph) -> Result<HostProgram, KernelError> {
        let kernels = fuse(g);
        let mut io = Vec::with_capacity(kernels.len());
        let mut runs = Vec::with_capacity(kernels.len());
        let mut lowered = Vec::new();
        let lowerer = Lowerer::new();
        for (n, k) in kernels.iter().enumerate() {
            let name = format!("k{n}");
            let node = g.node(k.nodes[0]);
            if !k.elementwise && matches!(node.op, Op::MatMul) {
                let t = node.outputs.first().map(|&o| g.value(o).ty.dtype);
                if !matches!(t, Some(DType::F32 | DType::F64 | DType::BF16)) {
                    return Err(KernelError::Unsupported {
                        kernel: name,
                        msg: "matmul supports f32, f64 and bf16".into(),
                    });
                }
                io.push((node.inputs.clone(), node.outputs.clone()));
                runs.push(Run::Gemm);
                continue;
            }
            let (mlir, ins, outs) = if k.elementwise {
                (
                    elementwise_mlir(g, k, &name)?,
                    k.inputs.clone(),
                    k.outputs.clone(),
                )
            } else {
                (
                    op_mlir(g, k.nodes[0], &name)?,
                    node.inputs.clone(),
                    node.outputs.clone(),
                )
            };
            lowered.push((
                name.clone(),
                lowerer.lower(&mlir, &name, ins.len() + outs.len())?.llvm_ir,
            ));
            io.push((ins, outs));
            runs.push(Run::Generated);
        }
        Ok(HostProgram {
            kernels,
            io,
            runs,
            lowered,
        })
    }

    /// Number of kernels (generated and library).
    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    /// JIT-compiles the kernels and gives `f` a step function that runs the whole program on a
    /// [`Store`] (which must hold every input, param and constant).
    ///
    /// With `MEMC_PROFILE` set in the environment, the time spent per kind of kernel over all
    /// steps is printed to stderr at the end.
    pub fn with_steps<R>(
        &self,
        g: &Graph,
        f: impl FnOnce(&mut dyn FnMut(&mut Store)) -> R,
    ) -> Result<R, KernelError> {
        let profile = std::env::var_os("MEMC_PROFILE").is_some();
        let label = |n: usize| -> String {
            let k = &self.kernels[n];
            if k.elementwise {
                "fused elementwise".to_string()
            } else {
                g.node(k.nodes[0]).op.name().to_string()
            }
        };
        let mut spent: HashMap<String, (f64, usize)> = HashMap::new();
        let result = with_host_jit(&self.lowered, |call| {
            let mut step = |store: &mut Store| {
                for (n, run) in self.runs.iter().enumerate() {
                    let t0 = profile.then(std::time::Instant::now);
                    let (ins, outs) = &self.io[n];
                    match run {
                        Run::Generated => {
                            let mut out_bufs: Vec<Vec<u8>> = outs
                                .iter()
                                .map(|&v| vec![0u8; g.value(v).ty.bytes()])
                                .collect();
                            let mut ptrs: Vec<*mut u8> =
                                ins.iter().map(|v| store[v].as_ptr() as *mut u8).collect();
                            ptrs.extend(out_bufs.iter_mut().map(|b| b.as_mut_ptr()));
                            call(&format!("k{n}"), &ptrs);
                            for (&v, b) in outs.iter().zip(out_bufs) {
                                store.insert(v, b);
                            }
                        }
                        Run::Gemm => {
                            let t = match g.value(outs[0]).ty.dtype {
                                DType::F64 => GemmType::F64,
                                DType::BF16 => GemmType::BF16,
                                _ => GemmType::F32,
                            };
                            let mut out = vec![0u8; g.value(outs[0]).ty.bytes()];
                            let (a, b) = (ins[0], ins[1]);
                            matmul(
                                t,
                                &store[&a],
                                &g.value(a).ty.shape,
                                &store[&b],
                                &g.value(b).ty.shape,
                                &mut out,
                            );
                            store.insert(outs[0], out);
                        }
                    }
                    if let Some(t0) = t0 {
                        let e = spent.entry(label(n)).or_insert((0.0, 0));
                        e.0 += t0.elapsed().as_secs_f64() * 1e3;
                        e.1 += 1;
                    }
                }
            };
            f(&mut step)
        });
        if profile {
            let mut rows: Vec<(String, (f64, usize))> = spent.into_iter().collect();
            rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
            let total: f64 = rows.iter().map(|r| r.1 .0).sum();
            eprintln!("profile: {total:.1} ms in kernels");
            for (name, (ms, calls)) in rows.iter().take(12) {
                eprintln!(
                    "  {name:<24} {ms:>10.1} ms {:>5.1}% {calls:>7} calls",
                    100.0 * ms / total.max(1e-9)
                );
            }
        }
        result
    }
}
