agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step { p = p - lr * clamp(g, 1); }
    }
}

fn main() {}
