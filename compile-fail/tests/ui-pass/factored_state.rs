//! A spec with reduced states, reductions over one dimension and a
//! per-tensor state compiles, and the optimizer it defines steps: a
//! factored RMSProp that counts its steps per tensor.

agr_runtime::optimizer! {
    /// RMSProp with its second moment factored into row and column means.
    FactoredRms {
        hyper { lr = 0.1 where lr > 0 }
        state { vr: reduced(-1) = 0, vc: reduced(-2) = 0, steps: per_tensor = 0 }
        step {
            steps = steps + 1;
            vr = mean(g * g, -1);
            vc = mean(g * g, -2);
            p = p - lr * g / sqrt(vr * vc / mean(vr, -2));
        }
    }
}

fn main() {
    let mut opt = FactoredRms::with_config(FactoredRmsConfig::default()).unwrap();
    // g = [[1, 2], [2, 4]] (rank one): the factored estimate is g² exactly,
    // so every element moves by lr.
    let mut w = vec![1.0f32; 4];
    let g = vec![1.0f32, 2.0, 2.0, 4.0];
    opt.step_params(&mut [agr_runtime::ParamMut::new(&mut w, Some(&g), &[2, 2])]).unwrap();
    for x in &w {
        assert!((x - 0.9).abs() < 1e-6, "{w:?}");
    }
    assert_eq!(opt.state(0, "vr").unwrap(), &[2.5f32, 10.0][..]);
    assert_eq!(opt.state(0, "vc").unwrap(), &[2.5f32, 10.0][..]);
    assert_eq!(opt.state(0, "steps").unwrap(), &[1.0f32][..]);
    // Reduced and per-tensor states have CUDA kernels too.
    let desc = <FactoredRmsKernel as agr_runtime::StaticKernel>::DESC;
    assert!(desc.cpu_only.is_none() && desc.cuda_kernels.iter().any(|k| k.ends_with("_tensor_states")));
}
