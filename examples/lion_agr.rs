//! A new AGR variant in a few lines: Lion with Ψ applied to the gradient,
//! declared here and used at once on a least-squares problem.
//!
//! Run with `cargo run --release --example lion_agr`.

use agr_runtime::ParamMut;

agr_runtime::optimizer! {
    /// Lion (Chen et al. 2023) with the AGR operator Ψ on the gradient.
    LionAgr {
        hyper {
            lr = 1e-3 where lr > 0,
            beta1 = 0.9 where 0 <= beta1 < 1,
            beta2 = 0.99 where 0 <= beta2 < 1,
            weight_decay = 0.0 where weight_decay >= 0,
        }
        state { m = 0 }
        step {
            let gr = agr(g);
            p = p * (1 - lr * weight_decay) - lr * sign(beta1 * m + (1 - beta1) * gr);
            m = beta2 * m + (1 - beta2) * gr;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Fit w in y = X w: 256 samples, 16 features, a known w*.
    let (n, d) = (256usize, 16usize);
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let w_true: Vec<f32> = (0..d).map(|j| (j as f32 - 8.0) / 4.0).collect();
    let y: Vec<f32> = (0..n)
        .map(|r| (0..d).map(|j| x[r * d + j] * w_true[j]).sum())
        .collect();

    let mut w = vec![0.0f32; d];
    let mut opt = LionAgr::with_config(LionAgrConfig::default().with_lr(3e-3))?;
    let loss_and_grad = |w: &[f32]| {
        let mut g = vec![0.0f32; d];
        let mut loss = 0.0f32;
        for r in 0..n {
            let e: f32 = (0..d).map(|j| x[r * d + j] * w[j]).sum::<f32>() - y[r];
            loss += e * e / n as f32;
            for j in 0..d {
                g[j] += 2.0 * e * x[r * d + j] / n as f32;
            }
        }
        (loss, g)
    };
    let (first, _) = loss_and_grad(&w);
    for step in 1..=1500 {
        let (loss, g) = loss_and_grad(&w);
        if step % 300 == 0 {
            println!("step {step:>4}  loss {loss:.5}");
        }
        opt.step_params(&mut [ParamMut::new(&mut w, Some(&g), &[d])])?;
    }
    let (last, _) = loss_and_grad(&w);
    println!("loss {first:.4} -> {last:.6}");
    println!("\nThe spec, normalised:\n{}", LionAgr::SPEC);
    if last >= first * 0.01 {
        return Err(format!("LionAgr did not converge: loss {first} -> {last}").into());
    }
    Ok(())
}
