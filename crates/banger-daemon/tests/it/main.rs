//! bangerd's integration tests: the real daemon binary, the real CLI, the fake Firecracker.

mod bridge_cidr;
mod concurrency;
mod crash;
mod damaged_state;
mod dns;
mod edge_inputs;
mod engine_faults;
mod full_disk;
mod fuzz;
mod guest_edges;
mod guest_net;
mod images;
mod interrupt;
mod jailer;
mod kernel_build;
mod kernels;
mod leaks;
mod lifecycle;
mod oci;
mod own_dirs;
mod protocol;
mod real_guest;
mod recovery;
mod slow_vmm;
mod unprivileged;
mod workspace;
