//! Every pass from text: `tests/passes/<pass>/*.mir` cases, each with a header
//!
//! ```text
//! // RUN: memc opt %s --pass 'remat{policy=full}'
//! // ERROR: text the error must contain        (optional: the pipeline must fail)
//! ```
//!
//! run through the pass table and the pass manager (as `memc opt` runs them) and compared with
//! insta snapshots (`tests/tests/snapshots/passes__<pass>__<case>.snap`: the pipeline, each
//! pass's statistics line and the resulting text, which for analyses such as fusion and the
//! plan shows their results). Cases named `no_*` are near-misses: the pass must leave the graph
//! exactly as it was. Every pass of the table has cases, and a case's last pass is its
//! directory's pass. Bless new snapshots with `INSTA_UPDATE=always cargo test -p memc-tests
//! --test passes` and review them.

use std::path::{Path, PathBuf};

use memc_passes::manager::PassManager;
use memc_passes::table::{parse_pipeline, PASSES};

/// The pipeline of a case's `// RUN:` line(s) and its expected error, if any.
fn header(path: &Path, text: &str) -> (String, Option<String>) {
    let mut pipeline = vec![];
    let mut error = None;
    for line in text.lines().take_while(|l| l.starts_with("//")) {
        if let Some(run) = line.strip_prefix("// RUN:") {
            let mut rest = run.trim();
            while let Some(at) = rest.find("--pass") {
                rest = rest[at + "--pass".len()..].trim_start();
                rest = rest.strip_prefix('=').unwrap_or(rest);
                let (value, after) = match rest.strip_prefix('\'') {
                    Some(q) => {
                        let end = q.find('\'').expect("a closing quote");
                        (&q[..end], &q[end + 1..])
                    }
                    None => {
                        let end = rest.find(' ').unwrap_or(rest.len());
                        (&rest[..end], &rest[end..])
                    }
                };
                pipeline.push(value.to_string());
                rest = after;
            }
        } else if let Some(e) = line.strip_prefix("// ERROR:") {
            error = Some(e.trim().to_string());
        }
    }
    assert!(
        !pipeline.is_empty(),
        "{}: no `// RUN: memc opt %s --pass ...` line",
        path.display()
    );
    (pipeline.join(","), error)
}

fn cases() -> Vec<(String, PathBuf)> {
    let root = memc_tests::root().join("tests/passes");
    let mut out = vec![];
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        let pass = dir.file_name().unwrap().to_string_lossy().to_string();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "mir") {
                out.push((pass.clone(), f));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_pass_has_text_cases() {
    let cases = cases();
    for p in PASSES {
        assert!(
            cases.iter().any(|(pass, _)| pass == p.name),
            "pass `{}` has no case under tests/passes/{}/",
            p.name,
            p.name
        );
    }
    for (pass, path) in &cases {
        assert!(
            PASSES.iter().any(|p| p.name == pass),
            "{}: `{pass}` is not a pass of the table",
            path.display()
        );
    }
}

#[test]
fn text_cases() {
    let mut failures = vec![];
    for (pass, path) in cases() {
        let case = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let (pipeline, error) = header(&path, &text);
        let specs = parse_pipeline(&pipeline).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            specs.last().map(|s| s.decl.name),
            Some(pass.as_str()),
            "{}: the last pass of the RUN line is not the directory's pass",
            path.display()
        );
        let mut g = memc_ir::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        memc_ir::verify(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let before = memc_ir::print(&g);
        let mut pm = PassManager::new();
        let result = pm.run_pipeline(&mut g, &specs);
        let mut out = format!("// RUN: memc opt %s --pass '{pipeline}'\n");
        match (result, &error) {
            (Ok(last), None) => {
                for r in &pm.records {
                    out += &format!("// {}: {}\n", r.name, r.summary);
                }
                let after = memc_ir::print(&g);
                if case.starts_with("no_") && after != before {
                    failures.push(format!("{pass}/{case}: a near-miss was rewritten"));
                }
                // The result is text that parses back to the same graph.
                let rendered = last.and_then(|s| s.render(&g)).unwrap_or(after.clone());
                let back = memc_ir::parse(&rendered).unwrap();
                assert_eq!(memc_ir::print(&back), after, "{pass}/{case}");
                out += &rendered;
            }
            (Err(e), Some(want)) => {
                let msg = e.to_string();
                if !msg.contains(want.as_str()) {
                    failures.push(format!("{pass}/{case}: error `{msg}` lacks `{want}`"));
                }
                out += &format!("// error: {msg}\n");
            }
            (Err(e), None) => {
                failures.push(format!("{pass}/{case}: {e}"));
                continue;
            }
            (Ok(_), Some(want)) => {
                failures.push(format!(
                    "{pass}/{case}: passed, expected an error with `{want}`"
                ));
                continue;
            }
        }
        insta::assert_snapshot!(format!("{pass}__{case}"), out);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
