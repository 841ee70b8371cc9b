//! Running memc and emitted executables as a user does: the binaries' directory, a scratch
//! directory per test run, and commands that must succeed or fail with one clear error line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>/`, where cargo puts `memc` and `libmemc_runtime.a`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// `$TMP/memc-exe-PID/NAME`, created. The first call removes the directories of earlier runs
/// whose process is gone (each run leaves about 170 MB of executables).
pub fn scratch(name: &str) -> PathBuf {
    static CLEAN: std::sync::Once = std::sync::Once::new();
    CLEAN.call_once(|| {
        // Without /proc there is no telling a finished run from a running one.
        let (Ok(entries), true) = (
            std::fs::read_dir(std::env::temp_dir()),
            Path::new("/proc/self").exists(),
        ) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(pid) = file.to_str().and_then(|n| n.strip_prefix("memc-exe-")) else {
                continue;
            };
            let alive = Path::new("/proc").join(pid).exists();
            if pid.parse::<u32>().is_ok() && !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = std::env::temp_dir()
        .join(format!("memc-exe-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    out
}

pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, expecting failure with exit code 2 and one `error:` line mentioning `needle`.
pub fn fails(cmd: &mut Command, needle: &str) {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{cmd:?}: one line expected:\n{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{cmd:?}: expected `{needle}` in:\n{stderr}"
    );
}

/// `memc compile MODEL --shape input_ids=2x16 EXTRA... -o OUT`, which must succeed: an example
/// model's executable.
pub fn compile_exe(model: &Path, out: &Path, extra: &[&str]) {
    ok(Command::new(bin_dir().join("memc"))
        .arg("compile")
        .arg(model)
        .args(["--shape", "input_ids=2x16"])
        .args(extra)
        .arg("-o")
        .arg(out));
}
