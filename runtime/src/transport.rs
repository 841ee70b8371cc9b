//! How the ranks of a distributed step find each other and exchange named buffers: the
//! [`Transport`] interface (MPI implements it, [`crate::mpi::Mpi`]), the launch environment
//! ([`RankEnv`]: `mpirun`'s, or Slurm's `srun` with PMIx) and the watchdog that keeps a rank
//! from waiting on a silent peer for ever ([`rank_timeout`]).

use std::time::Duration;

use crate::RunError;

/// How the ranks of a pipelined step exchange named buffers.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Sends `bytes`, named `name`, of microbatch `mb` of step `step`, to rank `to`.
    fn send(&self, to: usize, step: u64, mb: u32, name: &str, bytes: &[u8])
        -> Result<(), RunError>;
    /// Waits for `name` of microbatch `mb` of step `step` from rank `from`, and takes it.
    fn recv(&self, from: usize, step: u64, mb: u32, name: &str) -> Result<Vec<u8>, RunError>;
    /// Tells the other ranks that this one failed; best effort.
    fn abort(&self);
}

/// This process's place in a job launched as several ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// Its rank.
    pub rank: usize,
    /// The job's ranks.
    pub world: usize,
    /// Its index among the ranks on its node (`OMPI_COMM_WORLD_LOCAL_RANK`, `SLURM_LOCALID`),
    /// when the launcher says: the cuda backend takes GPU `local mod count` (else `rank mod
    /// count`).
    pub local: Option<usize>,
}

impl RankEnv {
    /// The rank and size `mpirun` (Open MPI: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`)
    /// or `srun --mpi=pmix` (`PMIX_RANK` with `SLURM_PROCID`, `SLURM_NTASKS`) gave this
    /// process; `None` for a single process. torchrun's variables alone (`RANK`,
    /// `WORLD_SIZE`) are refused: memc's ranks talk over MPI.
    pub fn from_env() -> Result<Option<RankEnv>, String> {
        RankEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// [`RankEnv::from_env`] over the variables `var` gives.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, String> {
        let num = |k: &str| -> Result<Option<usize>, String> {
            var(k)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| format!("{k} `{v}` is not a number"))
                })
                .transpose()
        };
        let found = match (num("OMPI_COMM_WORLD_RANK")?, num("OMPI_COMM_WORLD_SIZE")?) {
            (Some(rank), Some(world)) => Some((rank, world, num("OMPI_COMM_WORLD_LOCAL_RANK")?)),
            _ if var("PMIX_RANK").is_some() => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) => Some((rank, world, num("SLURM_LOCALID")?)),
                _ => None,
            },
            _ => None,
        };
        match found {
            Some((rank, world, _)) if rank >= world => Err(format!(
                "the launcher gave rank {rank} of {world} ranks"
            )),
            Some((rank, world, local)) if world > 1 => Ok(Some(RankEnv { rank, world, local })),
            Some(_) => Ok(None),
            None if num("WORLD_SIZE")?.is_some_and(|w| w > 1) => Err(
                "WORLD_SIZE is set (torchrun's launch): launch memc's ranks with mpirun -n N (or srun --mpi=pmix) instead"
                    .into(),
            ),
            None => Ok(None),
        }
    }
}

/// How long a rank waits for a peer's message before naming it (`MEMC_RANK_TIMEOUT`, seconds;
/// default 600): a peer that stopped or hangs is never waited on forever.
pub fn rank_timeout() -> Result<Duration, RunError> {
    match std::env::var("MEMC_RANK_TIMEOUT") {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && s.is_finite())
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                RunError::Usage(format!(
                    "MEMC_RANK_TIMEOUT `{v}` is not a positive number of seconds"
                ))
            }),
        Err(_) => Ok(Duration::from_secs(600)),
    }
}

/// The error of rank `me` whose wait for rank `from` outlasted `timeout`.
pub(crate) fn silent_peer(me: usize, from: usize, timeout: Duration) -> RunError {
    RunError::Usage(format!(
        "rank {me}: rank {from} sent nothing for {:.0} s (it stopped, hangs or failed; MEMC_RANK_TIMEOUT sets the wait)",
        timeout.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::RankEnv;

    fn env(vars: &[(&str, &str)]) -> Result<Option<RankEnv>, String> {
        RankEnv::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn launches_are_read_from_mpirun_and_srun() {
        let at = |rank, world, local| Ok(Some(RankEnv { rank, world, local }));
        assert_eq!(env(&[]), Ok(None));
        let mut ompi = vec![("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4")];
        assert_eq!(env(&ompi), at(2, 4, None));
        ompi.push(("OMPI_COMM_WORLD_LOCAL_RANK", "0"));
        assert_eq!(env(&ompi), at(2, 4, Some(0)));
        let mut slurm = vec![
            ("PMIX_RANK", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ];
        assert_eq!(env(&slurm), at(1, 2, None));
        slurm.push(("SLURM_LOCALID", "1"));
        assert_eq!(env(&slurm), at(1, 2, Some(1)));
        // Slurm's variables without PMIx: not an MPI launch memc can join.
        assert_eq!(env(&slurm[1..3]), Ok(None));
        assert_eq!(
            env(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")]),
            Ok(None)
        );
        let e = env(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")]).unwrap_err();
        assert!(e.contains("rank 4 of 4 ranks"), "{e}");
        let e = env(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "4")]).unwrap_err();
        assert!(
            e.contains("OMPI_COMM_WORLD_RANK `x` is not a number"),
            "{e}"
        );
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.contains("launch memc's ranks with mpirun"), "{e}");
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]), Ok(None));
    }
}
