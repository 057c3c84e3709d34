//! Compile-time behaviour of `#[idempotent]`: what must compile and what must
//! fail, with the error text a user sees (`tests/ui/**/*.stderr`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
