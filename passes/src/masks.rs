//! `fold_masks`: attention masks that are compile-time constants become `attention`'s
//! `causal` and `window` attributes ([`memc_ir::Scores`]), so no S×T mask is held in memory.
//!
//! With static shapes the exporters' mask arithmetic (a causal triangle, Mistral's and
//! Gemma 2's sliding windows, built from `Range`, `Trilu`, comparisons and `Where`) folds to a
//! constant `[B, 1, S, T]` tensor at import. Each attention whose mask is such a constant is
//! checked entry by entry: the mask must be 0 where keys are visible and `-inf` (or below
//! −1e30, PyTorch's `finfo.min`) exactly where a causal triangle and/or a window of the last
//! `w` keys hide them, the same for every batch row and head. Then the mask operand becomes a
//! rank-0 zero and the attributes say the rest; any other mask (padding from a run-time input,
//! an ALiBi bias) is left as it is. Unused constants are dropped.

use memc_ir::{Graph, NodeId, Op, Scores, Tensor, ValueId};

/// Values at or below this are a hidden key (PyTorch writes `torch.finfo(dtype).min`).
const HIDDEN: f64 = -1e30;

/// The causal flag and window of a mask of shape `[.., S, T]` (rank ≥ 2, leading dims
/// broadcast), when it is exactly such a mask.
fn causal_window(t: &Tensor) -> Option<(bool, usize)> {
    let shape = t.shape();
    let r = shape.len();
    if r < 2 || !t.dtype().is_float() {
        return None;
    }
    let (s, k) = (shape[r - 2], shape[r - 1]);
    if s < 2 || k < 2 || k < s {
        return None;
    }
    let off = k - s;
    let data = t.to_f64_vec();
    let hidden = |x: f64| x <= HIDDEN;
    // Read the pattern off the first slice, then check every slice against it.
    let first = &data[..s * k];
    let causal = (0..s).all(|i| ((i + off + 1)..k).all(|j| hidden(first[i * k + j])));
    // The window: the distance at which older keys start being hidden.
    let mut window: Option<usize> = None;
    for i in 0..s {
        if let Some(j) = (0..=(i + off)).rev().find(|&j| hidden(first[i * k + j])) {
            let w = i + off - j;
            window = Some(window.map_or(w, |x| x.min(w)));
        }
    }
    let window = match window {
        Some(0) => return None, // a query hidden from its own key: not a causal mask
        Some(w) => w,
        None => 0,
    };
    let sc = Scores {
        window,
        causal,
        ..Scores::scaled(1.0)
    };
    for slice in data.chunks(s * k) {
        for i in 0..s {
            for j in 0..k {
                let x = slice[i * k + j];
                let ok = if sc.hides(i, j, s, k) {
                    hidden(x)
                } else {
                    x == 0.0
                };
                if !ok {
                    return None;
                }
            }
        }
    }
    (causal || window > 0).then_some((causal, window))
}

/// Folds every constant causal or sliding-window attention mask of `g` into attributes (see
/// the module docs); returns how many masks it folded.
pub fn fold_masks(g: &mut Graph) -> usize {
    let mut folded = 0;
    let mut zero: Option<ValueId> = None;
    let mut seen: std::collections::HashMap<ValueId, Option<(bool, usize)>> = Default::default();
    for i in 0..g.nodes().len() {
        let n = NodeId(i as u32);
        let Op::Attention(sc) = g.node(n).op else {
            continue;
        };
        if sc.causal || sc.window > 0 {
            continue;
        }
        let mask = g.node(n).inputs[3];
        let q = g.value(g.node(n).inputs[0]).ty.clone();
        let t = g.value(g.node(n).inputs[1]).ty.shape[2];
        let ms = &g.value(mask).ty.shape;
        // The mask must span the query and key dims itself.
        let spans = ms.len() >= 2 && ms[ms.len() - 2] == q.shape[2] && ms[ms.len() - 1] == t;
        // Layers share one mask: read each once.
        let found = *seen
            .entry(mask)
            .or_insert_with(|| g.constant(mask).filter(|_| spans).and_then(causal_window));
        let Some((causal, window)) = found else {
            continue;
        };
        let z = *zero.get_or_insert_with(|| {
            g.add_const(Tensor::from_f64(q.dtype, Vec::<usize>::new(), &[0.0]))
        });
        let mut inputs = g.node(n).inputs.clone();
        inputs[3] = z;
        g.set_inputs(n, inputs);
        g.set_op(
            n,
            Op::Attention(Scores {
                causal,
                window,
                ..sc
            }),
        );
        folded += 1;
    }
    if folded > 0 {
        g.compact();
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;
    use memc_ir::DType;

    fn mask(s: usize, k: usize, hide: impl Fn(usize, usize) -> bool) -> Tensor {
        let v: Vec<f32> = (0..s * k)
            .map(|x| if hide(x / k, x % k) { f32::MIN } else { 0.0 })
            .collect();
        Tensor::from_f32(DType::F32, vec![1, 1, s, k], &v)
    }

    #[test]
    fn reads_causal_and_window_masks_and_refuses_others() {
        assert_eq!(causal_window(&mask(6, 6, |i, j| j > i)), Some((true, 0)));
        // Mistral's window of 3: a query sees itself and the 2 keys before it.
        assert_eq!(
            causal_window(&mask(6, 6, |i, j| j > i || i >= j + 3)),
            Some((true, 3))
        );
        // More keys than queries (a cache of 2 before the block).
        assert_eq!(
            causal_window(&mask(4, 6, |i, j| j > i + 2)),
            Some((true, 0))
        );
        // Not a triangle: one visible future key.
        assert_eq!(
            causal_window(&mask(6, 6, |i, j| j > i && (i, j) != (0, 5))),
            None
        );
        // Padding (a column hidden for every query) is not causal.
        assert_eq!(causal_window(&mask(6, 6, |i, j| j > i || j == 0)), None);
        // All zeros: nothing to fold.
        assert_eq!(causal_window(&mask(6, 6, |_, _| false)), None);
    }
}
