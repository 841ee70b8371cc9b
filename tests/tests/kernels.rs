//! The host kernels of real training programs: every example's training step is run with all
//! its kernels compiled through MLIR and LLVM (JIT), except matmuls (on the interpreter here;
//! a GEMM library in the CPU backend), and must give the interpreter's loss and updated
//! weights.

use std::collections::HashMap;

use memc::train::build;
use memc_codegen::fuse::fuse;
use memc_codegen::jit::with_host_jit;
use memc_codegen::kernel::{elementwise_mlir, lower};
use memc_codegen::ops::op_mlir;
use memc_ir::{DType, Op, ParamRole, Tensor, ValueDef, ValueId};
use memc_onnx::{import, ImportOptions};
use memc_passes::train::{Optimizer, TrainOptions};
use memc_tests::examples;

#[test]
fn kernels_of_training_programs_match_the_interpreter() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let inputs = ex.inputs();
        let opts = ImportOptions {
            shapes: inputs
                .iter()
                .map(|(k, t)| (k.clone(), t.shape().to_vec()))
                .collect(),
        };
        let mut g = import(&ex.path, &opts).unwrap();
        let args = TrainOptions {
            // SGD keeps the updates proportional to the gradients, so they are compared tightly
            // (AdamW's first step is lr·sign(g) and flips on gradients near zero).
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            clip_grad_norm: Some(1.0),
            ..TrainOptions::default()
        };
        build(&mut g, &args).unwrap();
        let mut feeds = inputs.clone();
        let scalar = |v: f64| Tensor::from_f64(DType::F32, vec![], &[v]);
        feeds.insert("memc.lr".into(), scalar(0.1));
        feeds.insert("memc.weight_decay".into(), scalar(0.01));
        feeds.insert("memc.step".into(), scalar(1.0));
        let want = memc_ir::run(&g, &feeds, &Default::default()).unwrap();

        // Buffers: inputs, params (optimizer state starts at zero), constants.
        let mut store: HashMap<ValueId, Tensor> = HashMap::new();
        for (i, v) in g.values().iter().enumerate() {
            let t = match &v.def {
                ValueDef::Input { name } => feeds[name].clone(),
                ValueDef::Param { data: Some(t), .. } => t.clone(),
                ValueDef::Param {
                    role: ParamRole::OptimizerState,
                    ..
                } => Tensor::from_f64(v.ty.dtype, v.ty.shape.clone(), &vec![0.0; v.ty.numel()]),
                ValueDef::Const(t) => t.clone(),
                _ => continue,
            };
            store.insert(ValueId(i as u32), t);
        }
        // Every kernel's operands and results, and its generated code (all but matmuls).
        let kernels = fuse(&g);
        let mut io: Vec<(Vec<ValueId>, Vec<ValueId>)> = Vec::new();
        let mut lowered: Vec<(String, String)> = Vec::new();
        // Kernels identical up to their name are lowered (and JIT-optimised) once, as the cpu
        // backend does; `entry[n]` names the one kernel n calls.
        let mut entry: Vec<String> = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut generated = Vec::new();
        for (n, k) in kernels.iter().enumerate() {
            let name = format!("k{n}");
            let node = g.node(k.nodes[0]);
            let (mlir, ins, outs) = if k.elementwise {
                (
                    elementwise_mlir(&g, k, &name),
                    k.inputs.clone(),
                    k.outputs.clone(),
                )
            } else {
                (
                    op_mlir(&g, k.nodes[0], &name),
                    node.inputs.clone(),
                    node.outputs.clone(),
                )
            };
            io.push((ins.clone(), outs.clone()));
            if matches!(node.op, Op::MatMul) {
                generated.push(false);
                entry.push(String::new());
                continue;
            }
            let mlir = mlir.unwrap_or_else(|e| panic!("{}: {e}", ex.name));
            let key = mlir.replace(&format!("@{name}("), "@K(");
            let callee = match seen.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let n = if k.elementwise {
                        ins.len() + outs.len()
                    } else {
                        memc_codegen::ops::kernel_args(&g, k.nodes[0])
                    };
                    let l = lower(&mlir, &name, n)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{mlir}", ex.name));
                    lowered.push((name.clone(), l.llvm_ir));
                    seen.insert(key, name.clone());
                    name
                }
            };
            entry.push(callee);
            generated.push(true);
        }
        let n_generated = generated.iter().filter(|&&b| b).count();
        eprintln!(
            "{}: {} nodes, {} kernels, {} generated",
            ex.name,
            g.nodes().len(),
            kernels.len(),
            n_generated
        );
        with_host_jit(&lowered, |call| {
            for (n, k) in kernels.iter().enumerate() {
                let (ins, outs) = &io[n];
                if generated[n] {
                    let mut bufs: Vec<Vec<u8>> =
                        ins.iter().map(|v| store[v].bytes().to_vec()).collect();
                    for &v in outs {
                        bufs.push(vec![0u8; g.value(v).ty.bytes()]);
                    }
                    // A gather's index flag, which must stay clear.
                    let flagged = !k.elementwise
                        && memc_codegen::ops::takes_index_flag(&g.node(k.nodes[0]).op);
                    let mut flag = [0i64; 4];
                    let mut ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
                    if flagged {
                        ptrs.push(flag.as_mut_ptr().cast());
                    }
                    call(&entry[n], &ptrs);
                    assert_eq!(flag, [0; 4], "{}: kernel {n} reports an index", ex.name);
                    for (j, &v) in outs.iter().enumerate() {
                        // An update's result is stored through its target's operand (they
                        // share a buffer in programs; here they are apart).
                        let b =
                            memc_codegen::kernel::stored_through(&g, k, v).unwrap_or(ins.len() + j);
                        let t = Tensor::from_bytes(g.value(v).ty.clone(), bufs[b].clone().into())
                            .unwrap();
                        store.insert(v, t);
                    }
                } else {
                    let node = g.node(k.nodes[0]);
                    let args: Vec<&Tensor> = node.inputs.iter().map(|v| &store[v]).collect();
                    let out = memc_ir::eval_op(&node.op, &args).unwrap();
                    store.insert(node.outputs[0], out);
                }
            }
        })
        .unwrap();
        let rel = |a: &Tensor, b: &Tensor| {
            let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            a.iter()
                .zip(&b)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
                / scale
        };
        let loss_err = rel(&store[&g.outputs()[0].1], &want.outputs[0].1);
        let mut worst = 0f64;
        for ((_, v), (_, t)) in g.updates().iter().zip(&want.updates) {
            worst = worst.max(rel(&store[v], t));
        }
        eprintln!(
            "{}: loss relative error {loss_err:.2e}, worst updated tensor {worst:.2e}",
            ex.name
        );
        assert!(
            loss_err <= 1e-5,
            "{}: loss differs by {loss_err:.3e}",
            ex.name
        );
        assert!(
            worst <= 1e-4,
            "{}: an updated tensor differs by {worst:.3e}",
            ex.name
        );
    }
}
