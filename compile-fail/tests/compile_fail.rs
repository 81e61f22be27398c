//! Every mistake in a spec is a compile error at the offending token with a
//! sentence saying what to do (tests/ui/*.stderr), and a valid spec compiles
//! and runs (tests/ui-pass).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
