//! banger's root helper: the only process of banger that runs as root.
//!
//! `bangerd` runs as an unprivileged owner user. Whatever it needs root for goes through this
//! crate's [`HelperRequest`], a closed enum of typed operations served over a Unix socket:
//! bridge, taps and NAT rules (through banger-net's [`banger_net::NetOps`]), opening a tap for
//! an unprivileged VMM (its descriptor passed back with `SCM_RIGHTS`), loop devices and
//! device-mapper snapshots (`losetup`/`dmsetup`), and building the default Debian image
//! (`mmdebstrap --format=tar`). There is no generic "run this" op and no shell anywhere: every
//! program runs as argv through [`banger_sys::CommandRunner`].
//!
//! The trust model, in the order a request meets it:
//! 1. the socket file is the owner's, mode 0600 ([`server::bind`]);
//! 2. the peer's uid from `SO_PEERCRED` must be root or the configured owner, checked before
//!    anything is read ([`server`]);
//! 3. the line must decode as exactly one known op with exactly its fields ([`protocol`]);
//! 4. every input is checked against the fixed [`HelperConfig`]: the configured bridge and
//!    network only, banger's tap and device names only, paths under the state dir reached
//!    without a symlink at any level ([`validate`], [`safepath`]);
//! 5. only then does anything run ([`exec`]); each op is logged with the caller's op_id.
//!
//! The daemon uses [`HelperClient`], which also implements [`banger_net::NetOps`]. See
//! `docs/helper.md` for the op table and what is deliberately not an op.

pub mod client;
pub mod config;
pub mod error;
pub mod exec;
pub mod fdpass;
pub mod host;
pub mod protocol;
pub mod safepath;
pub mod server;
pub mod validate;

pub use client::{DEFAULT_SOCKET, DebootstrapOutput, HelperClient};
pub use config::{DEFAULT_CONFIG, HelperConfig};
pub use error::{ErrorCode, HelperError};
pub use exec::{Helper, Outcome};
pub use host::{FakeHost, HostCall, HostOps, LoopBacking, RealHost};
pub use protocol::{HelperRequest, MAX_LINE, PROTOCOL_VERSION, Reply};
pub use server::{DEFAULT_SOCKET_MODE, ServeOptions, bind, serve};
