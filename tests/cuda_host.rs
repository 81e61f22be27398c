//! The generated CUDA, run on the CPU: every built-in's kernels (and those
//! of a spec that uses every operation) are compiled as host C++ with the
//! prelude's `AGR_HOST_CHECK` shim and launched block by block, one thread
//! per block, over a multi-tensor chunk table. Their results must match the
//! Rust back end's. A wrong expression in the CUDA printer, a wrong chunk
//! table or a broken cross-block reduction fails here, without a GPU.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use agr_codegen::backend::cuda;
use agr_runtime::{DynOptimizer, HyperValue, ParamMut};

agr_runtime::optimizer! { file = "tests/specs/kitchen_sink.agr" }

/// A driver that plays the GPU runtime's part: builds the tensor and chunk
/// tables, then runs each pass's kernel once per block.
const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <vector>
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(x) CAT(SPEC, x)

template <class T> static void rd(T* x, size_t n) {
    if (fread(x, sizeof(T), n, stdin) != n) { fprintf(stderr, "short input\n"); exit(2); }
}

int main() {
    int nt, nsteps, chunk;
    rd(&nt, 1); rd(&nsteps, 1); rd(&chunk, 1);
    NAME(_Hyper) h;
    rd(h.v, NAME(_NUM_HYPERS) > 0 ? NAME(_NUM_HYPERS) : 0);
    std::vector<float> fill(NAME(_NUM_STATES) + 1);
    rd(fill.data(), NAME(_NUM_STATES));
    std::vector<std::vector<float>> p(nt), g(nt);
    std::vector<std::vector<double>> rows(nt);
    std::vector<std::vector<std::vector<float>>> st(nt);
    std::vector<AgrTensor> tensors(nt);
    std::vector<AgrChunk> chunks;
    for (int j = 0; j < nt; ++j) {
        long long numel, ndim;
        rd(&numel, 1); rd(&ndim, 1);
        p[j].resize(numel); g[j].resize(numel);
        rd(p[j].data(), numel);
        long long row_len;
        rd(&row_len, 1);
        AgrTensor& T = tensors[j];
        T.p = p[j].data(); T.numel = numel; T.ndim = ndim; T.t = 0; T.row_len = row_len; T.group = 0; T.skips = nullptr;
        rows[j].assign(numel / row_len * (NAME(_ROW_REDUCTIONS) + 1), 0.0);
        T.rows = rows[j].data();
        st[j].resize(NAME(_NUM_STATES));
        for (int k = 0; k < NAME(_NUM_STATES); ++k) {
            st[j][k].assign(numel, fill[k]);
            T.st[k] = st[j][k].data();
        }
        T.first_chunk = (int)chunks.size();
        // With row reductions a chunk holds whole rows.
        long long ch = NAME(_ROW_REDUCTIONS) > 0 ? row_len * (chunk / row_len > 0 ? chunk / row_len : 1) : chunk;
        for (long long s = 0; s < numel; s += ch) {
            AgrChunk c; c.tensor = j; c.start = s; c.len = (int)(numel - s < ch ? numel - s : ch);
            chunks.push_back(c);
        }
        T.n_chunks = (int)chunks.size() - T.first_chunk;
    }
    const int nr = NAME(_NUM_REDUCTIONS) > 0 ? NAME(_NUM_REDUCTIONS) : 1;
    std::vector<double> partials(chunks.size() * nr), reduced(nt * nr), global(nr);
    std::vector<unsigned> counters(nt + 1, 0);
    for (int step = 1; step <= nsteps; ++step) {
        for (int j = 0; j < nt; ++j) {
            rd(g[j].data(), g[j].size());
            tensors[j].g = g[j].data();
            tensors[j].t = step;
        }
#define PASS(k)                                                                              \
        for (size_t b = 0; b < chunks.size(); ++b) {                                        \
            blockIdx.x = (unsigned)b;                                                        \
            NAME(_reduce##k)(&h, chunks.data(), tensors.data(), nt, partials.data(),         \
                             reduced.data(), global.data(), counters.data());                \
        }
#if NAME(_PASSES) >= 1
        PASS(0)
#endif
#if NAME(_PASSES) >= 2
        PASS(1)
#endif
#if NAME(_PASSES) >= 3
        PASS(2)
#endif
        for (size_t b = 0; b < chunks.size(); ++b) {
            blockIdx.x = (unsigned)b;
            NAME(_update)(&h, chunks.data(), tensors.data(), nt, reduced.data(), global.data(), (unsigned*)0);
        }
        for (unsigned c : counters)
            if (c != 0) { fprintf(stderr, "a reduction counter was left at %u\n", c); return 3; }
    }
    for (int j = 0; j < nt; ++j) {
        fwrite(p[j].data(), 4, p[j].size(), stdout);
        for (int k = 0; k < NAME(_NUM_STATES); ++k) fwrite(st[j][k].data(), 4, st[j][k].size(), stdout);
    }
    return 0;
}
"#;

const SHAPES: &[&[usize]] = &[&[37, 29], &[4096], &[5], &[3, 1, 4], &[2, 300]];
const STEPS: usize = 4;
const CHUNK: i32 = 256;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 61 == 7 {
                0.0
            } else {
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            }
        })
        .collect()
}

/// Compiles `source` + the driver as host C++, feeds it the run, returns
/// every tensor's final values and states.
fn run_host(
    name: &str,
    source: &str,
    hyper: &[f64],
    fills: &[f32],
    inits: &[Vec<f32>],
    grads: &[Vec<Vec<f32>>],
) -> Vec<f32> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-host");
    std::fs::create_dir_all(&dir).unwrap();
    let cpp = dir.join(format!("{name}.cpp"));
    let exe = dir.join(name);
    std::fs::write(
        &cpp,
        format!("#define AGR_HOST_CHECK 1\n#define SPEC {name}\n{source}\n{DRIVER}"),
    )
    .unwrap();
    let out = Command::new("g++")
        .args([
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-Wno-unused-function",
            "-Wno-unused-variable",
            "-Werror",
            "-o",
        ])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .expect("g++ must be installed to check the generated CUDA on the CPU");
    assert!(
        out.status.success(),
        "{name}: generated CUDA does not compile as host C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut input: Vec<u8> = vec![];
    for x in [SHAPES.len() as i32, STEPS as i32, CHUNK] {
        input.extend(x.to_le_bytes());
    }
    hyper.iter().for_each(|v| input.extend(v.to_le_bytes()));
    fills.iter().for_each(|v| input.extend(v.to_le_bytes()));
    for (s, init) in SHAPES.iter().zip(inits) {
        input.extend((init.len() as i64).to_le_bytes());
        input.extend((s.len() as i64).to_le_bytes());
        init.iter().for_each(|v| input.extend(v.to_le_bytes()));
        input.extend((agr_runtime::TensorMeta::row_len_of(s) as i64).to_le_bytes());
    }
    for step in grads {
        for g in step {
            g.iter().for_each(|v| input.extend(v.to_le_bytes()));
        }
    }
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name}: host run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Runs the same problem through the Rust back end and the CUDA text.
fn check(
    name: &str,
    source_text: &str,
    mut opt: Box<dyn DynOptimizer>,
    overrides: &[(&str, HyperValue)],
) {
    for (k, v) in overrides {
        opt.set_hyper(k, *v).unwrap();
    }
    let prog = agr_codegen::compile(source_text).unwrap();
    let hyper: Vec<f64> = prog
        .hypers
        .iter()
        .map(|h| match opt.hyper(&h.name).unwrap() {
            HyperValue::Float(v) => v,
            HyperValue::Int(i) => i as f64,
            HyperValue::Bool(b) => f64::from(u8::from(b)),
        })
        .collect();
    let fills: Vec<f32> = prog.states.iter().map(|s| s.fill as f32).collect();
    let inits: Vec<Vec<f32>> = SHAPES
        .iter()
        .enumerate()
        .map(|(j, s)| data(s.iter().product(), 100 + j as u64))
        .collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..STEPS)
        .map(|t| {
            inits
                .iter()
                .enumerate()
                .map(|(j, v)| data(v.len(), 1000 * t as u64 + j as u64))
                .collect()
        })
        .collect();
    let host = run_host(
        &prog.name,
        &cuda::full_source(&prog),
        &hyper,
        &fills,
        &inits,
        &grads,
    );

    let mut values = inits.clone();
    for step in &grads {
        let mut params: Vec<ParamMut<'_>> = values
            .iter_mut()
            .zip(step)
            .zip(SHAPES)
            .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
            .collect();
        opt.step_params(&mut params).unwrap();
    }
    let mut rust: Vec<f32> = vec![];
    for (j, v) in values.iter().enumerate() {
        rust.extend(v);
        for s in &prog.states {
            rust.extend(opt.state(j, &s.name).unwrap());
        }
    }
    assert_eq!(host.len(), rust.len(), "{name}");
    let mut worst = 0.0f32;
    for (i, (h, r)) in host.iter().zip(&rust).enumerate() {
        let err = (h - r).abs();
        assert!(
            err <= 2e-6 + 2e-5 * r.abs(),
            "{name} {overrides:?}: value {i}: CUDA {h} vs Rust {r}"
        );
        worst = worst.max(err);
    }
    assert!(
        rust.iter().all(|x| x.is_finite()),
        "{name}: non-finite results"
    );
    println!(
        "{name} {overrides:?}: {} values agree, worst |CUDA - Rust| = {worst:e}",
        rust.len()
    );
}

fn builtin(name: &str) -> (&'static str, Box<dyn DynOptimizer>) {
    let b = agr_runtime::optim::builtin(name).unwrap();
    (b.source, b.make())
}

#[test]
fn builtins_agree_with_the_rust_back_end() {
    let lr = ("lr", HyperValue::Float(1e-2));
    for name in [
        "adamw",
        "adamw_agr",
        "adamw_agr_m",
        "adam",
        "rmsprop",
        "sgdm",
        "sgdm_agr",
        "lion",
        "lion_agr",
        "acprop",
        "lamb",
        "adamw_gc",
        "adopt",
        "cadamw_agr",
    ] {
        let (src, opt) = builtin(name);
        check(name, src, opt, &[lr]);
    }
    for name in ["adan", "adan_agr"] {
        let (src, opt) = builtin(name);
        check(name, src, opt, &[lr]);
        let (src, opt) = builtin(name);
        // Clipping by the global norm (a cross-tensor reduction) and the
        // other weight-decay branch.
        check(
            name,
            src,
            opt,
            &[
                lr,
                ("max_grad_norm", HyperValue::Float(2.0)),
                ("no_prox", HyperValue::Bool(true)),
            ],
        );
    }
}

#[test]
fn every_operation_agrees_with_the_rust_back_end() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/specs/kitchen_sink.agr"
    ))
    .unwrap();
    let opt = || -> Box<dyn DynOptimizer> {
        Box::new(KitchenSink::with_config(Default::default()).unwrap())
    };
    check("kitchen_sink", &src, opt(), &[]);
    check(
        "kitchen_sink",
        &src,
        opt(),
        &[("flip", HyperValue::Bool(true)), ("k", HyperValue::Int(0))],
    );
}
