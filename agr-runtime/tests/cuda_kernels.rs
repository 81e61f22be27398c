//! Every built-in's generated CUDA compiles through the same cudarc NVRTC
//! path the runtime uses, for compute_80 and compute_90, for f32, f16 and
//! bf16 parameters and for bf16/f16 parameters with bf16/f16 states, and
//! assembles with ptxas for sm_80 and sm_90 without
//! spills and within the register budget.
//!
//! Needs NVRTC (and ptxas for the second half): `eval "$(scripts/cuda-tools.sh)"`
//! installs both from PyPI wheels, no GPU needed. Without them the test says
//! so and passes, unless `AGR_REQUIRE_CUDA_TOOLS=1` (as in CI).
#![cfg(feature = "cuda")]

use std::process::Command;

use agr_runtime::cuda::{self, DType};
use agr_runtime::optim::*;
use agr_runtime::{Device, KernelDesc, ParamMut, Storage};

/// The most registers a generated kernel may use: at 256 threads per block
/// this still allows 4 resident blocks (32 warps) per SM on sm_80/sm_90.
pub const REGISTER_BUDGET: u32 = 64;

fn required() -> bool {
    std::env::var("AGR_REQUIRE_CUDA_TOOLS").is_ok_and(|v| v == "1")
}

struct Usage {
    kernel: String,
    registers: u32,
    spill_bytes: u32,
}

/// Parses `ptxas -v` output.
fn ptxas_usage(text: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = vec![];
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(Usage {
                kernel: rest.split('\'').next().unwrap_or("").to_string(),
                registers: 0,
                spill_bytes: 0,
            });
        } else if let Some(u) = out.last_mut() {
            if let Some(pos) = line.find(" bytes spill stores") {
                let n = line[..pos].rsplit(' ').next().unwrap_or("0");
                u.spill_bytes += n.parse::<u32>().unwrap_or(0);
                if let Some(p2) = line.find(" bytes spill loads") {
                    let n = line[..p2].rsplit(' ').next().unwrap_or("0");
                    u.spill_bytes += n.parse::<u32>().unwrap_or(0);
                }
            }
            if let Some(pos) = line.find("Used ") {
                let n = line[pos + 5..].split(' ').next().unwrap_or("0");
                u.registers = n.parse().unwrap_or(0);
            }
        }
    }
    out
}

/// The storage variants each spec is compiled in: parameters in f32, bf16
/// or f16 with f32 states, and bf16 or f16 parameters with every
/// per-element state in their type (the narrowed loads and stores, the
/// master copy and stochastic rounding all in the kernels).
fn variants(desc: &KernelDesc) -> Vec<(DType, Vec<Storage>, &'static str)> {
    let narrowed = |kind: Storage| -> Vec<Storage> {
        desc.states
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let narrowable = s.reduced.is_none()
                    && !s.per_tensor
                    && !desc.matrices.iter().any(|m| m.state == k);
                if narrowable {
                    kind
                } else {
                    Storage::F32
                }
            })
            .collect()
    };
    vec![
        (DType::F32, vec![], "F32"),
        (DType::BF16, vec![], "BF16"),
        (DType::F16, vec![], "F16"),
        (DType::BF16, narrowed(Storage::Bf16), "BF16+st"),
        (DType::F16, narrowed(Storage::F16), "F16+st"),
    ]
}

fn check(desc: &KernelDesc, report: &mut Vec<String>) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ptx");
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        for (dtype, states, label) in variants(desc) {
            let ptx = cuda::compile_stored(desc.name, desc.cuda_source, arch, dtype, &states)
                .unwrap_or_else(|e| panic!("{e}"));
            let src = ptx.to_src();
            for k in desc.cuda_kernels {
                assert!(
                    src.contains(&format!(".entry {k}(")),
                    "{k} missing from the PTX"
                );
            }
            let Ok(ptxas) = std::env::var("AGR_PTXAS") else {
                assert!(!required(), "AGR_PTXAS is not set");
                continue;
            };
            let file = dir.join(format!("{}_{arch}_{label}.ptx", desc.name));
            std::fs::write(&file, &src).unwrap();
            let out = Command::new(&ptxas)
                .arg(format!("-arch={sm}"))
                .arg("-v")
                .arg(&file)
                .arg("-o")
                .arg(file.with_extension("cubin"))
                .output()
                .expect("run ptxas");
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "ptxas failed for {} {arch} {label}:\n{text}",
                desc.name
            );
            let usage = ptxas_usage(&text);
            assert_eq!(usage.len(), desc.cuda_kernels.len(), "{text}");
            for u in usage {
                report.push(format!(
                    "{:<22} {sm} {:<5} registers={:<3} spill_bytes={}",
                    u.kernel, label, u.registers, u.spill_bytes
                ));
                // At most 80 bytes stored and reloaded: since the kernels
                // read a per-group table of hyperparameters, decide a
                // non-finite skip themselves and take a tensor's step count
                // net of the device's skips, ptxas keeps a few values on the
                // stack around the scalar prologue's calls (to `pow`) in a
                // few kernel variants (counted in the report, README "GPU").
                // The most is AdamWGc_update on sm_90 in f32 (64 bytes,
                // with 48 registers: not register pressure); every other
                // variant stays within 24. More than 80 fails.
                let abi_save = u.spill_bytes <= 80;
                assert!(
                    u.spill_bytes == 0 || abi_save,
                    "{} spills {} bytes on {sm} ({label}):\n{text}",
                    u.kernel,
                    u.spill_bytes
                );
                assert!(
                    u.registers <= REGISTER_BUDGET,
                    "{} uses {} registers on {sm} ({label}), budget {REGISTER_BUDGET}",
                    u.kernel,
                    u.registers
                );
            }
        }
    }
}

#[test]
fn every_builtin_compiles_and_assembles_within_budget() {
    if !cuda::nvrtc_available() {
        assert!(
            !required(),
            "NVRTC is required (AGR_REQUIRE_CUDA_TOOLS=1) but could not be loaded"
        );
        println!("skipped: NVRTC not found; run `eval \"$(scripts/cuda-tools.sh)\"` first");
        return;
    }
    // Two threads: NVRTC and ptxas are single-threaded.
    let descs: Vec<&KernelDesc> = BUILTINS.iter().map(|b| b.make().desc()).collect();
    let report: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = descs
            .chunks(descs.len().div_ceil(2))
            .map(|part| {
                scope.spawn(move || {
                    let mut report = vec![];
                    for d in part {
                        check(d, &mut report);
                    }
                    report
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for line in &report {
        println!("{line}");
    }
}

#[test]
fn a_compile_error_is_reported_with_the_nvrtc_log() {
    if !cuda::nvrtc_available() {
        assert!(!required(), "NVRTC is required but could not be loaded");
        println!("skipped: NVRTC not found");
        return;
    }
    let broken = AdamWAgr::CUDA_SOURCE.replace("sqrtf(", "sqrt_typo(");
    let e = cuda::compile_source("Broken", &broken, "compute_90", DType::F32).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("NVRTC could not compile the kernels of Broken for compute_90"),
        "{msg}"
    );
    assert!(msg.contains("sqrt_typo"), "{msg}");
}

#[test]
fn without_a_gpu_moving_to_cuda_is_an_error_that_changes_nothing() {
    let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
    let mut p = vec![1.0f32, 2.0, 3.0];
    let g = vec![0.1f32, -0.2, 0.3];
    opt.step_params(&mut [ParamMut::new(&mut p, Some(&g), &[3])])
        .unwrap();
    let before = (
        opt.steps(),
        opt.state_to_host(0, "m"),
        opt.state_to_host(0, "v"),
    );
    match opt.set_device(Device::Cuda(0)) {
        Ok(()) => println!("a GPU is present: see tests/gpu.rs"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("CUDA: "), "{msg}");
            assert_eq!(opt.device(), Device::Cpu);
            let after = (
                opt.steps(),
                opt.state_to_host(0, "m"),
                opt.state_to_host(0, "v"),
            );
            assert_eq!(after, before, "a failed move changed the optimizer");
            assert_eq!(after.0, 1);
            println!("no GPU, as expected here: {msg}");
        }
    }
    // GPU buffers on an optimizer that is not on a GPU: a clear error.
    let e = unsafe {
        opt.step_raw(&[cuda::RawCudaParam {
            value: 0,
            grad: None,
            shape: &[3],
        }])
    }
    .unwrap_err();
    assert!(e.to_string().contains("runs on cpu"), "{e}");
}
