//! The error a user gets for a built-in store whose cargo feature is off.
//! Runs with default features (`cargo test --test ui_features_off`, in the
//! test script): `postgres` is off there.
#![cfg(not(feature = "postgres"))]

#[test]
fn store_feature_off() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/features_off/*.rs");
}
