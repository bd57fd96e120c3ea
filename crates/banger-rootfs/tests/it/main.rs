//! Integration tests: real layers in, real ext4 out, checked with e2fsprogs.

mod fuzz;
mod image;
mod malicious;
mod perf;
mod support;
