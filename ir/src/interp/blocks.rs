//! The block ops' semantics: a block (`swiglu_ffn`, `gelu_ffn`, `moc_ffn`, `rope`, `residual`,
//! `rev_couple`, `lm_head_ce`) is evaluated by its primitive steps ([`Op::expansion`]), so the
//! interpreter and the lowering pass cannot disagree.

use super::{eval, Arr};
use crate::Op;

/// A block's result from its `steps` ([`Op::expansion`] of its operands `ins`).
pub(super) fn eval_steps(
    ins: &[&Arr],
    steps: Vec<(Op, Vec<crate::Operand>)>,
) -> Result<Arr, String> {
    // A block: its steps, each rounded to the dtype as the lowered program would.
    let mut done: Vec<Arr> = vec![];
    for (step, operands) in steps {
        let args: Vec<&Arr> = operands
            .iter()
            .map(|o| match *o {
                crate::Operand::Input(i) => ins[i],
                crate::Operand::Step(i) => &done[i],
            })
            .collect();
        let r = eval(&step, &args)?;
        done.push(r);
    }
    Ok(done.pop().expect("a block has steps"))
}
