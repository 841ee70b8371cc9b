//! The reference interpreter as a runtime [`Backend`]: a graph run by `memc_ir::run` behind a
//! program interface ([`crate::host::interface`]), so the runtime's executors (the pipelined
//! step, the training loop) run the interpreter exactly as they run generated kernels. The
//! runtime depends on no workspace crate; this crate, which depends on both, plugs it in.

use std::collections::HashMap;

use memc_ir::{Graph, RunOptions, Tensor, ValueDef, ValueId};
use memc_runtime::cpu::Arena;
use memc_runtime::program::{Program, Slot};
use memc_runtime::{Backend, RunError};

/// A graph on the reference interpreter, its inputs, outputs and parameters in one arena laid
/// out as its program says.
pub struct Reference {
    g: Graph,
    program: Program,
    arena: Arena,
    /// The value of each input and parameter slot name.
    values: HashMap<String, ValueId>,
    /// Stop at the first node with a non-finite result, naming it.
    check_nan: bool,
    /// The bytes reported as the arena (the memory plan's peak, when the caller gives it).
    reported_bytes: u64,
}

impl Reference {
    /// `g` behind `program` (its interface, [`crate::host::interface`]).
    pub fn new(g: Graph, program: &Program) -> Reference {
        let values = g
            .values()
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.def {
                ValueDef::Input { name } | ValueDef::Param { name, .. } => {
                    Some((name.clone(), ValueId(i as u32)))
                }
                _ => None,
            })
            .collect();
        Reference {
            check_nan: false,
            reported_bytes: program.arena_bytes,
            arena: Arena::new(program.arena_bytes),
            program: program.clone(),
            g,
            values,
        }
    }

    /// Also stops at the first node whose result is not finite, naming the node (the
    /// reference backend's training loop).
    pub fn checked(mut self) -> Reference {
        self.check_nan = true;
        self
    }

    /// Reports `bytes` as its arena: what the graph's memory plan allocates, which the
    /// interpreter stands for.
    pub fn reporting(mut self, bytes: u64) -> Reference {
        self.reported_bytes = bytes;
        self
    }

    fn tensor(&self, slot: &Slot) -> Result<(ValueId, Tensor), RunError> {
        let v = *self.values.get(&slot.name).ok_or_else(|| {
            RunError::Usage(format!("`{}` is not a value of the graph", slot.name))
        })?;
        let ty = self.g.value(v).ty.clone();
        let t = Tensor::from_bytes(ty, self.arena.get(slot).to_vec().into())
            .map_err(|e| RunError::Usage(format!("`{}`: {e}", slot.name)))?;
        Ok((v, t))
    }
}

impl Backend for Reference {
    fn name(&self) -> &'static str {
        "ref"
    }

    fn arena_bytes(&self) -> u64 {
        self.reported_bytes
    }

    fn set(&mut self, slot: &Slot, bytes: &[u8]) -> Result<(), RunError> {
        if bytes.len() as u64 != slot.bytes() {
            return Err(RunError::Usage(format!(
                "`{}`: {} bytes for {}",
                slot.name,
                bytes.len(),
                slot.type_string()
            )));
        }
        self.arena.set(slot, bytes);
        Ok(())
    }

    fn get(&mut self, slot: &Slot) -> Result<Vec<u8>, RunError> {
        Ok(self.arena.get(slot).to_vec())
    }

    /// Runs the graph once: parameters and inputs from the arena, outputs and updated
    /// parameters back into it.
    fn run(&mut self) -> Result<(), RunError> {
        let mut feeds = HashMap::new();
        for slot in &self.program.inputs {
            let (_, t) = self.tensor(slot)?;
            feeds.insert(slot.name.clone(), t);
        }
        for p in &self.program.params {
            let (v, t) = self.tensor(&p.slot)?;
            self.g.set_param_data(v, t);
        }
        let opts = RunOptions {
            check_nan: self.check_nan,
        };
        let out =
            memc_ir::run(&self.g, &feeds, &opts).map_err(|e| RunError::Usage(e.to_string()))?;
        for (slot, (_, t)) in self.program.outputs.iter().zip(&out.outputs) {
            self.arena.set(slot, t.bytes());
        }
        let slot_of: HashMap<ValueId, &Slot> = self
            .program
            .params
            .iter()
            .filter_map(|p| self.values.get(&p.slot.name).map(|&v| (v, &p.slot)))
            .collect();
        for (p, t) in &out.updates {
            if let Some(slot) = slot_of.get(p) {
                self.arena.set(slot, t.bytes());
            }
        }
        Ok(())
    }

    fn profile(&self) -> Option<String> {
        None
    }
}
