//! One process per pipeline stage (torchrun's conventions): the ranks of a step find each
//! other through `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, and send each other
//! named byte buffers over TCP (the CPU stand-in for NCCL's point-to-point sends).
//!
//! Rank `r` listens on `MASTER_ADDR:MASTER_PORT + 1 + r` (`MASTER_PORT` itself is torchrun's
//! store) and connects to every other rank: a full mesh, one receiver thread per peer filing
//! what arrives. A message is keyed by (step, microbatch, name); a rank that fails sends an
//! abort instead, and a rank waiting for a message from a peer whose connection closed fails
//! at once, naming it.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::RunError;

/// The key of the message a failing rank sends instead of a value.
const ABORT: u64 = u64::MAX;

/// How the ranks of a pipelined step exchange named buffers: the TCP [`Mesh`] or MPI
/// ([`crate::mpi::Mpi`]).
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

/// The launch environment of this process, if launched as one rank of several: by an MPI
/// launcher (`mpirun`), or with torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// `RANK` (`OMPI_COMM_WORLD_RANK` under mpirun).
    pub rank: usize,
    /// `WORLD_SIZE` (`OMPI_COMM_WORLD_SIZE`).
    pub world: usize,
    /// `MASTER_ADDR` (default 127.0.0.1).
    pub addr: String,
    /// `MASTER_PORT` (default 29500).
    pub port: u16,
    /// Launched by MPI: the ranks talk over MPI, not the TCP mesh.
    pub mpi: bool,
}

impl RankEnv {
    /// Reads Open MPI's rank and size, else RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
    /// `None` for a single process.
    pub fn from_env() -> Result<Option<RankEnv>, String> {
        if let Some((rank, world)) = crate::mpi::launched() {
            return Ok(Some(RankEnv {
                rank,
                world,
                addr: String::new(),
                port: 0,
                mpi: true,
            }));
        }
        let var = |k: &str| std::env::var(k).ok();
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let world: usize = world
            .parse()
            .map_err(|_| format!("WORLD_SIZE `{world}` is not a number"))?;
        if world <= 1 {
            return Ok(None);
        }
        let rank: usize = var("RANK")
            .ok_or("WORLD_SIZE is set but RANK is not (launch with torchrun or set both)")?
            .parse()
            .map_err(|_| "RANK is not a number".to_string())?;
        if rank >= world {
            return Err(format!("RANK {rank} is not below WORLD_SIZE {world}"));
        }
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port: u16 = var("MASTER_PORT")
            .unwrap_or_else(|| "29500".into())
            .parse()
            .map_err(|_| "MASTER_PORT is not a port number".to_string())?;
        if port as usize + world >= 65536 {
            return Err(format!(
                "MASTER_PORT {port} + WORLD_SIZE {world} is past the last port"
            ));
        }
        Ok(Some(RankEnv {
            rank,
            world,
            addr,
            port,
            mpi: false,
        }))
    }
}

/// What has arrived, waited on.
#[derive(Default)]
struct Inbox {
    messages: Mutex<Arrived>,
    ready: Condvar,
    failed: AtomicBool,
}

/// A message's key: step, microbatch, name.
type Key = (u64, u32, String);

#[derive(Default)]
struct Arrived {
    values: HashMap<Key, Vec<u8>>,
    /// Ranks whose connection closed, and why (`None`: it just ended).
    closed: HashMap<usize, Option<String>>,
}

/// The connections of this rank to every other.
pub struct Mesh {
    rank: usize,
    world: usize,
    peers: Vec<Option<Mutex<TcpStream>>>,
    inbox: Arc<Inbox>,
    /// How long a receive waits for its peer ([`rank_timeout`]).
    timeout: Duration,
}

/// What a rank says first on a connection, then its rank: a listener that answers otherwise
/// is not a memc rank.
const MAGIC: &[u8; 4] = b"MEMC";

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

impl Mesh {
    /// Listens, connects to every peer (retrying for up to `timeout`) and starts the
    /// receivers.
    pub fn connect(env: &RankEnv, timeout: Duration) -> Result<Mesh, RunError> {
        let port = |r: usize| env.port + 1 + r as u16;
        let fail = |msg: String| RunError::Usage(format!("rank {}: {msg}", env.rank));
        let listener = TcpListener::bind((env.addr.as_str(), port(env.rank))).map_err(|e| {
            fail(format!(
                "cannot listen on {}:{}: {e}",
                env.addr,
                port(env.rank)
            ))
        })?;
        let inbox = Arc::new(Inbox::default());
        let (me, world) = (env.rank, env.world);
        let rx = inbox.clone();
        std::thread::spawn(move || {
            // Accept until every other rank has introduced itself once; anything else that
            // connects (a port scan, a health check) is dropped.
            let mut seen = vec![false; world];
            seen[me] = true;
            let mut accepted = 1;
            while accepted < world {
                let Ok((mut stream, _)) = listener.accept() else {
                    rx.fail();
                    return;
                };
                stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut hello = [0u8; 8];
                if stream.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
                    continue;
                }
                let peer = u32::from_le_bytes(hello[4..].try_into().expect("4 bytes")) as usize;
                if peer >= world || std::mem::replace(&mut seen[peer], true) {
                    continue;
                }
                // The answer that tells the peer it reached a memc rank.
                let mut ack = MAGIC.to_vec();
                ack.extend((me as u32).to_le_bytes());
                if stream.write_all(&ack).is_err() {
                    continue;
                }
                stream.set_read_timeout(None).ok();
                accepted += 1;
                let rx = rx.clone();
                std::thread::spawn(move || loop {
                    match read_message(&mut stream) {
                        Ok(Some((key, bytes))) => {
                            let mut m = rx.messages.lock().unwrap_or_else(|e| e.into_inner());
                            m.values.insert(key, bytes);
                            rx.ready.notify_all();
                        }
                        end => {
                            let why = end.err();
                            let mut m = rx.messages.lock().unwrap_or_else(|e| e.into_inner());
                            m.closed.insert(peer, why);
                            rx.ready.notify_all();
                            return;
                        }
                    }
                });
            }
        });
        let start = Instant::now();
        let mut peers = Vec::with_capacity(world);
        for r in 0..world {
            if r == me {
                peers.push(None);
                continue;
            }
            let mut stream = loop {
                match TcpStream::connect((env.addr.as_str(), port(r))) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > timeout => {
                        return Err(fail(format!(
                            "cannot reach rank {r} at {}:{} after {:.0} s: {e}",
                            env.addr,
                            port(r),
                            timeout.as_secs_f64()
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            stream.set_nodelay(true).ok();
            let mut hello = MAGIC.to_vec();
            hello.extend((me as u32).to_le_bytes());
            stream
                .write_all(&hello)
                .map_err(|e| fail(format!("cannot greet rank {r}: {e}")))?;
            // Whatever listens there must answer as memc's rank r.
            stream
                .set_read_timeout(Some(timeout.min(Duration::from_secs(10))))
                .ok();
            let mut ack = [0u8; 8];
            let answered = stream.read_exact(&mut ack).is_ok()
                && &ack[..4] == MAGIC
                && u32::from_le_bytes(ack[4..].try_into().expect("4 bytes")) as usize == r;
            if !answered {
                return Err(fail(format!(
                    "{}:{} answers, but not as memc's rank {r} (another program holds the port? set MASTER_PORT)",
                    env.addr,
                    port(r)
                )));
            }
            stream.set_read_timeout(None).ok();
            peers.push(Some(Mutex::new(stream)));
        }
        Ok(Mesh {
            rank: me,
            world,
            peers,
            inbox,
            timeout: rank_timeout()?,
        })
    }

    /// Ranks whose connection has closed so far.
    pub fn closed(&self) -> HashSet<usize> {
        let m = self
            .inbox
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        m.closed.keys().copied().collect()
    }
}

impl Transport for Mesh {
    /// This process's rank.
    fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    fn world(&self) -> usize {
        self.world
    }

    /// Sends `bytes`, named `name`, of microbatch `mb` of step `step`, to rank `to`.
    fn send(
        &self,
        to: usize,
        step: u64,
        mb: u32,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        let Some(Some(peer)) = self.peers.get(to) else {
            return Err(RunError::Usage(format!("rank {}: no rank {to}", self.rank)));
        };
        let mut msg = Vec::with_capacity(bytes.len() + name.len() + 24);
        msg.extend(step.to_le_bytes());
        msg.extend(mb.to_le_bytes());
        msg.extend((name.len() as u32).to_le_bytes());
        msg.extend((bytes.len() as u64).to_le_bytes());
        msg.extend(name.as_bytes());
        msg.extend(bytes);
        // A send fails when the peer is gone: the same error as a receive from it.
        peer.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&msg)
            .map_err(|e| {
                RunError::Usage(format!(
                    "rank {}: rank {to} closed its connection before `{name}` of microbatch {mb} could be sent to it ({e}; it stopped early or failed)",
                    self.rank
                ))
            })
    }

    /// Waits for `name` of microbatch `mb` of step `step` from rank `from`, and takes it.
    fn recv(&self, from: usize, step: u64, mb: u32, name: &str) -> Result<Vec<u8>, RunError> {
        let key = (step, mb, name.to_string());
        let started = Instant::now();
        let mut m = self
            .inbox
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if started.elapsed() > self.timeout {
                return Err(silent_peer(self.rank, from, self.timeout));
            }
            if let Some(bytes) = m.values.remove(&key) {
                return Ok(bytes);
            }
            if self.inbox.failed.load(Ordering::SeqCst) {
                return Err(RunError::Usage(format!(
                    "rank {}: stopped waiting for `{name}` (this rank's listener failed)",
                    self.rank
                )));
            }
            if let Some(why) = m.closed.get(&from) {
                return Err(RunError::Usage(format!(
                    "rank {}: rank {from} closed its connection before sending `{name}` of microbatch {mb}{}",
                    self.rank,
                    match why {
                        Some(e) => format!(": {e}"),
                        None => " (it stopped early or failed)".into(),
                    }
                )));
            }
            m = self
                .inbox
                .ready
                .wait_timeout(m, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Tells every peer that this rank failed (they stop waiting for it); best effort.
    fn abort(&self) {
        for peer in self.peers.iter().flatten() {
            if let Ok(mut p) = peer.lock() {
                let _ = p.write_all(&ABORT.to_le_bytes());
            }
        }
    }
}

impl Inbox {
    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }
}

/// One message: `None` at the end of the stream; an error for an abort or a malformed one.
fn read_message(s: &mut impl Read) -> Result<Option<(Key, Vec<u8>)>, String> {
    let mut step = [0u8; 8];
    match s.read_exact(&mut step) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let step = u64::from_le_bytes(step);
    if step == ABORT {
        return Err("it failed (see its error)".into());
    }
    let mut head = [0u8; 16];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    let mb = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let name_len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if name_len > 1024 || len > 1 << 36 {
        return Err(format!(
            "a malformed message (a {name_len}-byte name, {len} bytes)"
        ));
    }
    let mut name = vec![0u8; name_len];
    s.read_exact(&mut name).map_err(|e| e.to_string())?;
    let name = String::from_utf8(name).map_err(|_| "a message with a malformed name")?;
    let mut bytes = vec![0u8; len as usize];
    s.read_exact(&mut bytes).map_err(|e| e.to_string())?;
    Ok(Some(((step, mb, name), bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_base(n: u16) -> u16 {
        for _ in 0..50 {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = l.local_addr().unwrap().port();
            drop(l);
            if base as u32 + n as u32 + 1 < 65535
                && (1..=n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            {
                return base;
            }
        }
        panic!("no free ports");
    }

    #[test]
    fn ranks_exchange_named_buffers_and_report_a_closed_peer() {
        let port = free_base(3);
        let env = |rank| RankEnv {
            rank,
            world: 3,
            addr: "127.0.0.1".into(),
            port,
            mpi: false,
        };
        let meshes: Vec<Mesh> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| s.spawn(move || Mesh::connect(&env(r), Duration::from_secs(20)).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        meshes[0].send(2, 1, 3, "x.7", &[1, 2, 3]).unwrap();
        meshes[1].send(2, 1, 3, "x.8", &[4]).unwrap();
        assert_eq!(meshes[2].recv(1, 1, 3, "x.8").unwrap(), vec![4]);
        assert_eq!(meshes[2].recv(0, 1, 3, "x.7").unwrap(), vec![1, 2, 3]);
        // A rank that aborts: the others fail at once, naming it.
        meshes[1].abort();
        let e = meshes[2].recv(1, 2, 0, "x.9").unwrap_err().to_string();
        assert!(
            e.contains("rank 1 closed its connection") && e.contains("failed"),
            "{e}"
        );
        let mut meshes = meshes;
        drop(meshes.remove(0));
        let e = meshes[1].recv(0, 2, 0, "x.9").unwrap_err().to_string();
        assert!(e.contains("rank 0 closed its connection"), "{e}");
    }

    #[test]
    fn a_foreign_listener_and_a_silent_peer_are_named() {
        let at = |port, rank| RankEnv {
            rank,
            world: 2,
            addr: "127.0.0.1".into(),
            port,
            mpi: false,
        };
        // Another program on rank 1's port: it accepts and reads, never answers as memc.
        let port = free_base(2);
        let foreign = TcpListener::bind(("127.0.0.1", port + 2)).unwrap();
        let held = std::thread::spawn(move || {
            let (mut s, _) = foreign.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            std::thread::sleep(Duration::from_secs(3));
        });
        let e = Mesh::connect(&at(port, 0), Duration::from_secs(2))
            .err()
            .expect("a foreign listener is refused")
            .to_string();
        assert!(e.contains("answers, but not as memc's rank 1"), "{e}");
        held.join().unwrap();
        // Two ranks; rank 1 never sends: rank 0 names it once its wait is over.
        let port = free_base(2);
        let mut meshes: Vec<Mesh> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    s.spawn(move || Mesh::connect(&at(port, r), Duration::from_secs(20)).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        meshes[0].timeout = Duration::from_millis(500);
        let started = Instant::now();
        let e = meshes[0].recv(1, 1, 0, "x.1").unwrap_err().to_string();
        assert!(e.contains("rank 0: rank 1 sent nothing for"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
