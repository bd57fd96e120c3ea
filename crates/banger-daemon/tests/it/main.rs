//! bangerd's integration tests: the real daemon binary, the real CLI, the fake Firecracker.

mod dns;
mod engine_faults;
mod images;
mod kernel_build;
mod kernels;
mod leaks;
mod lifecycle;
mod oci;
mod protocol;
mod real_guest;
mod recovery;
mod workspace;
