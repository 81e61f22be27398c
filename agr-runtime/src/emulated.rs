//! The emulated CUDA device: a spec's generated CUDA compiled as host C++
//! (the prelude's `AGR_HOST_CHECK` shim, one thread per block) and launched
//! block by block on the CPU with the same tensor table, chunk table,
//! per-group hyperparameters, partials, counters and read-backs as a GPU
//! step. The engine ([`crate::Optimizer`]) runs it in place of its CPU loops
//! (see [`crate::Device`]), so groups, checkpoints, the non-finite policy and
//! every bad-input error take the GPU's path through the kernels on a machine
//! without a GPU: only the driver calls themselves need one.
//!
//! Needs a C++17 compiler at run time (`g++`, or `$AGR_CXX`). The shared
//! library is cached by a hash of its source in the user's cache folder
//! (`$AGR_EMULATED_DIR`, `$XDG_CACHE_HOME/agr/emulated` or
//! `~/.cache/agr/emulated`).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cpu::KernelDesc;
use crate::device::DeviceError;
use crate::matdev::{Axpby, MatBatch, MatDevice, Sgemm};
use crate::optimizer::skip_pass_of;
use crate::precision::KernelTypes;
use crate::{HyperConfig, HyperValue, NonFinite, TensorMeta, MAX_STATES};

/// Elements per chunk (one block's work); `AGR_CHUNK` in the prelude.
pub const CHUNK: usize = 8192;

/// One parameter tensor of a multi-tensor launch (`AgrTensor` in the prelude).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AgrTensor {
    pub p: u64,
    pub g: u64,
    pub st: [u64; MAX_STATES],
    pub numel: i64,
    pub ndim: i64,
    pub t: f64,
    pub first_chunk: i32,
    pub n_chunks: i32,
    pub group: i32,
    pub rows: u64,
    pub row_len: i64,
    /// This parameter's skip counter (`unsigned*`; 0: none).
    pub skips: u64,
    /// The tensor as matrices over its last two dimensions.
    pub view_rows: i64,
    pub view_cols: i64,
    /// Sharded: where this rank's state buffers (and scattered gradient)
    /// begin in the tensor, and its first row (see [`crate::shard`]).
    pub st_off: i64,
    pub g_off: i64,
    pub rows_off: i64,
    /// A bf16/f16 parameter's f32 master copy (`float*`; 0: none).
    pub master: u64,
    /// Stochastic rounding of bf16/f16 parameters (`sr` 0: nearest): the
    /// seed, the steps issued (this one included), the device's count of
    /// skipped steps (`unsigned*`; 0: none) and the parameter's index.
    pub sr_seed: u64,
    pub sr_step: i64,
    pub sr_skipped: u64,
    pub sr_param: i64,
    pub sr: i64,
}

/// One block's share of the work (`AgrChunk` in the prelude).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AgrChunk {
    pub tensor: i32,
    pub len: i32,
    pub start: i64,
}

/// The hyperparameters as the kernels read them: one `X_Hyper` (the values
/// as doubles in spec order, bools 0 or 1) per group.
pub(crate) fn hyper_table<'a, C: HyperConfig + 'a>(
    desc: &KernelDesc,
    groups: impl IntoIterator<Item = &'a C>,
) -> Vec<f64> {
    let stride = desc.hypers.len().max(1);
    let mut v = vec![];
    for c in groups {
        let start = v.len();
        v.resize(start + stride, 0.0);
        for (k, info) in desc.hypers.iter().enumerate() {
            v[start + k] = c.get(info.name).map_or(0.0, HyperValue::to_f64);
        }
    }
    v
}

/// The chunk table: `chunk` elements per block, whole rows per block when the
/// spec has row reductions (a whole tensor for a factored spec); and each
/// tensor's (first chunk, chunk count). A block's share is an `int` in the
/// kernels: a chunk longer than `i32::MAX` elements (a row of a spec with
/// row reductions, a tensor of a factored spec) is an error naming the
/// tensor's slot.
pub(crate) fn chunk_table(
    desc: &KernelDesc,
    metas: &[TensorMeta],
    chunk: usize,
) -> Result<(Vec<AgrChunk>, Vec<(i32, i32)>), (usize, String)> {
    let mut chunks = vec![];
    let mut spans = vec![];
    for (slot, m) in metas.iter().enumerate() {
        let size = desc.chunk_len(m.numel, m.row_len, chunk);
        if size.min(m.numel) > i32::MAX as usize {
            let what = if desc.factored {
                "a factored spec steps a tensor in one block"
            } else {
                "a spec with row reductions steps whole rows in one block"
            };
            return Err((
                slot,
                format!(
                    "{what}, and a block takes at most {} elements on a CUDA device, not {}",
                    i32::MAX,
                    size.min(m.numel)
                ),
            ));
        }
        let first = chunks.len();
        let mut start = 0;
        while start < m.numel {
            let len = size.min(m.numel - start);
            chunks.push(AgrChunk {
                tensor: slot as i32,
                len: len as i32,
                start: start as i64,
            });
            start += len;
        }
        spans.push((first as i32, (chunks.len() - first) as i32));
    }
    Ok((chunks, spans))
}

thread_local! {
    static LAUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static READ_BACKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Kernel launches on the emulated device so far, issued from this thread
/// (one per pass that ran: a step is a fixed sequence of launches). Counted
/// per thread, so that tests running side by side see only their own.
pub fn launches() -> u64 {
    LAUNCHES.with(|c| c.get())
}

fn note_launch() {
    LAUNCHES.with(|c| c.set(c.get() + 1));
}

/// Reads from "device" memory to the host on the emulated device so far,
/// issued from this thread: what would stall a GPU's stream. A step under
/// `NonFinite::Skip` makes none; `Error` makes one (the finite check), and
/// the step counts make one when asked.
pub fn read_backs() -> u64 {
    READ_BACKS.with(|c| c.get())
}

pub(crate) fn note_read_back() {
    READ_BACKS.with(|c| c.set(c.get() + 1));
}

/// Why the emulated device cannot run a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmulatedError {
    /// The C++ compiler could not be run.
    NoCompiler { compiler: String, error: String },
    /// The generated CUDA did not compile as host C++ (a bug in agr).
    Compile { optimizer: String, log: String },
    /// The compiled library could not be loaded.
    Load(String),
}

impl fmt::Display for EmulatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmulatedError::NoCompiler { compiler, error } => write!(
                f,
                "the emulated CUDA device compiles kernels with `{compiler}`, which could not be run ({error}); install g++ or set AGR_CXX"
            ),
            EmulatedError::Compile { optimizer, log } => write!(
                f,
                "the CUDA of {optimizer} did not compile as host C++ (please report this):\n{log}"
            ),
            EmulatedError::Load(e) => write!(f, "cannot load the emulated kernels: {e}"),
        }
    }
}

impl std::error::Error for EmulatedError {}

type PassFn = unsafe extern "C" fn(
    pass: i32,
    hypers: *const f64,
    chunks: *const AgrChunk,
    nchunks: i32,
    tensors: *const AgrTensor,
    ntensors: i32,
    partials: *mut f64,
    reduced: *mut f64,
    global: *mut f64,
    counters: *mut u32,
    skipped: *mut u32,
) -> i32;

type AxpbyFn = unsafe extern "C" fn(
    dst: *mut f32,
    a: *const f32,
    a_t: i32,
    alpha: f32,
    b: *const f32,
    b_t: i32,
    beta: f32,
    m: i32,
    n: i32,
    stride: i64,
    total: i64,
);

/// Launches one kernel of a step (by pass number) over its scratch arrays
/// (partials, per-tensor and global reductions).
type PassLauncher<'a> = dyn FnMut(usize, Mode, &mut [f64], &mut [f64], &mut [f64]) + 'a;

/// How a pass is launched: whole, or (a sharded step's reduction pass)
/// twice: the chunks' partials alone (no counters), then, once they are
/// gathered, the fold alone (no chunk table, one block per tensor).
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Whole,
    PartialsOnly,
    FoldOnly,
}

/// A spec's kernels compiled for the CPU.
pub struct HostModule {
    desc: &'static KernelDesc,
    /// The storage types it was compiled for.
    types: KernelTypes,
    pass: PassFn,
    /// The matrix programs' sums and transposes (`X_mat_axpby`), where the
    /// spec has matrix blocks.
    axpby: Option<AxpbyFn>,
    // Keeps `pass` and `axpby` valid.
    _lib: libloading::Library,
}

impl fmt::Debug for HostModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostModule")
            .field("optimizer", &self.desc.name)
            .finish()
    }
}

/// The host program: the spec's CUDA and one entry point that runs a
/// kernel once per block, by its place in `cuda_kernels` (the passes, the
/// matrix blocks', the per-tensor states'), and one that runs the matrix
/// programs' sums once per element.
fn host_source(desc: &KernelDesc, types: KernelTypes) -> String {
    let x = desc.name;
    let mut src = "#define AGR_HOST_CHECK 1\n".to_string();
    for (name, value) in types.defines() {
        src += &format!("#define {name} {value}\n");
    }
    src += &format!("{}\n", desc.cuda_source);
    src += &format!(
        "extern \"C\" int agr_emulated_pass(int pass, const double* hypers, const AgrChunk* chunks, int nchunks, const AgrTensor* tensors, int ntensors, double* partials, double* reduced, double* global, unsigned* counters, unsigned* skipped) {{\n    const {x}_Hyper* h = (const {x}_Hyper*)hypers;\n    switch (pass) {{\n"
    );
    for k in 0..desc.passes {
        src += &format!(
            "    case {k}:\n        for (int b = 0; b < nchunks; ++b) {{ blockIdx.x = (unsigned)b; {x}_reduce{k}(h, chunks, tensors, ntensors, partials, reduced, global, counters); }}\n        return 0;\n"
        );
    }
    src += &format!(
        "    case {}:\n        for (int b = 0; b < nchunks; ++b) {{ blockIdx.x = (unsigned)b; {x}_update(h, chunks, tensors, ntensors, reduced, global, skipped); }}\n        return 0;\n",
        desc.passes
    );
    for b in 0..desc.matrices.len() {
        src += &format!(
            "    case {}:\n        for (int b = 0; b < nchunks; ++b) {{ blockIdx.x = (unsigned)b; {x}_matrix{b}(h, chunks, tensors, ntensors, reduced, global); }}\n        return 0;\n",
            desc.matrix_kernel(b)
        );
    }
    if let Some(at) = desc.tensor_states_kernel() {
        src += &format!(
            "    case {}:\n        for (int b = 0; b < nchunks; ++b) {{ blockIdx.x = (unsigned)b; {x}_tensor_states(h, chunks, tensors, ntensors, reduced, global, skipped); }}\n        return 0;\n",
            at
        );
    }
    src += "    }\n    return 1;\n}\n";
    if !desc.matrices.is_empty() {
        src += &format!(
            "extern \"C\" void agr_emulated_axpby(float* dst, const float* a, int a_t, float alpha, const float* b, int b_t, float beta, int m, int n, long long stride, long long total) {{\n    for (long long e = 0; e < total; ++e) {{ blockIdx.x = (unsigned)e; {x}_mat_axpby(dst, a, a_t, alpha, b, b_t, beta, m, n, stride, total); }}\n}}\n"
        );
    }
    src
}

/// Where compiled kernels are kept: `$AGR_EMULATED_DIR`, else the user's
/// cache folder (`$XDG_CACHE_HOME/agr/emulated`, `~/.cache/agr/emulated`),
/// never a folder other users can write (a library is loaded from it).
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AGR_EMULATED_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("agr").join("emulated"),
        None => std::env::temp_dir().join(format!("agr-emulated-{}", std::process::id())),
    }
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

fn fnv1a(text: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl HostModule {
    /// Compiles (or finds in the cache) the spec's kernels for the CPU,
    /// every buffer f32.
    pub fn load(desc: &'static KernelDesc) -> Result<Arc<HostModule>, EmulatedError> {
        Self::load_for(desc, KernelTypes::default())
    }

    /// The spec's kernels for buffers stored as `types` says.
    pub(crate) fn load_for(
        desc: &'static KernelDesc,
        types: KernelTypes,
    ) -> Result<Arc<HostModule>, EmulatedError> {
        type Cache = Mutex<HashMap<(usize, KernelTypes), Arc<HostModule>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = (desc as *const KernelDesc as usize, types);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(Self::build(desc, types)?);
        cache.insert(key, m.clone());
        Ok(m)
    }

    /// The storage types it was compiled for.
    pub(crate) fn types(&self) -> KernelTypes {
        self.types
    }

    fn build(desc: &'static KernelDesc, types: KernelTypes) -> Result<HostModule, EmulatedError> {
        let compiler = std::env::var("AGR_CXX").unwrap_or_else(|_| "g++".into());
        let src = host_source(desc, types);
        let dir = cache_dir();
        create_private_dir(&dir)
            .map_err(|e| EmulatedError::Load(format!("cannot create {}: {e}", dir.display())))?;
        let stem = format!("{}-{:016x}", desc.name, fnv1a(&(src.clone() + &compiler)));
        let lib: PathBuf = dir.join(format!("{stem}.so"));
        if !lib.exists() {
            let cpp = dir.join(format!("{stem}.{}.cpp", std::process::id()));
            let tmp = dir.join(format!("{stem}.{}.so", std::process::id()));
            std::fs::write(&cpp, &src).map_err(|e| EmulatedError::Load(e.to_string()))?;
            let out = Command::new(&compiler)
                .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-o"])
                .arg(&tmp)
                .arg(&cpp)
                .output()
                .map_err(|e| EmulatedError::NoCompiler {
                    compiler: compiler.clone(),
                    error: e.to_string(),
                })?;
            let _ = std::fs::remove_file(&cpp);
            if !out.status.success() {
                return Err(EmulatedError::Compile {
                    optimizer: desc.name.into(),
                    log: String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .take(30)
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
            // Atomic: another process may be building the same library.
            std::fs::rename(&tmp, &lib).map_err(|e| EmulatedError::Load(e.to_string()))?;
        }
        // SAFETY: the library is ours, built from the source above; loading
        // it runs no initialisers beyond the C++ runtime's.
        let lib_handle = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| EmulatedError::Load(e.to_string()))?;
        // SAFETY: the symbol has exactly the signature `PassFn` (see `host_source`).
        let pass: PassFn = unsafe {
            *lib_handle
                .get::<PassFn>(b"agr_emulated_pass\0")
                .map_err(|e| EmulatedError::Load(e.to_string()))?
        };
        let axpby = if desc.matrices.is_empty() {
            None
        } else {
            // SAFETY: the symbol has exactly the signature `AxpbyFn` (see `host_source`).
            Some(unsafe {
                *lib_handle
                    .get::<AxpbyFn>(b"agr_emulated_axpby\0")
                    .map_err(|e| EmulatedError::Load(e.to_string()))?
            })
        };
        Ok(HostModule {
            desc,
            types,
            pass,
            axpby,
            _lib: lib_handle,
        })
    }

    /// Runs one step's passes over the engine's tables, in launch order
    /// (see [`crate::device::Launch::run`]); `counts` are the skip counters.
    ///
    /// # Safety
    /// The tables must describe live host buffers of the sizes they say,
    /// written by nothing else during the call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        desc: &'static KernelDesc,
        hypers: &[f64],
        chunks: &[AgrChunk],
        tensors: &[AgrTensor],
        mats: &[MatBatch],
        scratch: &mut Vec<f32>,
        policy: NonFinite,
        counts: *mut u32,
        mut gather: Option<crate::device::GatherPartials<'_>>,
    ) -> Result<Option<usize>, crate::DeviceError> {
        let nt = tensors.len();
        let nr = desc.reductions.len().max(1);
        let mut partials = vec![0.0f64; chunks.len() * nr];
        let mut reduced = vec![0.0f64; nt * nr];
        let mut global = vec![0.0f64; nr];
        let mut counters = vec![0u32; nt + 1];
        // Under `Skip` the update kernel decides and counts, as on a GPU,
        // where reading the check back would stall the stream; `Error` reads
        // the check back after the first pass, to return before the update.
        let skipped = if policy == NonFinite::Skip {
            counts
        } else {
            std::ptr::null_mut()
        };
        let mut launch = |k: usize,
                          mode: Mode,
                          partials: &mut [f64],
                          reduced: &mut [f64],
                          global: &mut [f64]| {
            let (chunk_ptr, grid) = match mode {
                Mode::FoldOnly => (std::ptr::null(), nt),
                _ => (chunks.as_ptr(), chunks.len()),
            };
            let counter_ptr = match mode {
                Mode::PartialsOnly => std::ptr::null_mut(),
                _ => counters.as_mut_ptr(),
            };
            // SAFETY: the tables describe the caller's valid buffers; the
            // scratch arrays have the sizes the kernels index.
            let status = (self.pass)(
                k as i32,
                hypers.as_ptr(),
                chunk_ptr,
                grid as i32,
                tensors.as_ptr(),
                nt as i32,
                partials.as_mut_ptr(),
                reduced.as_mut_ptr(),
                global.as_mut_ptr(),
                counter_ptr,
                skipped,
            );
            assert_eq!(status, 0, "pass {k} is not a kernel of {}", desc.name);
            note_launch();
        };
        // Matrix blocks before pass `k`: the block's kernel, then its programs.
        let mut blocks = |k: usize,
                          launch: &mut PassLauncher<'_>,
                          partials: &mut [f64],
                          reduced: &mut [f64],
                          global: &mut [f64]| {
            for (b, info) in desc.matrices.iter().enumerate() {
                if info.phase != k {
                    continue;
                }
                launch(
                    desc.matrix_kernel(b),
                    Mode::Whole,
                    partials,
                    reduced,
                    global,
                );
                let mut dev = HostMat {
                    module: self,
                    scratch: &mut *scratch,
                };
                // SAFETY: the batches address the tensors' block buffers,
                // host memory the caller holds for the step.
                unsafe { crate::matdev::run_batches(&mut dev, mats, b) }
                    .expect("host memory does not fail");
            }
        };
        for k in 0..desc.passes {
            blocks(k, &mut launch, &mut partials, &mut reduced, &mut global);
            if skip_pass_of(desc, k, policy) {
                continue;
            }
            match gather.as_mut() {
                None => launch(k, Mode::Whole, &mut partials, &mut reduced, &mut global),
                Some(gather) => {
                    launch(
                        k,
                        Mode::PartialsOnly,
                        &mut partials,
                        &mut reduced,
                        &mut global,
                    );
                    gather(k, &mut partials)?;
                    launch(k, Mode::FoldOnly, &mut partials, &mut reduced, &mut global);
                }
            }
            if k == 0 && policy == NonFinite::Error {
                note_read_back();
                if !global[desc.finite_check].is_finite() {
                    return Ok(Some(desc.non_finite_slot(&reduced, nt, nr)));
                }
            }
        }
        blocks(
            desc.passes,
            &mut launch,
            &mut partials,
            &mut reduced,
            &mut global,
        );
        launch(
            desc.passes,
            Mode::Whole,
            &mut partials,
            &mut reduced,
            &mut global,
        );
        if let Some(at) = desc.tensor_states_kernel() {
            launch(at, Mode::Whole, &mut partials, &mut reduced, &mut global);
        }
        debug_assert!(
            counters.iter().all(|&c| c == 0),
            "a reduction counter was left set"
        );
        Ok(None)
    }
}

/// The emulated device's matrix device: host memory, the `gemm` crate in
/// cuBLAS's place, and the spec's `X_mat_axpby` kernel compiled as host C++.
struct HostMat<'a> {
    module: &'a HostModule,
    scratch: &'a mut Vec<f32>,
}

impl MatDevice for HostMat<'_> {
    fn scratch(&mut self, floats: usize) -> Result<u64, DeviceError> {
        if self.scratch.len() < floats {
            // NaN: a register read before it is written shows.
            self.scratch.resize(floats, f32::NAN);
        }
        Ok(self.scratch.as_mut_ptr() as u64)
    }
    unsafe fn copy(&mut self, dst: u64, src: u64, floats: usize) -> Result<(), DeviceError> {
        std::ptr::copy_nonoverlapping(src as *const f32, dst as *mut f32, floats);
        Ok(())
    }
    unsafe fn sgemm(&mut self, g: &Sgemm) -> Result<(), DeviceError> {
        note_launch();
        crate::matdev::host_sgemm(g);
        Ok(())
    }
    unsafe fn axpby(&mut self, x: &Axpby) -> Result<(), DeviceError> {
        let f = self
            .module
            .axpby
            .expect("a spec with matrix blocks has X_mat_axpby");
        note_launch();
        f(
            x.dst as *mut f32,
            x.a as *const f32,
            i32::from(x.a_t),
            x.alpha,
            x.b as *const f32,
            i32::from(x.b_t),
            x.beta,
            x.m,
            x.n,
            x.stride,
            x.total,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_longer_than_an_int_is_refused_by_slot() {
        // A factored spec steps each tensor in one block; a block's length
        // is an `int` in the kernels.
        let spec = crate::compile(
            "F { hyper { lr = 0.1 } state { vr: reduced(-1) = 0 } \
             step { vr = mean(g * g, -1); p = p - lr * g / sqrt(vr + 1); } }",
        )
        .unwrap();
        let desc = spec.desc();
        let small = TensorMeta::of(&[3, 4], 1);
        // 2^31 elements: described, never allocated.
        let huge = TensorMeta::of(&[2, 1 << 30], 1);
        let (chunks, spans) = chunk_table(desc, &[small, small], CHUNK).unwrap();
        assert_eq!((chunks.len(), spans), (2, vec![(0, 1), (1, 1)]));
        let (slot, e) = chunk_table(desc, &[small, huge], CHUNK).unwrap_err();
        assert_eq!(slot, 1);
        assert!(e.contains("factored") && e.contains("2147483648"), "{e}");
        // A spec without row reductions cuts the same tensor in chunks.
        let plain = crate::compile("P { hyper { lr = 0.1 } step { p = p - lr * g; } }").unwrap();
        let (chunks, _) = chunk_table(plain.desc(), &[huge], CHUNK).unwrap();
        assert_eq!(chunks.len(), (1 << 31) / CHUNK);
    }
}
