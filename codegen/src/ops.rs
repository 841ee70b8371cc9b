//! Kernels for single non-elementwise nodes, as MLIR: reductions, softmax and log-softmax, layer
//! norm, layout ops (transpose, slice, concat, reshape), gathers and their scatter transposes,
//! and trilu. Each is one function over static memrefs (operands, then the result), with
//! `scf.parallel` over independent result elements and `scf.for` where a value accumulates.
//! Floating-point math runs in f32 (f64 for f64 tensors); bf16 is widened on load and rounded
//! on store. Index operands are clamped into range, so a bad index cannot touch memory outside
//! a buffer (the runtime validates user-supplied indices before a step).

use std::fmt::Write;

use memc_ir::{DType, Graph, NodeId, Op, ReduceKind};

use crate::kernel::{storage, KernelError};

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

    /// An index operand read from `arg[idx]`, made non-negative and clamped into `0..dim`.
    fn index_operand(
        &mut self,
        arg: usize,
        idx: &[String],
        shape: &[usize],
        d: DType,
        dim: usize,
    ) -> String {
        let raw = self.v(&format!(
            "memref.load %a{arg}[{}] : {}",
            idx.join(", "),
            memref(shape, d)
        ));
        let ty = storage(d);
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
    let params: Vec<String> = tys
        .iter()
        .enumerate()
        .map(|(i, (s, d))| format!("%a{i}: {}", memref(s, *d)))
        .collect();
    let mut f = F {
        text: String::new(),
        next: 0,
        indent: 1,
    };
    f.line("%c0 = arith.constant 0 : index");
    f.line("%c1 = arith.constant 1 : index");
    let at = arith(xdt);
    match &node.op {
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => {
            let kept: Vec<usize> = (0..xshape.len()).filter(|d| !axes.contains(d)).collect();
            let red: Vec<usize> = axes.iter().map(|&a| xshape[a]).collect();
            let pdims: Vec<usize> = kept.iter().map(|&d| xshape[d]).collect();
            let ivs = f.parallel(&pdims);
            let float = xdt.is_float();
            let init = match (kind, float) {
                (ReduceKind::Max, true) => f.fconst(f64::NEG_INFINITY, at),
                (ReduceKind::Max, false) => f.v(&format!("arith.constant {} : {at}", i64::MIN)),
                (_, true) => f.fconst(0.0, at),
                (_, false) => f.v(&format!("arith.constant 0 : {at}")),
            };
            let acc = f.fold(&red, &init, at, &mut |f, rivs, acc| {
                let mut idx = Vec::with_capacity(xshape.len());
                let (mut kp, mut kr) = (0, 0);
                for d in 0..xshape.len() {
                    if axes.contains(&d) {
                        idx.push(rivs[kr].clone());
                        kr += 1;
                    } else {
                        idx.push(ivs[kp].clone());
                        kp += 1;
                    }
                }
                let x = f.load(0, &idx, &xshape, xdt);
                let op = match (kind, float) {
                    (ReduceKind::Max, true) => "arith.maximumf",
                    (ReduceKind::Max, false) => "arith.maxsi",
                    (_, true) => "arith.addf",
                    (_, false) => "arith.addi",
                };
                f.v(&format!("{op} {acc}, {x} : {at}"))
            });
            let result = if *kind == ReduceKind::Mean {
                let count: usize = red.iter().product();
                let c = f.fconst(count as f64, at);
                f.v(&format!("arith.divf {acc}, {c} : {at}"))
            } else {
                acc
            };
            let mut oidx = Vec::new();
            let mut kp = 0;
            for d in 0..xshape.len() {
                if axes.contains(&d) {
                    if *keep_dims {
                        oidx.push("%c0".to_string());
                    }
                } else {
                    oidx.push(ivs[kp].clone());
                    kp += 1;
                }
            }
            f.store(&result, out, &oidx, &oshape, odt);
            f.end_parallel(pdims.len());
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let log = matches!(node.op, Op::LogSoftmax { .. });
            let pdims: Vec<usize> = (0..xshape.len())
                .filter(|d| d != axis)
                .map(|d| xshape[d])
                .collect();
            let ivs = f.parallel(&pdims);
            let full = |ivs: &[String], k: &str| -> Vec<String> {
                let mut idx = ivs.to_vec();
                idx.insert(*axis, k.to_string());
                idx
            };
            let ninf = f.fconst(f64::NEG_INFINITY, at);
            let len = [xshape[*axis]];
            let m = f.fold(&len, &ninf, at, &mut |f, r, acc| {
                let x = f.load(0, &full(&ivs, &r[0]), &xshape, xdt);
                f.v(&format!("arith.maximumf {acc}, {x} : {at}"))
            });
            let zero = f.fconst(0.0, at);
            let sum = f.fold(&len, &zero, at, &mut |f, r, acc| {
                let x = f.load(0, &full(&ivs, &r[0]), &xshape, xdt);
                let d = f.v(&format!("arith.subf {x}, {m} : {at}"));
                let e = f.v(&format!("math.exp {d} : {at}"));
                f.v(&format!("arith.addf {acc}, {e} : {at}"))
            });
            let logsum = if log {
                Some(f.v(&format!("math.log {sum} : {at}")))
            } else {
                None
            };
            f.each(&len, &mut |f, r| {
                let idx = full(&ivs, &r[0]);
                let x = f.load(0, &idx, &xshape, xdt);
                let d = f.v(&format!("arith.subf {x}, {m} : {at}"));
                let y = match &logsum {
                    Some(ls) => f.v(&format!("arith.subf {d}, {ls} : {at}")),
                    None => {
                        let e = f.v(&format!("math.exp {d} : {at}"));
                        f.v(&format!("arith.divf {e}, {sum} : {at}"))
                    }
                };
                f.store(&y, out, &idx, &oshape, odt);
            });
            f.end_parallel(pdims.len());
        }
        Op::TopK { k } => {
            // Each element's rank in its row, rank(c) = #{c' : x[c'] > x[c] or (x[c'] = x[c]
            // and c' < c)}; element c is written at out[rank(c)] when rank(c) < k (ranks are
            // distinct, so no two iterations write one place). No sort: every element of
            // every row is an independent parallel iteration (on a GPU, a thread per element,
            // a row spread over the threads of a block), n compares each.
            let n = *xshape.last().unwrap_or(&1);
            let ivs = f.parallel(&xshape);
            let (row, c) = ivs.split_at(ivs.len() - 1);
            let full = |row: &[String], c: &str| -> Vec<String> {
                let mut v = row.to_vec();
                v.push(c.to_string());
                v
            };
            let kk = f.index(*k);
            let xc = f.load(0, &ivs, &xshape, xdt);
            let rank = f.fold(&[n], "%c0", "index", &mut |f, o, acc| {
                let xo = f.load(0, &full(row, &o[0]), &xshape, xdt);
                let gt = f.v(&format!("arith.cmpf ogt, {xo}, {xc} : {at}"));
                let eq = f.v(&format!("arith.cmpf oeq, {xo}, {xc} : {at}"));
                let lower = f.v(&format!("arith.cmpi ult, {}, {} : index", o[0], c[0]));
                let tie = f.v(&format!("arith.andi {eq}, {lower} : i1"));
                let before = f.v(&format!("arith.ori {gt}, {tie} : i1"));
                let inc = f.v(&format!("arith.select {before}, %c1, %c0 : index"));
                f.v(&format!("arith.addi {acc}, {inc} : index"))
            });
            let keep = f.v(&format!("arith.cmpi ult, {rank}, {kk} : index"));
            f.line(&format!("scf.if {keep} {{"));
            f.indent += 1;
            let ci = f.v(&format!(
                "arith.index_cast {} : index to {}",
                c[0],
                storage(odt)
            ));
            f.store(&ci, out, &full(row, &rank), &oshape, odt);
            f.indent -= 1;
            f.line("}");
            f.end_parallel(xshape.len());
        }
        Op::LayerNorm { axis, epsilon } => {
            let outer: Vec<usize> = xshape[..*axis].to_vec();
            let inner: Vec<usize> = xshape[*axis..].to_vec();
            let count: usize = inner.iter().product();
            let ivs = f.parallel(&outer);
            let cat = |a: &[String], b: &[String]| -> Vec<String> {
                a.iter().chain(b).cloned().collect()
            };
            let zero = f.fconst(0.0, at);
            let sum = f.fold(&inner, &zero, at, &mut |f, r, acc| {
                let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
                f.v(&format!("arith.addf {acc}, {x} : {at}"))
            });
            let cnt = f.fconst(count as f64, at);
            let mean = f.v(&format!("arith.divf {sum}, {cnt} : {at}"));
            let sq = f.fold(&inner, &zero, at, &mut |f, r, acc| {
                let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
                let d = f.v(&format!("arith.subf {x}, {mean} : {at}"));
                let d2 = f.v(&format!("arith.mulf {d}, {d} : {at}"));
                f.v(&format!("arith.addf {acc}, {d2} : {at}"))
            });
            let var = f.v(&format!("arith.divf {sq}, {cnt} : {at}"));
            let eps = f.fconst(*epsilon as f64, at);
            let ve = f.v(&format!("arith.addf {var}, {eps} : {at}"));
            let sd = f.v(&format!("math.sqrt {ve} : {at}"));
            let one = f.fconst(1.0, at);
            let rstd = f.v(&format!("arith.divf {one}, {sd} : {at}"));
            let has_bias = node.inputs.len() == 3;
            f.each(&inner, &mut |f, r| {
                let idx = cat(&ivs, r);
                let x = f.load(0, &idx, &xshape, xdt);
                let d = f.v(&format!("arith.subf {x}, {mean} : {at}"));
                let xh = f.v(&format!("arith.mulf {d}, {rstd} : {at}"));
                let s = f.load(1, r, &inner, xdt);
                let mut y = f.v(&format!("arith.mulf {xh}, {s} : {at}"));
                if has_bias {
                    let b = f.load(2, r, &inner, xdt);
                    y = f.v(&format!("arith.addf {y}, {b} : {at}"));
                }
                f.store(&y, out, &idx, &oshape, odt);
            });
            f.end_parallel(outer.len());
        }
        Op::Attention { scale } => {
            // One row of queries per parallel iteration, one pass over the keys (the online
            // softmax), then a division by the row sum. Nothing of size S×T is stored.
            let (kshape, _) = tys[1].clone();
            let (vshape, _) = tys[2].clone();
            let (mshape, mdt) = tys[3].clone();
            let (h, hk, t, dv) = (xshape[1], kshape[1], kshape[2], vshape[3]);
            let ivs = f.parallel(&xshape[..3]);
            let grp = f.index(h / hk);
            let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
            let scale_c = f.fconst(*scale as f64, at);
            let sh = ScoreShapes {
                q: &xshape,
                k: &kshape,
                mask: &mshape,
                mask_arg: 3,
                dt: xdt,
                mask_dt: mdt,
                at,
            };
            let score = |f: &mut F, j: &str| -> String {
                attention_score(f, &sh, &scale_c, [&ivs[0], &ivs[1], &ivs[2]], &kh, j)
            };
            // One pass with the online softmax: a running max m and sum l; when a score
            // raises the max, the row accumulated so far is rescaled by exp(m_old - m_new).
            let ninf = f.fconst(f64::NEG_INFINITY, at);
            let zero = f.fconst(0.0, at);
            let orow = |c: &str| {
                vec![
                    ivs[0].clone(),
                    ivs[1].clone(),
                    ivs[2].clone(),
                    c.to_string(),
                ]
            };
            f.each(&[dv], &mut |f, c| {
                let z = f.fconst(0.0, at);
                f.store(&z, out, &orow(&c[0]), &oshape, odt);
            });
            let ub = f.index(t);
            f.next += 1;
            let n = f.next;
            let (j, m, l) = (format!("%r{n}"), format!("%m{n}"), format!("%l{n}"));
            let res = format!("%online{n}");
            f.line(&format!(
                "{res}:2 = scf.for {j} = %c0 to {ub} step %c1 iter_args({m} = {ninf}, {l} = {zero}) -> ({at}, {at}) {{"
            ));
            f.indent += 1;
            let sc = score(&mut f, &j);
            let m_new = f.v(&format!("arith.maximumf {m}, {sc} : {at}"));
            // While every score so far is -inf the row stays empty (p = 0, no rescale).
            let dead = f.v(&format!("arith.cmpf oeq, {m_new}, {ninf} : {at}"));
            let dm = f.v(&format!("arith.subf {m}, {m_new} : {at}"));
            let ec = f.v(&format!("math.exp {dm} : {at}"));
            let one = f.fconst(1.0, at);
            let corr = f.v(&format!("arith.select {dead}, {one}, {ec} : {at}"));
            let ds = f.v(&format!("arith.subf {sc}, {m_new} : {at}"));
            let ep = f.v(&format!("math.exp {ds} : {at}"));
            let z = f.fconst(0.0, at);
            let p = f.v(&format!("arith.select {dead}, {z}, {ep} : {at}"));
            f.each(&[dv], &mut |f, c| {
                let vv = f.load(
                    2,
                    &[ivs[0].clone(), kh.clone(), j.clone(), c[0].clone()],
                    &vshape,
                    xdt,
                );
                let o = f.load(out, &orow(&c[0]), &oshape, odt);
                let oc = f.v(&format!("arith.mulf {o}, {corr} : {at}"));
                let pv = f.v(&format!("arith.mulf {p}, {vv} : {at}"));
                let no = f.v(&format!("arith.addf {oc}, {pv} : {at}"));
                f.store(&no, out, &orow(&c[0]), &oshape, odt);
            });
            let lc = f.v(&format!("arith.mulf {l}, {corr} : {at}"));
            let l_new = f.v(&format!("arith.addf {lc}, {p} : {at}"));
            f.line(&format!("scf.yield {m_new}, {l_new} : {at}, {at}"));
            f.indent -= 1;
            f.line("}");
            let (max, sum) = (format!("{res}#0"), format!("{res}#1"));
            // A row of -inf scores has no distribution: zeros, as the NaN guard gives.
            let dead = f.v(&format!("arith.cmpf oeq, {max}, {ninf} : {at}"));
            let one = f.fconst(1.0, at);
            let inv = f.v(&format!("arith.divf {one}, {sum} : {at}"));
            let z = f.fconst(0.0, at);
            let inv = f.v(&format!("arith.select {dead}, {z}, {inv} : {at}"));
            f.each(&[dv], &mut |f, c| {
                let o = f.load(out, &orow(&c[0]), &oshape, odt);
                let y = f.v(&format!("arith.mulf {o}, {inv} : {at}"));
                f.store(&y, out, &orow(&c[0]), &oshape, odt);
            });
            f.end_parallel(3);
        }
        Op::AttentionLse { scale } | Op::AttentionGrad { scale, .. } => {
            let wrt = match &node.op {
                Op::AttentionGrad { wrt, .. } => Some(*wrt),
                _ => None,
            };
            let (kshape, _) = tys[1].clone();
            let mi = if wrt.is_some() { 3 } else { 2 };
            let (mshape, mdt) = tys[mi].clone();
            let (h, hk, t, d) = (xshape[1], kshape[1], kshape[2], xshape[3]);
            let group = h / hk;
            let scale_c = f.fconst(*scale as f64, at);
            let ninf = f.fconst(f64::NEG_INFINITY, at);
            let sh = ScoreShapes {
                q: &xshape,
                k: &kshape,
                mask: &mshape,
                mask_arg: mi,
                dt: xdt,
                mask_dt: mdt,
                at,
            };
            // The score of query row (b, h, i) against key j.
            let score = |f: &mut F, bq: &str, hq: &str, i: &str, kh: &str, j: &str| -> String {
                attention_score(f, &sh, &scale_c, [bq, hq, i], kh, j)
            };
            match wrt {
                None => {
                    // log Σ_j exp(s_j): the row max, then the sum of exponentials.
                    let ivs = f.parallel(&xshape[..3]);
                    let grp = f.index(group);
                    let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
                    let max = f.fold(&[t], &ninf, at, &mut |f, j, acc| {
                        let s = score(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]);
                        f.v(&format!("arith.maximumf {acc}, {s} : {at}"))
                    });
                    let dead = f.v(&format!("arith.cmpf oeq, {max}, {ninf} : {at}"));
                    let zero = f.fconst(0.0, at);
                    let sum = f.fold(&[t], &zero, at, &mut |f, j, acc| {
                        let s = score(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]);
                        let e = f.v(&format!("arith.subf {s}, {max} : {at}"));
                        let p = f.v(&format!("math.exp {e} : {at}"));
                        f.v(&format!("arith.addf {acc}, {p} : {at}"))
                    });
                    let l = f.v(&format!("math.log {sum} : {at}"));
                    let lse = f.v(&format!("arith.addf {max}, {l} : {at}"));
                    let lse = f.v(&format!("arith.select {dead}, {ninf}, {lse} : {at}"));
                    f.store(&lse, out, &ivs, &oshape, odt);
                    f.end_parallel(3);
                }
                Some(wrt) => {
                    let (vshape, _) = tys[2].clone();
                    let (rshape, _) = tys[4].clone();
                    let (yshape, _) = tys[5].clone();
                    let dv = vshape[3];
                    // p, and ds = p·(dy·v_j − delta)·scale, for row (bq, hq, i) and key j.
                    let probs = |f: &mut F,
                                 bq: &str,
                                 hq: &str,
                                 i: &str,
                                 kh: &str,
                                 j: &str|
                     -> (String, String) {
                        let row = [bq.to_string(), hq.to_string(), i.to_string()];
                        let lse = f.load(4, &row, &rshape, xdt);
                        let dead = f.v(&format!("arith.cmpf oeq, {lse}, {ninf} : {at}"));
                        let s = score(f, bq, hq, i, kh, j);
                        let e = f.v(&format!("arith.subf {s}, {lse} : {at}"));
                        let ex = f.v(&format!("math.exp {e} : {at}"));
                        let zero = f.fconst(0.0, at);
                        let p = f.v(&format!("arith.select {dead}, {zero}, {ex} : {at}"));
                        let dp = f.fold(&[dv], &zero, at, &mut |f, c, acc| {
                            let g = f.load(
                                5,
                                &[bq.into(), hq.into(), i.into(), c[0].clone()],
                                &yshape,
                                xdt,
                            );
                            let vv = f.load(
                                2,
                                &[bq.into(), kh.into(), j.into(), c[0].clone()],
                                &vshape,
                                xdt,
                            );
                            let pr = f.v(&format!("arith.mulf {g}, {vv} : {at}"));
                            f.v(&format!("arith.addf {acc}, {pr} : {at}"))
                        });
                        let delta = f.load(6, &row, &rshape, xdt);
                        let c = f.v(&format!("arith.subf {dp}, {delta} : {at}"));
                        let pc = f.v(&format!("arith.mulf {p}, {c} : {at}"));
                        let ds = f.v(&format!("arith.mulf {pc}, {scale_c} : {at}"));
                        (p, ds)
                    };
                    let zero_row = |f: &mut F, idx3: &[String], n: usize| {
                        f.each(&[n], &mut |f, c| {
                            let z = f.fconst(0.0, at);
                            let mut idx = idx3.to_vec();
                            idx.push(c[0].clone());
                            f.store(&z, out, &idx, &oshape, odt);
                        });
                    };
                    let acc_row = |f: &mut F,
                                   idx3: &[String],
                                   n: usize,
                                   w: &str,
                                   src: usize,
                                   sidx3: &[String],
                                   sshape: &[usize]| {
                        f.each(&[n], &mut |f, c| {
                            let mut idx = idx3.to_vec();
                            idx.push(c[0].clone());
                            let mut sidx = sidx3.to_vec();
                            sidx.push(c[0].clone());
                            let o = f.load(out, &idx, &oshape, odt);
                            let x = f.load(src, &sidx, sshape, xdt);
                            let wx = f.v(&format!("arith.mulf {w}, {x} : {at}"));
                            let no = f.v(&format!("arith.addf {o}, {wx} : {at}"));
                            f.store(&no, out, &idx, &oshape, odt);
                        });
                    };
                    if wrt == 0 {
                        // dq row i: Σ_j ds_ij k_j.
                        let ivs = f.parallel(&xshape[..3]);
                        let grp = f.index(group);
                        let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
                        zero_row(&mut f, &ivs, d);
                        f.each(&[t], &mut |f, j| {
                            let (_, ds) = probs(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]);
                            let kidx = [ivs[0].clone(), kh.clone(), j[0].clone()];
                            acc_row(f, &ivs, d, &ds, 1, &kidx, &kshape);
                        });
                        f.end_parallel(3);
                    } else {
                        // dk or dv row j of key/value head kh: Σ over the group's query heads
                        // and the query rows.
                        let ivs = f.parallel(&kshape[..3]);
                        let n = if wrt == 1 { d } else { dv };
                        zero_row(&mut f, &ivs, n);
                        let grp = f.index(group);
                        let base = f.v(&format!("arith.muli {}, {grp} : index", ivs[1]));
                        f.each(&[group, xshape[2]], &mut |f, gi| {
                            let hq = f.v(&format!("arith.addi {base}, {} : index", gi[0]));
                            let (p, ds) = probs(f, &ivs[0], &hq, &gi[1], &ivs[1], &ivs[2]);
                            let row = [ivs[0].clone(), hq.clone(), gi[1].clone()];
                            if wrt == 1 {
                                acc_row(f, &ivs, n, &ds, 0, &row, &xshape);
                            } else {
                                acc_row(f, &ivs, n, &p, 5, &row, &yshape);
                            }
                        });
                        f.end_parallel(3);
                    }
                }
            }
        }
        Op::RmsNorm { axis, epsilon } => {
            let outer: Vec<usize> = xshape[..*axis].to_vec();
            let inner: Vec<usize> = xshape[*axis..].to_vec();
            let count: usize = inner.iter().product();
            let ivs = f.parallel(&outer);
            let cat = |a: &[String], b: &[String]| -> Vec<String> {
                a.iter().chain(b).cloned().collect()
            };
            let zero = f.fconst(0.0, at);
            let sq = f.fold(&inner, &zero, at, &mut |f, r, acc| {
                let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
                let x2 = f.v(&format!("arith.mulf {x}, {x} : {at}"));
                f.v(&format!("arith.addf {acc}, {x2} : {at}"))
            });
            let cnt = f.fconst(count as f64, at);
            let ms = f.v(&format!("arith.divf {sq}, {cnt} : {at}"));
            let eps = f.fconst(*epsilon as f64, at);
            let me = f.v(&format!("arith.addf {ms}, {eps} : {at}"));
            let sd = f.v(&format!("math.sqrt {me} : {at}"));
            let one = f.fconst(1.0, at);
            let r = f.v(&format!("arith.divf {one}, {sd} : {at}"));
            f.each(&inner, &mut |f, ri| {
                let idx = cat(&ivs, ri);
                let x = f.load(0, &idx, &xshape, xdt);
                let xh = f.v(&format!("arith.mulf {x}, {r} : {at}"));
                let s = f.load(1, ri, &inner, xdt);
                let y = f.v(&format!("arith.mulf {xh}, {s} : {at}"));
                f.store(&y, out, &idx, &oshape, odt);
            });
            f.end_parallel(outer.len());
        }
        Op::Transpose { perm } => {
            let ivs = f.parallel(&oshape);
            let mut idx = vec![String::new(); xshape.len()];
            for (j, &p) in perm.iter().enumerate() {
                idx[p] = ivs[j].clone();
            }
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::Slice { starts, steps, .. } | Op::SliceScatter { starts, steps, .. } => {
            let scatter = matches!(node.op, Op::SliceScatter { .. });
            if scatter {
                zero_fill(&mut f, out, &oshape, odt);
            }
            // Iterate over the small side; the large side is indexed at start + i·step.
            let (small, large) = if scatter {
                (&xshape, &oshape)
            } else {
                (&oshape, &xshape)
            };
            let ivs = f.parallel(small);
            let mut big = Vec::new();
            for (d, iv) in ivs.iter().enumerate() {
                let st = f.index(steps[d]);
                let s0 = f.index(starts[d]);
                let m = f.v(&format!("arith.muli {iv}, {st} : index"));
                big.push(f.v(&format!("arith.addi {m}, {s0} : index")));
            }
            if scatter {
                let x = f.v(&format!(
                    "memref.load %a0[{}] : {}",
                    ivs.join(", "),
                    memref(&xshape, xdt)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    big.join(", "),
                    memref(large, odt)
                ));
            } else {
                let x = f.v(&format!(
                    "memref.load %a0[{}] : {}",
                    big.join(", "),
                    memref(large, xdt)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    ivs.join(", "),
                    memref(&oshape, odt)
                ));
            }
            f.end_parallel(small.len());
        }
        Op::Concat { axis } => {
            let mut offset = 0;
            for (i, (s, d)) in tys[..out].iter().enumerate() {
                let ivs = f.parallel(s);
                let mut oidx = ivs.clone();
                let o = f.index(offset);
                oidx[*axis] = f.v(&format!("arith.addi {}, {o} : index", ivs[*axis]));
                let x = f.v(&format!(
                    "memref.load %a{i}[{}] : {}",
                    ivs.join(", "),
                    memref(s, *d)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    oidx.join(", "),
                    memref(&oshape, odt)
                ));
                f.end_parallel(s.len());
                offset += s[*axis];
            }
        }
        Op::Reshape { .. } => {
            // A copy over the flat element order (the runtime aliases instead).
            let ivs = f.parallel(&oshape);
            let flat = linear(&mut f, &ivs, &oshape);
            let xi = delinear(&mut f, &flat, &xshape);
            f.copy((0, &xi, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::Gather { axis } => {
            let (ishape, idt) = tys[1].clone();
            let ivs = f.parallel(&oshape);
            let k = f.index_operand(
                1,
                &ivs[*axis..*axis + ishape.len()],
                &ishape,
                idt,
                xshape[*axis],
            );
            let mut idx: Vec<String> = ivs[..*axis].to_vec();
            idx.push(k);
            idx.extend_from_slice(&ivs[*axis + ishape.len()..]);
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::GatherElements { axis } => {
            let (ishape, idt) = tys[1].clone();
            let ivs = f.parallel(&oshape);
            let k = f.index_operand(1, &ivs, &ishape, idt, xshape[*axis]);
            let mut idx = ivs.clone();
            idx[*axis] = k;
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::GatherNd => {
            let (ishape, idt) = tys[1].clone();
            let q = *ishape.last().unwrap();
            let lead = ishape.len() - 1;
            let ivs = f.parallel(&oshape);
            let mut idx = Vec::new();
            for (k, &dim) in xshape.iter().enumerate().take(q) {
                let kk = f.index(k);
                let mut ii: Vec<String> = ivs[..lead].to_vec();
                ii.push(kk);
                idx.push(f.index_operand(1, &ii, &ishape, idt, dim));
            }
            idx.extend_from_slice(&ivs[lead..]);
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::ScatterAdd { axis, .. } | Op::ScatterElementsAdd { axis, .. } => {
            let elements = matches!(node.op, Op::ScatterElementsAdd { .. });
            let (ishape, idt) = tys[1].clone();
            zero_fill(&mut f, out, &oshape, odt);
            // Updates may land on one element only through the indexed dims: those run
            // sequentially (a deterministic order), every other dim in parallel.
            let seq: Vec<usize> = if elements {
                vec![*axis]
            } else {
                (*axis..*axis + ishape.len()).collect()
            };
            scatter_loops(&mut f, &xshape, &seq, &mut |f, ivs| {
                let idx = if elements {
                    let k = f.index_operand(1, ivs, &ishape, idt, oshape[*axis]);
                    let mut idx = ivs.to_vec();
                    idx[*axis] = k;
                    idx
                } else {
                    let k = f.index_operand(
                        1,
                        &ivs[*axis..*axis + ishape.len()],
                        &ishape,
                        idt,
                        oshape[*axis],
                    );
                    let mut idx: Vec<String> = ivs[..*axis].to_vec();
                    idx.push(k);
                    idx.extend_from_slice(&ivs[*axis + ishape.len()..]);
                    idx
                };
                accumulate(f, ivs, &idx, &xshape, xdt, out, &oshape, odt);
            });
        }
        Op::ScatterNdAdd { .. } => {
            let (ishape, idt) = tys[1].clone();
            let q = *ishape.last().unwrap();
            let lead = ishape.len() - 1;
            zero_fill(&mut f, out, &oshape, odt);
            let seq: Vec<usize> = (0..lead).collect();
            scatter_loops(&mut f, &xshape, &seq, &mut |f, ivs| {
                let mut idx = Vec::new();
                for (k, &dim) in oshape.iter().enumerate().take(q) {
                    let kk = f.index(k);
                    let mut ii: Vec<String> = ivs[..lead].to_vec();
                    ii.push(kk);
                    idx.push(f.index_operand(1, &ii, &ishape, idt, dim));
                }
                idx.extend_from_slice(&ivs[lead..]);
                accumulate(f, ivs, &idx, &xshape, xdt, out, &oshape, odt);
            });
        }
        Op::Trilu { upper, k } => {
            let ivs = f.parallel(&oshape);
            let r = oshape.len();
            let i = f.v(&format!("arith.index_cast {} : index to i64", ivs[r - 2]));
            let j = f.v(&format!("arith.index_cast {} : index to i64", ivs[r - 1]));
            let d = f.v(&format!("arith.subi {j}, {i} : i64"));
            let kk = f.v(&format!("arith.constant {k} : i64"));
            let keep = f.v(&format!(
                "arith.cmpi {}, {d}, {kk} : i64",
                if *upper { "sge" } else { "sle" }
            ));
            let x = f.v(&format!(
                "memref.load %a0[{}] : {}",
                ivs.join(", "),
                memref(&xshape, xdt)
            ));
            let z = if xdt.is_float() {
                f.fconst(0.0, storage(xdt))
            } else {
                f.v(&format!("arith.constant 0 : {}", storage(xdt)))
            };
            let y = f.v(&format!("arith.select {keep}, {x}, {z} : {}", storage(xdt)));
            f.line(&format!(
                "memref.store {y}, %a{out}[{}] : {}",
                ivs.join(", "),
                memref(&oshape, odt)
            ));
            f.end_parallel(r);
        }
        Op::MatMul => {
            return Err(unsupported(
                "`matmul` runs on the GEMM library, not a generated kernel".into(),
            ))
        }
        other => {
            return Err(unsupported(format!(
                "`{}` is elementwise: use the fused kernel generator",
                other.name()
            )))
        }
    }
    Ok(format!(
        "func.func @{name}({}) {{\n{}  return\n}}\n",
        params.join(", "),
        f.text
    ))
}

/// Where an attention kernel's q, k and mask are (operand index `mask_arg` for the mask).
struct ScoreShapes<'a> {
    q: &'a [usize],
    k: &'a [usize],
    mask: &'a [usize],
    mask_arg: usize,
    dt: DType,
    mask_dt: DType,
    at: &'a str,
}

/// `q[b, h, i, :]·k[b, kh, j, :]·scale + mask[b, h, i, j]` (the mask broadcast): the score
/// every attention kernel (forward, log-sum-exp, gradients) recomputes.
fn attention_score(
    f: &mut F,
    sh: &ScoreShapes,
    scale: &str,
    [b, h, i]: [&str; 3],
    kh: &str,
    j: &str,
) -> String {
    let at = sh.at;
    let zero = f.fconst(0.0, at);
    let dot = f.fold(&[sh.q[3]], &zero, at, &mut |f, c, acc| {
        let qv = f.load(
            0,
            &[b.into(), h.into(), i.into(), c[0].clone()],
            sh.q,
            sh.dt,
        );
        let kv = f.load(
            1,
            &[b.into(), kh.into(), j.into(), c[0].clone()],
            sh.k,
            sh.dt,
        );
        let pr = f.v(&format!("arith.mulf {qv}, {kv} : {at}"));
        f.v(&format!("arith.addf {acc}, {pr} : {at}"))
    });
    let sc = f.v(&format!("arith.mulf {dot}, {scale} : {at}"));
    let full = [b, h, i, j];
    let lead = 4 - sh.mask.len();
    let midx: Vec<String> = (0..sh.mask.len())
        .map(|k| {
            if sh.mask[k] == 1 {
                "%c0".to_string()
            } else {
                full[lead + k].to_string()
            }
        })
        .collect();
    let m = f.load(sh.mask_arg, &midx, sh.mask, sh.mask_dt);
    f.v(&format!("arith.addf {sc}, {m} : {at}"))
}

/// Loops over `shape` for a scatter: `scf.parallel` over every dim not in `seq` (updates there
/// never collide), `scf.for` over the dims in `seq` inside it; `body` gets the induction
/// variables in `shape`'s order.
fn scatter_loops(
    f: &mut F,
    shape: &[usize],
    seq: &[usize],
    body: &mut dyn FnMut(&mut F, &[String]),
) {
    let par: Vec<usize> = (0..shape.len()).filter(|d| !seq.contains(d)).collect();
    let pext: Vec<usize> = par.iter().map(|&d| shape[d]).collect();
    let sext: Vec<usize> = seq.iter().map(|&d| shape[d]).collect();
    let pivs = f.parallel(&pext);
    f.each(&sext, &mut |f, sivs| {
        let mut ivs = vec![String::new(); shape.len()];
        for (k, &d) in par.iter().enumerate() {
            ivs[d] = pivs[k].clone();
        }
        for (k, &d) in seq.iter().enumerate() {
            ivs[d] = sivs[k].clone();
        }
        body(f, &ivs);
    });
    f.end_parallel(pext.len());
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

/// `out[oidx] += x[xidx]`.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    f: &mut F,
    xidx: &[String],
    oidx: &[String],
    xshape: &[usize],
    xdt: DType,
    out: usize,
    oshape: &[usize],
    odt: DType,
) {
    let x = f.load(0, xidx, xshape, xdt);
    let prev = f.load(out, oidx, oshape, odt);
    let add = if xdt.is_float() {
        "arith.addf"
    } else {
        "arith.addi"
    };
    let s = f.v(&format!("{add} {prev}, {x} : {}", arith(xdt)));
    f.store(&s, out, oidx, oshape, odt);
}

/// The row-major linear index of `ivs` in `shape`.
fn linear(f: &mut F, ivs: &[String], shape: &[usize]) -> String {
    let mut acc = "%c0".to_string();
    for (iv, &d) in ivs.iter().zip(shape) {
        let n = f.index(d);
        let m = f.v(&format!("arith.muli {acc}, {n} : index"));
        acc = f.v(&format!("arith.addi {m}, {iv} : index"));
    }
    acc
}

/// The multi-index of linear index `flat` in `shape`.
fn delinear(f: &mut F, flat: &str, shape: &[usize]) -> Vec<String> {
    let mut idx = vec![String::new(); shape.len()];
    let mut rest = flat.to_string();
    for d in (0..shape.len()).rev() {
        let n = f.index(shape[d]);
        idx[d] = f.v(&format!("arith.remui {rest}, {n} : index"));
        rest = f.v(&format!("arith.divui {rest}, {n} : index"));
    }
    idx
}
