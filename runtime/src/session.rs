//! Running a program: the training loop (one JSON line per step, checkpoints), inference
//! (`.npy` in, `.npy` out), and the command line of emitted executables
//! (`OUT train|infer|info`, the CLI documented in README.md), entered through [`memc_rt_main`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cpu::{Cpu, KernelFn};
use crate::finite;
use crate::npy::{self, NpyArray, NpyDtype};
use crate::program::{Dtype, Program, Role, Slot};
use crate::schedule::{LrKind, LrSchedule, RowOrder};
use crate::weights;
use crate::Backend;
use crate::RunError;

/// Training data: an integer `[rows, seq]` array, served `batch` rows at a time, cycling
/// through the rows in file order or, with [`Batches::shuffle`], in a fresh permutation each
/// pass ([`RowOrder`]).
pub struct Batches {
    rows: usize,
    seq: usize,
    ids: Vec<i64>,
    /// Rows read so far (the position in the stream of passes over the data).
    next: u64,
    order: RowOrder,
    /// Per-position labels (`--labels`), of the ids' shape.
    labels: Option<Vec<i64>>,
    /// Per-position attention mask (`--attention-mask`: 1 attended, 0 padding).
    mask: Option<Vec<i64>>,
}

/// One step's rows: the token ids and, when the data has them, their labels and mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// Token ids, `[rows, seq]` row-major.
    pub ids: Vec<i64>,
    /// Labels of the same positions.
    pub labels: Option<Vec<i64>>,
    /// Attention mask of the same positions.
    pub mask: Option<Vec<i64>>,
}

impl Batches {
    /// Reads and checks a `.npy` file of token ids (int64 or int32).
    pub fn open(path: &Path) -> Result<Batches, RunError> {
        let a = npy::read(path)?;
        let ids: Vec<i64> = match a.dtype {
            NpyDtype::I64 => a
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            NpyDtype::I32 => a
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            _ => vec![],
        };
        if !matches!(a.dtype, NpyDtype::I64 | NpyDtype::I32)
            || a.shape.len() != 2
            || a.shape[0] == 0
        {
            let dims: Vec<String> = a.shape.iter().map(|d| d.to_string()).collect();
            return Err(RunError::Data {
                path: path.display().to_string(),
                msg: format!(
                    "training data must be a non-empty integer array of shape [rows, seq] (token ids), got {}[{}]",
                    a.dtype.numpy_name(),
                    dims.join("x")
                ),
            });
        }
        Ok(Batches {
            rows: a.shape[0],
            seq: a.shape[1],
            ids,
            next: 0,
            order: RowOrder::new(a.shape[0], None),
            labels: None,
            mask: None,
        })
    }

    /// Reads an integer array of the data's shape, for `flag`; `valid` checks each value.
    fn companion(
        &self,
        path: &Path,
        flag: &str,
        valid: impl Fn(i64) -> bool,
        what: &str,
    ) -> Result<Vec<i64>, RunError> {
        let a = npy::read(path)?;
        let bad = |msg: String| RunError::Data {
            path: path.display().to_string(),
            msg,
        };
        let values: Vec<i64> = match a.dtype {
            NpyDtype::I64 => a
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            NpyDtype::I32 => a
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            NpyDtype::Bool => a.data.iter().map(|&b| b as i64).collect(),
            d => {
                return Err(bad(format!(
                    "{flag}: expected an integer array, got {}",
                    d.numpy_name()
                )))
            }
        };
        if a.shape != [self.rows, self.seq] {
            return Err(bad(format!(
                "{flag}: the array is {:?}, the data [{}, {}]: one value per token",
                a.shape, self.rows, self.seq
            )));
        }
        if let Some(k) = values.iter().position(|&v| !valid(v)) {
            return Err(bad(format!(
                "{flag}: {} at row {}, column {} is not {what}",
                values[k],
                k / self.seq,
                k % self.seq
            )));
        }
        Ok(values)
    }

    /// Attaches per-position labels (`--labels FILE.npy`: the data's shape; each a token id
    /// in `0..vocab` or −100, left out of the loss).
    pub fn attach_labels(&mut self, path: &Path, vocab: Option<u64>) -> Result<(), RunError> {
        let what = match vocab {
            Some(v) => format!("a token id in 0..{v} or -100"),
            None => "a token id or -100".into(),
        };
        let ok = |v: i64| v == -100 || (v >= 0 && vocab.is_none_or(|n| (v as u64) < n));
        self.labels = Some(self.companion(path, "--labels", ok, &what)?);
        Ok(())
    }

    /// Attaches a per-position attention mask (`--attention-mask FILE.npy`: the data's shape,
    /// 1 for tokens, 0 for padding).
    pub fn attach_mask(&mut self, path: &Path) -> Result<(), RunError> {
        self.mask =
            Some(self.companion(path, "--attention-mask", |v| v == 0 || v == 1, "0 or 1")?);
        Ok(())
    }

    /// Reads each pass over the rows in a permutation drawn from `seed` and the pass.
    pub fn shuffle(&mut self, seed: u64) {
        self.order = RowOrder::new(self.rows, Some(seed));
    }

    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.seq)
    }

    /// Checks every token id lies in `0..vocab` (kernels clamp indices; the data must not rely
    /// on that).
    pub fn check_vocab(&self, vocab: usize, path: &str) -> Result<(), RunError> {
        match self
            .ids
            .iter()
            .position(|&t| t < 0 || t as u64 >= vocab as u64)
        {
            Some(k) => Err(RunError::Data {
                path: path.to_string(),
                msg: format!(
                    "token id {} at row {}, column {} is outside the model's vocabulary (0..{vocab})",
                    self.ids[k],
                    k / self.seq,
                    k % self.seq
                ),
            }),
            None => Ok(()),
        }
    }

    /// Skips `rows` rows (resuming a run where it stopped).
    pub fn skip(&mut self, rows: u64) {
        self.next += rows;
    }

    /// The next `batch` rows (wrapping around the file into its next pass).
    pub fn next_batch(&mut self, batch: usize) -> Vec<i64> {
        self.next_rows(batch).ids
    }

    /// Rows `first..first + n` in file order, with their labels and mask when attached.
    pub fn rows_at(&self, first: usize, n: usize) -> Rows {
        let at = first * self.seq..(first + n) * self.seq;
        Rows {
            ids: self.ids[at.clone()].to_vec(),
            labels: self.labels.as_ref().map(|l| l[at.clone()].to_vec()),
            mask: self.mask.as_ref().map(|m| m[at].to_vec()),
        }
    }

    /// The next `batch` rows with their labels and mask, when attached.
    pub fn next_rows(&mut self, batch: usize) -> Rows {
        let seq = self.seq;
        let mut out = Rows {
            ids: Vec::with_capacity(batch * seq),
            labels: self
                .labels
                .as_ref()
                .map(|_| Vec::with_capacity(batch * seq)),
            mask: self.mask.as_ref().map(|_| Vec::with_capacity(batch * seq)),
        };
        for _ in 0..batch {
            let r = self.order.row(self.next);
            let at = r * seq..(r + 1) * seq;
            out.ids.extend_from_slice(&self.ids[at.clone()]);
            if let (Some(o), Some(l)) = (out.labels.as_mut(), &self.labels) {
                o.extend_from_slice(&l[at.clone()]);
            }
            if let (Some(o), Some(m)) = (out.mask.as_mut(), &self.mask) {
                o.extend_from_slice(&m[at]);
            }
            self.next += 1;
        }
        out
    }
}

pub use crate::program::{decode, encode};

/// How a run goes through its steps and data, beyond one step's settings: its length in
/// epochs, the learning-rate schedule, the data order, periodic checkpoints and progress.
/// `memc train` and executables' `OUT train` take the same flags for these.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Train for this many passes over the data (`--epochs`) instead of `--steps`: the run's
    /// length is `ceil(epochs × rows / rows per step)` steps in all, and a resumed run goes
    /// on to that end.
    pub epochs: Option<u64>,
    /// The learning-rate schedule (`--lr-schedule`).
    pub lr_schedule: LrKind,
    /// Its warmup steps (`--warmup-steps`).
    pub warmup: u64,
    /// Shuffle the rows each epoch with this seed (`--shuffle --seed S`).
    pub shuffle_seed: Option<u64>,
    /// Write a checkpoint every N steps, and at the last, as `SAVE/checkpoint-STEP`
    /// (`--save-every`; needs `--save`).
    pub save_every: Option<u64>,
    /// Keep only the newest K periodic checkpoints (`--keep-last`).
    pub keep_last: Option<usize>,
    /// Draw a progress bar on stderr (a terminal's; the caller decides).
    pub progress: bool,
    /// Per-position labels (`--labels FILE.npy`; −100 left out of the loss), for a program
    /// with transformers' causal-LM loss (`--loss causal-lm`).
    pub labels: Option<PathBuf>,
    /// Per-position attention mask (`--attention-mask FILE.npy`): fed to the model's
    /// `attention_mask` input when it has one; masked positions are left out of the loss.
    pub attention_mask: Option<PathBuf>,
    /// The padding token (`--pad-id P`): positions holding it are masked (and left out of
    /// the loss), as `--attention-mask` with `ids != P`.
    pub pad_id: Option<i64>,
    /// Validation data (`--val-data FILE.npy`): its loss, by the program's evaluation step.
    pub val_data: Option<PathBuf>,
    /// Its labels (`--val-labels FILE.npy`).
    pub val_labels: Option<PathBuf>,
    /// Evaluate every N steps (`--eval-every N`; and after the last step).
    pub eval_every: Option<u64>,
}

impl RunOptions {
    /// The options from their flags' values (`--lr-schedule`, `--warmup-steps`, `--shuffle`,
    /// `--seed`, `--epochs`, `--save-every`, `--keep-last`), checked together; both command
    /// lines read them with this. The progress bar is drawn when stderr is a terminal and
    /// `report` (the rank that reports) holds.
    #[allow(clippy::too_many_arguments)]
    pub fn from_flags(
        lr_schedule: Option<&str>,
        warmup: Option<u64>,
        shuffle: bool,
        seed: Option<u64>,
        epochs: Option<u64>,
        save_every: Option<u64>,
        keep_last: Option<usize>,
        report: bool,
    ) -> Result<RunOptions, RunError> {
        if seed.is_some() && !shuffle {
            return Err(RunError::Usage(
                "--seed S draws the order of shuffled rows: pass --shuffle too".into(),
            ));
        }
        use std::io::IsTerminal;
        Ok(RunOptions {
            epochs,
            lr_schedule: lr_schedule
                .map(LrKind::parse)
                .transpose()
                .map_err(RunError::Usage)?
                .unwrap_or(LrKind::Constant),
            warmup: warmup.unwrap_or(0),
            // transformers' default seed.
            shuffle_seed: shuffle.then_some(seed.unwrap_or(42)),
            save_every,
            keep_last,
            progress: report && std::io::stderr().is_terminal(),
            labels: None,
            attention_mask: None,
            pad_id: None,
            val_data: None,
            val_labels: None,
            eval_every: None,
        })
    }
}

impl RunOptions {
    /// These options with validation: data, labels, how often.
    pub fn with_validation(
        mut self,
        data: Option<PathBuf>,
        labels: Option<PathBuf>,
        every: Option<u64>,
    ) -> RunOptions {
        self.val_data = data;
        self.val_labels = labels;
        self.eval_every = every;
        self
    }

    /// These options with the per-position data: labels, attention mask, padding token.
    pub fn with_data(
        mut self,
        labels: Option<PathBuf>,
        attention_mask: Option<PathBuf>,
        pad_id: Option<i64>,
    ) -> RunOptions {
        self.labels = labels;
        self.attention_mask = attention_mask;
        self.pad_id = pad_id;
        self
    }
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            epochs: None,
            lr_schedule: LrKind::Constant,
            warmup: 0,
            shuffle_seed: None,
            save_every: None,
            keep_last: None,
            progress: false,
            labels: None,
            attention_mask: None,
            pad_id: None,
            val_data: None,
            val_labels: None,
            eval_every: None,
        }
    }
}

/// The model input that takes each batch's attention mask, when a mask is given.
pub const ATTENTION_MASK: &str = "attention_mask";

/// The label of a position left out of the loss (transformers' `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The attention mask of the positions `ids` (1 token, 0 padding): the given one, or the
/// positions not holding the padding token `pad`; `None` without either.
fn mask_of(ids: &[i64], given: Option<&[i64]>, pad: Option<i64>) -> Option<Vec<i64>> {
    match (given, pad) {
        (Some(m), _) => Some(m.to_vec()),
        (None, Some(p)) => Some(ids.iter().map(|&x| (x != p) as i64).collect()),
        (None, None) => None,
    }
}

/// The labels of the positions `ids` (the given ones, else the ids), −100 where `mask` is 0.
fn masked_labels(ids: &[i64], given: Option<&[i64]>, mask: Option<&[i64]>) -> Vec<i64> {
    let mut l = given.unwrap_or(ids).to_vec();
    if let Some(m) = mask {
        l.iter_mut()
            .zip(m)
            .filter(|(_, &m)| m == 0)
            .for_each(|(l, _)| *l = IGNORE_INDEX);
    }
    l
}

/// The positions in the loss of rows of `seq` labels: every label but each row's first (it is
/// nobody's target) that is not −100.
fn kept_positions(labels: &[i64], seq: usize) -> usize {
    labels
        .chunks(seq)
        .flat_map(|row| &row[1..])
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// Run-time settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Steps to run (more steps, for a resumed run; unused with `run.epochs`).
    pub steps: u64,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay (`None`: the program's default for its optimizer).
    pub weight_decay: Option<f64>,
    /// Steps already taken (a resumed run continues the count and the data).
    pub start_step: u64,
    /// Write a Hugging Face model directory here at the end (`weights::save_dir`).
    pub save: Option<PathBuf>,
    /// Also append every step's JSON line to this file.
    pub metrics: Option<PathBuf>,
    /// Epochs, schedule, data order, periodic checkpoints, progress.
    pub run: RunOptions,
    /// The checkpoint a resumed run starts from (what it loaded, and what it recorded of its
    /// run); the run says so on stderr once its flags are checked against it.
    pub resumed: Option<weights::Loaded>,
}

impl TrainConfig {
    /// Refuses settings no run can mean: no steps, a negative or non-finite learning rate or
    /// weight decay, a step count that would overflow.
    pub fn validate(&self) -> Result<(), RunError> {
        if self.steps == 0 {
            return Err(RunError::Usage("--steps must be at least 1".into()));
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(RunError::Usage(format!(
                "--lr must be a finite number ≥ 0, got {}",
                self.lr
            )));
        }
        if let Some(wd) = self.weight_decay {
            if !(wd >= 0.0 && wd.is_finite()) {
                return Err(RunError::Usage(format!(
                    "--weight-decay must be a finite number ≥ 0, got {wd}"
                )));
            }
        }
        if self.run.save_every == Some(0) {
            return Err(RunError::Usage("--save-every must be at least 1".into()));
        }
        if self.run.save_every.is_some() && self.save.is_none() {
            return Err(RunError::Usage(
                "--save-every N writes SAVE/checkpoint-STEP: pass --save DIR too".into(),
            ));
        }
        if self.run.keep_last.is_some() && self.run.save_every.is_none() {
            return Err(RunError::Usage(
                "--keep-last K keeps the newest periodic checkpoints: pass --save-every N too"
                    .into(),
            ));
        }
        if self.run.keep_last == Some(0) {
            return Err(RunError::Usage("--keep-last must be at least 1".into()));
        }
        if self.run.epochs == Some(0) {
            return Err(RunError::Usage("--epochs must be at least 1".into()));
        }
        if self
            .start_step
            .checked_add(self.steps)
            .is_none_or(|end| end > 1 << 53)
        {
            return Err(RunError::Usage(format!(
                "step {} + {} steps is past the largest step count memc keeps exactly (2^53)",
                self.start_step, self.steps
            )));
        }
        Ok(())
    }
}

/// Trains `program` on `cpu` (weights already loaded), printing one JSON line per step to
/// `out`; returns the losses. `fixed` gives the model's other inputs (name, `.npy` file; e.g.
/// an attention mask), held fixed across steps. Stops with an error when the loss stops
/// being finite.
pub fn train(
    program: &Program,
    cpu: &mut dyn Backend,
    data: &mut Batches,
    data_path: &str,
    fixed: &[(String, PathBuf)],
    cfg: &TrainConfig,
    out: &mut dyn Write,
) -> Result<Vec<f64>, RunError> {
    let t = program.training.as_ref().ok_or_else(|| {
        RunError::Usage(format!(
            "{} was compiled for inference (compile with --train to train it)",
            program.model
        ))
    })?;
    let ids = program.input(&t.data_input).expect("validated").clone();
    // Labels and masks: the program's labels input takes `--labels` (or the ids), with
    // masked positions set to −100; the model's `attention_mask` input, when a mask is given,
    // takes each batch's.
    let run = &cfg.run;
    let masked = run.attention_mask.is_some() || run.pad_id.is_some();
    if run.attention_mask.is_some() && run.pad_id.is_some() {
        return Err(RunError::Usage(
            "--attention-mask and --pad-id both give the mask: pass one".into(),
        ));
    }
    let labels_slot = t
        .labels_input
        .as_ref()
        .and_then(|n| program.input(n))
        .cloned();
    if labels_slot.is_none() && (run.labels.is_some() || masked) {
        return Err(RunError::Usage(format!(
            "{}: {} needs a program with labels: it was compiled with the next-token loss (every position a target); recompile with --loss causal-lm",
            program.model,
            if run.labels.is_some() {
                "--labels"
            } else if run.pad_id.is_some() {
                "--pad-id (padding left out of the loss)"
            } else {
                "--attention-mask (padding left out of the loss)"
            }
        )));
    }
    if let Some(p) = &run.labels {
        data.attach_labels(p, t.vocab)?;
    }
    if let Some(p) = &run.attention_mask {
        data.attach_mask(p)?;
    }
    let mask_slot = program.input(ATTENTION_MASK).filter(|_| masked).cloned();
    if let Some(m) = mask_slot.as_ref().filter(|m| m.shape != ids.shape) {
        return Err(RunError::Usage(format!(
            "{}: the model's `{ATTENTION_MASK}` is {}, the data `{}` {}: a per-token mask cannot feed it",
            program.model,
            m.type_string(),
            ids.name,
            ids.type_string()
        )));
    }
    let others: Vec<&Slot> = program
        .inputs
        .iter()
        .filter(|s| {
            s.name != t.data_input
                && Some(&s.name) != t.lr_input.as_ref()
                && Some(&s.name) != t.weight_decay_input.as_ref()
                && Some(&s.name) != t.step_input.as_ref()
                && Some(&s.name) != t.labels_input.as_ref()
                && t.accum
                    .as_ref()
                    .is_none_or(|a| s.name != a.scale_input && s.name != a.apply_input)
                && Some(&s.name) != mask_slot.as_ref().map(|m| &m.name)
        })
        .collect();
    for (name, _) in fixed {
        if !others.iter().any(|s| s.name == *name) {
            let names: Vec<&str> = others.iter().map(|s| s.name.as_str()).collect();
            return Err(RunError::Usage(format!(
                "--input {name}: not an input fed fixed values (those: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
    }
    for s in &others {
        let (_, path) = fixed.iter().find(|(n, _)| *n == s.name).ok_or_else(|| {
            RunError::Usage(format!(
                "{}: the program also takes input `{}` ({}): pass --input {}=FILE.npy (held fixed across steps)",
                program.model,
                s.name,
                s.type_string(),
                s.name
            ))
        })?;
        let bytes = read_input(s, path)?;
        check_indices(program, s, &bytes, &path.display().to_string())?;
        cpu.set(s, &bytes)?;
    }
    if ids.shape.len() != 2 {
        return Err(RunError::Usage(format!(
            "{}: the data input `{}` is {}, not [batch, seq]",
            program.model,
            ids.name,
            ids.type_string()
        )));
    }
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    // Data parallelism: each replica's program takes `batch` rows, its slice of a step's
    // `replicas × batch` (replica r of rank g is g / stages).
    let (replicas, replica) = match &program.pipeline {
        Some(p) if p.data_parallel > 1 => {
            let rank = crate::transport::RankEnv::from_env()
                .map_err(RunError::Usage)?
                .map_or(0, |e| e.rank);
            (p.data_parallel as usize, rank / p.stages.max(1) as usize)
        }
        _ => (1, 0),
    };
    // With gradient accumulation a step is several runs of the program's batch.
    let step_rows = batch
        * replicas
        * t.accum
            .as_ref()
            .map_or(1, |a| a.microbatches.max(1) as usize);
    if data.shape().1 != seq {
        return Err(RunError::Data {
            path: data_path.to_string(),
            msg: format!(
                "rows of {} tokens, but the program was compiled for {seq} (--shape {}={batch}x{})",
                data.shape().1,
                ids.name,
                data.shape().1
            ),
        });
    }
    if let Some(v) = t.vocab {
        data.check_vocab(v as usize, data_path)?;
    }
    cfg.validate()?;
    if let Some(dir) = &cfg.save {
        // Before any step: a run is not thrown away at its end for a bad --save.
        weights::check_dir_form(dir, "--save")?;
    }
    let (steps, total) = run_length(cfg, data.shape().0 as u64, step_rows as u64)?;
    if let Some(seed) = cfg.run.shuffle_seed {
        data.shuffle(seed);
    }
    data.skip(cfg.start_step * step_rows as u64);
    let schedule = LrSchedule {
        kind: cfg.run.lr_schedule,
        warmup: cfg.run.warmup,
        total,
    };
    let record = |step: u64| weights::RunState {
        step,
        rows_consumed: step * step_rows as u64,
        max_steps: Some(total),
        lr_schedule: Some((schedule.kind.name().to_string(), schedule.warmup)),
        shuffle_seed: cfg.run.shuffle_seed,
    };
    let first_rank = cpu.shards()?.is_none_or(|s| s.rank == 0);
    if let (Some(l), true) = (&cfg.resumed, first_rank) {
        eprintln!(
            "resumed from {}: {} tensors{}, step {}",
            l.dir.display(),
            l.tensors,
            if l.optimizer_state {
                " with optimizer state"
            } else {
                ""
            },
            cfg.start_step
        );
    }
    let loss = program.output(&t.loss_output).expect("validated").clone();
    let drifts: Vec<Slot> = t
        .drift_outputs
        .iter()
        .map(|n| program.output(n).expect("validated").clone())
        .collect();
    let wd = cfg.weight_decay.unwrap_or(t.default_weight_decay);
    // The scalars fed each step: the learning rate (the schedule's factor of `--lr`) and the
    // weight decay.
    let mut scalars: Vec<(Slot, f64)> = vec![];
    for (name, v, flag) in [
        (&t.lr_input, cfg.lr, "--lr"),
        (&t.weight_decay_input, wd, "--weight-decay"),
    ] {
        let Some(s) = name.as_ref().and_then(|n| program.input(n)) else {
            continue;
        };
        if !decode(s.dtype, &encode(s.dtype, &[v]))[0].is_finite() {
            return Err(RunError::Usage(format!(
                "{flag} {v:e} does not fit the program's {} scalar",
                s.dtype.name()
            )));
        }
        scalars.push((s.clone(), v));
    }
    for (s, _) in &scalars {
        cpu.set(s, &encode(s.dtype, &[0.0]))?;
    }
    let lr_slot = t.lr_input.clone();
    let mut val = Validation::open(program, cfg, fixed, seq)?;
    if val.is_some() && !cpu.can_evaluate() {
        return Err(RunError::Usage(format!(
            "--val-data: the {} backend cannot run the evaluation step yet (the cpu backend can)",
            cpu.name()
        )));
    }
    let step_slot = t
        .step_input
        .as_ref()
        .and_then(|n| program.input(n))
        .cloned();
    let mut metrics = match &cfg.metrics {
        // A resumed run adds its lines to the log.
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(cfg.start_step > 0)
                .truncate(cfg.start_step == 0)
                .open(p)
                .map_err(|source| RunError::Io {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    if let Some((name, at, v)) = first_bad_weight(program, cpu)? {
        return Err(RunError::Usage(format!(
            "{}: the trained weight `{name}` holds {v} at {at:?} before the first step: train from finite weights",
            program.model
        )));
    }
    // Gradient accumulation: the program takes one of each step's microbatches.
    let micro = t
        .accum
        .as_ref()
        .map_or(1, |a| a.microbatches.max(1) as usize);
    let accum_slots = t.accum.as_ref().map(|a| {
        (
            program.input(&a.scale_input).expect("validated").clone(),
            program.input(&a.apply_input).expect("validated").clone(),
        )
    });
    let mut losses = Vec::with_capacity(steps as usize);
    let last = cfg.start_step + steps;
    let bar = cfg.run.progress.then(|| progress_bar(steps));
    let started = Instant::now();
    for step in cfg.start_step + 1..=last {
        let t0 = Instant::now();
        let lr = cfg.lr * schedule.factor(step);
        let rows = data.next_rows(step_rows);
        // This process's rows: its replica's, cut into the accumulated microbatches.
        let parts: Vec<std::ops::Range<usize>> = (0..micro)
            .map(|j| {
                let at = (replica * micro + j) * batch * seq;
                at..at + batch * seq
            })
            .collect();
        // Each microbatch's labels (masked positions at -100) and its share of the step's
        // loss: of the kept labels, or 1/K.
        let mut masks: Vec<Option<Vec<i64>>> = vec![];
        let mut labels: Vec<Option<Vec<i64>>> = vec![];
        for part in &parts {
            let mine = &rows.ids[part.clone()];
            let given = rows.mask.as_ref().map(|m| &m[part.clone()]);
            let mask = mask_of(mine, given, run.pad_id);
            let l = labels_slot.as_ref().map(|_| {
                let given = rows.labels.as_ref().map(|l| &l[part.clone()]);
                masked_labels(mine, given, mask.as_deref())
            });
            masks.push(mask);
            labels.push(l);
        }
        let kept: Vec<usize> = labels
            .iter()
            .map(|l| {
                l.as_ref()
                    .map_or(batch * (seq - 1), |l| kept_positions(l, seq))
            })
            .collect();
        let total: usize = kept.iter().sum();
        // transformers' loss over no token is NaN; here it is an error naming the rows.
        if total == 0 {
            return Err(RunError::Data {
                path: run
                    .labels
                    .as_ref()
                    .map_or(data_path.to_string(), |p| p.display().to_string()),
                msg: format!(
                    "step {step}: no position of its {} rows is left in the loss (every label after the first column is -100 or masked): nothing to learn from",
                    batch * micro
                ),
            });
        }
        let mut l = 0.0;
        for (j, part) in parts.iter().enumerate() {
            let mine = &rows.ids[part.clone()];
            let values: Vec<f64> = mine.iter().map(|&x| x as f64).collect();
            cpu.set(&ids, &encode(ids.dtype, &values))?;
            if let (Some(s), Some(m)) = (&mask_slot, &masks[j]) {
                let v: Vec<f64> = m.iter().map(|&x| x as f64).collect();
                cpu.set(s, &encode(s.dtype, &v))?;
            }
            if let (Some(s), Some(lab)) = (&labels_slot, &labels[j]) {
                let v: Vec<f64> = lab.iter().map(|&x| x as f64).collect();
                cpu.set(s, &encode(s.dtype, &v))?;
            }
            for (s, v) in &scalars {
                let v = if Some(&s.name) == lr_slot.as_ref() {
                    lr
                } else {
                    *v
                };
                cpu.set(s, &encode(s.dtype, &[v]))?;
            }
            if let Some(s) = &step_slot {
                cpu.set(s, &encode(s.dtype, &[step as f64]))?;
            }
            let share = kept[j] as f64 / total as f64;
            if let Some((scale, apply)) = &accum_slots {
                cpu.set(scale, &encode(scale.dtype, &[share]))?;
                let last = (j + 1 == micro) as u8 as f64;
                cpu.set(apply, &encode(apply.dtype, &[last]))?;
            }
            cpu.run().map_err(|e| RunError::Step {
                step,
                cause: Box::new(e),
            })?;
            l += share * decode(loss.dtype, &cpu.get(&loss)?)[0];
        }
        let diverged = |what: String| RunError::Diverged {
            model: program.model.clone(),
            step,
            msg: format!("{what}. {DIVERGED}"),
        };
        if !l.is_finite() {
            return Err(diverged(format!("the loss is {l}")));
        }
        // A step whose gradients or update went non-finite leaves a NaN or an infinity in the
        // weights (SGD and AdamW both carry it there), whatever the loss was.
        if let Some((name, at, v)) = first_bad_weight(program, cpu)? {
            return Err(diverged(format!(
                "the update left {v} in `{name}` at {at:?} (the step's loss was {l})"
            )));
        }
        losses.push(l);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut line = serde_json::json!({
            "step": step,
            "loss": l,
            "lr": lr,
            "tokens": step_rows * seq,
            "step_ms": (ms * 1000.0).round() / 1000.0,
            "backend": cpu.name(),
            "peak_bytes": cpu.arena_bytes(),
        });
        if let Some(p) = &program.pipeline {
            line["pipeline"] = serde_json::json!({
                "schedule": p.schedule,
                "stages": p.stages,
                "microbatches": p.microbatches,
            });
            if p.data_parallel > 1 {
                line["pipeline"]["data_parallel"] = p.data_parallel.into();
            }
            if let Ok(Some(env)) = crate::transport::RankEnv::from_env() {
                line["pipeline"]["world_size"] = env.world.into();
            }
        }
        if !drifts.is_empty() {
            let mut d = Vec::with_capacity(drifts.len());
            for s in &drifts {
                d.push(decode(s.dtype, &cpu.get(s)?)[0]);
            }
            if let Some(w) = t
                .drift_threshold
                .and_then(|limit| drift_warning(&d, limit, step))
            {
                match &bar {
                    Some(b) => b.println(w),
                    None => eprintln!("{w}"),
                }
            }
            line["rev_drift"] = d.into();
        }
        let line = line.to_string();
        let io = |source| RunError::Io {
            path: "stdout".into(),
            source,
        };
        // On a terminal the bar steps aside for the line.
        match &bar {
            Some(b) => b.suspend(|| writeln!(out, "{line}")),
            None => writeln!(out, "{line}"),
        }
        .map_err(io)?;
        if let Some(f) = metrics.as_mut() {
            writeln!(f, "{line}").map_err(|source| RunError::Io {
                path: cfg.metrics.as_ref().unwrap().display().to_string(),
                source,
            })?;
        }
        if let Some(b) = &bar {
            let done = step - cfg.start_step;
            let rate = (done * (step_rows * seq) as u64) as f64 / started.elapsed().as_secs_f64();
            b.set_message(format!("loss {l:.4}  lr {lr:.2e}  {rate:.0} tokens/s"));
            b.set_position(done);
        }
        if let Some(v) = val.as_mut() {
            if step == last || cfg.run.eval_every.is_some_and(|n| step % n == 0) {
                let t0 = Instant::now();
                let (loss, tokens) = v.loss(cpu, run.pad_id)?;
                let line = serde_json::json!({
                    "step": step,
                    "val_loss": loss,
                    "val_tokens": tokens,
                    "val_ms": (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3,
                })
                .to_string();
                match &bar {
                    Some(b) => b.suspend(|| writeln!(out, "{line}")),
                    None => writeln!(out, "{line}"),
                }
                .map_err(|source| RunError::Io {
                    path: "stdout".into(),
                    source,
                })?;
                if let Some(f) = metrics.as_mut() {
                    writeln!(f, "{line}").map_err(|source| RunError::Io {
                        path: cfg.metrics.as_ref().unwrap().display().to_string(),
                        source,
                    })?;
                }
            }
        }
        if let (Some(every), Some(dir)) = (cfg.run.save_every, &cfg.save) {
            if step % every == 0 || step == last {
                let ck = dir.join(format!("{}{step}", weights::CHECKPOINT_PREFIX));
                weights::save_dir(&ck, program, cpu, &record(step))?;
                if let (Some(k), true) = (cfg.run.keep_last, first_rank) {
                    weights::prune_checkpoints(dir, k, &ck)?;
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    if let (None, Some(dir)) = (cfg.run.save_every, &cfg.save) {
        weights::save_dir(dir, program, cpu, &record(last))?;
    }
    Ok(losses)
}

/// The steps this run takes and the length of its schedule (the step it ends at, for a
/// decaying schedule): from `--epochs` over `rows` rows read `step_rows` a step, or `--steps`;
/// a resumed run keeps the schedule, its length and the data order its checkpoint recorded
/// (differing flags are an error, not a silently different run).
fn run_length(cfg: &TrainConfig, rows: u64, step_rows: u64) -> Result<(u64, u64), RunError> {
    let start = cfg.start_step;
    let opts = &cfg.run;
    let recorded = cfg
        .resumed
        .as_ref()
        .map(|l| &l.run)
        .filter(|r| r.lr_schedule.is_some());
    if let Some(r) = recorded {
        let (kind, warmup) = r.lr_schedule.as_ref().expect("filtered");
        if kind != opts.lr_schedule.name() || *warmup != opts.warmup {
            return Err(RunError::Usage(format!(
                "--resume: the run was trained with --lr-schedule {kind} --warmup-steps {warmup}: pass the same to continue it"
            )));
        }
        if r.shuffle_seed != opts.shuffle_seed {
            return Err(RunError::Usage(match r.shuffle_seed {
                Some(seed) => format!(
                    "--resume: the run read its data shuffled (--shuffle --seed {seed}): pass the same to continue it"
                ),
                None => "--resume: the run read its data in file order: leave out --shuffle to continue it".into(),
            }));
        }
    }
    if let Some(r) = cfg.resumed.as_ref().map(|l| &l.run) {
        // The data position is the step's: a run with another batch would read other rows.
        if r.rows_consumed != 0 && r.rows_consumed != start * step_rows {
            return Err(RunError::Usage(format!(
                "--resume: the run read {} rows in {start} steps, this one reads {step_rows} a step: resume with the batch it was trained with",
                r.rows_consumed
            )));
        }
    }
    let decays = opts.lr_schedule != LrKind::Constant;
    match opts.epochs {
        Some(e) => {
            let total = e
                .checked_mul(rows)
                .map(|r| r.div_ceil(step_rows.max(1)))
                .filter(|&t| t <= 1 << 53)
                .ok_or_else(|| {
                    RunError::Usage(format!("--epochs {e}: more steps than memc counts"))
                })?;
            if let Some(m) = recorded
                .and_then(|r| r.max_steps)
                .filter(|&m| decays && m != total)
            {
                return Err(RunError::Usage(format!(
                    "--resume: the run's {} schedule ends at step {m}, --epochs {e} at step {total}: pass the run's length to continue it",
                    opts.lr_schedule.name()
                )));
            }
            if start >= total {
                return Err(RunError::Usage(format!(
                    "--epochs {e} is {total} steps of {step_rows} rows over {rows} rows, and the checkpoint is at step {start} already"
                )));
            }
            Ok((total - start, total))
        }
        None => {
            let total = match recorded.and_then(|r| r.max_steps) {
                Some(t) if decays => t,
                _ => start + cfg.steps,
            };
            if start >= total {
                return Err(RunError::Usage(format!(
                    "--resume: the run's {} schedule ended at step {total}, where the checkpoint is: nothing is left of it to train (start a new run, or continue with --lr-schedule constant)",
                    opts.lr_schedule.name()
                )));
            }
            if start + cfg.steps > total {
                return Err(RunError::Usage(format!(
                    "--resume: the run's {} schedule ends at step {total} and the checkpoint is at step {start}: pass --steps {} at most",
                    opts.lr_schedule.name(),
                    total.saturating_sub(start)
                )));
            }
            Ok((cfg.steps, total))
        }
    }
}

/// A progress bar on stderr over `steps` steps: the loss, learning rate and tokens/s of the
/// last step, and the time left.
fn progress_bar(steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(steps),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} step {pos}/{len}  {msg}  {elapsed} elapsed, ETA {eta}",
    )
    .expect("a valid template");
    bar.set_style(style);
    bar
}

/// Validation (`--val-data`): the program's evaluation step over the validation rows.
struct Validation {
    eval: Program,
    data: Batches,
    path: String,
    ids: Slot,
    labels: Option<Slot>,
    /// The model's other inputs, as fixed for training (written before each evaluation: the
    /// training step reuses their region).
    others: Vec<(Slot, Vec<u8>)>,
    /// The model's attention mask, derived from the padding token each batch.
    mask: Option<Slot>,
}

impl Validation {
    /// Checks the validation options against `program` and reads the data; `None` without
    /// `--val-data`.
    fn open(
        program: &Program,
        cfg: &TrainConfig,
        fixed: &[(String, PathBuf)],
        seq: usize,
    ) -> Result<Option<Validation>, RunError> {
        let run = &cfg.run;
        let Some(path) = &run.val_data else {
            if run.val_labels.is_some() || run.eval_every.is_some() {
                return Err(RunError::Usage(
                    "--val-labels and --eval-every evaluate --val-data: pass it".into(),
                ));
            }
            return Ok(None);
        };
        if run.eval_every == Some(0) {
            return Err(RunError::Usage("--eval-every must be at least 1".into()));
        }
        let e = program.eval.as_ref().ok_or_else(|| {
            RunError::Usage(format!(
                "{} was compiled without an evaluation step: recompile with memc compile --train --eval (memc train builds one for --val-data on the cpu backend)",
                program.model
            ))
        })?;
        let eval = e.resolve(program)?;
        let t = program.training.as_ref().expect("a training program");
        let ids = eval.input(&t.data_input).cloned().ok_or_else(|| {
            RunError::Program(crate::program::ProgramError::Corrupt(format!(
                "the evaluation step has no input `{}`",
                t.data_input
            )))
        })?;
        let labels = t.labels_input.as_ref().and_then(|n| eval.input(n)).cloned();
        if run.val_labels.is_some() && labels.is_none() {
            return Err(RunError::Usage(format!(
                "{}: --val-labels needs a program with labels: recompile with --loss causal-lm",
                program.model
            )));
        }
        let shown = path.display().to_string();
        let mut data = Batches::open(path)?;
        if data.shape().1 != seq {
            return Err(RunError::Data {
                path: shown,
                msg: format!("rows of {} tokens, the program's are {seq}", data.shape().1),
            });
        }
        if data.shape().0 < ids.shape[0] {
            return Err(RunError::Data {
                path: shown,
                msg: format!(
                    "{} rows, fewer than one evaluation batch of {}",
                    data.shape().0,
                    ids.shape[0]
                ),
            });
        }
        if let Some(v) = t.vocab {
            data.check_vocab(v as usize, &shown)?;
        }
        if let Some(l) = &run.val_labels {
            data.attach_labels(l, t.vocab)?;
        }
        // The model's other inputs: an attention mask from the padding token, the others as
        // fixed for training.
        let mut others = vec![];
        let mut mask = None;
        for s in eval
            .inputs
            .iter()
            .filter(|s| s.name != ids.name && labels.as_ref().is_none_or(|l| l.name != s.name))
        {
            if s.name == ATTENTION_MASK && (run.pad_id.is_some() || run.attention_mask.is_some()) {
                if run.pad_id.is_none() {
                    return Err(RunError::Usage(
                        "--val-data with --attention-mask: the validation rows have no mask; give the padding token with --pad-id instead".into(),
                    ));
                }
                mask = Some(s.clone());
                continue;
            }
            let (_, file) = fixed.iter().find(|(n, _)| *n == s.name).ok_or_else(|| {
                RunError::Usage(format!(
                    "the evaluation step also takes `{}`: pass --input {}=FILE.npy",
                    s.name, s.name
                ))
            })?;
            others.push((s.clone(), read_input(s, file)?));
        }
        Ok(Some(Validation {
            eval,
            data,
            path: shown,
            ids,
            labels,
            others,
            mask,
        }))
    }

    /// The mean loss over every whole batch of the validation rows (each batch's loss
    /// weighted by its tokens in the loss) and those tokens; padding (`pad`) left out.
    fn loss(&mut self, cpu: &mut dyn Backend, pad: Option<i64>) -> Result<(f64, usize), RunError> {
        let (rows, seq) = self.data.shape();
        let batch = self.ids.shape[0];
        let loss = self.eval.loss().expect("validated").clone();
        let (mut sum, mut tokens) = (0.0, 0usize);
        for first in (0..rows / batch).map(|b| b * batch) {
            let r = self.data.rows_at(first, batch);
            let v: Vec<f64> = r.ids.iter().map(|&x| x as f64).collect();
            cpu.set(&self.ids, &encode(self.ids.dtype, &v))?;
            let mask = mask_of(&r.ids, None, pad);
            let labels = masked_labels(&r.ids, r.labels.as_deref(), mask.as_deref());
            let kept = kept_positions(&labels, seq);
            if kept == 0 {
                continue;
            }
            if let Some(s) = &self.labels {
                let v: Vec<f64> = labels.iter().map(|&x| x as f64).collect();
                cpu.set(s, &encode(s.dtype, &v))?;
            }
            for (s, bytes) in &self.others {
                cpu.set(s, bytes)?;
            }
            if let (Some(s), Some(m)) = (&self.mask, &mask) {
                let v: Vec<f64> = m.iter().map(|&x| x as f64).collect();
                cpu.set(s, &encode(s.dtype, &v))?;
            }
            cpu.evaluate()?;
            sum += kept as f64 * decode(loss.dtype, &cpu.get(&loss)?)[0];
            tokens += kept;
        }
        if tokens == 0 {
            return Err(RunError::Data {
                path: self.path.clone(),
                msg: "no position of the validation rows is in the loss (every label is -100)"
                    .into(),
            });
        }
        Ok((sum / tokens as f64, tokens))
    }
}

/// The first trained weight holding a NaN or an infinity: its name, the element's position and
/// its value. Read in place on the cpu backend (a pass over the weights, a small part of a
/// step's memory traffic).
fn first_bad_weight(
    program: &Program,
    cpu: &mut dyn Backend,
) -> Result<Option<(String, Vec<usize>, f64)>, RunError> {
    for p in program
        .params
        .iter()
        .filter(|p| p.updated && p.role == Role::Weight)
    {
        if !cpu.holds(&p.slot) {
            continue;
        }
        if let Some((k, v)) = cpu.first_bad(&p.slot, finite::Bad::NonFinite)? {
            let at = finite::position(&p.slot.shape, k);
            return Ok(Some((p.slot.name.clone(), at, v)));
        }
    }
    Ok(None)
}

/// Checks an index input's elements against the program's bound for it (`IndexBound`): the
/// kernels clamp indices, so an out-of-range one would give a silently wrong result.
pub fn check_indices(
    program: &Program,
    slot: &Slot,
    bytes: &[u8],
    source: &str,
) -> Result<(), RunError> {
    let Some(b) = program.index_bounds.iter().find(|b| b.input == slot.name) else {
        return Ok(());
    };
    let values = decode(slot.dtype, bytes);
    // As the reference interpreter (and ONNX): a negative index counts from the end.
    let n = b.bound as f64;
    if let Some(k) = values.iter().position(|&x| x < -n || x >= n) {
        let at = crate::finite::position(&slot.shape, k);
        return Err(RunError::Data {
            path: source.to_string(),
            msg: format!(
                "input `{}`: {} at position {at:?} is outside 0..{} ({} it indexes; -{}..0 counts from the end)",
                slot.name, values[k], b.bound, b.table, b.bound
            ),
        });
    }
    Ok(())
}

/// Reads `FILE.npy` as the bytes of input `slot` (dtype and shape must match; float32 data
/// feeds a bf16/f16 input, int32 and int64 feed each other).
pub fn read_input(slot: &Slot, path: &Path) -> Result<Vec<u8>, RunError> {
    let a = npy::read(path)?;
    let bad = |msg: String| RunError::Data {
        path: path.display().to_string(),
        msg,
    };
    if a.shape != slot.shape {
        return Err(bad(format!(
            "input `{}` is {}, the array has shape {:?}",
            slot.name,
            slot.type_string(),
            a.shape
        )));
    }
    let from = match a.dtype {
        NpyDtype::F32 => Dtype::F32,
        NpyDtype::F16 => Dtype::F16,
        NpyDtype::F64 => Dtype::F64,
        NpyDtype::I64 => Dtype::I64,
        NpyDtype::I32 => Dtype::I32,
        NpyDtype::Bool => Dtype::Bool,
    };
    let int = |d| matches!(d, Dtype::I64 | Dtype::I32);
    let float = |d| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::Bf16 | Dtype::F64);
    if from == slot.dtype {
        Ok(a.data)
    } else if (int(from) && int(slot.dtype)) || (float(from) && float(slot.dtype)) {
        Ok(encode(slot.dtype, &decode(from, &a.data)))
    } else {
        Err(bad(format!(
            "input `{}` is {}, the array holds {}",
            slot.name,
            slot.type_string(),
            a.dtype.numpy_name()
        )))
    }
}

/// The bytes of an output as an `.npy` array (bf16 widened to float32, which NumPy lacks).
pub fn output_npy(slot: &Slot, bytes: &[u8]) -> NpyArray {
    let (dtype, data) = match slot.dtype {
        Dtype::F32 => (NpyDtype::F32, bytes.to_vec()),
        Dtype::F64 => (NpyDtype::F64, bytes.to_vec()),
        Dtype::F16 => (NpyDtype::F16, bytes.to_vec()),
        Dtype::Bf16 => (
            NpyDtype::F32,
            encode(Dtype::F32, &decode(Dtype::Bf16, bytes)),
        ),
        Dtype::I64 => (NpyDtype::I64, bytes.to_vec()),
        Dtype::I32 => (NpyDtype::I32, bytes.to_vec()),
        Dtype::I16 => (
            NpyDtype::I32,
            encode(Dtype::I32, &decode(Dtype::I16, bytes)),
        ),
        Dtype::Bool => (NpyDtype::Bool, bytes.to_vec()),
    };
    NpyArray {
        dtype,
        shape: slot.shape.clone(),
        data,
    }
}

/// A file name for output `name` (path separators and odd characters replaced).
pub fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs the program once on `inputs` (by name) and writes every output to `dir/<name>.npy`.
pub fn infer(
    program: &Program,
    cpu: &mut dyn Backend,
    inputs: &[(String, PathBuf)],
    dir: &Path,
) -> Result<Vec<PathBuf>, RunError> {
    if program.training.is_some() {
        return Err(RunError::Usage(format!(
            "{} was compiled for training (--train): infer runs inference programs (compile without --train)",
            program.model
        )));
    }
    for (name, _) in inputs {
        if program.input(name).is_none() {
            let names: Vec<&str> = program.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(RunError::Usage(format!(
                "--input {name}: the program has no input `{name}` (its inputs: {})",
                names.join(", ")
            )));
        }
    }
    for slot in &program.inputs {
        let (_, path) = inputs
            .iter()
            .find(|(n, _)| *n == slot.name)
            .ok_or_else(|| {
                RunError::Usage(format!(
                    "input `{}` ({}) has no value: pass --input {}=FILE.npy",
                    slot.name,
                    slot.type_string(),
                    slot.name
                ))
            })?;
        let bytes = read_input(slot, path)?;
        check_indices(program, slot, &bytes, &path.display().to_string())?;
        cpu.set(slot, &bytes)?;
    }
    cpu.run()?;
    std::fs::create_dir_all(dir).map_err(|source| RunError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = vec![];
    for slot in &program.outputs {
        let path = dir.join(format!("{}.npy", file_name(&slot.name)));
        npy::write(&path, &output_npy(slot, &cpu.get(slot)?))?;
        written.push(path);
    }
    Ok(written)
}

/// What a diverged step means for the run's state, and what to do: every error that stops a
/// run at a non-finite value ends with it.
const DIVERGED: &str = "The weights in memory hold this step's update and nothing was saved: \
    the last --save directory is as it was. Lower --lr or compile with --clip-grad-norm; \
    MEMC_CHECK_NAN=1 names the first op that produced a NaN";

const USAGE: &str = "usage:
  EXE train --data FILE.npy [--steps N | --epochs E] [--lr X] [--weight-decay W] [--backend cpu|cuda] [--threads N]
            [--lr-schedule constant|linear|cosine] [--warmup-steps N] [--shuffle [--seed S]]
            [--labels FILE.npy (-100: not in the loss)] [--attention-mask FILE.npy | --pad-id P]
            [--val-data FILE.npy [--val-labels FILE.npy] [--eval-every N] (compiled with --eval)]
            [--input NAME=FILE.npy (other model inputs, held fixed)] [--save DIR [--save-every N [--keep-last K]]]
            [--random-weights SEED (instead of the weights file, for benchmarks)] [--resume DIR] [--log FILE.jsonl] [--weights FILE|HF_DIR]
  EXE infer --input NAME=FILE.npy ... --out DIR [--backend cpu|cuda] [--weights FILE] [--repeat N] [--threads N]
  EXE info  (what the program is: arena, kernels, inputs, outputs, parameters)
The weights are read from EXE.safetensors unless --weights is given.";

/// Flags that take no value.
const SWITCHES: &[&str] = &["--shuffle"];

/// Parsed command line of an emitted executable.
struct Cmd {
    verb: String,
    opts: Vec<(String, String)>,
}

impl Cmd {
    fn parse(args: &[String]) -> Result<Cmd, RunError> {
        let usage = |m: String| RunError::Usage(format!("{m}; run with --help for usage"));
        let verb = args.first().cloned().unwrap_or_default();
        let flags: &[&str] = match verb.as_str() {
            "train" => &[
                "--data",
                "--input",
                "--steps",
                "--lr",
                "--weight-decay",
                "--backend",
                "--save",
                "--resume",
                "--metrics",
                "--log",
                "--weights",
                "--random-weights",
                "--threads",
                "--epochs",
                "--lr-schedule",
                "--warmup-steps",
                "--shuffle",
                "--seed",
                "--save-every",
                "--keep-last",
                "--labels",
                "--attention-mask",
                "--pad-id",
                "--val-data",
                "--val-labels",
                "--eval-every",
            ],
            "infer" => &[
                "--input",
                "--out",
                "--backend",
                "--weights",
                "--random-weights",
                "--repeat",
                "--threads",
            ],
            "info" => &[],
            "" => return Err(usage("expected a command: train, infer or info".into())),
            v => return Err(usage(format!("unknown command `{v}`"))),
        };
        let mut opts = vec![];
        let mut rest = args[1..].iter();
        while let Some(a) = rest.next() {
            let (flag, value) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (a.clone(), None),
            };
            if !flags.contains(&flag.as_str()) {
                return Err(usage(format!("unexpected argument `{a}` for `{verb}`")));
            }
            if SWITCHES.contains(&flag.as_str()) {
                if value.is_some() {
                    return Err(usage(format!("{flag} takes no value")));
                }
                opts.push((flag, String::new()));
                continue;
            }
            let value = match value {
                Some(v) => v,
                None => rest
                    .next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{flag} needs a value")))?,
            };
            opts.push((flag, value));
        }
        Ok(Cmd { verb, opts })
    }

    fn has(&self, flag: &str) -> bool {
        self.opts.iter().any(|(f, _)| f == flag)
    }

    fn get(&self, flag: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, flag: &str) -> Result<Option<T>, RunError> {
        self.get(flag)
            .map(|v| {
                v.parse()
                    .map_err(|_| RunError::Usage(format!("{flag} `{v}` is not a valid number")))
            })
            .transpose()
    }
}

fn describe(program: &Program) -> String {
    let calls = program
        .steps
        .iter()
        .filter(|s| matches!(s, crate::program::Step::Kernel { .. }))
        .count();
    let mut out = format!(
        "model: {}\nkind: {}\narena_bytes: {} (one allocation: the memory plan's peak)\nsteps: {} ({calls} calls of {} generated kernels, {} GEMMs)\nweights_bytes: {}\noptimizer_state_bytes: {}\n",
        program.model,
        if program.training.is_some() { "training" } else { "inference" },
        program.arena_bytes,
        program.steps.len(),
        program.kernels.len(),
        program.steps.len() - calls,
        program.param_bytes(Role::Weight),
        program.param_bytes(Role::OptimizerState),
    );
    if let Some(p) = &program.pipeline {
        let labels: Vec<String> = p
            .passes
            .iter()
            .map(|q| format!("{}@{}", q.label, q.device))
            .collect();
        out += &format!(
            "pipeline: {} on {} stages × {} data-parallel replicas, {} microbatches per step; {} pass programs (chunk pass@device: {}){}, {} optimizer programs (stage.replica: {})\n",
            p.schedule,
            p.stages,
            p.data_parallel,
            p.microbatches,
            p.passes.len(),
            labels.join(" "),
            if p.late.is_some() { ", gradient sums over chunks" } else { "" },
            p.updates.len(),
            p.updates
                .iter()
                .map(|u| format!("{}.{}", u.device, u.shard))
                .collect::<Vec<_>>()
                .join(" "),
        );
        out += &format!(
            "arenas: {}\n",
            p.passes
                .iter()
                .chain(&p.late)
                .chain(&p.updates)
                .map(|q| format!("{} {}", q.label, q.program.arena_bytes))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let line = |who: String, b: &crate::pipeline::Planned| {
            format!(
                "{who}: {} bytes (weights {}, optimizer state {}, gradient sums {}, working {})\n",
                b.total, b.weights, b.optimizer_state, b.gradient_sums, b.working
            )
        };
        for (who, b) in crate::pipeline::processes(program).unwrap_or_default() {
            out += &line(format!("planned, {who}"), &b);
        }
    }
    for s in &program.inputs {
        out += &format!("input {}: {}\n", s.name, s.type_string());
    }
    for s in &program.outputs {
        out += &format!("output {}: {}\n", s.name, s.type_string());
    }
    match &program.device {
        Some(d) => {
            let launches: usize = d.launches.iter().map(Vec::len).sum();
            out += &format!(
                "device: {} PTX, {} kernels ({launches} launches per step), {} bytes of PTX\n",
                d.arch,
                d.launches.len(),
                d.ptx.len()
            );
        }
        None => out += "device: none (compiled with --target cpu)\n",
    }
    if let Some(t) = &program.training {
        out += &format!(
            "training: optimizer {}, data input `{}`, loss `{}`, default weight decay {}\n",
            t.optimizer, t.data_input, t.loss_output, t.default_weight_decay
        );
        if let Some(l) = &t.labels_input {
            out += &format!("labels: `{l}` (transformers' causal-LM loss: -100 left out; --labels, --attention-mask, --pad-id)
");
        }
        if let Some(e) = program.eval.as_ref().and_then(|e| e.resolve(program).ok()) {
            out += &format!(
                "evaluation step (--val-data): {} steps, forward and loss only, inside the training arena (it reaches {} of its {} bytes)\n",
                e.steps.len(),
                e.arena_bytes,
                program.arena_bytes
            );
        }
        if let Some(a) = &t.accum {
            out += &format!(
                "gradient accumulation: {} microbatches of the data input's rows per optimizer step, their gradients summed in the arena
",
                a.microbatches
            );
        }
    }
    out
}

/// Fills every weight with random values instead of reading a weights file (for benchmarks
/// on machines the weights are not copied to): matrices N(0, 0.02²), vectors (norm scales,
/// biases) ones. Deterministic in `seed`.
fn random_weights(program: &Program, backend: &mut dyn Backend, seed: u64) -> Result<(), RunError> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    for p in program.params.iter().filter(|p| p.role == Role::Weight) {
        let n: usize = p.slot.shape.iter().product();
        let values: Vec<f64> = if p.slot.shape.len() >= 2 {
            (0..n)
                .map(|_| {
                    let (u, v) = (uniform(), uniform());
                    0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
                })
                .collect()
        } else {
            vec![1.0; n]
        };
        backend.set(&p.slot, &encode(p.slot.dtype, &values))?;
    }
    Ok(())
}

/// Every `--input NAME=FILE.npy`.
fn inputs(cmd: &Cmd) -> Result<Vec<(String, PathBuf)>, RunError> {
    parse_inputs(
        cmd.opts
            .iter()
            .filter(|(f, _)| f == "--input")
            .map(|(_, v)| v.as_str()),
    )
}

/// `--input NAME=FILE.npy` values (of executables, `memc train` and `memc eval`): each
/// `NAME=PATH`, every name once.
pub fn parse_inputs<'a>(
    given: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<(String, PathBuf)>, RunError> {
    let mut inputs: Vec<(String, PathBuf)> = vec![];
    for v in given {
        let (name, path) = v
            .split_once('=')
            .ok_or_else(|| RunError::Usage(format!("--input `{v}`: expected NAME=FILE.npy")))?;
        if inputs.iter().any(|(n, _)| n == name) {
            return Err(RunError::Usage(format!("--input gives `{name}` twice")));
        }
        inputs.push((name.to_string(), PathBuf::from(path)));
    }
    Ok(inputs)
}

/// Opens `program` on the backend named `name` (`cpu` or `cuda`) with the generated
/// kernels' entry points: a pipelined program on the pipelined executor (one process per
/// stage and replica when launched by `mpirun` or `srun`), any other on one arena.
///
/// # Safety
///
/// As for [`Cpu::new`]: `kernels` are the entries memc generated for `program.kernels`.
pub unsafe fn open_backend(
    name: &str,
    program: &Program,
    kernels: &[KernelFn],
) -> Result<Box<dyn Backend>, RunError> {
    match name {
        // One process per stage and replica when launched by mpirun or srun.
        // SAFETY (both cpu arms): the caller's contract.
        "cpu" if program.pipeline.is_some() => Ok(Box::new(unsafe {
            crate::pipeline::Pipelined::open_cpu(program, kernels)?
        })),
        "cpu" => Ok(Box::new(unsafe { Cpu::new(program.checked()?, kernels) })),
        "cuda" if program.pipeline.is_some() => {
            Ok(Box::new(crate::pipeline::Pipelined::open_cuda(program)?))
        }
        "cuda" => Ok(Box::new(crate::gpu::Cuda::new(program)?)),
        b => Err(RunError::Usage(format!(
            "--backend `{b}`: expected cpu or cuda"
        ))),
    }
}

/// Runs the command line `args` (without the program name) of an emitted executable whose
/// program is `program_bytes` and whose generated kernels are `kernels` (in the program's
/// kernel order); `exe` is its path (for the default weights file).
pub fn run_cli(
    exe: &Path,
    args: &[String],
    program_bytes: &[u8],
    kernels: &[KernelFn],
) -> Result<(), RunError> {
    if args.iter().any(|a| a == "--help" || a == "-h") || args.is_empty() {
        println!("{USAGE}");
        return if args.is_empty() {
            Err(RunError::Usage(
                "expected a command: train, infer or info".into(),
            ))
        } else {
            Ok(())
        };
    }
    let cmd = Cmd::parse(args)?;
    let program = Program::from_bytes(program_bytes)?;
    if program.kernels.len() != kernels.len() {
        return Err(RunError::Program(crate::program::ProgramError::Corrupt(
            format!(
                "the program names {} kernels, the executable links {}",
                program.kernels.len(),
                kernels.len()
            ),
        )));
    }
    if cmd.verb == "info" {
        print!("{}", describe(&program));
        return Ok(());
    }

    if let Some(n) = cmd.number::<usize>("--threads")? {
        crate::gemm::set_threads(n).map_err(RunError::Usage)?;
    }
    let own_weights = {
        let mut p = exe.as_os_str().to_owned();
        p.push(".safetensors");
        PathBuf::from(p)
    };
    // `--weights` names the executable's own weights file format, or a Hugging Face
    // checkpoint (a model directory or a sharded index): its tensors replace the weights of
    // the same names, the executable's own file giving the rest (reversible adapters).
    let (weights_path, checkpoint) = match cmd.get("--weights").map(PathBuf::from) {
        Some(w) if w.is_dir() || w.to_string_lossy().ends_with(".index.json") => {
            (own_weights, Some(w))
        }
        Some(w) => (w, None),
        None => (own_weights, None),
    };
    // SAFETY: `kernels` is the executable's kernel table, emitted with this program in its
    // kernel order (see the caller's contract).
    let mut backend =
        unsafe { open_backend(cmd.get("--backend").unwrap_or("cpu"), &program, kernels)? };
    let cpu = backend.as_mut();
    // On any failure a rank of a distributed step tells the others, so the job ends
    // instead of waiting for it.
    let result = run_verb(&cmd, &program, cpu, &weights_path, checkpoint.as_deref());
    if result.is_err() {
        cpu.abort();
    }
    result
}

/// The verb of `cmd` (train or infer) on `cpu`, after its weights: `weights_path`, or random
/// ones, then a Hugging Face checkpoint's tensors.
fn run_verb(
    cmd: &Cmd,
    program: &Program,
    cpu: &mut dyn Backend,
    weights_path: &Path,
    checkpoint: Option<&Path>,
) -> Result<(), RunError> {
    match cmd.number::<u64>("--random-weights")? {
        Some(seed) => random_weights(program, cpu, seed)?,
        None => {
            weights::load(weights_path, program, cpu)?;
            if let Some(ck) = checkpoint {
                let n = weights::load_checkpoint(ck, program, cpu)?;
                eprintln!("weights: {n} tensors of {} bound by name", ck.display());
            }
        }
    }
    match cmd.verb.as_str() {
        "train" => {
            let data_path = cmd
                .get("--data")
                .ok_or_else(|| RunError::Usage("train needs --data FILE.npy".into()))?;
            let mut data = Batches::open(Path::new(data_path))?;
            let mut start_step = 0;
            let mut resumed = None;
            if let Some(ckpt) = cmd.get("--resume") {
                let loaded = weights::load_dir(Path::new(ckpt), program, cpu)?;
                start_step = loaded.step.unwrap_or(0);
                resumed = Some(loaded);
            }
            // One process per pipeline stage and replica: rank 0 reports the steps; every
            // rank writes its shard of the checkpoint.
            let rank = match program.pipeline {
                Some(_) => crate::transport::RankEnv::from_env()
                    .map_err(RunError::Usage)?
                    .map_or(0, |e| e.rank),
                None => 0,
            };
            if cmd.has("--log") && cmd.has("--metrics") {
                return Err(RunError::Usage(
                    "--log and --metrics name the same file (--metrics is its old name): pass one"
                        .into(),
                ));
            }
            if cmd.has("--steps") && cmd.has("--epochs") {
                return Err(RunError::Usage(
                    "--steps and --epochs both give the run's length: pass one".into(),
                ));
            }
            let cfg = TrainConfig {
                steps: cmd.number("--steps")?.unwrap_or(10),
                lr: cmd.number("--lr")?.unwrap_or(1e-3),
                weight_decay: cmd.number("--weight-decay")?,
                start_step,
                save: cmd.get("--save").map(PathBuf::from),
                metrics: cmd
                    .get("--log")
                    .or(cmd.get("--metrics"))
                    .filter(|_| rank == 0)
                    .map(PathBuf::from),
                run: RunOptions::from_flags(
                    cmd.get("--lr-schedule"),
                    cmd.number("--warmup-steps")?,
                    cmd.has("--shuffle"),
                    cmd.number("--seed")?,
                    cmd.number("--epochs")?,
                    cmd.number("--save-every")?,
                    cmd.number("--keep-last")?,
                    rank == 0,
                )?
                .with_data(
                    cmd.get("--labels").map(PathBuf::from),
                    cmd.get("--attention-mask").map(PathBuf::from),
                    cmd.number("--pad-id")?,
                )
                .with_validation(
                    cmd.get("--val-data").map(PathBuf::from),
                    cmd.get("--val-labels").map(PathBuf::from),
                    cmd.number("--eval-every")?,
                ),
                resumed,
            };
            let mut quiet = std::io::sink();
            let mut stdout = std::io::stdout().lock();
            train(
                program,
                cpu,
                &mut data,
                data_path,
                &inputs(cmd)?,
                &cfg,
                if rank == 0 { &mut stdout } else { &mut quiet },
            )?;
        }
        "infer" => {
            let inputs = inputs(cmd)?;
            let dir = cmd
                .get("--out")
                .ok_or_else(|| RunError::Usage("infer needs --out DIR".into()))?;
            let repeat: u64 = cmd.number("--repeat")?.unwrap_or(1).max(1);
            for _ in 1..repeat {
                let t0 = Instant::now();
                for slot in &program.inputs {
                    if let Some((_, path)) = inputs.iter().find(|(n, _)| *n == slot.name) {
                        let bytes = read_input(slot, path)?;
                        cpu.set(slot, &bytes)?;
                    }
                }
                cpu.run()?;
                eprintln!(
                    "{}",
                    serde_json::json!({"run_ms": t0.elapsed().as_secs_f64() * 1e3, "backend": cpu.name()})
                );
            }
            for p in infer(program, cpu, &inputs, Path::new(dir))? {
                eprintln!("wrote {}", p.display());
            }
        }
        _ => unreachable!("parsed"),
    }
    if let Some(p) = cpu.profile() {
        eprint!("{p}");
    }
    Ok(())
}

/// The entry point of an emitted executable, called by its generated `main` with the embedded
/// program and the table of its generated kernels. Prints one `error:` line and returns 2 on
/// failure (and on internal errors, which are reported rather than unwound into C).
///
/// # Safety
/// `argv` holds `argc` C strings; `program` points to `program_len` bytes and `kernels` to
/// `n_kernels` kernel entries, all valid for the whole call.
#[no_mangle]
pub unsafe extern "C" fn memc_rt_main(
    argc: i32,
    argv: *const *const std::ffi::c_char,
    program: *const u8,
    program_len: u64,
    kernels: *const KernelFn,
    n_kernels: u64,
) -> i32 {
    exit_on_output_errors();
    let args: Vec<String> = (0..argc.max(0) as usize)
        .map(|i| {
            // SAFETY: the caller passes `argc` valid C strings.
            unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: the caller passes valid ranges.
    let (bytes, table) = unsafe {
        (
            std::slice::from_raw_parts(program, program_len as usize),
            std::slice::from_raw_parts(kernels, n_kernels as usize),
        )
    };
    let exe = std::env::current_exe()
        .unwrap_or_else(|_| PathBuf::from(args.first().cloned().unwrap_or_default()));
    let result =
        std::panic::catch_unwind(|| run_cli(&exe, args.get(1..).unwrap_or(&[]), bytes, table));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            2
        }
        Err(_) => {
            eprintln!("error: internal error in the memc runtime (a bug; please report it with the command line)");
            2
        }
    }
}

/// The warning for reversible layers whose reconstruction drift (`drift[layer]`) passes
/// `limit` at `step`, if any (`--rev-check`; shared by memc's reference loop).
pub fn drift_warning(drift: &[f64], limit: f64, step: u64) -> Option<String> {
    let bad: Vec<String> = drift
        .iter()
        .enumerate()
        // Past the limit, or not a number.
        .filter(|(_, x)| {
            !matches!(
                (**x).partial_cmp(&limit),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            )
        })
        .map(|(l, x)| format!("layer {l}: {x:.2e}"))
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "warning: step {step}: reversible reconstruction drift past {limit:e} ({}); make fewer layers reversible (--rev-layers) or train in f32",
            bad.join(", ")
        )
    })
}

/// `print!` panics when standard output cannot be written (a full disk, a closed pipe): this
/// panic hook turns that into the usual one `error:` line and exit code 2 (memc's and the
/// executables' entry points install it); other panics go to the default hook.
pub fn exit_on_output_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            eprintln!("error: cannot write to standard output: {why}");
            std::process::exit(2);
        }
        default(info);
    }));
}
