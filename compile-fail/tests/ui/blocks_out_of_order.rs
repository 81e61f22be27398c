agr_runtime::optimizer! {
    Sgd {
        state { m = 0 }
        hyper { lr = 0.1 }
        step { m = g; p = p - lr * m; }
    }
}

fn main() {}
