//! NumPy `.npy` files (format versions 1–3, little-endian, C order): reading with one clear
//! error per malformation, and writing.

use std::path::Path;

/// Element types memc exchanges through `.npy` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f4`
    F32,
    /// `<f2`
    F16,
    /// `<f8`
    F64,
    /// `<i8`
    I64,
    /// `<i4`
    I32,
    /// `|b1`
    Bool,
}

impl NpyDtype {
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::F32 => "<f4",
            NpyDtype::F16 => "<f2",
            NpyDtype::F64 => "<f8",
            NpyDtype::I64 => "<i8",
            NpyDtype::I32 => "<i4",
            NpyDtype::Bool => "|b1",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F32 | NpyDtype::I32 => 4,
            NpyDtype::F16 => 2,
            NpyDtype::F64 => 8,
            NpyDtype::I64 => 8,
            NpyDtype::Bool => 1,
        }
    }

    /// NumPy's name for it.
    pub fn numpy_name(self) -> &'static str {
        match self {
            NpyDtype::F32 => "float32",
            NpyDtype::F16 => "float16",
            NpyDtype::F64 => "float64",
            NpyDtype::I64 => "int64",
            NpyDtype::I32 => "int32",
            NpyDtype::Bool => "bool",
        }
    }
}

/// An array read from or written to a `.npy` file: raw little-endian bytes in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Element type.
    pub dtype: NpyDtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

/// A malformed or unsupported `.npy` file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a supported `.npy` array.
    #[error("{path}: not a valid .npy file: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        msg: String,
    },
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes).map_err(|msg| NpyError::Format {
        path: path.display().to_string(),
        msg,
    })
}

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic (save arrays with numpy.save)".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported format version {v}")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("the header is truncated")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "the header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or(format!("the header has no '{key}'"))?;
        let rest = header[at + key.len() + 2..].trim_start();
        Ok(rest
            .strip_prefix(':')
            .ok_or(format!("the header's '{key}' has no value"))?
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("bad 'descr'")?;
    let dtype = [NpyDtype::F32, NpyDtype::F64, NpyDtype::F16, NpyDtype::I64, NpyDtype::I32, NpyDtype::Bool]
        .into_iter()
        .find(|d| d.descr() == descr || (d.size() == 1 && descr == "<b1"))
        .ok_or_else(|| format!("dtype '{descr}' is not supported (use float32, float64, float16, int64, int32 or bool, little-endian)"))?;
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-ordered arrays are not supported (save numpy.ascontiguousarray(a))".into(),
        );
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad 'shape'")?;
    let mut shape = Vec::new();
    for part in shape_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        shape.push(
            part.parse::<usize>()
                .map_err(|_| format!("bad dim `{part}` in 'shape'"))?,
        );
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the shape is too large")?;
    let want = numel
        .checked_mul(dtype.size())
        .ok_or("the shape is too large")?;
    let data = &bytes[end..];
    if data.len() != want {
        return Err(format!(
            "shape {shape:?} of {} needs {want} data bytes but the file has {}",
            dtype.numpy_name(),
            data.len()
        ));
    }
    Ok(NpyArray {
        dtype,
        shape,
        data: data.to_vec(),
    })
}

/// Serialises an array as a version-1 `.npy`.
pub fn to_bytes(a: &NpyArray) -> Vec<u8> {
    let dims: Vec<String> = a.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        a.dtype.descr()
    );
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&a.data);
    out
}

/// Writes a `.npy` file with the one output writer (`weights::write_atomically_with`).
pub fn write(path: &Path, a: &NpyArray) -> Result<(), NpyError> {
    let io = |source| NpyError::Io {
        path: path.display().to_string(),
        source,
    };
    crate::weights::write_atomically(path, &to_bytes(a)).map_err(|e| match e {
        crate::RunError::Io { source, .. } => io(source),
        other => io(std::io::Error::other(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        for (dtype, shape) in [
            (NpyDtype::F32, vec![2, 3]),
            (NpyDtype::I64, vec![4]),
            (NpyDtype::Bool, vec![]),
            (NpyDtype::F16, vec![1, 0, 2]),
        ] {
            let n: usize = shape.iter().product();
            let a = NpyArray {
                dtype,
                data: (0..n * dtype.size()).map(|i| (i % 2) as u8).collect(),
                shape,
            };
            let bytes = to_bytes(&a);
            assert_eq!(
                bytes.len() % 64,
                a.data.len() % 64,
                "header is 64-byte aligned"
            );
            assert_eq!(parse(&bytes).unwrap(), a);
        }
    }

    #[test]
    fn rejects_malformed_files() {
        let good = to_bytes(&NpyArray {
            dtype: NpyDtype::I64,
            shape: vec![2],
            data: vec![0; 16],
        });
        assert!(parse(b"").unwrap_err().contains("magic"));
        assert!(parse(&good[..good.len() - 1])
            .unwrap_err()
            .contains("needs 16 data bytes"));
        assert!(parse(&good[..20]).unwrap_err().contains("truncated"));
        let mut complex = good.clone();
        let at = complex.windows(3).position(|w| w == b"<i8").unwrap();
        complex[at + 1] = b'c';
        assert!(parse(&complex)
            .unwrap_err()
            .contains("'<c8' is not supported"));
    }
}
