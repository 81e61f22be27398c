agr_runtime::optimizer! {
    Deep {
        hyper { lr = 0.1 }
        step { p = p - lr * agr(agr(agr(agr(g)))); }
    }
}

fn main() {}
