//! Once the set of parameters is stable, a CPU step allocates nothing, on
//! the single-threaded path and on the parallel one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use agr_runtime::optim::{AdamWAgr, AdamWAgrConfig, AdanAgr, AdanAgrConfig};
use agr_runtime::ParamMut;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_steps_do_not_allocate() {
    for n in [1000usize, 300_000] {
        let mut w0 = vec![0.5f32; n];
        let mut w1 = vec![-0.5f32; 64];
        let g0: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let g1 = vec![0.25f32; 64];
        let shapes: [&[usize]; 2] = [&[n], &[8, 8]];
        let mut a = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
        let mut b = AdanAgr::with_config(AdanAgrConfig::default().with_max_grad_norm(1.0)).unwrap();
        let mut counts = vec![];
        for step in 0..4 {
            let before = ALLOCS.load(Ordering::SeqCst);
            a.step(&mut [
                ParamMut::new(&mut w0, Some(&g0), shapes[0]),
                ParamMut::new(&mut w1, Some(&g1), shapes[1]),
            ])
            .unwrap();
            b.step(&mut [
                ParamMut::new(&mut w0, Some(&g0), shapes[0]),
                ParamMut::new(&mut w1, Some(&g1), shapes[1]),
            ])
            .unwrap();
            if step >= 2 {
                counts.push(ALLOCS.load(Ordering::SeqCst) - before);
            }
        }
        assert_eq!(counts, vec![0, 0], "allocations per step with {n} elements");
    }
}
