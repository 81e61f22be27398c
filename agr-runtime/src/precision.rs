//! Storage precision: parameters and gradients in f32, bf16 or f16, state
//! buffers in f32, bf16, f16 or 8-bit block-quantised codes, with f32
//! arithmetic throughout.
//!
//! The kernels a spec compiles to always compute in f32. Where a step's
//! parameters, gradients or states are stored in fewer bytes, the CPU
//! engine hands an element-wise update its bf16 buffers as they are stored
//! ([`crate::cpu::Kernel::update_words`]: the loop converts as it loads and
//! stores), where every narrowed buffer is bf16 rounded to nearest without
//! a master copy; otherwise it widens each work item's values into
//! per-thread f32 scratch before the kernel runs and narrows what the
//! kernel wrote after it (see [`crate::Optimizer::set_precision`]); with
//! every buffer in f32 the kernels read and write the buffers in place, as
//! they always have. On a
//! CUDA device (and the emulated one) the kernels are compiled for the
//! buffers' types and convert in their loads and stores, with the same
//! rules and the same random bits; 8-bit states have no kernels and keep
//! an optimizer on the CPU.
//!
//! Narrowing rules, exactly:
//! - **bf16 / f16, nearest**: IEEE round-to-nearest-even (the `half` crate's
//!   conversions; torch's `.to(bfloat16)`).
//! - **bf16, stochastic**: torchao's `_fp32_to_bf16_sr`: the f32's low 16
//!   bits `frac`, a uniform 16-bit `r`; away from zero when `r < frac`, else
//!   toward zero. NaN and infinities convert as nearest.
//! - **f16, stochastic**: between the two f16 values around `x`, the upper
//!   with probability `(x - lo) / (hi - lo)` (computed in f64); values the
//!   nearest rounding sends to infinity, NaN and exact values as nearest.
//! - The random numbers are a hash of `(seed, step, parameter, element)`:
//!   a run is reproducible from its seed, whatever the thread count.
//! - **q8 / uq8** (state only): blocks of [`Q8_BLOCK`] values; per block
//!   `scale = max(max |x|, 1e-12)` (f32), codes are the nearest entries of a
//!   256-entry dynamic-tree map (bitsandbytes' `create_dynamic_map`, signed
//!   for `q8`, unsigned for `uq8`) to `x / scale`, found as torchao's
//!   `quantize_8bit_with_qmap` finds them (a branch-free binary search, then
//!   up when `x/scale - lo >= (hi - lo) * 0.5`); the value read back is
//!   `map[code] * scale`. `uq8` is for states that are never negative (a
//!   second moment): a negative value is stored as 0.

use std::fmt;

use half::{bf16, f16};

use crate::buf::{AlignedBuf, StateBuf};
use crate::cpu::Kernel;
use crate::device::{Exec, Store};
use crate::{Optimizer, ParamMut};

mod qmap;

/// How a parameter, gradient or state buffer is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Storage {
    /// 4 bytes a value.
    #[default]
    F32,
    /// 2 bytes: bfloat16 (8 exponent bits, 7 stored mantissa bits).
    Bf16,
    /// 2 bytes: IEEE half precision (5 exponent bits, 10 mantissa bits).
    F16,
    /// 1 byte a value plus an f32 scale per block of [`Q8_BLOCK`]: signed
    /// dynamic-tree codes (state only).
    Q8,
    /// As [`Storage::Q8`] with the unsigned map, for states that are never
    /// negative (state only).
    Uq8,
}

/// Values per scale of a [`Storage::Q8`] / [`Storage::Uq8`] buffer.
pub const Q8_BLOCK: usize = 256;

impl Storage {
    /// Every storage, as the spec language and the command line name them.
    pub const ALL: [Storage; 5] = [
        Storage::F32,
        Storage::Bf16,
        Storage::F16,
        Storage::Q8,
        Storage::Uq8,
    ];

    /// The name used in specs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::Bf16 => "bf16",
            Storage::F16 => "f16",
            Storage::Q8 => "q8",
            Storage::Uq8 => "uq8",
        }
    }

    /// The storage named `name`.
    pub fn parse(name: &str) -> Option<Storage> {
        Storage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Bytes per value (a block's scale spread over its values).
    pub fn bytes_per_value(self) -> f64 {
        match self {
            Storage::F32 => 4.0,
            Storage::Bf16 | Storage::F16 => 2.0,
            Storage::Q8 | Storage::Uq8 => 1.0 + 4.0 / Q8_BLOCK as f64,
        }
    }

    /// Whether parameters and gradients may be stored so (not the 8-bit codes).
    pub const fn for_params(self) -> bool {
        matches!(self, Storage::F32 | Storage::Bf16 | Storage::F16)
    }

    pub(crate) const fn is_q8(self) -> bool {
        matches!(self, Storage::Q8 | Storage::Uq8)
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The storage types a spec's CUDA kernels are compiled for: the
/// parameters' and gradients', and each state's (per-element states only;
/// see the prelude's `AGR_P_T`, `AGR_G_T` and `AGR_S<k>_T`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct KernelTypes {
    pub(crate) param: Storage,
    pub(crate) states: [Storage; crate::MAX_STATES],
}

impl KernelTypes {
    /// Parameters in `param`, state `k` in `states[k]` (f32 past its end).
    pub(crate) fn new(param: Storage, states: &[Storage]) -> KernelTypes {
        let mut t = KernelTypes {
            param,
            ..KernelTypes::default()
        };
        t.states[..states.len()].copy_from_slice(states);
        t
    }

    /// The preprocessor definitions that select them: `(name, value)`.
    pub(crate) fn defines(&self) -> Vec<(String, &'static str)> {
        fn c_type(s: Storage) -> &'static str {
            match s {
                Storage::Bf16 => "__nv_bfloat16",
                Storage::F16 => "__half",
                Storage::F32 => "float",
                Storage::Q8 | Storage::Uq8 => unreachable!("8-bit states step on the CPU only"),
            }
        }
        let mut d = vec![];
        if self.param != Storage::F32 {
            d.push(("AGR_P_T".to_string(), c_type(self.param)));
            d.push(("AGR_G_T".to_string(), c_type(self.param)));
        }
        for (k, &s) in self.states.iter().enumerate() {
            if s != Storage::F32 {
                d.push((format!("AGR_S{k}_T"), c_type(s)));
            }
        }
        let all = || std::iter::once(self.param).chain(self.states);
        if all().any(|s| s == Storage::F16) {
            d.push(("AGR_USE_HALF".to_string(), "1"));
        }
        if all().any(|s| s == Storage::Bf16) {
            d.push(("AGR_USE_BF16".to_string(), "1"));
        }
        d
    }

    /// Whether every buffer is f32.
    #[cfg(feature = "cuda")]
    pub(crate) fn all_f32(&self) -> bool {
        *self == KernelTypes::default()
    }
}

/// How f32 results are narrowed into bf16 or f16 parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    #[default]
    Nearest,
    /// Stochastic rounding, unbiased: see the module docs. The random
    /// numbers depend on `seed`, the step, the parameter and the element only.
    Stochastic { seed: u64 },
}

/// The precision an optimizer steps in; see
/// [`crate::Optimizer::set_precision`]. The default is f32 everywhere, as
/// the spec declares its states.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Precision {
    /// For bf16 or f16 parameters: keep an f32 master copy of each one as
    /// state, step it, and write the parameter as its rounding (the usual
    /// mixed-precision setup). Without it the parameter itself is widened,
    /// stepped and narrowed with [`Precision::rounding`] every step.
    pub master: bool,
    /// How new parameter values are narrowed into bf16 or f16.
    pub rounding: Rounding,
    /// The storage of state buffers by name; a state not named keeps the
    /// storage its spec declares (`m: bf16 = 0`), f32 by default. Only
    /// per-element states can be narrowed.
    pub states: Vec<(String, Storage)>,
}

impl Precision {
    /// f32 everywhere (the spec's declared state storage).
    pub fn f32() -> Precision {
        Precision::default()
    }

    /// Every per-element state stored as `storage` (see [`Precision::state`]
    /// to choose per state).
    pub fn all_states(mut self, storage: Storage, names: &[&str]) -> Precision {
        for n in names {
            self = self.state(n, storage);
        }
        self
    }

    /// State `name` stored as `storage`.
    pub fn state(mut self, name: &str, storage: Storage) -> Precision {
        self.states.retain(|(n, _)| n != name);
        self.states.push((name.to_string(), storage));
        self
    }

    /// With an f32 master copy of bf16/f16 parameters.
    pub fn with_master(mut self, master: bool) -> Precision {
        self.master = master;
        self
    }

    /// With stochastic rounding of bf16/f16 parameters from `seed`.
    pub fn stochastic(mut self, seed: u64) -> Precision {
        self.rounding = Rounding::Stochastic { seed };
        self
    }
}

/// A parameter or gradient element type the CPU engine steps: `f32`,
/// `half::bf16` or `half::f16`.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
    /// How it is stored.
    const STORAGE: Storage;
    /// The slice as raw 16-bit words (bf16 and f16), `None` for f32.
    #[doc(hidden)]
    fn words(v: &[Self]) -> Option<&[u16]>;
    /// The same, writable.
    #[doc(hidden)]
    fn words_mut(v: &mut [Self]) -> Option<&mut [u16]>;
    /// The slice as f32, `None` for bf16 and f16.
    #[doc(hidden)]
    fn as_f32(v: &[Self]) -> Option<&[f32]>;
    /// The value in f32 (exact).
    #[doc(hidden)]
    fn to_f32(self) -> f32;
    /// The parameters as f32 ones, `None` for bf16 and f16.
    #[doc(hidden)]
    fn f32_params<'s, 'a>(p: &'s mut [ParamMut<'a, Self>]) -> Option<&'s mut [ParamMut<'a, f32>]>;
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Element for f32 {
    const STORAGE: Storage = Storage::F32;
    fn words(_: &[Self]) -> Option<&[u16]> {
        None
    }
    fn words_mut(_: &mut [Self]) -> Option<&mut [u16]> {
        None
    }
    fn as_f32(v: &[Self]) -> Option<&[f32]> {
        Some(v)
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn f32_params<'s, 'a>(p: &'s mut [ParamMut<'a, Self>]) -> Option<&'s mut [ParamMut<'a, f32>]> {
        Some(p)
    }
}

/// bf16 and f16: 16-bit words, never f32.
macro_rules! half_element {
    ($($t:ty => $storage:expr),*) => {$(
        impl Element for $t {
            const STORAGE: Storage = $storage;
            fn words(v: &[Self]) -> Option<&[u16]> {
                Some(half::slice::HalfFloatSliceExt::reinterpret_cast(v))
            }
            fn words_mut(v: &mut [Self]) -> Option<&mut [u16]> {
                Some(half::slice::HalfFloatSliceExt::reinterpret_cast_mut(v))
            }
            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn f32_params<'s, 'a>(
                _: &'s mut [ParamMut<'a, Self>],
            ) -> Option<&'s mut [ParamMut<'a, f32>]> {
                None
            }
        }
    )*};
}

half_element!(bf16 => Storage::Bf16, f16 => Storage::F16);

/// Why an optimizer's precision cannot be set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrecisionError(pub String);

impl fmt::Display for PrecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; the precision was not changed", self.0)
    }
}

impl std::error::Error for PrecisionError {}

impl<K: Kernel> Optimizer<K> {
    /// Sets how parameters' master copies and states are stored; the
    /// arithmetic stays f32 (see the module docs for the exact rounding).
    ///
    /// - A state can be narrowed if it is per element (not `reduced`,
    ///   `per_tensor` or a matrix block's); q8/uq8 also need work items
    ///   aligned to their blocks, so not a spec with row reductions.
    /// - Narrowed states, master copies and bf16/f16 parameters step on the
    ///   CPU and on CUDA devices (the kernels load and store each buffer in
    ///   its type), unsharded; 8-bit states step on the CPU only.
    /// - Existing state is converted (to f32 exactly; narrower with
    ///   round-to-nearest); master copies are dropped when `master` is
    ///   off and made from the parameters on their next step when it is on.
    ///
    /// On error nothing changes.
    pub fn set_precision(&mut self, precision: Precision) -> Result<(), PrecisionError> {
        let desc = self.desc;
        // The spec's declared storage, then the overrides.
        let mut storage: Vec<Storage> = desc.states.iter().map(|s| s.storage).collect();
        for (name, kind) in &precision.states {
            let Some(k) = desc.states.iter().position(|s| s.name == *name) else {
                let known: Vec<&str> = desc.states.iter().map(|s| s.name).collect();
                return Err(PrecisionError(format!(
                    "`{}` has no state `{name}` (its states: {})",
                    desc.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            };
            let s = &desc.states[k];
            let what = if s.per_tensor {
                Some("a per-tensor state")
            } else if s.reduced.is_some() {
                Some("a reduced state")
            } else if desc.matrices.iter().any(|m| m.state == k) {
                Some("a matrix block's buffer")
            } else {
                None
            };
            if let (Some(what), true) = (what, *kind != Storage::F32) {
                return Err(PrecisionError(format!(
                    "state `{name}` of `{}` is {what}: only per-element states can be stored in {kind}",
                    desc.name
                )));
            }
            if kind.is_q8() && desc.row_reductions > 0 && !desc.factored {
                return Err(PrecisionError(format!(
                    "state `{name}` of `{}` in {kind}: `{}` reduces per row, so its work items are whole rows, not the {Q8_BLOCK}-value blocks {kind} scales by; use bf16 or f16",
                    desc.name, desc.name
                )));
            }
            storage[k] = *kind;
        }
        let narrows = precision.master || storage.iter().any(|&k| k != Storage::F32);
        if narrows {
            if let Some(why) = self.narrow_refused(&storage) {
                return Err(PrecisionError(why));
            }
        }
        // Everything checked: convert the existing state. A GPU's goes
        // through the host, all of it before anything changes.
        let ns = desc.states.len();
        #[cfg(feature = "cuda")]
        let mut on_gpu = vec![];
        #[cfg(feature = "cuda")]
        if let Exec::Cuda(c) = &self.exec {
            for (i, t) in self.tensors.iter().enumerate() {
                let Some(Store::Cuda(d)) = t.as_ref().map(|t| &t.store) else {
                    continue;
                };
                let gpu = |e: crate::DeviceError| PrecisionError(e.to_string());
                let mut host = d.download().map_err(gpu)?;
                convert_store(&mut host, &storage, precision.master, i * ns);
                on_gpu.push((i, c.upload_store(&host).map_err(gpu)?));
            }
        }
        #[cfg(feature = "cuda")]
        for (i, store) in on_gpu {
            if let Some(t) = self.tensors[i].as_mut() {
                t.store = store;
            }
        }
        for (i, t) in self.tensors.iter_mut().enumerate() {
            if let Some(t) = t {
                convert_store(&mut t.store, &storage, precision.master, i * ns);
            }
        }
        self.storage = storage;
        self.precision = precision;
        Ok(())
    }

    /// The precision set by [`Optimizer::set_precision`].
    pub fn precision(&self) -> &Precision {
        &self.precision
    }

    /// Each state's storage, in spec order.
    pub fn state_storage(&self) -> &[Storage] {
        &self.storage
    }

    /// Whether this optimizer keeps anything narrower than f32 or a
    /// master copy.
    pub(crate) fn narrows(&self) -> bool {
        self.precision.master || self.storage.iter().any(|&k| k != Storage::F32)
    }

    /// Why this optimizer cannot step narrowed buffers (its states in
    /// `storage`) now, if it cannot.
    pub(crate) fn narrow_refused(&self, storage: &[Storage]) -> Option<String> {
        if !matches!(self.exec, Exec::Cpu) && storage.iter().any(|s| s.is_q8()) {
            return Some(format!(
                "`{}` is on {}: 8-bit (q8/uq8) states step on the CPU only in this version (move it to the CPU first, or store them in bf16 or f16)",
                self.desc.name,
                self.exec.device()
            ));
        }
        if self.shard.is_some() {
            return Some(format!(
                "`{}` is sharded: bf16/f16 parameters, narrowed states and master copies are not sharded in this version",
                self.desc.name
            ));
        }
        None
    }
}

/// Stores `store`'s host buffers as `storage` says (`stagger`: the first
/// buffer's, see [`AlignedBuf::filled`]); without `master` its master copy
/// goes. (A GPU's store is converted through the host by the caller.)
fn convert_store(store: &mut Store, storage: &[Storage], master: bool, stagger: usize) {
    if !master {
        store.drop_master();
    }
    #[allow(irrefutable_let_patterns)]
    if let Store::Host { bufs, .. } = store {
        for (k, b) in bufs.iter_mut().enumerate() {
            if b.storage() != storage[k] {
                *b = StateBuf::from_f32(storage[k], &b.to_f32(), stagger + k);
            }
        }
    }
}

/// Calls `$f(args)` built with AVX2 where the CPU has it (the loops below
/// then vectorise 8 wide), else the baseline build: the same operations,
/// the same bits. It returns from the calling function, which must return
/// `()` right after.
macro_rules! with_avx2 {
    ($f:ident($($a:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { avx2::$f($($a),*) };
        }
        $f($($a),*)
    }};
}

/// The conversion loops built with AVX2 (see `with_avx2!`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_widen_loop(words: &[u16], out: &mut [f32]) {
        super::bf16_widen_loop(words, out)
    }
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_nearest_loop(vals: &[f32], out: &mut [u16]) {
        super::bf16_nearest_loop(vals, out)
    }
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_sr_loop(key: u64, first: usize, vals: &[f32], out: &mut [u16]) {
        super::bf16_sr_loop(key, first, vals, out)
    }
}

/// Exact: the bf16 bits are the f32's high half.
#[inline(always)]
fn bf16_widen_loop(words: &[u16], out: &mut [f32]) {
    for (o, &w) in out.iter_mut().zip(words) {
        *o = f32::from_bits((w as u32) << 16);
    }
}

/// Round to nearest even on the bits, branch-free so the loop vectorises;
/// a NaN keeps its sign and becomes a quiet NaN.
#[inline(always)]
fn bf16_nearest_loop(vals: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(vals) {
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        let nan = ((b >> 16) as u16) | 0x0040;
        *o = if v.is_nan() { nan } else { rounded };
    }
}

#[inline(always)]
fn bf16_sr_loop(key: u64, first: usize, vals: &[f32], out: &mut [u16]) {
    for (i, (o, &v)) in out.iter_mut().zip(vals).enumerate() {
        *o = bf16_stochastic(v, noise_at(key, first + i) as u16);
    }
}

/// Widens 16-bit words of `kind` (bf16 or f16) into `out`.
pub(crate) fn widen(kind: Storage, words: &[u16], out: &mut [f32]) {
    match kind {
        Storage::Bf16 => with_avx2!(bf16_widen_loop(words, out)),
        Storage::F16 => {
            use half::slice::HalfFloatSliceExt;
            let h: &[f16] = half::slice::HalfBitsSliceExt::reinterpret_cast(words);
            h.convert_to_f32_slice(out);
        }
        _ => unreachable!("only 16-bit storages are widened from words"),
    }
}

/// A bf16/f16 parameter's f32 master copy: its words of `kind` widened,
/// exactly (`index`: the parameter's, for the buffer's stagger).
pub(crate) fn master_of(kind: Storage, words: &[u16], index: usize) -> AlignedBuf {
    let mut m = AlignedBuf::filled(words.len(), 0.0, index);
    widen(kind, words, m.as_mut_slice());
    m
}

/// Narrows `vals` into 16-bit words of `kind` with round-to-nearest-even.
pub(crate) fn narrow_nearest(kind: Storage, vals: &[f32], out: &mut [u16]) {
    match kind {
        Storage::Bf16 => with_avx2!(bf16_nearest_loop(vals, out)),
        Storage::F16 => {
            use half::slice::HalfFloatSliceExt;
            let h: &mut [f16] = half::slice::HalfBitsSliceExt::reinterpret_cast_mut(out);
            h.convert_from_f32_slice(vals);
        }
        _ => unreachable!("only 16-bit storages are narrowed to words"),
    }
}

/// The key of parameter `param`'s random numbers on `step`.
#[inline]
pub(crate) fn noise_key(seed: u64, step: u64, param: usize) -> u64 {
    let mut x = seed ^ 0x243F_6A88_85A3_08D3;
    x = mix(x ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    mix(x ^ (param as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
}

/// The random 64 bits of element `index` under `key` (see [`noise_key`]).
#[inline]
pub(crate) fn noise_at(key: u64, index: usize) -> u64 {
    mix(key ^ index as u64)
}

/// The random 64 bits of element `index` of parameter `param` on `step`.
#[cfg(test)]
fn noise(seed: u64, step: u64, param: usize, index: usize) -> u64 {
    noise_at(noise_key(seed, step, param), index)
}

/// splitmix64's finaliser.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// bf16 stochastic rounding of `x` with 16 random bits `r`.
#[inline]
pub fn bf16_stochastic(x: f32, r: u16) -> u16 {
    if !x.is_finite() {
        return bf16::from_f32(x).to_bits();
    }
    let bits = x.to_bits();
    let frac = bits & 0xFFFF;
    let toward_zero = bits & 0xFFFF_0000;
    let out = if (r as u32) < frac {
        toward_zero + 0x1_0000
    } else {
        toward_zero
    };
    (out >> 16) as u16
}

/// f16 stochastic rounding of `x` with a uniform `u` in [0, 1).
#[inline]
pub fn f16_stochastic(x: f32, u: f64) -> u16 {
    let near = f16::from_f32(x);
    let back = near.to_f32();
    if !x.is_finite() || !back.is_finite() || back == x {
        return near.to_bits();
    }
    // The f16 on the other side of x from `near`.
    let other = {
        let b = near.to_bits();
        let away = (back.abs() < x.abs()) as i32; // further from zero?
        let mag = (b & 0x7FFF) as i32 + if away == 1 { 1 } else { -1 };
        let mag = if (b & 0x7FFF) == 0 && away == 0 {
            // near is ±0 and x is beyond it: the smallest subnormal of x's sign
            1
        } else {
            mag
        };
        let sign = if x < 0.0 { 0x8000 } else { 0 };
        f16::from_bits(sign | mag as u16)
    };
    let (lo, hi) = if back < x {
        (near, other)
    } else {
        (other, near)
    };
    let (l, h) = (lo.to_f32() as f64, hi.to_f32() as f64);
    let p_up = (x as f64 - l) / (h - l);
    if u < p_up {
        hi.to_bits()
    } else {
        lo.to_bits()
    }
}

/// Narrows `vals` into words of `kind` with `rounding`; element `i` of
/// `vals` is element `first + i` of parameter `param`.
pub(crate) fn narrow(
    kind: Storage,
    rounding: Rounding,
    step: u64,
    param: usize,
    first: usize,
    vals: &[f32],
    out: &mut [u16],
) {
    match rounding {
        Rounding::Nearest => narrow_nearest(kind, vals, out),
        Rounding::Stochastic { seed } => match kind {
            Storage::Bf16 => {
                let key = noise_key(seed, step, param);
                with_avx2!(bf16_sr_loop(key, first, vals, out))
            }
            Storage::F16 => {
                let key = noise_key(seed, step, param);
                for (i, (o, &v)) in out.iter_mut().zip(vals).enumerate() {
                    let u = (noise_at(key, first + i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                    *o = f16_stochastic(v, u);
                }
            }
            _ => unreachable!("only 16-bit storages are narrowed to words"),
        },
    }
}

/// The 256-entry dynamic-tree map of `kind` (q8 signed, uq8 unsigned).
fn qmap(kind: Storage) -> &'static [f32; 256] {
    match kind {
        Storage::Q8 => &qmap::SIGNED,
        _ => &qmap::UNSIGNED,
    }
}

/// The largest `c` with `map[c] <= x` (0 where there is none, and for
/// NaN), by torchao's branch-free binary search.
#[inline]
fn q8_floor_search(map: &[f32; 256], x: f32) -> usize {
    let mut c = if x >= map[128] { 128usize } else { 0 };
    for step in [64, 32, 16, 8, 4, 2, 1] {
        if x >= map[c + step] {
            c += step;
        }
    }
    c
}

/// For each bf16 bucket of f32 bit patterns (the top 16 bits), the floor
/// code of the bucket's smallest value: the search starts there and steps
/// over the few map entries inside the bucket.
fn q8_floor_table(kind: Storage) -> &'static [u8; 65536] {
    static TABLES: [std::sync::OnceLock<Box<[u8; 65536]>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let at = usize::from(kind != Storage::Q8);
    TABLES[at].get_or_init(|| {
        let map = qmap(kind);
        let mut t = Box::new([0u8; 65536]);
        for (b, c) in t.iter_mut().enumerate() {
            let bits = (b as u32) << 16;
            // The bucket's smallest value: its first pattern when positive,
            // its last when negative.
            let low = if bits & 0x8000_0000 == 0 {
                f32::from_bits(bits)
            } else {
                f32::from_bits(bits | 0xFFFF)
            };
            *c = q8_floor_search(map, low) as u8;
        }
        t
    })
}

/// The floor code of `x` through `table`: the same as [`q8_floor_search`].
#[inline]
fn q8_floor(map: &[f32; 256], table: &[u8; 65536], x: f32) -> usize {
    if x.is_nan() {
        return 0;
    }
    let mut c = table[(x.to_bits() >> 16) as usize] as usize;
    while c < 255 && map[c + 1] <= x {
        c += 1;
    }
    c
}

/// The code of `x` (already divided by its block's scale) in `map`:
/// torchao's floor search and tie rule (see the module docs).
#[inline]
fn q8_code(map: &[f32; 256], table: &[u8; 65536], x: f32) -> u8 {
    let c = q8_floor(map, table, x);
    let up = (c + 1).min(255);
    let (lo, hi) = (map[c], map[up]);
    if x - lo >= (hi - lo) * 0.5 {
        up as u8
    } else {
        c as u8
    }
}

/// Quantises one block (at most [`Q8_BLOCK`] values): its codes into
/// `codes`, its scale returned.
pub fn q8_quantise(kind: Storage, vals: &[f32], codes: &mut [u8]) -> f32 {
    let (map, table) = (qmap(kind), q8_floor_table(kind));
    let absmax = vals.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = absmax.max(1e-12);
    for (c, &v) in codes.iter_mut().zip(vals) {
        *c = q8_code(map, table, v / scale);
    }
    scale
}

/// Quantises `vals`, from the start of a block, block by block: codes into
/// `codes`, one scale per block into `scales`.
pub(crate) fn q8_quantise_blocks(
    kind: Storage,
    vals: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let blocks = vals.chunks(Q8_BLOCK).zip(codes.chunks_mut(Q8_BLOCK));
    for ((v, c), s) in blocks.zip(scales) {
        *s = q8_quantise(kind, v, c);
    }
}

/// The values of `codes`, from the start of a block, one scale per block.
pub(crate) fn q8_dequantise_blocks(kind: Storage, codes: &[u8], scales: &[f32], out: &mut [f32]) {
    let blocks = out.chunks_mut(Q8_BLOCK).zip(codes.chunks(Q8_BLOCK));
    for ((o, c), &s) in blocks.zip(scales) {
        q8_dequantise(kind, c, s, o);
    }
}

/// The values of one block of codes.
pub fn q8_dequantise(kind: Storage, codes: &[u8], scale: f32, out: &mut [f32]) {
    let map = qmap(kind);
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = map[c as usize] * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_narrowing_is_the_half_crates_round_to_nearest_even() {
        // Every 2^-11th f32 bit pattern, and the specials.
        let mut vals: Vec<f32> = (0..=u32::MAX).step_by(2047).map(f32::from_bits).collect();
        vals.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
        ]);
        let mut out = vec![0u16; vals.len()];
        narrow_nearest(Storage::Bf16, &vals, &mut out);
        for (v, o) in vals.iter().zip(&out) {
            let want = bf16::from_f32(*v);
            if v.is_nan() {
                assert!(bf16::from_bits(*o).is_nan());
            } else {
                assert_eq!(*o, want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn bf16_nearest_and_widen_round_trip() {
        let vals = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            3.14159,
            -2.5e-20,
            1e30,
            f32::INFINITY,
        ];
        let mut w = [0u16; 8];
        narrow_nearest(Storage::Bf16, &vals, &mut w);
        let mut back = [0f32; 8];
        widen(Storage::Bf16, &w, &mut back);
        for (v, b) in vals.iter().zip(back) {
            assert_eq!(bf16::from_f32(*v).to_f32(), b);
        }
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1).
        assert_eq!(back[3], 1.0);
    }

    #[test]
    fn stochastic_rounding_picks_a_neighbour_and_keeps_exact_values() {
        let x = 1.0f32 + 0.3 / 128.0; // between 1 and 1 + 2^-7
        let (lo, hi) = (1.0f32, 1.0 + 1.0 / 128.0);
        for r in [0u16, 1, 20000, 40000, 65535] {
            let y = f32::from_bits((bf16_stochastic(x, r) as u32) << 16);
            assert!(y == lo || y == hi, "{y}");
            assert_eq!(bf16_stochastic(1.5, r), bf16::from_f32(1.5).to_bits());
            assert_eq!(bf16_stochastic(-1.5, r), bf16::from_f32(-1.5).to_bits());
        }
        let xs = [x, -x, 6.1e-5, -3.3e-7, 65400.0, 1.0e-8, -1.0e-8];
        for &x in &xs {
            // The f16 neighbours of x, by scanning every finite f16.
            let all = (0..0x7C00u16).flat_map(|b| [f16::from_bits(b), f16::from_bits(b | 0x8000)]);
            let lo = all
                .clone()
                .map(f16::to_f32)
                .filter(|&v| v <= x)
                .fold(f32::MIN, f32::max);
            let hi = all
                .map(f16::to_f32)
                .filter(|&v| v >= x)
                .fold(f32::MAX, f32::min);
            let mut seen = [false; 2];
            for u in [0.0, 0.001, 0.25, 0.5, 0.75, 0.999] {
                let y = f16::from_bits(f16_stochastic(x, u)).to_f32();
                assert!(y == lo || y == hi, "{x} -> {y}, not {lo} or {hi}");
                seen[(y == hi) as usize] = true;
            }
            assert!(seen[0] && seen[1], "{x}: both neighbours reachable");
        }
        assert_eq!(f16_stochastic(0.5, 0.3), f16::from_f32(0.5).to_bits());
        // Above the largest f16 (65504) but below the overflow threshold:
        // never infinity.
        assert_eq!(f16_stochastic(65519.0, 0.0), f16::MAX.to_bits());
    }

    #[test]
    fn q8_codes_round_to_the_nearest_map_entry() {
        for kind in [Storage::Q8, Storage::Uq8] {
            let map = qmap(kind);
            assert!(map.windows(2).all(|w| w[0] <= w[1]), "{kind}: map sorted");
            assert_eq!(map[255], 1.0);
            for i in 0..2000 {
                let x = if kind == Storage::Q8 {
                    -1.0 + i as f32 / 1000.0
                } else {
                    i as f32 / 2000.0
                };
                let c = q8_code(map, q8_floor_table(kind), x) as usize;
                let best = (0..256)
                    .min_by(|&a, &b| (map[a] - x).abs().total_cmp(&(map[b] - x).abs()))
                    .unwrap();
                assert!(
                    (map[c] - x).abs() <= (map[best] - x).abs(),
                    "{kind} {x}: {c} vs {best}"
                );
            }
        }
    }

    #[test]
    fn the_table_search_finds_torchaos_binary_search_floor() {
        for kind in [Storage::Q8, Storage::Uq8] {
            let (map, table) = (qmap(kind), q8_floor_table(kind));
            // Every 997th f32 bit pattern (both signs, all magnitudes) and
            // every map entry with its neighbours.
            let mut xs: Vec<f32> = (0..=u32::MAX).step_by(997).map(f32::from_bits).collect();
            for &m in map.iter() {
                let b = m.to_bits();
                xs.extend([m, f32::from_bits(b + 1), f32::from_bits(b.wrapping_sub(1))]);
            }
            for x in xs {
                assert_eq!(
                    q8_floor(map, table, x),
                    q8_floor_search(map, x),
                    "{kind} {x:e}"
                );
            }
        }
    }

    #[test]
    fn q8_block_keeps_its_absmax_and_requantises_to_the_same_codes() {
        let vals: Vec<f32> = (0..Q8_BLOCK)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let mut codes = vec![0u8; Q8_BLOCK];
        let scale = q8_quantise(Storage::Q8, &vals, &mut codes);
        assert_eq!(scale, 0.05);
        let mut back = vec![0f32; Q8_BLOCK];
        q8_dequantise(Storage::Q8, &codes, scale, &mut back);
        let worst = vals
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 0.05 * 0.04, "{worst}");
        let mut again = vec![0u8; Q8_BLOCK];
        assert_eq!(q8_quantise(Storage::Q8, &back, &mut again), scale);
        assert_eq!(codes, again);
    }

    #[test]
    fn noise_depends_on_every_coordinate() {
        let a = noise(1, 2, 3, 4);
        assert_ne!(a, noise(2, 2, 3, 4));
        assert_ne!(a, noise(1, 3, 3, 4));
        assert_ne!(a, noise(1, 2, 4, 4));
        assert_ne!(a, noise(1, 2, 3, 5));
        assert_eq!(a, noise(1, 2, 3, 4));
    }
}
