agr_runtime::optimizer! {
    Bad {
        hyper { lr = 0.1, n: int = 2 }
        step {
            matrix x = g {
                repeat n {
                    x = x @ transpose(x) @ x - p;
                }
            }
            p = p - lr * x;
        }
    }
}

fn main() {}
