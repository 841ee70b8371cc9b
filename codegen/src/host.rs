//! A program compiled for the host CPU: every kernel generated through MLIR and LLVM and
//! JIT-compiled, matmuls on the GEMM library of `memc-runtime`, every value at its offset in
//! one arena laid out by the memory plan (the driver plans over the fused kernels). This is
//! the cpu backend of `memc train|eval --backend cpu` until executables are emitted ahead of
//! time.

use std::collections::HashMap;

use memc_ir::{DType, Graph, Op, ValueId};
use memc_runtime::gemm::{matmul, GemmType};

use crate::fuse::Kernel;
use crate::jit::with_host_jit;
use crate::kernel::{elementwise_mlir, KernelError, Lowerer};
use crate::ops::op_mlir;

/// How a kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// A generated kernel, called through the JIT.
    Generated,
    /// A matrix product on the GEMM library.
    Gemm,
}

/// Where every value lives: a byte offset in one arena of `arena_bytes` (from the memory plan).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// The arena size: the plan's peak.
    pub arena_bytes: u64,
    /// Offset of every value that has a buffer (an update's result at its target's offset).
    pub offsets: HashMap<ValueId, u64>,
}

/// The compiled program.
pub struct HostProgram {
    kernels: Vec<Kernel>,
    io: Vec<(Vec<ValueId>, Vec<ValueId>)>,
    runs: Vec<Run>,
    lowered: Vec<(String, String)>,
    layout: Layout,
}

/// The arena: every value of the program at its planned offset (8-byte aligned base; offsets
/// are multiples of the plan's alignment).
pub struct Arena<'p> {
    words: Vec<u64>,
    layout: &'p Layout,
    sizes: HashMap<ValueId, usize>,
}

impl Arena<'_> {
    /// Bytes allocated: exactly the plan's peak.
    pub fn bytes(&self) -> usize {
        self.layout.arena_bytes as usize
    }

    fn ptr(&self, v: ValueId) -> *mut u8 {
        let off = *self
            .layout
            .offsets
            .get(&v)
            .unwrap_or_else(|| panic!("%{} has no buffer in the plan", v.0));
        // SAFETY: the plan keeps every buffer inside the arena.
        unsafe { (self.words.as_ptr() as *mut u8).add(off as usize) }
    }

    /// The bytes of `v`.
    pub fn get(&self, v: ValueId) -> &[u8] {
        // SAFETY: `v`'s buffer lies inside the arena and holds `sizes[v]` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr(v), self.sizes[&v]) }
    }

    /// Writes `v` (an input, param or constant).
    pub fn set(&mut self, v: ValueId, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.sizes[&v], "%{}: wrong size", v.0);
        // SAFETY: as in `get`; `&mut self` excludes other borrows of the arena.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr(v), bytes.len()) }
    }
}

impl HostProgram {
    /// Generates, lowers and translates every kernel of `kernels` (from [`crate::fuse::fuse`], in order),
    /// keeping the layout every value is read and written at.
    pub fn compile(
        g: &Graph,
        kernels: Vec<Kernel>,
        layout: Layout,
    ) -> Result<HostProgram, KernelError> {
        let mut io = Vec::with_capacity(kernels.len());
        let mut runs = Vec::with_capacity(kernels.len());
        let mut lowered = Vec::new();
        let lowerer = Lowerer::new();
        for (n, k) in kernels.iter().enumerate() {
            let name = format!("k{n}");
            let node = g.node(k.nodes[0]);
            if !k.elementwise && matches!(node.op, Op::MatMul) {
                let t = node.outputs.first().map(|&o| g.value(o).ty.dtype);
                if !matches!(t, Some(DType::F32 | DType::F64 | DType::BF16)) {
                    return Err(KernelError::Unsupported {
                        kernel: name,
                        msg: "matmul supports f32, f64 and bf16".into(),
                    });
                }
                io.push((node.inputs.clone(), node.outputs.clone()));
                runs.push(Run::Gemm);
                continue;
            }
            let (mlir, ins, outs) = if k.elementwise {
                (
                    elementwise_mlir(g, k, &name)?,
                    k.inputs.clone(),
                    k.outputs.clone(),
                )
            } else {
                (
                    op_mlir(g, k.nodes[0], &name)?,
                    node.inputs.clone(),
                    node.outputs.clone(),
                )
            };
            lowered.push((
                name.clone(),
                lowerer.lower(&mlir, &name, ins.len() + outs.len())?.llvm_ir,
            ));
            io.push((ins, outs));
            runs.push(Run::Generated);
        }
        Ok(HostProgram {
            kernels,
            io,
            runs,
            lowered,
            layout,
        })
    }

    /// Number of kernels (generated and library).
    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    /// A zeroed arena for this program.
    pub fn arena(&self, g: &Graph) -> Arena<'_> {
        Arena {
            words: vec![0u64; (self.layout.arena_bytes as usize).div_ceil(8)],
            layout: &self.layout,
            sizes: self
                .layout
                .offsets
                .keys()
                .map(|&v| (v, g.value(v).ty.bytes()))
                .collect(),
        }
    }

    /// JIT-compiles the kernels and gives `f` a step function that runs the whole program on an
    /// [`Arena`] (which must hold every input, param and constant).
    ///
    /// With `MEMC_PROFILE` set in the environment, the time spent per kind of kernel over all
    /// steps is printed to stderr at the end.
    pub fn with_steps<R>(
        &self,
        g: &Graph,
        f: impl FnOnce(&mut dyn FnMut(&mut Arena)) -> R,
    ) -> Result<R, KernelError> {
        let profile = std::env::var_os("MEMC_PROFILE").is_some();
        let label = |n: usize| -> String {
            let k = &self.kernels[n];
            if k.elementwise {
                "fused elementwise".to_string()
            } else {
                g.node(k.nodes[0]).op.name().to_string()
            }
        };
        let mut spent: HashMap<String, (f64, usize)> = HashMap::new();
        let result = with_host_jit(&self.lowered, |call| {
            let mut step = |arena: &mut Arena| {
                for (n, run) in self.runs.iter().enumerate() {
                    let t0 = profile.then(std::time::Instant::now);
                    let (ins, outs) = &self.io[n];
                    match run {
                        Run::Generated => {
                            let ptrs: Vec<*mut u8> =
                                ins.iter().chain(outs).map(|&v| arena.ptr(v)).collect();
                            call(&format!("k{n}"), &ptrs);
                        }
                        Run::Gemm => {
                            let t = match g.value(outs[0]).ty.dtype {
                                DType::F64 => GemmType::F64,
                                DType::BF16 => GemmType::BF16,
                                _ => GemmType::F32,
                            };
                            let (a, b, o) = (ins[0], ins[1], outs[0]);
                            // SAFETY: the plan gives a step's operands and result disjoint
                            // buffers inside the arena.
                            let out = unsafe {
                                std::slice::from_raw_parts_mut(arena.ptr(o), g.value(o).ty.bytes())
                            };
                            matmul(
                                t,
                                arena.get(a),
                                &g.value(a).ty.shape,
                                arena.get(b),
                                &g.value(b).ty.shape,
                                out,
                            );
                        }
                    }
                    if let Some(t0) = t0 {
                        let e = spent.entry(label(n)).or_insert((0.0, 0));
                        e.0 += t0.elapsed().as_secs_f64() * 1e3;
                        e.1 += 1;
                    }
                }
            };
            f(&mut step)
        });
        if profile {
            let mut rows: Vec<(String, (f64, usize))> = spent.into_iter().collect();
            rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
            let total: f64 = rows.iter().map(|r| r.1 .0).sum();
            eprintln!("profile: {total:.1} ms in kernels");
            for (name, (ms, calls)) in rows.iter().take(12) {
                eprintln!(
                    "  {name:<24} {ms:>10.1} ms {:>5.1}% {calls:>7} calls",
                    100.0 * ms / total.max(1e-9)
                );
            }
        }
        result
    }
}
