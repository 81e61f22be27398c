//! A spec with a matrix block compiles, and the optimizer it defines steps.

agr_runtime::optimizer! {
    /// One cubic step: x ← x xᵀ x, on the short side.
    Cubic {
        hyper { lr = 0.1 where lr > 0, n: int = 1 where n >= 0 }
        step {
            matrix x = g {
                if rows > cols { x = transpose(x); }
                repeat n { x = x @ transpose(x) @ x; }
                if rows > cols { x = transpose(x); }
            }
            p = p - lr * x;
        }
    }
}

fn main() {
    let mut opt = Cubic::with_config(CubicConfig::default()).unwrap();
    // g = [[1, 0], [0, 2], [0, 0]] (3x2): g gᵀ g = diag(1, 8) on the short side.
    let mut w = vec![1.0f32; 6];
    let g = vec![1.0f32, 0.0, 0.0, 2.0, 0.0, 0.0];
    let r = opt.step_params(&mut [agr_runtime::ParamMut::new(&mut w, Some(&g), &[3, 2])]).unwrap();
    assert_eq!(r.updated, 1);
    let want = [0.9f32, 1.0, 1.0, 0.2, 1.0, 1.0];
    for (x, y) in w.iter().zip(want) {
        assert!((x - y).abs() < 1e-6, "{w:?}");
    }
    assert_eq!(<CubicKernel as agr_runtime::StaticKernel>::DESC.matrices.len(), 1);
}
