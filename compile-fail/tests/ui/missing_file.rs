agr_runtime::optimizer! { file = "specs/does_not_exist.agr" }

fn main() {}
