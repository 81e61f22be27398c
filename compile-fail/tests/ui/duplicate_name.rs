agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1, momentum = 0.9 }
        state { momentum = 0 }
        step {
            momentum = 0.9 * momentum + g;
            p = p - lr * momentum;
        }
    }
}

fn main() {}
