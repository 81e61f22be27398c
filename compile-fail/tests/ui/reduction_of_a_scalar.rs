agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 }
        step { p = p - sum(lr) * g; }
    }
}

fn main() {}
