//! A valid inline spec compiles, and the optimizer it defines steps.

agr_runtime::optimizer! {
    /// SGD with momentum and Ψ.
    SgdAgr {
        hyper { lr = 0.1 where lr > 0, momentum = 0.9 where 0 <= momentum < 1 }
        state { b = 0 }
        step {
            b = momentum * b + agr(g);
            p = p - lr * b;
        }
    }
}

fn main() {
    let mut opt = SgdAgr::with_config(SgdAgrConfig::default()).unwrap();
    let mut w = vec![1.0f32, 2.0, 3.0];
    let g = vec![1.0f32, 0.0, -1.0];
    let r = opt.step_params(&mut [agr_runtime::ParamMut::new(&mut w, Some(&g), &[3])]).unwrap();
    assert_eq!(r.updated, 1);
    // Ψ(g) = g - g|g|/Σ|g| = [0.5, 0, -0.5]
    assert_eq!(w, vec![0.95, 2.0, 3.05]);
    assert!(SgdAgr::SPEC.contains("b = momentum * b + agr(g);"));
}
