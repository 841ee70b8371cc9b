//! memc-ir: the tensor graph IR every other memc crate works on.
//!
//! A [`Graph`] is a list of [`Node`]s in program order over SSA [`Value`]s with static
//! [`TensorType`]s. Each [`Op`] has shape inference ([`Op::infer`]) and reference semantics
//! ([`interpret`]); [`verify`] reports every broken invariant; [`print`] and [`parse`] give a
//! deterministic textual form that round-trips.
//!
//! This crate depends on no other workspace crate.

#![warn(missing_docs)]

mod dtype;
mod graph;
mod interp;
mod op;
mod parse;
mod print;
mod tensor;
mod verify;

pub use dtype::{DType, TensorType};
pub use graph::{Graph, Node, NodeId, ParamRole, Phase, Value, ValueDef, ValueId};
pub use interp::{eval_op, interpret, run, InterpError, Run, RunOptions};
pub use op::{broadcast_shapes, loss_dtype};
pub use op::{Attr, BinaryOp, Op, Operand, ReduceKind, Scores, UnaryOp};
pub use parse::{parse, ParseError};
pub use print::{print, print_annotated};
pub use tensor::{Tensor, TensorError};
pub use verify::{verify, VerifyError};
