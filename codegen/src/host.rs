//! A program compiled for the host CPU: every kernel generated through MLIR and LLVM, matmuls
//! as GEMM steps of the runtime, every value at its offset in one arena laid out by the
//! memory plan (the driver plans over the fused kernels). The result is a
//! [`memc_runtime::program::Program`] plus the kernels' LLVM IR: JIT-compiled in-process
//! ([`HostProgram::with_kernels`], the cpu backend of `memc train|eval`) or linked into an
//! executable ([`crate::link::emit_executable`], `memc compile -o`). Both run the same
//! runtime code.

use std::collections::HashMap;

use memc_ir::{DType, Graph, Op, ParamRole, ValueDef, ValueId};
use memc_runtime::cpu::KernelFn;
use memc_runtime::program::{Buf, Const, Dtype, Native, Param, Program, Role, Slot, Step, Written};

use crate::fuse::Kernel;
use crate::jit::with_host_kernels;
use crate::kernel::{elementwise_mlir, KernelError, Lowerer};
use crate::ops::op_mlir;

/// Where every value lives: a byte offset in one arena of `arena_bytes` (from the memory plan).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// The arena size: the plan's peak.
    pub arena_bytes: u64,
    /// Offset of every value that has a buffer (an update's result at its target's offset).
    pub offsets: HashMap<ValueId, u64>,
}

/// The runtime's name of an IR dtype.
pub fn dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::Bf16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::Bool => Dtype::Bool,
    }
}

/// The compiled program.
pub struct HostProgram {
    /// What the runtime executes (the caller adds [`Program::training`] for training programs).
    pub program: Program,
    /// LLVM IR of the generated kernels, in the program's kernel order.
    lowered: Vec<(String, String)>,
    /// Their MLIR (for the device path).
    mlir: Vec<String>,
}

impl HostProgram {
    /// Generates, lowers and translates every kernel of `kernels` (from [`crate::fuse::fuse`]
    /// over `g`, in order) and describes every input, output, parameter and constant of `g` at
    /// its offset in `layout`. `model` names the source in messages.
    pub fn compile(
        g: &Graph,
        kernels: &[Kernel],
        layout: &Layout,
        model: &str,
    ) -> Result<HostProgram, KernelError> {
        HostProgram::compile_with(g, kernels, layout, model, true)
    }

    /// [`HostProgram::compile`]; without `lower_kernels` the kernels keep their MLIR and
    /// have no LLVM IR (a program to plan and count, never to run: [`plan_only`]).
    fn compile_with(
        g: &Graph,
        kernels: &[Kernel],
        layout: &Layout,
        model: &str,
        lower_kernels: bool,
    ) -> Result<HostProgram, KernelError> {
        let buf = |v: ValueId, kernel: &str| -> Result<Buf, KernelError> {
            let offset = *layout
                .offsets
                .get(&v)
                .ok_or_else(|| KernelError::Unsupported {
                    kernel: kernel.to_string(),
                    msg: format!("%{} has no buffer in the memory plan (a memc bug)", v.0),
                })?;
            Ok(Buf {
                offset,
                bytes: g.value(v).ty.bytes() as u64,
            })
        };
        let mut steps = Vec::with_capacity(kernels.len());
        let mut results: Vec<Vec<Written>> = Vec::with_capacity(kernels.len());
        let written = |v: ValueId, kernel: &crate::fuse::Kernel, name: &str| {
            Ok::<_, KernelError>(Written {
                buf: buf(v, name)?,
                dtype: dtype(g.value(v).ty.dtype),
                shape: g.value(v).ty.shape.clone(),
                what: what(g, kernel, v),
            })
        };
        // Each distinct kernel: name, the MLIR the host runs, number of buffer arguments.
        let mut pending: Vec<(String, String, usize)> = Vec::new();
        let mut seen: HashMap<String, u32> = HashMap::new();
        let mut kernel_mlir: Vec<String> = Vec::new();
        let mut ranges: Vec<Option<u64>> = Vec::new();
        for (n, k) in kernels.iter().enumerate() {
            let name = format!("step{n}");
            let node = g.node(k.nodes[0]);
            let view = |n: memc_ir::NodeId| is_view(g, layout, n);
            if k.nodes.len() == 1 && view(k.nodes[0]) {
                continue;
            }
            if !k.elementwise && matches!(node.op, Op::MatMul) {
                let t = g.value(node.outputs[0]).ty.dtype;
                if !matches!(t, DType::F32 | DType::F64 | DType::BF16) {
                    return Err(KernelError::Unsupported {
                        kernel: name,
                        msg: format!("matmul supports f32, f64 and bf16, not {t}"),
                    });
                }
                let (a, b, o) = (node.inputs[0], node.inputs[1], node.outputs[0]);
                let stored_transposed = |v: ValueId| stored_transposed(g, layout, v);
                steps.push(Step::Gemm {
                    dtype: dtype(t),
                    a: buf(a, &name)?,
                    a_shape: g.value(a).ty.shape.clone(),
                    b: buf(b, &name)?,
                    b_shape: g.value(b).ty.shape.clone(),
                    out: buf(o, &name)?,
                    a_t: stored_transposed(a),
                    b_t: stored_transposed(b),
                });
                results.push(vec![written(o, k, &name)?]);
                continue;
            }
            let (ins, outs, label) = kernel_operands(g, k);
            let mlir = if k.elementwise {
                elementwise_mlir(g, k, &name)?
            } else {
                op_mlir(g, k.nodes[0], &name)?
            };
            let args = ins
                .iter()
                .chain(outs)
                .map(|&v| buf(v, &name))
                .collect::<Result<Vec<_>, _>>()?;
            // Kernels that compute the same thing on the same shapes are generated once.
            let key = mlir.replace(&format!("@{name}("), "@K(");
            let kernel = match seen.get(&key) {
                Some(&k) => k,
                None => {
                    let name = format!("memc_k{}", pending.len());
                    let mlir = key.replace("@K(", &format!("@{name}("));
                    // The host runs the split form where there is one (a row range argument,
                    // `crate::threads`); the GPU mapping reads the kernel as generated.
                    let split = crate::threads::split_form(&mlir, &name);
                    // Buffers, the index flag of a gather, the row range of a split kernel.
                    let n = if k.elementwise {
                        args.len()
                    } else {
                        crate::ops::kernel_args(g, k.nodes[0])
                    };
                    pending.push(match &split {
                        Some((host, _)) => (name, host.clone(), n + 1),
                        None => (name, mlir.clone(), n),
                    });
                    kernel_mlir.push(mlir);
                    ranges.push(split.map(|(_, rows)| rows));
                    seen.insert(key, pending.len() as u32 - 1);
                    pending.len() as u32 - 1
                }
            };
            let native = if k.elementwise { None } else { native(g, node) };
            results.push(
                outs.iter()
                    .map(|&v| written(v, k, &name))
                    .collect::<Result<_, _>>()?,
            );
            let index_check = (!k.elementwise && crate::ops::takes_index_flag(&node.op))
                .then(|| what(g, k, node.outputs[0]));
            steps.push(Step::Kernel {
                kernel,
                args,
                label,
                native,
                range: ranges[kernel as usize],
                index_check,
            });
        }
        // The distinct kernels lowered through MLIR to LLVM IR, on every core.
        let irs = if lower_kernels {
            crate::kernel::lower_many(&pending)?
        } else {
            vec![String::new(); pending.len()]
        };
        let lowered: Vec<(String, String)> =
            pending.into_iter().map(|(n, _, _)| n).zip(irs).collect();

        let slot = |v: ValueId, name: &str| {
            layout.offsets.get(&v).map(|&offset| Slot {
                name: name.to_string(),
                dtype: dtype(g.value(v).ty.dtype),
                shape: g.value(v).ty.shape.clone(),
                offset,
            })
        };
        let mut program = Program {
            model: model.to_string(),
            arena_bytes: layout.arena_bytes,
            kernels: lowered.iter().map(|(n, _)| n.clone()).collect(),
            steps,
            inputs: vec![],
            outputs: vec![],
            params: vec![],
            consts: vec![],
            training: None,
            device: None,
            pipeline: None,
            eval: None,
            checkpoint: Default::default(),
            index_bounds: vec![],
            results,
            blob: vec![],
        };
        for &v in g.inputs() {
            if let ValueDef::Input { name } = &g.value(v).def {
                program.inputs.extend(slot(v, name));
            }
        }
        program.index_bounds = index_bounds(g);
        for (name, v) in g.outputs() {
            let s = slot(*v, name).ok_or_else(|| KernelError::Unsupported {
                kernel: "outputs".into(),
                msg: format!("output `{name}` has no buffer in the memory plan (a memc bug)"),
            })?;
            program.outputs.push(s);
        }
        for (i, val) in g.values().iter().enumerate() {
            let v = ValueId(i as u32);
            let (name, data) = match &val.def {
                ValueDef::Param {
                    name,
                    role: role @ (ParamRole::Weight | ParamRole::OptimizerState),
                    ..
                } => {
                    if let Some(s) = slot(v, name) {
                        program.params.push(Param {
                            slot: s,
                            role: if *role == ParamRole::Weight {
                                Role::Weight
                            } else {
                                Role::OptimizerState
                            },
                            updated: g.updates().iter().any(|&(p, _)| p == v),
                        });
                    }
                    continue;
                }
                ValueDef::Param {
                    name,
                    role: ParamRole::Constant,
                    data,
                } => (name.clone(), data.as_ref()),
                ValueDef::Const(t) => (format!("%{i}"), Some(t)),
                _ => continue,
            };
            let (Some(s), Some(t)) = (slot(v, &name), data) else {
                continue;
            };
            // Constants start 8-byte aligned in the blob.
            program
                .blob
                .resize(program.blob.len().next_multiple_of(8), 0);
            program.consts.push(Const {
                slot: s,
                blob_offset: program.blob.len() as u64,
            });
            program.blob.extend_from_slice(t.bytes());
        }
        program
            .validate()
            .map_err(|e| KernelError::Link(format!("{model}: {e}")))?;
        Ok(HostProgram {
            program,
            lowered,
            mlir: kernel_mlir,
        })
    }

    /// Puts the kernels of `parts` (programs compiled on their own, such as a pipelined
    /// step's passes) in one table under `top`: kernels equal up to their names are kept once
    /// (renamed `memc_k{n}` in the table's order), each part's steps point into the table and
    /// its constants move to `top`'s blob. Returns `top` with every kernel and each part's
    /// program (its kernel list empty) with its constants' byte range in `top.blob`, for
    /// [`memc_runtime::program::SubProgram`].
    pub fn combine(
        mut top: Program,
        parts: Vec<HostProgram>,
    ) -> (HostProgram, Vec<(Program, [u64; 2])>) {
        let mut lowered: Vec<(String, String)> = vec![];
        let mut mlir: Vec<String> = vec![];
        let mut seen: HashMap<String, u32> = HashMap::new();
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            let mut remap = Vec::with_capacity(part.lowered.len());
            for ((name, ir), m) in part.lowered.iter().zip(&part.mlir) {
                // The kernel's symbols: its entry and helpers such as `@NAME_body`.
                let key = rename_symbols(ir, name, "K");
                let k = *seen.entry(key.clone()).or_insert_with(|| {
                    let fresh = format!("memc_k{}", lowered.len());
                    lowered.push((fresh.clone(), rename_symbols(&key, "K", &fresh)));
                    mlir.push(rename_symbols(m, name, &fresh));
                    lowered.len() as u32 - 1
                });
                remap.push(k);
            }
            let mut p = part.program;
            for step in &mut p.steps {
                if let Step::Kernel { kernel, .. } = step {
                    *kernel = remap[*kernel as usize];
                }
            }
            p.kernels.clear();
            top.blob.resize(top.blob.len().next_multiple_of(8), 0);
            let start = top.blob.len() as u64;
            top.blob.extend_from_slice(&p.blob);
            p.blob.clear();
            out.push((p, [start, top.blob.len() as u64]));
        }
        top.kernels = lowered.iter().map(|(n, _)| n.clone()).collect();
        (
            HostProgram {
                program: top,
                lowered,
                mlir,
            },
            out,
        )
    }

    /// Adds `eval` ([`lower_eval`] of this program) as the program's evaluation step: its
    /// kernels join this program's (one table, shared kernels once), its constants the blob,
    /// and the arena grows to hold it when it needs more.
    pub fn attach_eval(&mut self, eval: HostProgram) {
        let mut seen: HashMap<String, u32> = self
            .lowered
            .iter()
            .enumerate()
            .map(|(i, (name, ir))| (rename_symbols(ir, name, "K"), i as u32))
            .collect();
        let mut remap = Vec::with_capacity(eval.lowered.len());
        for ((name, ir), m) in eval.lowered.iter().zip(&eval.mlir) {
            let key = rename_symbols(ir, name, "K");
            let k = match seen.get(&key) {
                Some(&k) => k,
                None => {
                    let fresh = format!("memc_k{}", self.lowered.len());
                    self.lowered
                        .push((fresh.clone(), rename_symbols(&key, "K", &fresh)));
                    self.mlir.push(rename_symbols(m, name, &fresh));
                    self.program.kernels.push(fresh);
                    let k = self.lowered.len() as u32 - 1;
                    seen.insert(key, k);
                    k
                }
            };
            remap.push(k);
        }
        let mut p = eval.program;
        for step in &mut p.steps {
            if let Step::Kernel { kernel, .. } = step {
                *kernel = remap[*kernel as usize];
            }
        }
        p.kernels.clear();
        let blob = &mut self.program.blob;
        blob.resize(blob.len().next_multiple_of(8), 0);
        let start = blob.len() as u64;
        blob.extend_from_slice(&p.blob);
        p.blob.clear();
        self.program.arena_bytes = self.program.arena_bytes.max(p.arena_bytes);
        self.program.eval = Some(Box::new(memc_runtime::program::SubProgram {
            label: "eval".into(),
            device: 0,
            shard: 0,
            program: p,
            blob: [start, self.program.blob.len() as u64],
        }));
    }

    /// Number of steps (generated kernels and GEMMs).
    pub fn kernel_count(&self) -> usize {
        self.program.steps.len()
    }

    /// The generated kernels' LLVM IR (name, IR), in the program's kernel order.
    pub fn lowered(&self) -> &[(String, String)] {
        &self.lowered
    }

    /// Replaces every host kernel by its GPU form ([`crate::ptx::gpu_form`]: loops tiled into
    /// blocks and threads, bounds guards, sequential code in one-thread launches) lowered for
    /// the host. The host lowering ignores the mapping, so running the program then checks
    /// the GPU mapping's index arithmetic on the CPU, against the untransformed kernels (every
    /// step runs its kernel, whole: no row ranges, no runtime attention).
    pub fn use_gpu_form_on_host(&mut self) -> Result<(), KernelError> {
        let mut mapped = Vec::with_capacity(self.lowered.len());
        for ((name, _), mlir) in self.lowered.iter().zip(&self.mlir) {
            let n_args = mlir
                .lines()
                .find(|l| l.starts_with("func.func @"))
                .map(|l| l.matches(": memref<").count())
                .unwrap_or(0);
            mapped.push((name.clone(), crate::ptx::gpu_form(mlir, name)?, n_args));
        }
        let irs = crate::kernel::lower_many(&mapped)?;
        for ((_, ir), new) in self.lowered.iter_mut().zip(irs) {
            *ir = new;
        }
        // The GPU forms take no row range (each runs whole), and every kernel runs, attention
        // included, rather than the runtime's own implementation.
        for step in &mut self.program.steps {
            if let Step::Kernel { range, .. } = step {
                *range = None;
            }
        }
        self.without_native();
        Ok(())
    }

    /// Makes every step run its generated kernel, the attention kernels included, rather than
    /// the runtime's own implementation ([`native`]): the program the GPU mapping is checked
    /// against bit for bit.
    pub fn without_native(&mut self) {
        for step in &mut self.program.steps {
            if let Step::Kernel { native, .. } = step {
                *native = None;
            }
        }
    }

    /// Adds device code for the cuda backend: every kernel mapped to GPU blocks and threads
    /// and lowered through NVVM ([`crate::ptx`]), all in one PTX module for `sm_{sm}`.
    pub fn compile_device(
        &mut self,
        sm: u32,
        libdevice: &std::path::Path,
    ) -> Result<(), KernelError> {
        let lowerer = Lowerer::new();
        let mut launches = Vec::with_capacity(self.mlir.len());
        let mut device_ir = vec![];
        for ((name, _), mlir) in self.lowered.iter().zip(&self.mlir) {
            let d = crate::ptx::lower_gpu(lowerer.context(), mlir, name)?;
            launches.push(d.launches);
            device_ir.extend(d.llvm_ir);
        }
        let ptx = crate::ptx::ptx_module(&device_ir, sm, libdevice)?;
        self.program.device = Some(memc_runtime::program::Device {
            arch: format!("sm_{sm}"),
            ptx,
            launches,
        });
        self.program
            .validate()
            .map_err(|e| KernelError::Link(e.to_string()))
    }

    /// JIT-compiles the kernels (optimised for this CPU, as in executables) and gives `f` their
    /// entry points, for [`memc_runtime::cpu::Cpu::new`].
    pub fn with_kernels<R>(&self, f: impl FnOnce(&[KernelFn]) -> R) -> Result<R, KernelError> {
        with_host_kernels(&self.lowered, f)
    }
}

/// The runtime's own implementation of `node`, which the cpu backend runs in place of the
/// generated kernel: the tiled attention ([`memc_runtime::attention`]) for an `attention`,
/// `attention_lse` or `attention_grad` node of f32, f64 or bf16; `None` for every other node.
pub fn native(g: &Graph, node: &memc_ir::Node) -> Option<Native> {
    use memc_runtime::attention::{Part, Spec};
    let (part, sc, mask) = match &node.op {
        Op::Attention(sc) => (Part::Forward, sc, 3),
        Op::AttentionLse(sc) => (Part::Lse, sc, 2),
        Op::AttentionGrad { scores, wrt } => (
            [Part::GradQ, Part::GradK, Part::GradV][(*wrt).min(2)],
            scores,
            3,
        ),
        _ => return None,
    };
    let ty = |i: usize| &g.value(node.inputs[i]).ty;
    let t = ty(0).dtype;
    if !matches!(t, DType::F32 | DType::F64 | DType::BF16) {
        return None;
    }
    let four = |i: usize| -> Option<[usize; 4]> { ty(i).shape.clone().try_into().ok() };
    let dv = if part == Part::Lse {
        ty(1).shape[3]
    } else {
        ty(2).shape[3]
    };
    Some(Native::Attention(Spec {
        part,
        dtype: dtype(t),
        q: four(0)?,
        k: four(1)?,
        dv,
        mask: ty(mask).shape.clone(),
        scale: sc.scale,
        softcap: sc.softcap,
        causal: sc.causal,
        window: sc.window,
    }))
}

/// `text` with every symbol `@from` (or `@from_...`, not `@from7`) renamed to `@to`.
/// The op that computes `v` in `kernel`, as the reference interpreter names a node (``node #12
/// `add` (name)``), and the kernel's other ops when it fuses several.
fn what(g: &Graph, kernel: &Kernel, v: ValueId) -> String {
    let node = |n: memc_ir::NodeId| {
        let nd = g.node(n);
        let name = if nd.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", nd.name)
        };
        format!("node #{} `{}`{name}", n.0, nd.op.name())
    };
    let Some(p) = g.producer(v) else {
        return format!("%{}", v.0);
    };
    if kernel.nodes.len() <= 1 {
        return node(p);
    }
    let mut ops: Vec<&str> = kernel.nodes.iter().map(|&n| g.node(n).op.name()).collect();
    ops.dedup();
    format!(
        "{} (a kernel fusing {} nodes: {})",
        node(p),
        kernel.nodes.len(),
        ops.join(", ")
    )
}

fn rename_symbols(text: &str, from: &str, to: &str) -> String {
    let pat = format!("@{from}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&pat) {
        let after = &rest[i + pat.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            out.push_str(&pat);
        } else {
            out.push('@');
            out.push_str(to);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The cpu backend's kernel sequence and memory plan: `g`'s nodes put in the memory plan's
/// order (which runs optimizer updates as soon as their gradients exist), fused into kernels
/// in that order, and planned over those kernels (values inside a kernel need no buffer).
/// Returns the reordered graph (same values), the kernels and the plan.
pub fn layout(g: &Graph) -> (Graph, Vec<Kernel>, memc_passes::plan::Plan) {
    let mut ordered = g.clone();
    ordered.reorder_nodes(&memc_passes::plan::plan(g).order);
    let kernels = crate::fuse::fuse(&ordered);
    let steps: Vec<Vec<memc_ir::NodeId>> = kernels.iter().map(|k| k.nodes.clone()).collect();
    let plan = memc_passes::plan::plan_steps(&ordered, &steps);
    (ordered, kernels, plan)
}

/// Lowers `g` to the cpu backend's program (see [`layout`]): kernels generated and lowered,
/// every value at its planned offset (the arena is the plan's peak). The caller adds the
/// runtime's training description for a training program.
pub fn lower(g: &Graph, model: &str) -> Result<HostProgram, KernelError> {
    let (ordered, kernels, plan) = layout(g);
    HostProgram::compile(&ordered, &kernels, &plan_layout(&plan), model)
}

/// [`lower`] without lowering the kernels: the same program (steps, buffers, arena), whose
/// kernels have no code. For planning (`memc plan` sizes pipelined steps' ranks with it);
/// running it is refused, as a program without its kernels' entries.
pub fn plan_only(g: &Graph, model: &str) -> Result<HostProgram, KernelError> {
    let (ordered, kernels, plan) = layout(g);
    HostProgram::compile_with(&ordered, &kernels, &plan_layout(&plan), model, false)
}

/// Every value at its offset in `plan` (aliases at their targets'), the arena its peak.
fn plan_layout(plan: &memc_passes::plan::Plan) -> Layout {
    let mut layout = Layout {
        arena_bytes: plan.peak_bytes,
        offsets: Default::default(),
    };
    for b in &plan.buffers {
        layout.offsets.insert(b.value, b.offset);
    }
    for &(v, target) in &plan.aliases {
        let at = layout.offsets[&target];
        layout.offsets.insert(v, at);
    }
    layout
}

/// A reshape or transpose the plan made a view (its result where its operand is) runs
/// nothing: a transposed view's readers are GEMMs reading it through strides.
fn is_view(g: &Graph, layout: &Layout, n: memc_ir::NodeId) -> bool {
    let nd = g.node(n);
    matches!(nd.op, Op::Reshape { .. } | Op::Transpose { .. })
        && layout.offsets.contains_key(&nd.inputs[0])
        && layout.offsets.get(&nd.inputs[0]) == layout.offsets.get(&nd.outputs[0])
}

/// A GEMM operand that is a transposed view is read in its operand's layout.
fn stored_transposed(g: &Graph, layout: &Layout, v: ValueId) -> bool {
    g.producer(v)
        .is_some_and(|p| memc_passes::plan::transposed_view(g, p) && is_view(g, layout, p))
}

/// A generated kernel's operands, results and profile label (`fused elementwise`, `fused
/// reduction`, or its op's name).
fn kernel_operands<'g>(g: &'g Graph, k: &'g Kernel) -> (&'g [ValueId], &'g [ValueId], String) {
    if k.elementwise {
        let reduces = k
            .nodes
            .iter()
            .any(|&n| matches!(g.node(n).op, Op::Reduce { .. }));
        let label = if reduces {
            "fused reduction"
        } else {
            "fused elementwise"
        };
        (&k.inputs, &k.outputs, label.to_string())
    } else {
        let node = g.node(k.nodes[0]);
        (&node.inputs, &node.outputs, node.op.name().to_string())
    }
}

/// What one step of the cpu program [`lower`] builds runs, for a cost model (`memc plan`):
/// the classification [`HostProgram::compile`] makes, without generating a kernel.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A GEMM ([`Step::Gemm`]'s fields).
    Gemm {
        /// Element type.
        dtype: Dtype,
        /// `a`'s shape.
        a_shape: Vec<usize>,
        /// `b`'s shape.
        b_shape: Vec<usize>,
        /// Operands stored transposed.
        trans: (bool, bool),
    },
    /// A step the runtime runs itself.
    Native(Native),
    /// A generated kernel: its profile label and the bytes of its buffers.
    Kernel {
        /// `fused elementwise`, `fused reduction`, or the op's name.
        label: String,
        /// The bytes of its operands and results.
        bytes: u64,
    },
}

impl Work {
    /// The steps of a lowered program, as [`work`] gives them.
    pub fn of_program(p: &Program) -> Vec<Work> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::Gemm {
                    dtype,
                    a_shape,
                    b_shape,
                    a_t,
                    b_t,
                    ..
                } => Work::Gemm {
                    dtype: *dtype,
                    a_shape: a_shape.clone(),
                    b_shape: b_shape.clone(),
                    trans: (*a_t, *b_t),
                },
                Step::Kernel {
                    native: Some(n), ..
                } => Work::Native(n.clone()),
                Step::Kernel { label, args, .. } => Work::Kernel {
                    label: label.clone(),
                    bytes: args.iter().map(|b| b.bytes).sum(),
                },
            })
            .collect()
    }
}

/// The steps of the cpu program of `g` (what [`lower`] would build), and its arena's bytes,
/// without generating any kernel: a few milliseconds where [`lower`] takes seconds.
pub fn work(g: &Graph) -> (u64, Vec<Work>) {
    let (ordered, kernels, plan) = layout(g);
    let layout = plan_layout(&plan);
    let g = &ordered;
    let mut steps = vec![];
    for k in &kernels {
        let node = g.node(k.nodes[0]);
        if k.nodes.len() == 1 && is_view(g, &layout, k.nodes[0]) {
            continue;
        }
        if !k.elementwise && matches!(node.op, Op::MatMul) {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            steps.push(Work::Gemm {
                dtype: dtype(g.value(node.outputs[0]).ty.dtype),
                a_shape: g.value(a).ty.shape.clone(),
                b_shape: g.value(b).ty.shape.clone(),
                trans: (
                    stored_transposed(g, &layout, a),
                    stored_transposed(g, &layout, b),
                ),
            });
            continue;
        }
        if let Some(n) = (!k.elementwise).then(|| native(g, node)).flatten() {
            steps.push(Work::Native(n));
            continue;
        }
        let (ins, outs, label) = kernel_operands(g, k);
        let bytes = ins
            .iter()
            .chain(outs)
            .map(|&v| g.value(v).ty.bytes() as u64)
            .sum();
        steps.push(Work::Kernel { label, bytes });
    }
    (plan.peak_bytes, steps)
}

/// The evaluation step `g` (forward and loss) laid out inside `train`'s arena: its weights
/// at the training program's offsets (the same tensors, by name), everything else after the
/// training program's persistent buffers (weights, optimizer state, inputs, constants), in
/// the region the training step uses only while it runs. Its arena is what it reaches; the
/// caller grows the training arena to it when larger ([`HostProgram::attach_eval`]).
pub fn lower_eval(g: &Graph, model: &str, train: &Program) -> Result<HostProgram, KernelError> {
    let (ordered, kernels, plan) = layout(g);
    let persistent_end = train
        .kept_bytes()
        .next_multiple_of(memc_passes::plan::ALIGN);
    let mut layout = Layout::default();
    let mut rest = vec![];
    for b in &plan.buffers {
        let shared = match &ordered.value(b.value).def {
            memc_ir::ValueDef::Param {
                name,
                role: memc_ir::ParamRole::Weight,
                ..
            } => train.params.iter().find(|p| p.slot.name == *name),
            _ => None,
        };
        match shared {
            Some(p) if p.slot.bytes() == ordered.value(b.value).ty.bytes() as u64 => {
                layout.offsets.insert(b.value, p.slot.offset);
            }
            Some(p) => {
                return Err(KernelError::Link(format!(
                    "the evaluation step's weight `{}` is {}, the training step's {}",
                    p.slot.name,
                    ordered.value(b.value).ty,
                    p.slot.type_string()
                )))
            }
            None => rest.push(b.clone()),
        }
    }
    let peak = memc_passes::plan::assign_offsets(&mut rest);
    for b in &rest {
        layout.offsets.insert(b.value, persistent_end + b.offset);
    }
    for &(v, target) in &plan.aliases {
        let at = layout.offsets[&target];
        layout.offsets.insert(v, at);
    }
    layout.arena_bytes = persistent_end + peak;
    HostProgram::compile(&ordered, &kernels, &layout, model)
}

/// `g`'s interface as a program without kernels: every input, output, weight and optimizer
/// state at its own offset (constants stay in the graph). A backend that runs `g` itself,
/// such as the reference interpreter ([`crate::reference`]), serves it.
pub fn interface(g: &Graph, model: &str) -> Result<HostProgram, KernelError> {
    let mut layout = Layout::default();
    let place = |v: ValueId, layout: &mut Layout| {
        if let std::collections::hash_map::Entry::Vacant(e) = layout.offsets.entry(v) {
            e.insert(layout.arena_bytes);
            layout.arena_bytes =
                (layout.arena_bytes + g.value(v).ty.bytes() as u64).next_multiple_of(256);
        }
    };
    for &v in g.inputs() {
        place(v, &mut layout);
    }
    for &(_, v) in g.outputs() {
        place(v, &mut layout);
    }
    for (i, val) in g.values().iter().enumerate() {
        if let ValueDef::Param {
            role: ParamRole::Weight | ParamRole::OptimizerState,
            ..
        } = val.def
        {
            place(ValueId(i as u32), &mut layout);
        }
    }
    HostProgram::compile(g, &[], &layout, model)
}

/// Every graph input whose elements are gather indices (directly or through reshapes, casts,
/// transposes, slices and expands), with the smallest table dimension they index: the range
/// the runtime checks such an input against before a run (kernels clamp indices).
pub fn index_bounds(g: &Graph) -> Vec<memc_runtime::program::IndexBound> {
    use memc_ir::Op;
    let mut users: HashMap<ValueId, Vec<&memc_ir::Node>> = HashMap::new();
    for n in g.nodes() {
        for &i in &n.inputs {
            users.entry(i).or_default().push(n);
        }
    }
    let mut out = vec![];
    for &input in g.inputs() {
        let ValueDef::Input { name } = &g.value(input).def else {
            continue;
        };
        if g.value(input).ty.dtype.is_float() {
            continue;
        }
        let mut best: Option<(u64, String)> = None;
        let mut stack = vec![input];
        let mut seen = std::collections::HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for n in users.get(&v).into_iter().flatten() {
                let table = match &n.op {
                    Op::Gather { axis } | Op::GatherElements { axis } if n.inputs[1] == v => {
                        let t = n.inputs[0];
                        Some((g.value(t).ty.shape[*axis] as u64, t))
                    }
                    Op::Reshape { .. }
                    | Op::Cast { .. }
                    | Op::Transpose { .. }
                    | Op::Slice { .. }
                    | Op::Expand { .. } => {
                        stack.extend(n.outputs.iter().copied());
                        None
                    }
                    _ => None,
                };
                if let Some((bound, t)) = table {
                    let what = match &g.value(t).def {
                        ValueDef::Param { name, .. } => format!("the rows of `{name}`"),
                        _ => format!("a table of {bound}"),
                    };
                    if best.as_ref().is_none_or(|(b, _)| bound < *b) {
                        best = Some((bound, what));
                    }
                }
            }
        }
        if let Some((bound, table)) = best {
            out.push(memc_runtime::program::IndexBound {
                input: name.clone(),
                bound,
                table,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rename_symbols_renames_a_kernel_and_its_helpers_only() {
        let ir = "define void @memc_k1(ptr %0) { call @memc_k1_body() call @memc_k12() }";
        assert_eq!(
            super::rename_symbols(ir, "memc_k1", "memc_k7"),
            "define void @memc_k7(ptr %0) { call @memc_k7_body() call @memc_k12() }"
        );
    }
}
