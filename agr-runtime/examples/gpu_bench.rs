//! The GPU benchmark (run by `scripts/gpu-check.sh run`, or
//! `cargo run --release -p agr-runtime --features cuda --example gpu_bench`):
//! each built-in's step against the device-to-device copy bandwidth measured
//! in the same run, on one tensor of 2^24 parameters and on the 150-tensor
//! GPT-like model. Prints `bench <optimizer> <workload> median_ms= floor_ms=
//! ratio=` lines, where the floor is the ideal step's bytes at copy
//! bandwidth (for Muon, plus its Newton–Schulz products as cuBLAS alone runs
//! them in the same run). Without a CUDA driver, NVRTC or a GPU it says so and exits
//! with status 2.

use std::sync::Arc;
use std::time::Instant;

use agr_runtime::cpu::Kernel;
use agr_runtime::cuda::{self, CudaParam, DType};
use agr_runtime::optim::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

fn workloads() -> Vec<(&'static str, Vec<Vec<usize>>)> {
    let mut gpt = vec![vec![3072, 768]];
    for _ in 0..2 {
        gpt.extend(std::iter::repeat_n(vec![768, 768], 4));
        gpt.push(vec![768, 3072]);
        gpt.push(vec![3072, 768]);
    }
    gpt.extend(std::iter::repeat_n(vec![3072], 68));
    gpt.extend(std::iter::repeat_n(vec![768], 69));
    vec![("one_2^24", vec![vec![1 << 24]]), ("gpt_150", gpt)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Milliseconds per device-to-device copy of `n` floats.
fn copy_ms(stream: &Arc<CudaStream>, n: usize) -> f64 {
    let src: CudaSlice<f32> = stream.alloc_zeros(n).unwrap();
    let mut dst: CudaSlice<f32> = stream.alloc_zeros(n).unwrap();
    let times = (0..25)
        .map(|_| {
            stream.synchronize().unwrap();
            let t = Instant::now();
            stream.memcpy_dtod(&src, &mut dst).unwrap();
            stream.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(times)
}

fn step_ms<K: Kernel>(stream: &Arc<CudaStream>, shapes: &[Vec<usize>]) -> f64
where
    K::Config: Default,
{
    let mut opt = agr_runtime::Optimizer::<K>::with_config(Default::default()).unwrap();
    opt.set_cuda_stream(stream.clone(), DType::F32).unwrap();
    let mut values: Vec<CudaSlice<f32>> = shapes
        .iter()
        .map(|s| {
            stream
                .clone_htod(&vec![0.5f32; s.iter().product()])
                .unwrap()
        })
        .collect();
    let grads: Vec<CudaSlice<f32>> = shapes
        .iter()
        .map(|s| {
            stream
                .clone_htod(&vec![1e-3f32; s.iter().product()])
                .unwrap()
        })
        .collect();
    let times = (0..25)
        .map(|_| {
            let mut params: Vec<CudaParam<'_>> = values
                .iter_mut()
                .zip(&grads)
                .zip(shapes)
                .map(|((v, g), s)| CudaParam {
                    value: v,
                    grad: Some(g),
                    shape: s,
                })
                .collect();
            stream.synchronize().unwrap();
            let t = Instant::now();
            opt.step_cuda(&mut params).unwrap();
            stream.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect::<Vec<f64>>();
    median(times[3..].to_vec())
}

/// Milliseconds cuBLAS takes for Muon's Newton–Schulz products on these
/// tensors, `ns_steps` iterations: per iteration, on each tensor's short
/// side `m` and long side `n`, `X Xᵀ` (m×n by n×m), `A·A` (m×m) and `B·X`
/// (m×m by m×n), each shape's products of a step as one strided batched
/// SGEMM (as the engine issues a batch of same-shape tensors).
fn products_ms(stream: &Arc<CudaStream>, shapes: &[Vec<usize>], ns_steps: usize) -> f64 {
    use cudarc::cublas::{
        sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig,
    };
    let mut count: Vec<((usize, usize, usize), usize)> = vec![];
    for s in shapes {
        let n_el: usize = s.iter().product();
        let (r, c) = if s.len() >= 2 {
            (n_el / s[s.len() - 1], s[s.len() - 1])
        } else {
            (1, n_el)
        };
        let (m, n) = (r.min(c), r.max(c));
        for shape in [(m, n, m), (m, m, m), (m, m, n)] {
            match count.iter_mut().find(|(x, _)| *x == shape) {
                Some((_, k)) => *k += 1,
                None => count.push((shape, 1)),
            }
        }
    }
    let blas = CudaBlas::new(stream.clone()).unwrap();
    let mut total = 0.0;
    for ((m, k, n), batch) in count {
        let a: CudaSlice<f32> = stream.alloc_zeros(batch * m * k).unwrap();
        let b: CudaSlice<f32> = stream.alloc_zeros(batch * k * n).unwrap();
        let mut c: CudaSlice<f32> = stream.alloc_zeros(batch * m * n).unwrap();
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: Op::CUBLAS_OP_N,
                transb: Op::CUBLAS_OP_N,
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha: 1.0f32,
                lda: n as i32,
                ldb: k as i32,
                beta: 0.0f32,
                ldc: n as i32,
            },
            batch_size: batch as i32,
            stride_a: (k * n) as i64,
            stride_b: (m * k) as i64,
            stride_c: (m * n) as i64,
        };
        let times = (0..15)
            .map(|_| {
                stream.synchronize().unwrap();
                let t = Instant::now();
                for _ in 0..ns_steps {
                    // SAFETY: the buffers hold batch matrices of the shapes the
                    // configuration describes.
                    unsafe { blas.gemm_strided_batched(cfg, &b, &a, &mut c) }.unwrap();
                }
                stream.synchronize().unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        total += median(times);
    }
    total
}

fn main() {
    if !cuda::driver_available() || !cuda::nvrtc_available() {
        eprintln!("gpu_bench: no CUDA driver or NVRTC on this machine; nothing measured");
        std::process::exit(2);
    }
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu_bench: no GPU ({e}); nothing measured");
            std::process::exit(2);
        }
    };
    let stream = ctx.default_stream();
    for (name, shapes) in workloads() {
        let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let copy = copy_ms(&stream, n);
        let gbs = 8.0 * n as f64 / (copy * 1e-3) / 1e9;
        println!("copy {name}: {copy:.3} ms for {n} floats ({gbs:.0} GB/s device to device)");
        // Ideal traffic in f32 arrays per parameter: reads + writes.
        let cases: [(&str, usize, f64); 5] = [
            ("adamw", 7, step_ms::<AdamWKernel>(&stream, &shapes)),
            ("adamw_agr", 8, step_ms::<AdamWAgrKernel>(&stream, &shapes)),
            ("adan_agr", 12, step_ms::<AdanAgrKernel>(&stream, &shapes)),
            // A per-tensor state; reduced states (a tensor per block).
            ("nadam", 7, step_ms::<NAdamKernel>(&stream, &shapes)),
            ("adafactor", 6, step_ms::<AdafactorKernel>(&stream, &shapes)),
        ];
        for (opt, arrays, ms) in cases {
            let floor = copy * arrays as f64 / 2.0;
            println!(
                "bench {opt} {name} median_ms={ms:.3} floor_ms={floor:.3} ratio={:.3}",
                ms / floor
            );
        }
        // Muon (on every tensor: its matrices and, as 1-row matrices, its
        // vectors): its bytes at copy bandwidth plus its Newton–Schulz
        // products as cuBLAS runs them alone, timed in this run.
        let ms = step_ms::<MuonKernel>(&stream, &shapes);
        let bytes = copy * 5.0 / 2.0;
        let gemm = products_ms(&stream, &shapes, 5);
        let floor = bytes + gemm;
        println!(
            "bench muon {name} median_ms={ms:.3} floor_ms={floor:.3} ratio={:.3} gemm_floor_ms={gemm:.3}",
            ms / floor
        );
    }
    println!(
        "launches per step: adamw {}, adamw_agr {}, adan_agr {}",
        agr_runtime::Optimizer::<AdamWKernel>::LAUNCHES_PER_STEP,
        agr_runtime::Optimizer::<AdamWAgrKernel>::LAUNCHES_PER_STEP,
        agr_runtime::Optimizer::<AdanAgrKernel>::LAUNCHES_PER_STEP
    );
}
