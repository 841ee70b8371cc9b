//! `memc plan` end to end on the example Llama: the plan fits its budget exactly (the arena
//! `memc compile --plan` builds is the one planned), it is the fastest predicted configuration
//! that fits, an impossible budget is one error line naming the smallest memory reached and
//! its levers, and `--plan FILE` refuses what would contradict it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("examples/models/llama-dynamo.onnx")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs memc with the cost model's cache in `cache`.
fn memc(cache: &Path, args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_memc"))
        .env("MEMC_COST_CACHE", cache)
        .args(args)
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn one_error(o: &Out, want: &[&str]) {
    assert_eq!(o.code, 2, "stderr: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for w in want {
        assert!(lines[0].contains(w), "`{w}` missing from: {}", lines[0]);
    }
}

/// `memc plan` of the example at 8 × 16 within `memory` (and `more` flags), writing `out`:
/// its output and the plan file.
fn plan(cache: &Path, out: &Path, memory: u64, more: &[&str]) -> (Out, serde_json::Value) {
    let m = model();
    let memory = memory.to_string();
    let mut args = vec![
        "plan",
        m.to_str().unwrap(),
        "--global-batch",
        "8x16",
        "--memory",
        &memory,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(more);
    let o = memc(cache, &args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let p = read_json(out);
    (o, p)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A configuration's flags.
fn flags(c: &serde_json::Value) -> Vec<&str> {
    c["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// Token ids of the plans' global batch (8 rows of 16 tokens) in `dir/ids.npy`.
fn write_ids(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("ids.npy");
    let ids: Vec<i64> = (0..8 * 16).map(|i| (i * 37 % 250) as i64).collect();
    memc::io::write_tensor(
        &data,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![8, 16], &ids),
    )
    .unwrap();
    data
}

fn arena(c: &serde_json::Value) -> u64 {
    c["arena_bytes"].as_u64().unwrap()
}

#[test]
fn the_plan_is_the_fastest_configuration_that_fits_and_compiles_to_its_arena() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("costs");
    let (o, all) = plan(&cache, &dir.path().join("all.json"), 1 << 40, &[]);
    assert!(
        o.stdout.contains("chosen:") && o.stdout.contains("Pareto front"),
        "{}",
        o.stdout
    );
    // The measurements were kept, and a second plan reads them (nothing measured again).
    assert!(std::fs::read_dir(&cache).unwrap().count() == 1);
    let candidates = all["candidates"].as_array().unwrap().clone();
    let accums: std::collections::BTreeSet<String> = candidates
        .iter()
        .map(|c| {
            let f = flags(c);
            f.iter()
                .position(|&x| x == "--grad-accum")
                .map_or("1".to_string(), |i| f[i + 1].to_string())
        })
        .collect();
    assert_eq!(
        accums.len(),
        4,
        "grad-accum 1, 2, 4, 8 searched: {accums:?}"
    );
    let mut arenas: Vec<u64> = candidates.iter().map(arena).collect();
    arenas.sort();
    // A budget between the smallest and largest arenas: the plan fits it, and no configuration
    // that fits is predicted faster.
    let memory = arenas[arenas.len() / 3];
    let file = dir.path().join("plan.json");
    let (o, p) = plan(&cache, &file, memory, &[]);
    assert!(
        o.stdout
            .contains("measured 0 GEMM shapes, 0 attention parts and the kernels of 0 programs"),
        "{}",
        o.stdout
    );
    let chosen = &p["chosen"];
    assert!(arena(chosen) <= memory);
    let fastest = p["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| arena(c) <= memory)
        .map(|c| c["predicted_step_ms"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(chosen["predicted_step_ms"].as_f64().unwrap(), fastest);
    // What memc compile builds from the plan is the planned arena, byte for byte.
    let report = dir.path().join("r.json");
    let m = model();
    let o = memc(
        &cache,
        &[
            "compile",
            m.to_str().unwrap(),
            "--plan",
            file.to_str().unwrap(),
            "--report-json",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = read_json(&report);
    assert_eq!(
        r["cpu_backend"]["arena_bytes"].as_u64().unwrap(),
        arena(chosen)
    );
    // memc train runs the plan: a step of the global batch.
    let data = write_ids(dir.path());
    let o = memc(
        &cache,
        &[
            "train",
            m.to_str().unwrap(),
            "--plan",
            file.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--backend",
            "cpu",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.lines().filter(|l| l.contains("\"loss\"")).count(),
        1,
        "{}",
        o.stdout
    );
    // Flags the plan sets are refused beside it; so is another model.
    one_error(
        &memc(
            &cache,
            &[
                "compile",
                m.to_str().unwrap(),
                "--plan",
                file.to_str().unwrap(),
                "--optimizer",
                "sgd",
            ],
        ),
        &["sets --optimizer"],
    );
    one_error(
        &memc(
            &cache,
            &[
                "compile",
                m.to_str().unwrap(),
                "--plan",
                file.to_str().unwrap(),
                "--shape",
                "input_ids=2x16",
            ],
        ),
        &["--shape"],
    );
    let gpt2 = m.with_file_name("gpt2-dynamo.onnx");
    one_error(
        &memc(
            &cache,
            &[
                "compile",
                gpt2.to_str().unwrap(),
                "--plan",
                file.to_str().unwrap(),
            ],
        ),
        &["was made for"],
    );
    // An impossible budget: the smallest arena any configuration reaches, and its levers.
    let o = memc(
        &cache,
        &[
            "plan",
            m.to_str().unwrap(),
            "--global-batch",
            "8x16",
            "--memory",
            &(arenas[0] - 1).to_string(),
            "-o",
            dir.path().join("x.json").to_str().unwrap(),
        ],
    );
    let grouped = |n: u64| {
        let s = n.to_string();
        s.chars()
            .enumerate()
            .flat_map(|(i, c)| {
                ((i > 0 && (s.len() - i).is_multiple_of(3)).then_some(','))
                    .into_iter()
                    .chain([c])
            })
            .collect::<String>()
    };
    one_error(
        &o,
        &[
            "no configuration fits",
            &grouped(arenas[0]),
            "--grad-accum 8",
        ],
    );
    // Levers memc plan chooses itself are refused.
    one_error(
        &memc(
            &cache,
            &[
                "plan",
                m.to_str().unwrap(),
                "--global-batch",
                "8x16",
                "--memory",
                "1GB",
                "--remat",
                "full",
            ],
        ),
        &["memc plan chooses --remat"],
    );
}

/// `--devices 2`: one process, and pipelines of 2 stages and 2 replicas, are searched; under
/// a budget no single process fits, a pipeline is chosen, every rank of it fits, and the
/// executable `memc compile --plan` writes allocates exactly the planned bytes on its largest
/// rank and trains under mpirun.
#[test]
fn two_devices_plan_a_pipelined_step_whose_ranks_fit() {
    if std::process::Command::new("mpirun")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no mpirun (scripts/setup.sh installs Open MPI)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("costs");
    let m = model();
    let file = dir.path().join("plan.json");
    let (_, p) = plan(&cache, &file, 1 << 30, &["--devices", "2"]);
    let cands = p["candidates"].as_array().unwrap();
    let processes = |c: &serde_json::Value| c["processes"].as_u64().unwrap();
    let shapes: std::collections::BTreeSet<String> = cands
        .iter()
        .filter(|c| processes(c) == 2)
        .map(|c| {
            let f = flags(c);
            format!("{}x{}", f[1], f[3])
        })
        .collect();
    assert_eq!(
        shapes.into_iter().collect::<Vec<_>>(),
        ["1x2", "2x1"],
        "stages x replicas searched"
    );
    let smallest = |n: u64| {
        cands
            .iter()
            .filter(|c| processes(c) == n)
            .map(arena)
            .min()
            .unwrap()
    };
    let (one, two) = (smallest(1), smallest(2));
    assert!(
        two < one,
        "a pipeline's ranks each hold less than one process: {two} vs {one}"
    );
    // Each layout's processes share the cores (at most the runtime's 4 threads each).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    for c in cands {
        let n = processes(c);
        assert_eq!(c["threads"], (cores / n).clamp(1, 4), "{c}");
    }
    let (_, p) = plan(&cache, &file, one - 1, &["--devices", "2"]);
    assert_eq!(p["processes"], 2, "no single process fits: {}", p["chosen"]);
    let chosen = &p["chosen"];
    let out = dir.path().join("exe");
    let report = dir.path().join("r.json");
    let o = memc(
        &cache,
        &[
            "compile",
            m.to_str().unwrap(),
            "--plan",
            file.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--report-json",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = read_json(&report);
    let most = r["pipeline"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| !x["stage"].is_null())
        .map(|x| x["total_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        most,
        arena(chosen),
        "the largest rank allocates what was planned"
    );
    let data = write_ids(dir.path());
    let run = std::process::Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "2"])
        .arg(&out)
        .args([
            "train",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("\"loss\""));
}
