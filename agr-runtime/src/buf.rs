//! State buffers: 64-byte aligned, padded so that buffers of equal size do not
//! all start at the same offset modulo the page size (which makes them
//! contend for the same cache sets).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

use crate::precision::{self, Storage, Q8_BLOCK};

pub(crate) struct AlignedBuf {
    ptr: NonNull<f32>,
    len: usize,
    layout: Option<Layout>,
}

// The buffer owns its memory exclusively, like a Vec<f32>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

const ALIGN: usize = 64;

impl AlignedBuf {
    /// A buffer of `len` copies of `fill`. `stagger` (0, 1, 2, ...) shifts the
    /// start by that many cache lines within the allocation.
    pub(crate) fn filled(len: usize, fill: f32, stagger: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                layout: None,
            };
        }
        let offset = (stagger % 16) * ALIGN / 4; // in f32s
        let size = (len + offset) * 4;
        let layout = Layout::from_size_align(size, ALIGN).expect("buffer size overflows");
        // SAFETY: size > 0.
        let raw = unsafe { alloc(layout) } as *mut f32;
        let Some(base) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: offset + len f32s lie inside the allocation.
        let ptr = unsafe { NonNull::new_unchecked(base.as_ptr().add(offset)) };
        let mut b = AlignedBuf {
            ptr,
            len,
            layout: Some(layout),
        };
        b.as_mut_slice().iter_mut().for_each(|x| *x = fill);
        b
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        // SAFETY: ptr is valid for len initialised f32s (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            let offset = (layout.size() / 4) - self.len;
            // SAFETY: allocated in `filled` with this layout at ptr - offset.
            unsafe { dealloc(self.ptr.as_ptr().sub(offset) as *mut u8, layout) }
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let stagger = self
            .layout
            .map(|l| (l.size() / 4 - self.len) * 4 / ALIGN)
            .unwrap_or(0);
        let mut b = AlignedBuf::filled(self.len, 0.0, stagger);
        b.as_mut_slice().copy_from_slice(self.as_slice());
        b
    }
}

/// A state buffer in its storage (see [`crate::precision`]): f32 in place,
/// or narrowed (bf16, f16, 8-bit codes with a scale per block), which the
/// engine widens into f32 scratch around each kernel call.
#[derive(Clone)]
pub(crate) enum StateBuf {
    F32(AlignedBuf),
    /// bf16 or f16 words.
    Half {
        kind: Storage,
        words: Vec<u16>,
    },
    /// q8 or uq8: a code per value, an f32 scale per block of `Q8_BLOCK`.
    Q8 {
        kind: Storage,
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
}

/// A narrowed state buffer's memory, for the engine's work items (each
/// touches a disjoint range of values and, for q8, of whole blocks).
#[derive(Clone, Copy)]
pub(crate) struct RawState {
    pub(crate) kind: Storage,
    pub(crate) data: *mut u8,
    pub(crate) scales: *mut f32,
}

impl RawState {
    pub(crate) const NONE: RawState = RawState {
        kind: Storage::F32,
        data: std::ptr::null_mut(),
        scales: std::ptr::null_mut(),
    };

    /// Widens values `[start, start + out.len())` into `out`.
    ///
    /// # Safety
    /// The range lies in the buffer and, for q8, `start` is a multiple of
    /// `Q8_BLOCK`; no other thread writes it meanwhile.
    pub(crate) unsafe fn load(self, start: usize, out: &mut [f32]) {
        match self.kind {
            Storage::Bf16 | Storage::F16 => {
                let w = std::slice::from_raw_parts((self.data as *const u16).add(start), out.len());
                precision::widen(self.kind, w, out);
            }
            Storage::Q8 | Storage::Uq8 => {
                let codes = std::slice::from_raw_parts(self.data.add(start), out.len());
                let scales = std::slice::from_raw_parts(
                    self.scales.add(start / Q8_BLOCK),
                    out.len().div_ceil(Q8_BLOCK),
                );
                precision::q8_dequantise_blocks(self.kind, codes, scales, out);
            }
            Storage::F32 => unreachable!("f32 state is read in place"),
        }
    }

    /// Narrows `vals` into values `[start, start + vals.len())`
    /// (round-to-nearest-even; q8 blocks re-scaled).
    ///
    /// # Safety
    /// As [`RawState::load`], and the range ends at the end of a q8 block
    /// or of the buffer.
    pub(crate) unsafe fn store(self, start: usize, vals: &[f32]) {
        match self.kind {
            Storage::Bf16 | Storage::F16 => {
                let w =
                    std::slice::from_raw_parts_mut((self.data as *mut u16).add(start), vals.len());
                precision::narrow_nearest(self.kind, vals, w);
            }
            Storage::Q8 | Storage::Uq8 => {
                let codes = std::slice::from_raw_parts_mut(self.data.add(start), vals.len());
                let scales = std::slice::from_raw_parts_mut(
                    self.scales.add(start / Q8_BLOCK),
                    vals.len().div_ceil(Q8_BLOCK),
                );
                precision::q8_quantise_blocks(self.kind, vals, codes, scales);
            }
            Storage::F32 => unreachable!("f32 state is written in place"),
        }
    }
}

impl StateBuf {
    /// `len` copies of `fill` in `storage` (`stagger`: see [`AlignedBuf::filled`]).
    pub(crate) fn filled(storage: Storage, len: usize, fill: f32, stagger: usize) -> StateBuf {
        match storage {
            Storage::F32 => StateBuf::F32(AlignedBuf::filled(len, fill, stagger)),
            _ => StateBuf::from_f32(storage, &vec![fill; len], stagger),
        }
    }

    /// `vals` stored in `storage`.
    pub(crate) fn from_f32(storage: Storage, vals: &[f32], stagger: usize) -> StateBuf {
        match storage {
            Storage::F32 => {
                let mut b = AlignedBuf::filled(vals.len(), 0.0, stagger);
                b.as_mut_slice().copy_from_slice(vals);
                StateBuf::F32(b)
            }
            Storage::Bf16 | Storage::F16 => {
                let mut words = vec![0u16; vals.len()];
                precision::narrow_nearest(storage, vals, &mut words);
                StateBuf::Half {
                    kind: storage,
                    words,
                }
            }
            Storage::Q8 | Storage::Uq8 => {
                let mut codes = vec![0u8; vals.len()];
                let mut scales = vec![0.0; vals.len().div_ceil(Q8_BLOCK)];
                precision::q8_quantise_blocks(storage, vals, &mut codes, &mut scales);
                StateBuf::Q8 {
                    kind: storage,
                    codes,
                    scales,
                }
            }
        }
    }

    pub(crate) fn storage(&self) -> Storage {
        match self {
            StateBuf::F32(_) => Storage::F32,
            StateBuf::Half { kind, .. } | StateBuf::Q8 { kind, .. } => *kind,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            StateBuf::F32(b) => b.as_slice().len(),
            StateBuf::Half { words, .. } => words.len(),
            StateBuf::Q8 { codes, .. } => codes.len(),
        }
    }

    /// Bytes of memory the values take.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            StateBuf::F32(b) => b.as_slice().len() * 4,
            StateBuf::Half { words, .. } => words.len() * 2,
            StateBuf::Q8 { codes, scales, .. } => codes.len() + scales.len() * 4,
        }
    }

    /// The values, widened to f32 where narrowed.
    pub(crate) fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        use std::borrow::Cow;
        match self {
            StateBuf::F32(b) => Cow::Borrowed(b.as_slice()),
            StateBuf::Half { kind, words } => {
                let mut out = vec![0.0; words.len()];
                precision::widen(*kind, words, &mut out);
                Cow::Owned(out)
            }
            StateBuf::Q8 {
                kind,
                codes,
                scales,
            } => {
                let mut out = vec![0.0; codes.len()];
                precision::q8_dequantise_blocks(*kind, codes, scales, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// An f32 buffer's values. Reduced and per-tensor states and
    /// matrix-block buffers are always f32 (only per-element states are
    /// narrowed).
    pub(crate) fn f32s(&self) -> &[f32] {
        match self {
            StateBuf::F32(b) => b.as_slice(),
            _ => unreachable!("only per-element states are narrowed"),
        }
    }

    pub(crate) fn f32s_mut(&mut self) -> &mut [f32] {
        match self {
            StateBuf::F32(b) => b.as_mut_slice(),
            _ => unreachable!("only per-element states are narrowed"),
        }
    }

    /// An f32 buffer's pointer (null for a narrowed one, see [`StateBuf::raw`]).
    pub(crate) fn f32_ptr(&mut self) -> *mut f32 {
        match self {
            StateBuf::F32(b) => b.as_mut_ptr(),
            _ => std::ptr::null_mut(),
        }
    }

    /// A narrowed buffer's memory ([`RawState::NONE`] for f32).
    pub(crate) fn raw(&mut self) -> RawState {
        match self {
            StateBuf::F32(_) => RawState::NONE,
            StateBuf::Half { kind, words } => RawState {
                kind: *kind,
                data: words.as_mut_ptr() as *mut u8,
                scales: std::ptr::null_mut(),
            },
            StateBuf::Q8 {
                kind,
                codes,
                scales,
            } => RawState {
                kind: *kind,
                data: codes.as_mut_ptr(),
                scales: scales.as_mut_ptr(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_filled_and_staggered() {
        let a = AlignedBuf::filled(1000, 1.5, 0);
        let b = AlignedBuf::filled(1000, 1.5, 3);
        assert_eq!(a.as_slice().len(), 1000);
        assert!(a.as_slice().iter().all(|&x| x == 1.5));
        assert_eq!(a.as_slice().as_ptr() as usize % 64, 0);
        assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
        let c = b.clone();
        assert_eq!(c.as_slice(), b.as_slice());
        assert!(AlignedBuf::filled(0, 1.0, 0).as_slice().is_empty());
    }
}
