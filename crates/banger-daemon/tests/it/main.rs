//! bangerd's integration tests: the real daemon binary, the real CLI, the fake Firecracker.

mod concurrency;
mod crash;
mod dns;
mod engine_faults;
mod full_disk;
mod fuzz;
mod images;
mod jailer;
mod kernel_build;
mod kernels;
mod leaks;
mod lifecycle;
mod nested;
mod oci;
mod protocol;
mod real_guest;
mod recovery;
mod unprivileged;
mod workspace;
