//! Fused elementwise kernels through MLIR and LLVM.
//!
//! A fused elementwise [`Kernel`] becomes one MLIR function over static memrefs whose body is a
//! single `scf.parallel` loop nest over the result shape (the GPU backend maps it to blocks and
//! threads); operands of smaller (broadcast) shapes are read at index 0 on broadcast dims.
//! f16 and bf16 values are computed in f32 and rounded after every op, as the reference
//! interpreter does. MLIR's own passes lower it to the LLVM dialect (bare-pointer calling
//! convention), MLIR translates it to LLVM IR, and inkwell compiles that for the host.
//!
//! Every kernel gets a uniform entry point `void NAME(void **buffers)` (inputs, then outputs),
//! which the runtime and the tests call.

use std::fmt::Write;

use crate::fuse::Kernel;
use inkwell::context::Context as LlvmContext;
use inkwell::module::Module as LlvmModule;
use inkwell::AddressSpace;
use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;
use memc_ir::{BinaryOp, DType, Graph, Op, UnaryOp, ValueId};

/// Why a kernel could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel holds an op this generator does not handle.
    #[error("kernel `{kernel}`: {msg}")]
    Unsupported {
        /// The kernel's name.
        kernel: String,
        /// What is missing.
        msg: String,
    },
    /// MLIR rejected the module or a pass failed (a bug in memc).
    #[error("kernel `{kernel}`: MLIR: {msg}")]
    Mlir {
        /// The kernel's name.
        kernel: String,
        /// What MLIR said.
        msg: String,
    },
    /// LLVM failed (a bug in memc).
    #[error("kernel `{kernel}`: LLVM: {msg}")]
    Llvm {
        /// The kernel's name.
        kernel: String,
        /// What LLVM said.
        msg: String,
    },
    /// Linking an executable failed.
    #[error("{0}")]
    Link(String),
}

/// The MLIR lowering pipeline, from func/arith/math/scf/memref to the LLVM dialect. bf16
/// conversions are expanded into integer ops (`arith-expand`), so no compiler-rt helper is
/// needed. Math ops LLVM has intrinsics for go to them first (`sqrt` becomes an instruction
/// the loop vectoriser can widen; `exp`, `log`, `sin`, `cos` and `powf` become the same C
/// math library calls in LLVM's lowering); the rest (`tanh`, `erf`) become calls to the C
/// math library directly.
pub const LOWERING: &str = "builtin.module(canonicalize,arith-expand{include-bf16=true},convert-scf-to-cf,\
convert-math-to-llvm,convert-math-to-libm,expand-strided-metadata,finalize-memref-to-llvm,convert-arith-to-llvm,\
convert-func-to-llvm{use-bare-ptr-memref-call-conv=1},convert-cf-to-llvm,reconcile-unrealized-casts)";

/// The MLIR element type a dtype is stored as (bool as i8).
pub(crate) fn storage(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I64 => "i64",
        DType::I32 => "i32",
        DType::I16 => "i16",
        DType::Bool => "i8",
    }
}

/// The register type values of `d` are computed in.
fn compute(d: DType) -> &'static str {
    match d {
        DType::F16 | DType::BF16 => "f32",
        DType::Bool => "i1",
        other => storage(other),
    }
}

fn memref(g: &Graph, v: ValueId) -> String {
    let t = &g.value(v).ty;
    let dims: String = t.shape.iter().map(|d| format!("{d}x")).collect();
    format!("memref<{dims}{}>", storage(t.dtype))
}

/// Emits MLIR for scalar values in SSA form.
struct Body {
    text: String,
    next: usize,
}

impl Body {
    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%t{}", self.next)
    }

    fn emit(&mut self, rhs: &str) -> String {
        let name = self.fresh();
        let _ = writeln!(self.text, "    {name} = {rhs}");
        name
    }

    fn constant(&mut self, value: &str, ty: &str) -> String {
        self.emit(&format!("arith.constant {value} : {ty}"))
    }
}

/// The MLIR module of a fused elementwise kernel named `name`.
pub fn elementwise_mlir(g: &Graph, k: &Kernel, name: &str) -> Result<String, KernelError> {
    let unsupported = |msg: String| KernelError::Unsupported {
        kernel: name.to_string(),
        msg,
    };
    let last = *k
        .nodes
        .last()
        .ok_or_else(|| unsupported("empty kernel".into()))?;
    let touches_f16 = k
        .nodes
        .iter()
        .flat_map(|&n| g.node(n).inputs.iter().chain(&g.node(n).outputs))
        .any(|&v| g.value(v).ty.dtype == DType::F16);
    if touches_f16 {
        return Err(unsupported(
            "f16 values are not supported by host kernels yet (use bf16 or f32)".into(),
        ));
    }
    // A chain may end in a reduction: the chain runs over the reduction's input shape, inside
    // the reduction loops.
    let reduce = match &g.node(last).op {
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => Some((*kind, axes.clone(), *keep_dims)),
        _ => None,
    };
    let chain: &[memc_ir::NodeId] = if reduce.is_some() {
        &k.nodes[..k.nodes.len() - 1]
    } else {
        &k.nodes
    };
    let shape = match &reduce {
        Some(_) => g.value(g.node(last).inputs[0]).ty.shape.clone(),
        None => g.value(g.node(last).outputs[0]).ty.shape.clone(),
    };
    let reduced = |d: usize| {
        reduce
            .as_ref()
            .is_some_and(|(_, axes, _)| axes.contains(&d))
    };
    let rank = shape.len();
    let args: Vec<ValueId> = k.inputs.iter().chain(&k.outputs).copied().collect();
    let mut s = String::new();
    let params: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, &v)| format!("%a{i}: {}", memref(g, v)))
        .collect();
    let _ = writeln!(s, "func.func @{name}({}) {{", params.join(", "));
    let _ = writeln!(s, "  %c0 = arith.constant 0 : index");
    let _ = writeln!(s, "  %c1 = arith.constant 1 : index");
    let mut dims_const = Vec::new();
    for (d, &n) in shape.iter().enumerate() {
        let _ = writeln!(s, "  %n{d} = arith.constant {n} : index");
        dims_const.push(format!("%n{d}"));
    }
    let ivs: Vec<String> = (0..rank)
        .map(|d| {
            if reduced(d) {
                format!("%r{d}")
            } else {
                format!("%i{d}")
            }
        })
        .collect();
    let mut body = Body {
        text: String::new(),
        next: 0,
    };
    let mut env: std::collections::HashMap<ValueId, String> = std::collections::HashMap::new();
    let mut rounded: std::collections::HashMap<ValueId, String> = std::collections::HashMap::new();
    // Loads of the inputs, at broadcast indices.
    for (i, &v) in k.inputs.iter().enumerate() {
        let t = &g.value(v).ty;
        let off = rank - t.rank();
        let idx: Vec<String> = (0..t.rank())
            .map(|d| {
                if t.shape[d] == 1 && shape[d + off] != 1 {
                    "%c0".to_string()
                } else {
                    ivs[d + off].clone()
                }
            })
            .collect();
        let loaded = body.emit(&format!(
            "memref.load %a{i}[{}] : {}",
            idx.join(", "),
            memref(g, v)
        ));
        let value = match t.dtype {
            DType::F16 | DType::BF16 => body.emit(&format!(
                "arith.extf {loaded} : {} to f32",
                storage(t.dtype)
            )),
            DType::Bool => {
                let z = body.constant("0", "i8");
                body.emit(&format!("arith.cmpi ne, {loaded}, {z} : i8"))
            }
            _ => loaded,
        };
        env.insert(v, value);
    }
    for &n in chain {
        let node = g.node(n);
        let out = node.outputs[0];
        let ot = g.value(out).ty.dtype;
        let ins: Vec<String> = node.inputs.iter().map(|v| env[v].clone()).collect();
        let in_dt: Vec<DType> = node.inputs.iter().map(|&v| g.value(v).ty.dtype).collect();
        let v = scalar_op(&mut body, &node.op, &ins, &in_dt, ot).map_err(unsupported)?;
        // f16/bf16 results are rounded after every op (and stored as rounded).
        let v = match ot {
            DType::F16 | DType::BF16 => {
                let r = body.emit(&format!("arith.truncf {v} : f32 to {}", storage(ot)));
                rounded.insert(out, r.clone());
                body.emit(&format!("arith.extf {r} : {} to f32", storage(ot)))
            }
            _ => v,
        };
        env.insert(out, v);
    }
    if let Some((kind, axes, keep_dims)) = &reduce {
        return Ok(reduction_kernel(
            g,
            k,
            s,
            body,
            &env,
            &shape,
            &dims_const,
            *kind,
            axes,
            *keep_dims,
        ));
    }
    for (j, &v) in k.outputs.iter().enumerate() {
        let t = &g.value(v).ty;
        let val = env[&v].clone();
        let arg = stored_through(g, k, v).unwrap_or(k.inputs.len() + j);
        let stored = match t.dtype {
            DType::F16 | DType::BF16 => match rounded.get(&v) {
                Some(r) => r.clone(),
                None => body.emit(&format!("arith.truncf {val} : f32 to {}", storage(t.dtype))),
            },
            DType::Bool => body.emit(&format!("arith.extui {val} : i1 to i8")),
            _ => val,
        };
        let _ = writeln!(
            body.text,
            "    memref.store {stored}, %a{arg}[{}] : {}",
            ivs.join(", "),
            memref(g, v)
        );
    }
    if rank == 0 {
        let _ = writeln!(s, "  scf.execute_region {{");
        s += &body.text;
        let _ = writeln!(s, "    scf.yield\n  }}");
    } else {
        let zeros = vec!["%c0"; rank].join(", ");
        let ones = vec!["%c1"; rank].join(", ");
        let _ = writeln!(
            s,
            "  scf.parallel ({}) = ({zeros}) to ({}) step ({ones}) {{",
            ivs.join(", "),
            dims_const.join(", ")
        );
        s += &body.text;
        let _ = writeln!(s, "    scf.reduce\n  }}");
    }
    let _ = writeln!(s, "  return\n}}");
    Ok(s)
}

/// The operand argument through which an elementwise kernel stores its result `v`, when `v`
/// is an update's result whose target is one of the kernel's operands: the two share one
/// buffer in every program (the memory plan aliases an update to its target), and storing
/// through the operand's own argument lets LLVM see one array read and written at the same
/// index (vectorisable) rather than two arguments that might overlap. `None`: the result's
/// own argument. A caller passing separate buffers finds the result in that operand's.
pub fn stored_through(g: &Graph, k: &Kernel, v: ValueId) -> Option<usize> {
    let &(target, _) = g.updates().iter().find(|&&(_, u)| u == v)?;
    k.inputs.iter().position(|&x| x == target)
}

/// Closes a chain that ends in a reduction: `scf.parallel` over the kept dims, `scf.for` loops
/// with an accumulator over the reduced dims around the chain's `body`, and the result stored
/// once per kept index.
#[allow(clippy::too_many_arguments)]
fn reduction_kernel(
    g: &Graph,
    k: &Kernel,
    mut s: String,
    mut body: Body,
    env: &std::collections::HashMap<ValueId, String>,
    shape: &[usize],
    dims: &[String],
    kind: memc_ir::ReduceKind,
    axes: &[usize],
    keep_dims: bool,
) -> String {
    use memc_ir::ReduceKind;
    let last = g.node(*k.nodes.last().unwrap());
    let x = env[&last.inputs[0]].clone();
    let out = last.outputs[0];
    let ot = g.value(out).ty.dtype;
    let ct = compute(ot);
    // Accumulate inside the innermost loop. Sums may be reassociated so that LLVM vectorises
    // them (a different rounding, the same for every run and thread count). A max runs as
    // `maxnum` (which vectorises, `ops::reduce::maxnum`) beside an "any NaN" flag, and is NaN
    // when the flag is set: the NaN-propagating max of the interpreter, exactly.
    let inner = axes.len() - 1;
    let acc_in = format!("%acc{inner}");
    let is_max = kind == ReduceKind::Max;
    if is_max {
        let m = body.emit(&crate::ops::reduce::maxnum(&acc_in, &x, ct));
        let u = body.emit(&format!("arith.cmpf uno, {x}, {x} : {ct}"));
        let n = body.emit(&format!("arith.ori %nan{inner}, {u} : i1"));
        let _ = writeln!(body.text, "    scf.yield {m}, {n} : {ct}, i1");
    } else {
        let sum = body.emit(&format!(
            "arith.addf {acc_in}, {x} fastmath<reassoc> : {ct}"
        ));
        let _ = writeln!(body.text, "    scf.yield {sum} : {ct}");
    }
    let init = if kind == ReduceKind::Max {
        if ct == "f64" {
            "0xFFF0000000000000".to_string()
        } else {
            "0xFF800000".to_string()
        }
    } else {
        float_const(0.0)
    };
    let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
    let pivs: Vec<String> = kept.iter().map(|d| format!("%i{d}")).collect();
    if kept.is_empty() {
        let _ = writeln!(s, "  scf.execute_region {{");
    } else {
        let pdims: Vec<String> = kept.iter().map(|&d| dims[d].clone()).collect();
        let zeros = vec!["%c0"; kept.len()].join(", ");
        let ones = vec!["%c1"; kept.len()].join(", ");
        let _ = writeln!(
            s,
            "  scf.parallel ({}) = ({zeros}) to ({}) step ({ones}) {{",
            pivs.join(", "),
            pdims.join(", ")
        );
    }
    let _ = writeln!(s, "    %init = arith.constant {init} : {ct}");
    if is_max {
        let _ = writeln!(s, "    %nan_init = arith.constant false");
    }
    for (j, &d) in axes.iter().enumerate() {
        let (carried, carried_nan) = if j == 0 {
            ("%init".to_string(), "%nan_init".to_string())
        } else {
            (format!("%acc{}", j - 1), format!("%nan{}", j - 1))
        };
        if is_max {
            let _ = writeln!(s, "    %res{j}:2 = scf.for %r{d} = %c0 to {} step %c1 iter_args(%acc{j} = {carried}, %nan{j} = {carried_nan}) -> ({ct}, i1) {{", dims[d]);
        } else {
            let _ = writeln!(s, "    %res{j} = scf.for %r{d} = %c0 to {} step %c1 iter_args(%acc{j} = {carried}) -> ({ct}) {{", dims[d]);
        }
    }
    s += &body.text;
    for j in (0..axes.len()).rev() {
        let _ = writeln!(s, "    }}");
        if j > 0 {
            if is_max {
                let _ = writeln!(s, "    scf.yield %res{j}#0, %res{j}#1 : {ct}, i1");
            } else {
                let _ = writeln!(s, "    scf.yield %res{j} : {ct}");
            }
        }
    }
    let mut result = "%res0".to_string();
    if is_max {
        let nan = if ct == "f64" {
            "0x7FF8000000000000"
        } else {
            "0x7FC00000"
        };
        let _ = writeln!(s, "    %nan_c = arith.constant {nan} : {ct}");
        let _ = writeln!(
            s,
            "    %maxv = arith.select %res0#1, %nan_c, %res0#0 : {ct}"
        );
        result = "%maxv".to_string();
    }
    if kind == ReduceKind::Mean {
        let count: usize = axes.iter().map(|&a| shape[a]).product();
        let _ = writeln!(
            s,
            "    %count = arith.constant {} : {ct}",
            float_const(count as f64)
        );
        let _ = writeln!(s, "    %mean = arith.divf %res0, %count : {ct}");
        result = "%mean".to_string();
    }
    if matches!(ot, DType::F16 | DType::BF16) {
        let _ = writeln!(
            s,
            "    %rounded = arith.truncf {result} : f32 to {}",
            storage(ot)
        );
        result = "%rounded".to_string();
    }
    let oidx: Vec<String> = (0..shape.len())
        .filter_map(|d| match (axes.contains(&d), keep_dims) {
            (false, _) => Some(format!("%i{d}")),
            (true, true) => Some("%c0".to_string()),
            (true, false) => None,
        })
        .collect();
    let _ = writeln!(
        s,
        "    memref.store {result}, %a{}[{}] : {}",
        k.inputs.len(),
        oidx.join(", "),
        memref(g, out)
    );
    let _ = writeln!(
        s,
        "    {}\n  }}",
        if kept.is_empty() {
            "scf.yield"
        } else {
            "scf.reduce"
        }
    );
    let _ = writeln!(s, "  return\n}}");
    s
}

/// A float literal MLIR parses (`1.00000000000000000e0`).
fn float_const(v: f64) -> String {
    format!("{v:.17e}")
}

/// One node's scalar computation; returns the SSA name of its result.
fn scalar_op(
    b: &mut Body,
    op: &Op,
    x: &[String],
    dt: &[DType],
    out: DType,
) -> Result<String, String> {
    let ct = compute(out);
    let in_ct = compute(dt[0]);
    let float = dt[0].is_float();
    let r = match op {
        Op::Expand { .. } => x[0].clone(),
        Op::Unary(u) => match (u, float) {
            (UnaryOp::Not, _) => {
                let t = b.emit("arith.constant true");
                b.emit(&format!("arith.xori {}, {t} : i1", x[0]))
            }
            (UnaryOp::IsNaN, _) => b.emit(&format!("arith.cmpf uno, {}, {} : {in_ct}", x[0], x[0])),
            (UnaryOp::Neg, true) => b.emit(&format!("arith.negf {} : {ct}", x[0])),
            (UnaryOp::Neg, false) => {
                let z = b.constant("0", ct);
                b.emit(&format!("arith.subi {z}, {} : {ct}", x[0]))
            }
            (UnaryOp::Exp, true) => b.emit(&format!("math.exp {} : {ct}", x[0])),
            (UnaryOp::Log, true) => b.emit(&format!("math.log {} : {ct}", x[0])),
            (UnaryOp::Sqrt, true) => b.emit(&format!("math.sqrt {} : {ct}", x[0])),
            (UnaryOp::Tanh, true) => b.emit(&format!("math.tanh {} : {ct}", x[0])),
            (UnaryOp::Erf, true) => b.emit(&format!("math.erf {} : {ct}", x[0])),
            (UnaryOp::Cos, true) => b.emit(&format!("math.cos {} : {ct}", x[0])),
            (UnaryOp::Sin, true) => b.emit(&format!("math.sin {} : {ct}", x[0])),
            (UnaryOp::Reciprocal, true) => {
                let one = b.constant(&float_const(1.0), ct);
                b.emit(&format!("arith.divf {one}, {} : {ct}", x[0]))
            }
            (UnaryOp::Sigmoid, true) => {
                let n = b.emit(&format!("arith.negf {} : {ct}", x[0]));
                let e = b.emit(&format!("math.exp {n} : {ct}"));
                let one = b.constant(&float_const(1.0), ct);
                let d = b.emit(&format!("arith.addf {one}, {e} : {ct}"));
                b.emit(&format!("arith.divf {one}, {d} : {ct}"))
            }
            (UnaryOp::Silu, true) => {
                let n = b.emit(&format!("arith.negf {} : {ct}", x[0]));
                let e = b.emit(&format!("math.exp {n} : {ct}"));
                let one = b.constant(&float_const(1.0), ct);
                let d = b.emit(&format!("arith.addf {one}, {e} : {ct}"));
                b.emit(&format!("arith.divf {}, {d} : {ct}", x[0]))
            }
            (UnaryOp::Gelu | UnaryOp::GeluTanh, true) => {
                // 0.5·x·(1 + erf(x/√2)) or 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
                let inner = if *u == UnaryOp::Gelu {
                    let r = b.constant(&float_const(std::f64::consts::FRAC_1_SQRT_2), ct);
                    let t = b.emit(&format!("arith.mulf {}, {r} : {ct}", x[0]));
                    b.emit(&format!("math.erf {t} : {ct}"))
                } else {
                    let k = b.constant(&float_const(0.044715), ct);
                    let c = b.constant(&float_const((2.0 / std::f64::consts::PI).sqrt()), ct);
                    let x2 = b.emit(&format!("arith.mulf {}, {} : {ct}", x[0], x[0]));
                    let x3 = b.emit(&format!("arith.mulf {x2}, {} : {ct}", x[0]));
                    let kx3 = b.emit(&format!("arith.mulf {x3}, {k} : {ct}"));
                    let sum = b.emit(&format!("arith.addf {}, {kx3} : {ct}", x[0]));
                    let arg = b.emit(&format!("arith.mulf {sum}, {c} : {ct}"));
                    b.emit(&format!("math.tanh {arg} : {ct}"))
                };
                let one = b.constant(&float_const(1.0), ct);
                let half = b.constant(&float_const(0.5), ct);
                let p = b.emit(&format!("arith.addf {one}, {inner} : {ct}"));
                let hx = b.emit(&format!("arith.mulf {}, {half} : {ct}", x[0]));
                b.emit(&format!("arith.mulf {hx}, {p} : {ct}"))
            }
            (u, false) => return Err(format!("`{u:?}` on integers")),
        },
        Op::Binary(op) => {
            let (a, c) = (&x[0], &x[1]);
            if *op == BinaryOp::Pow {
                let e = if dt[1].is_float() {
                    c.clone()
                } else {
                    b.emit(&format!("arith.sitofp {c} : {} to {ct}", compute(dt[1])))
                };
                let e = if dt[1].is_float() && compute(dt[1]) != ct {
                    b.emit(&format!("arith.extf {e} : {} to {ct}", compute(dt[1])))
                } else {
                    e
                };
                if !float {
                    return Err("`pow` on integers".into());
                }
                b.emit(&format!("math.powf {a}, {e} : {ct}"))
            } else if float {
                let name = match op {
                    BinaryOp::Add => "arith.addf",
                    BinaryOp::Sub => "arith.subf",
                    BinaryOp::Mul => "arith.mulf",
                    BinaryOp::Div => "arith.divf",
                    BinaryOp::Max => "arith.maximumf",
                    BinaryOp::Min => "arith.minimumf",
                    BinaryOp::Equal => "arith.cmpf oeq,",
                    BinaryOp::Less => "arith.cmpf olt,",
                    BinaryOp::LessEqual => "arith.cmpf ole,",
                    BinaryOp::Greater => "arith.cmpf ogt,",
                    BinaryOp::GreaterEqual => "arith.cmpf oge,",
                    BinaryOp::And | BinaryOp::Pow => {
                        unreachable!("checked above / by the verifier")
                    }
                };
                b.emit(&format!("{name} {a}, {c} : {in_ct}"))
            } else {
                let name = match op {
                    BinaryOp::Add => "arith.addi",
                    BinaryOp::Sub => "arith.subi",
                    BinaryOp::Mul => "arith.muli",
                    BinaryOp::Div => "arith.divsi",
                    BinaryOp::Max => "arith.maxsi",
                    BinaryOp::Min => "arith.minsi",
                    BinaryOp::Equal => "arith.cmpi eq,",
                    BinaryOp::Less => "arith.cmpi slt,",
                    BinaryOp::LessEqual => "arith.cmpi sle,",
                    BinaryOp::Greater => "arith.cmpi sgt,",
                    BinaryOp::GreaterEqual => "arith.cmpi sge,",
                    BinaryOp::And => "arith.andi",
                    BinaryOp::Pow => unreachable!(),
                };
                b.emit(&format!("{name} {a}, {c} : {in_ct}"))
            }
        }
        Op::Where => b.emit(&format!(
            "arith.select {}, {}, {} : {}",
            x[0],
            x[1],
            x[2],
            compute(dt[1])
        )),
        Op::Cast { to } => cast(b, &x[0], dt[0], *to)?,
        other => return Err(format!("`{}` is not elementwise", other.name())),
    };
    Ok(r)
}

fn cast(b: &mut Body, x: &str, from: DType, to: DType) -> Result<String, String> {
    let (f, t) = (compute(from), compute(to));
    Ok(
        match (
            from.is_float(),
            to.is_float(),
            from == DType::Bool,
            to == DType::Bool,
        ) {
            _ if f == t => x.to_string(),
            (true, true, ..) => {
                let wider = |d: &str| match d {
                    "f64" => 3,
                    "f32" => 2,
                    _ => 1,
                };
                if wider(t) > wider(f) {
                    b.emit(&format!("arith.extf {x} : {f} to {t}"))
                } else {
                    b.emit(&format!("arith.truncf {x} : {f} to {t}"))
                }
            }
            (true, false, _, true) => {
                let z = b.constant(&float_const(0.0), f);
                b.emit(&format!("arith.cmpf une, {x}, {z} : {f}"))
            }
            (true, false, _, false) => b.emit(&format!("arith.fptosi {x} : {f} to {t}")),
            (false, true, true, _) => b.emit(&format!("arith.uitofp {x} : i1 to {t}")),
            (false, true, false, _) => b.emit(&format!("arith.sitofp {x} : {f} to {t}")),
            (false, false, _, true) => {
                let z = b.constant("0", f);
                b.emit(&format!("arith.cmpi ne, {x}, {z} : {f}"))
            }
            (false, false, true, false) => b.emit(&format!("arith.extui {x} : i1 to {t}")),
            (false, false, false, false) => {
                let bits = |d: &str| d[1..].parse::<u32>().unwrap_or(64);
                if bits(t) > bits(f) {
                    b.emit(&format!("arith.extsi {x} : {f} to {t}"))
                } else {
                    b.emit(&format!("arith.trunci {x} : {f} to {t}"))
                }
            }
        },
    )
}

/// A kernel lowered through MLIR and translated to LLVM IR.
pub struct Lowered {
    /// The LLVM IR, with the uniform entry point.
    pub llvm_ir: String,
}

/// An MLIR context with every dialect, pass and LLVM translation registered.
pub(crate) fn mlir_context() -> Context {
    // Pass registration is global and not safe to race: once per process.
    static PASSES: std::sync::Once = std::sync::Once::new();
    PASSES.call_once(register_all_passes);
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    context
}

/// Lowers the MLIR of kernel `name` (with `n_args` memref arguments) to LLVM IR with the entry
/// point `void name(void **buffers)`. For many kernels, reuse one [`Lowerer`].
pub fn lower(mlir: &str, name: &str, n_args: usize) -> Result<Lowered, KernelError> {
    Lowerer::new().lower(mlir, name, n_args)
}

/// An MLIR context with every dialect, pass and translation registered, for lowering many
/// kernels (setting one up costs milliseconds).
pub struct Lowerer {
    context: Context,
}

impl Default for Lowerer {
    fn default() -> Self {
        Lowerer::new()
    }
}

impl Lowerer {
    /// A fresh context.
    pub fn new() -> Lowerer {
        Lowerer {
            context: mlir_context(),
        }
    }

    /// See [`lower`].
    pub fn lower(&self, mlir: &str, name: &str, n_args: usize) -> Result<Lowered, KernelError> {
        lower_in(&self.context, mlir, name, n_args)
    }

    /// The MLIR context its kernels are lowered in (the GPU path lowers in it too).
    pub fn context(&self) -> &Context {
        &self.context
    }
}

fn lower_in(
    context: &Context,
    mlir: &str,
    name: &str,
    n_args: usize,
) -> Result<Lowered, KernelError> {
    let err = |msg: String| KernelError::Mlir {
        kernel: name.to_string(),
        msg,
    };
    // The kernel body is `NAME_body`; `NAME` is the uniform entry added below.
    let renamed = vector_math(
        &mlir.replacen(
            &format!("func.func @{name}("),
            &format!("func.func @{name}_body("),
            1,
        ),
        name,
    );
    let mut module = Module::parse(context, &renamed)
        .ok_or_else(|| err(format!("the generated module does not parse:\n{mlir}")))?;
    if !module.as_operation().verify() {
        return Err(err(format!(
            "the generated module does not verify:\n{mlir}"
        )));
    }
    let pm = PassManager::new(context);
    parse_pass_pipeline(pm.as_operation_pass_manager(), LOWERING)
        .map_err(|e| err(e.to_string()))?;
    pm.run(&mut module)
        .map_err(|e| err(format!("lowering failed: {e}")))?;

    let llvm = LlvmContext::create();
    // SAFETY: MLIR translates into the LLVM context we own; the module it returns is owned by
    // the caller, and inkwell's `Module` takes that ownership.
    let raw = unsafe {
        mlir_sys::mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), llvm.raw() as *mut _)
    };
    if raw.is_null() {
        return Err(err("translation to LLVM IR failed".into()));
    }
    let m: LlvmModule = unsafe { LlvmModule::new(raw as *mut _) };
    add_entry(&llvm, &m, name, n_args).map_err(|msg| KernelError::Llvm {
        kernel: name.to_string(),
        msg,
    })?;
    m.verify().map_err(|e| KernelError::Llvm {
        kernel: name.to_string(),
        msg: e.to_string(),
    })?;
    Ok(Lowered {
        llvm_ir: m.print_to_string().to_string(),
    })
}

/// Lowers every kernel of `kernels` (name, MLIR, number of memref arguments) as [`lower`]
/// does, on as many threads as the machine has cores (each with its own [`Lowerer`], taking
/// the next kernel when done with one); the LLVM IR in `kernels`' order, or the first error
/// in that order.
pub fn lower_many(kernels: &[(String, String, usize)]) -> Result<Vec<String>, KernelError> {
    // Setting up a context costs milliseconds: a thread per few kernels at most.
    crate::cores::for_each_index(
        kernels.len(),
        kernels.len().div_ceil(4),
        Lowerer::new,
        |lowerer, i| {
            let (name, mlir, n_args) = &kernels[i];
            lowerer.lower(mlir, name, *n_args).map(|l| l.llvm_ir)
        },
        || {
            Err(KernelError::Mlir {
                kernel: "lowering".into(),
                msg: "a lowering thread panicked".into(),
            })
        },
    )
    .into_iter()
    .collect()
}

/// `mlir` with every f32 `math.exp` replaced by a call to `@NAME_expf`, appended: exp as
/// arithmetic ([`EXPF`]) that LLVM inlines and vectorises, where libm's `expf` is an opaque
/// scalar call that stops the loop vectoriser (softmax, SiLU and sigmoid are exp-bound).
/// Host kernels only: the GPU path keeps `math.exp` (libdevice).
pub(crate) fn vector_math(mlir: &str, name: &str) -> String {
    if !mlir.contains("math.exp ") {
        return mlir.to_string();
    }
    let mut out = String::with_capacity(mlir.len() + EXPF.len());
    let mut used = false;
    for line in mlir.lines() {
        match line.split_once(" = math.exp ") {
            Some((lhs, rhs)) if rhs.ends_with(" : f32") => {
                let x = rhs.trim_end_matches(" : f32");
                out += &format!("{lhs} = func.call @{name}_expf({x}) : (f32) -> f32\n");
                used = true;
            }
            _ => {
                out += line;
                out.push('\n');
            }
        }
    }
    if used {
        out += &EXPF.replace("@expf", &format!("@{name}_expf"));
    }
    out
}

/// `exp` for f32 as arithmetic (Cephes' `expf`: n = round(x·log₂e) by the 1.5·2²³ trick,
/// r = x − n·ln 2 in two parts, a degree-6 polynomial, then scaled by 2ⁿ in two halves so that results down to the
/// subnormals are right); within 2 ulp of libm. `exp(−∞) = 0`, `exp(+∞) = +∞` (and above
/// 88.72), NaN stays NaN; below −110 the result is 0.
const EXPF: &str = "func.func @expf(%x: f32) -> f32 {
  %lo = arith.constant -1.100000e+02 : f32
  %hi = arith.constant 88.7228394 : f32
  %log2e = arith.constant 1.44269502 : f32
  %magic = arith.constant 12582912.0 : f32
  %c1 = arith.constant 0.693359375 : f32
  %c2 = arith.constant -2.12194440e-04 : f32
  %p0 = arith.constant 1.98756912e-04 : f32
  %p1 = arith.constant 1.39819994e-03 : f32
  %p2 = arith.constant 8.33345205e-03 : f32
  %p3 = arith.constant 4.16657962e-02 : f32
  %p4 = arith.constant 1.66666657e-01 : f32
  %p5 = arith.constant 5.00000012e-01 : f32
  %one = arith.constant 1.0 : f32
  %inf = arith.constant 0x7F800000 : f32
  %i1 = arith.constant 1 : i32
  %bias = arith.constant 127 : i32
  %sh = arith.constant 23 : i32
  %xa = arith.maxnumf %x, %lo : f32
  %xc = arith.minnumf %xa, %hi : f32
  %t = arith.mulf %xc, %log2e : f32
  %tm = arith.addf %t, %magic : f32
  %nf = arith.subf %tm, %magic : f32
  %a1 = arith.mulf %nf, %c1 : f32
  %r0 = arith.subf %xc, %a1 : f32
  %a2 = arith.mulf %nf, %c2 : f32
  %r = arith.subf %r0, %a2 : f32
  %m0 = arith.mulf %p0, %r : f32
  %q0 = arith.addf %m0, %p1 : f32
  %m1 = arith.mulf %q0, %r : f32
  %q1 = arith.addf %m1, %p2 : f32
  %m2 = arith.mulf %q1, %r : f32
  %q2 = arith.addf %m2, %p3 : f32
  %m3 = arith.mulf %q2, %r : f32
  %q3 = arith.addf %m3, %p4 : f32
  %m4 = arith.mulf %q3, %r : f32
  %q4 = arith.addf %m4, %p5 : f32
  %rr = arith.mulf %r, %r : f32
  %qr = arith.mulf %q4, %rr : f32
  %y0 = arith.addf %qr, %r : f32
  %y = arith.addf %y0, %one : f32
  %n = arith.fptosi %nf : f32 to i32
  %n1 = arith.shrsi %n, %i1 : i32
  %n2 = arith.subi %n, %n1 : i32
  %e1 = arith.addi %n1, %bias : i32
  %e2 = arith.addi %n2, %bias : i32
  %b1 = arith.shli %e1, %sh : i32
  %b2 = arith.shli %e2, %sh : i32
  %s1 = arith.bitcast %b1 : i32 to f32
  %s2 = arith.bitcast %b2 : i32 to f32
  %z1 = arith.mulf %y, %s1 : f32
  %z = arith.mulf %z1, %s2 : f32
  %big = arith.cmpf ogt, %x, %hi : f32
  %zb = arith.select %big, %inf, %z : f32
  %nan = arith.cmpf uno, %x, %x : f32
  %res = arith.select %nan, %x, %zb : f32
  return %res : f32
}
";

/// `void name(ptr %buffers) { call name_body(buffers[0], ..., buffers[n-1]) }`
fn add_entry<'c>(
    ctx: &'c LlvmContext,
    m: &LlvmModule<'c>,
    name: &str,
    n_args: usize,
) -> Result<(), String> {
    let body = m
        .get_function(&format!("{name}_body"))
        .ok_or("the kernel body is missing")?;
    let ptr = ctx.ptr_type(AddressSpace::default());
    let entry = m.add_function(name, ctx.void_type().fn_type(&[ptr.into()], false), None);
    let builder = ctx.create_builder();
    builder.position_at_end(ctx.append_basic_block(entry, "entry"));
    let bufs = entry
        .get_nth_param(0)
        .ok_or("no parameter")?
        .into_pointer_value();
    let mut args = Vec::with_capacity(n_args);
    for i in 0..n_args {
        let idx = ctx.i64_type().const_int(i as u64, false);
        // SAFETY: the runtime passes an array of `n_args` pointers.
        let slot =
            unsafe { builder.build_gep(ptr, bufs, &[idx], "slot") }.map_err(|e| e.to_string())?;
        let p = builder
            .build_load(ptr, slot, "buf")
            .map_err(|e| e.to_string())?;
        args.push(p.into());
    }
    builder
        .build_call(body, &args, "")
        .map_err(|e| e.to_string())?;
    builder.build_return(None).map_err(|e| e.to_string())?;
    Ok(())
}
