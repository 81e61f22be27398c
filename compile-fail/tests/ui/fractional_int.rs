agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1, warmup: int = 2.5 }
        step { p = p - lr * g; }
    }
}

fn main() {}
