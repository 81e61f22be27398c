//! `agr`: check specs, print the code generated from them, and replay
//! reference trajectories through the built-in optimizers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use agr_codegen::{backend, ir};
use agr_runtime::{golden, optim};

#[derive(Parser)]
#[command(name = "agr", version, about = "The agr optimizer spec compiler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check spec files; errors and warnings show line, column and a
    /// caret. Exits with 1 if any file has an error (warnings alone: 0).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print what a spec compiles to. SPEC is a `.agr` path or a built-in's name.
    Emit {
        #[arg(long, value_enum, default_value_t = Target::Rust)]
        target: Target,
        spec: String,
    },
    /// Replay `agr-golden/1` trajectories through the built-in each file
    /// names, or through a spec of yours compiled at run time (`--spec`).
    Replay {
        /// A `.agr` spec to replay instead of the built-in each file names
        /// (its hyperparameters must have the files' names).
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Where to step: `cpu`, `emulated-cuda` (the generated CUDA kernels
        /// compiled as host C++ and run block by block, as on a GPU), or
        /// `cuda` / `cuda:N` (a GPU; built with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: agr_runtime::Device,
        /// Shard the optimizer over the MPI ranks of `mpirun -np N agr replay
        /// --sharded ...` (built with `--features mpi`): each file is also
        /// replayed by one process on every rank, on the same device, and
        /// passes only if every rank's parameters are bitwise the same after
        /// every step. Rank 0 prints; the others print only errors.
        #[arg(long)]
        sharded: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Time a sharded built-in under `mpirun -np N` (built with `--features
    /// mpi`): state bytes per rank against one process's, and the median
    /// step time of the slowest rank.
    ShardBench {
        /// Built-ins to step (`all`: every one).
        #[arg(long, value_delimiter = ',', default_value = "adamw_agr")]
        optimizers: Vec<String>,
        /// one_2^24 or gpt_150 (see `agr bench`), or shard_mix (small
        /// tensors and tensors of several chunks, split between ranks).
        #[arg(long, default_value = "gpt_150")]
        workload: String,
        /// Also step one process's optimizer on every rank and fail unless
        /// every rank's parameters are bitwise the same after every step.
        #[arg(long)]
        check: bool,
        #[arg(long, default_value_t = 11)]
        steps: usize,
        /// `full`: every rank passes the same gradients; `reduce-scatter`:
        /// each its own, summed in rank order by one all-to-all (ZeRO-2).
        #[arg(long, default_value = "full")]
        grads: String,
        /// `cpu` or a CUDA device (`emulated-cuda`, `cuda`): specs without
        /// factored states, with `--grads full`.
        #[arg(long, default_value = "cpu")]
        device: agr_runtime::Device,
    },
    /// List the built-in optimizers.
    List,
    /// Measure the built-ins' CPU steps against the memory-bandwidth floor.
    Bench {
        /// Built-ins to measure. `muon` and `muon_agr` run on the 2-D
        /// tensors with `adamw` (`adamw_agr`) on the rest, against a floor
        /// that adds their Newton–Schulz FLOPs at the measured GEMM rate.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "adamw,adamw_agr,adamw_agr_m,adan,adan_agr,muon_agr"
        )]
        optimizers: Vec<String>,
        /// Workloads: one_2^24 (one tensor of 2^24 parameters), gpt_150 (150 GPT-like tensors),
        /// vars_100k (100,000 tensors of 64 parameters).
        #[arg(long, value_delimiter = ',', default_value = "one_2^24,gpt_150")]
        workloads: Vec<String>,
        /// Timed steps per measurement (the median is reported).
        #[arg(long, default_value_t = 11)]
        iters: usize,
        /// Also step each built-in compiled at run time (the IR evaluator of
        /// `agr_runtime::compile`), as `NAME/run_time`, with its ratio to the
        /// generated step.
        #[arg(long)]
        run_time: bool,
        /// `.agr` specs to measure, compiled at run time.
        #[arg(long, value_delimiter = ',')]
        spec: Vec<PathBuf>,
        /// Instead of the floor: step each optimizer in these precision
        /// modes (bf16-state, q8-state, bf16-params, bf16-params-sr,
        /// bf16-params-master), each against the same optimizer in f32
        /// timed alternately with it (`ratio_vs_f32=`), with the bytes per
        /// parameter each keeps.
        #[arg(long, value_delimiter = ',')]
        precision: Vec<String>,
        /// `torch`: time PyTorch beside each optimizer that has a
        /// counterpart (adamw: `AdamW(fused=True)`; adamw_agr: the published
        /// AGR line, then the fused AdamW), alternating, and print
        /// `ratio_vs_torch=`; agr with its non-finite check off (torch has
        /// none) and on. With `--precision bf16-params`, also both on bf16
        /// parameters (and bf16 moments, as torch keeps them). Installs
        /// torch 2.15.0 under .tools/torch on first use.
        #[arg(long)]
        against: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    /// The fused CPU step as Rust source (what `optimizer!` generates).
    Rust,
    /// The CUDA kernels as one translation unit (prelude included).
    Cuda,
    /// The IR: one line per node with its level and phase.
    Ir,
    /// The normalised spec.
    Spec,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Emit { target, spec } => emit(target, &spec),
        Command::Replay {
            spec,
            device,
            sharded: false,
            files,
        } => replay(spec.as_deref(), device, &files),
        Command::Replay {
            spec,
            device,
            sharded: true,
            files,
        } => with_mpi(|comm| {
            if agr::sharded::replay_sharded(&comm, spec.as_deref(), device, &files) {
                Ok(())
            } else {
                Err(String::new())
            }
        }),
        Command::ShardBench {
            optimizers,
            workload,
            check,
            steps,
            grads,
            device,
        } => {
            let grads = match grads.as_str() {
                "full" => agr_runtime::shard::GradMode::Full,
                "reduce-scatter" => agr_runtime::shard::GradMode::ReduceScatter { mean: true },
                other => {
                    eprintln!("--grads {other}: use `full` or `reduce-scatter`");
                    return ExitCode::FAILURE;
                }
            };
            with_mpi(|comm| {
                agr::sharded::shard_bench(
                    &comm,
                    &optimizers,
                    &workload,
                    steps,
                    grads,
                    check,
                    device,
                )
            })
        }
        Command::Bench {
            optimizers,
            workloads,
            iters,
            run_time,
            spec,
            precision,
            against,
        } => {
            if let Some(a) = against {
                if a != "torch" {
                    eprintln!("agr bench: --against {a}: the one yardstick is `torch`");
                    return ExitCode::FAILURE;
                }
                bench_torch(&optimizers, &workloads, iters, &precision)
            } else if precision.is_empty() {
                bench(&optimizers, &workloads, iters, run_time, &spec)
            } else {
                bench_precision(&optimizers, &workloads, iters, &precision)
            }
        }
        Command::List => {
            for b in optim::BUILTINS {
                let doc = b
                    .source
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("///")
                    .trim();
                println!("{:<12} {:<10} {doc}", b.name, b.type_name);
            }
            ExitCode::SUCCESS
        }
    }
}

/// A spec's source and the name to show in messages.
fn load_spec(spec: &str) -> Result<(String, String), String> {
    if let Some(b) = optim::builtin(spec) {
        return Ok((format!("{}.agr", b.name), b.source.to_string()));
    }
    let path = Path::new(spec);
    match std::fs::read_to_string(path) {
        Ok(s) => Ok((spec.to_string(), s)),
        Err(e) if !spec.ends_with(".agr") && !path.exists() => Err(format!(
            "`{spec}` is neither a built-in ({}) nor a readable file: {e}",
            optim::BUILTINS
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => Err(format!("cannot read {spec}: {e}")),
    }
}

fn compile(name: &str, source: &str) -> Result<ir::Program, String> {
    agr_codegen::compile(source).map_err(|diags| {
        diags
            .iter()
            .map(|d| d.render(name, source))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        let name = f.display().to_string();
        let source = match std::fs::read_to_string(f) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot read {name}: {e}");
                failed = true;
                continue;
            }
        };
        match agr_codegen::compile_with_warnings(&source) {
            Ok((p, warnings)) => {
                for w in &warnings {
                    eprintln!("{}", w.render(&name, &source));
                }
                println!(
                    "{name}: ok: `{}` with {} hyperparameters, {} states, {} reduction pass(es) + 1 update pass{}",
                    p.name,
                    p.hypers.len(),
                    p.states.len(),
                    p.n_phases,
                    match warnings.len() {
                        0 => String::new(),
                        1 => "; 1 warning".into(),
                        n => format!("; {n} warnings"),
                    }
                );
            }
            Err(diags) => {
                for d in &diags {
                    eprintln!("{}", d.render(&name, &source));
                }
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn emit(target: Target, spec: &str) -> ExitCode {
    let result = load_spec(spec).and_then(|(name, source)| {
        let prog = compile(&name, &source)?;
        Ok(match target {
            Target::Rust => backend::rust::emit(&prog),
            Target::Cuda => backend::cuda::full_source(&prog),
            Target::Ir => ir::dump(&prog),
            Target::Spec => prog.spec_text.clone(),
        })
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            if !e.ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on MPI's world communicator (an error is printed, and is the
/// exit status of every rank).
#[cfg(feature = "mpi")]
fn with_mpi(
    f: impl FnOnce(std::sync::Arc<dyn agr_runtime::comm::Comm>) -> Result<(), String>,
) -> ExitCode {
    let comm = match agr_runtime::comm::Mpi::init() {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => {
            eprintln!("agr: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = agr_runtime::comm::Comm::rank(comm.as_ref());
    match f(comm) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("agr: rank {rank}: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn with_mpi(
    _: impl FnOnce(std::sync::Arc<dyn agr_runtime::comm::Comm>) -> Result<(), String>,
) -> ExitCode {
    eprintln!("this build of agr has no MPI: build it with `--features mpi` and run it under `mpirun -np N`");
    ExitCode::FAILURE
}

fn replay(spec: Option<&Path>, device: agr_runtime::Device, files: &[PathBuf]) -> ExitCode {
    let compiled = match spec.map(agr_runtime::compile_file).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let run = |g: golden::Golden| {
            let (mut opt, label) = agr::sharded::optimizer_for(&g, compiled.as_ref())?;
            opt.set_device(device).map_err(|e| e.to_string())?;
            golden::replay_with(&g, opt).map(|mut r| {
                r.optimizer = label;
                r
            })
        };
        match golden::load(f).and_then(run) {
            Ok(r) => {
                println!("{name:<28} {r}");
                failed |= !r.pass;
            }
            Err(e) => {
                println!("{name:<28} ERROR {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Muon (`muon` or `muon_agr` on the 2-D tensors, AdamW or AdamW-AGR on
/// the rest) against its floor: its bytes at the memory floor plus its
/// Newton–Schulz FLOPs at the GEMM rate measured alternately with it.
fn bench_muon(
    name: &str,
    w: &agr::bench::Workload,
    iters: usize,
    rows: &mut Vec<agr::bench::Row>,
) -> Result<(), String> {
    use agr::bench::{self, MuonFloor, Row, Stepper};
    if !w.shapes.iter().any(|s| s.len() == 2) {
        eprintln!("{name}: {} has no matrices; skipped", w.name);
        return Ok(());
    }
    let opt = bench::muon_pair(name).ok_or_else(|| format!("no Muon benchmark for `{name}`"))?;
    // The built-in's default, which the benchmark steps with.
    let ns_steps = agr_runtime::optim::builtin(name)
        .and_then(|b| b.make().hyper("ns_steps"))
        .and_then(|v| v.as_int("ns_steps").ok())
        .ok_or(format!("`{name}` has no `ns_steps`"))? as usize;
    let mut stepper = Stepper::with(opt, w, true)?;
    let mut floor = MuonFloor::new(w, ns_steps);
    let mut gemm_ms = vec![];
    // Seconds a step: fewer rounds than the memory-bound steps.
    let (ms, f) = bench::interleaved(
        iters.min(5),
        || stepper.run_ms(),
        || {
            let (all, gemm) = floor.run_ms();
            gemm_ms.push(gemm);
            Ok(all)
        },
    )?;
    gemm_ms.sort_by(|a, b| a.total_cmp(b));
    let row = Row {
        optimizer: format!(
            "{name}+{}",
            if name == "muon" { "adamw" } else { "adamw_agr" }
        ),
        workload: w.name,
        median_ms: ms,
        floor_ms: f,
    };
    println!(
        "{} gemm_floor_ms={:.3} gflops={:.1}",
        row.line(),
        gemm_ms[gemm_ms.len() / 2],
        bench::muon_flops(w, ns_steps) / ms / 1e6
    );
    rows.push(row);
    Ok(())
}

/// `agr bench --against torch`: agr and PyTorch on the same workloads,
/// alternately.
fn bench_torch(
    optimizers: &[String],
    workloads: &[String],
    iters: usize,
    precision: &[String],
) -> ExitCode {
    use agr::bench::{self, Stepper, TorchStepper};
    let fail = |e: String| {
        eprintln!("bench: {e}");
        ExitCode::FAILURE
    };
    let python = match bench::torch_python() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let mut said = false;
    for w in bench::workloads()
        .into_iter()
        .filter(|w| workloads.iter().any(|n| n == w.name))
    {
        for name in optimizers {
            let Some(theirs) = TorchStepper::counterpart(name) else {
                eprintln!("{name}: no PyTorch counterpart; skipped");
                continue;
            };
            let mut modes = vec![("f32", None)];
            if precision.iter().any(|p| p == "bf16-params") {
                modes.push(("bf16", Some("bf16-params")));
            }
            for (dtype, mode) in modes {
                let mut run = || -> Result<(), String> {
                    let mut torch = TorchStepper::new(&python, name, &w, dtype)?;
                    if !said {
                        println!(
                            "threads: {}; torch {} in the same run, alternating with agr; each ratio is agr's median over torch's",
                            rayon::current_num_threads(),
                            torch.version
                        );
                        said = true;
                    }
                    for check in [false, true] {
                        let mut ours = Stepper::new(name, &w, check)?;
                        if let Some(m) = mode {
                            ours = ours.with_precision(m)?;
                        }
                        let (ms, t) =
                            bench::interleaved(iters.max(1), || ours.run_ms(), || torch.run_ms())?;
                        println!(
                            "{name:<10} {:<9} params={dtype:<4} finite_check={:<3} median_ms={ms:>8.2} torch_ms={t:>8.2} ratio_vs_torch={:.2}  ({theirs})",
                            w.name,
                            if check { "on" } else { "off" },
                            ms / t
                        );
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    return fail(format!("{name} on {}: {e}", w.name));
                }
            }
        }
    }
    if precision.iter().any(|p| p.starts_with("q8")) {
        eprintln!("q8-state: PyTorch has no 8-bit optimizer state of its own (torchao's is not installed); no ratio");
    }
    ExitCode::SUCCESS
}

/// `agr bench --precision`: each mode against f32, timed alternately.
fn bench_precision(
    optimizers: &[String],
    workloads: &[String],
    iters: usize,
    modes: &[String],
) -> ExitCode {
    use agr::bench::{self, Floor, Stepper};
    println!(
        "threads: {}; ratio_vs_f32: against the same optimizer in f32 (parameters, gradients, state) timed alternately with it; ratio_vs_floor: against the f32 floor kernel, timed alternately with it and scaled by the bytes the mode moves (traffic=, per parameter) over the bytes it moves",
        rayon::current_num_threads()
    );
    for w in bench::workloads()
        .into_iter()
        .filter(|w| workloads.iter().any(|n| n == w.name))
    {
        for name in optimizers.iter().filter(|n| !n.starts_with("muon")) {
            for mode in modes {
                let run = || -> Result<(), String> {
                    let mut f32_step = Stepper::new(name, &w, true)?;
                    let mut ours = Stepper::new(name, &w, true)?.with_precision(mode)?;
                    let (ms, base) =
                        bench::interleaved(iters.max(1), || ours.run_ms(), || f32_step.run_ms())?;
                    let floor = match bench::ideal_traffic(name) {
                        Some(rw) => {
                            let mut floor = Floor::new(&w, rw.0, rw.1);
                            let (ms2, f) = bench::interleaved(
                                iters.max(1),
                                || ours.run_ms(),
                                || Ok(floor.run_ms()),
                            )?;
                            let traffic = ours.traffic_bytes(rw);
                            let scaled = f * traffic / (4.0 * (rw.0 + rw.1) as f64);
                            format!(
                                " traffic={traffic:>5.2} floor_ms={scaled:>8.2} ratio_vs_floor={:.2}",
                                ms2 / scaled
                            )
                        }
                        None => " (no floor defined)".into(),
                    };
                    println!(
                        "{name:<12} {:<9} precision={mode:<18} bytes/param={:>5.2} (f32 {:>5.2}) median_ms={ms:>8.2} f32_ms={base:>8.2} ratio_vs_f32={:.2}{floor}",
                        w.name,
                        ours.bytes_per_param(),
                        f32_step.bytes_per_param(),
                        ms / base
                    );
                    Ok(())
                };
                if let Err(e) = run() {
                    eprintln!("bench: {name} {mode}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn bench(
    optimizers: &[String],
    workloads: &[String],
    iters: usize,
    run_time: bool,
    specs: &[PathBuf],
) -> ExitCode {
    use agr::bench::{self, Floor, Row, Stepper};
    let iters = iters.max(1);
    println!(
        "threads: {}; each ratio is against a floor kernel timed alternately with it",
        rayon::current_num_threads()
    );
    let mut rows = vec![];
    let fail = |e: String| {
        eprintln!("bench: {e}");
        ExitCode::FAILURE
    };
    for w in bench::workloads()
        .into_iter()
        .filter(|w| workloads.iter().any(|n| n == w.name))
    {
        let mut subjects: Vec<(String, (usize, usize), Option<Stepper>)> = vec![];
        for path in specs {
            let spec = match agr_runtime::compile_file(path) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
            let label = format!("{}/run_time", path.display());
            match Stepper::with(spec.boxed(), &w, true) {
                Ok(s) => subjects.push((label, bench::spec_traffic(spec.desc()), Some(s))),
                Err(e) => return fail(e),
            }
        }
        for name in optimizers.iter().filter(|n| n.starts_with("muon")) {
            if let Err(e) = bench_muon(name, &w, iters, &mut rows) {
                return fail(e);
            }
        }
        for name in optimizers.iter().filter(|n| !n.starts_with("muon")) {
            let Some(rw) = bench::ideal_traffic(name) else {
                eprintln!("no floor is defined for `{name}`; skipped");
                continue;
            };
            if run_time {
                let b = optim::builtin(name).expect("a floor is defined for built-ins only");
                let spec = match agr_runtime::compile(b.source) {
                    Ok(s) => s,
                    Err(e) => return fail(e.to_string()),
                };
                match Stepper::with(spec.boxed(), &w, true) {
                    Ok(s) => subjects.push((format!("{name}/run_time"), rw, Some(s))),
                    Err(e) => return fail(e),
                }
            }
            for check in [true, false] {
                if !check && !name.starts_with("adamw") {
                    continue;
                }
                let label = if check {
                    name.clone()
                } else {
                    format!("{name}/no_finite_check")
                };
                match Stepper::new(name, &w, check) {
                    Ok(s) => subjects.push((label, rw, Some(s))),
                    Err(e) => return fail(e),
                }
            }
        }
        for (label, rw, stepper) in &mut subjects {
            let mut floor = Floor::new(&w, rw.0, rw.1);
            let mut stepper = stepper.take().unwrap();
            match bench::interleaved(iters, || stepper.run_ms(), || Ok(floor.run_ms())) {
                Ok((ms, f)) => {
                    let row = Row {
                        optimizer: label.clone(),
                        workload: w.name,
                        median_ms: ms,
                        floor_ms: f,
                    };
                    println!("{}", row.line());
                    rows.push(row);
                }
                Err(e) => return fail(e),
            }
        }
        #[cfg(feature = "candle-bench")]
        {
            let mut floor = Floor::new(&w, 4, 3);
            match bench::candle_adamw(&w)
                .and_then(|c| bench::interleaved(iters.min(5), c, || Ok(floor.run_ms())))
            {
                Ok((ms, f)) => {
                    let row = Row {
                        optimizer: "candle-nn_adamw".into(),
                        workload: w.name,
                        median_ms: ms,
                        floor_ms: f,
                    };
                    println!("{}", row.line());
                    rows.push(row);
                }
                Err(e) => eprintln!("candle-nn AdamW: {e}"),
            }
            let mut floor = Floor::new(&w, 5, 3);
            match bench::candle_adapter_adamw_agr(&w)
                .and_then(|c| bench::interleaved(iters, c, || Ok(floor.run_ms())))
            {
                Ok((ms, f)) => {
                    let row = Row {
                        optimizer: "adamw_agr_via_candle".into(),
                        workload: w.name,
                        median_ms: ms,
                        floor_ms: f,
                    };
                    println!("{}", row.line());
                    rows.push(row);
                }
                Err(e) => eprintln!("AdamW-AGR through candle: {e}"),
            }
        }
    }
    // What optimizer! does at compile time, per built-in (this build's
    // optimisation level; the macro itself is built in the dev profile).
    for b in optim::BUILTINS {
        let mut times = vec![];
        for _ in 0..5 {
            let start = std::time::Instant::now();
            if let Ok(prog) = agr_codegen::compile(b.source) {
                let first = backend::rust::emit(&prog);
                let cuda_kernels = backend::cuda::emit(&prog);
                let cuda = backend::cuda::full_source(&prog);
                let embedded = backend::rust::Embedded {
                    generated_rust: &first,
                    cuda_source: &cuda,
                    cuda_kernel_source: &cuda_kernels,
                };
                std::hint::black_box(backend::rust::emit_with(&prog, Some(embedded)));
            }
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!("expand {} ms={:.3}", b.name, times[2]);
    }
    // A step compiled at run time against the generated one, same workload.
    for r in &rows {
        if let Some(name) = r.optimizer.strip_suffix("/run_time") {
            if let Some(g) = rows
                .iter()
                .find(|g| g.optimizer == name && g.workload == r.workload)
            {
                println!(
                    "run_time {name} {} ratio_to_generated={:.3}",
                    r.workload,
                    (r.median_ms / r.floor_ms) / (g.median_ms / g.floor_ms)
                );
            }
        }
    }
    println!("\n| optimizer | workload | median ms | floor ms | ratio |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x |",
            r.optimizer,
            r.workload,
            r.median_ms,
            r.floor_ms,
            r.median_ms / r.floor_ms
        );
    }
    ExitCode::SUCCESS
}
