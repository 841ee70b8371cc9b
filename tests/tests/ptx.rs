//! Device code without a GPU: every kernel of every example model's training program, mapped
//! to blocks and threads and lowered to PTX, assembles with ptxas (PyPI's nvidia-cuda-nvcc)
//! for sm_90a; ptxas's register and spill report is printed (`--nocapture`) for BENCHMARKS.md.

use memc_codegen::ptx::{find_libdevice, ptxas};
use memc_tests::{adamw, examples, train_args, training_program, TrainOptions, AUTO};

#[test]
fn every_training_kernel_assembles_for_sm_90a() {
    let libdevice = find_libdevice().expect("scripts/setup.sh installs nvidia-cuda-nvcc");
    for ex in examples() {
        let (g, _) = training_program(&ex, &train_args(adamw(), Some(1.0), AUTO));
        let mut host = memc::train::host_program(&g, &ex.name, None).unwrap();
        host.compile_device(90, &libdevice)
            .unwrap_or_else(|e| panic!("{}: {e}", ex.name));
        let device = host.program.device.as_ref().unwrap();
        let entries = device.ptx.matches(".entry ").count();
        let launches: usize = device.launches.iter().map(Vec::len).sum();
        assert_eq!(entries, launches, "{}: one PTX entry per launch", ex.name);
        assert!(
            !device.ptx.contains("call.uni") && !device.ptx.contains("__nv_"),
            "{}: libdevice functions are inlined",
            ex.name
        );
        let report = ptxas(&device.ptx, "sm_90a").unwrap_or_else(|e| panic!("{}: {e}", ex.name));
        let regs: Vec<u32> = report
            .lines()
            .filter_map(|l| {
                let at = l.find("Used ")?;
                l[at + 5..].split(' ').next()?.parse().ok()
            })
            .collect();
        let spills = report
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
            })
            .count();
        assert_eq!(regs.len(), entries, "{}: {report}", ex.name);
        eprintln!(
            "{:<28} {} kernels, {entries} PTX entries, registers max {} median {}, {spills} kernels spill",
            ex.name,
            device.launches.len(),
            regs.iter().max().unwrap(),
            {
                let mut r = regs.clone();
                r.sort();
                r[r.len() / 2]
            }
        );
        assert_eq!(spills, 0, "{}: {report}", ex.name);
    }
}

#[test]
fn sm_80_too() {
    let libdevice = find_libdevice().unwrap();
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let (g, _) = training_program(&ex, &train_args(adamw(), None, AUTO));
    let mut host = memc::train::host_program(&g, &ex.name, None).unwrap();
    host.compile_device(80, &libdevice).unwrap();
    let ptx = &host.program.device.as_ref().unwrap().ptx;
    assert!(ptx.contains(".target sm_80") && ptx.contains(".version 8.0"));
    ptxas(ptx, "sm_80").unwrap();
}

/// The GPU mapping (blocks × threads with bounds guards, sequential code in one-thread
/// launches) run on the CPU: every kernel of the training step replaced by its GPU form gives
/// bitwise the losses of the untransformed kernels. The mapping attributes and the gpu
/// dialect conversion are MLIR's; this checks memc's index arithmetic without a GPU.
#[test]
fn gpu_mapping_computes_the_same_training_step() {
    // The examples, and two zoo models for soft-capped, causal and windowed attention.
    let zoo = ["gemma2-eager-torchscript", "mistral-sdpa-dynamo"].map(|name| memc_tests::Example {
        name: name.to_string(),
        family: name.split('-').next().unwrap().to_string(),
        exporter: name.rsplit('-').next().unwrap().to_string(),
        path: memc_tests::root().join(format!("examples/zoo/{name}.onnx")),
        torch_params: 0,
    });
    for ex in examples()
        .into_iter()
        .filter(|e| !e.name.contains("opset") && e.family != "bert")
        .chain(zoo)
    {
        let a = train_args(adamw(), Some(1.0), AUTO);
        let program = || training_program(&ex, &a).0;
        let run = |mapped: bool| host_losses(&ex, &a, &program, mapped);
        let plain = run(false);
        let mapped = run(true);
        eprintln!(
            "{:<20} host kernels {plain:?}, GPU-mapped kernels on the host {mapped:?}",
            ex.name
        );
        assert_eq!(plain, mapped, "{}", ex.name);
    }
}

/// Mixture-of-Channels (`--moc-k 0.25`) on the example Llama: its kernels (top-k with i16
/// indices, gathers, the scatter into the down projection) assemble for sm_90a, and their GPU
/// forms run on the host give bitwise the losses of the host kernels.
#[test]
fn moc_kernels_assemble_and_map() {
    let libdevice = find_libdevice().unwrap();
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let a = train_args(adamw(), None, AUTO);
    let program = || {
        let (mut g, _) = ex.import();
        memc_passes::canonicalize::canonicalize(&mut g, &Default::default()).unwrap();
        memc_passes::moc::apply_moc(&mut g, memc_passes::moc::MocK::Ratio(0.25)).unwrap();
        memc::train::build(&mut g, &a).unwrap();
        assert!(g.op_counts().contains_key("top_k"));
        g
    };
    let g = program();
    let mut host = memc::train::host_program(&g, &ex.name, None).unwrap();
    host.compile_device(90, &libdevice).unwrap();
    let report = ptxas(&host.program.device.as_ref().unwrap().ptx, "sm_90a").unwrap();
    assert!(
        !report
            .lines()
            .any(|l| l.contains("spill")
                && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")),
        "{report}"
    );
    let run = |mapped: bool| host_losses(&ex, &a, &program, mapped);
    let (plain, mapped) = (run(false), run(true));
    eprintln!("moc: host kernels {plain:?}, GPU-mapped kernels on the host {mapped:?}");
    assert_eq!(plain, mapped);
}

/// Losses of 3 AdamW steps of the training program `program()` makes for `ex`, on the cpu
/// backend with its host kernels or (`mapped`) their GPU forms run on the host.
fn host_losses(
    ex: &memc_tests::Example,
    a: &TrainOptions,
    program: &dyn Fn() -> memc_ir::Graph,
    mapped: bool,
) -> Vec<f64> {
    let path = ex.path.with_extension("").join("inputs/input_ids.npy");
    let opts = memc::train::LoopOptions {
        steps: 3,
        lr: 1e-3,
        weight_decay: 0.01,
        fixed: vec![],
        save: None,
        resume: None,
        layout: Default::default(),
        run: Default::default(),
        log: None,
        eval: None,
    };
    let mut g = program();
    let mut host = memc::train::host_program(&g, &ex.name, Some(a)).unwrap();
    if mapped {
        host.use_gpu_form_on_host().unwrap();
    } else {
        // The generated attention kernels, which the GPU forms map, rather than the runtime's
        // tiled attention (checked against the interpreter in codegen's kernel tests).
        host.without_native();
    }
    let mut data = memc::train::Batches::open(&path).unwrap();
    memc::train::run_program(
        &mut g,
        &host,
        &mut data,
        &path.display().to_string(),
        &opts,
        &ex.name,
        memc::train::Exec::Kernels,
    )
    .unwrap()
}

/// The zoo's kernels beyond the examples' (Gemma 2's soft-capped, sliding-window attention and
/// GeGLU, Mistral's window, Gemma's MQA, GPT-NeoX's parallel layers, OPT's ReLU) assemble for
/// sm_90a too.
#[test]
fn zoo_attention_variants_assemble_for_sm_90a() {
    let libdevice = find_libdevice().unwrap();
    for name in [
        "gemma2-eager-torchscript",
        "mistral-eager-torchscript",
        "gemma-sdpa-dynamo",
        "gptneox-eager-dynamo",
        "opt-eager-torchscript",
    ] {
        let path = memc_tests::root().join(format!("examples/zoo/{name}.onnx"));
        let mut g = memc_tests::canonical_model(&path, &[2, 16]);
        memc::train::build(&mut g, &train_args(adamw(), Some(1.0), AUTO))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let mut host = memc::train::host_program(&g, name, None).unwrap();
        host.compile_device(90, &libdevice)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let device = host.program.device.as_ref().unwrap();
        let report = ptxas(&device.ptx, "sm_90a").unwrap_or_else(|e| panic!("{name}: {e}"));
        let spills = report
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
            })
            .count();
        eprintln!(
            "{name:<28} {} PTX entries, {spills} kernels spill",
            device.ptx.matches(".entry ").count()
        );
        assert_eq!(spills, 0, "{name}: {report}");
    }
}

/// A pipelined step's device code (what `memc compile --pipeline-stages P --target all`
/// emits): one PTX module for every pass and optimizer program's kernels, which the cuda
/// backend loads once per GPU; each pass's kernels have launches in it, and it assembles for
/// sm_90a. Llama under V-Half and GPT-2 (tied head, gradient sums over chunks) under ZB-H1.
#[test]
fn pipelined_step_module_assembles_for_sm_90a() {
    use memc_passes::pipeline::{generate, ScheduleKind};
    use memc_runtime::program::Step;
    let libdevice = find_libdevice().unwrap();
    let a = train_args(adamw(), None, AUTO);
    for (model, schedule) in [("depth/llama-L4", "v-half"), ("gpt2-dynamo", "zb-h1")] {
        let path = memc_tests::root().join(format!("examples/models/{model}.onnx"));
        let g = memc_tests::canonical_model(&path, &[1, 16]);
        let kind = ScheduleKind::parse(schedule).unwrap();
        let (program, _) = memc::pipe::pipelined_program(g, &a, kind, 2).unwrap();
        let sched = generate(kind, 2, 4).unwrap();
        let (mut host, _) = memc::pipe::lower_pipeline(
            &program,
            &sched,
            &a,
            4,
            1,
            model,
            memc::pipe::PassTarget::Cpu,
        )
        .unwrap();
        host.compile_device(90, &libdevice)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let p = &host.program;
        let device = p.device.as_ref().unwrap();
        assert_eq!(device.launches.len(), p.kernels.len(), "{model}");
        let pl = p.pipeline.as_ref().unwrap();
        let mut used = 0;
        for sub in pl.passes.iter().chain(&pl.updates).chain(&pl.late) {
            let prog = sub.resolve(p).unwrap();
            for step in &prog.steps {
                if let Step::Kernel { kernel, args, .. } = step {
                    let launches = &device.launches[*kernel as usize];
                    assert!(
                        !launches.is_empty(),
                        "{model} {}: kernel {kernel}",
                        sub.label
                    );
                    // Every launch argument is one of the step's buffers or the index flag.
                    assert!(launches
                        .iter()
                        .all(|l| l.args.iter().all(|&i| i as usize <= args.len())));
                    used += 1;
                }
            }
        }
        assert!(used > 0, "{model}");
        let report = ptxas(&device.ptx, "sm_90a").unwrap_or_else(|e| panic!("{model}: {e}"));
        let entries = device.ptx.matches(".entry ").count();
        eprintln!(
            "{model} {schedule}: {} pass programs, {} kernels, {entries} PTX entries, {} ptxas lines",
            pl.passes.len() + pl.updates.len(),
            p.kernels.len(),
            report.lines().count()
        );
    }
}
