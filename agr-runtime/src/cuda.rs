//! GPU execution (feature `cuda`): a spec's generated CUDA compiled with
//! NVRTC on first use, cached per context, and launched through cudarc on
//! device buffers or raw device pointers.
//!
//! One step launches one kernel per reduction pass and one update kernel,
//! each covering every parameter through a table of tensors and chunks. A
//! machine without a driver, a GPU or NVRTC gets an error, never a panic:
//! cudarc panics when a library is missing, so its presence is checked first.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::cpu::{Kernel, KernelDesc, StaticKernel};
use crate::emulated::{AgrChunk, AgrTensor};
use crate::optimizer::{skip_pass_of, validate_params, ParamSeen};
use crate::{
    ConfigError, HyperConfig, HyperValue, NonFinite, StepError, StepReport, TensorMeta, MAX_STATES,
};

/// Threads per block and elements per chunk; must match the CUDA prelude.
pub const BLOCK: u32 = 256;
pub const CHUNK: usize = 8192;
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
    /// The inputs were wrong.
    Step(StepError),
    Config(ConfigError),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoNvrtc => write!(f, "NVRTC (libnvrtc.so) was not found; install the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel and put its lib folder on LD_LIBRARY_PATH (or set AGR_NVRTC to the library's path)"),
            CudaError::NoDriver => write!(f, "the CUDA driver (libcuda.so) was not found: this machine has no usable NVIDIA driver"),
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Compile { optimizer, arch, log } => write!(f, "NVRTC could not compile the kernels of {optimizer} for {arch}:\n{log}"),
            CudaError::TooManyHypers(n) => write!(f, "the GPU path passes at most {MAX_HYPERS} hyperparameters; this spec has {n}"),
            CudaError::Step(e) => e.fmt(f),
            CudaError::Config(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}
impl From<StepError> for CudaError {
    fn from(e: StepError) -> Self {
        CudaError::Step(e)
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

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    preload_nvrtc();
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded (a GPU may still be absent).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Element type of parameters and gradients (state and arithmetic are f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn nvrtc_options(self) -> Vec<String> {
        match self {
            DType::F32 => vec![],
            DType::F16 => vec![
                "-DAGR_P_T=__half".into(),
                "-DAGR_G_T=__half".into(),
                "-DAGR_USE_HALF".into(),
            ],
            DType::BF16 => vec![
                "-DAGR_P_T=__nv_bfloat16".into(),
                "-DAGR_G_T=__nv_bfloat16".into(),
                "-DAGR_USE_BF16".into(),
            ],
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

/// Compiles a kernel's CUDA source to PTX for `arch` (e.g. `compute_90`).
pub fn compile_ptx<K: StaticKernel>(arch: &'static str, dtype: DType) -> Result<Ptx, CudaError> {
    compile_source(K::DESC.name, K::DESC.cuda_source, arch, dtype)
}

/// Compiles CUDA source generated by agr (named `name` in errors).
pub fn compile_source(
    name: &'static str,
    source: &str,
    arch: &'static str,
    dtype: DType,
) -> Result<Ptx, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: dtype.nvrtc_options(),
        include_paths: if dtype == DType::F32 {
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

/// (context, the spec's description, dtype).
type ModuleKey = (usize, usize, DType);

/// Compiled modules, one per (context, optimizer, dtype).
fn module_cache() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn load_functions(
    desc: &'static KernelDesc,
    stream: &Arc<CudaStream>,
    dtype: DType,
) -> Result<Vec<CudaFunction>, CudaError> {
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability()?;
    let key = (
        Arc::as_ptr(ctx) as usize,
        desc as *const KernelDesc as usize,
        dtype,
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
                let ptx = compile_source(desc.name, desc.cuda_source, arch, dtype)?;
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

/// One f32 parameter held in cudarc buffers.
pub struct CudaParam<'a> {
    pub value: &'a mut CudaSlice<f32>,
    pub grad: Option<&'a CudaSlice<f32>>,
    pub shape: &'a [usize],
}

struct GpuTensor {
    shape: Vec<usize>,
    t: u64,
    bufs: Vec<CudaSlice<f32>>,
    /// Row-reduction results (`ROW_REDUCTIONS` per row).
    rows: Option<CudaSlice<f64>>,
}

/// A generated optimizer running on a CUDA stream.
pub struct CudaOptimizer<K: Kernel> {
    desc: &'static KernelDesc,
    config: K::Config,
    stream: Arc<CudaStream>,
    dtype: DType,
    functions: Vec<CudaFunction>,
    tensors: Vec<Option<GpuTensor>>,
    n_params: Option<usize>,
    steps: u64,
    non_finite: NonFinite,
    non_finite_skips: u64,
    host_tensors: Vec<AgrTensor>,
    host_chunks: Vec<AgrChunk>,
    d_tensors: Option<CudaSlice<AgrTensor>>,
    d_chunks: Option<CudaSlice<AgrChunk>>,
    d_partials: Option<CudaSlice<f64>>,
    d_reduced: Option<CudaSlice<f64>>,
    d_global: CudaSlice<f64>,
    d_counters: Option<CudaSlice<u32>>,
    /// The hyperparameters as the kernels read them (`X_Hyper`, one per group).
    d_hypers: Option<CudaSlice<f64>>,
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

impl<K: Kernel> CudaOptimizer<K> {
    /// A new optimizer on `stream` for parameters of `dtype`; compiles (or
    /// reuses) the spec's kernels for the stream's device.
    pub fn new(
        stream: Arc<CudaStream>,
        config: K::Config,
        dtype: DType,
    ) -> Result<Self, CudaError> {
        config.validate().map_err(CudaError::Config)?;
        let desc = K::of_config(&config).desc();
        if desc.hypers.len() > MAX_HYPERS {
            return Err(CudaError::TooManyHypers(desc.hypers.len()));
        }
        let functions = load_functions(desc, &stream, dtype)?;
        let d_global = stream.alloc_zeros::<f64>(desc.reductions.len().max(1))?;
        Ok(CudaOptimizer {
            desc,
            config,
            stream,
            dtype,
            functions,
            tensors: vec![],
            n_params: None,
            steps: 0,
            non_finite: NonFinite::default(),
            non_finite_skips: 0,
            host_tensors: vec![],
            host_chunks: vec![],
            d_tensors: None,
            d_chunks: None,
            d_partials: None,
            d_reduced: None,
            d_global,
            d_counters: None,
            d_hypers: None,
        })
    }

    /// On the first GPU of this machine, on its default stream.
    pub fn on_default_device(config: K::Config, dtype: DType) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(0)?;
        Self::new(ctx.default_stream(), config, dtype)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn config(&self) -> &K::Config {
        &self.config
    }
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Chooses what a step does with a NaN or infinite gradient (see [`NonFinite`]).
    pub fn set_non_finite_policy(&mut self, policy: NonFinite) {
        self.non_finite = policy;
    }

    /// Steps skipped so far because a gradient was not finite.
    pub fn non_finite_skips(&self) -> u64 {
        self.non_finite_skips
    }

    /// Sets one hyperparameter by name (checked; on error nothing changes).
    pub fn set_hyper(
        &mut self,
        name: &str,
        value: impl Into<HyperValue>,
    ) -> Result<(), ConfigError> {
        let mut c = self.config.clone();
        c.set(name, value.into())?;
        self.config = c;
        Ok(())
    }

    /// Copies state buffer `name` of parameter `index` to the host.
    pub fn state_to_host(&self, index: usize, name: &str) -> Result<Option<Vec<f32>>, CudaError> {
        let Some(s) = self.desc.states.iter().position(|s| s.name == name) else {
            return Ok(None);
        };
        let Some(Some(t)) = self.tensors.get(index) else {
            return Ok(None);
        };
        Ok(Some(self.stream.clone_dtoh(&t.bufs[s])?))
    }

    /// One step over f32 parameters in cudarc buffers.
    pub fn step(&mut self, params: &mut [CudaParam<'_>]) -> Result<StepReport, CudaError> {
        if self.dtype != DType::F32 {
            return Err(CudaError::Driver(format!(
                "this optimizer was built for {:?} parameters",
                self.dtype
            )));
        }
        let stream = self.stream.clone();
        let mut guards = vec![];
        let mut raw = Vec::with_capacity(params.len());
        let lens: Vec<(usize, Option<usize>)> = params
            .iter()
            .map(|p| (p.value.len(), p.grad.map(|g| g.len())))
            .collect();
        for p in params.iter_mut() {
            let (v, gv) = p.value.device_ptr_mut(&stream);
            guards.push(gv);
            let g = match p.grad {
                Some(g) => {
                    let (ptr, gg) = g.device_ptr(&stream);
                    guards.push(gg);
                    Some(ptr)
                }
                None => None,
            };
            raw.push(RawCudaParam {
                value: v,
                grad: g,
                shape: p.shape,
            });
        }
        // SAFETY: the pointers come from live buffers of the lengths checked here.
        unsafe { self.step_raw_checked(&raw, Some(&lens)) }
    }

    /// One step over raw device pointers on this optimizer's stream.
    ///
    /// # Safety
    /// Each `value` must point to `prod(shape)` elements of this optimizer's
    /// dtype, writable, and each `grad` to as many readable elements, all in
    /// this stream's context and not written by other work until the step's
    /// kernels have run.
    pub unsafe fn step_raw(
        &mut self,
        params: &[RawCudaParam<'_>],
    ) -> Result<StepReport, CudaError> {
        self.step_raw_checked(params, None)
    }

    unsafe fn step_raw_checked(
        &mut self,
        params: &[RawCudaParam<'_>],
        lens: Option<&[(usize, Option<usize>)]>,
    ) -> Result<StepReport, CudaError> {
        let stored = |i: usize| {
            self.tensors
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
        validate_params(self.n_params, stored, seen, params.len())?;
        // A skipped or failed step changes nothing: not even on the first
        // step, whose state and parameter count are undone here.
        let (n_params_before, tensors_before) = (self.n_params, self.tensors.len());
        let mut created = vec![];
        let result = self.step_validated(params, &mut created);
        if result
            .as_ref()
            .map_or(true, |r| r.skipped_non_finite.is_some())
        {
            for i in created {
                self.tensors[i] = None;
            }
            self.tensors.truncate(tensors_before);
            self.n_params = n_params_before;
        }
        result
    }

    /// [`Self::step_raw_checked`] once the parameters are validated; lists
    /// the parameters whose state it created in `created`.
    unsafe fn step_validated(
        &mut self,
        params: &[RawCudaParam<'_>],
        created: &mut Vec<usize>,
    ) -> Result<StepReport, CudaError> {
        self.n_params = Some(params.len());
        if self.tensors.len() < params.len() {
            self.tensors.resize_with(params.len(), || None);
        }
        let desc = self.desc;
        let stream = self.stream.clone();
        // State buffers, created on a tensor's first gradient.
        for (i, p) in params.iter().enumerate() {
            if p.grad.is_none() || self.tensors[i].is_some() {
                continue;
            }
            created.push(i);
            let n: usize = p.shape.iter().product();
            let mut bufs = vec![];
            for s in desc.states {
                let b = if s.fill == 0.0 {
                    stream.alloc_zeros::<f32>(n)?
                } else {
                    stream.clone_htod(&vec![s.fill; n])?
                };
                bufs.push(b);
            }
            let rows = if desc.row_reductions > 0 {
                Some(stream.alloc_zeros::<f64>(
                    n / TensorMeta::row_len_of(p.shape) * desc.row_reductions,
                )?)
            } else {
                None
            };
            self.tensors[i] = Some(GpuTensor {
                shape: p.shape.to_vec(),
                t: 0,
                bufs,
                rows,
            });
        }
        // The tensor and chunk tables.
        self.host_tensors.clear();
        self.host_chunks.clear();
        let mut active = vec![];
        for (i, p) in params.iter().enumerate() {
            let Some(g) = p.grad else { continue };
            let state = self.tensors[i].as_mut().expect("created above");
            let n: usize = p.shape.iter().product();
            let mut st = [0u64; MAX_STATES];
            for (k, b) in state.bufs.iter_mut().enumerate() {
                let (ptr, _sync) = b.device_ptr_mut(&stream);
                st[k] = ptr;
            }
            let rows = match state.rows.as_mut() {
                Some(r) => r.device_ptr_mut(&stream).0,
                None => 0,
            };
            let row_len = TensorMeta::row_len_of(p.shape);
            let chunk = desc.chunk_len(row_len, CHUNK);
            let first = self.host_chunks.len();
            let slot = self.host_tensors.len() as i32;
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                self.host_chunks.push(AgrChunk {
                    tensor: slot,
                    len: len as i32,
                    start: start as i64,
                });
                start += len;
            }
            self.host_tensors.push(AgrTensor {
                p: p.value,
                g,
                st,
                numel: n as i64,
                ndim: p.shape.len() as i64,
                t: (state.t + 1) as f64,
                first_chunk: first as i32,
                n_chunks: (self.host_chunks.len() - first) as i32,
                group: 0,
                id: i as i32,
                rows,
                row_len: row_len as i64,
            });
            active.push(i);
        }
        let nt = self.host_tensors.len();
        let nc = self.host_chunks.len();
        let nr = desc.reductions.len().max(1);
        ensure(&stream, &mut self.d_tensors, nt)?;
        ensure(&stream, &mut self.d_chunks, nc)?;
        ensure(&stream, &mut self.d_partials, nc * nr)?;
        ensure(&stream, &mut self.d_reduced, nt * nr)?;
        ensure(&stream, &mut self.d_counters, nt + 1)?;
        let (Some(d_tensors), Some(d_chunks), Some(partials), Some(reduced), Some(counters)) = (
            self.d_tensors.as_mut(),
            self.d_chunks.as_mut(),
            self.d_partials.as_mut(),
            self.d_reduced.as_mut(),
            self.d_counters.as_mut(),
        ) else {
            unreachable!("ensured above")
        };
        stream.memcpy_htod(&self.host_tensors, &mut d_tensors.slice_mut(..nt))?;
        stream.memcpy_htod(&self.host_chunks, &mut d_chunks.slice_mut(..nc))?;
        let hyper = crate::emulated::hyper_table(desc, [&self.config]);
        ensure(&stream, &mut self.d_hypers, hyper.len())?;
        let Some(d_hypers) = self.d_hypers.as_mut() else {
            unreachable!("ensured above")
        };
        stream.memcpy_htod(&hyper, &mut d_hypers.slice_mut(..hyper.len()))?;
        let d_hypers = &*d_hypers;
        if nt > 0 {
            let cfg = LaunchConfig {
                grid_dim: (nc as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let nt_arg = nt as i32;
            for pass in 0..desc.passes {
                if skip_pass_of(desc, pass, self.non_finite) {
                    continue;
                }
                let mut b = stream.launch_builder(&self.functions[pass]);
                b.arg(d_hypers)
                    .arg(&*d_chunks)
                    .arg(&*d_tensors)
                    .arg(&nt_arg);
                b.arg(&mut *partials)
                    .arg(&mut *reduced)
                    .arg(&mut self.d_global)
                    .arg(&mut *counters);
                b.launch(cfg)?;
                if pass == 0 && self.non_finite != NonFinite::Ignore {
                    // One small read back per step, as GradScaler's found_inf.
                    let global = stream.clone_dtoh(&self.d_global)?;
                    if !global[desc.finite_check].is_finite() {
                        let red = stream.clone_dtoh(&*reduced)?;
                        let index = active[desc.non_finite_slot(&red, nt, nr)];
                        if self.non_finite == NonFinite::Error {
                            return Err(CudaError::Step(StepError::NonFinite { index }));
                        }
                        self.non_finite_skips += 1;
                        return Ok(StepReport {
                            step: self.steps,
                            updated: 0,
                            skipped: params.len(),
                            skipped_non_finite: Some(index),
                        });
                    }
                }
            }
            let mut b = stream.launch_builder(&self.functions[desc.passes]);
            b.arg(d_hypers)
                .arg(&*d_chunks)
                .arg(&*d_tensors)
                .arg(&nt_arg)
                .arg(&*reduced)
                .arg(&self.d_global)
                // No device-side skip: the check was read back after pass 0.
                .arg(&0u64);
            b.launch(cfg)?;
        }
        for &i in &active {
            if let Some(t) = self.tensors[i].as_mut() {
                t.t += 1;
            }
        }
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            updated: nt,
            skipped: params.len() - nt,
            skipped_non_finite: None,
        })
    }

    /// Launches per step: one per reduction pass plus the update.
    pub fn launches_per_step(&self) -> usize {
        self.desc.passes + 1
    }
}

impl<K: StaticKernel> CudaOptimizer<K> {
    /// Launches per step: one per reduction pass plus the update.
    pub const LAUNCHES_PER_STEP: usize = K::DESC.passes + 1;
}
