//! ONNX op → IR conversion, one function per op family, choosing behaviour by opset.
//!
//! Operands that define shapes (Reshape's shape, Slice's starts, axes inputs, ...) must be
//! constants once input shapes are bound; [`Ctx::emit`] folds any node whose operands are all
//! constant, so exporter shape arithmetic disappears here.

use memc_ir::{BinaryOp, DType, Op, ReduceKind, Tensor, UnaryOp, ValueId};

use super::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use super::{load, Ctx, Val};

type Res<T> = Result<T, String>;

struct N<'a> {
    node: &'a NodeProto,
    inputs: &'a [Option<Val>],
}

impl N<'_> {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name() == name)
    }

    fn int(&self, name: &str, default: i64) -> Res<i64> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) if a.r#type() == AttributeType::Int || a.i.is_some() => Ok(a.i()),
            Some(_) => Err(format!("attribute `{name}` must be an integer")),
        }
    }

    fn float(&self, name: &str, default: f32) -> Res<f32> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) if a.r#type() == AttributeType::Float || a.f.is_some() => Ok(a.f()),
            Some(_) => Err(format!("attribute `{name}` must be a float")),
        }
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    /// Operand `i`, which must be present.
    fn input(&self, i: usize) -> Res<Val> {
        self.inputs
            .get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| format!("operand {i} is missing"))
    }

    fn opt_input(&self, i: usize) -> Option<Val> {
        self.inputs.get(i).cloned().flatten()
    }

    fn name(&self) -> &str {
        self.node.name()
    }
}

/// Integer values of a constant operand (shape, axes, starts, ...).
fn const_ints(v: &Val, what: &str) -> Res<Vec<i64>> {
    match v {
        Val::Const(t) if !t.dtype().is_float() => Ok(t.to_i64_vec()),
        Val::Const(t) => Err(format!("{what} must be integers, got {}", t.dtype())),
        Val::Ir(_) => Err(format!(
            "{what} must be known at compile time but depends on run-time data; memc needs static shapes (bind dynamic inputs with --shape)"
        )),
    }
}

fn axis(a: i64, rank: usize) -> Res<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("axis {a} is out of range for rank {rank}"))
    }
}

fn axes(list: &[i64], rank: usize) -> Res<Vec<usize>> {
    let mut v = list
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Res<Vec<_>>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Converts one node; returns one value per ONNX output.
pub(crate) fn convert(ctx: &mut Ctx, node: &NodeProto, inputs: &[Option<Val>]) -> Res<Vec<Val>> {
    let n = N { node, inputs };
    let name = node.name().to_string();
    let op_type = node.op_type();
    let unary = |u: UnaryOp| Some(u);
    let u = match op_type {
        "Neg" => unary(UnaryOp::Neg),
        "Exp" => unary(UnaryOp::Exp),
        "Log" => unary(UnaryOp::Log),
        "Sqrt" => unary(UnaryOp::Sqrt),
        "Reciprocal" => unary(UnaryOp::Reciprocal),
        "Tanh" => unary(UnaryOp::Tanh),
        "Erf" => unary(UnaryOp::Erf),
        "Sigmoid" => unary(UnaryOp::Sigmoid),
        "Cos" => unary(UnaryOp::Cos),
        "Sin" => unary(UnaryOp::Sin),
        "Not" => unary(UnaryOp::Not),
        "IsNaN" => unary(UnaryOp::IsNaN),
        _ => None,
    };
    if let Some(u) = u {
        return Ok(vec![ctx.emit(Op::Unary(u), &[n.input(0)?], &name)?]);
    }
    let b = match op_type {
        "Add" => Some(BinaryOp::Add),
        "Sub" => Some(BinaryOp::Sub),
        "Mul" => Some(BinaryOp::Mul),
        "Div" => Some(BinaryOp::Div),
        "Pow" => Some(BinaryOp::Pow),
        "Equal" => Some(BinaryOp::Equal),
        "Less" => Some(BinaryOp::Less),
        "LessOrEqual" => Some(BinaryOp::LessEqual),
        "Greater" => Some(BinaryOp::Greater),
        "GreaterOrEqual" => Some(BinaryOp::GreaterEqual),
        "And" => Some(BinaryOp::And),
        _ => None,
    };
    if let Some(b) = b {
        return Ok(vec![ctx.emit(
            Op::Binary(b),
            &[n.input(0)?, n.input(1)?],
            &name,
        )?]);
    }
    let one = |v: Val| Ok(vec![v]);
    match op_type {
        "Identity" => one(n.input(0)?),
        // relu(x) = max(x, 0).
        "Relu" => {
            let x = n.input(0)?;
            let zero = Val::Const(Tensor::from_f32(ctx.ty(&x).dtype, vec![], &[0.0]));
            one(ctx.emit(Op::Binary(BinaryOp::Max), &[x, zero], &name)?)
        }
        "Dropout" => dropout(ctx, &n),
        "Where" => one(ctx.emit(Op::Where, &[n.input(0)?, n.input(1)?, n.input(2)?], &name)?),
        "Cast" => {
            let to = super::dtype_of(n.int("to", 0)? as i32)?;
            let x = n.input(0)?;
            if ctx.ty(&x).dtype == to {
                return one(x);
            }
            one(ctx.emit(Op::Cast { to }, &[x], &name)?)
        }
        // CastLike(x, t): x cast to t's element type (t's values are not read).
        "CastLike" => {
            let to = ctx.ty(&n.input(1)?).dtype;
            let x = n.input(0)?;
            if ctx.ty(&x).dtype == to {
                return one(x);
            }
            one(ctx.emit(Op::Cast { to }, &[x], &name)?)
        }
        "MatMul" => one(ctx.emit(Op::MatMul, &[n.input(0)?, n.input(1)?], &name)?),
        "Gemm" => gemm(ctx, &n),
        "Softmax" | "LogSoftmax" => {
            let x = n.input(0)?;
            let rank = ctx.ty(&x).rank();
            let default = if ctx.opset >= 13 { -1 } else { 1 };
            let a = axis(n.int("axis", default)?, rank)?;
            if ctx.opset < 13 && a != rank - 1 {
                return Err("before opset 13 Softmax flattens from `axis`; only the last axis is supported, re-export with opset ≥ 13".into());
            }
            let op = if op_type == "Softmax" { Op::Softmax { axis: a } } else { Op::LogSoftmax { axis: a } };
            one(ctx.emit(op, &[x], &name)?)
        }
        "LayerNormalization" => {
            if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                return Err("only the first output (Y) is supported; Mean and InvStdDev outputs are not".into());
            }
            let x = n.input(0)?;
            let a = axis(n.int("axis", -1)?, ctx.ty(&x).rank())?;
            let epsilon = n.float("epsilon", 1e-5)?;
            let mut operands = vec![x, n.input(1)?];
            operands.extend(n.opt_input(2));
            one(ctx.emit(Op::LayerNorm { axis: a, epsilon }, &operands, &name)?)
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" => reduce(ctx, &n),
        "Gather" => {
            let x = n.input(0)?;
            let a = axis(n.int("axis", 0)?, ctx.ty(&x).rank())?;
            one(ctx.emit(Op::Gather { axis: a }, &[x, n.input(1)?], &name)?)
        }
        "GatherElements" => {
            let x = n.input(0)?;
            let a = axis(n.int("axis", 0)?, ctx.ty(&x).rank())?;
            one(ctx.emit(Op::GatherElements { axis: a }, &[x, n.input(1)?], &name)?)
        }
        "Reshape" => {
            let x = n.input(0)?;
            let target = const_ints(&n.input(1)?, "the target shape")?;
            let shape = reshape_target(&ctx.ty(&x).shape, &target, n.int("allowzero", 0)? != 0)?;
            one(reshape(ctx, x, shape, &name)?)
        }
        "Transpose" => {
            let x = n.input(0)?;
            let rank = ctx.ty(&x).rank();
            let perm = match n.ints("perm") {
                Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Res<Vec<_>>>()?,
                None => (0..rank).rev().collect(),
            };
            one(ctx.emit(Op::Transpose { perm }, &[x], &name)?)
        }
        "Unsqueeze" => {
            let x = n.input(0)?;
            let list = if ctx.opset >= 13 { const_ints(&n.input(1)?, "the axes")? } else { n.ints("axes").unwrap_or_default() };
            let shape = ctx.ty(&x).shape;
            let out_rank = shape.len() + list.len();
            let ax = axes(&list, out_rank)?;
            if ax.len() != list.len() {
                return Err("repeated axes".into());
            }
            let mut it = shape.into_iter();
            let out = (0..out_rank).map(|i| if ax.contains(&i) { 1 } else { it.next().unwrap() }).collect();
            one(reshape(ctx, x, out, &name)?)
        }
        "Squeeze" => {
            let x = n.input(0)?;
            let shape = ctx.ty(&x).shape;
            let list = if ctx.opset >= 13 {
                n.opt_input(1).map(|v| const_ints(&v, "the axes")).transpose()?
            } else {
                n.ints("axes")
            };
            let ax = match list {
                Some(l) => axes(&l, shape.len())?,
                None => (0..shape.len()).filter(|&i| shape[i] == 1).collect(),
            };
            if let Some(&a) = ax.iter().find(|&&a| shape[a] != 1) {
                return Err(format!("cannot squeeze dim {a} of size {}", shape[a]));
            }
            let out = shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect();
            one(reshape(ctx, x, out, &name)?)
        }
        "Slice" => slice(ctx, &n),
        "Concat" => {
            let ins: Vec<Val> = n.inputs.iter().flatten().cloned().collect();
            let first = ins.first().ok_or("no operands")?;
            let rank = ctx.ty(first).rank();
            if let Some((k, v)) = ins.iter().enumerate().find(|(_, v)| ctx.ty(v).rank() != rank) {
                return Err(format!(
                    "operand {k} has rank {}, operand 0 has rank {rank}: Concat joins tensors of one rank",
                    ctx.ty(v).rank()
                ));
            }
            let a = axis(n.int("axis", 0)?, rank)?;
            // Empty operands (common in exporter shape arithmetic) contribute nothing.
            let ins: Vec<Val> = ins.into_iter().filter(|v| ctx.ty(v).shape[a] != 0 || ctx.ty(v).numel() != 0).collect();
            if ins.len() == 1 {
                return one(ins.into_iter().next().unwrap());
            }
            one(ctx.emit(Op::Concat { axis: a }, &ins, &name)?)
        }
        "Split" => split(ctx, &n),
        "Expand" => {
            let x = n.input(0)?;
            let target: Vec<usize> = const_ints(&n.input(1)?, "the target shape")?
                .into_iter()
                .map(|d| usize::try_from(d).map_err(|_| format!("negative dim {d} in the target shape")))
                .collect::<Res<_>>()?;
            let shape = memc_ir::broadcast_shapes(&ctx.ty(&x).shape, &target)?;
            if shape == ctx.ty(&x).shape {
                return one(x);
            }
            one(ctx.emit(Op::Expand { shape }, &[x], &name)?)
        }
        "Trilu" => {
            let x = n.input(0)?;
            let k = match n.opt_input(1) {
                Some(v) => *const_ints(&v, "k")?.first().ok_or("k is empty")?,
                None => 0,
            };
            one(ctx.emit(Op::Trilu { upper: n.int("upper", 1)? != 0, k }, &[x], &name)?)
        }
        "Constant" => one(Val::Const(constant(&n)?)),
        "ConstantOfShape" => {
            let dims = const_ints(&n.input(0)?, "the shape")?;
            let value = match n.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) => load::tensor(t, &mut super::load::ExternalData::none())?,
                None => Tensor::from_f32(DType::F32, vec![1], &[0.0]),
            };
            if value.numel() != 1 {
                return Err("`value` must hold one element".into());
            }
            let ty = load::tensor_type(value.dtype(), &dims)?;
            if ty.bytes() > super::CONST_FOLD_MAX_BYTES {
                return Err(format!("the constant of shape {dims:?} is too large"));
            }
            let v = value.bytes().clone();
            let data: Vec<u8> = v.iter().copied().cycle().take(ty.bytes()).collect();
            one(Val::Const(Tensor::from_bytes(ty, data.into()).map_err(|e| e.to_string())?))
        }
        "Shape" => {
            let shape = ctx.ty(&n.input(0)?).shape;
            let r = shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(n.int("start", 0)?);
            let end = clamp(n.int("end", r)?);
            let dims: Vec<i64> = shape[start..end.max(start)].iter().map(|&d| d as i64).collect();
            one(Val::Const(Tensor::from_i64(DType::I64, vec![dims.len()], &dims)))
        }
        "Size" => {
            let numel = ctx.ty(&n.input(0)?).numel() as i64;
            one(Val::Const(Tensor::from_i64(DType::I64, vec![], &[numel])))
        }
        "Range" => range(&n),
        "Gelu" => gelu(ctx, &n),
        "Max" => {
            let mut ins = n.inputs.iter().flatten().cloned();
            let mut acc = ins.next().ok_or("no operands")?;
            for v in ins {
                acc = ctx.emit(Op::Binary(BinaryOp::Max), &[acc, v], &name)?;
            }
            one(acc)
        }
        "Flatten" => {
            let x = n.input(0)?;
            let shape = ctx.ty(&x).shape;
            let a = n.int("axis", 1)?;
            let a = if a < 0 { a + shape.len() as i64 } else { a };
            if !(0..=shape.len() as i64).contains(&a) {
                return Err(format!("axis {a} is out of range for rank {}", shape.len()));
            }
            let (outer, inner) = shape.split_at(a as usize);
            one(reshape(ctx, x, vec![outer.iter().product(), inner.iter().product()], &name)?)
        }
        "CumSum" => {
            let x = n.input(0)?;
            let rank = ctx.ty(&x).shape.len();
            let a = axis(*const_ints(&n.input(1)?, "the axis")?.first().ok_or("the axis is empty")?, rank)?;
            let (exclusive, reverse) = (n.int("exclusive", 0)? != 0, n.int("reverse", 0)? != 0);
            match x {
                Val::Const(x) => one(Val::Const(cumsum(&x, a, exclusive, reverse))),
                Val::Ir(v) => one(cumsum_of_mask(ctx, v, a, exclusive, reverse, &name)?),
            }
        }
        "GatherND" => {
            if n.int("batch_dims", 0)? != 0 {
                return Err("only batch_dims = 0 is supported".into());
            }
            one(ctx.emit(Op::GatherNd, &[n.input(0)?, n.input(1)?], &name)?)
        }
        _ => Err(format!(
            "op `{op_type}` is not supported by memc yet; supported ops are listed in ARCHITECTURE.md (ONNX frontend)"
        )),
    }
}

fn reshape(ctx: &mut Ctx, x: Val, shape: Vec<usize>, name: &str) -> Res<Val> {
    if ctx.ty(&x).shape == shape {
        return Ok(x);
    }
    ctx.emit(Op::Reshape { shape }, &[x], name)
}

fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Res<Vec<usize>> {
    let numel: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            0 if !allowzero => out.push(
                *input
                    .get(i)
                    .ok_or("0 in the target shape has no input dim to copy")?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("invalid target shape {target:?}")),
        }
    }
    let product = |v: &[usize]| v.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if let Some(i) = infer {
        let rest = product(&out).ok_or_else(|| format!("target shape {target:?} is too large"))?;
        if rest == 0 || !numel.is_multiple_of(rest) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = numel / rest;
    }
    if product(&out) != Some(numel) {
        return Err(format!(
            "cannot reshape {input:?} ({numel} elements) to {target:?}"
        ));
    }
    Ok(out)
}

fn gemm(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let name = n.name().to_string();
    let t = |ctx: &mut Ctx, v: Val, flag: &str| -> Res<Val> {
        if n.int(flag, 0)? != 0 {
            ctx.emit(Op::Transpose { perm: vec![1, 0] }, &[v], &name)
        } else {
            Ok(v)
        }
    };
    let a = t(ctx, n.input(0)?, "transA")?;
    let b = t(ctx, n.input(1)?, "transB")?;
    let dtype = ctx.ty(&a).dtype;
    let mut y = ctx.emit(Op::MatMul, &[a, b], &name)?;
    let alpha = n.float("alpha", 1.0)?;
    if alpha != 1.0 {
        let s = Val::Const(Tensor::from_f32(dtype, vec![], &[alpha]));
        y = ctx.emit(Op::Binary(BinaryOp::Mul), &[y, s], &name)?;
    }
    if let Some(mut c) = n.opt_input(2) {
        let beta = n.float("beta", 1.0)?;
        if beta != 1.0 {
            let s = Val::Const(Tensor::from_f32(dtype, vec![], &[beta]));
            c = ctx.emit(Op::Binary(BinaryOp::Mul), &[c, s], &name)?;
        }
        y = ctx.emit(Op::Binary(BinaryOp::Add), &[y, c], &name)?;
    }
    Ok(vec![y])
}

fn reduce(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let x = n.input(0)?;
    let rank = ctx.ty(&x).rank();
    let kind = match n.node.op_type() {
        "ReduceMean" => ReduceKind::Mean,
        "ReduceSum" => ReduceKind::Sum,
        _ => ReduceKind::Max,
    };
    // Axes moved from an attribute to an input: ReduceSum at opset 13, the others at 18.
    let axes_as_input = if kind == ReduceKind::Sum {
        ctx.opset >= 13
    } else {
        ctx.opset >= 18
    };
    let list = if axes_as_input {
        n.opt_input(1)
            .map(|v| const_ints(&v, "the axes"))
            .transpose()?
    } else {
        n.ints("axes")
    };
    let list = list.filter(|l| !l.is_empty());
    let ax = match list {
        Some(l) => axes(&l, rank)?,
        None if n.int("noop_with_empty_axes", 0)? != 0 => return Ok(vec![x]),
        None => (0..rank).collect(),
    };
    let keep_dims = n.int("keepdims", 1)? != 0;
    Ok(vec![ctx.emit(
        Op::Reduce {
            kind,
            axes: ax,
            keep_dims,
        },
        &[x],
        n.name(),
    )?])
}

fn slice(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let x = n.input(0)?;
    let shape = ctx.ty(&x).shape;
    let rank = shape.len();
    let (starts, ends, ax, steps) = if ctx.opset >= 10 {
        let starts = const_ints(&n.input(1)?, "the starts")?;
        let ends = const_ints(&n.input(2)?, "the ends")?;
        let ax = match n.opt_input(3) {
            Some(v) => const_ints(&v, "the axes")?,
            None => (0..starts.len() as i64).collect(),
        };
        let steps = match n.opt_input(4) {
            Some(v) => const_ints(&v, "the steps")?,
            None => vec![1; starts.len()],
        };
        (starts, ends, ax, steps)
    } else {
        let starts = n.ints("starts").ok_or("attribute `starts` is missing")?;
        let ends = n.ints("ends").ok_or("attribute `ends` is missing")?;
        let ax = n
            .ints("axes")
            .unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = vec![1; starts.len()];
        (starts, ends, ax, steps)
    };
    if starts.len() != ends.len() || ax.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    let mut s: Vec<usize> = vec![0; rank];
    let mut e: Vec<usize> = shape.clone();
    let mut st: Vec<usize> = vec![1; rank];
    for k in 0..starts.len() {
        let a = axis(ax[k], rank)?;
        let dim = shape[a] as i64;
        if steps[k] <= 0 {
            return Err(format!(
                "step {} is not supported (only positive steps)",
                steps[k]
            ));
        }
        let norm = |v: i64| (if v < 0 { v + dim } else { v }).clamp(0, dim);
        let (b, f) = (norm(starts[k]), norm(ends[k]));
        s[a] = b as usize;
        e[a] = f.max(b) as usize;
        st[a] = steps[k] as usize;
    }
    if s.iter().all(|&v| v == 0) && e == shape && st.iter().all(|&v| v == 1) {
        return Ok(vec![x]);
    }
    Ok(vec![ctx.emit(
        Op::Slice {
            starts: s,
            ends: e,
            steps: st,
        },
        &[x],
        n.name(),
    )?])
}

fn split(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let x = n.input(0)?;
    let shape = ctx.ty(&x).shape;
    let a = axis(n.int("axis", 0)?, shape.len())?;
    let outs = n.node.output.len();
    let sizes: Vec<usize> = match if ctx.opset >= 13 {
        n.opt_input(1)
            .map(|v| const_ints(&v, "the split sizes"))
            .transpose()?
    } else {
        n.ints("split")
    } {
        Some(s) => s
            .into_iter()
            .map(|v| usize::try_from(v).map_err(|_| "negative split size".to_string()))
            .collect::<Res<_>>()?,
        None => {
            let parts = if ctx.opset >= 18 {
                let k = n.int("num_outputs", outs as i64)?;
                // The node's outputs bound the parts: never allocate for a count the file
                // merely claims.
                if k < 1 || k as usize != outs {
                    return Err(format!(
                        "num_outputs = {k}, but the node has {outs} outputs"
                    ));
                }
                outs
            } else {
                outs
            };
            if parts == 0 {
                return Err("split into 0 parts".into());
            }
            let chunk = shape[a].div_ceil(parts);
            (0..parts)
                .map(|i| chunk.min(shape[a].saturating_sub(i * chunk)))
                .collect()
        }
    };
    let total = sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b));
    if total != Some(shape[a]) || sizes.len() != outs {
        return Err(format!(
            "split sizes {sizes:?} do not cover dim {a} of size {} in {outs} outputs",
            shape[a]
        ));
    }
    let mut res = Vec::with_capacity(outs);
    let mut at = 0;
    for size in sizes {
        let mut s = vec![0; shape.len()];
        let mut e = shape.clone();
        s[a] = at;
        e[a] = at + size;
        at += size;
        res.push(ctx.emit(
            Op::Slice {
                starts: s,
                ends: e,
                steps: vec![1; shape.len()],
            },
            std::slice::from_ref(&x),
            n.name(),
        )?);
    }
    Ok(res)
}

fn constant(n: &N) -> Res<Tensor> {
    let a = n
        .node
        .attribute
        .first()
        .ok_or("a Constant needs a value attribute")?;
    match a.name() {
        "value" => load::tensor(
            a.t.as_ref().ok_or("`value` holds no tensor")?,
            &mut load::ExternalData::none(),
        ),
        "value_float" => Ok(Tensor::from_f32(DType::F32, vec![], &[a.f()])),
        "value_floats" => Ok(Tensor::from_f32(
            DType::F32,
            vec![a.floats.len()],
            &a.floats,
        )),
        "value_int" => Ok(Tensor::from_i64(DType::I64, vec![], &[a.i()])),
        "value_ints" => Ok(Tensor::from_i64(DType::I64, vec![a.ints.len()], &a.ints)),
        other => Err(format!("Constant attribute `{other}` is not supported")),
    }
}

/// Largest `Range` memc folds (positions of a 16M-token sequence).
const RANGE_MAX: usize = 1 << 24;

fn range(n: &N) -> Res<Vec<Val>> {
    let scalar = |i: usize, what: &str| -> Res<Tensor> {
        match n.input(i)? {
            Val::Const(t) if t.numel() == 1 => Ok(t),
            Val::Const(_) => Err(format!("{what} must be a scalar")),
            Val::Ir(_) => Err(format!(
                "{what} must be known at compile time (bind dynamic inputs with --shape)"
            )),
        }
    };
    let (start, limit, delta) = (
        scalar(0, "start")?,
        scalar(1, "limit")?,
        scalar(2, "delta")?,
    );
    let dtype = start.dtype();
    if dtype.is_float() {
        let (s, l, d) = (
            start.to_f32_vec()[0] as f64,
            limit.to_f32_vec()[0] as f64,
            delta.to_f32_vec()[0] as f64,
        );
        if d == 0.0 || !d.is_finite() {
            return Err("delta must be finite and non-zero".into());
        }
        let count = ((l - s) / d).ceil().clamp(0.0, 1e9) as usize;
        if count > RANGE_MAX {
            return Err(format!(
                "the range has {count} elements, more than memc folds"
            ));
        }
        let v: Vec<f32> = (0..count).map(|i| (s + i as f64 * d) as f32).collect();
        Ok(vec![Val::Const(Tensor::from_f32(dtype, vec![count], &v))])
    } else {
        let (s, l, d) = (
            start.to_i64_vec()[0],
            limit.to_i64_vec()[0],
            delta.to_i64_vec()[0],
        );
        if d == 0 {
            return Err("delta must be non-zero".into());
        }
        let count = ((l as i128 - s as i128 + d as i128 - d.signum() as i128) / d as i128)
            .clamp(0, 1 << 40) as usize;
        if count > RANGE_MAX {
            return Err(format!(
                "the range has {count} elements, more than memc folds"
            ));
        }
        let v: Vec<i64> = (0..count as i64).map(|i| s + i * d).collect();
        Ok(vec![Val::Const(Tensor::from_i64(dtype, vec![count], &v))])
    }
}

/// The longest axis a run-time CumSum runs along (its triangle is `len²` f32 values).
const CUMSUM_MAX_LEN: usize = 8192;

/// A run-time CumSum over 0/1 values (casts of a boolean mask: RoBERTa's position ids count
/// the non-padding tokens): `cumsum(x) = x·U` along the axis, U the (strict, for `exclusive`;
/// lower, for `reverse`) upper triangle of ones, computed in f32, which is exact for these
/// counts (at most [`CUMSUM_MAX_LEN`]), then cast back to x's dtype.
fn cumsum_of_mask(
    ctx: &mut Ctx,
    x: ValueId,
    a: usize,
    exclusive: bool,
    reverse: bool,
    name: &str,
) -> Res<Val> {
    let ty = ctx.g.value(x).ty.clone();
    // 0/1 values: a boolean, through any chain of casts.
    let mut src = x;
    while ctx.g.value(src).ty.dtype != DType::Bool {
        match ctx.g.producer(src).map(|p| ctx.g.node(p)) {
            Some(node) if matches!(node.op, Op::Cast { .. }) => src = node.inputs[0],
            _ => break,
        }
    }
    let zero_one = ctx.g.value(src).ty.dtype == DType::Bool;
    if !zero_one {
        return Err(
            "CumSum's operand depends on run-time data; memc folds this op only on \
                    compile-time constants, or computes it at run time over a cast of a boolean \
                    mask (position ids from a padding mask)"
                .into(),
        );
    }
    let len = ty.shape[a];
    if len > CUMSUM_MAX_LEN {
        let gb = (len as f64).powi(2) * 4.0 / 1e9;
        return Err(format!(
            "a run-time CumSum along an axis of {len}: memc computes it as a product with a {len}×{len} triangle ({gb:.0} GB), so it takes at most {CUMSUM_MAX_LEN}; bind a shorter sequence with --shape"
        ));
    }
    let rank = ty.shape.len();
    let mut v = ctx.emit(Op::Cast { to: DType::F32 }, &[Val::Ir(x)], name)?;
    // Move the axis last, multiply by the triangle, move it back.
    let perm: Vec<usize> = (0..rank).filter(|&d| d != a).chain([a]).collect();
    let moved = a + 1 != rank;
    if moved {
        v = ctx.emit(Op::Transpose { perm: perm.clone() }, &[v], name)?;
    }
    let tri: Vec<f32> = (0..len * len)
        .map(|e| {
            let (i, j) = (e / len, e % len);
            let keep = match (reverse, exclusive) {
                (false, false) => i <= j,
                (false, true) => i < j,
                (true, false) => i >= j,
                (true, true) => i > j,
            };
            keep as u8 as f32
        })
        .collect();
    let u = Val::Const(Tensor::from_f32(DType::F32, vec![len, len], &tri));
    v = ctx.emit(Op::MatMul, &[v, u], name)?;
    if moved {
        let mut back = vec![0; rank];
        for (k, &p) in perm.iter().enumerate() {
            back[p] = k;
        }
        v = ctx.emit(Op::Transpose { perm: back }, &[v], name)?;
    }
    if ty.dtype != DType::F32 {
        v = ctx.emit(Op::Cast { to: ty.dtype }, &[v], name)?;
    }
    Ok(v)
}

/// ONNX CumSum on a constant.
fn cumsum(x: &Tensor, axis: usize, exclusive: bool, reverse: bool) -> Tensor {
    let shape = x.shape();
    let (len, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
    let outer = x.numel() / (len * inner).max(1);
    let run = |v: &mut [f64]| {
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| o * len * inner + k * inner + i;
                let order: Vec<usize> = if reverse {
                    (0..len).rev().collect()
                } else {
                    (0..len).collect()
                };
                let mut acc = 0.0;
                let src: Vec<f64> = (0..len).map(|k| v[at(k)]).collect();
                for k in order {
                    if exclusive {
                        v[at(k)] = acc;
                        acc += src[k];
                    } else {
                        acc += src[k];
                        v[at(k)] = acc;
                    }
                }
            }
        }
    };
    if x.dtype().is_float() {
        let mut v: Vec<f64> = x.to_f32_vec().into_iter().map(f64::from).collect();
        run(&mut v);
        Tensor::from_f32(
            x.dtype(),
            shape.to_vec(),
            &v.iter().map(|&a| a as f32).collect::<Vec<_>>(),
        )
    } else {
        // Integers are summed exactly in i64 (values of exporter masks are small).
        let mut v: Vec<f64> = x.to_i64_vec().into_iter().map(|a| a as f64).collect();
        run(&mut v);
        Tensor::from_i64(
            x.dtype(),
            shape.to_vec(),
            &v.iter().map(|&a| a as i64).collect::<Vec<_>>(),
        )
    }
}

/// ONNX Gelu (opset 20): `approximate = "none"` is memc's `gelu`, `"tanh"` its `gelu_tanh`.
/// Dropout in inference mode is the identity. Active dropout (a constant true
/// `training_mode` with a non-zero ratio) is refused: memc trains with dropout off.
fn dropout(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let x = n.input(0)?;
    let ratio = match n.inputs.get(1).cloned().flatten() {
        Some(Val::Const(t)) => t.to_f64_vec().first().copied().unwrap_or(0.0),
        Some(Val::Ir(_)) => return Err("the dropout ratio must be a constant".into()),
        None => 0.5,
    };
    let training = match n.inputs.get(2).cloned().flatten() {
        Some(Val::Const(t)) => t.to_i64_vec().first().copied().unwrap_or(0) != 0,
        Some(Val::Ir(_)) => {
            return Err("training_mode must be a constant; export the model in eval mode".into())
        }
        None => false,
    };
    if training && ratio != 0.0 {
        return Err(format!(
            "active dropout (ratio {ratio}, training_mode true) is not supported: memc trains \
             with dropout off; export the model in eval mode (model.eval()) or set its dropout \
             probabilities to 0"
        ));
    }
    if n.node.output.len() > 1 && !n.node.output[1].is_empty() {
        let shape = ctx.ty(&x).shape.clone();
        let ones = vec![1i64; shape.iter().product()];
        let mask = Tensor::from_i64(DType::Bool, shape, &ones);
        return Ok(vec![x, Val::Const(mask)]);
    }
    Ok(vec![x])
}

fn gelu(ctx: &mut Ctx, n: &N) -> Res<Vec<Val>> {
    let name = n.name().to_string();
    let x = n.input(0)?;
    let approximate = n
        .attr("approximate")
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned());
    let u = match approximate.as_deref().unwrap_or("none") {
        "none" => UnaryOp::Gelu,
        "tanh" => UnaryOp::GeluTanh,
        other => {
            return Err(format!(
                "approximate = \"{other}\" is not a Gelu mode (none, tanh)"
            ))
        }
    };
    Ok(vec![ctx.emit(Op::Unary(u), &[x], &name)?])
}
