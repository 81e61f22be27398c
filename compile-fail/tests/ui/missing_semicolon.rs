agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        state { m = 0 }
        step {
            m = 0.9 * m + g
            p = p - lr * m;
        }
    }
}

fn main() {}
