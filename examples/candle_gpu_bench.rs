//! candle-nn's AdamW against agr's optimizers stepping the same candle
//! variables on a GPU, in place on candle's stream (run by
//! `scripts/gpu-check.sh run`; built with the `candle-cuda` feature). Each
//! agr step is timed alternately with candle-nn's AdamW in the same run, on
//! the 150-tensor GPT-like model and one tensor of 2^24 parameters; prints
//! `bench-candle-gpu <optimizer> <workload> median_ms= candle_nn_adamw_ms=
//! ratio=` lines (below 1: faster than candle-nn) and the steps per second.
//! Without a GPU it says so and exits with status 2.

use agr::bench::{candle_adamw_on, candle_adapter_on, interleaved, workloads};

fn main() {
    let dev = match candle_core::Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("candle_gpu_bench: no CUDA device: {e}");
            std::process::exit(2);
        }
    };
    let iters = 25;
    for w in workloads() {
        for name in ["adamw", "adamw_agr", "adan_agr"] {
            let ours = candle_adapter_on(name, &w, &dev);
            let theirs = candle_adamw_on(&w, &dev);
            match ours.and_then(|a| theirs.and_then(|b| interleaved(iters, a, b))) {
                Ok((ms, candle_ms)) => println!(
                    "bench-candle-gpu {name} {} median_ms={ms:.3} candle_nn_adamw_ms={candle_ms:.3} ratio={:.3} steps_per_s={:.0} candle_nn_steps_per_s={:.0}",
                    w.name,
                    ms / candle_ms,
                    1e3 / ms,
                    1e3 / candle_ms
                ),
                Err(e) => {
                    eprintln!("candle_gpu_bench: {name} on {}: {e}", w.name);
                    std::process::exit(1);
                }
            }
        }
    }
}
