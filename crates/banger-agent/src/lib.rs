//! `banger-agent`: PID 1 of banger's initramfs, as a library so its parts (above all the
//! built-in ssh server) can be tested on the host without being PID 1.
//!
//! It turns a generic image into one particular VM without ever writing the shared image:
//! mount the pseudo filesystems, load the virtio and overlay modules, find the config disk and
//! the root/work disks by content (magic, ext4 UUID), assemble the root (overlay of the read-only
//! image and a per-VM upper disk, or a direct per-VM copy), mount and seed the work disk at
//! `/root`, configure the network, `switch_root`, write the VM identity (hostname, machine id,
//! ssh keys, resolv.conf, extra files), and then, by [`banger_guest::InitMode`]:
//!
//! - `image`: exec the image's own init (after forking the built-in ssh server when
//!   [`banger_guest::SshServer::Agent`] is asked for);
//! - `agent`: stay PID 1 ([`pid1`]): reap orphans, run the ssh service (the built-in server or
//!   the image's sshd), and turn shutdown requests into a clean power-off.
//!
//! The built-in ssh server ([`sshd`]) runs in its own forked process with a current-thread
//! tokio runtime; PID 1 itself stays a small synchronous program.

pub mod console;
pub mod disks;
pub mod error;
pub mod identity;
pub mod modules;
pub mod nested;
pub mod net;
pub mod pid1;
pub mod root;
pub mod seed;
pub mod services;
pub mod sshd;
pub mod switch;
pub mod sys;
