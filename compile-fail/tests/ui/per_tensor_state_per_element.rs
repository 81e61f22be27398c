agr_runtime::optimizer! {
    Bad {
        hyper { lr = 0.1 }
        state { scale: per_tensor = 1 }
        step {
            scale = 0.9 * scale + 0.1 * abs(g);
            p = p - lr * scale * g;
        }
    }
}

fn main() {}
