agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 where lr > 0, beta1 = 0.9 }
        step { p = p - lr * bata1 * g; }
    }
}

fn main() {}
