//! Kernels for single non-elementwise nodes, as MLIR: reductions, softmax and log-softmax, layer
//! norm, layout ops (transpose, slice, concat, reshape), gathers and their scatter transposes,
//! and trilu. Each is one function over static memrefs (operands, then the result), with
//! `scf.parallel` over independent result elements and `scf.for` where a value accumulates.
//! Floating-point math runs in f32 (f64 for f64 tensors); bf16 is widened on load and rounded
//! on store. Index operands are clamped into range, so a bad index cannot touch memory outside
//! a buffer; a gather's kernel also reports an index outside its range (as the interpreter
//! refuses it) through a last argument of four `i64`s ([`INDEX_FLAG`]) that the runtime reads
//! after the step, so an index computed in the graph cannot give a silently wrong result.
//!
//! The kernels are split by op family, one file each, with the same families as shape inference
//! and the interpreter (`memc_ir`) and the VJPs (`memc_passes::autodiff`): `layout`, `gather`,
//! `reduce` and `nn`; `linalg` and `elementwise` have no kernels here (`matmul` runs on the GEMM
//! library; elementwise ops and `expand` in the fused kernels of [`crate::kernel`]; block ops are
//! lowered to their steps before code generation). A new op of family F gets its kernel in
//! `ops/F.rs`.

use std::fmt::Write;

use memc_ir::{DType, Graph, Node, NodeId, Op};

use crate::kernel::{storage, KernelError};

mod elementwise;
mod gather;
mod layout;
mod linalg;
mod nn;
pub(crate) mod reduce;

/// Arithmetic type: f32 for half types, else the storage type.
fn arith(d: DType) -> &'static str {
    match d {
        DType::F16 | DType::BF16 => "f32",
        other => storage(other),
    }
}

fn memref(shape: &[usize], d: DType) -> String {
    let dims: String = shape.iter().map(|n| format!("{n}x")).collect();
    format!("memref<{dims}{}>", storage(d))
}

/// A function body under construction.
struct F {
    text: String,
    next: usize,
    indent: usize,
    /// The argument of the index flag ([`INDEX_FLAG`]), in a gather's kernel.
    flag: Option<usize>,
}

/// The index flag a gather's kernel takes after its buffers: `[hit, index, axis, size]`, the
/// first out-of-range index it met (any one of them when several threads meet one), `hit` 1.
pub const INDEX_FLAG: &str = "memref<4xi64>";

/// Whether `op`'s kernel takes the index flag: the gathers (their scatter transposes run on
/// indices the forward pass checked).
pub fn takes_index_flag(op: &Op) -> bool {
    matches!(
        op,
        Op::Gather { .. } | Op::GatherElements { .. } | Op::GatherNd
    )
}

/// The arguments of node `n`'s kernel ([`op_mlir`]): its operands, its results, and the index
/// flag of a gather.
pub fn kernel_args(g: &Graph, n: NodeId) -> usize {
    let node = g.node(n);
    node.inputs.len() + node.outputs.len() + usize::from(takes_index_flag(&node.op))
}

impl F {
    fn line(&mut self, s: &str) {
        let _ = writeln!(self.text, "{}{s}", "  ".repeat(self.indent));
    }

    fn v(&mut self, rhs: &str) -> String {
        self.next += 1;
        let name = format!("%v{}", self.next);
        self.line(&format!("{name} = {rhs}"));
        name
    }

    fn index(&mut self, n: usize) -> String {
        self.v(&format!("arith.constant {n} : index"))
    }

    /// `scf.parallel` over `dims`, returning the induction variables; close with [`F::end_parallel`].
    fn parallel(&mut self, dims: &[usize]) -> Vec<String> {
        if dims.is_empty() {
            self.line("scf.execute_region {");
            self.indent += 1;
            return vec![];
        }
        let ub: Vec<String> = dims.iter().map(|&d| self.index(d)).collect();
        self.next += 1;
        let base = self.next;
        let ivs: Vec<String> = (0..dims.len()).map(|k| format!("%p{base}_{k}")).collect();
        let zeros = vec!["%c0"; dims.len()].join(", ");
        let ones = vec!["%c1"; dims.len()].join(", ");
        self.line(&format!(
            "scf.parallel ({}) = ({zeros}) to ({}) step ({ones}) {{",
            ivs.join(", "),
            ub.join(", ")
        ));
        self.indent += 1;
        ivs
    }

    fn end_parallel(&mut self, rank: usize) {
        self.line(if rank == 0 { "scf.yield" } else { "scf.reduce" });
        self.indent -= 1;
        self.line("}");
    }

    /// Sequential loops over `dims` carrying one accumulator of type `ty`; `body` gets the
    /// induction variables and the accumulator and returns the new accumulator.
    fn fold(
        &mut self,
        dims: &[usize],
        init: &str,
        ty: &str,
        body: &mut dyn FnMut(&mut F, &[String], &str) -> String,
    ) -> String {
        fn go(
            f: &mut F,
            dims: &[usize],
            ivs: &mut Vec<String>,
            acc: &str,
            ty: &str,
            body: &mut dyn FnMut(&mut F, &[String], &str) -> String,
        ) -> String {
            if dims.is_empty() {
                return body(f, ivs, acc);
            }
            let ub = f.index(dims[0]);
            f.next += 1;
            let (iv, a) = (format!("%r{}", f.next), format!("%acc{}", f.next));
            let out = format!("%fold{}", f.next);
            f.line(&format!(
                "{out} = scf.for {iv} = %c0 to {ub} step %c1 iter_args({a} = {acc}) -> ({ty}) {{"
            ));
            f.indent += 1;
            ivs.push(iv);
            let r = go(f, &dims[1..], ivs, &a, ty, body);
            ivs.pop();
            f.line(&format!("scf.yield {r} : {ty}"));
            f.indent -= 1;
            f.line("}");
            out
        }
        go(self, dims, &mut Vec::new(), init, ty, body)
    }

    /// Sequential loops over `dims` without a carried value.
    fn each(&mut self, dims: &[usize], body: &mut dyn FnMut(&mut F, &[String])) {
        let mut ivs = Vec::new();
        for &d in dims {
            let ub = self.index(d);
            self.next += 1;
            let iv = format!("%s{}", self.next);
            self.line(&format!("scf.for {iv} = %c0 to {ub} step %c1 {{"));
            self.indent += 1;
            ivs.push(iv);
        }
        body(self, &ivs);
        for _ in dims {
            self.indent -= 1;
            self.line("}");
        }
    }

    /// Loads `arg[idx]` widened to its arithmetic type.
    fn load(&mut self, arg: usize, idx: &[String], shape: &[usize], d: DType) -> String {
        let x = self.v(&format!(
            "memref.load %a{arg}[{}] : {}",
            idx.join(", "),
            memref(shape, d)
        ));
        match d {
            DType::F16 | DType::BF16 => self.v(&format!("arith.extf {x} : {} to f32", storage(d))),
            _ => x,
        }
    }

    /// Stores `x` (arithmetic type) into `arg[idx]`, rounding half types.
    fn store(&mut self, x: &str, arg: usize, idx: &[String], shape: &[usize], d: DType) {
        let x = match d {
            DType::F16 | DType::BF16 => {
                self.v(&format!("arith.truncf {x} : f32 to {}", storage(d)))
            }
            _ => x.to_string(),
        };
        self.line(&format!(
            "memref.store {x}, %a{arg}[{}] : {}",
            idx.join(", "),
            memref(shape, d)
        ));
    }

    /// An index operand read from `arg[idx]`, made non-negative and clamped into `0..dim` (dim
    /// `axis` of the indexed operand); with the index flag, one outside `-dim..dim` is also
    /// reported there.
    fn index_operand(
        &mut self,
        arg: usize,
        idx: &[String],
        shape: &[usize],
        d: DType,
        (axis, dim): (usize, usize),
    ) -> String {
        let raw = self.v(&format!(
            "memref.load %a{arg}[{}] : {}",
            idx.join(", "),
            memref(shape, d)
        ));
        let ty = storage(d);
        if let Some(flag) = self.flag {
            let lo = self.v(&format!("arith.constant -{dim} : {ty}"));
            let hi = self.v(&format!("arith.constant {dim} : {ty}"));
            let below = self.v(&format!("arith.cmpi slt, {raw}, {lo} : {ty}"));
            let above = self.v(&format!("arith.cmpi sge, {raw}, {hi} : {ty}"));
            let bad = self.v(&format!("arith.ori {below}, {above} : i1"));
            self.line(&format!("scf.if {bad} {{"));
            self.indent += 1;
            let wide = if ty == "i64" {
                raw.clone()
            } else {
                self.v(&format!("arith.extsi {raw} : {ty} to i64"))
            };
            let one = self.v("arith.constant 1 : i64");
            let ax = self.v(&format!("arith.constant {axis} : i64"));
            let size = self.v(&format!("arith.constant {dim} : i64"));
            for (k, v) in [one, wide, ax, size].iter().enumerate() {
                let at = self.index(k);
                self.line(&format!("memref.store {v}, %a{flag}[{at}] : {INDEX_FLAG}"));
            }
            self.indent -= 1;
            self.line("}");
        }
        let zero = self.v(&format!("arith.constant 0 : {ty}"));
        let n = self.v(&format!("arith.constant {dim} : {ty}"));
        let last = self.v(&format!("arith.constant {} : {ty}", dim.saturating_sub(1)));
        let neg = self.v(&format!("arith.cmpi slt, {raw}, {zero} : {ty}"));
        let wrapped = self.v(&format!("arith.addi {raw}, {n} : {ty}"));
        let i = self.v(&format!("arith.select {neg}, {wrapped}, {raw} : {ty}"));
        let lo = self.v(&format!("arith.maxsi {i}, {zero} : {ty}"));
        let c = self.v(&format!("arith.minsi {lo}, {last} : {ty}"));
        self.v(&format!("arith.index_cast {c} : {ty} to index"))
    }

    /// `to = from`, element for element (no conversion): (argument, index, shape, dtype) each.
    fn copy(
        &mut self,
        from: (usize, &[String], &[usize], DType),
        to: (usize, &[String], &[usize], DType),
    ) {
        let x = self.v(&format!(
            "memref.load %a{}[{}] : {}",
            from.0,
            from.1.join(", "),
            memref(from.2, from.3)
        ));
        self.line(&format!(
            "memref.store {x}, %a{}[{}] : {}",
            to.0,
            to.1.join(", "),
            memref(to.2, to.3)
        ));
    }

    fn fconst(&mut self, v: f64, ty: &str) -> String {
        if v.is_finite() {
            return self.v(&format!("arith.constant {v:.17e} : {ty}"));
        }
        // Non-finite values are written as their bit patterns.
        let bits = match ty {
            "f64" => format!("0x{:016X}", v.to_bits()),
            _ => format!("0x{:08X}", (v as f32).to_bits()),
        };
        self.v(&format!("arith.constant {bits} : {ty}"))
    }
}

/// What a family's kernel generator reads: the node and the kernel's name (for errors), the
/// operands' and the result's types (`tys`, the result last, at argument `out`), the first
/// operand's and the result's shape and dtype, and the first operand's arithmetic type.
#[derive(Clone)]
struct Cx<'a> {
    node: &'a Node,
    name: &'a str,
    tys: Vec<(Vec<usize>, DType)>,
    out: usize,
    oshape: Vec<usize>,
    odt: DType,
    xshape: Vec<usize>,
    xdt: DType,
    at: &'static str,
}

impl Cx<'_> {
    /// The error for a node that has no kernel of its own here.
    fn unsupported(&self, msg: String) -> KernelError {
        KernelError::Unsupported {
            kernel: self.name.to_string(),
            msg,
        }
    }
}

/// The MLIR of the kernel for one non-elementwise node, named `name`. Its arguments are the
/// node's operands, then its result.
pub fn op_mlir(g: &Graph, n: NodeId, name: &str) -> Result<String, KernelError> {
    let node = g.node(n);
    let unsupported = |msg: String| KernelError::Unsupported {
        kernel: name.to_string(),
        msg,
    };
    let tys: Vec<(Vec<usize>, DType)> = node
        .inputs
        .iter()
        .chain(&node.outputs)
        .map(|&v| (g.value(v).ty.shape.clone(), g.value(v).ty.dtype))
        .collect();
    if tys.iter().any(|(_, d)| *d == DType::F16) {
        return Err(unsupported(
            "f16 values are not supported by host kernels yet (use bf16 or f32)".into(),
        ));
    }
    let out = node.inputs.len();
    let (oshape, odt) = tys[out].clone();
    let (xshape, xdt) = tys[0].clone();
    let mut params: Vec<String> = tys
        .iter()
        .enumerate()
        .map(|(i, (s, d))| format!("%a{i}: {}", memref(s, *d)))
        .collect();
    let flag = takes_index_flag(&node.op).then_some(tys.len());
    if let Some(a) = flag {
        params.push(format!("%a{a}: {INDEX_FLAG}"));
    }
    let mut f = F {
        text: String::new(),
        next: 0,
        indent: 1,
        flag,
    };
    f.line("%c0 = arith.constant 0 : index");
    f.line("%c1 = arith.constant 1 : index");
    let at = arith(xdt);
    let cx = Cx {
        node,
        name,
        tys,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
    };
    match &node.op {
        Op::Reduce { .. } | Op::TopK { .. } => reduce::emit(&mut f, &cx)?,
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::Attention { .. }
        | Op::AttentionLse { .. }
        | Op::AttentionGrad { .. } => nn::emit(&mut f, &cx)?,
        Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::SliceScatter { .. }
        | Op::Concat { .. }
        | Op::Reshape { .. }
        | Op::Trilu { .. } => layout::emit(&mut f, &cx)?,
        Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::GatherNd
        | Op::ScatterAdd { .. }
        | Op::ScatterElementsAdd { .. }
        | Op::ScatterNdAdd { .. } => gather::emit(&mut f, &cx)?,
        Op::MatMul => linalg::emit(&mut f, &cx)?,
        // `expand` is a broadcast, which the fused elementwise kernels do, and block ops are
        // lowered to their steps before code generation: like the elementwise ops, they have
        // no kernel here.
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Where
        | Op::Cast { .. }
        | Op::Expand { .. }
        | Op::SwigluFfn
        | Op::GeluFfn { .. }
        | Op::MocFfn { .. }
        | Op::Rope
        | Op::Residual
        | Op::RevCouple
        | Op::LmHeadCe { .. } => elementwise::emit(&mut f, &cx)?,
    }
    Ok(format!(
        "func.func @{name}({}) {{\n{}  return\n}}\n",
        params.join(", "),
        f.text
    ))
}

/// `out[...] = 0` over the whole result.
fn zero_fill(f: &mut F, out: usize, shape: &[usize], d: DType) {
    let ivs = f.parallel(shape);
    let z = if d.is_float() {
        f.fconst(0.0, storage(d))
    } else {
        f.v(&format!("arith.constant 0 : {}", storage(d)))
    };
    f.line(&format!(
        "memref.store {z}, %a{out}[{}] : {}",
        ivs.join(", "),
        memref(shape, d)
    ));
    f.end_parallel(shape.len());
}
