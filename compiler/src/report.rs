//! Reports on a compiled graph: the machine-readable `--report-json` object (stable keys) and
//! the human `--report` table.

use std::fmt::Write;

use memc_ir::{Graph, ParamRole, Phase, ValueDef};
use memc_passes::plan::{flops, Category, Plan, ALIGN};
use memc_passes::summary::Recognition;
use serde_json::{json, Value};

/// Wall time of one compiler phase.
#[derive(Debug, Clone)]
pub struct PhaseTime {
    /// The phase (`import`, `verify`, ...).
    pub name: &'static str,
    /// Milliseconds.
    pub ms: f64,
}

/// The `--report-json` object. Keys: `model`, `op_counts` (the model's ops after
/// canonicalisation: `attention`, `rms_norm`, `swiglu_ffn`, ...), `program_op_counts` (the
/// compiled program's, after block lowering and training), `nodes`, `params`,
/// `params_bytes`, `constant_bytes`, `inputs`, `outputs`, `passes` (later issues add memory
/// keys).
pub fn json_report(
    model: &str,
    g: &Graph,
    model_ops: &std::collections::BTreeMap<&'static str, usize>,
    phases: &[PhaseTime],
) -> Value {
    let io = |v: memc_ir::ValueId, name: &str| {
        let ty = &g.value(v).ty;
        json!({"name": name, "dtype": ty.dtype.name(), "shape": ty.shape})
    };
    let inputs: Vec<Value> = g
        .inputs()
        .iter()
        .map(|&v| match &g.value(v).def {
            ValueDef::Input { name } => io(v, name),
            _ => unreachable!("verified graph"),
        })
        .collect();
    let outputs: Vec<Value> = g.outputs().iter().map(|(n, v)| io(*v, n)).collect();
    let constant_bytes: usize = g
        .values()
        .iter()
        .filter(|v| {
            matches!(
                v.def,
                ValueDef::Param {
                    role: ParamRole::Constant,
                    ..
                } | ValueDef::Const(_)
            )
        })
        .map(|v| v.ty.bytes())
        .sum();
    json!({
        "model": model,
        "op_counts": model_ops,
        "program_op_counts": g.op_counts(),
        "nodes": g.nodes().len(),
        "params": g.params_numel(),
        "params_bytes": g.params_bytes(),
        "constant_bytes": constant_bytes,
        "inputs": inputs,
        "outputs": outputs,
        "passes": phases.iter().map(|p| json!({"name": p.name, "ms": p.ms})).collect::<Vec<_>>(),
    })
}

/// `--report-json`'s `layers`: one object per layer (`attention` with `heads`, `kv_heads`,
/// `kind`, `causal`, `window`, `softcap` and `full_mask`, or null when unrecognised; `ffn`, `ffn_fused_gate_up`, `norm`, `norms`,
/// `qk_norms`, `residual`, `unrecognised`), and `unrecognised` beside them when nothing was.
pub fn layers_json(r: &Recognition) -> Value {
    let layers: Vec<Value> = r
        .layers
        .iter()
        .map(|l| {
            json!({
                "attention": l.attention.as_ref().map(|a| json!({
                    "heads": a.heads, "kv_heads": a.kv_heads, "kind": a.kind(),
                    "causal": a.scores.causal, "window": a.scores.window,
                    "softcap": a.scores.softcap, "full_mask": a.full_mask,
                })),
                "ffn": l.ffn,
                "ffn_fused_gate_up": l.ffn_fused_gate_up,
                "norm": l.norm,
                "norms": l.norms,
                "qk_norms": l.qk_norms,
                "residual": l.residual,
                "unrecognised": l.unrecognised,
            })
        })
        .collect();
    Value::Array(layers)
}

/// `--report`'s recognition lines: one per layer, then what was not recognised.
pub fn layers_text(r: &Recognition) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "layers: {}", r.layers.len());
    for (i, l) in r.layers.iter().enumerate() {
        let attention = match &l.attention {
            Some(a) => {
                let notes: String = a.notes().iter().map(|n| format!(", {n}")).collect();
                format!(
                    "attention {} ({} heads, {} kv{notes})",
                    a.kind(),
                    a.heads,
                    a.kv_heads
                )
            }
            None => "attention UNRECOGNISED".into(),
        };
        let _ = writeln!(
            s,
            "  layer {i}: {attention}, ffn {}{}, {} x {}{}, {}",
            l.ffn,
            if l.ffn_fused_gate_up {
                " (fused gate/up)"
            } else {
                ""
            },
            l.norms,
            l.norm,
            if l.qk_norms > 0 {
                format!(" + {} q/k norms", l.qk_norms)
            } else {
                String::new()
            },
            l.residual
        );
    }
    for u in &r.unrecognised {
        let _ = writeln!(
            s,
            "  not recognised: {}{}; rules out {}",
            u.what,
            if u.nodes.is_empty() {
                String::new()
            } else {
                format!(" ({})", u.nodes.join(", "))
            },
            u.rules_out
        );
    }
    s
}

/// A short human summary of a graph: sizes and op counts.
pub fn summary(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "graph: {} nodes, {} weight tensors ({} parameters, {} bytes)",
        g.nodes().len(),
        g.weights().count(),
        g.params_numel(),
        g.params_bytes()
    );
    for &v in g.inputs() {
        if let ValueDef::Input { name } = &g.value(v).def {
            let _ = writeln!(s, "  input  {name}: {}", g.value(v).ty);
        }
    }
    for (name, v) in g.outputs() {
        let _ = writeln!(s, "  output {name}: {}", g.value(*v).ty);
    }
    let counts: Vec<String> = g
        .op_counts()
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(s, "  ops: {}", counts.join(", "));
    s
}

/// Plan figures for `--report-json`: `peak_bytes`, `max_live_bytes`, `grads_bytes`,
/// `optimizer_bytes`, `saved_activation_bytes`, `flops`, `recompute_flops`, `at_peak`
/// (bytes per category at the peak step) and `totals` (bytes per category over the step).
pub fn plan_json(g: &Graph, plan: &Plan) -> Value {
    let cat = |m: &std::collections::HashMap<Category, u64>| -> serde_json::Map<String, Value> {
        Category::ALL
            .iter()
            .map(|c| (c.name().to_string(), json!(m.get(c).copied().unwrap_or(0))))
            .collect()
    };
    let phase_flops = |p: &[Phase]| flops(g, p);
    json!({
        "peak_bytes": plan.peak_bytes,
        "max_live_bytes": plan.max_live_bytes,
        "saved_activation_bytes": plan.saved_activation_bytes,
        "grads_bytes": plan.totals.get(&Category::Gradients).copied().unwrap_or(0),
        "optimizer_bytes": plan.totals.get(&Category::OptimizerState).copied().unwrap_or(0),
        "flops": phase_flops(&[Phase::Forward, Phase::Backward, Phase::Weight, Phase::Update, Phase::Recompute]),
        "forward_flops": phase_flops(&[Phase::Forward]),
        "backward_flops": phase_flops(&[Phase::Backward, Phase::Weight]),
        "recompute_flops": phase_flops(&[Phase::Recompute]),
        "at_peak": cat(&plan.at_peak),
        "totals": cat(&plan.totals),
        "buffer_alignment": ALIGN,
        "steps": plan.steps,
    })
}

/// The human memory table of `--report`.
pub fn plan_table(g: &Graph, plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "memory plan: peak {} bytes (one arena, {}-byte aligned buffers, {} steps)",
        plan.peak_bytes, ALIGN, plan.steps
    );
    let _ = writeln!(
        s,
        "  {:<22} {:>14} {:>14}",
        "category", "at peak", "all buffers"
    );
    for c in Category::ALL {
        let _ = writeln!(
            s,
            "  {:<22} {:>14} {:>14}",
            c.name(),
            plan.at_peak.get(&c).copied().unwrap_or(0),
            plan.totals.get(&c).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        s,
        "  {:<22} {:>14}",
        "fragmentation",
        plan.peak_bytes - plan.max_live_bytes
    );
    let _ = writeln!(
        s,
        "saved activations (forward values read by the backward pass): {} bytes",
        plan.saved_activation_bytes
    );
    let _ = writeln!(
        s,
        "flops: forward {}, backward {} (B {}, W {}), update {}",
        flops(g, &[Phase::Forward]),
        flops(g, &[Phase::Backward, Phase::Weight]),
        flops(g, &[Phase::Backward]),
        flops(g, &[Phase::Weight]),
        flops(g, &[Phase::Update])
    );
    s
}

/// An SVG of live bytes over program steps, stacked by category.
pub fn plan_svg(plan: &Plan, title: &str) -> String {
    let timeline = plan.timeline();
    let (w, h, left, bottom, top) = (900.0f64, 420.0f64, 90.0f64, 50.0f64, 40.0f64);
    let plot_w = w - left - 170.0;
    let plot_h = h - bottom - top;
    let cols = timeline.len().min(plot_w as usize).max(1);
    // Each column shows the step of its bucket with the most live bytes.
    let bucket: Vec<[u64; 6]> = (0..cols)
        .map(|c| {
            let lo = c * timeline.len() / cols;
            let hi = ((c + 1) * timeline.len() / cols).max(lo + 1);
            *timeline[lo..hi]
                .iter()
                .max_by_key(|r| r.iter().sum::<u64>())
                .unwrap()
        })
        .collect();
    let ymax = (plan.max_live_bytes.max(1)) as f64;
    let x = |c: f64| left + c * plot_w / cols as f64;
    let y = |b: f64| top + plot_h - b * plot_h / ymax;
    let colors = [
        "#4e79a7", "#f28e2b", "#76b7b2", "#e15759", "#edc948", "#bab0ac",
    ];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="24" font-size="15">{title}: live bytes per step (peak {} bytes)</text>
"#,
        plan.peak_bytes
    );
    let mut below = vec![0u64; cols];
    for (k, color) in colors.iter().enumerate() {
        let mut pts = Vec::new();
        for (c, row) in bucket.iter().enumerate() {
            pts.push(format!(
                "{:.1},{:.1}",
                x(c as f64),
                y((below[c] + row[k]) as f64)
            ));
            pts.push(format!(
                "{:.1},{:.1}",
                x(c as f64 + 1.0),
                y((below[c] + row[k]) as f64)
            ));
        }
        for c in (0..cols).rev() {
            pts.push(format!(
                "{:.1},{:.1}",
                x(c as f64 + 1.0),
                y(below[c] as f64)
            ));
            pts.push(format!("{:.1},{:.1}", x(c as f64), y(below[c] as f64)));
        }
        for (c, row) in bucket.iter().enumerate() {
            below[c] += row[k];
        }
        s += &format!(
            "<polygon points=\"{}\" fill=\"{color}\" stroke=\"none\"/>\n",
            pts.join(" ")
        );
        let ly = top + 20.0 * k as f64;
        s += &format!(
            "<rect x=\"{:.0}\" y=\"{:.0}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{:.0}\" y=\"{:.0}\">{}</text>\n",
            left + plot_w + 15.0,
            ly,
            left + plot_w + 32.0,
            ly + 11.0,
            Category::ALL[k].name()
        );
    }
    for i in 0..=4 {
        let b = ymax * i as f64 / 4.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ccc\"/><text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{:.2} MB</text>\n",
            left + plot_w,
            y(b),
            y(b),
            left - 6.0,
            y(b) + 4.0,
            b / 1e6
        );
    }
    s += &format!(
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">program step (0..{})</text>\n</svg>\n",
        left + plot_w / 2.0,
        h - 15.0,
        timeline.len()
    );
    s
}

/// `--emit plan`: the execution order and every buffer ([`memc_passes::plan::text`]).
pub fn plan_text(g: &Graph, plan: &Plan) -> String {
    memc_passes::plan::text(g, plan)
}

/// One weight or frozen initializer, for the report's parameter table.
#[derive(Debug, Clone)]
pub struct ParamRow {
    /// Its name (the checkpoint's, or the ONNX initializer's when it is no parameter).
    pub name: String,
    /// Whether the training step updates it.
    pub trained: bool,
    /// Whether it is one of the model's parameters (else a buffer or a folded constant).
    pub weight: bool,
    /// Why it is a parameter or not.
    pub why: String,
}

/// The `--report` lines on parameters: the trained count, then every frozen initializer and
/// parameter with why (`--report-json`'s `parameters` lists them all).
pub fn parameters_text(rows: &[ParamRow]) -> String {
    let trained = rows.iter().filter(|r| r.trained).count();
    let weights = rows.iter().filter(|r| r.weight).count();
    let frozen = rows.len() - trained;
    let mut out = format!(
        "parameters: {trained} of the model's {weights} parameters trained; {frozen} initializers frozen{}\n",
        if frozen > 0 { ":" } else { "" }
    );
    for r in rows.iter().filter(|r| !r.weight) {
        out.push_str(&format!("  frozen {:<40} {}\n", r.name, r.why));
    }
    for r in rows.iter().filter(|r| r.weight && !r.trained) {
        out.push_str(&format!(
            "  frozen {:<40} a parameter --trainable leaves out\n",
            r.name
        ));
    }
    out
}

/// `--report-json`'s `parameters`: every weight and frozen initializer with whether it is
/// trained and why.
pub fn parameters_json(rows: &[ParamRow]) -> serde_json::Value {
    rows.iter()
        .map(|r| serde_json::json!({"name": r.name, "trained": r.trained, "parameter": r.weight, "why": r.why}))
        .collect()
}
