agr_runtime::optimizer! {
    Bad {
        hyper { lr = 0.1 }
        step {
            p = p - lr * g / sqrt(mean(g * g, 1) + 1e-8);
        }
    }
}

fn main() {}
