agr_runtime::optimizer! {
    Bad {
        hyper { lr = 0.1 }
        step {
            p = p - lr * g @ g;
        }
    }
}

fn main() {}
