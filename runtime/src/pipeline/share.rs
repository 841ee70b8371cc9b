//! What one process of a pipelined step holds, computed from the program alone: the passes
//! and optimizer programs it runs, where each weight and piece of optimizer state lives, the
//! layout of its step arena and the averaged values it sums. The executor allocates from
//! this ([`super::Pipelined`]) and the compile report prints it ([`planned`]), so the two
//! agree by construction and a test can hold the executor to it.
//!
//! A process is the whole step (`at` is `None`: every stage in one process) or one rank:
//! stage `s` of replica `k` (rank `k·P + s`). A rank runs its stage's passes, the gradient
//! sums (`late`, on the stages whose optimizer reads them) and at most one optimizer program, its (stage, replica) shard
//! ([`Pipeline::updates`]); it keeps the weights its passes read (in the optimizer's arena
//! when it updates them, else in the step arena) and only its shard's optimizer state.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::program::{Pipeline, Program, Role, Slot};
use crate::RunError;

/// Where a weight or a piece of optimizer state lives in a process.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Home {
    /// The step's arena, at this slot.
    Step(Slot),
    /// The arena of the process's `k`-th optimizer program, which updates it in place.
    Update(usize, Slot),
}

/// One process's share of a pipelined step (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Share {
    /// Indices in [`Pipeline::passes`] of the passes run here.
    pub passes: Vec<usize>,
    /// Indices in [`Pipeline::updates`] of the optimizer programs run here.
    pub updates: Vec<usize>,
    /// Where each weight and piece of optimizer state kept here lives (two homes: a tied
    /// weight updated by two optimizer programs of one process).
    pub homes: HashMap<String, Vec<Home>>,
    /// The step arena's slots: the step's inputs, its loss and the weights kept outside
    /// the optimizer programs.
    pub step: HashMap<String, Slot>,
    /// The step arena's bytes.
    pub step_bytes: u64,
    /// The averaged values summed here (in [`Pipeline::averaged`] order) and their elements.
    pub sums: Vec<(String, usize)>,
}

/// The averaged values each stage's optimizer programs read, and the loss (every stage).
pub(crate) fn needs(spec: &Pipeline) -> Vec<HashSet<String>> {
    let mut needs: Vec<HashSet<String>> = (0..spec.stages)
        .map(|_| HashSet::from([spec.loss.clone()]))
        .collect();
    for u in &spec.updates {
        for i in &u.program.inputs {
            if spec.averaged.contains(&i.name) {
                if let Some(n) = needs.get_mut(u.device as usize) {
                    n.insert(i.name.clone());
                }
            }
        }
    }
    needs
}

/// The stages that run the gradient sums over chunks (`late`): those whose optimizer
/// programs read what they output (a tied weight's stages), each on its own replica's values.
pub(crate) fn late_stages(spec: &Pipeline) -> Vec<usize> {
    let Some(late) = &spec.late else {
        return vec![];
    };
    let mut stages: Vec<usize> = spec
        .updates
        .iter()
        .filter(|u| {
            u.program
                .inputs
                .iter()
                .any(|i| late.program.outputs.iter().any(|o| o.name == i.name))
        })
        .map(|u| u.device as usize)
        .collect();
    stages.sort();
    stages.dedup();
    stages
}

/// Whether process `at` runs the gradient sums over chunks.
pub(crate) fn runs_late(spec: &Pipeline, at: Option<(usize, usize)>) -> bool {
    spec.late.is_some() && at.is_none_or(|(s, _)| late_stages(spec).contains(&s))
}

/// The share of process `at` ((stage, replica), or `None` for the whole step in one process).
pub(crate) fn share(program: &Program, at: Option<(usize, usize)>) -> Result<Share, RunError> {
    let spec = program
        .pipeline
        .as_ref()
        .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
    let passes: Vec<usize> = (0..spec.passes.len())
        .filter(|&k| at.is_none_or(|(s, _)| spec.passes[k].device as usize == s))
        .collect();
    let updates: Vec<usize> = (0..spec.updates.len())
        .filter(|&k| {
            let u = &spec.updates[k];
            at.is_none_or(|(s, r)| (u.device as usize, u.shard as usize) == (s, r))
        })
        .collect();
    let mut homes: HashMap<String, Vec<Home>> = HashMap::new();
    for (local, &k) in updates.iter().enumerate() {
        for q in &spec.updates[k].program.params {
            homes
                .entry(q.slot.name.clone())
                .or_default()
                .push(Home::Update(local, q.slot.clone()));
        }
    }
    // The step arena: inputs, the loss, then the weights read here that no optimizer
    // program here keeps.
    let mut offset = 0u64;
    let mut step = HashMap::new();
    let mut place = |s: &Slot| {
        let slot = Slot {
            offset,
            ..s.clone()
        };
        offset = (offset + slot.bytes()).next_multiple_of(256);
        slot
    };
    for s in program.inputs.iter().chain(&program.outputs) {
        step.insert(s.name.clone(), place(s));
    }
    let read: HashSet<&str> = passes
        .iter()
        .map(|&k| &spec.passes[k].program)
        .chain(
            spec.late
                .as_ref()
                .filter(|_| runs_late(spec, at))
                .map(|l| &l.program),
        )
        .flat_map(|p| p.params.iter().map(|q| q.slot.name.as_str()))
        .collect();
    for p in &program.params {
        if read.contains(p.slot.name.as_str()) && !homes.contains_key(&p.slot.name) {
            let slot = place(&p.slot);
            step.insert(p.slot.name.clone(), slot.clone());
            homes.insert(p.slot.name.clone(), vec![Home::Step(slot)]);
        }
    }
    // Sums: what the passes here produce, what this stage's optimizer programs read, the
    // loss, and the gradient sums' outputs where they run.
    let mut size: HashMap<&str, (usize, bool)> = HashMap::new();
    for (k, sub) in spec.passes.iter().enumerate() {
        for o in &sub.program.outputs {
            size.insert(&o.name, (o.shape.iter().product(), passes.contains(&k)));
        }
    }
    for o in spec.late.iter().flat_map(|l| &l.program.outputs) {
        size.insert(&o.name, (o.shape.iter().product(), runs_late(spec, at)));
    }
    let needs = needs(spec);
    let mut sums = vec![];
    for name in &spec.averaged {
        let Some(&(n, made_here)) = size.get(name.as_str()) else {
            continue;
        };
        let needed = match at {
            None => true,
            Some((s, _)) => needs.get(s).is_some_and(|x| x.contains(name)),
        };
        if made_here || needed {
            sums.push((name.clone(), n));
        }
    }
    Ok(Share {
        passes,
        updates,
        homes,
        step,
        step_bytes: offset,
        sums,
    })
}

/// One process's planned bytes: what the executor allocates for it, split by what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Its stage and replica (`None`: the whole step in one process).
    pub at: Option<(usize, usize)>,
    /// Weights kept (in the step arena or an optimizer program's arena).
    pub weights: u64,
    /// Optimizer state kept (this rank's shard).
    pub optimizer_state: u64,
    /// The f32 sums of averaged values (weight gradients, the loss) over the microbatches.
    pub gradient_sums: u64,
    /// Everything else: the passes' arenas (activations, working copies of the weights they
    /// read, gradients as computed), the optimizer's gradient inputs and temporaries, the
    /// step's inputs.
    pub working: u64,
    /// All of it: the step arena, every program arena and the sums.
    pub total: u64,
}

/// The planned bytes of process `at` (see [`Planned`]).
pub fn planned_at(program: &Program, at: Option<(usize, usize)>) -> Result<Planned, RunError> {
    let share = share(program, at)?;
    let spec = program.pipeline.as_ref().expect("checked by share");
    let role: HashMap<&str, Role> = program
        .params
        .iter()
        .map(|p| (p.slot.name.as_str(), p.role))
        .collect();
    let (mut weights, mut optimizer_state) = (0, 0);
    for (name, homes) in &share.homes {
        let bytes: u64 = homes
            .iter()
            .map(|h| match h {
                Home::Step(s) | Home::Update(_, s) => s.bytes(),
            })
            .sum();
        match role.get(name.as_str()) {
            Some(Role::OptimizerState) => optimizer_state += bytes,
            _ => weights += bytes,
        }
    }
    let gradient_sums: u64 = share.sums.iter().map(|(_, n)| 4 * *n as u64).sum();
    let total = share.step_bytes
        + share
            .passes
            .iter()
            .map(|&k| spec.passes[k].program.arena_bytes)
            .sum::<u64>()
        + spec
            .late
            .as_ref()
            .filter(|_| runs_late(spec, at))
            .map_or(0, |l| l.program.arena_bytes)
        + share
            .updates
            .iter()
            .map(|&k| spec.updates[k].program.arena_bytes)
            .sum::<u64>()
        + gradient_sums;
    Ok(Planned {
        at,
        weights,
        optimizer_state,
        gradient_sums,
        working: total - weights - optimizer_state - gradient_sums,
        total,
    })
}

/// The planned bytes of every rank (rank `r` is stage `r mod P` of replica `r / P`) when the
/// step runs as one process per stage and replica.
pub fn planned(program: &Program) -> Result<Vec<Planned>, RunError> {
    let spec = program
        .pipeline
        .as_ref()
        .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
    let (p, d) = (spec.stages as usize, spec.data_parallel as usize);
    (0..p * d)
        .map(|r| planned_at(program, Some((r % p, r / p))))
        .collect()
}

/// What each way of running the step allocates, labelled: the whole step in one process
/// (`one process`, without data-parallel replicas), then each rank of one process per stage
/// and replica (`rank r (stage s, replica k)`).
pub fn processes(program: &Program) -> Result<Vec<(String, Planned)>, RunError> {
    let mut rows = vec![];
    if program
        .pipeline
        .as_ref()
        .is_some_and(|p| p.data_parallel == 1)
    {
        rows.push(("one process".to_string(), planned_at(program, None)?));
    }
    for (r, b) in planned(program)?.into_iter().enumerate() {
        let (s, k) = b.at.unwrap_or_default();
        rows.push((format!("rank {r} (stage {s}, replica {k})"), b));
    }
    Ok(rows)
}

/// Which rank saves each weight and piece of optimizer state: the lowest that keeps it.
pub(crate) fn savers(program: &Program) -> Result<BTreeMap<String, usize>, RunError> {
    let spec = program
        .pipeline
        .as_ref()
        .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
    let (p, d) = (spec.stages as usize, spec.data_parallel as usize);
    let mut saver = BTreeMap::new();
    for r in 0..p * d {
        for name in share(program, Some((r % p, r / p)))?.homes.into_keys() {
            saver.entry(name).or_insert(r);
        }
    }
    for q in &program.params {
        if !saver.contains_key(&q.slot.name) {
            return Err(RunError::Usage(format!(
                "no rank keeps `{}` (a memc bug)",
                q.slot.name
            )));
        }
    }
    Ok(saver)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient sums over chunks run only on the stages whose optimizer reads them: the
    /// other stages neither allocate their arena nor sum their outputs.
    #[test]
    fn gradient_sums_run_only_where_they_are_read() {
        let mut p = crate::program::tests::pipelined();
        let spec = p.pipeline.as_mut().unwrap();
        let mut late = spec.passes[0].clone();
        late.label = "late".into();
        late.program.inputs[0].name = "x.1".into();
        late.program.outputs[0].name = "x.3".into();
        let mut u1 = spec.updates[0].clone();
        u1.label = "U1".into();
        u1.device = 1;
        spec.updates[0].program.inputs[0].name = "x.3".into();
        spec.updates.push(u1);
        spec.averaged.push("x.3".into());
        let mut without = p.clone();
        without.pipeline.as_mut().unwrap().late = None;
        let late_bytes = late.program.arena_bytes + 4 * 4;
        p.pipeline.as_mut().unwrap().late = Some(late);
        let spec = p.pipeline.as_ref().unwrap();
        assert_eq!(late_stages(spec), [0]);
        assert!(runs_late(spec, None) && runs_late(spec, Some((0, 0))));
        assert!(!runs_late(spec, Some((1, 0))));
        let total = |p: &Program, at| planned_at(p, at).unwrap().total;
        assert_eq!(total(&p, Some((1, 0))), total(&without, Some((1, 0))));
        assert_eq!(
            total(&p, Some((0, 0))),
            total(&without, Some((0, 0))) + late_bytes
        );
        assert!(!share(&p, Some((1, 0)))
            .unwrap()
            .sums
            .iter()
            .any(|(n, _)| n == "x.3"));
    }
}
