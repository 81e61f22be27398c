//! The GPU suite: generated kernels launched on a real GPU, checked against
//! the golden files and the CPU back end, for determinism, and for the launch
//! count of a 150-tensor model. Every test is `#[ignore]`d, so a run without
//! a GPU lists them as ignored rather than passed; `scripts/gpu-check.sh`
//! runs them on a GPU machine with `--include-ignored`, where a missing
//! driver, NVRTC or GPU fails them.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::Arc;

use agr_runtime::cpu::Kernel;
use agr_runtime::cuda::{self, CudaParam, DType, RawCudaParam};
use agr_runtime::optim::*;
use agr_runtime::{golden, HyperConfig, HyperValue, NonFinite, Optimizer, ParamMut};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};

mod common;
use common::data;

/// The GPU's default stream; panics saying what is missing.
fn gpu() -> Arc<CudaStream> {
    assert!(
        cuda::driver_available(),
        "no CUDA driver on this machine: the GPU tests need one"
    );
    assert!(
        cuda::nvrtc_available(),
        "NVRTC not found (set LD_LIBRARY_PATH or AGR_NVRTC)"
    );
    match CudaContext::new(0) {
        Ok(ctx) => ctx.default_stream(),
        Err(e) => panic!("no GPU: {e}"),
    }
}

/// The one engine, moved onto the GPU's stream.
fn on_gpu<K: Kernel>(stream: &Arc<CudaStream>, config: K::Config, dtype: DType) -> Optimizer<K> {
    let mut opt = Optimizer::<K>::with_config(config).unwrap();
    opt.set_cuda_stream(stream.clone(), dtype).unwrap();
    opt
}

fn golden_dir() -> PathBuf {
    std::env::var_os("AGR_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"))
}

fn set_hypers<C: HyperConfig>(c: &mut C, g: &golden::Golden) {
    for (name, v) in &g.hyper {
        let value = match v {
            serde_json::Value::Bool(b) => HyperValue::Bool(*b),
            v => HyperValue::Float(v.as_f64().unwrap()),
        };
        c.set(name, value).unwrap();
    }
}

/// Replays a golden file on the GPU; returns the worst |gpu - reference|.
fn replay_gpu<K: Kernel>(stream: &Arc<CudaStream>, g: &golden::Golden) -> f64
where
    K::Config: Default,
{
    let mut config = K::Config::default();
    set_hypers(&mut config, g);
    let mut opt = on_gpu::<K>(stream, config, DType::F32);
    let mut values: Vec<_> = g
        .params
        .iter()
        .map(|p| stream.clone_htod(&p.init).unwrap())
        .collect();
    let mut worst = 0.0f64;
    for step in &g.steps {
        let grads: Vec<_> = step
            .grads
            .iter()
            .map(|x| stream.clone_htod(x).unwrap())
            .collect();
        let mut params: Vec<CudaParam<'_>> = values
            .iter_mut()
            .zip(&grads)
            .zip(&g.params)
            .map(|((v, gr), p)| CudaParam {
                value: v,
                grad: Some(gr),
                shape: &p.shape,
            })
            .collect();
        opt.step_cuda(&mut params).unwrap();
        for (v, reference) in values.iter().zip(&step.params) {
            let host = stream.clone_dtoh(v).unwrap();
            for (x, r) in host.iter().zip(reference) {
                let (x, r) = (f64::from(*x), f64::from(*r));
                assert!(
                    (x - r).abs() <= g.tolerance.atol + g.tolerance.rtol * r.abs(),
                    "{}: GPU {x} vs reference {r}",
                    g.optimizer
                );
                worst = worst.max((x - r).abs());
            }
        }
    }
    worst
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn golden_files_replay_on_the_gpu() {
    let stream = gpu();
    let mut files: Vec<PathBuf> = ["", "more", "frontier"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(golden_dir().join(sub)).ok())
        .flat_map(|d| d.map(|e| e.unwrap().path()))
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let g = golden::load(&f).unwrap();
        let worst = match g.optimizer.as_str() {
            "adamw" => replay_gpu::<AdamWKernel>(&stream, &g),
            "adamw_agr" => replay_gpu::<AdamWAgrKernel>(&stream, &g),
            "adamw_agr_m" => replay_gpu::<AdamWAgrMKernel>(&stream, &g),
            "adan" => replay_gpu::<AdanKernel>(&stream, &g),
            "adan_agr" => replay_gpu::<AdanAgrKernel>(&stream, &g),
            "adam" => replay_gpu::<AdamKernel>(&stream, &g),
            "rmsprop" => replay_gpu::<RmsPropKernel>(&stream, &g),
            "sgdm" => replay_gpu::<SgdmKernel>(&stream, &g),
            "sgdm_agr" => replay_gpu::<SgdmAgrKernel>(&stream, &g),
            "lion" => replay_gpu::<LionKernel>(&stream, &g),
            "lion_agr" => replay_gpu::<LionAgrKernel>(&stream, &g),
            "acprop" => replay_gpu::<AcPropKernel>(&stream, &g),
            "lamb" => replay_gpu::<LambKernel>(&stream, &g),
            "adamw_gc" => replay_gpu::<AdamWGcKernel>(&stream, &g),
            "adopt" => replay_gpu::<AdoptKernel>(&stream, &g),
            "cadamw_agr" => replay_gpu::<CAdamWAgrKernel>(&stream, &g),
            "muon" => replay_gpu::<MuonKernel>(&stream, &g),
            "muon_agr" => replay_gpu::<MuonAgrKernel>(&stream, &g),
            "adafactor" => replay_gpu::<AdafactorKernel>(&stream, &g),
            "nadam" => replay_gpu::<NAdamKernel>(&stream, &g),
            other => {
                println!("{other}: not a built-in of this suite");
                continue;
            }
        };
        println!(
            "gpu replay {:<28} worst_abs={worst:.3e} PASS",
            f.file_name().unwrap().to_string_lossy()
        );
    }
}

/// The 150-tensor GPT-like model of the benchmarks.
fn gpt_shapes() -> Vec<Vec<usize>> {
    let mut v = vec![vec![3072, 768]];
    for _ in 0..2 {
        for _ in 0..4 {
            v.push(vec![768, 768]);
        }
        v.push(vec![768, 3072]);
        v.push(vec![3072, 768]);
    }
    v.extend(std::iter::repeat_n(vec![3072], 68));
    v.extend(std::iter::repeat_n(vec![768], 69));
    v
}

/// Three steps on the GPU; returns the parameters.
fn run_gpu<K: Kernel>(
    stream: &Arc<CudaStream>,
    config: K::Config,
    shapes: &[Vec<usize>],
) -> Vec<Vec<f32>> {
    let mut opt = on_gpu::<K>(stream, config, DType::F32);
    let mut values: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            stream
                .clone_htod(&data(s.iter().product(), i as u64))
                .unwrap()
        })
        .collect();
    for t in 0..3u64 {
        let grads: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                stream
                    .clone_htod(&data(s.iter().product(), 1000 * (t + 1) + i as u64))
                    .unwrap()
            })
            .collect();
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
        opt.step_cuda(&mut params).unwrap();
    }
    values
        .iter()
        .map(|v| stream.clone_dtoh(v).unwrap())
        .collect()
}

fn run_cpu<K: Kernel>(config: K::Config, shapes: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut opt = Optimizer::<K>::with_config(config).unwrap();
    let mut values: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), i as u64))
        .collect();
    for t in 0..3u64 {
        let grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.iter().product(), 1000 * (t + 1) + i as u64))
            .collect();
        let mut params: Vec<ParamMut<'_>> = values
            .iter_mut()
            .zip(&grads)
            .zip(shapes)
            .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
            .collect();
        opt.step_params(&mut params).unwrap();
    }
    values
}

fn compare(name: &str, gpu: &[Vec<f32>], cpu: &[Vec<f32>]) {
    let mut worst = 0.0f32;
    for (a, b) in gpu.iter().zip(cpu) {
        for (x, y) in a.iter().zip(b) {
            let err = (x - y).abs();
            assert!(err <= 1e-6 + 1e-5 * y.abs(), "{name}: GPU {x} vs CPU {y}");
            worst = worst.max(err);
        }
    }
    println!("{name}: 150 tensors, GPU vs CPU worst |diff| = {worst:.3e}");
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn a_150_tensor_model_matches_the_cpu_is_deterministic_and_takes_one_launch_per_pass() {
    let stream = gpu();
    let shapes = gpt_shapes();
    assert_eq!(shapes.len(), 150);
    let adan = AdanAgrConfig::default()
        .with_lr(1e-2)
        .with_max_grad_norm(1.0);
    let a = run_gpu::<AdanAgrKernel>(&stream, adan.clone(), &shapes);
    let b = run_gpu::<AdanAgrKernel>(&stream, adan.clone(), &shapes);
    let same = a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    assert!(same, "two GPU runs differ");
    println!("adan_agr: two GPU runs bitwise identical");
    compare("adan_agr", &a, &run_cpu::<AdanAgrKernel>(adan, &shapes));
    let adamw = AdamWAgrConfig::default().with_lr(1e-2);
    compare(
        "adamw_agr",
        &run_gpu::<AdamWAgrKernel>(&stream, adamw.clone(), &shapes),
        &run_cpu::<AdamWAgrKernel>(adamw, &shapes),
    );
    println!(
        "launches per step for 150 tensors: adamw {}, adamw_agr {}, adan_agr {}",
        Optimizer::<AdamWKernel>::LAUNCHES_PER_STEP,
        Optimizer::<AdamWAgrKernel>::LAUNCHES_PER_STEP,
        Optimizer::<AdanAgrKernel>::LAUNCHES_PER_STEP
    );
    assert_eq!(Optimizer::<AdamWAgrKernel>::LAUNCHES_PER_STEP, 2);
}

fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(x: u16) -> f32 {
    f32::from_bits(u32::from(x) << 16)
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn bf16_parameters_step_with_f32_arithmetic() {
    let stream = gpu();
    let n = 10_000;
    let init: Vec<u16> = data(n, 1).into_iter().map(to_bf16).collect();
    let grad: Vec<u16> = data(n, 2).into_iter().map(to_bf16).collect();
    let mut d_p = stream.clone_htod(&init).unwrap();
    let d_g = stream.clone_htod(&grad).unwrap();
    let config = AdamWAgrConfig::default().with_lr(1e-2);
    let mut opt = on_gpu::<AdamWAgrKernel>(&stream, config.clone(), DType::BF16);
    {
        let (p, _sp) = d_p.device_ptr_mut(&stream);
        let (g, _sg) = d_g.device_ptr(&stream);
        let shape = [n];
        // SAFETY: both buffers hold n bf16 values on this stream.
        unsafe {
            opt.step_raw(&[RawCudaParam {
                value: p,
                grad: Some(g),
                shape: &shape,
            }])
            .unwrap()
        };
    }
    let out: Vec<f32> = stream
        .clone_dtoh(&d_p)
        .unwrap()
        .into_iter()
        .map(from_bf16)
        .collect();
    let mut cpu: Vec<f32> = init.iter().map(|&x| from_bf16(x)).collect();
    let g32: Vec<f32> = grad.iter().map(|&x| from_bf16(x)).collect();
    AdamWAgr::with_config(config)
        .unwrap()
        .step_params(&mut [ParamMut::new(&mut cpu, Some(&g32), &[n])])
        .unwrap();
    for (x, y) in out.iter().zip(&cpu) {
        assert!(
            (x - y).abs() <= 1e-2 * y.abs().max(1e-2),
            "bf16 GPU {x} vs CPU {y}"
        );
    }
    println!("bf16: {n} values within bf16 rounding of the f32 CPU step");
}

/// bf16 device parameters with an f32 master copy in GPU memory, bf16
/// moments and stochastic rounding, stepped through `step_raw` five times:
/// within two bf16 units of the CPU engine in the same precision (the GPU
/// contracts multiply-adds, so a rounding can flip); the state comes back
/// through a checkpoint in its storage.
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn narrowed_states_master_copies_and_stochastic_rounding_on_the_gpu() {
    use agr_runtime::{Precision, Storage};
    let stream = gpu();
    let n = 20_000;
    let precision = Precision::f32()
        .with_master(true)
        .stochastic(11)
        .state("m", Storage::Bf16)
        .state("v", Storage::Bf16);
    let config = AdamWConfig::default().with_lr(1e-2);
    let init: Vec<u16> = data(n, 1).into_iter().map(to_bf16).collect();
    let mut d_p = stream.clone_htod(&init).unwrap();
    let mut opt = on_gpu::<AdamWKernel>(&stream, config.clone(), DType::BF16);
    opt.set_precision(precision.clone()).unwrap();
    let mut cpu = AdamW::with_config(config.clone()).unwrap();
    cpu.set_precision(precision.clone()).unwrap();
    let mut host: Vec<half::bf16> = init.iter().map(|&x| half::bf16::from_bits(x)).collect();
    for t in 0..5u64 {
        let grad: Vec<u16> = data(n, 10 + t).into_iter().map(to_bf16).collect();
        let d_g = stream.clone_htod(&grad).unwrap();
        {
            let (p, _sp) = d_p.device_ptr_mut(&stream);
            let (g, _sg) = d_g.device_ptr(&stream);
            let shape = [n];
            // SAFETY: both buffers hold n bf16 values on this stream.
            unsafe {
                opt.step_raw(&[RawCudaParam {
                    value: p,
                    grad: Some(g),
                    shape: &shape,
                }])
                .unwrap()
            };
        }
        let g16: Vec<half::bf16> = grad.iter().map(|&x| half::bf16::from_bits(x)).collect();
        cpu.step_params_of(&mut [ParamMut::new(&mut host, Some(&g16), &[n])])
            .unwrap();
    }
    let out: Vec<f32> = stream
        .clone_dtoh(&d_p)
        .unwrap()
        .into_iter()
        .map(from_bf16)
        .collect();
    let unit = |y: f32| 2.0 * (2f32.powi(-8) * y.abs() + 1e-6);
    for (x, y) in out.iter().zip(&host) {
        let y = y.to_f32();
        assert!((x - y).abs() <= unit(y), "bf16 GPU {x} vs CPU {y}");
    }
    // The master copy and the bf16 moments, saved from the GPU.
    let mut back = AdamW::with_config(config).unwrap();
    back.set_precision(precision).unwrap();
    back.load_checkpoint(&opt.save_checkpoint()).unwrap();
    for name in ["m", "v"] {
        let (a, c) = (
            back.state_to_host(0, name).unwrap(),
            cpu.state_to_host(0, name).unwrap(),
        );
        for (x, y) in a.iter().zip(&c) {
            assert!(
                (x - y).abs() <= unit(*y),
                "state {name}: GPU {x} vs CPU {y}"
            );
        }
    }
    println!("bf16 + master + bf16 moments + stochastic rounding: {n} values within two bf16 units of the CPU");
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn a_non_finite_first_step_leaves_the_gpu_optimizer_as_new() {
    let stream = gpu();
    for policy in [NonFinite::Skip, NonFinite::Error] {
        let mut opt = on_gpu::<AdamWAgrKernel>(&stream, Default::default(), DType::F32);
        opt.set_non_finite_policy(policy);
        let init = data(1000, 3);
        let mut bad = data(1000, 4);
        bad[17] = f32::NAN;
        let mut values: Vec<_> = (0..2).map(|_| stream.clone_htod(&init).unwrap()).collect();
        let grads: Vec<_> = [&bad, &init]
            .iter()
            .map(|g| stream.clone_htod(g.as_slice()).unwrap())
            .collect();
        let shape = [1000];
        let mut params: Vec<CudaParam<'_>> = values
            .iter_mut()
            .zip(&grads)
            .map(|(v, g)| CudaParam {
                value: v,
                grad: Some(g),
                shape: &shape,
            })
            .collect();
        let r = opt.step_cuda(&mut params);
        match policy {
            // Decided on the device: the report cannot know, the counts can.
            NonFinite::Skip => {
                assert_eq!(r.unwrap().skipped_non_finite, None);
                assert_eq!(opt.non_finite_skips(), 1);
            }
            _ => assert!(r.is_err(), "{policy:?}"),
        }
        assert_eq!(opt.steps(), 0);
        assert_eq!(opt.state_to_host(0, "m"), None, "{policy:?}");
        drop(params);
        for v in &values {
            assert_eq!(stream.clone_dtoh(v).unwrap(), init, "{policy:?}");
        }
        if policy == NonFinite::Error {
            // The parameter count is not fixed: one parameter is the first step.
            let mut one = [CudaParam {
                value: &mut values[1],
                grad: Some(&grads[1]),
                shape: &shape,
            }];
            let r = opt.step_cuda(&mut one).unwrap();
            assert_eq!((r.step, r.updated), (1, 1), "{policy:?}");
        }
    }
}

/// One rank of NCCL on the GPU: its collectives move values exactly, and
/// a sharded step over it is bitwise the unsharded step (one rank cannot
/// split anything; several ranks need several GPUs, which the GPU machine
/// does not have: the packing and folding are the MPI path's, tested with
/// 1 to 4 ranks in tests/mpi.rs).
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA GPU and libnccl: scripts/gpu-check.sh runs it (--include-ignored)"]
fn nccl_on_one_gpu_gathers_exactly_and_steps_a_sharded_optimizer_bit_identically() {
    use agr_runtime::comm::{new_nccl_id, Comm, Nccl};
    use agr_runtime::shard::GradMode;
    let stream = gpu();
    let id = new_nccl_id().unwrap_or_else(|e| panic!("{e}"));
    let comm: Arc<dyn Comm> =
        Arc::new(Nccl::new(stream, 0, 1, id).unwrap_or_else(|e| panic!("{e}")));
    let send: Vec<f64> = vec![1.0, -0.0, f64::MIN_POSITIVE, 3.5e300, f64::NAN];
    let mut recv = vec![0.0f64; 5];
    comm.all_gather_f64("a test", &send, &[5], &mut recv)
        .unwrap();
    assert!(send
        .iter()
        .zip(&recv)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let send32: Vec<f32> = data(1000, 3);
    let mut recv32 = vec![0.0f32; 1000];
    comm.all_to_all_f32("a test", &send32, &[1000], &mut recv32, &[1000])
        .unwrap();
    assert_eq!(send32, recv32);
    let shapes: Vec<Vec<usize>> = vec![vec![300, 250], vec![70_000], vec![7]];
    let run = |sharded: bool| {
        let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
        if sharded {
            opt.shard(comm.clone(), GradMode::Full).unwrap();
        }
        let mut values: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.iter().product(), i as u64))
            .collect();
        for k in 0..3u64 {
            let grads: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| data(s.iter().product(), 100 + k * 10 + i as u64))
                .collect();
            let mut params: Vec<ParamMut<'_>> = values
                .iter_mut()
                .zip(&grads)
                .zip(&shapes)
                .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
                .collect();
            opt.step_params(&mut params).unwrap();
        }
        values
    };
    let (a, b) = (run(true), run(false));
    assert!(a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    eprintln!("NCCL, one rank: collectives exact, the sharded step bit-identical");
}

/// Sharded on the GPU: 1 to 3 ranks as threads of this process, each with
/// its own stream on the one GPU, exchanging through `comm::Threads`; the
/// chunks' partials go through the host between a reduction pass's two
/// launches. Every rank's parameters must be bitwise the unsharded GPU
/// step's.
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it (--include-ignored)"]
fn sharded_steps_on_the_gpu_are_bit_identical_to_unsharded_ones() {
    use agr_runtime::comm::Threads;
    use agr_runtime::shard::GradMode;
    let stream = gpu();
    let shapes: Vec<Vec<usize>> = vec![vec![300, 250], vec![70_000], vec![4, 3], vec![1]];
    let grads = |k: u64| -> Vec<Vec<f32>> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.iter().product(), 100 + k * 10 + i as u64))
            .collect()
    };
    let run = |opt: &mut Optimizer<AdamWAgrKernel>| {
        let mut values: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.iter().product(), i as u64))
            .collect();
        for k in 0..3u64 {
            let g = grads(k);
            let mut params: Vec<ParamMut<'_>> = values
                .iter_mut()
                .zip(&g)
                .zip(&shapes)
                .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
                .collect();
            opt.step_params(&mut params).unwrap();
        }
        values
    };
    let want = run(&mut on_gpu::<AdamWAgrKernel>(
        &stream,
        Default::default(),
        DType::F32,
    ));
    for n in 1..=3 {
        let comms = Threads::group(n);
        let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let ctx = stream.context().clone();
                    let run = &run;
                    s.spawn(move || {
                        let mine = ctx.new_stream().unwrap();
                        let mut opt =
                            on_gpu::<AdamWAgrKernel>(&mine, Default::default(), DType::F32);
                        opt.shard(comm, GradMode::Full).unwrap();
                        run(&mut opt)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, v) in got.iter().enumerate() {
            assert!(
                v.iter()
                    .flatten()
                    .zip(want.iter().flatten())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{n} ranks on the GPU: rank {r} differs from the unsharded GPU step"
            );
        }
    }
    eprintln!("sharded on the GPU over 1-3 ranks: bit-identical to the unsharded GPU step");
}
