//! Sharded optimizers (`agr_runtime::shard`) against the single-process
//! step: every built-in, 1 to 4 ranks (as threads of this process, through
//! `comm::Threads`: the same packing, folding and collectives the MPI path
//! runs; `mpirun` runs the golden files in CI), tensors split between
//! ranks, ranks with nothing to own, both gradient modes, skipped and failed
//! steps, and checkpoints. Every comparison is bit for bit.

mod common;

use std::sync::Arc;

use agr_runtime::comm::{Comm, Solo, Threads};
use agr_runtime::optim::BUILTINS;
use agr_runtime::shard::{GradMode, ShardPlan};
use agr_runtime::{DynOptimizer, NonFinite, ParamMut, StepError};

/// Shapes with tensors of several chunks (split between ranks), single
/// chunks, a row-sized tensor and a one-element one.
const SHAPES: &[&[usize]] = &[&[300, 250], &[70_000], &[4, 3], &[33], &[96, 64], &[1]];
/// For specs with matrix blocks (Muon): matrices only.
const MATRICES: &[&[usize]] = &[&[40, 24], &[24, 40], &[8, 8], &[130, 260]];

fn shapes_for(opt: &dyn DynOptimizer) -> &'static [&'static [usize]] {
    if opt.desc().matrices.is_empty() {
        SHAPES
    } else {
        MATRICES
    }
}

fn grads(shapes: &[&[usize]], step: u64, salt: u64) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            common::data(n, step * 1000 + i as u64 * 7 + salt * 100_003)
                .into_iter()
                .map(|x| x * 0.1)
                .collect()
        })
        .collect()
}

fn init(shapes: &[&[usize]]) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| common::data(s.iter().product(), 77 + i as u64))
        .collect()
}

fn step(opt: &mut dyn DynOptimizer, shapes: &[&[usize]], values: &mut [Vec<f32>], g: &[Vec<f32>]) {
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(shapes)
        .zip(g)
        .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params(&mut params).unwrap();
}

fn bits(values: &[Vec<f32>]) -> Vec<Vec<u32>> {
    values
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Runs `f(rank, comm)` on `n` threads, one per rank; their results in
/// rank order.
fn on_ranks<T: Send>(n: usize, f: impl Fn(usize, Arc<dyn Comm>) -> T + Sync) -> Vec<T> {
    let comms = Threads::group(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

const STEPS: u64 = 3;

#[test]
fn every_builtin_sharded_over_1_to_4_ranks_steps_bit_identically() {
    for b in BUILTINS {
        let shapes = shapes_for(b.make().as_ref());
        let mut reference = b.make();
        let mut want = init(shapes);
        let mut trajectory = vec![];
        for k in 1..=STEPS {
            step(reference.as_mut(), shapes, &mut want, &grads(shapes, k, 0));
            trajectory.push(bits(&want));
        }
        let whole = reference.state_bytes().total();
        for n in 1..=4 {
            let per_rank = on_ranks(n, |_, comm| {
                let mut opt = b.make();
                opt.shard(comm, GradMode::Full).unwrap();
                let mut v = init(shapes);
                let mut got = vec![];
                for k in 1..=STEPS {
                    step(opt.as_mut(), shapes, &mut v, &grads(shapes, k, 0));
                    got.push(bits(&v));
                }
                (got, opt.state_bytes().total(), opt.save_checkpoint())
            });
            for (r, (got, _, _)) in per_rank.iter().enumerate() {
                assert!(
                    got == &trajectory,
                    "{} over {n} ranks: rank {r}'s parameters differ from one process's",
                    b.name
                );
            }
            // The gathered checkpoint holds the unsharded state, bit for bit.
            for (r, (_, _, ck)) in per_rank.iter().enumerate() {
                let mut loaded = b.make();
                loaded.load_checkpoint(ck).unwrap();
                for i in 0..shapes.len() {
                    for s in loaded.desc().states {
                        let (a, w) = (
                            loaded.state_to_host(i, s.name).unwrap(),
                            reference.state_to_host(i, s.name).unwrap(),
                        );
                        assert!(
                            a.iter()
                                .map(|x| x.to_bits())
                                .eq(w.iter().map(|x| x.to_bits())),
                            "{} over {n} ranks: rank {r}'s checkpoint: state `{}` of #{i} differs",
                            b.name,
                            s.name
                        );
                    }
                    assert_eq!(loaded.tensor_steps(i), reference.tensor_steps(i));
                }
            }
            // State: each rank about 1/n of it (units are whole chunks or,
            // for matrix and factored specs, whole tensors).
            let bytes: Vec<usize> = per_rank.iter().map(|p| p.1).collect();
            if n > 1 && b.make().desc().matrices.is_empty() && !b.make().desc().factored {
                let most = *bytes.iter().max().unwrap();
                assert!(
                    most <= whole / n + whole / 4,
                    "{} over {n} ranks: {bytes:?} bytes of state per rank, {whole} unsharded",
                    b.name
                );
            }
        }
    }
}

#[test]
fn a_reduce_scatter_of_local_gradients_is_an_all_reduce_in_rank_order() {
    for name in ["adamw_agr", "adan_agr", "lamb"] {
        let Some(b) = agr_runtime::optim::builtin(name) else {
            panic!("no built-in {name}")
        };
        for n in [2, 3, 4] {
            let local = |r: usize, k: u64| grads(SHAPES, k, r as u64 + 1);
            // One process: the mean of the ranks' gradients, added in rank order.
            let mut reference = b.make();
            let mut want = init(SHAPES);
            for k in 1..=STEPS {
                let mut g = local(0, k);
                for r in 1..n {
                    for (a, b) in g.iter_mut().zip(local(r, k)) {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                    }
                }
                for x in g.iter_mut().flatten() {
                    *x /= n as f32;
                }
                step(reference.as_mut(), SHAPES, &mut want, &g);
            }
            let got = on_ranks(n, |r, comm| {
                let mut opt = b.make();
                opt.shard(comm, GradMode::ReduceScatter { mean: true })
                    .unwrap();
                let mut v = init(SHAPES);
                for k in 1..=STEPS {
                    step(opt.as_mut(), SHAPES, &mut v, &local(r, k));
                }
                bits(&v)
            });
            for (r, g) in got.iter().enumerate() {
                assert!(
                    g == &bits(&want),
                    "{name} over {n} ranks with a reduce-scatter: rank {r} differs"
                );
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_skips_or_fails_the_step_on_every_rank() {
    let b = agr_runtime::optim::builtin("adamw_agr").unwrap();
    for policy in [NonFinite::Skip, NonFinite::Error] {
        let results = on_ranks(3, |_, comm| {
            let mut opt = b.make();
            opt.set_non_finite_policy(policy);
            opt.shard(comm, GradMode::Full).unwrap();
            let mut v = init(SHAPES);
            step(opt.as_mut(), SHAPES, &mut v, &grads(SHAPES, 1, 0));
            let before = bits(&v);
            let mut g = grads(SHAPES, 2, 0);
            // The last chunk of the 70000-element tensor: the last rank's.
            g[1][69_999] = f32::NAN;
            let mut params: Vec<ParamMut<'_>> = v
                .iter_mut()
                .zip(SHAPES)
                .zip(&g)
                .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
                .collect();
            let res = opt.step_params(&mut params);
            drop(params);
            (res, bits(&v) == before, opt.steps())
        });
        for (r, (res, unchanged, steps)) in results.into_iter().enumerate() {
            assert!(unchanged, "{policy:?}: rank {r} changed its parameters");
            assert_eq!(steps, 1, "{policy:?}: rank {r} counted the step");
            match policy {
                NonFinite::Skip => {
                    assert_eq!(res.unwrap().skipped_non_finite, Some(1), "rank {r}")
                }
                _ => assert_eq!(res, Err(StepError::NonFinite { index: 1 }), "rank {r}"),
            }
        }
    }
}

#[test]
fn a_matrix_block_that_fails_on_its_owner_fails_the_step_on_every_rank() {
    // x @ x needs square matrices: the last tensor, the last rank's, is not.
    let spec = agr_runtime::compile(
        "Square { hyper { lr = 0.1 } step { matrix x = g { x = x @ x; } p = p - lr * x; } }",
    )
    .unwrap();
    let shapes: &[&[usize]] = &[&[40, 40], &[24, 24], &[8, 8], &[2, 3]];
    let results = on_ranks(3, |_, comm| {
        let mut opt = spec.optimizer();
        opt.shard(comm, GradMode::Full).unwrap();
        let mut v = init(shapes);
        let before = bits(&v);
        let g = grads(shapes, 1, 0);
        let mut params: Vec<ParamMut<'_>> = v
            .iter_mut()
            .zip(shapes)
            .zip(&g)
            .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
            .collect();
        let res = opt.step_params(&mut params);
        drop(params);
        (res, bits(&v) == before, opt.steps())
    });
    for (r, (res, unchanged, steps)) in results.into_iter().enumerate() {
        assert!(unchanged, "rank {r} changed its parameters");
        assert_eq!(steps, 0, "rank {r} counted the step");
        match res {
            Err(StepError::Matrix {
                index: 3, message, ..
            }) => {
                // The owner's own message; the others point to it.
                if r == 2 {
                    assert_eq!(message, "`@` of a 2x3 and a 2x3 matrix");
                } else {
                    assert!(message.contains("rank 2"), "rank {r}: {message}");
                }
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

/// One process on `device`: 2 steps, a checkpoint, 2 more steps. Returns
/// the checkpoint, the parameters at it and the parameters at the end.
fn single_run(
    b: &agr_runtime::optim::Builtin,
    device: agr_runtime::Device,
) -> (Vec<u8>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut single = b.make();
    single.set_device(device).unwrap();
    let mut want = init(SHAPES);
    for k in 1..=2 {
        step(single.as_mut(), SHAPES, &mut want, &grads(SHAPES, k, 0));
    }
    let ck = single.save_checkpoint();
    let at_ck = want.clone();
    for k in 3..=4 {
        step(single.as_mut(), SHAPES, &mut want, &grads(SHAPES, k, 0));
    }
    (ck, at_ck, want)
}

#[test]
fn checkpoints_move_between_sharded_and_single_process_runs() {
    for name in ["adamw_agr", "adafactor", "nadam"] {
        let b = agr_runtime::optim::builtin(name).unwrap();
        let (ck, at_ck, want) = single_run(b, agr_runtime::Device::Cpu);
        // Sharded over 3 ranks from the single process's checkpoint (whole
        // state, cut on the first step), then its own gathered checkpoint
        // back into one process.
        let out = on_ranks(3, |_, comm| {
            let mut opt = b.make();
            opt.shard(comm, GradMode::Full).unwrap();
            opt.load_checkpoint(&ck).unwrap();
            let mut v = at_ck.clone();
            step(opt.as_mut(), SHAPES, &mut v, &grads(SHAPES, 3, 0));
            (opt.save_checkpoint(), v)
        });
        let (ck3, mut v) = out.into_iter().next().unwrap();
        let mut resumed = b.make();
        resumed.load_checkpoint(&ck3).unwrap();
        step(resumed.as_mut(), SHAPES, &mut v, &grads(SHAPES, 4, 0));
        assert!(bits(&v) == bits(&want), "{name}: the resumed run differs");
    }
}

#[test]
fn a_plan_owns_whole_chunks_in_order_and_every_element_once() {
    let b = agr_runtime::optim::builtin("adamw_agr").unwrap();
    let desc = b.make().desc();
    for size in 1..=12 {
        let plans: Vec<ShardPlan> = (0..size)
            .map(|r| ShardPlan::new(desc, SHAPES, size, r))
            .collect();
        let ranges = plans[0].ranges().to_vec();
        let total: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(ranges[0].0, 0);
        assert_eq!(ranges[size - 1].1, total);
        for w in ranges.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{size} ranks: {ranges:?} leave a gap");
        }
        for (i, s) in SHAPES.iter().enumerate() {
            let n: usize = s.iter().product();
            let mut covered = 0;
            for (r, p) in plans.iter().enumerate() {
                let (a, b) = p.part(i);
                covered += b - a;
                if a < b {
                    assert_eq!(a % (1 << 15), 0, "rank {r} starts mid-chunk");
                    assert!(b == n || b % (1 << 15) == 0, "rank {r} ends mid-chunk");
                    assert_eq!(p.owner(i, a), r);
                }
            }
            assert_eq!(covered, n);
        }
        // More ranks than chunks (10 here): some own nothing.
        if size > 10 {
            assert!(plans.iter().any(|p| p.counts()[p.rank] == 0));
        }
    }
}

#[test]
fn a_sharded_optimizer_stays_on_the_cpu_and_is_sharded_before_it_steps() {
    let b = agr_runtime::optim::builtin("adamw").unwrap();
    let mut opt = b.make();
    opt.shard(Arc::new(Solo), GradMode::Full).unwrap();
    let e = opt
        .set_device(agr_runtime::Device::EmulatedCuda)
        .unwrap_err();
    assert!(e.to_string().contains("sharded"), "{e}");
    let mut v = init(SHAPES);
    step(opt.as_mut(), SHAPES, &mut v, &grads(SHAPES, 1, 0));
    let mut late = b.make();
    let mut w = init(SHAPES);
    step(late.as_mut(), SHAPES, &mut w, &grads(SHAPES, 1, 0));
    let e = late.shard(Arc::new(Solo), GradMode::Full).unwrap_err();
    assert!(e.to_string().contains("before its first step"), "{e}");
    assert_eq!(bits(&v), bits(&w));
}

#[test]
fn a_collective_with_wrong_counts_is_an_error_before_anything_moves() {
    let solo = Solo;
    let mut recv = vec![7.0f64; 3];
    let e = solo
        .all_gather_f64("a test", &[1.0, 2.0], &[3], &mut recv)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("sending 2 values where this rank's count is 3"),
        "{e}"
    );
    assert_eq!(recv, vec![7.0; 3]);
    let e = solo
        .all_gather_f64("a test", &[1.0], &[1, 1], &mut recv)
        .unwrap_err();
    assert!(e.to_string().contains("2 counts for 1 ranks"), "{e}");
    // Threads: a rank that expects more than another sends fails, naming it.
    let results = on_ranks(2, |r, comm| {
        let send = vec![1.0f32; 4];
        let mut recv = vec![0.0f32; 4 + r];
        comm.all_to_all_f32("a test", &send, &[2, 2], &mut recv, &[2, 2 + r])
            .err()
            .map(|e| e.to_string())
    });
    assert!(results[0].is_none(), "{results:?}");
    assert!(
        results[1]
            .as_deref()
            .is_some_and(|e| e.contains("rank 1 sent 2 values where this rank expected 3")),
        "{results:?}"
    );
}

#[test]
fn on_the_emulated_cuda_device_sharded_steps_are_bit_identical_to_unsharded_ones() {
    use agr_runtime::Device;
    for b in BUILTINS {
        let shapes = shapes_for(b.make().as_ref());
        let mut reference = b.make();
        reference.set_device(Device::EmulatedCuda).unwrap();
        let mut want = init(shapes);
        let mut trajectory = vec![];
        for k in 1..=STEPS {
            step(reference.as_mut(), shapes, &mut want, &grads(shapes, k, 0));
            trajectory.push(bits(&want));
        }
        for n in [1, 3, 4] {
            let per_rank = on_ranks(n, |_, comm| {
                let mut opt = b.make();
                opt.set_device(Device::EmulatedCuda).unwrap();
                opt.shard(comm, GradMode::Full).unwrap();
                let mut v = init(shapes);
                let mut got = vec![];
                for k in 1..=STEPS {
                    step(opt.as_mut(), shapes, &mut v, &grads(shapes, k, 0));
                    got.push(bits(&v));
                }
                (got, opt.save_checkpoint())
            });
            for (r, (got, ck)) in per_rank.iter().enumerate() {
                assert!(
                    got == &trajectory,
                    "{} on the emulated device over {n} ranks: rank {r}'s parameters differ from one process's",
                    b.name
                );
                let mut loaded = b.make();
                loaded.load_checkpoint(ck).unwrap();
                for i in 0..shapes.len() {
                    for s in loaded.desc().states {
                        let (a, w) = (
                            loaded.state_to_host(i, s.name).unwrap(),
                            reference.state_to_host(i, s.name).unwrap(),
                        );
                        assert!(
                            a.iter().map(|x| x.to_bits()).eq(w.iter().map(|x| x.to_bits())),
                            "{} on the emulated device over {n} ranks: rank {r}'s checkpoint: `{}` of #{i}",
                            b.name,
                            s.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn on_the_emulated_device_a_reduce_scatter_is_an_all_reduce_in_rank_order_and_nothing_moves() {
    use agr_runtime::Device;
    for name in ["adamw_agr", "adafactor"] {
        let b = agr_runtime::optim::builtin(name).unwrap();
        let n = 3;
        let local = |r: usize, k: u64| grads(SHAPES, k, r as u64 + 1);
        let mut reference = b.make();
        reference.set_device(Device::EmulatedCuda).unwrap();
        let mut want = init(SHAPES);
        for k in 1..=STEPS {
            let mut g = local(0, k);
            for r in 1..n {
                for (a, b) in g.iter_mut().zip(local(r, k)) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                }
            }
            step(reference.as_mut(), SHAPES, &mut want, &g);
        }
        let got = on_ranks(n, |r, comm| {
            let mut opt = b.make();
            opt.set_device(Device::EmulatedCuda).unwrap();
            opt.shard(comm, GradMode::ReduceScatter { mean: false })
                .unwrap();
            let mut v = init(SHAPES);
            for k in 1..=STEPS {
                step(opt.as_mut(), SHAPES, &mut v, &local(r, k));
            }
            let moved = opt.set_device(Device::Cpu).unwrap_err().to_string();
            (bits(&v), moved)
        });
        for (r, (g, moved)) in got.iter().enumerate() {
            assert!(g == &bits(&want), "{name}: rank {r} differs");
            assert!(moved.contains("sharded"), "{moved}");
        }
    }
}

#[test]
fn a_checkpoint_loaded_before_the_first_sharded_step_on_a_device_is_cut_to_each_rank() {
    use agr_runtime::Device;
    for name in ["adamw_agr", "adafactor"] {
        let b = agr_runtime::optim::builtin(name).unwrap();
        let (ck, at_ck, want) = single_run(b, Device::EmulatedCuda);
        let got = on_ranks(3, |_, comm| {
            let mut opt = b.make();
            opt.set_device(Device::EmulatedCuda).unwrap();
            opt.shard(comm, GradMode::Full).unwrap();
            opt.load_checkpoint(&ck).unwrap();
            let mut v = at_ck.clone();
            for k in 3..=4 {
                step(opt.as_mut(), SHAPES, &mut v, &grads(SHAPES, k, 0));
            }
            bits(&v)
        });
        for (r, g) in got.iter().enumerate() {
            assert!(
                g == &bits(&want),
                "{name}: rank {r} differs from the resumed single run"
            );
        }
    }
}
