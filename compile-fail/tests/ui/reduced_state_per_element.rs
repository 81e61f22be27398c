agr_runtime::optimizer! {
    Bad {
        hyper { lr = 0.1 }
        state { vr: reduced(-1) = 0 }
        step {
            vr = 0.9 * vr + 0.1 * g * g;
            p = p - lr * g / sqrt(vr + 1e-8);
        }
    }
}

fn main() {}
