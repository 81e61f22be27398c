//! `agr replay --sharded` and `agr shard-bench`: sharded optimizers over a
//! communicator's ranks (MPI under `mpirun`). Rank 0 prints; the others
//! print only errors (to stderr).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agr_runtime::comm::Comm;
use agr_runtime::golden;
use agr_runtime::optim;
use agr_runtime::shard::GradMode;
use agr_runtime::{CompiledSpec, DynOptimizer, ParamMut};

/// The optimizer a golden file names (or `spec`), with its label.
pub fn optimizer_for(
    g: &golden::Golden,
    spec: Option<&CompiledSpec>,
) -> Result<(Box<dyn DynOptimizer>, String), String> {
    Ok(match spec {
        Some(c) => (c.boxed(), format!("{} (file: {})", c.name(), g.optimizer)),
        None => (
            optim::builtin_or_err(&g.optimizer)
                .map_err(|e| format!("{e} (or replay a spec: --spec FILE.agr)"))?
                .make(),
            g.optimizer.clone(),
        ),
    })
}

/// What one rank found replaying one file.
struct Outcome {
    replay: golden::Replay,
    /// Steps whose parameters differ (in any bit) from one process's.
    differing_steps: usize,
    /// This rank's state bytes, and one process's.
    state_bytes: usize,
    whole_bytes: usize,
}

fn replay_one(
    comm: &Arc<dyn Comm>,
    f: &Path,
    spec: Option<&CompiledSpec>,
    device: agr_runtime::Device,
) -> Result<Outcome, String> {
    let g = golden::load(f)?;
    // One process first, on the same device: its parameters after each
    // step, as bits.
    let (mut single, _) = optimizer_for(&g, spec)?;
    single.set_device(device).map_err(|e| e.to_string())?;
    let mut want: Vec<Vec<Vec<u32>>> = vec![];
    golden::replay_observed(&g, single.as_mut(), &mut |_, v| {
        want.push(
            v.iter()
                .map(|t| t.iter().map(|x| x.to_bits()).collect())
                .collect(),
        )
    })?;
    let (mut opt, label) = optimizer_for(&g, spec)?;
    opt.set_device(device).map_err(|e| e.to_string())?;
    opt.shard(comm.clone(), GradMode::Full)
        .map_err(|e| e.to_string())?;
    let mut differing_steps = 0;
    let mut replay = golden::replay_observed(&g, opt.as_mut(), &mut |k, v| {
        let same = v
            .iter()
            .zip(&want[k - 1])
            .all(|(a, b)| a.iter().map(|x| x.to_bits()).eq(b.iter().copied()));
        differing_steps += usize::from(!same);
    })?;
    replay.optimizer = label;
    Ok(Outcome {
        replay,
        differing_steps,
        state_bytes: opt.state_bytes().total(),
        whole_bytes: single.state_bytes().total(),
    })
}

/// Every rank's value of `x`, on every rank.
fn gather(comm: &Arc<dyn Comm>, what: &str, x: f64) -> Result<Vec<f64>, String> {
    let n = comm.size();
    let mut all = vec![0.0; n];
    comm.all_gather_f64(what, &[x], &vec![1; n], &mut all)
        .map_err(|e| e.to_string())?;
    Ok(all)
}

/// `agr replay --sharded`: each file replayed by a sharded optimizer over
/// `comm`'s ranks and by one process on every rank; a file passes when it
/// matches its reference and every rank's parameters after every step are
/// bitwise those of one process. Returns whether every file passed (the
/// same on every rank).
pub fn replay_sharded(
    comm: &Arc<dyn Comm>,
    spec: Option<&Path>,
    device: agr_runtime::Device,
    files: &[PathBuf],
) -> bool {
    let (rank, size) = (comm.rank(), comm.size());
    let compiled = match spec.map(agr_runtime::compile_file).transpose() {
        Ok(c) => c,
        Err(e) => {
            if rank == 0 {
                eprintln!("{e}");
            }
            return false;
        }
    };
    let mut failed = false;
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let outcome = replay_one(comm, f, compiled.as_ref(), device);
        // Every rank learns every rank's verdict (-1: an error here).
        let mine = match &outcome {
            Ok(o) => o.differing_steps as f64,
            Err(_) => -1.0,
        };
        let bytes = outcome.as_ref().map_or(0.0, |o| o.state_bytes as f64);
        let (verdicts, bytes) = match (
            gather(comm, "each rank's verdict", mine),
            gather(comm, "each rank's state bytes", bytes),
        ) {
            (Ok(v), Ok(b)) => (v, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("agr: rank {rank}: {e}");
                return false;
            }
        };
        let bad_ranks: Vec<usize> = (0..size).filter(|&r| verdicts[r] != 0.0).collect();
        match outcome {
            Ok(o) => {
                let pass = o.replay.pass && bad_ranks.is_empty();
                failed |= !pass;
                if rank == 0 {
                    let most = bytes.iter().copied().fold(0.0, f64::max) as usize;
                    let identical = if bad_ranks.is_empty() {
                        "bit-identical to 1 process".to_string()
                    } else {
                        format!("DIFFERS from 1 process on ranks {bad_ranks:?}")
                    };
                    println!(
                        "{name:<28} {} ranks={size} {identical} state_bytes/rank<={most} (1 process: {})",
                        o.replay, o.whole_bytes
                    );
                }
            }
            Err(e) => {
                failed = true;
                if rank == 0 {
                    println!("{name:<28} ERROR {e}");
                } else {
                    eprintln!("agr: rank {rank}: {name}: {e}");
                }
            }
        }
    }
    !failed
}

/// Shapes that split tensors between ranks: two tensors of several
/// chunks, one that is a single row, small ones and a scalar; matrices
/// only for specs with matrix blocks (Muon).
fn shard_mix(matrices_only: bool) -> Vec<Vec<usize>> {
    if matrices_only {
        // Each matrix is one unit (its block reads it whole).
        vec![
            vec![40, 24],
            vec![24, 40],
            vec![8, 8],
            vec![64, 48],
            vec![48, 64],
            vec![16, 16],
        ]
    } else {
        vec![
            vec![300, 250],
            vec![70_000],
            vec![4, 3],
            vec![33],
            vec![96, 64],
            vec![1],
        ]
    }
}

/// Rank `rank`'s gradients on step `k` (deterministic, so every rank can
/// compute every rank's).
fn local_grads(shapes: &[Vec<usize>], rank: usize, k: usize) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            (0..n)
                .map(|e| {
                    let h = (e as u64)
                        .wrapping_mul(2654435761)
                        .wrapping_add((i * 97 + rank * 7919 + k * 104729) as u64)
                        % 2001;
                    (h as f32 - 1000.0) * 1e-4
                })
                .collect()
        })
        .collect()
}

/// The gradients one process steps with: under a reduce-scatter the mean
/// of every rank's, added in rank order; else rank 0's (every rank's).
fn reference_grads(shapes: &[Vec<usize>], size: usize, k: usize, grads: GradMode) -> Vec<Vec<f32>> {
    let mut g = local_grads(shapes, 0, k);
    if let GradMode::ReduceScatter { mean } = grads {
        for r in 1..size {
            for (a, b) in g.iter_mut().zip(local_grads(shapes, r, k)) {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
        }
        if mean {
            for x in g.iter_mut().flatten() {
                *x /= size as f32;
            }
        }
    }
    g
}

fn step(
    opt: &mut dyn DynOptimizer,
    shapes: &[Vec<usize>],
    values: &mut [Vec<f32>],
    g: &[Vec<f32>],
) -> Result<f64, String> {
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(shapes)
        .zip(g)
        .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
        .collect();
    let t0 = Instant::now();
    opt.step_params(&mut params).map_err(|e| e.to_string())?;
    Ok(t0.elapsed().as_secs_f64())
}

/// `agr shard-bench`: `steps` sharded steps of each built-in on a workload;
/// rank 0 prints the ranks, the most state bytes a rank holds against one
/// process's, and the median step time (the slowest rank's) against one
/// process's unsharded step, timed alternately with it on every rank. With `check`,
/// every rank also steps one process's optimizer and the line says whether
/// every rank's parameters were bitwise the same after every step (an
/// error if not).
pub fn shard_bench(
    comm: &Arc<dyn Comm>,
    optimizers: &[String],
    workload: &str,
    steps: usize,
    grads: GradMode,
    check: bool,
    device: agr_runtime::Device,
) -> Result<(), String> {
    let names: Vec<&str> = if optimizers.iter().any(|o| o == "all") {
        optim::BUILTINS.iter().map(|b| b.name).collect()
    } else {
        optimizers.iter().map(String::as_str).collect()
    };
    let mut failed = vec![];
    for name in names {
        let b = optim::builtin_or_err(name)?;
        let matrices = !b.make().desc().matrices.is_empty();
        let shapes = if workload == "shard_mix" {
            shard_mix(matrices)
        } else {
            crate::bench::workloads()
                .into_iter()
                .find(|w| w.name == workload)
                .ok_or_else(|| format!("no workload `{workload}` (shard_mix, one_2^24, gpt_150)"))?
                .shapes
        };
        if matrices && shapes.iter().any(|s| s.len() != 2) {
            return Err(format!(
                "{name} steps matrices only: use --workload shard_mix"
            ));
        }
        let init = |i: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|e| 0.5 - ((e * 31 + i * 7) % 97) as f32 * 0.01)
                .collect()
        };
        let fresh = || -> Vec<Vec<f32>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| init(i, s.iter().product()))
                .collect()
        };
        let mut opt = b.make();
        opt.set_device(device).map_err(|e| e.to_string())?;
        opt.shard(comm.clone(), grads).map_err(|e| e.to_string())?;
        let mut single = b.make();
        single.set_device(device).map_err(|e| e.to_string())?;
        let (mut values, mut want) = (fresh(), fresh());
        let (mut times, mut single_times) = (vec![], vec![]);
        let mut differing = 0usize;
        for k in 1..=steps.max(1) {
            let mine = match grads {
                GradMode::Full => local_grads(&shapes, 0, k),
                GradMode::ReduceScatter { .. } => local_grads(&shapes, comm.rank(), k),
            };
            times.push(step(opt.as_mut(), &shapes, &mut values, &mine)?);
            // The yardstick, alternating with it: one process's step (on
            // every rank, so the ranks share the machine alike).
            let g = reference_grads(&shapes, comm.size(), k, grads);
            single_times.push(step(single.as_mut(), &shapes, &mut want, &g)?);
            if check {
                let same = values.iter().zip(&want).all(|(a, b)| {
                    a.iter()
                        .map(|x| x.to_bits())
                        .eq(b.iter().map(|x| x.to_bits()))
                });
                differing += usize::from(!same);
            }
        }
        times.sort_by(f64::total_cmp);
        single_times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let single_median = single_times[single_times.len() / 2];
        let all_times = gather(comm, "each rank's step time", median)?;
        let all_single = gather(comm, "each rank's unsharded step time", single_median)?;
        let all_bytes = gather(
            comm,
            "each rank's state bytes",
            opt.state_bytes().total() as f64,
        )?;
        let verdicts = gather(comm, "each rank's check", differing as f64)?;
        let bad: Vec<usize> = (0..comm.size()).filter(|&r| verdicts[r] != 0.0).collect();
        if !bad.is_empty() {
            failed.push(name);
        }
        if comm.rank() == 0 {
            let whole = single.state_bytes().total();
            let most = all_bytes.iter().copied().fold(0.0, f64::max);
            let slowest = all_times.iter().copied().fold(0.0, f64::max);
            let single_slowest = all_single.iter().copied().fold(0.0, f64::max);
            let verdict = match (check, bad.is_empty()) {
                (false, _) => String::new(),
                (true, true) => format!(" bit-identical to 1 process over {steps} steps"),
                (true, false) => format!(" DIFFERS from 1 process on ranks {bad:?}"),
            };
            println!(
                "shard-bench {name} {workload} device={device} ranks={} grads={} state_bytes/rank={} (1 process: {whole}, ratio {:.3}) step_ms={:.2} unsharded_ms={:.2} ratio_vs_unsharded={:.2}{verdict}",
                comm.size(),
                match grads {
                    GradMode::Full => "full",
                    GradMode::ReduceScatter { .. } => "reduce-scatter",
                },
                most as usize,
                most / whole.max(1) as f64,
                slowest * 1e3,
                single_slowest * 1e3,
                slowest / single_slowest
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "sharded steps differ from one process's for {failed:?}"
        ))
    }
}
