//! Reading ONNX files: memory-mapping, protobuf decoding (prost), tensor data (inline, typed
//! fields or external data files), all without copying raw tensor bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use memc_ir::{DType, Tensor, TensorType};
use prost::Message;

use super::proto::{tensor_proto, ModelProto, TensorProto};
use super::{dtype_of, ImportError};

fn map_file(path: &Path) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only; a model file changed by another process while memc
    // runs is outside what memc guards against (as for any mmap-based loader).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(Bytes::from_owner(map))
}

/// Memory-maps and decodes an ONNX model. Initializer `raw_data` points into the mapping.
pub fn load_model(path: &Path) -> Result<ModelProto, ImportError> {
    let bytes = map_file(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, bytes)
}

/// Decodes a model from bytes; `path` names it in errors.
pub(crate) fn decode(path: &Path, bytes: Bytes) -> Result<ModelProto, ImportError> {
    let malformed = |msg: String| ImportError::Malformed {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.is_empty() {
        return Err(malformed("the file is empty".into()));
    }
    let model = ModelProto::decode(bytes)
        .map_err(|e| malformed(format!("protobuf decoding failed: {e}")))?;
    if model.graph.is_none() {
        return Err(malformed("it has no graph".into()));
    }
    Ok(model)
}

/// External data files, each mapped once.
pub(crate) struct ExternalData {
    /// Where data files are looked up; `None` for in-memory models, which may not have any.
    dir: Option<PathBuf>,
    /// The directories a data file may resolve into: the model's directory and, when the
    /// model file is a symbolic link (a Hugging Face cache), the directory of its target.
    roots: Vec<PathBuf>,
    files: HashMap<String, Bytes>,
}

impl ExternalData {
    /// External data of an in-memory model: none may be read.
    pub(crate) fn none() -> ExternalData {
        ExternalData {
            dir: None,
            roots: vec![],
            files: HashMap::new(),
        }
    }

    /// External data of the model file at `model`: files in its directory only.
    pub(crate) fn beside(model: &Path) -> ExternalData {
        let dir = model.parent().map(Path::to_path_buf).unwrap_or_default();
        let roots = [
            dir.canonicalize().ok(),
            model
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf)),
        ]
        .into_iter()
        .flatten()
        .collect();
        ExternalData {
            dir: Some(dir),
            roots,
            files: HashMap::new(),
        }
    }

    /// The file `location` names, which must stay inside the model's directory and be a
    /// regular file: a model file is untrusted input, and must not make memc read what the
    /// user did not give it (onnx's checker and onnxruntime refuse the same locations).
    fn resolve(&self, dir: &Path, location: &str) -> Result<PathBuf, String> {
        let rel = Path::new(location);
        let plain = rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if location.is_empty() || !plain {
            return Err(format!(
                "its external data location `{location}` is not a relative path inside the model's directory (absolute paths and `..` are refused)"
            ));
        }
        let path = dir.join(rel);
        let real = path.canonicalize().map_err(|e| {
            format!(
                "cannot read its external data file `{}` ({e}); keep the data file next to the model",
                path.display()
            )
        })?;
        if !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(format!(
                "its external data location `{location}` resolves to `{}`, outside the model's directory",
                real.display()
            ));
        }
        if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
            return Err(format!(
                "its external data location `{location}` is not a regular file"
            ));
        }
        Ok(real)
    }

    fn slice(
        &mut self,
        location: &str,
        offset: usize,
        length: Option<usize>,
    ) -> Result<Bytes, String> {
        if !self.files.contains_key(location) {
            let dir = self
                .dir
                .as_ref()
                .ok_or("it uses external data, which an in-memory model cannot have")?;
            let path = self.resolve(dir, location)?;
            let data = map_file(&path).map_err(|e| {
                format!("cannot read its external data file `{}` ({e}); keep the data file next to the model", path.display())
            })?;
            self.files.insert(location.to_string(), data);
        }
        let data = &self.files[location];
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(data.len()),
        };
        match end {
            Some(end) if offset <= end && end <= data.len() => Ok(data.slice(offset..end)),
            _ => Err(format!(
                "external data `{location}` has {} bytes, but the tensor wants offset {offset} length {length:?}; the data file is truncated or belongs to another model",
                data.len()
            )),
        }
    }
}

/// Checked type of a tensor from its dims.
pub(crate) fn tensor_type(dtype: DType, dims: &[i64]) -> Result<TensorType, String> {
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dim {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let ty = TensorType::new(dtype, shape);
    ty.checked_bytes().ok_or("its dims are too large")?;
    Ok(ty)
}

/// The data of a `TensorProto`, zero-copy when it is `raw_data` or external.
pub(crate) fn tensor(t: &TensorProto, ext: &mut ExternalData) -> Result<Tensor, String> {
    let ty = tensor_type(dtype_of(t.data_type())?, &t.dims)?;
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let n = ty.numel();
    let data = if t.data_location() == tensor_proto::DataLocation::External {
        let mut location = None;
        let (mut offset, mut length) = (0usize, None);
        for kv in &t.external_data {
            let num = || {
                kv.value()
                    .parse::<usize>()
                    .map_err(|_| format!("bad external data {} `{}`", kv.key(), kv.value()))
            };
            match kv.key() {
                "location" => location = Some(kv.value().to_string()),
                "offset" => offset = num()?,
                "length" => length = Some(num()?),
                _ => {}
            }
        }
        let location = location.ok_or("external data without a location")?;
        ext.slice(&location, offset, length)?
    } else if let Some(raw) = &t.raw_data {
        raw.clone()
    } else {
        let count = |got: usize| {
            if got == n {
                Ok(())
            } else {
                Err(format!("has {got} values for a tensor of type {ty}"))
            }
        };
        // The values are counted before anything is allocated: dims are untrusted, and a
        // tensor of 2^40 elements with no data must be an error, not a 4 TiB allocation.
        count(match ty.dtype {
            DType::F64 => t.double_data.len(),
            DType::F32 => t.float_data.len(),
            DType::I64 => t.int64_data.len(),
            _ => t.int32_data.len(),
        })?;
        let mut out = Vec::with_capacity(ty.bytes());
        match ty.dtype {
            DType::F64 => {
                count(t.double_data.len())?;
                t.double_data
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            DType::F32 => {
                count(t.float_data.len())?;
                t.float_data
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            DType::I64 => {
                count(t.int64_data.len())?;
                t.int64_data
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            DType::I16 => {
                count(t.int32_data.len())?;
                t.int32_data
                    .iter()
                    .for_each(|&v| out.extend_from_slice(&(v as i16).to_le_bytes()));
            }
            DType::I32 => {
                count(t.int32_data.len())?;
                t.int32_data
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            DType::F16 | DType::BF16 => {
                count(t.int32_data.len())?;
                t.int32_data
                    .iter()
                    .for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes()));
            }
            DType::Bool => {
                count(t.int32_data.len())?;
                t.int32_data.iter().for_each(|v| out.push((*v != 0) as u8));
            }
        }
        Bytes::from(out)
    };
    if ty.dtype == DType::Bool && data.iter().any(|&b| b > 1) {
        let fixed: Vec<u8> = data.iter().map(|&b| (b != 0) as u8).collect();
        return Tensor::from_bytes(ty, Bytes::from(fixed)).map_err(|e| e.to_string());
    }
    Tensor::from_bytes(ty, data).map_err(|e| format!("its data does not match its type: {e}"))
}
