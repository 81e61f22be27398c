agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step {
            p -= lr * g;
        }
    }
}

fn main() {}
