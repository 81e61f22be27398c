agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        state { m = 0 }
        step { p = p - lr * g; }
    }
}

fn main() {}
