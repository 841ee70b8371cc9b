//! The pass manager: one table declares every pass once (`crate::table::PASSES`: name,
//! one-line summary, typed options, entry point; built from this module's types), and
//! [`PassManager`] runs passes with the verifier after each,
//! optional timing and per-pass IR dumps. `memc opt` runs pipelines of the table's passes
//! written in MLIR's syntax (`canonicalize,remat{policy=full}`); the training build
//! ([`crate::train::build_training`]) is a list of the same passes.
//!
//! A pass entry parses its options ([`Options`], checked against the declaration) and calls the
//! pass's typed function; its statistics come back as a [`PassStats`], which prints one line
//! and can render the pass's results as text (fused kernels as notes in the IR, the memory
//! plan as a table), so every pass is testable from text in, text out.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Instant;

use memc_ir::Graph;

/// Why a pass or a pipeline could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PassError {
    /// No pass has this name.
    #[error("unknown pass `{name}` (available: {available})")]
    UnknownPass {
        /// The name asked for.
        name: String,
        /// The table's names, comma-separated.
        available: String,
    },
    /// The pipeline text is malformed.
    #[error("pass pipeline `{text}`: {msg}")]
    Syntax {
        /// The pipeline text.
        text: String,
        /// What is wrong.
        msg: String,
    },
    /// A pass was given an option it does not declare.
    #[error("pass `{pass}` has no option `{key}` (options: {known})")]
    UnknownOption {
        /// The pass.
        pass: String,
        /// The option asked for.
        key: String,
        /// The declared options, comma-separated.
        known: String,
    },
    /// An option's value does not parse as its declared kind.
    #[error("pass `{pass}`: option `{key}={value}`: expected {expected}")]
    BadValue {
        /// The pass.
        pass: String,
        /// The option.
        key: String,
        /// The value given.
        value: String,
        /// What the option takes.
        expected: String,
    },
    /// The pass failed on this graph.
    #[error("{pass}: {msg}")]
    Failed {
        /// The pass.
        pass: String,
        /// Its error.
        msg: String,
    },
    /// The graph after the pass does not verify (a bug in the pass).
    #[error("after pass `{pass}` the graph is invalid (a memc bug, please report it): {msg}")]
    Invalid {
        /// The pass.
        pass: String,
        /// The verifier's errors.
        msg: String,
    },
    /// An IR dump could not be written.
    #[error("cannot write {path}: {msg}")]
    Io {
        /// The file.
        path: String,
        /// The system's error.
        msg: String,
    },
}

impl PassError {
    /// A pass's own failure.
    pub fn failed(pass: &str, msg: impl ToString) -> PassError {
        PassError::Failed {
            pass: pass.to_string(),
            msg: msg.to_string(),
        }
    }
}

/// What a pass reports: one summary line and, for passes whose result is not a rewrite
/// (fusion, planning, partitioning), the result as text.
pub trait PassStats: Debug + Any {
    /// One line (`3 blocks lowered`); empty when there is nothing to say.
    fn summary(&self) -> String {
        String::new()
    }
    /// The graph printed with the pass's results (notes on nodes, tables as `//` comments),
    /// when plain IR does not show them; it must parse back to the graph.
    fn render(&self, _g: &Graph) -> Option<String> {
        None
    }
    /// For callers that want the typed statistics back ([`downcast`]).
    fn as_any(&self) -> &dyn Any;
}

/// The typed statistics of a pass run through the table.
pub fn downcast<T: 'static>(stats: &dyn PassStats) -> Option<&T> {
    stats.as_any().downcast_ref::<T>()
}

/// Implements [`PassStats::as_any`] (and the rest of the trait from the given bodies).
#[macro_export]
macro_rules! pass_stats {
    ($t:ty $(, $($body:tt)*)?) => {
        impl $crate::manager::PassStats for $t {
            fn as_any(&self) -> &dyn ::std::any::Any {
                self
            }
            $($($body)*)?
        }
    };
}

/// Statistics of passes that report only a line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Line(pub String);

pass_stats! {
    Line,
    fn summary(&self) -> String {
        self.0.clone()
    }
}

/// What an option takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// `true` or `false` (a bare key means `true`).
    Bool,
    /// A non-negative integer.
    Count,
    /// A finite number.
    Number,
    /// Any text (lists are comma-separated).
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
}

impl OptKind {
    /// What the option takes, in words (`--list-passes`, errors).
    pub fn describe(self) -> String {
        match self {
            OptKind::Bool => "true or false".into(),
            OptKind::Count => "a non-negative integer".into(),
            OptKind::Number => "a finite number".into(),
            OptKind::Text => "text".into(),
            OptKind::Choice(c) => format!("one of {}", c.join(", ")),
        }
    }

    /// Whether `v` is a value of this kind.
    pub fn check(self, v: &str) -> bool {
        match self {
            OptKind::Bool => matches!(v, "true" | "false"),
            OptKind::Count => v.parse::<usize>().is_ok(),
            OptKind::Number => v.parse::<f64>().is_ok_and(f64::is_finite),
            OptKind::Text => true,
            OptKind::Choice(c) => c.contains(&v),
        }
    }
}

/// One declared option of a pass.
#[derive(Debug, Clone, Copy)]
pub struct OptionDecl {
    /// Its key (`policy`).
    pub key: &'static str,
    /// What it takes.
    pub kind: OptKind,
    /// Its default, if it has one (printed by `--list-passes`).
    pub default: Option<&'static str>,
    /// One line of documentation.
    pub doc: &'static str,
}

/// A pass's entry point: the graph and its parsed options.
pub type PassFn = fn(&mut Graph, &Options) -> Result<Box<dyn PassStats>, PassError>;

/// One pass of the table.
pub struct PassDecl {
    /// Its name (`lower-blocks`).
    pub name: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Its options.
    pub options: &'static [OptionDecl],
    /// The entry point.
    pub run: PassFn,
}

impl Debug for PassDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// A pass's options as given (`key=value`), checked against its declaration; typed getters
/// fall back to the declared defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pass: &'static str,
    decls: &'static [OptionDecl],
    values: BTreeMap<&'static str, String>,
}

impl Options {
    /// No options given (every option at its default).
    pub fn none(decl: &'static PassDecl) -> Options {
        Options {
            pass: decl.name,
            decls: decl.options,
            values: BTreeMap::new(),
        }
    }

    /// Sets `key` to `value`, checking both against the declaration.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), PassError> {
        let decl =
            self.decls
                .iter()
                .find(|d| d.key == key)
                .ok_or_else(|| PassError::UnknownOption {
                    pass: self.pass.into(),
                    key: key.into(),
                    known: if self.decls.is_empty() {
                        "none".into()
                    } else {
                        self.decls
                            .iter()
                            .map(|d| d.key)
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                })?;
        if !decl.kind.check(value) {
            return Err(self.bad(key, value, decl.kind.describe()));
        }
        self.values.insert(decl.key, value.to_string());
        Ok(())
    }

    /// The error for a value that does not fit its option.
    pub fn bad(&self, key: &str, value: &str, expected: impl Into<String>) -> PassError {
        PassError::BadValue {
            pass: self.pass.into(),
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    /// The value given, else the default.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str).or_else(|| {
            self.decls
                .iter()
                .find(|d| d.key == key)
                .and_then(|d| d.default)
        })
    }

    /// A boolean option (absent and no default: false).
    pub fn flag(&self, key: &str) -> bool {
        self.text(key) == Some("true")
    }

    /// A count option.
    pub fn count(&self, key: &str) -> Option<usize> {
        self.text(key).and_then(|t| t.parse().ok())
    }

    /// A number option.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.text(key).and_then(|t| t.parse().ok())
    }

    /// The pass and the options given, in MLIR's syntax (`remat{policy=full}`).
    pub fn display(&self) -> String {
        if self.values.is_empty() {
            return self.pass.to_string();
        }
        let kv: Vec<String> = self
            .values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}{{{}}}", self.pass, kv.join(" "))
    }
}

/// A pass of a pipeline with its options.
#[derive(Debug, Clone)]
pub struct PassSpec {
    /// The table's entry.
    pub decl: &'static PassDecl,
    /// Its options.
    pub options: Options,
}

/// One pass as it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct PassRecord {
    /// The pass and its options (`remat{policy=full}`).
    pub name: String,
    /// Wall time in milliseconds.
    pub ms: f64,
    /// Graph nodes before and after.
    pub nodes: (usize, usize),
    /// The pass's summary line.
    pub summary: String,
}

/// Runs passes: verifies the graph after each, and optionally times them (to stderr) and
/// writes the IR after each into a directory (`NN-name.mir`, numbered in running order).
#[derive(Debug, Default)]
pub struct PassManager {
    dump: Option<PathBuf>,
    time: bool,
    /// Every pass run so far.
    pub records: Vec<PassRecord>,
    dumped: usize,
}

impl PassManager {
    /// A manager that only verifies.
    pub fn new() -> PassManager {
        PassManager::default()
    }

    /// Also writes the IR after every pass into `dir` (created if missing).
    pub fn dump_to(mut self, dir: Option<PathBuf>) -> PassManager {
        self.dump = dir;
        self
    }

    /// Also prints each pass's wall time and summary to stderr.
    pub fn timed(mut self, on: bool) -> PassManager {
        self.time = on;
        self
    }

    /// Writes `g` as the next numbered dump, `NN-label.mir` (nothing without a dump directory).
    pub fn dump(&mut self, g: &Graph, label: &str) -> Result<(), PassError> {
        let Some(dir) = &self.dump else {
            return Ok(());
        };
        let io = |p: &std::path::Path, e: std::io::Error| PassError::Io {
            path: p.display().to_string(),
            msg: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join(format!("{:02}-{label}.mir", self.dumped));
        std::fs::write(&path, memc_ir::print(g)).map_err(|e| io(&path, e))?;
        self.dumped += 1;
        Ok(())
    }

    /// Runs a pass given by its typed function `f` under the name `name` (an entry of
    /// `crate::table::PASSES`), `display` being its options as text: times it, verifies the
    /// result, dumps and records.
    pub fn run<T: PassStats, E: From<PassError>>(
        &mut self,
        g: &mut Graph,
        name: &'static str,
        display: String,
        f: impl FnOnce(&mut Graph) -> Result<T, E>,
    ) -> Result<T, E> {
        let before = g.nodes().len();
        let t0 = Instant::now();
        let stats = f(g)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = memc_ir::verify(g) {
            return Err(PassError::Invalid {
                pass: display,
                msg: e.to_string(),
            }
            .into());
        }
        let summary = stats.summary();
        if self.time {
            eprintln!("time: {display:<24} {ms:>10.1} ms  {summary}");
        }
        self.dump(g, name).map_err(E::from)?;
        self.records.push(PassRecord {
            name: display,
            ms,
            nodes: (before, g.nodes().len()),
            summary,
        });
        Ok(stats)
    }

    /// Runs a pass of the table with its options.
    pub fn run_spec(
        &mut self,
        g: &mut Graph,
        spec: &PassSpec,
    ) -> Result<Box<dyn PassStats>, PassError> {
        let run = spec.decl.run;
        self.run::<_, PassError>(g, spec.decl.name, spec.options.display(), |g| {
            run(g, &spec.options)
        })
    }

    /// Runs a pipeline; returns the last pass's statistics.
    pub fn run_pipeline(
        &mut self,
        g: &mut Graph,
        specs: &[PassSpec],
    ) -> Result<Option<Box<dyn PassStats>>, PassError> {
        let mut last = None;
        for s in specs {
            last = Some(self.run_spec(g, s)?);
        }
        Ok(last)
    }
}

impl PassStats for Box<dyn PassStats> {
    fn summary(&self) -> String {
        (**self).summary()
    }
    fn render(&self, g: &Graph) -> Option<String> {
        (**self).render(g)
    }
    fn as_any(&self) -> &dyn Any {
        (**self).as_any()
    }
}
