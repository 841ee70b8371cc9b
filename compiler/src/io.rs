//! Conversion between `.npy` arrays (memc-runtime) and IR tensors, with checks against what
//! a graph input expects.

use std::path::Path;

use memc_ir::{DType, Tensor, TensorType};
use memc_runtime::npy::{self, NpyArray, NpyDtype};

/// The IR dtype of an `.npy` dtype.
pub fn dtype_of(d: NpyDtype) -> DType {
    match d {
        NpyDtype::F32 => DType::F32,
        NpyDtype::F16 => DType::F16,
        NpyDtype::F64 => DType::F64,
        NpyDtype::I64 => DType::I64,
        NpyDtype::I32 => DType::I32,
        NpyDtype::Bool => DType::Bool,
    }
}

/// An `.npy` array as a tensor (no conversion: the dtype is kept).
pub fn tensor_of(a: NpyArray) -> Tensor {
    let ty = TensorType::new(dtype_of(a.dtype), a.shape);
    Tensor::from_bytes(ty, a.data.into()).expect("npy::parse checked the size")
}

/// A tensor as an `.npy` array; bf16 (which NumPy lacks) is widened to float32.
pub fn npy_of(t: &Tensor) -> NpyArray {
    let (dtype, data) = match t.dtype() {
        DType::F32 => (NpyDtype::F32, t.bytes().to_vec()),
        DType::F16 => (NpyDtype::F16, t.bytes().to_vec()),
        DType::F64 => (NpyDtype::F64, t.bytes().to_vec()),
        DType::BF16 => (
            NpyDtype::F32,
            t.to_f32_vec()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (NpyDtype::I64, t.bytes().to_vec()),
        DType::I32 => (NpyDtype::I32, t.bytes().to_vec()),
        // NumPy has int16, but memc's .npy reader does not: widened to int32.
        DType::I16 => (
            NpyDtype::I32,
            t.to_i64_vec()
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
        ),
        DType::Bool => (NpyDtype::Bool, t.bytes().to_vec()),
    };
    NpyArray {
        dtype,
        shape: t.shape().to_vec(),
        data,
    }
}

/// Reads an `.npy` file as a tensor.
pub fn read_tensor(path: &Path) -> Result<Tensor, npy::NpyError> {
    npy::read(path).map(tensor_of)
}

/// Writes a tensor as an `.npy` file (atomically).
pub fn write_tensor(path: &Path, t: &Tensor) -> Result<(), npy::NpyError> {
    npy::write(path, &npy_of(t))
}
