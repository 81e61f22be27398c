agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1, type = 1 }
        step { p = p - lr * g; }
    }
}

fn main() {}
