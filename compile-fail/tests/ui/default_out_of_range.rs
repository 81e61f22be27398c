agr_runtime::optimizer! {
    Sgd {
        hyper { lr = 0.1 where lr > 0, beta = 1.5 where 0 <= beta < 1 }
        state { m = 0 }
        step { m = beta * m + g; p = p - lr * m; }
    }
}

fn main() {}
