//! Compile-time behaviour of `#[idempotent]`: what must compile and what must
//! fail, with the error text a user sees (`tests/ui/**/*.stderr`).
//!
//! rustc's error text lists the store types that exist, which depends on the
//! cargo features; the expected texts are those of the test script's build
//! (`--all-features`), so this suite runs with every store feature on. The
//! error for a store whose feature is off is checked by `ui_features_off.rs`,
//! which the test script runs with default features.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.pass("tests/ui/postgres/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
