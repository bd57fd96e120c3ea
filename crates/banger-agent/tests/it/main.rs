//! Integration tests for banger-agent: real boots under QEMU (TCG) with banger's initramfs.
//!
//! They need `qemu-system-x86_64`, `mkfs.ext4`, a kernel dir (`BANGER_TEST_KERNEL_DIR`, holding
//! `vmlinux` or `vmlinuz` and `modules/` with `load-order`), a static busybox
//! (`BANGER_TEST_BUSYBOX`, or `busybox` in the kernel dir) and the static agent; each missing
//! piece makes the test print `SKIP: <reason>` and pass. `sshd` drives the built-in ssh server
//! with the real OpenSSH client on the host (needs only `ssh` and `ssh-keygen`).

mod agent_init;
mod boot;
mod sshd;
mod support;
