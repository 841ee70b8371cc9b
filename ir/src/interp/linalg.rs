//! The linear-algebra ops' semantics: `matmul` (batched, broadcast, 1-D operands promoted;
//! f64 accumulation).

use super::{broadcast_strides, offsets, Arr, Data};
use crate::op::broadcast_shapes;
use crate::Op;

/// [`Op::MatMul`]; `shape` is the result's.
pub(super) fn eval(op: &Op, ins: &[&Arr], shape: &[usize]) -> Result<Data, String> {
    Ok(match op {
        Op::MatMul => matmul(ins[0], ins[1], shape),
        _ => unreachable!("`{}` is not a linear-algebra op", op.name()),
    })
}

fn matmul(a: &Arr, b: &Arr, out_shape: &[usize]) -> Data {
    // Promote 1-D operands to matrices, as NumPy does.
    let ash = if a.shape.len() == 1 {
        vec![1, a.shape[0]]
    } else {
        a.shape.clone()
    };
    let bsh = if b.shape.len() == 1 {
        vec![b.shape[0], 1]
    } else {
        b.shape.clone()
    };
    let (m, k, n) = (ash[ash.len() - 2], ash[ash.len() - 1], bsh[bsh.len() - 1]);
    let batch =
        broadcast_shapes(&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]).expect("checked by infer");
    let abase = offsets(
        &batch,
        &broadcast_strides(&ash[..ash.len() - 2], &batch)
            .iter()
            .map(|s| s * m * k)
            .collect::<Vec<_>>(),
        0,
    );
    let bbase = offsets(
        &batch,
        &broadcast_strides(&bsh[..bsh.len() - 2], &batch)
            .iter()
            .map(|s| s * k * n)
            .collect::<Vec<_>>(),
        0,
    );
    let (x, y) = (a.f(), b.f());
    let mut out = Vec::with_capacity(out_shape.iter().product());
    let mut bt = vec![0.0; k * n];
    for (&ao, &bo) in abase.iter().zip(&bbase) {
        for kk in 0..k {
            for j in 0..n {
                bt[j * k + kk] = y[bo + kk * n + j];
            }
        }
        for i in 0..m {
            let row = &x[ao + i * k..ao + (i + 1) * k];
            for j in 0..n {
                let col = &bt[j * k..(j + 1) * k];
                out.push(row.iter().zip(col).map(|(p, q)| p * q).sum::<f64>());
            }
        }
    }
    Data::F(out)
}
