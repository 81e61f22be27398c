agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step { p = p - lr * (g > 0); }
    }
}

fn main() {}
