//! Test tools for handler and store authors (feature `testing`).
pub mod conformance;
