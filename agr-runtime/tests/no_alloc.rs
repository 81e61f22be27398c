//! Once the set of parameters is stable, a CPU step allocates nothing, on
//! the single-threaded path and on the parallel one; a step through the
//! candle adapter allocates a few bytes per variable, whatever its size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use agr_runtime::optim::{AdamWAgr, AdamWAgrConfig, AdanAgr, AdanAgrConfig};
use agr_runtime::ParamMut;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(layout.size(), Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// One test function: the counters are global, and while a second test runs
// (or the harness reports one that just finished) its allocations would be
// counted too.
#[test]
fn steady_state_steps_allocate_nothing_and_candle_steps_per_variable() {
    steady_state_steps_do_not_allocate();
    #[cfg(feature = "candle")]
    candle_steps_allocate_per_variable_not_per_element();
}

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
            a.step_params(&mut [
                ParamMut::new(&mut w0, Some(&g0), shapes[0]),
                ParamMut::new(&mut w1, Some(&g1), shapes[1]),
            ])
            .unwrap();
            b.step_params(&mut [
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

/// Bytes allocated by steady-state candle steps over two variables of `n`
/// and 64 elements.
#[cfg(feature = "candle")]
fn candle_step_bytes(n: usize) -> usize {
    use candle_core::{backprop::GradStore, Device, Tensor, Var};
    use candle_nn::Optimizer as _;
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::ones(n, candle_core::DType::F32, &dev).unwrap()).unwrap();
    let b =
        Var::from_tensor(&Tensor::ones((8, 8), candle_core::DType::F32, &dev).unwrap()).unwrap();
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), Tensor::full(0.5f32, n, &dev).unwrap());
    grads.insert(b.as_tensor(), Tensor::full(-0.25f32, (8, 8), &dev).unwrap());
    let mut opt = AdamWAgr::new(vec![a, b], AdamWAgrConfig::default()).unwrap();
    let mut bytes = vec![];
    for _ in 0..4 {
        let before = BYTES.load(Ordering::SeqCst);
        candle_nn::Optimizer::step(&mut opt, &grads).unwrap();
        bytes.push(BYTES.load(Ordering::SeqCst) - before);
    }
    // The first step creates the state (n floats per moment).
    assert!(bytes[0] >= 2 * 4 * n, "{bytes:?}");
    assert_eq!(bytes[2], bytes[3], "{bytes:?}");
    bytes[3]
}

#[cfg(feature = "candle")]
fn candle_steps_allocate_per_variable_not_per_element() {
    let small = candle_step_bytes(1000);
    let large = candle_step_bytes(1_000_000);
    println!("candle adapter: {small} bytes allocated per step with 1,000 elements, {large} with 1,000,000");
    assert_eq!(small, large);
    assert!(large < 2048, "{large} bytes per step");
}
