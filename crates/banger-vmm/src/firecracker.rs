//! Firecracker backend (to be written).
