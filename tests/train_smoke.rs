//! Smoke test of a real training run: softmax regression (64 → 10) on the
//! first 500 shipped handwritten digits, full batch, stepped by the built-in
//! AdamW-AGR. The loss must fall by at least 30% in 20 steps and the weights
//! must stay finite.

use std::io::Read;

use agr_runtime::optim::{AdamWAgr, AdamWAgrConfig};
use agr_runtime::ParamMut;

const IN: usize = 64;
const CLASSES: usize = 10;
const N: usize = 500;

/// The first `N` images (pixels scaled to [0, 1]) and labels.
fn digits() -> (Vec<f32>, Vec<usize>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz");
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("cannot gunzip {path}: {e}"));
    let (mut x, mut y) = (vec![], vec![]);
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(N) {
        let v: Vec<f32> = line.split(',').map(|s| s.trim().parse().unwrap()).collect();
        assert_eq!(v.len(), IN + 1, "a line of {path} has {} values", v.len());
        x.extend(v[..IN].iter().map(|p| p / 16.0));
        y.push(v[IN] as usize);
    }
    assert_eq!(y.len(), N, "{path} has fewer than {N} images");
    (x, y)
}

/// Mean cross-entropy of `x W^T + b`, and its gradients with respect to
/// `w` [CLASSES, IN] and `b` [CLASSES].
fn loss_and_grad(x: &[f32], y: &[usize], w: &[f32], b: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let (mut gw, mut gb) = (vec![0.0f32; CLASSES * IN], vec![0.0f32; CLASSES]);
    let inv_n = 1.0 / y.len() as f32;
    let mut loss = 0.0f64;
    for (xi, &label) in x.chunks(IN).zip(y) {
        let z: Vec<f32> = (0..CLASSES)
            .map(|k| {
                b[k] + w[k * IN..(k + 1) * IN]
                    .iter()
                    .zip(xi)
                    .map(|(w, x)| w * x)
                    .sum::<f32>()
            })
            .collect();
        let zmax = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = zmax + z.iter().map(|v| (v - zmax).exp()).sum::<f32>().ln();
        loss += f64::from(lse - z[label]);
        for k in 0..CLASSES {
            let dz = ((z[k] - lse).exp() - f32::from(u8::from(k == label))) * inv_n;
            gb[k] += dz;
            for (g, xv) in gw[k * IN..(k + 1) * IN].iter_mut().zip(xi) {
                *g += dz * xv;
            }
        }
    }
    ((loss / y.len() as f64) as f32, gw, gb)
}

#[test]
fn adamw_agr_trains_softmax_regression_on_digits() {
    let (x, y) = digits();
    let mut w = vec![0.0f32; CLASSES * IN];
    let mut b = vec![0.0f32; CLASSES];
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default().with_lr(2e-2)).unwrap();
    let mut losses = vec![];
    for _ in 0..20 {
        let (loss, gw, gb) = loss_and_grad(&x, &y, &w, &b);
        losses.push(loss);
        let report = opt
            .step_params(&mut [
                ParamMut::new(&mut w, Some(&gw), &[CLASSES, IN]),
                ParamMut::new(&mut b, Some(&gb), &[CLASSES]),
            ])
            .unwrap();
        assert_eq!(report.skipped_non_finite, None);
    }
    let (last, _, _) = loss_and_grad(&x, &y, &w, &b);
    let first = losses[0];
    assert!(
        (first - (CLASSES as f32).ln()).abs() < 1e-4,
        "zero weights give loss ln 10, got {first}"
    );
    assert!(last.is_finite(), "final loss {last} (losses {losses:?})");
    assert!(
        w.iter().chain(&b).all(|v| v.is_finite()),
        "non-finite weights"
    );
    assert!(
        last <= 0.7 * first,
        "loss fell from {first} to {last}, less than 30% (losses {losses:?})"
    );
}
