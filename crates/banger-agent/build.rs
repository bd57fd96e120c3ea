//! Drops DWARF from the release agent binary at link time.
//!
//! The agent is copied into every VM's initramfs, which lives in guest RAM, and with the agent
//! as PID 1 (or the built-in ssh server running) that file stays pinned there for the VM's whole
//! life. The workspace's `debug = "line-tables-only"` would make it ~31 MB instead of ~5 MB
//! (the ssh server's crypto crates carry a lot of line tables). Symbols are kept, so a panic's
//! backtrace still names functions. Only the `banger-agent` binary is affected (not the library
//! or the tests), and only in the release profile.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-debug");
    }
}
