//! GPU execution (feature `cuda`): a spec's generated CUDA compiled with
//! NVRTC on first use, cached per context, and launched through cudarc on
//! device buffers or raw device pointers.
//!
//! One step launches one kernel per reduction pass and one update kernel,
//! each covering every parameter through a table of tensors and chunks; a
//! spec with matrix blocks adds, per block, its kernel and its programs'
//! products (cuBLAS, strided batched over same-shape tensors) and sums (see
//! [`crate::matdev`]). A machine without a driver, a GPU, NVRTC or (for
//! matrix blocks) cuBLAS gets an error, never a panic: cudarc panics when a
//! library is missing, so its presence is checked first.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::buf::{AlignedBuf, StateBuf};
use crate::cpu::{Kernel, KernelDesc, StaticKernel};
use crate::device::{DeviceError, Exec, Launch, RawParam, Store};
use crate::emulated::{AgrChunk, AgrTensor};
use crate::matdev::{Axpby, MatBatch, MatDevice, Sgemm};
use crate::optimizer::skip_pass_of;
use crate::optimizer::{validate_params, ParamSeen};
use crate::precision::{KernelTypes, Storage};
use crate::{NonFinite, Optimizer, ParamMut, StepError, StepReport, MAX_STATES};
use cudarc::cublas::CudaBlas;
use std::borrow::Cow;

/// cudarc's stream and the guard that records a buffer's use on one (the
/// types candle's CUDA tensors use too: the same cudarc).
pub use cudarc::driver::{CudaStream, SyncOnDrop};

/// Threads per block; must match the CUDA prelude.
pub const BLOCK: u32 = 256;
/// Elements per chunk: one definition for both CUDA devices' chunk table.
pub use crate::emulated::CHUNK;
/// Most hyperparameters a spec may have on the GPU path.
pub const MAX_HYPERS: usize = 32;

/// Why GPU execution is not possible or failed. Nothing was modified.
#[derive(Debug)]
pub enum CudaError {
    /// libnvrtc could not be loaded.
    NoNvrtc,
    /// libcuda (the driver) could not be loaded.
    NoDriver,
    /// The driver reported an error (no device, out of memory, ...).
    Driver(String),
    /// NVRTC rejected the generated source.
    Compile {
        optimizer: &'static str,
        arch: String,
        log: String,
    },
    /// The spec has more hyperparameters than the GPU path passes.
    TooManyHypers(usize),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoNvrtc => write!(f, "NVRTC (libnvrtc.so) was not found; install the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel and put its lib folder on LD_LIBRARY_PATH (or set AGR_NVRTC to the library's path)"),
            CudaError::NoDriver => write!(f, "the CUDA driver (libcuda.so) was not found: this machine has no usable NVIDIA driver"),
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Compile { optimizer, arch, log } => write!(f, "NVRTC could not compile the kernels of {optimizer} for {arch}:\n{log}"),
            CudaError::TooManyHypers(n) => write!(f, "the GPU path passes at most {MAX_HYPERS} hyperparameters; this spec has {n}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}
fn preload_nvrtc() {
    // Opening the library by absolute path first makes cudarc's later
    // bare-name lookup find it.
    static HANDLE: OnceLock<Option<libloading::Library>> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let path = std::env::var_os("AGR_NVRTC")?;
        // SAFETY: loading NVRTC runs no initialisers with preconditions.
        unsafe { libloading::Library::new(path).ok() }
    });
}

/// Whether `lib` (`cuda`, `nvrtc`) opens under one of the names cudarc
/// loads it by on Linux. cudarc's own test (`is_culib_present`) exists only
/// where it loads its libraries at run time; where it links them (candle's
/// `cuda` feature turns that on), they are loaded with the program, and
/// opening one by its SONAME finds it.
pub(crate) fn culib_present(lib: &str) -> bool {
    ["", ".13", ".12", ".11", ".10", ".9", ".2", ".1"]
        .iter()
        .any(|suffix| {
            // SAFETY: only opens the library (CUDA's libraries run no
            // initialisers with preconditions).
            unsafe { libloading::Library::new(format!("lib{lib}.so{suffix}")) }.is_ok()
        })
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    preload_nvrtc();
    culib_present("nvrtc")
}

/// Whether the CUDA driver library can be loaded (a GPU may still be absent).
pub fn driver_available() -> bool {
    culib_present("cuda")
}

/// Element type of parameters and gradients (state and arithmetic are f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// How it is stored, in the precision module's terms.
    pub fn storage(self) -> Storage {
        match self {
            DType::F32 => Storage::F32,
            DType::F16 => Storage::F16,
            DType::BF16 => Storage::Bf16,
        }
    }
}

/// Folders NVRTC searches for `cuda_fp16.h` / `cuda_bf16.h` (f16 and bf16 only):
/// `$AGR_CUDA_INCLUDE`, `$CUDA_HOME/include`, `/usr/local/cuda/include`.
fn include_paths() -> Vec<String> {
    let mut v = vec![];
    if let Ok(p) = std::env::var("AGR_CUDA_INCLUDE") {
        v.extend(p.split(':').map(String::from));
    }
    if let Ok(p) = std::env::var("CUDA_HOME") {
        v.push(format!("{p}/include"));
    }
    v.push("/usr/local/cuda/include".into());
    v
}

/// Compiles a kernel's CUDA source to PTX for `arch` (e.g. `compute_90`),
/// for parameters of `dtype` and f32 states.
pub fn compile_ptx<K: StaticKernel>(arch: &'static str, dtype: DType) -> Result<Ptx, CudaError> {
    compile_source(K::DESC.name, K::DESC.cuda_source, arch, dtype)
}

/// Compiles CUDA source generated by agr (named `name` in errors), for
/// parameters of `dtype` and f32 states.
pub fn compile_source(
    name: &'static str,
    source: &str,
    arch: &'static str,
    dtype: DType,
) -> Result<Ptx, CudaError> {
    compile_for(name, source, arch, KernelTypes::new(dtype.storage(), &[]))
}

/// [`compile_source`] with state `k` stored as `states[k]` (f32, bf16 or
/// f16; f32 past the end), as a narrowed optimizer's kernels are.
pub fn compile_stored(
    name: &'static str,
    source: &str,
    arch: &'static str,
    dtype: DType,
    states: &[Storage],
) -> Result<Ptx, CudaError> {
    if let Some(s) = states.iter().find(|s| !s.for_params()) {
        return Err(CudaError::Compile {
            optimizer: name,
            arch: arch.to_string(),
            log: format!("{s} states have no kernels in this version (they step on the CPU)"),
        });
    }
    compile_for(
        name,
        source,
        arch,
        KernelTypes::new(dtype.storage(), states),
    )
}

/// Compiles CUDA source generated by agr for buffers stored as `types`.
pub(crate) fn compile_for(
    name: &'static str,
    source: &str,
    arch: &'static str,
    types: KernelTypes,
) -> Result<Ptx, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: types
            .defines()
            .into_iter()
            .map(|(name, value)| format!("-D{name}={value}"))
            .collect(),
        include_paths: if types.all_f32() {
            vec![]
        } else {
            include_paths()
        },
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
        optimizer: name,
        arch: arch.to_string(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        },
    })
}

// The tables the kernels read, shared with the emulated device.
// SAFETY: plain old data with the C layout of the prelude's structs; all
// zero bits is a valid (null) entry.
unsafe impl DeviceRepr for AgrTensor {}
unsafe impl cudarc::driver::ValidAsZeroBits for AgrTensor {}
unsafe impl DeviceRepr for AgrChunk {}
unsafe impl cudarc::driver::ValidAsZeroBits for AgrChunk {}

/// (context, the spec's description, storage types).
type ModuleKey = (usize, usize, KernelTypes);

/// Compiled modules, one per (context, optimizer, storage types).
fn module_cache() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn load_functions(
    desc: &'static KernelDesc,
    stream: &Arc<CudaStream>,
    types: KernelTypes,
) -> Result<Vec<CudaFunction>, CudaError> {
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability()?;
    let key = (
        Arc::as_ptr(ctx) as usize,
        desc as *const KernelDesc as usize,
        types,
    );
    let module = {
        let mut cache = module_cache().lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&key) {
            Some(m) => m.clone(),
            None => {
                // NVRTC 12.9 knows up to compute_90 for the features we use;
                // newer GPUs run compute_90 PTX through the driver's JIT.
                let arch = if major >= 9 {
                    "compute_90"
                } else if major == 8 {
                    "compute_80"
                } else {
                    "compute_70"
                };
                let _ = minor;
                let ptx = compile_for(desc.name, desc.cuda_source, arch, types)?;
                let m = ctx.load_module(ptx)?;
                cache.insert(key, m.clone());
                m
            }
        }
    };
    desc.cuda_kernels
        .iter()
        .map(|name| Ok(module.load_function(name)?))
        .collect()
}

/// One parameter for a GPU step, as device pointers.
#[derive(Clone, Copy, Debug)]
pub struct RawCudaParam<'a> {
    /// Device pointer to the values (updated in place).
    pub value: u64,
    /// Device pointer to the gradient; `None` skips the tensor.
    pub grad: Option<u64>,
    pub shape: &'a [usize],
}

impl<'a> RawCudaParam<'a> {
    /// One per parameter: its values' and gradient's device pointers, and
    /// its shape (what the adapters hand [`Optimizer::step_raw`]).
    pub fn list(
        pointers: impl IntoIterator<Item = (u64, Option<u64>)>,
        shapes: &'a [Vec<usize>],
    ) -> Vec<Self> {
        pointers
            .into_iter()
            .zip(shapes)
            .map(|((value, grad), shape)| RawCudaParam { value, grad, shape })
            .collect()
    }
}

/// One f32 parameter held in cudarc buffers.
pub struct CudaParam<'a> {
    pub value: &'a mut CudaSlice<f32>,
    pub grad: Option<&'a CudaSlice<f32>>,
    pub shape: &'a [usize],
}

/// A state buffer in GPU memory, in its storage.
#[derive(Clone)]
pub(crate) enum DevBuf {
    F32(CudaSlice<f32>),
    /// bf16 or f16 words.
    Half(Storage, CudaSlice<u16>),
}

/// A parameter's state in GPU memory.
#[derive(Clone)]
pub(crate) struct DeviceState {
    stream: Arc<CudaStream>,
    bufs: Vec<DevBuf>,
    /// Row-reduction results (`ROW_REDUCTIONS` per row).
    rows: Option<CudaSlice<f64>>,
    /// A bf16/f16 parameter's f32 master copy.
    master: Option<CudaSlice<f32>>,
}

impl DeviceState {
    /// Bytes of the state buffers (the master copy included) and values of
    /// the row results.
    pub(crate) fn lens(&self) -> (usize, usize) {
        let bytes: usize = self
            .bufs
            .iter()
            .map(|b| match b {
                DevBuf::F32(b) => b.len() * 4,
                DevBuf::Half(_, b) => b.len() * 2,
            })
            .sum();
        (
            bytes + self.master.as_ref().map_or(0, |m| m.len() * 4),
            self.rows.as_ref().map_or(0, |r| r.len()),
        )
    }

    /// State buffer `k`, widened to f32.
    pub(crate) fn to_host(&self, k: usize) -> Result<Vec<f32>, CudaError> {
        Ok(match &self.bufs[k] {
            DevBuf::F32(b) => self.stream.clone_dtoh(b)?,
            DevBuf::Half(kind, b) => {
                let words = self.stream.clone_dtoh(b)?;
                let mut out = vec![0.0; words.len()];
                crate::precision::widen(*kind, &words, &mut out);
                out
            }
        })
    }

    pub(crate) fn master_to_host(&self) -> Option<Result<Vec<f32>, CudaError>> {
        self.master.as_ref().map(|m| Ok(self.stream.clone_dtoh(m)?))
    }

    pub(crate) fn has_master(&self) -> bool {
        self.master.is_some()
    }

    pub(crate) fn drop_master(&mut self) {
        self.master = None;
    }

    pub(crate) fn pointers(&mut self) -> ([u64; MAX_STATES], u64, u64) {
        let mut st = [0u64; MAX_STATES];
        for (k, b) in self.bufs.iter_mut().enumerate() {
            st[k] = match b {
                DevBuf::F32(b) => b.device_ptr_mut(&self.stream).0,
                DevBuf::Half(_, b) => b.device_ptr_mut(&self.stream).0,
            };
        }
        let rows = match self.rows.as_mut() {
            Some(r) => r.device_ptr_mut(&self.stream).0,
            None => 0,
        };
        let master = match self.master.as_mut() {
            Some(m) => m.device_ptr_mut(&self.stream).0,
            None => 0,
        };
        (st, rows, master)
    }

    /// The state in host memory, each buffer in its storage.
    pub(crate) fn download(&self) -> Result<Store, DeviceError> {
        let mut bufs = vec![];
        for (k, b) in self.bufs.iter().enumerate() {
            bufs.push(match b {
                DevBuf::F32(b) => {
                    let host = self.stream.clone_dtoh(b).map_err(cuda_err)?;
                    let mut a = AlignedBuf::filled(host.len(), 0.0, k);
                    a.as_mut_slice().copy_from_slice(&host);
                    StateBuf::F32(a)
                }
                DevBuf::Half(kind, b) => StateBuf::Half {
                    kind: *kind,
                    words: self.stream.clone_dtoh(b).map_err(cuda_err)?,
                },
            });
        }
        let rows = match &self.rows {
            Some(r) => self.stream.clone_dtoh(r).map_err(cuda_err)?,
            None => vec![],
        };
        let master = match &self.master {
            Some(m) => {
                let host = self.stream.clone_dtoh(m).map_err(cuda_err)?;
                let mut a = AlignedBuf::filled(host.len(), 0.0, 0);
                a.as_mut_slice().copy_from_slice(&host);
                Some(a)
            }
            None => None,
        };
        Ok(Store::Host { bufs, rows, master })
    }
}

fn cuda_err(e: impl fmt::Display) -> DeviceError {
    DeviceError::Cuda(e.to_string())
}

impl From<CudaError> for DeviceError {
    fn from(e: CudaError) -> Self {
        cuda_err(e)
    }
}

/// A GPU as the engine's device: the spec's kernels on a stream, the
/// step's tables and scratch in device memory, and the skip counters.
#[derive(Clone)]
pub(crate) struct CudaExec {
    stream: Arc<CudaStream>,
    dtype: DType,
    /// The storage types `functions` were compiled for (the parameters'
    /// is `dtype`'s).
    types: KernelTypes,
    functions: Vec<CudaFunction>,
    d_tensors: Option<CudaSlice<AgrTensor>>,
    d_chunks: Option<CudaSlice<AgrChunk>>,
    d_partials: Option<CudaSlice<f64>>,
    d_reduced: Option<CudaSlice<f64>>,
    d_global: Option<CudaSlice<f64>>,
    d_counters: Option<CudaSlice<u32>>,
    /// The hyperparameters as the kernels read them (`X_Hyper`, one per group).
    d_hypers: Option<CudaSlice<f64>>,
    /// The skip counters: `[0]` per step, `[1 + i]` per parameter.
    d_counts: Option<CudaSlice<u32>>,
    /// Matrix programs: cuBLAS on the stream (made on first use) and the
    /// registers.
    blas: Option<Arc<CudaBlas>>,
    d_scratch: Option<CudaSlice<f32>>,
}

/// Grows a device buffer to at least `n` elements (zeroed when replaced).
fn ensure<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<(), CudaError> {
    if buf.as_ref().is_none_or(|b| b.len() < n) {
        *buf = Some(stream.alloc_zeros::<T>(n.max(1))?);
    }
    Ok(())
}

/// Whether two streams are one: the same object, or the same handle in the
/// same context (a context's per-thread or legacy default stream).
pub fn same_stream(a: &Arc<CudaStream>, b: &Arc<CudaStream>) -> bool {
    Arc::ptr_eq(a, b) || (a.cu_stream() == b.cu_stream() && Arc::ptr_eq(a.context(), b.context()))
}

/// The first GPU's (or GPU `ordinal`'s) default stream.
pub fn default_stream(ordinal: usize) -> Result<Arc<CudaStream>, CudaError> {
    if !driver_available() {
        return Err(CudaError::NoDriver);
    }
    Ok(CudaContext::new(ordinal)?.default_stream())
}

impl CudaExec {
    /// The spec's kernels compiled (or reused) for the stream's device, for
    /// parameters of `dtype`.
    pub(crate) fn new(
        stream: Arc<CudaStream>,
        desc: &'static KernelDesc,
        dtype: DType,
    ) -> Result<Self, CudaError> {
        if desc.hypers.len() > MAX_HYPERS {
            return Err(CudaError::TooManyHypers(desc.hypers.len()));
        }
        let types = KernelTypes::new(dtype.storage(), &[]);
        let functions = load_functions(desc, &stream, types)?;
        Ok(CudaExec {
            stream,
            dtype,
            types,
            functions,
            d_tensors: None,
            d_chunks: None,
            d_partials: None,
            d_reduced: None,
            d_global: None,
            d_counters: None,
            d_hypers: None,
            d_counts: None,
            blas: None,
            d_scratch: None,
        })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// A copy of `store` in this GPU's memory.
    pub(crate) fn upload_store(&self, store: &Store) -> Result<Store, DeviceError> {
        let s = &self.stream;
        Ok(Store::Cuda(match store {
            Store::Host { bufs, rows, master } => DeviceState {
                stream: s.clone(),
                bufs: bufs
                    .iter()
                    .map(|b| match b {
                        StateBuf::F32(b) => s.clone_htod(b.as_slice()).map(DevBuf::F32),
                        StateBuf::Half { kind, words } => {
                            s.clone_htod(words).map(|w| DevBuf::Half(*kind, w))
                        }
                        StateBuf::Q8 { .. } => {
                            unreachable!("8-bit states are refused on a GPU (set_device)")
                        }
                    })
                    .collect::<Result<_, _>>()
                    .map_err(cuda_err)?,
                rows: if rows.is_empty() {
                    None
                } else {
                    Some(s.clone_htod(rows).map_err(cuda_err)?)
                },
                master: match master {
                    Some(m) => Some(s.clone_htod(m.as_slice()).map_err(cuda_err)?),
                    None => None,
                },
            },
            // Another stream's (or GPU's) state: through the host.
            Store::Cuda(d) => return self.upload_store(&d.download()?),
        }))
    }
}

impl Launch for CudaExec {
    unsafe fn run(
        &mut self,
        desc: &'static KernelDesc,
        hypers: &[f64],
        chunks: &[AgrChunk],
        tensors: &[AgrTensor],
        mats: &[MatBatch],
        policy: NonFinite,
        mut gather: Option<crate::device::GatherPartials<'_>>,
    ) -> Result<Option<usize>, DeviceError> {
        if !mats.is_empty() && self.blas.is_none() {
            if !culib_present("cublas") {
                return Err(cuda_err(
                    "matrix blocks run their products on cuBLAS, and libcublas could not be loaded (install the nvidia-cublas-cu12 wheel or the CUDA toolkit, and put its lib folder on LD_LIBRARY_PATH)",
                ));
            }
            self.blas = Some(Arc::new(
                CudaBlas::new(self.stream.clone()).map_err(cuda_err)?,
            ));
        }
        let stream = self.stream.clone();
        let (nt, nc) = (tensors.len(), chunks.len());
        let nr = desc.reductions.len().max(1);
        ensure(&stream, &mut self.d_tensors, nt)?;
        ensure(&stream, &mut self.d_chunks, nc)?;
        ensure(&stream, &mut self.d_partials, nc * nr)?;
        ensure(&stream, &mut self.d_reduced, nt * nr)?;
        ensure(&stream, &mut self.d_global, nr)?;
        ensure(&stream, &mut self.d_counters, nt + 1)?;
        ensure(&stream, &mut self.d_hypers, hypers.len())?;
        let skipped = if policy == NonFinite::Skip {
            self.counts_ptr()
        } else {
            0
        };
        let (
            Some(d_tensors),
            Some(d_chunks),
            Some(partials),
            Some(reduced),
            Some(global),
            Some(counters),
            Some(d_hypers),
        ) = (
            self.d_tensors.as_mut(),
            self.d_chunks.as_mut(),
            self.d_partials.as_mut(),
            self.d_reduced.as_mut(),
            self.d_global.as_mut(),
            self.d_counters.as_mut(),
            self.d_hypers.as_mut(),
        )
        else {
            unreachable!("ensured above")
        };
        stream
            .memcpy_htod(tensors, &mut d_tensors.slice_mut(..nt))
            .map_err(cuda_err)?;
        stream
            .memcpy_htod(chunks, &mut d_chunks.slice_mut(..nc))
            .map_err(cuda_err)?;
        stream
            .memcpy_htod(hypers, &mut d_hypers.slice_mut(..hypers.len()))
            .map_err(cuda_err)?;
        let cfg = LaunchConfig {
            grid_dim: (nc as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let nt_arg = nt as i32;
        // Matrix blocks before pass `k`: the block's kernel, then its programs.
        let blocks = |k: usize,
                      reduced: &CudaSlice<f64>,
                      global: &CudaSlice<f64>,
                      scratch: &mut Option<CudaSlice<f32>>|
         -> Result<(), DeviceError> {
            for (b, info) in desc.matrices.iter().enumerate() {
                if info.phase != k {
                    continue;
                }
                let mut l = stream.launch_builder(&self.functions[desc.matrix_kernel(b)]);
                l.arg(&*d_hypers)
                    .arg(&*d_chunks)
                    .arg(&*d_tensors)
                    .arg(&nt_arg)
                    .arg(reduced)
                    .arg(global);
                l.launch(cfg).map_err(cuda_err)?;
                let mut dev = GpuMat {
                    stream: &stream,
                    blas: self.blas.as_deref().expect("made above"),
                    axpby: &self.functions[desc.mat_axpby_kernel()],
                    scratch,
                };
                crate::matdev::run_batches(&mut dev, mats, b)?;
            }
            Ok(())
        };
        for pass in 0..desc.passes {
            blocks(pass, reduced, global, &mut self.d_scratch)?;
            if skip_pass_of(desc, pass, policy) {
                continue;
            }
            match gather.as_mut() {
                None => {
                    let mut b = stream.launch_builder(&self.functions[pass]);
                    b.arg(&*d_hypers)
                        .arg(&*d_chunks)
                        .arg(&*d_tensors)
                        .arg(&nt_arg)
                        .arg(&mut *partials)
                        .arg(&mut *reduced)
                        .arg(&mut *global)
                        .arg(&mut *counters);
                    b.launch(cfg).map_err(cuda_err)?;
                }
                Some(gather) => {
                    // Sharded (see `crate::shard`): the chunks' partials
                    // alone (no counters), gathered through the host, then
                    // the fold alone (no chunk table, one block per tensor).
                    let null = 0u64;
                    let mut b = stream.launch_builder(&self.functions[pass]);
                    b.arg(&*d_hypers)
                        .arg(&*d_chunks)
                        .arg(&*d_tensors)
                        .arg(&nt_arg)
                        .arg(&mut *partials)
                        .arg(&mut *reduced)
                        .arg(&mut *global)
                        .arg(&null);
                    b.launch(cfg).map_err(cuda_err)?;
                    let mut host = stream
                        .clone_dtoh(&partials.slice(..nc * nr))
                        .map_err(cuda_err)?;
                    gather(pass, &mut host)?;
                    stream
                        .memcpy_htod(&host, &mut partials.slice_mut(..nc * nr))
                        .map_err(cuda_err)?;
                    let fold = LaunchConfig {
                        grid_dim: (nt as u32, 1, 1),
                        block_dim: (BLOCK, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut b = stream.launch_builder(&self.functions[pass]);
                    b.arg(&*d_hypers)
                        .arg(&null)
                        .arg(&*d_tensors)
                        .arg(&nt_arg)
                        .arg(&mut *partials)
                        .arg(&mut *reduced)
                        .arg(&mut *global)
                        .arg(&mut *counters);
                    b.launch(fold).map_err(cuda_err)?;
                }
            }
            if pass == 0 && policy == NonFinite::Error {
                // `Error` must answer before the update: one small read back.
                let g = stream.clone_dtoh(&*global).map_err(cuda_err)?;
                if !g[desc.finite_check].is_finite() {
                    let red = stream.clone_dtoh(&*reduced).map_err(cuda_err)?;
                    return Ok(Some(desc.non_finite_slot(&red, nt, nr)));
                }
            }
        }
        blocks(desc.passes, reduced, global, &mut self.d_scratch)?;
        // The update, then (with per-tensor states) X_tensor_states: the same
        // arguments; `Skip`: each decides by itself (no read back).
        for at in std::iter::once(desc.passes).chain(desc.tensor_states_kernel()) {
            let mut b = stream.launch_builder(&self.functions[at]);
            b.arg(&*d_hypers)
                .arg(&*d_chunks)
                .arg(&*d_tensors)
                .arg(&nt_arg)
                .arg(&*reduced)
                .arg(&*global)
                .arg(&skipped);
            b.launch(cfg).map_err(cuda_err)?;
        }
        Ok(None)
    }

    fn counts_ptr(&mut self) -> u64 {
        match self.d_counts.as_mut() {
            Some(c) => c.device_ptr_mut(&self.stream).0,
            None => 0,
        }
    }

    fn counts(&self) -> Cow<'_, [u32]> {
        match &self.d_counts {
            None => Cow::Borrowed(&[]),
            Some(c) => Cow::Owned(
                self.stream
                    .clone_dtoh(c)
                    .unwrap_or_else(|e| panic!("reading the skip counts back from the GPU: {e}")),
            ),
        }
    }

    fn counts_len(&self) -> usize {
        self.d_counts.as_ref().map_or(0, |c| c.len())
    }

    fn reset_counts(&mut self, n: usize) -> Result<(), DeviceError> {
        self.d_counts = if n == 0 {
            None
        } else {
            Some(self.stream.alloc_zeros::<u32>(n).map_err(cuda_err)?)
        };
        Ok(())
    }

    fn new_store(
        &mut self,
        desc: &KernelDesc,
        shape: &[usize],
        _index: usize,
        (lo, hi): (usize, usize),
        storage: &[Storage],
    ) -> Result<Store, DeviceError> {
        let s = &self.stream;
        let numel: usize = shape.iter().product();
        let whole = (lo, hi) == (0, numel);
        let mut bufs = vec![];
        for st in desc.states {
            // A reduced state holds one value per row or column; a
            // per-tensor one, one value; a sharded rank's per-element one,
            // its part (at least one value: no empty allocation).
            let n = if whole || st.per_tensor {
                st.len(shape)
            } else if st.reduced.is_some() {
                1
            } else {
                (hi - lo).max(1)
            };
            let kind = storage.get(bufs.len()).copied().unwrap_or_default();
            bufs.push(match kind {
                Storage::F32 if st.fill == 0.0 => {
                    DevBuf::F32(s.alloc_zeros::<f32>(n).map_err(cuda_err)?)
                }
                Storage::F32 => DevBuf::F32(s.clone_htod(&vec![st.fill; n]).map_err(cuda_err)?),
                Storage::Bf16 | Storage::F16 => {
                    let mut words = vec![0u16; n];
                    crate::precision::narrow_nearest(kind, &vec![st.fill; n], &mut words);
                    DevBuf::Half(kind, s.clone_htod(&words).map_err(cuda_err)?)
                }
                Storage::Q8 | Storage::Uq8 => {
                    unreachable!("8-bit states are refused on a GPU (set_device)")
                }
            });
        }
        let dims = crate::Dims::of(shape, desc);
        let results = if whole {
            dims.results
        } else if desc.factored || dims.row_len == 0 {
            // A factored tensor is one unit: not this rank's.
            0
        } else {
            (hi - lo) / dims.row_len * desc.row_reductions
        };
        let rows = if results > 0 {
            Some(s.alloc_zeros::<f64>(results).map_err(cuda_err)?)
        } else {
            None
        };
        Ok(Store::Cuda(DeviceState {
            stream: s.clone(),
            bufs,
            rows,
            master: None,
        }))
    }

    fn use_types(
        &mut self,
        desc: &'static KernelDesc,
        types: KernelTypes,
    ) -> Result<(), DeviceError> {
        if self.types != types {
            self.functions = load_functions(desc, &self.stream, types)?;
            self.types = types;
        }
        Ok(())
    }

    unsafe fn make_master(
        &mut self,
        store: &mut Store,
        value: u64,
        len: usize,
        kind: Storage,
        index: usize,
    ) -> Result<(), DeviceError> {
        let Store::Cuda(d) = store else {
            unreachable!("a GPU keeps state in its memory")
        };
        // Once per parameter: its words through the host, widened exactly.
        let mut words = vec![0u16; len];
        // SAFETY: the caller's contract: `value` addresses `len` words on
        // this stream's device.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut words, value, self.stream.cu_stream())
        }
        .map_err(cuda_err)?;
        self.stream.synchronize().map_err(cuda_err)?;
        let m = crate::precision::master_of(kind, &words, index);
        d.master = Some(self.stream.clone_htod(m.as_slice()).map_err(cuda_err)?);
        Ok(())
    }
}

/// [`Optimizer::step_params`] on a GPU: the host parameters copied there,
/// stepped, and the values copied back (for checks and replays, not speed:
/// keep parameters on the GPU and use [`Optimizer::step_cuda`]).
pub(crate) fn step_host_params<K: Kernel>(
    opt: &mut Optimizer<K>,
    params: &mut [ParamMut<'_>],
) -> Result<StepReport, StepError> {
    let Exec::Cuda(c) = &opt.exec else {
        unreachable!("called on a GPU")
    };
    let stream = c.stream().clone();
    let up = |x: &[f32]| {
        stream
            .clone_htod(x)
            .map_err(|e| StepError::Device(e.to_string()))
    };
    let mut values = params
        .iter()
        .map(|p| up(p.value))
        .collect::<Result<Vec<_>, _>>()?;
    let grads = params
        .iter()
        .map(|p| p.grad.map(up).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    let mut cuda: Vec<CudaParam<'_>> = values
        .iter_mut()
        .zip(&grads)
        .zip(params.iter())
        .map(|((v, g), p)| CudaParam {
            value: v,
            grad: g.as_ref(),
            shape: p.shape,
        })
        .collect();
    let report = opt.step_cuda_buffers(&mut cuda)?;
    drop(cuda);
    for (v, p) in values.iter().zip(params.iter_mut()) {
        stream
            .memcpy_dtoh(v, &mut *p.value)
            .map_err(|e| StepError::Device(e.to_string()))?;
    }
    Ok(report)
}

/// [`Optimizer::step_params_of`] for bf16/f16 parameters on a GPU: their
/// words copied there, stepped by kernels for their type, and copied back.
pub(crate) fn step_narrow_host_params<K: Kernel, T: crate::Element>(
    opt: &mut Optimizer<K>,
    params: &mut [ParamMut<'_, T>],
) -> Result<StepReport, StepError> {
    let Exec::Cuda(c) = &opt.exec else {
        unreachable!("called on a GPU")
    };
    let stream = c.stream().clone();
    let dev = |e: cudarc::driver::DriverError| StepError::Device(e.to_string());
    fn words<T: crate::Element>(v: &[T]) -> &[u16] {
        T::words(v).expect("bf16/f16 parameters")
    }
    let mut values = params
        .iter()
        .map(|p| stream.clone_htod(words(&*p.value)).map_err(dev))
        .collect::<Result<Vec<_>, _>>()?;
    let grads = params
        .iter()
        .map(|p| {
            p.grad
                .map(|g| stream.clone_htod(words(g)).map_err(dev))
                .transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let report = {
        let (raw, _guards) = device_pointers(
            &stream,
            values
                .iter_mut()
                .zip(&grads)
                .zip(params.iter())
                .map(|((v, g), p)| (v, g.as_ref(), p.shape)),
        );
        // SAFETY: buffers just made from the validated host slices, held
        // for the whole step.
        unsafe { opt.step_on_device(&raw, T::STORAGE) }?
    };
    for (v, p) in values.iter().zip(params.iter_mut()) {
        let w = T::words_mut(p.value).expect("bf16/f16 parameters");
        stream.memcpy_dtoh(v, w).map_err(dev)?;
    }
    Ok(report)
}

/// The device pointers of parameters in cudarc buffers (value, gradient,
/// shape), as the engine takes them, with the guards that record their use
/// on `stream` when dropped (keep them until the step is launched).
fn device_pointers<'b, 's, T: 'b>(
    stream: &'b Arc<CudaStream>,
    params: impl Iterator<Item = (&'b mut CudaSlice<T>, Option<&'b CudaSlice<T>>, &'s [usize])>,
) -> (Vec<RawParam<'s>>, Vec<cudarc::driver::SyncOnDrop<'b>>) {
    let mut guards = vec![];
    let mut raw = vec![];
    for (value, grad, shape) in params {
        let (v, gv) = value.device_ptr_mut(stream);
        guards.push(gv);
        let g = grad.map(|g| {
            let (ptr, gg) = g.device_ptr(stream);
            guards.push(gg);
            ptr
        });
        raw.push(RawParam {
            value: v,
            grad: g,
            shape,
        });
    }
    (raw, guards)
}

/// Validates parameters given as device addresses (lengths from the shapes,
/// or from the buffers where known).
pub(crate) fn validate_raw<K: Kernel>(
    opt: &Optimizer<K>,
    params: &[RawParam<'_>],
    lens: Option<&[(usize, Option<usize>)]>,
) -> Result<(), StepError> {
    let stored = |i: usize| {
        opt.tensors
            .get(i)
            .and_then(|t| t.as_ref())
            .map(|t| t.shape.as_slice())
    };
    let seen = params.iter().enumerate().map(|(i, p)| {
        let numel = p.shape.iter().product();
        let (len, grad_len) = match lens {
            Some(l) => l[i],
            None => (numel, p.grad.map(|_| numel)),
        };
        ParamSeen {
            shape: p.shape,
            len,
            grad_len,
        }
    });
    validate_params(opt.n_params, stored, seen, params.len())
}

impl<K: Kernel> Optimizer<K> {
    /// Moves the optimizer onto `stream` (its GPU), for parameters of
    /// `dtype`, as [`Optimizer::set_device`] does for a GPU's default stream.
    /// Already there (the same stream, see [`same_stream`], and dtype), it
    /// does nothing.
    pub fn set_cuda_stream(
        &mut self,
        stream: Arc<CudaStream>,
        dtype: DType,
    ) -> Result<(), DeviceError> {
        if self.cuda_dtype() == Some(dtype)
            && self.cuda_stream().is_some_and(|s| same_stream(s, &stream))
        {
            return Ok(());
        }
        self.cpu_only(crate::Device::Cuda(stream.context().ordinal()))?;
        let exec = CudaExec::new(stream, self.desc, dtype)?;
        self.set_exec(Exec::Cuda(Box::new(exec)))
    }

    /// The parameter dtype the GPU kernels were compiled for, on a GPU.
    pub fn cuda_dtype(&self) -> Option<DType> {
        match &self.exec {
            Exec::Cuda(c) => Some(c.dtype()),
            _ => None,
        }
    }

    /// The stream steps run on, on a GPU.
    pub fn cuda_stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.exec {
            Exec::Cuda(c) => Some(c.stream()),
            _ => None,
        }
    }

    /// One step over f32 parameters in cudarc buffers, on the optimizer's
    /// GPU (see [`Optimizer::set_device`]). Validated like
    /// [`Optimizer::step_params`]; on error nothing is modified. A sharded
    /// optimizer takes host parameters ([`Optimizer::step_params`]) in this
    /// version.
    pub fn step_cuda(&mut self, params: &mut [CudaParam<'_>]) -> Result<StepReport, StepError> {
        if self.shard.is_some() {
            return Err(StepError::Device(
                "a sharded optimizer takes host parameters (step_params) in this version, not GPU buffers".into(),
            ));
        }
        self.step_cuda_buffers(params)
    }

    /// [`Optimizer::step_cuda`] without the sharding check: the host
    /// parameters' path, which gathers a sharded step's parameters itself.
    fn step_cuda_buffers(&mut self, params: &mut [CudaParam<'_>]) -> Result<StepReport, StepError> {
        let Exec::Cuda(c) = &self.exec else {
            return Err(StepError::Device(format!(
                "this optimizer runs on {}; GPU buffers need set_device(Device::Cuda(n))",
                self.device()
            )));
        };
        if c.dtype() != DType::F32 {
            return Err(StepError::Device(format!(
                "this optimizer was moved to the GPU for {:?} parameters, and these are f32",
                c.dtype()
            )));
        }
        let stream = c.stream().clone();
        let lens: Vec<(usize, Option<usize>)> = params
            .iter()
            .map(|p| (p.value.len(), p.grad.map(|g| g.len())))
            .collect();
        let (raw, _guards) = device_pointers(
            &stream,
            params.iter_mut().map(|p| (&mut *p.value, p.grad, p.shape)),
        );
        validate_raw(self, &raw, Some(&lens))?;
        // SAFETY: the pointers come from live buffers of the lengths just
        // checked, held for the whole step.
        unsafe { self.step_on_device(&raw, Storage::F32) }
    }

    /// One step over raw device pointers on the optimizer's stream, for
    /// parameters of the dtype it was moved to the GPU for.
    ///
    /// # Safety
    /// Each `value` must point to `prod(shape)` elements of that dtype,
    /// writable, and each `grad` to as many readable elements, all in the
    /// stream's context and not written by other work until the step's
    /// kernels have run.
    pub unsafe fn step_raw(
        &mut self,
        params: &[RawCudaParam<'_>],
    ) -> Result<StepReport, StepError> {
        if !matches!(self.exec, Exec::Cuda(_)) {
            return Err(StepError::Device(format!(
                "this optimizer runs on {}; device pointers need set_device(Device::Cuda(n))",
                self.device()
            )));
        }
        if self.shard.is_some() {
            return Err(StepError::Device(
                "a sharded optimizer takes host parameters (step_params) in this version, not device pointers".into(),
            ));
        }
        let raw: Vec<RawParam<'_>> = params
            .iter()
            .map(|p| RawParam {
                value: p.value,
                grad: p.grad,
                shape: p.shape,
            })
            .collect();
        validate_raw(self, &raw, None)?;
        let param = match &self.exec {
            Exec::Cuda(c) => c.dtype().storage(),
            _ => unreachable!("checked above"),
        };
        self.step_on_device(&raw, param)
    }

    /// Kernel launches per step on a GPU: one per reduction pass plus the
    /// update; one per matrix block (plus its programs' products and sums,
    /// one per operation and group of same-shape tensors, not counted
    /// here); one for per-tensor states.
    pub fn launches_per_step(&self) -> usize {
        launches(self.desc)
    }
}

impl<K: StaticKernel> Optimizer<K> {
    /// Kernel launches per step on a GPU: one per reduction pass plus the
    /// update; one per matrix block (plus its programs' products and sums,
    /// not counted here); one for per-tensor states.
    pub const LAUNCHES_PER_STEP: usize = launches(&K::DESC);
}

const fn launches(desc: &KernelDesc) -> usize {
    let per_tensor = if desc.tensor_states_kernel().is_some() {
        1
    } else {
        0
    };
    desc.passes + 1 + desc.matrices.len() + per_tensor
}

/// A GPU as the device of matrix programs: cuBLAS for products, the spec's
/// `X_mat_axpby` for sums and transposes, copies on the stream.
struct GpuMat<'a> {
    stream: &'a Arc<CudaStream>,
    blas: &'a CudaBlas,
    axpby: &'a CudaFunction,
    scratch: &'a mut Option<CudaSlice<f32>>,
}

impl MatDevice for GpuMat<'_> {
    fn scratch(&mut self, floats: usize) -> Result<u64, DeviceError> {
        ensure(self.stream, self.scratch, floats)?;
        let s = self.scratch.as_mut().expect("ensured above");
        let (ptr, _record) = s.device_ptr_mut(self.stream);
        Ok(ptr)
    }
    unsafe fn copy(&mut self, dst: u64, src: u64, floats: usize) -> Result<(), DeviceError> {
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        cudarc::driver::result::memcpy_dtod_async(dst, src, 4 * floats, self.stream.cu_stream())
            .map_err(cuda_err)
    }
    unsafe fn sgemm(&mut self, g: &Sgemm) -> Result<(), DeviceError> {
        use cudarc::cublas::sys::cublasOperation_t as T;
        let op = |t: bool| if t { T::CUBLAS_OP_T } else { T::CUBLAS_OP_N };
        cudarc::cublas::result::sgemm_strided_batched(
            *self.blas.handle(),
            op(g.transa),
            op(g.transb),
            g.m,
            g.n,
            g.k,
            &g.alpha,
            g.a as *const f32,
            g.lda,
            g.stride_a,
            g.b as *const f32,
            g.ldb,
            g.stride_b,
            &g.beta,
            g.c as *mut f32,
            g.ldc,
            g.stride_c,
            g.batch,
        )
        .map_err(cuda_err)
    }
    unsafe fn axpby(&mut self, x: &Axpby) -> Result<(), DeviceError> {
        let blocks = (x.total as u64).div_ceil(u64::from(BLOCK));
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(blocks).map_err(cuda_err)?, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (a_t, b_t) = (i32::from(x.a_t), i32::from(x.b_t));
        let mut l = self.stream.launch_builder(self.axpby);
        l.arg(&x.dst)
            .arg(&x.a)
            .arg(&a_t)
            .arg(&x.alpha)
            .arg(&x.b)
            .arg(&b_t)
            .arg(&x.beta)
            .arg(&x.m)
            .arg(&x.n)
            .arg(&x.stride)
            .arg(&x.total);
        l.launch(cfg).map_err(cuda_err)?;
        Ok(())
    }
}
