agr_runtime::optimizer! {
    sgd {
        hyper { lr = 0.1 }
        step { p = p - lr * g; }
    }
}

fn main() {}
