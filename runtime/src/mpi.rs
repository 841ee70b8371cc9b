//! MPI as the transport between the ranks of a pipelined step, when the processes are launched
//! by an MPI launcher (`mpirun -n N OUT train ...`). libmpi is loaded at run time
//! (`libmpi.so.40`, or `$MEMC_LIBMPI`), so an executable needs no MPI to run as one process.
//!
//! The loader speaks Open MPI's ABI (Debian's and most clusters' MPI; `scripts/setup.sh`
//! installs it): predefined handles are the addresses of its `ompi_mpi_*` globals and
//! `MPI_STATUS_IGNORE` is null. A named buffer travels as two messages on one tag from one
//! sender, which MPI keeps in order: a fixed header (step, microbatch, length, name), then
//! the bytes (in parts of at most 1 GiB, MPI counts being `int`s). Sends are non-blocking (two
//! stages sending to each other at once cannot deadlock; their buffers go once MPI reports
//! them complete); a receive files what arrives from its peer until the message it waits for is
//! there.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

use crate::transport::Transport;
use crate::RunError;

type Handle = *mut c_void;

/// The Open MPI functions and handles memc uses.
struct Lib {
    _lib: libloading::Library,
    comm_world: Handle,
    byte: Handle,
    init_thread: unsafe extern "C" fn(*mut c_int, *mut c_void, c_int, *mut c_int) -> c_int,
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    comm_rank: unsafe extern "C" fn(Handle, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(Handle, *mut c_int) -> c_int,
    isend: unsafe extern "C" fn(
        *const c_void,
        c_int,
        Handle,
        c_int,
        c_int,
        Handle,
        *mut Handle,
    ) -> c_int,
    irecv: unsafe extern "C" fn(
        *mut c_void,
        c_int,
        Handle,
        c_int,
        c_int,
        Handle,
        *mut Handle,
    ) -> c_int,
    cancel: unsafe extern "C" fn(*mut Handle) -> c_int,
    waitall: unsafe extern "C" fn(c_int, *mut Handle, *mut c_void) -> c_int,
    test: unsafe extern "C" fn(*mut Handle, *mut c_int, *mut c_void) -> c_int,
}

/// `MPI_THREAD_SERIALIZED` in Open MPI: calls from any thread, one at a time (every call
/// here holds the transport's lock).
const THREAD_SERIALIZED: c_int = 2;
/// The one tag memc's messages use.
const TAG: c_int = 7;
/// Header bytes: step, microbatch, length, name length, then the name.
const HEADER: usize = 512;
/// The largest part of a message body (MPI counts are `int`s).
const PART: usize = 1 << 30;

/// The ranks of an MPI job.
pub struct Mpi {
    lib: Lib,
    rank: usize,
    world: usize,
    state: Mutex<State>,
    /// How long a receive waits for its peer before it names the peer and fails
    /// ([`crate::transport::rank_timeout`]).
    timeout: std::time::Duration,
    /// This rank failed: it leaves without finalising (mpirun then ends the other ranks).
    failed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    /// Sends not known complete, with the bytes they read.
    pending: Vec<(Handle, Vec<u8>)>,
    /// What arrived from each peer before it was asked for: (step, microbatch, name) → bytes.
    arrived: HashMap<(usize, u64, u32, String), Vec<u8>>,
}

// SAFETY: every MPI call goes through the state's lock (MPI_THREAD_SERIALIZED), and the
// handles are process-wide Open MPI globals.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

fn fail(msg: String) -> RunError {
    RunError::Usage(msg)
}

impl Lib {
    fn load() -> Result<Lib, String> {
        let name = std::env::var("MEMC_LIBMPI").unwrap_or_else(|_| "libmpi.so.40".into());
        // SAFETY: loading Open MPI runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| {
            format!("cannot load {name} ({e}): install Open MPI (Debian: apt-get install openmpi-bin), or set MEMC_LIBMPI")
        })?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is Open MPI's, of the type the field declares.
                *unsafe { lib.get($name) }.map_err(|e| {
                    format!(
                        "{name} is not Open MPI's library: {} is missing ({e})",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?
            };
        }
        let global = |sym: &[u8]| -> Result<Handle, String> {
            // SAFETY: a data symbol: only its address is taken.
            let s: libloading::Symbol<*mut c_void> = unsafe { lib.get(sym) }.map_err(|e| {
                format!(
                    "{name} is not Open MPI's library: {} is missing ({e})",
                    String::from_utf8_lossy(&sym[..sym.len() - 1])
                )
            })?;
            Ok(*s)
        };
        Ok(Lib {
            comm_world: global(b"ompi_mpi_comm_world\0")?,
            byte: global(b"ompi_mpi_byte\0")?,
            init_thread: sym!(b"MPI_Init_thread\0"),
            initialized: sym!(b"MPI_Initialized\0"),
            finalize: sym!(b"MPI_Finalize\0"),
            comm_rank: sym!(b"MPI_Comm_rank\0"),
            comm_size: sym!(b"MPI_Comm_size\0"),
            isend: sym!(b"MPI_Isend\0"),
            irecv: sym!(b"MPI_Irecv\0"),
            cancel: sym!(b"MPI_Cancel\0"),
            waitall: sym!(b"MPI_Waitall\0"),
            test: sym!(b"MPI_Test\0"),
            _lib: lib,
        })
    }
}

impl Mpi {
    /// Loads libmpi and joins the job: `MPI_Init_thread`, this process's rank and the world
    /// size, which must be `stages × replicas` (the program's).
    pub fn init(stages: usize, replicas: usize) -> Result<Mpi, RunError> {
        let expected = stages * replicas;
        let lib = Lib::load().map_err(fail)?;
        let (mut done, mut provided) = (0, 0);
        // SAFETY: Open MPI's functions with valid out-pointers; argc/argv may be null.
        let rc = unsafe {
            (lib.initialized)(&mut done);
            if done == 0 {
                (lib.init_thread)(
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    THREAD_SERIALIZED,
                    &mut provided,
                )
            } else {
                0
            }
        };
        if rc != 0 {
            return Err(fail(format!("MPI_Init_thread failed (error {rc})")));
        }
        let (mut rank, mut world) = (0, 0);
        // SAFETY: as above; `comm_world` is Open MPI's MPI_COMM_WORLD.
        unsafe {
            (lib.comm_rank)(lib.comm_world, &mut rank);
            (lib.comm_size)(lib.comm_world, &mut world);
        }
        let timeout = crate::transport::rank_timeout()?;
        let mpi = Mpi {
            lib,
            rank: rank as usize,
            world: world as usize,
            state: Mutex::new(State::default()),
            timeout,
            failed: std::sync::atomic::AtomicBool::new(false),
        };
        if mpi.world != expected {
            let layout = if replicas == 1 {
                format!("{stages} pipeline stages")
            } else {
                format!("{stages} pipeline stages × {replicas} data-parallel replicas")
            };
            let e = fail(format!(
                "rank {}: the MPI job has {} ranks, but the program has {layout} (launch with mpirun -n {expected})",
                mpi.rank, mpi.world
            ));
            return Err(e);
        }
        Ok(mpi)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, rc: c_int, what: &str) -> Result<(), RunError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(fail(format!(
                "rank {}: {what} failed (MPI error {rc})",
                self.rank
            )))
        }
    }

    /// Starts a send of `bytes` (kept until it completes).
    fn isend(&self, st: &mut State, to: usize, bytes: Vec<u8>) -> Result<(), RunError> {
        let mut req: Handle = std::ptr::null_mut();
        // SAFETY: `bytes` is kept in `pending` until MPI_Waitall completes the request.
        let rc = unsafe {
            (self.lib.isend)(
                bytes.as_ptr().cast(),
                bytes.len() as c_int,
                self.lib.byte,
                to as c_int,
                TAG,
                self.lib.comm_world,
                &mut req,
            )
        };
        self.check(rc, "MPI_Isend")?;
        st.pending.push((req, bytes));
        Ok(())
    }

    /// Receives `n` bytes from `from`, waiting at most the timeout for each part (polling,
    /// with back-off, so ranks sharing cores do not spin on each other).
    fn recv_bytes(&self, from: usize, n: usize) -> Result<Vec<u8>, RunError> {
        let mut out = vec![0u8; n];
        let mut timed_out = false;
        'parts: for part in out.chunks_mut(PART) {
            let mut req: Handle = std::ptr::null_mut();
            // SAFETY: `part` stays borrowed until the request completes or is cancelled.
            let rc = unsafe {
                (self.lib.irecv)(
                    part.as_mut_ptr().cast(),
                    part.len() as c_int,
                    self.lib.byte,
                    from as c_int,
                    TAG,
                    self.lib.comm_world,
                    &mut req,
                )
            };
            self.check(rc, "MPI_Irecv")?;
            let start = std::time::Instant::now();
            let mut nap = std::time::Duration::from_micros(1);
            loop {
                let mut done = 0;
                // SAFETY: `req` is this receive's request; a null status is ignored.
                let rc = unsafe { (self.lib.test)(&mut req, &mut done, std::ptr::null_mut()) };
                self.check(rc, "MPI_Test")?;
                if done != 0 {
                    break;
                }
                if start.elapsed() > self.timeout {
                    // SAFETY: a pending receive of this process.
                    unsafe { (self.lib.cancel)(&mut req) };
                    timed_out = true;
                    break 'parts;
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(std::time::Duration::from_millis(1));
            }
        }
        if timed_out {
            // The cancelled receive may still write into `out` (MPI_Cancel does not wait): it
            // is never freed, and this rank leaves without finalising.
            std::mem::forget(out);
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(crate::transport::silent_peer(self.rank, from, self.timeout));
        }
        Ok(out)
    }

    /// Lets go of the sends that have completed (never waits).
    fn reap(&self, st: &mut State) -> Result<(), RunError> {
        let mut err = Ok(());
        st.pending.retain_mut(|(req, _)| {
            let mut done = 0;
            // SAFETY: `req` is a pending request of this process; a null status is ignored.
            let rc = unsafe { (self.lib.test)(req, &mut done, std::ptr::null_mut()) };
            if rc != 0 {
                err = self.check(rc, "MPI_Test");
            }
            done == 0
        });
        err
    }

    /// Completes every pending send.
    fn complete(&self, st: &mut State) -> Result<(), RunError> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let mut reqs: Vec<Handle> = st.pending.iter().map(|p| p.0).collect();
        // SAFETY: the requests are this process's pending sends; null statuses are ignored.
        let rc = unsafe {
            (self.lib.waitall)(reqs.len() as c_int, reqs.as_mut_ptr(), std::ptr::null_mut())
        };
        st.pending.clear();
        self.check(rc, "MPI_Waitall")
    }
}

impl Transport for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(
        &self,
        to: usize,
        step: u64,
        mb: u32,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        if name.len() > HEADER - 24 {
            return Err(fail(format!(
                "rank {}: a value's name is too long: `{name}`",
                self.rank
            )));
        }
        let mut st = self.lock();
        self.reap(&mut st)?;
        let mut header = vec![0u8; HEADER];
        header[..8].copy_from_slice(&step.to_le_bytes());
        header[8..12].copy_from_slice(&mb.to_le_bytes());
        header[12..20].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        header[20..24].copy_from_slice(&(name.len() as u32).to_le_bytes());
        header[24..24 + name.len()].copy_from_slice(name.as_bytes());
        self.isend(&mut st, to, header)?;
        for part in bytes.chunks(PART) {
            self.isend(&mut st, to, part.to_vec())?;
        }
        Ok(())
    }

    fn recv(&self, from: usize, step: u64, mb: u32, name: &str) -> Result<Vec<u8>, RunError> {
        let mut st = self.lock();
        let key = (from, step, mb, name.to_string());
        loop {
            if let Some(b) = st.arrived.remove(&key) {
                return Ok(b);
            }
            let h = self.recv_bytes(from, HEADER)?;
            let s = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
            let m = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
            let n = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")) as usize;
            let len = (u32::from_le_bytes(h[20..24].try_into().expect("4 bytes")) as usize)
                .min(HEADER - 24);
            let got = String::from_utf8_lossy(&h[24..24 + len]).into_owned();
            let body = self.recv_bytes(from, n)?;
            st.arrived.insert((from, s, m, got), body);
        }
    }

    /// Marks this rank failed. It then exits with its error line and without finalising,
    /// and the launcher ends the other ranks (MPI_Abort would end this process before its
    /// error is printed).
    fn abort(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut st = std::mem::take(&mut *self.lock());
        let _ = self.complete(&mut st);
        // SAFETY: every request is complete; no MPI call follows.
        unsafe { (self.lib.finalize)() };
    }
}
