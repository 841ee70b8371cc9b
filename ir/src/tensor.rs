//! Tensors with data: parameters, constants and interpreter values.
//!
//! Data is little-endian, row-major, densely packed, held in [`bytes::Bytes`] so that an
//! initializer can point straight into a memory-mapped model file without a copy.

use bytes::Bytes;
use half::{bf16, f16};

use crate::{DType, TensorType};

/// A typed tensor and its bytes.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    ty: TensorType,
    data: Bytes,
}

/// A tensor's bytes do not fit its type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tensor of type {ty} needs {expected} bytes but has {actual}")]
pub struct TensorError {
    /// The declared type.
    pub ty: TensorType,
    /// Bytes the type needs.
    pub expected: usize,
    /// Bytes supplied.
    pub actual: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {} bytes)", self.ty, self.data.len())
    }
}

impl Tensor {
    /// Wraps bytes (zero-copy) after checking their length against the type.
    pub fn from_bytes(ty: TensorType, data: Bytes) -> Result<Tensor, TensorError> {
        if data.len() != ty.bytes() {
            return Err(TensorError {
                expected: ty.bytes(),
                actual: data.len(),
                ty,
            });
        }
        Ok(Tensor { ty, data })
    }

    /// A tensor of `dtype` and `shape` from f32 values, rounded to the dtype (floats), truncated
    /// toward zero (integers) or compared with zero (bool).
    pub fn from_f32(dtype: DType, shape: impl Into<Vec<usize>>, values: &[f32]) -> Tensor {
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.numel(),
            values.len(),
            "Tensor::from_f32: {} values for {}",
            values.len(),
            ty
        );
        if dtype == DType::F32 {
            let out: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            return Tensor {
                ty,
                data: Bytes::from(out),
            };
        }
        let mut out = Vec::with_capacity(ty.bytes());
        for &v in values {
            match dtype {
                DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                DType::F64 => out.extend_from_slice(&(v as f64).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
                DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
                DType::Bool => out.push((v != 0.0) as u8),
            }
        }
        Tensor {
            ty,
            data: Bytes::from(out),
        }
    }

    /// A tensor of `dtype` and `shape` from f64 values (rounded to the dtype; exact for f64).
    pub fn from_f64(dtype: DType, shape: impl Into<Vec<usize>>, values: &[f64]) -> Tensor {
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.numel(),
            values.len(),
            "Tensor::from_f64: {} values for {}",
            values.len(),
            ty
        );
        let out: Vec<u8> = match dtype {
            DType::F64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F32 => values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect(),
            _ => {
                let f: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                return Tensor::from_f32(dtype, ty.shape, &f);
            }
        };
        Tensor {
            ty,
            data: Bytes::from(out),
        }
    }

    /// Every element as f64 (exact for every dtype but huge i64 values).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.ty.dtype {
            DType::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::I64 | DType::I32 | DType::I16 | DType::Bool => {
                self.to_i64_vec().into_iter().map(|v| v as f64).collect()
            }
            _ => self.to_f32_vec().into_iter().map(f64::from).collect(),
        }
    }

    /// A tensor of `dtype` and `shape` from integer values (floats are converted exactly where
    /// representable, bool is `v != 0`).
    pub fn from_i64(dtype: DType, shape: impl Into<Vec<usize>>, values: &[i64]) -> Tensor {
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.numel(),
            values.len(),
            "Tensor::from_i64: {} values for {}",
            values.len(),
            ty
        );
        if dtype.is_float() {
            let f: Vec<f64> = values.iter().map(|&v| v as f64).collect();
            return Tensor::from_f64(dtype, ty.shape, &f);
        }
        let mut out = Vec::with_capacity(ty.bytes());
        for &v in values {
            match dtype {
                DType::I64 => out.extend_from_slice(&v.to_le_bytes()),
                DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
                DType::Bool => out.push((v != 0) as u8),
                _ => unreachable!(),
            }
        }
        Tensor {
            ty,
            data: Bytes::from(out),
        }
    }

    /// The tensor's type.
    pub fn ty(&self) -> &TensorType {
        &self.ty
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.ty.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.ty.shape
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.ty.numel()
    }

    /// The same bytes under another shape with as many elements.
    pub fn reshaped(&self, shape: impl Into<Vec<usize>>) -> Tensor {
        let ty = TensorType::new(self.ty.dtype, shape);
        assert_eq!(ty.numel(), self.numel());
        Tensor {
            ty,
            data: self.data.clone(),
        }
    }

    /// Every element as f32 (integers and bools converted).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let d = &self.data;
        match self.ty.dtype {
            DType::F64 => self.to_f64_vec().into_iter().map(|v| v as f32).collect(),
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => self.to_i64_vec().into_iter().map(|v| v as f32).collect(),
        }
    }

    /// Every element as i64 (floats truncated toward zero, bools as 0/1).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        let d = &self.data;
        match self.ty.dtype {
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::Bool => d.iter().map(|&b| (b != 0) as i64).collect(),
            _ => self.to_f64_vec().into_iter().map(|v| v as i64).collect(),
        }
    }
}
