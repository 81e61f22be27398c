agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step { p = p - lr * sqr(g); }
    }
}

fn main() {}
