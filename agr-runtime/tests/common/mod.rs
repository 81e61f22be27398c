//! Helpers shared by the integration tests.
// Each test crate uses some of them.
#![allow(dead_code)]

/// `n` deterministic pseudo-random values in (-1, 1) (xorshift on `seed`).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One step of `opt` over `values` stored as `T` (narrowed with `narrow`,
/// stepped with `grad` narrowed the same way, widened back): what an
/// adapter's step over variables of `T` must give.
pub fn step_narrowed<K: agr_runtime::Kernel, T: agr_runtime::Element>(
    opt: &mut agr_runtime::Optimizer<K>,
    values: &mut Vec<f32>,
    grad: &[f32],
    shape: &[usize],
    narrow: fn(f32) -> T,
) {
    let mut p: Vec<T> = values.iter().map(|&x| narrow(x)).collect();
    let g: Vec<T> = grad.iter().map(|&x| narrow(x)).collect();
    opt.step_params_of(&mut [agr_runtime::ParamMut::new(&mut p, Some(&g), shape)])
        .unwrap();
    *values = p.into_iter().map(T::to_f32).collect();
}
