agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step {
            if lr { p = p - lr * g; } else { p = p; }
        }
    }
}

fn main() {}
