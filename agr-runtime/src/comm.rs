//! How the ranks of a sharded optimizer talk to each other: one small
//! interface, [`Comm`], and its implementations:
//!
//! - [`Mpi`] (feature `mpi`): MPI through the `mpi` crate (OpenMPI, MPICH),
//!   for processes started by `mpirun`, on host memory;
//! - [`Nccl`] (feature `nccl`): NCCL through cudarc, one GPU per rank;
//! - [`Solo`]: one process alone (a sharded optimizer of one rank);
//! - [`Threads`]: ranks as threads of one process, sharing memory; a test
//!   double that exercises the packing and folding without a launcher.
//!
//! A sharded step needs three collectives, all *exact*: they move values,
//! they never add them (the engine folds what they bring in a fixed order,
//! see [`crate::shard`]). So no implementation's summation order can change
//! a bit of the result.
//!
//! Every collective takes a short description of what it carries (`what`),
//! which a failure names.

use std::fmt;
use std::sync::{Arc, Barrier, Mutex};

/// A collective that failed: which rank saw it, in which collective, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommError {
    pub rank: usize,
    /// What the collective carried (e.g. `the partial sums of pass 0`).
    pub what: String,
    pub message: String,
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {}: exchanging {}: {}",
            self.rank, self.what, self.message
        )
    }
}

impl std::error::Error for CommError {}

/// The collectives a sharded optimizer uses. Every rank calls the same
/// collectives in the same order with the same `counts` (a rank that
/// calls none blocks the others: see each implementation for what happens
/// then).
pub trait Comm: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks there are.
    fn size(&self) -> usize;
    /// The implementation, for messages (`mpi`, `nccl`, `solo`, `threads`).
    fn kind(&self) -> &'static str;
    /// All-gather: rank `r` sends `counts[r]` values; every rank receives
    /// all of them, concatenated in rank order, in `recv`.
    fn all_gather_f64(
        &self,
        what: &str,
        send: &[f64],
        counts: &[usize],
        recv: &mut [f64],
    ) -> Result<(), CommError>;
    /// [`Comm::all_gather_f64`] for `f32` values.
    fn all_gather_f32(
        &self,
        what: &str,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<(), CommError>;
    /// All-to-all: `send` holds `send_counts[r]` values for each rank `r`,
    /// in rank order; `recv` receives `recv_counts[r]` values from each rank
    /// `r`, in rank order. (What rank `a` sends to `b` must be as long as
    /// what `b` expects from `a`.)
    fn all_to_all_f32(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError>;
}

/// Checks an all-gather's buffers against its counts (before any rank
/// moves a value, so a mistake is an error, not a hang or a stray write).
pub(crate) fn check_gather(
    comm: &dyn Comm,
    what: &str,
    send: usize,
    counts: &[usize],
    recv: usize,
) -> Result<(), CommError> {
    let err = |message: String| CommError {
        rank: comm.rank(),
        what: what.to_string(),
        message,
    };
    if counts.len() != comm.size() {
        return Err(err(format!(
            "{} counts for {} ranks",
            counts.len(),
            comm.size()
        )));
    }
    if send != counts[comm.rank()] {
        return Err(err(format!(
            "sending {send} values where this rank's count is {}",
            counts[comm.rank()]
        )));
    }
    let total: usize = counts.iter().sum();
    if recv != total {
        return Err(err(format!(
            "a receive buffer of {recv} values for {total}"
        )));
    }
    Ok(())
}

/// Checks an all-to-all's buffers against its counts.
pub(crate) fn check_all_to_all(
    comm: &dyn Comm,
    what: &str,
    send: usize,
    send_counts: &[usize],
    recv: usize,
    recv_counts: &[usize],
) -> Result<(), CommError> {
    let err = |message: String| CommError {
        rank: comm.rank(),
        what: what.to_string(),
        message,
    };
    let n = comm.size();
    if send_counts.len() != n || recv_counts.len() != n {
        return Err(err(format!(
            "{} send and {} receive counts for {n} ranks",
            send_counts.len(),
            recv_counts.len()
        )));
    }
    if send != send_counts.iter().sum::<usize>() || recv != recv_counts.iter().sum::<usize>() {
        return Err(err(format!(
            "buffers of {send} and {recv} values for counts summing to {} and {}",
            send_counts.iter().sum::<usize>(),
            recv_counts.iter().sum::<usize>()
        )));
    }
    Ok(())
}

/// Where each rank's part starts, for `counts`.
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let o = *at;
            *at += c;
            Some(o)
        })
        .collect()
}

/// One process alone: rank 0 of 1. Every collective is a copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn kind(&self) -> &'static str {
        "solo"
    }
    fn all_gather_f64(
        &self,
        what: &str,
        send: &[f64],
        counts: &[usize],
        recv: &mut [f64],
    ) -> Result<(), CommError> {
        check_gather(self, what, send.len(), counts, recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f32(
        &self,
        what: &str,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<(), CommError> {
        check_gather(self, what, send.len(), counts, recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_to_all_f32(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(self, what, send.len(), send_counts, recv.len(), recv_counts)?;
        recv.copy_from_slice(send);
        Ok(())
    }
}

/// Ranks as threads of one process: [`Threads::group`] makes `n`
/// communicators, one per thread, that exchange through shared memory.
/// Each collective is two barriers: every rank posts what it sends, then
/// every rank copies what it receives. For tests: the sharded engine's
/// packing, folding and bit-identity checked without `mpirun`.
pub struct Threads {
    rank: usize,
    size: usize,
    shared: Arc<Exchange>,
}

struct Exchange {
    barrier: Barrier,
    /// What each rank posted for the current collective: values (as f64,
    /// which holds every f32 exactly) and, for an all-to-all, its counts.
    posted: Mutex<Vec<(Vec<f64>, Vec<usize>)>>,
}

impl Threads {
    /// `n` communicators of one group; give one to each of `n` threads.
    pub fn group(n: usize) -> Vec<Arc<dyn Comm>> {
        let shared = Arc::new(Exchange {
            barrier: Barrier::new(n),
            posted: Mutex::new(vec![(vec![], vec![]); n]),
        });
        (0..n)
            .map(|rank| {
                Arc::new(Threads {
                    rank,
                    size: n,
                    shared: shared.clone(),
                }) as Arc<dyn Comm>
            })
            .collect()
    }

    /// Posts `send`, waits for every rank, hands every rank's post to
    /// `read`, and waits again (so no rank posts the next collective's
    /// values before all have read these).
    fn exchange(
        &self,
        send: Vec<f64>,
        counts: Vec<usize>,
        read: impl FnOnce(&[(Vec<f64>, Vec<usize>)]),
    ) {
        self.shared.posted.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = (send, counts);
        self.shared.barrier.wait();
        read(&self.shared.posted.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.barrier.wait();
    }
}

impl Comm for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn kind(&self) -> &'static str {
        "threads"
    }
    fn all_gather_f64(
        &self,
        what: &str,
        send: &[f64],
        counts: &[usize],
        recv: &mut [f64],
    ) -> Result<(), CommError> {
        check_gather(self, what, send.len(), counts, recv.len())?;
        self.exchange(send.to_vec(), vec![], |posted| {
            let mut at = 0;
            for (values, _) in posted {
                recv[at..at + values.len()].copy_from_slice(values);
                at += values.len();
            }
        });
        Ok(())
    }
    fn all_gather_f32(
        &self,
        what: &str,
        send: &[f32],
        counts: &[usize],
        recv: &mut [f32],
    ) -> Result<(), CommError> {
        check_gather(self, what, send.len(), counts, recv.len())?;
        self.exchange(
            send.iter().map(|&x| f64::from(x)).collect(),
            vec![],
            |posted| {
                let mut at = 0;
                for (values, _) in posted {
                    for (r, &v) in recv[at..at + values.len()].iter_mut().zip(values) {
                        *r = v as f32;
                    }
                    at += values.len();
                }
            },
        );
        Ok(())
    }
    fn all_to_all_f32(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(self, what, send.len(), send_counts, recv.len(), recv_counts)?;
        let me = self.rank;
        let mut mismatch = None;
        self.exchange(
            send.iter().map(|&x| f64::from(x)).collect(),
            send_counts.to_vec(),
            |posted| {
                let mut at = 0;
                for (r, (values, counts)) in posted.iter().enumerate() {
                    let from = offsets(counts)[me];
                    if counts[me] != recv_counts[r] {
                        mismatch = Some((r, counts[me]));
                        return;
                    }
                    for (x, &v) in recv[at..at + counts[me]]
                        .iter_mut()
                        .zip(&values[from..from + counts[me]])
                    {
                        *x = v as f32;
                    }
                    at += counts[me];
                }
            },
        );
        match mismatch {
            Some((r, sent)) => Err(CommError {
                rank: me,
                what: what.to_string(),
                message: format!(
                    "rank {r} sent {sent} values where this rank expected {}",
                    recv_counts[r]
                ),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_comm::Mpi;

#[cfg(feature = "mpi")]
mod mpi_comm {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use mpi::datatype::{Partition, PartitionMut};
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{check_all_to_all, check_gather, offsets, Comm, CommError};

    /// MPI's world communicator: the processes `mpirun -np N` started.
    ///
    /// Collectives are MPI's non-blocking ones (`MPI_Iallgatherv`,
    /// `MPI_Ialltoallv`) waited on with a deadline (`AGR_COMM_TIMEOUT`
    /// seconds, 300 by default). A peer that dies is seen by `mpirun`,
    /// which ends the job; a peer that stops answering (stopped, looping,
    /// on another collective) is seen by the deadline: the rank prints
    /// which collective did not complete and calls `MPI_Abort`, which ends
    /// every rank. Either way no rank waits forever.
    ///
    /// MPI is initialised with `MPI_THREAD_SERIALIZED`; a lock serialises
    /// every call, so the communicator can be shared between threads.
    pub struct Mpi {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        timeout: Duration,
        lock: Mutex<()>,
        // Last: MPI_Finalize when the communicator goes.
        _universe: Universe,
    }

    // SAFETY: every MPI call goes through `lock` (MPI_THREAD_SERIALIZED:
    // calls from any thread, never two at once).
    unsafe impl Send for Mpi {}
    unsafe impl Sync for Mpi {}

    impl Mpi {
        /// Initialises MPI (once per process: a second call is an error).
        pub fn init() -> Result<Mpi, CommError> {
            let err = |message: String| CommError {
                rank: 0,
                what: "MPI_Init".into(),
                message,
            };
            let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| err("MPI is already initialised in this process".into()))?;
            if level < mpi::Threading::Serialized {
                return Err(err(format!(
                    "this MPI offers thread level {level:?}, agr needs Serialized"
                )));
            }
            let world = universe.world();
            let timeout = std::env::var("AGR_COMM_TIMEOUT")
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| *s > 0.0)
                .unwrap_or(300.0);
            Ok(Mpi {
                rank: world.rank() as usize,
                size: world.size() as usize,
                world,
                timeout: Duration::from_secs_f64(timeout),
                lock: Mutex::new(()),
                _universe: universe,
            })
        }

        /// Ends every rank of the job with `code` (`MPI_Abort`).
        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }

        /// Waits on `req` until it completes or the deadline passes; then
        /// the whole job ends with a message naming the collective.
        fn wait<'a, R: ?Sized, S: mpi::request::Scope<'a>>(
            &self,
            what: &str,
            mut req: mpi::request::Request<'a, R, S>,
        ) {
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                match req.test() {
                    Ok(_) => return,
                    Err(r) => req = r,
                }
                if start.elapsed() > self.timeout {
                    eprintln!(
                        "agr: rank {} of {}: exchanging {what}: no answer from the other ranks in {:.0} s: \
                         a peer process died, stopped or is in another collective; ending the job",
                        self.rank,
                        self.size,
                        self.timeout.as_secs_f64()
                    );
                    self.world.abort(75);
                }
                spins += 1;
                if spins < 1000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }

        fn counts_i32(&self, what: &str, counts: &[usize]) -> Result<Vec<i32>, CommError> {
            counts
                .iter()
                .map(|&c| i32::try_from(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| CommError {
                    rank: self.rank,
                    what: what.to_string(),
                    message: "more than 2^31 - 1 values from one rank (MPI's count is an int)"
                        .into(),
                })
        }

        fn gather<T: Equivalence>(
            &self,
            what: &str,
            send: &[T],
            counts: &[usize],
            recv: &mut [T],
        ) -> Result<(), CommError> {
            check_gather(self, what, send.len(), counts, recv.len())?;
            let c = self.counts_i32(what, counts)?;
            let d = self.counts_i32(what, &offsets(counts))?;
            let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let mut part = PartitionMut::new(recv, &c[..], &d[..]);
            mpi::request::scope(|scope| {
                let req = self
                    .world
                    .immediate_all_gather_varcount_into(scope, send, &mut part);
                self.wait(what, req);
            });
            Ok(())
        }
    }

    impl Comm for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn kind(&self) -> &'static str {
            "mpi"
        }
        fn all_gather_f64(
            &self,
            what: &str,
            send: &[f64],
            counts: &[usize],
            recv: &mut [f64],
        ) -> Result<(), CommError> {
            self.gather(what, send, counts, recv)
        }
        fn all_gather_f32(
            &self,
            what: &str,
            send: &[f32],
            counts: &[usize],
            recv: &mut [f32],
        ) -> Result<(), CommError> {
            self.gather(what, send, counts, recv)
        }
        fn all_to_all_f32(
            &self,
            what: &str,
            send: &[f32],
            send_counts: &[usize],
            recv: &mut [f32],
            recv_counts: &[usize],
        ) -> Result<(), CommError> {
            check_all_to_all(self, what, send.len(), send_counts, recv.len(), recv_counts)?;
            let sc = self.counts_i32(what, send_counts)?;
            let sd = self.counts_i32(what, &offsets(send_counts))?;
            let rc = self.counts_i32(what, recv_counts)?;
            let rd = self.counts_i32(what, &offsets(recv_counts))?;
            let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let part = Partition::new(send, &sc[..], &sd[..]);
            let mut out = PartitionMut::new(recv, &rc[..], &rd[..]);
            mpi::request::scope(|scope| {
                let req = self
                    .world
                    .immediate_all_to_all_varcount_into(scope, &part, &mut out);
                self.wait(what, req);
            });
            Ok(())
        }
    }
}

#[cfg(feature = "nccl")]
pub use self::nccl_comm::{nccl_available, new_nccl_id, Nccl};

#[cfg(feature = "nccl")]
mod nccl_comm {
    use std::sync::{Arc, Mutex};

    use cudarc::driver::{CudaSlice, CudaStream};
    use cudarc::nccl::safe::{Comm as NcclComm, Id};

    use super::{check_all_to_all, check_gather, offsets, Comm, CommError};

    /// NCCL: one rank per GPU. Its all-gather moves equal counts, so each
    /// rank's part is padded to the largest; an all-to-all is `size` rounds
    /// of a send and a receive. Host buffers are staged through device memory
    /// (the collectives of a sharded step on the CPU engine); the bytes
    /// move exactly, as with MPI.
    pub struct Nccl {
        comm: Mutex<NcclComm>,
        stream: Arc<CudaStream>,
        rank: usize,
        size: usize,
    }

    // SAFETY: every NCCL call goes through the lock.
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    /// Whether libnccl can be loaded (from the `nvidia-nccl-cu12` wheel,
    /// say, its `lib` folder on `LD_LIBRARY_PATH`).
    pub fn nccl_available() -> bool {
        crate::cuda::culib_present("nccl")
    }

    fn missing(rank: usize, what: &str) -> CommError {
        CommError {
            rank,
            what: what.to_string(),
            message: "libnccl.so.2 not found: install the nvidia-nccl-cu12 wheel and put its \
                      nvidia/nccl/lib folder on LD_LIBRARY_PATH"
                .into(),
        }
    }

    /// A new NCCL unique id (made on one rank, handed to the others by the
    /// launcher: MPI, a file, the environment), as its 128 bytes.
    pub fn new_nccl_id() -> Result<[u8; 128], CommError> {
        if !nccl_available() {
            return Err(missing(0, "ncclGetUniqueId"));
        }
        let id = Id::new().map_err(|e| nccl_error(0, "ncclGetUniqueId", e))?;
        Ok(id.internal().map(|c| c as u8))
    }

    fn nccl_error(rank: usize, what: &str, e: impl std::fmt::Debug) -> CommError {
        CommError {
            rank,
            what: what.to_string(),
            message: format!("NCCL: {e:?}"),
        }
    }

    impl Nccl {
        /// Rank `rank` of `size`, on `stream`'s GPU, joining the group of `id`.
        pub fn new(
            stream: Arc<CudaStream>,
            rank: usize,
            size: usize,
            id: [u8; 128],
        ) -> Result<Nccl, CommError> {
            if !nccl_available() {
                return Err(missing(rank, "ncclCommInitRank"));
            }
            let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
            let comm = NcclComm::from_rank(stream.clone(), rank, size, id)
                .map_err(|e| nccl_error(rank, "ncclCommInitRank", e))?;
            Ok(Nccl {
                comm: Mutex::new(comm),
                stream,
                rank,
                size,
            })
        }

        fn err(&self, what: &str, e: impl std::fmt::Debug) -> CommError {
            nccl_error(self.rank, what, e)
        }

        fn upload<T: cudarc::driver::DeviceRepr + Copy + Default>(
            &self,
            what: &str,
            host: &[T],
            len: usize,
        ) -> Result<CudaSlice<T>, CommError> {
            let mut padded = host.to_vec();
            padded.resize(len, T::default());
            self.stream
                .clone_htod(&padded)
                .map_err(|e| self.err(what, e))
        }

        fn gather<T>(
            &self,
            what: &str,
            send: &[T],
            counts: &[usize],
            recv: &mut [T],
        ) -> Result<(), CommError>
        where
            T: cudarc::driver::DeviceRepr
                + cudarc::driver::ValidAsZeroBits
                + cudarc::nccl::safe::NcclType
                + Copy
                + Default,
        {
            check_gather(self, what, send.len(), counts, recv.len())?;
            let most = counts.iter().copied().max().unwrap_or(0).max(1);
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            let src = self.upload(what, send, most)?;
            let mut dst = self
                .stream
                .alloc_zeros::<T>(most * self.size)
                .map_err(|e| self.err(what, e))?;
            comm.all_gather(&src, &mut dst)
                .map_err(|e| self.err(what, e))?;
            let all = self
                .stream
                .clone_dtoh(&dst)
                .map_err(|e| self.err(what, e))?;
            for ((r, &c), &at) in counts.iter().enumerate().zip(&offsets(counts)) {
                recv[at..at + c].copy_from_slice(&all[r * most..r * most + c]);
            }
            Ok(())
        }
    }

    impl Comm for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn kind(&self) -> &'static str {
            "nccl"
        }
        fn all_gather_f64(
            &self,
            what: &str,
            send: &[f64],
            counts: &[usize],
            recv: &mut [f64],
        ) -> Result<(), CommError> {
            self.gather(what, send, counts, recv)
        }
        fn all_gather_f32(
            &self,
            what: &str,
            send: &[f32],
            counts: &[usize],
            recv: &mut [f32],
        ) -> Result<(), CommError> {
            self.gather(what, send, counts, recv)
        }
        fn all_to_all_f32(
            &self,
            what: &str,
            send: &[f32],
            send_counts: &[usize],
            recv: &mut [f32],
            recv_counts: &[usize],
        ) -> Result<(), CommError> {
            check_all_to_all(self, what, send.len(), send_counts, recv.len(), recv_counts)?;
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            let src = self.upload(what, send, send.len().max(1))?;
            let mut dst = self
                .stream
                .alloc_zeros::<f32>(recv.len().max(1))
                .map_err(|e| self.err(what, e))?;
            // Step `s`: send to rank + s, receive from rank - s (one group
            // each, the usual deadlock-free ring of pairs).
            let (so, ro) = (offsets(send_counts), offsets(recv_counts));
            let n = self.size;
            for step in 0..n {
                let to = (self.rank + step) % n;
                let from = (self.rank + n - step) % n;
                let mut group = comm.group();
                if send_counts[to] > 0 {
                    group
                        .send(src.slice(so[to]..so[to] + send_counts[to]), to as i32)
                        .map_err(|e| self.err(what, e))?;
                }
                if recv_counts[from] > 0 {
                    group
                        .recv(
                            dst.slice_mut(ro[from]..ro[from] + recv_counts[from]),
                            from as i32,
                        )
                        .map_err(|e| self.err(what, e))?;
                }
            }
            let all = self
                .stream
                .clone_dtoh(&dst)
                .map_err(|e| self.err(what, e))?;
            recv.copy_from_slice(&all[..recv.len()]);
            Ok(())
        }
    }
}
