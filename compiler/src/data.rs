//! `memc data`: text in, the arrays `memc train` and `OUT train` read out. Text is tokenised
//! with Hugging Face's `tokenizers` crate (the library behind `tokenizers` in Python, so a
//! `tokenizer.json` gives the same ids in both), then packed or padded into rows:
//!
//! - records: a `.txt` file's non-empty lines, or a `.jsonl` file's objects, each
//!   `{"text": ...}` or `{"prompt": ..., "response": ...}`;
//! - a record's ids: its text's (or its prompt's) ids with the tokenizer's special tokens,
//!   then the response's without them, then the end-of-text token; its labels: the ids,
//!   with −100 over the prompt (only the response is learnt);
//! - `--layout pack` (the default for text records) concatenates the records and cuts the
//!   stream into rows of `--seq` tokens; `--layout pad` (the default for prompt/response
//!   records) makes each record one row, truncated to `--seq` or padded. Padding has label
//!   −100 and attention mask 0.
//!
//! It writes `input_ids.npy`, `labels.npy` and `attention_mask.npy` (int64 `[rows, seq]`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};

/// How records become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Concatenate the records and cut the stream into rows (the last padded).
    Pack,
    /// One row per record, truncated or padded.
    Pad,
}

/// `memc data`'s options.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// A Hugging Face `tokenizer.json`.
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: PathBuf,
    /// The text: FILE.txt (one record per non-empty line) or FILE.jsonl (`{"text": ...}` or
    /// `{"prompt": ..., "response": ...}` per line).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per row.
    #[arg(long, value_name = "S")]
    pub seq: usize,
    /// The directory to write input_ids.npy, labels.npy and attention_mask.npy into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// pack (default for text records) or pad (default for prompt/response records).
    #[arg(long, value_enum)]
    pub layout: Option<Layout>,
    /// The token ending each record (default: the first of <|endoftext|>, </s>, <eos>,
    /// [SEP] the tokenizer has; when it has none of them, nothing is added).
    #[arg(long, value_name = "TOKEN")]
    pub eos: Option<String>,
    /// The padding token (default: the first of <pad>, [PAD], <|pad|> the tokenizer has,
    /// else the end-of-text token, as GPT-2 users pad).
    #[arg(long, value_name = "TOKEN")]
    pub pad: Option<String>,
}

/// One record's ids and labels.
struct Record {
    ids: Vec<i64>,
    labels: Vec<i64>,
}

/// What `memc data` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// Records read.
    pub records: usize,
    /// Rows written.
    pub rows: usize,
    /// Tokens in them that are not padding.
    pub tokens: usize,
    /// Tokens in the loss (labels not −100, each row's first excepted).
    pub targets: usize,
    /// Records dropped: their prompt fills the row.
    pub dropped: usize,
}

/// The label of a position left out of the loss.
const IGNORE: i64 = -100;

/// Runs `memc data`.
pub fn run(args: &DataArgs) -> Result<Written> {
    if args.seq < 2 {
        bail!(
            "--seq {}: a row needs at least 2 tokens (a token and its next)",
            args.seq
        );
    }
    let tok = tokenizers::Tokenizer::from_file(&args.tokenizer).map_err(|e| {
        anyhow!(
            "{}: not a tokenizer memc can read ({e}); pass a Hugging Face tokenizer.json",
            args.tokenizer.display()
        )
    })?;
    let find = |given: &Option<String>, names: &[&str], flag: &str| -> Result<Option<i64>> {
        match given {
            Some(t) => tok.token_to_id(t).map(|i| Some(i as i64)).ok_or_else(|| {
                anyhow!("{flag} {t}: {} has no such token", args.tokenizer.display())
            }),
            None => Ok(names
                .iter()
                .find_map(|n| tok.token_to_id(n))
                .map(|i| i as i64)),
        }
    };
    let eos = find(
        &args.eos,
        &["<|endoftext|>", "</s>", "<eos>", "[SEP]"],
        "--eos",
    )?;
    let pad = find(&args.pad, &["<pad>", "[PAD]", "<|pad|>"], "--pad")?.or(eos);
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let file = args.text.display().to_string();
    let jsonl = args
        .text
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let encode = |s: &str, special: bool, line: usize| -> Result<Vec<i64>> {
        let e = tok
            .encode(s, special)
            .map_err(|e| anyhow!("{file}:{line}: the tokenizer failed: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    };
    let mut records = vec![];
    let mut prompts = false;
    let mut content = 0;
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l)) {
        if line.trim().is_empty() {
            continue;
        }
        let (mut ids, mut labels) = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| anyhow!("{file}:{n}: not JSON ({e})"))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str());
            match (field("text"), field("prompt"), field("response")) {
                (Some(t), None, None) => {
                    let ids = encode(t, true, n)?;
                    (ids.clone(), ids)
                }
                (None, Some(p), Some(r)) => {
                    prompts = true;
                    let p = encode(p, true, n)?;
                    let r = encode(r, false, n)?;
                    let labels = vec![IGNORE; p.len()].into_iter().chain(r.iter().copied()).collect();
                    (p.into_iter().chain(r).collect(), labels)
                }
                _ => bail!(
                    "{file}:{n}: expected an object with a string \"text\", or strings \"prompt\" and \"response\""
                ),
            }
        } else {
            let ids = encode(line, true, n)?;
            (ids.clone(), ids)
        };
        content += ids.len();
        if let Some(e) = eos {
            ids.push(e);
            labels.push(e);
        }
        records.push(Record { ids, labels });
    }
    if content == 0
        || records
            .iter()
            .all(|r| r.labels.iter().all(|&l| l == IGNORE))
    {
        bail!(
            "{file}: the text gives no tokens to learn from (it is empty, or holds nothing {} has ids for)",
            args.tokenizer.display()
        );
    }
    let layout = args
        .layout
        .unwrap_or(if prompts { Layout::Pad } else { Layout::Pack });
    let s = args.seq;
    let mut rows: Vec<Record> = vec![];
    let mut dropped = 0;
    match layout {
        Layout::Pack => {
            let ids: Vec<i64> = records.iter().flat_map(|r| r.ids.iter().copied()).collect();
            let labels: Vec<i64> = records
                .iter()
                .flat_map(|r| r.labels.iter().copied())
                .collect();
            for (i, l) in ids.chunks(s).zip(labels.chunks(s)) {
                rows.push(Record {
                    ids: i.to_vec(),
                    labels: l.to_vec(),
                });
            }
        }
        Layout::Pad => {
            for r in records.iter() {
                let row = Record {
                    ids: r.ids[..r.ids.len().min(s)].to_vec(),
                    labels: r.labels[..r.labels.len().min(s)].to_vec(),
                };
                // A prompt as long as the row leaves nothing to learn: the row is dropped.
                if row.labels[1..].iter().all(|&l| l == IGNORE) {
                    dropped += 1;
                    continue;
                }
                rows.push(row);
            }
        }
    }
    if rows.is_empty() {
        bail!(
            "{file}: every record's prompt fills the {s} tokens of a row: nothing is left to learn (use a longer --seq)"
        );
    }
    let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
    let short = rows.iter().any(|r| r.ids.len() < s);
    let pad = match (short, pad) {
        (false, _) => 0,
        (true, Some(p)) => p,
        (true, None) => bail!(
            "{}: no padding token (none of <pad>, [PAD], <|pad|>, nor an end-of-text token): pass --pad TOKEN",
            args.tokenizer.display()
        ),
    };
    let (mut ids, mut labels, mut mask) = (vec![], vec![], vec![]);
    for r in &rows {
        let n = s - r.ids.len();
        ids.extend(r.ids.iter().copied().chain(std::iter::repeat_n(pad, n)));
        labels.extend(
            r.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, n)),
        );
        mask.extend(std::iter::repeat_n(1, r.ids.len()).chain(std::iter::repeat_n(0, n)));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // In the loss: every label but each row's first (a label is its token's target from the
    // position before).
    let targets = labels
        .chunks(s)
        .flat_map(|row| &row[1..])
        .filter(|&&l| l != IGNORE)
        .count();
    for (name, v) in [
        ("input_ids", &ids),
        ("labels", &labels),
        ("attention_mask", &mask),
    ] {
        write(&args.out.join(format!("{name}.npy")), v, rows.len(), s)?;
    }
    Ok(Written {
        records: records.len(),
        rows: rows.len(),
        tokens,
        targets,
        dropped,
    })
}

/// Writes `[rows, seq]` int64 values as `.npy`, atomically.
fn write(path: &Path, values: &[i64], rows: usize, seq: usize) -> Result<()> {
    let t = memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![rows, seq], values);
    crate::io::write_tensor(path, &t).with_context(|| format!("cannot write {}", path.display()))
}
