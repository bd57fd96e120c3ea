//! bangerd's integration tests: the real daemon binary, the real CLI, the fake Firecracker.

mod engine_faults;
mod images;
mod lifecycle;
mod protocol;
mod real_guest;
mod recovery;
