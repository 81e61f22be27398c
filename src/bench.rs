//! `agr bench`: the generated CPU steps against the memory-bandwidth floor
//! (and candle-nn's AdamW, with the `candle-bench` feature), measured in the
//! same run. Every result is a ratio against a yardstick of that run.

use std::time::Instant;

use agr_runtime::{optim, HyperValue, NonFinite, ParamMut};
use rayon::prelude::*;

/// A benchmark workload: the shapes of a model's parameters.
pub struct Workload {
    pub name: &'static str,
    pub shapes: Vec<Vec<usize>>,
}

impl Workload {
    pub fn params(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

/// One tensor of 2^24 parameters, the 150 tensors of a GPT-like model, and
/// 100,000 tensors of 64 parameters (per-tensor costs; not run by default).
pub fn workloads() -> Vec<Workload> {
    let mut gpt = vec![vec![3072, 768]];
    for _ in 0..2 {
        gpt.extend(std::iter::repeat_n(vec![768, 768], 4));
        gpt.push(vec![768, 3072]);
        gpt.push(vec![3072, 768]);
    }
    gpt.extend(std::iter::repeat_n(vec![3072], 68));
    gpt.extend(std::iter::repeat_n(vec![768], 69));
    vec![
        Workload {
            name: "one_2^24",
            shapes: vec![vec![1 << 24]],
        },
        Workload {
            name: "gpt_150",
            shapes: gpt,
        },
        Workload {
            name: "vars_100k",
            shapes: vec![vec![64]; 100_000],
        },
    ]
}

/// Arrays an ideal fused step must read and write per parameter (f32):
/// every state and the parameter are read and written once, the gradient
/// read once, plus one more read of each array a reduction reads where it
/// must finish before the update (Ψ's Σ|g|; C-AdamW-AGR's count of its
/// mask). Every built-in has one but Muon's, whose floor adds its
/// products' FLOPs (see [`MuonFloor`]).
pub fn ideal_traffic(name: &str) -> Option<(usize, usize)> {
    Some(match name {
        "adamw" | "adam" | "nadam" => (4, 3),
        // The row means of g (gradient centralisation), then the update.
        "adamw_gc" => (5, 3),
        // ‖p‖ and ‖update‖ (p, g, m, v), then the update (p, g, m, v).
        "lamb" => (8, 3),
        // p and g for norm(p) and the row and column sums, g for the norm
        // of the update, p and g for the update; writes p (the factored
        // moments are a row and a column per matrix).
        "adafactor" => (5, 1),
        "adamw_agr" | "adamw_agr_m" => (5, 3),
        "adan" => (6, 5),
        "adan_agr" => (7, 5),
        // One state.
        "sgdm" | "lion" => (3, 2),
        "sgdm_agr" | "lion_agr" => (4, 2),
        // Two states, no reduction before the update.
        "rmsprop" | "acprop" | "adopt" => (4, 3),
        // Σ|g| (g), then sum(mask) (g, m, v), then the update (p, g, m, v).
        "cadamw_agr" => (8, 3),
        _ => return None,
    })
}

/// The Muon benchmark's optimizer: `muon` (or `muon_agr`) on the 2-D
/// tensors, `adamw` (`adamw_agr`) on the rest, as one [`agr_runtime::multi::Multi`].
pub fn muon_pair(name: &str) -> Option<Box<dyn agr_runtime::DynOptimizer>> {
    let rest = match name {
        "muon" => "adamw",
        "muon_agr" => "adamw_agr",
        _ => return None,
    };
    let multi = agr_runtime::multi::Multi::new(optim::builtin(rest)?.make())
        .part(
            "matrices",
            agr_runtime::groups::select::ndim_at_least(2),
            optim::builtin(name)?.make(),
        )
        .ok()?;
    Some(Box::new(multi))
}

/// The products of Muon's Newton–Schulz iteration on a workload's 2-D
/// tensors, as `(m, k, n)` shapes with their counts per step: per
/// iteration, on the short side `m` and the long side `n`, `A = X Xᵀ`
/// (m×n @ n×m), `B = bA + cA·A` (m×m @ m×m) and `X = aX + B·X` (m×m @ m×n),
/// as torch (and the spec's plan) computes them.
pub fn muon_products(w: &Workload, ns_steps: usize) -> Vec<((usize, usize, usize), usize)> {
    let mut out: Vec<((usize, usize, usize), usize)> = vec![];
    for s in w.shapes.iter().filter(|s| s.len() == 2) {
        let (m, n) = (s[0].min(s[1]), s[0].max(s[1]));
        for shape in [(m, n, m), (m, m, m), (m, m, n)] {
            match out.iter_mut().find(|(x, _)| *x == shape) {
                Some((_, c)) => *c += ns_steps,
                None => out.push((shape, ns_steps)),
            }
        }
    }
    out
}

/// Floating-point operations of those products (2mkn each).
pub fn muon_flops(w: &Workload, ns_steps: usize) -> f64 {
    muon_products(w, ns_steps)
        .iter()
        .map(|&((m, k, n), c)| 2.0 * (m * k * n * c) as f64)
        .sum()
}

/// The workload split into its 2-D tensors and the rest.
pub fn matrices_and_rest(w: &Workload) -> (Workload, Workload) {
    let (m, r): (Vec<Vec<usize>>, Vec<Vec<usize>>) =
        w.shapes.iter().cloned().partition(|s| s.len() == 2);
    (
        Workload {
            name: w.name,
            shapes: m,
        },
        Workload {
            name: w.name,
            shapes: r,
        },
    )
}

/// The machine's GEMM rate, measured: f32 products `m×k @ k×n` by the
/// `gemm` crate (the shape of Muon's largest products), both as one product
/// on every thread and as one single-threaded product per thread side by
/// side (as the engine runs a step's matrices); the faster counts.
pub struct GemmProbe {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    /// One output per thread.
    c: Vec<Vec<f32>>,
}

impl GemmProbe {
    pub fn new(m: usize, k: usize, n: usize) -> GemmProbe {
        GemmProbe {
            m,
            k,
            n,
            a: (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect(),
            b: (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(),
            c: vec![vec![0.0; m * n]; rayon::current_num_threads().max(1)],
        }
    }

    fn product(&self, c: &mut [f32], parallelism: gemm::Parallelism) {
        let (m, k, n) = (self.m, self.k, self.n);
        // SAFETY: a is m×k (row-major), b k×n, c m×n, each exactly that long.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                self.a.as_ptr(),
                1,
                k as isize,
                self.b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// The faster of the two ways, timed now: FLOP per millisecond.
    pub fn flop_per_ms(&mut self) -> f64 {
        let flop = 2.0 * (self.m * self.n * self.k) as f64;
        let mut c = std::mem::take(&mut self.c);
        let start = Instant::now();
        self.product(&mut c[0], gemm::Parallelism::Rayon(0));
        let one = flop / (start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        c.par_iter_mut()
            .for_each(|c| self.product(c, gemm::Parallelism::None));
        let side_by_side = flop * c.len() as f64 / (start.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&c);
        self.c = c;
        one.max(side_by_side)
    }
}

/// Muon's floor on a workload, in milliseconds per step: the memory floor
/// of its bytes (on the matrices the parameter, gradient and momentum read
/// once and the parameter and momentum written once; AdamW's traffic on
/// the rest) plus its Newton–Schulz FLOPs at the GEMM rate measured now.
pub struct MuonFloor {
    matrices: Floor,
    rest: Floor,
    /// One probe per product shape, with the FLOPs of that shape a step does.
    probes: Vec<(GemmProbe, f64)>,
}

impl MuonFloor {
    pub fn new(w: &Workload, ns_steps: usize) -> MuonFloor {
        let (m, r) = matrices_and_rest(w);
        MuonFloor {
            matrices: Floor::new(&m, 3, 2),
            rest: Floor::new(&r, 4, 3),
            probes: muon_products(w, ns_steps)
                .into_iter()
                .map(|((m, k, n), c)| (GemmProbe::new(m, k, n), 2.0 * (m * k * n * c) as f64))
                .collect(),
        }
    }

    /// One timed run: (floor ms, of it the GEMM part): each shape's FLOPs at
    /// that shape's rate.
    pub fn run_ms(&mut self) -> (f64, f64) {
        let bytes = self.matrices.run_ms() + self.rest.run_ms();
        let gemm: f64 = self
            .probes
            .iter_mut()
            .map(|(p, flops)| *flops / p.flop_per_ms())
            .sum();
        (bytes + gemm, gemm)
    }
}

/// The floor: a fused loop that reads `reads` f32 arrays and writes the
/// first `writes` of them in place, per tensor, chunked and threaded like
/// the optimizer engine (the best a fused step with this traffic can do).
/// Arrays are staggered like the engine's state buffers.
pub struct Floor {
    reads: usize,
    arrays: Vec<Vec<Vec<f32>>>,
    offsets: Vec<usize>,
    writes: usize,
}

impl Floor {
    pub fn new(w: &Workload, reads: usize, writes: usize) -> Floor {
        // The same layout as a step's buffers: the parameter and gradient
        // are the caller's plain allocations; the states start at staggered
        // cache lines, as the engine allocates them (equal-sized arrays at
        // equal page offsets contend for the same cache sets).
        let offsets: Vec<usize> = (0..reads)
            .map(|k| if k < 2 { 0 } else { (k - 2) * 16 })
            .collect();
        let arrays = w
            .shapes
            .iter()
            .map(|s| {
                let n: usize = s.iter().product();
                (0..reads)
                    .map(|k| vec![k as f32 * 0.25; n + offsets[k]])
                    .collect()
            })
            .collect();
        Floor {
            reads,
            arrays,
            offsets,
            writes,
        }
    }

    /// One timed run, in milliseconds.
    pub fn run_ms(&mut self) -> f64 {
        let start = Instant::now();
        macro_rules! floors {
            ($(($r:literal, $($w:literal),*)),*) => {
                match (self.reads, self.writes) {
                    $($(($r, $w) => self.run::<$r, $w>(),)*)*
                    (r, w) => panic!("no floor kernel for read {r} / write {w}"),
                }
            };
        }
        floors!(
            (2, 1),
            (3, 1, 2),
            (4, 1, 2, 3),
            (5, 1, 2, 3, 4),
            (6, 1, 2, 3, 4, 5),
            (7, 1, 2, 3, 4, 5),
            (8, 1, 2, 3, 4, 5),
            (9, 1, 2, 3, 4, 5),
            (10, 1, 2, 3, 4, 5)
        );
        start.elapsed().as_secs_f64() * 1e3
    }

    fn run<const R: usize, const W: usize>(&mut self) {
        const CHUNK: usize = 1 << 15;
        let offsets = &self.offsets;
        let items: Vec<([usize; R], usize, usize)> = self
            .arrays
            .iter_mut()
            .flat_map(|t| {
                let n = t[0].len() - offsets[0];
                let ptrs: [usize; R] =
                    std::array::from_fn(|k| t[k][offsets[k]..].as_mut_ptr() as usize);
                (0..n.div_ceil(CHUNK)).map(move |c| (ptrs, c * CHUNK, CHUNK.min(n - c * CHUNK)))
            })
            .collect();
        items.par_iter().for_each(|&(ptrs, start, len)| {
            // SAFETY: items are disjoint ranges of arrays that outlive the loop.
            let a: [&mut [f32]; R] = std::array::from_fn(|k| unsafe {
                std::slice::from_raw_parts_mut((ptrs[k] as *mut f32).add(start), len)
            });
            #[cfg(target_arch = "x86_64")]
            if agr_runtime::cpu::has_avx2() {
                // SAFETY: the CPU supports AVX2 (checked at run time).
                unsafe { kernel_avx2::<R, W>(a) };
                return;
            }
            kernel::<R, W>(a);
        });
    }
}

/// The floor kernel built with AVX2, as the optimizers' loops are.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn kernel_avx2<const R: usize, const W: usize>(a: [&mut [f32]; R]) {
    kernel::<R, W>(a)
}

#[inline(always)]
fn kernel<const R: usize, const W: usize>(mut a: [&mut [f32]; R]) {
    let len = a[0].len();
    for x in a.iter_mut() {
        assert_eq!(x.len(), len);
    }
    for i in 0..len {
        let mut s = 0.0f32;
        for x in a.iter() {
            s += x[i];
        }
        for x in a.iter_mut().take(W) {
            x[i] = x[i] * 0.999 + s * 1e-6;
        }
    }
}

/// A built-in ready to step on a workload.
pub struct Stepper {
    opt: Box<dyn agr_runtime::DynOptimizer>,
    values: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    shapes: Vec<Vec<usize>>,
    /// bf16 parameters and gradients (then `values` and `grads` are empty).
    bf16: Option<(Vec<Vec<half::bf16>>, Vec<Vec<half::bf16>>)>,
}

/// A precision mode `agr bench --precision` measures: `(name, bf16
/// parameters, the optimizer's precision)` for a spec with states `states`.
pub fn precision_mode(name: &str, states: &[&str]) -> Option<(bool, agr_runtime::Precision)> {
    use agr_runtime::{Precision, Storage};
    let all = |kind: Storage| {
        states.iter().fold(Precision::f32(), |p, s| {
            // A second moment (`v`, `n`) is never negative: uq8.
            let k = if kind == Storage::Q8 && matches!(*s, "v" | "n") {
                Storage::Uq8
            } else {
                kind
            };
            p.state(s, k)
        })
    };
    Some(match name {
        "bf16-state" => (false, all(Storage::Bf16)),
        "q8-state" => (false, all(Storage::Q8)),
        "bf16-params-master" => (true, Precision::f32().with_master(true)),
        "bf16-params-sr" => (true, all(Storage::Bf16).stochastic(1)),
        "bf16-params" => (true, all(Storage::Bf16)),
        _ => return None,
    })
}

/// The precision modes `agr bench --precision` knows.
pub const PRECISION_MODES: &[&str] = &[
    "bf16-state",
    "q8-state",
    "bf16-params",
    "bf16-params-sr",
    "bf16-params-master",
];

/// The floor's traffic for a spec: its parameter, gradient and states read
/// once per pass that touches them (approximated as: everything once, plus
/// the gradient once per reduction pass), its written buffers written once.
/// A reduced state (one value per row or column) counts as nothing.
/// At most 10 reads and 5 writes (the floor kernels this file has).
pub fn spec_traffic(desc: &agr_runtime::KernelDesc) -> (usize, usize) {
    let ns = desc.states.iter().filter(|s| s.reduced.is_none()).count();
    let reads = (2 + ns + desc.passes).min(10);
    let writes = (usize::from(desc.writes_param) + ns).clamp(1, 5).min(reads);
    (reads, writes)
}

impl Stepper {
    pub fn new(name: &str, w: &Workload, check_finite: bool) -> Result<Stepper, String> {
        let b = optim::builtin(name).ok_or_else(|| format!("unknown optimizer `{name}`"))?;
        Self::with(b.make(), w, check_finite)
    }

    /// Steps `opt` (a spec compiled at run time, say) on the workload.
    pub fn with(
        mut opt: Box<dyn agr_runtime::DynOptimizer>,
        w: &Workload,
        check_finite: bool,
    ) -> Result<Stepper, String> {
        if opt.hyper("lr").is_some() {
            opt.set_hyper("lr", HyperValue::Float(1e-4))
                .map_err(|e| e.to_string())?;
        }
        if !check_finite {
            opt.set_non_finite_policy(NonFinite::Ignore);
        }
        let values = w
            .shapes
            .iter()
            .map(|s| vec![0.5; s.iter().product()])
            .collect();
        let grads = w
            .shapes
            .iter()
            .map(|s| {
                (0..s.iter().product::<usize>())
                    .map(|i| ((i % 13) as f32 - 6.0) * 1e-3)
                    .collect()
            })
            .collect();
        Ok(Stepper {
            opt,
            values,
            grads,
            shapes: w.shapes.clone(),
            bf16: None,
        })
    }

    /// In precision mode `mode` (see [`precision_mode`]).
    pub fn with_precision(mut self, mode: &str) -> Result<Stepper, String> {
        let states: Vec<&str> = self
            .opt
            .desc()
            .states
            .iter()
            .filter(|s| s.reduced.is_none() && !s.per_tensor)
            .map(|s| s.name)
            .collect();
        let (bf16, precision) = precision_mode(mode, &states).ok_or_else(|| {
            format!(
                "unknown precision mode `{mode}` (known: {})",
                PRECISION_MODES.join(", ")
            )
        })?;
        self.opt
            .set_precision(precision)
            .map_err(|e| e.to_string())?;
        if bf16 {
            let narrow = |v: &Vec<Vec<f32>>| -> Vec<Vec<half::bf16>> {
                v.iter()
                    .map(|x| x.iter().map(|&y| half::bf16::from_f32(y)).collect())
                    .collect()
            };
            self.bf16 = Some((narrow(&self.values), narrow(&self.grads)));
            self.values = vec![];
            self.grads = vec![];
        }
        Ok(self)
    }

    /// Bytes per parameter a step keeps: parameter, gradient and state.
    pub fn bytes_per_param(&self) -> f64 {
        let n: usize = self
            .shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let pg = if self.bf16.is_some() { 4.0 } else { 8.0 };
        pg + self.opt.state_bytes().state as f64 / n as f64
    }

    /// Bytes per parameter an ideal step moves in this stepper's precision,
    /// for a spec whose f32 floor reads `reads` and writes `writes` arrays
    /// (see [`ideal_traffic`]): each state buffer (a master copy included)
    /// read and written once at its storage's size, the parameter read and
    /// written once, the gradient read `reads - 1 - states` times, at theirs.
    /// In f32 this is `4 * (reads + writes)`.
    pub fn traffic_bytes(&self, (reads, writes): (usize, usize)) -> f64 {
        let n: usize = self
            .shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let per_element = self
            .opt
            .desc()
            .states
            .iter()
            .filter(|s| s.reduced.is_none() && !s.per_tensor)
            .count();
        let state = self.opt.state_bytes().state as f64 / n as f64;
        let g_reads = reads.saturating_sub(1 + per_element) as f64;
        let master = self.opt.precision().master && self.bf16.is_some();
        let (p, g) = if self.bf16.is_some() {
            (2.0, 2.0)
        } else {
            (4.0, 4.0)
        };
        // With a master copy the parameter is only written (its rounding);
        // the master is read and written as state.
        let p_traffic = if master {
            p
        } else if writes > per_element {
            2.0 * p
        } else {
            p
        };
        2.0 * state + p_traffic + g * g_reads
    }

    /// One timed step, in milliseconds.
    pub fn run_ms(&mut self) -> Result<f64, String> {
        let start = Instant::now();
        if let Some((values, grads)) = &mut self.bf16 {
            let mut params: Vec<ParamMut<'_, half::bf16>> = values
                .iter_mut()
                .zip(grads.iter())
                .zip(&self.shapes)
                .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
                .collect();
            self.opt
                .step_params_bf16(&mut params)
                .map_err(|e| e.to_string())?;
            return Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        let mut params: Vec<ParamMut<'_>> = self
            .values
            .iter_mut()
            .zip(&self.grads)
            .zip(&self.shapes)
            .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
            .collect();
        self.opt
            .step_params(&mut params)
            .map_err(|e| e.to_string())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

/// Runs `a` and `b` alternately (after two warm-up rounds) and returns their
/// median times: a yardstick measured in the same moments as the subject.
pub fn interleaved(
    iters: usize,
    mut a: impl FnMut() -> Result<f64, String>,
    mut b: impl FnMut() -> Result<f64, String>,
) -> Result<(f64, f64), String> {
    let (mut ta, mut tb) = (vec![], vec![]);
    for round in 0..iters + 2 {
        let x = a()?;
        let y = b()?;
        if round >= 2 {
            ta.push(x);
            tb.push(y);
        }
    }
    Ok((median(ta), median(tb)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `w`'s variables on `dev` (ones) and a gradient for each (1e-3).
#[cfg(feature = "candle-bench")]
fn candle_model(
    w: &Workload,
    dev: &candle_core::Device,
) -> candle_core::Result<(Vec<candle_core::Var>, candle_core::backprop::GradStore)> {
    use candle_core::{Tensor, Var};
    let vars: Vec<Var> = w
        .shapes
        .iter()
        .map(|s| Var::ones(s.as_slice(), candle_core::DType::F32, dev))
        .collect::<Result<_, _>>()?;
    let mut grads = candle_core::backprop::GradStore::default();
    for v in &vars {
        grads.insert(
            v.as_tensor(),
            (Tensor::ones(v.shape(), candle_core::DType::F32, dev)? * 1e-3)?,
        );
    }
    Ok((vars, grads))
}

/// A function doing one timed step of `opt` (until `dev` has finished it).
#[cfg(feature = "candle-bench")]
fn timed_candle_step(
    dev: candle_core::Device,
    mut step: impl FnMut() -> candle_core::Result<()>,
) -> impl FnMut() -> Result<f64, String> {
    move || {
        dev.synchronize().map_err(|x| x.to_string())?;
        let start = Instant::now();
        step().map_err(|x| x.to_string())?;
        dev.synchronize().map_err(|x| x.to_string())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

/// candle-nn's AdamW on the same workload: returns a function doing one
/// timed step.
#[cfg(feature = "candle-bench")]
pub fn candle_adamw(w: &Workload) -> Result<impl FnMut() -> Result<f64, String>, String> {
    candle_adamw_on(w, &candle_core::Device::Cpu)
}

/// candle-nn's AdamW on `w`'s variables on `dev`.
#[cfg(feature = "candle-bench")]
pub fn candle_adamw_on(
    w: &Workload,
    dev: &candle_core::Device,
) -> Result<impl FnMut() -> Result<f64, String>, String> {
    use candle_nn::Optimizer;
    let e = |e: candle_core::Error| e.to_string();
    let (vars, grads) = candle_model(w, dev).map_err(e)?;
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .map_err(e)?;
    Ok(timed_candle_step(dev.clone(), move || opt.step(&grads)))
}

/// agr's AdamW-AGR stepping the same candle variables through the candle
/// adapter (`candle_nn::Optimizer::step`): the adapter's cost over the engine.
#[cfg(feature = "candle-bench")]
pub fn candle_adapter_adamw_agr(
    w: &Workload,
) -> Result<impl FnMut() -> Result<f64, String>, String> {
    candle_adapter_on("adamw_agr", w, &candle_core::Device::Cpu)
}

/// The built-in `name` stepping `w`'s variables on `dev` through the candle
/// adapter (on a GPU: in place, on candle's stream).
#[cfg(feature = "candle-bench")]
pub fn candle_adapter_on(
    name: &str,
    w: &Workload,
    dev: &candle_core::Device,
) -> Result<impl FnMut() -> Result<f64, String>, String> {
    let e = |e: candle_core::Error| e.to_string();
    let (vars, grads) = candle_model(w, dev).map_err(e)?;
    let mut opt = optim::builtin_or_err(name)
        .map_err(|x| x.to_string())?
        .make();
    opt.set_lr(1e-4).map_err(|x| x.to_string())?;
    let mut opt = agr_runtime::candle::CandleDyn::new(opt, vars).map_err(e)?;
    Ok(timed_candle_step(dev.clone(), move || {
        opt.step(&grads).map(|_| ())
    }))
}

/// One measurement, printed as a table row and a machine-readable line.
pub struct Row {
    pub optimizer: String,
    pub workload: &'static str,
    pub median_ms: f64,
    pub floor_ms: f64,
}

impl Row {
    pub fn line(&self) -> String {
        format!(
            "bench {} {} median_ms={:.3} floor_ms={:.3} ratio={:.3}",
            self.optimizer,
            self.workload,
            self.median_ms,
            self.floor_ms,
            self.median_ms / self.floor_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muon_flops_count_three_products_per_iteration_on_the_short_side() {
        let w = Workload {
            name: "t",
            shapes: vec![vec![6, 4], vec![3, 8], vec![8, 3], vec![5], vec![2, 2, 2]],
        };
        // Per iteration, m the short side and n the long one: X Xᵀ (2m²n),
        // A·A (2m³), B·X (2m²n); 1-D and 3-D tensors have none.
        let closed = |m: f64, n: f64| 5.0 * (4.0 * m * m * n + 2.0 * m * m * m);
        let expected = closed(4.0, 6.0) + 2.0 * closed(3.0, 8.0);
        assert_eq!(muon_flops(&w, 5), expected);
        let p = muon_products(&w, 5);
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(
            p.contains(&((3, 8, 3), 10)),
            "the 3x8 and 8x3 share shapes: {p:?}"
        );
        let (m, r) = matrices_and_rest(&w);
        assert_eq!((m.shapes.len(), r.shapes.len()), (3, 2));
    }

    #[test]
    fn the_muon_benchmark_steps_muon_on_matrices_and_adamw_on_the_rest() {
        let w = Workload {
            name: "t",
            shapes: vec![vec![6, 4], vec![4]],
        };
        let mut s = Stepper::with(muon_pair("muon_agr").unwrap(), &w, true).unwrap();
        s.run_ms().unwrap();
        assert!(s.opt.state(0, "buf").is_some() && s.opt.state(1, "m").is_some());
        assert!(muon_pair("adamw").is_none());
    }

    #[test]
    fn every_builtin_has_a_floor() {
        for b in agr_runtime::optim::BUILTINS {
            let floor = ideal_traffic(b.name);
            assert_eq!(floor.is_none(), b.name.starts_with("muon"), "{}", b.name);
            if let Some((r, w)) = floor {
                // The floor kernels this file has.
                assert!(
                    (2..=10).contains(&r) && (1..=5.min(r - 1)).contains(&w),
                    "{}",
                    b.name
                );
            }
        }
    }

    #[test]
    fn precision_traffic_counts_each_buffer_at_its_storage_size() {
        let w = Workload {
            name: "t",
            shapes: vec![vec![512], vec![3, 100]],
        };
        let rw = ideal_traffic("adamw").unwrap();
        let traffic = |mode: Option<&str>| {
            let mut s = Stepper::new("adamw", &w, true).unwrap();
            if let Some(m) = mode {
                s = s.with_precision(m).unwrap();
            }
            s.run_ms().unwrap();
            s.traffic_bytes(rw)
        };
        // f32: the floor's own arrays, 4 bytes each.
        assert_eq!(traffic(None), 4.0 * (rw.0 + rw.1) as f64);
        // bf16 moments: p read and written (8), g read (4), m and v read
        // and written at 2 bytes (8).
        assert_eq!(traffic(Some("bf16-state")), 20.0);
        // bf16 parameters and moments: 4 + 2 + 8.
        assert_eq!(traffic(Some("bf16-params")), 14.0);
        // A master copy: f32 m, v and master read and written (24), the
        // bf16 parameter written (2), the bf16 gradient read (2).
        assert_eq!(traffic(Some("bf16-params-master")), 28.0);
    }
}

/// PyTorch's steps on a workload, timed one at a time by
/// `scripts/torch_step_server.py` in a child process (so they can alternate
/// with agr's): `torch.optim.AdamW(fused=True)`, for `adamw_agr` after the
/// published AGR line on each gradient.
pub struct TorchStepper {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
    /// The torch version that answered.
    pub version: String,
}

impl TorchStepper {
    /// The torch counterpart of built-in `name`, if it has one.
    pub fn counterpart(name: &str) -> Option<&'static str> {
        match name {
            "adamw" => Some("torch AdamW(fused=True)"),
            "adamw_agr" => Some("published AGR line + torch AdamW(fused=True)"),
            _ => None,
        }
    }

    /// Starts `python` on the server script with `name`'s counterpart on
    /// `w`, its parameters of `dtype` (`f32` or `bf16`).
    pub fn new(
        python: &str,
        name: &str,
        w: &Workload,
        dtype: &str,
    ) -> Result<TorchStepper, String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/torch_step_server.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {python} {script}: {e}"))?;
        let to = child.stdin.take().expect("piped");
        let from = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut s = TorchStepper {
            child,
            to,
            from,
            version: String::new(),
        };
        let setup = serde_json::json!({
            "cmd": "setup",
            "shapes": w.shapes,
            "dtype": dtype,
            "optimizer": name,
            "threads": rayon::current_num_threads(),
        });
        writeln!(s.to, "{setup}").map_err(|e| format!("torch: {e}"))?;
        let answer = s.answer()?;
        s.version = answer["torch"].as_str().unwrap_or("?").to_string();
        Ok(s)
    }

    fn answer(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        self.from
            .read_line(&mut line)
            .map_err(|e| format!("torch: {e}"))?;
        if line.is_empty() {
            return Err("torch: the step server ended (see its error above)".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("torch: `{line}`: {e}"))?;
        match v.get("error") {
            Some(e) => Err(format!("torch: {e}")),
            None => Ok(v),
        }
    }

    /// One timed step, in milliseconds (torch's own timing of it).
    ///
    /// torch's OpenMP threads keep spinning for a while after a step
    /// (libgomp's default wait policy, which torch's own timing gains from
    /// between the parallel regions of one step); a pause after it, not
    /// timed, lets them go idle before the agr step timed next, which they
    /// would otherwise take cores from.
    pub fn run_ms(&mut self) -> Result<f64, String> {
        use std::io::Write;
        writeln!(self.to, "{{\"cmd\": \"step\"}}").map_err(|e| format!("torch: {e}"))?;
        let ms = self.answer()?["ms"]
            .as_f64()
            .ok_or_else(|| "torch: no time in the answer".to_string())?;
        std::thread::sleep(std::time::Duration::from_millis(SETTLE_MS));
        Ok(ms)
    }
}

/// The untimed pause after each torch step (see [`TorchStepper::run_ms`]).
pub const SETTLE_MS: u64 = 50;

impl Drop for TorchStepper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with the pinned torch (`scripts/torch.sh` installs it under
/// `.tools/torch` on first use).
pub fn torch_python() -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/torch.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{script}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script} failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
