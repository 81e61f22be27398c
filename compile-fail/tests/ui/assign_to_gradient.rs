agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step {
            g = g * 2;
            p = p - lr * g;
        }
    }
}

fn main() {}
