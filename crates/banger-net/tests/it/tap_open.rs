//! Proves a VMM can attach to banger's taps: opens them the way Firecracker and QEMU do
//! (TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) as the owner uid, in the tap's namespace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_net::{BridgeName, NetOps, TapName};

use crate::common::{NetNs, ip};
use crate::skip_unless_capable;

/// A private tun device node (same driver as /dev/net/tun), world-accessible: this host's
/// /dev/net/tun may be 0600, and the test must not change the host's device permissions.
fn private_tun_node(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("tun");
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no memory-safety preconditions.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    path
}

/// In a child process: enter `netns`, become `uid` (unless 0), open `tun` and TUNSETIFF `tap`.
/// The result of those steps comes back as spawn's result.
fn open_tap_as(netns: &str, tap: &str, uid: u32, tun: &Path) -> io::Result<()> {
    let ns = File::open(format!("/run/netns/{netns}"))?;
    let ns_fd = ns.as_raw_fd();
    let tun = CString::new(tun.as_os_str().as_bytes())?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(tap.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // As bytes: ifreq holds pointers in its union, so it cannot move into the Sync closure.
    #[repr(C, align(8))]
    struct Raw([u8; std::mem::size_of::<libc::ifreq>()]);
    // SAFETY: ifreq is plain old data of exactly this size.
    let mut raw: Raw = unsafe { std::mem::transmute(ifr) };

    let mut cmd = Command::new("/bin/true");
    // SAFETY: the closure runs between fork and exec and only makes raw system calls on values
    // prepared above; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(rc)
                }
            };
            check(libc::setns(ns_fd, libc::CLONE_NEWNET))?;
            if uid != 0 {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(uid, uid, uid))?;
                check(libc::setresuid(uid, uid, uid))?;
            }
            let fd = check(libc::open(tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC))?;
            check(libc::ioctl(fd, libc::TUNSETIFF, raw.0.as_mut_ptr()))?;
            Ok(())
        });
    }
    let status = cmd.status()?;
    assert!(status.success(), "/bin/true failed: {status}");
    Ok(())
}

#[tokio::test]
async fn the_owner_can_attach_like_a_vmm() {
    skip_unless_capable!(false);
    let ns = NetNs::new("open");
    let ops = ns.ops();
    let br = BridgeName::default();
    ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    let tap = TapName::pool(7);
    ops.create_tap(&tap, &br, Some(4242)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tun = private_tun_node(dir.path());

    open_tap_as(&ns.name, tap.as_str(), 4242, &tun).expect("the owner opens the tap");
    // Twice: the tap is persistent and free again once the first VMM is gone.
    open_tap_as(&ns.name, tap.as_str(), 4242, &tun).expect("the owner reopens the tap");
    open_tap_as(&ns.name, tap.as_str(), 0, &tun).expect("root opens the tap");

    let e = open_tap_as(&ns.name, tap.as_str(), 4243, &tun).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EPERM),
        "another uid must be refused: {e}"
    );

    // Still attached to the bridge after the VMM-style opens.
    assert_eq!(ns.link(tap.as_str()).unwrap()["master"], "br-banger");
}
