//! State buffers: 64-byte aligned, padded so that buffers of equal size do not
//! all start at the same offset modulo the page size (which makes them
//! contend for the same cache sets).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

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
