//! Thin wrappers over the syscalls the agent needs (mount, finit_module, reboot), each turning
//! errno into an [`AgentError`] that names its input, and the mount table for shutdown.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::AgentError;

pub fn cstr(p: &Path) -> CString {
    // Paths we build never hold NUL; a NUL would come from a corrupt config, which validation
    // already refused.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| c"/nonexistent".to_owned())
}

/// mount(2). `data` is the filesystem's option string.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), AgentError> {
    let err = |error| AgentError::Mount {
        source_dev: source.to_string(),
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        error,
    };
    let c_source =
        CString::new(source).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let c_fstype =
        CString::new(fstype).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let c_data = data
        .map(CString::new)
        .transpose()
        .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let c_target = cstr(target);
    // SAFETY: every pointer is a valid NUL-terminated string (or null for absent data) that
    // outlives the call.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            c_data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Moves the mount at `from` to `to` (MS_MOVE).
pub fn move_mount(from: &Path, to: &Path) -> Result<(), AgentError> {
    let from_s = from.to_string_lossy();
    mount(&from_s, to, "none", libc::MS_MOVE, None)
}

pub fn mkdir_p(p: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(p).map_err(AgentError::io("creating directory", p))
}

/// The pseudo filesystems the agent and the image's init need.
pub fn mount_early() -> Result<(), AgentError> {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, libc::c_ulong, Option<&str>); 4] = [
        ("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755")),
        ("proc", "/proc", nosuid_nodev | libc::MS_NOEXEC, None),
        ("sysfs", "/sys", nosuid_nodev | libc::MS_NOEXEC, None),
        ("tmpfs", "/run", nosuid_nodev, Some("mode=0755")),
    ];
    for (fs, target, flags, data) in mounts {
        let target = Path::new(target);
        mkdir_p(target)?;
        match mount(fs, target, fs, flags, data) {
            // A kernel built with CONFIG_DEVTMPFS_MOUNT may have mounted /dev already.
            Err(AgentError::Mount { error, .. }) if error.raw_os_error() == Some(libc::EBUSY) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Loads the kernel module in `file` (finit_module). `Ok(false)` if it was already loaded.
pub fn finit_module(file: &Path) -> Result<bool, std::io::Error> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file)?;
    // SAFETY: finit_module reads the module from the fd we own; the params string is a static
    // empty C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Ends the VM so its VMM exits. With ACPI (QEMU microvm) that is a power off; without it the
/// kernel could only halt, leaving the VMM running, so restart instead: Firecracker exits on a
/// guest reboot and banger runs QEMU with `-no-reboot`.
/// Restarts the machine, which ends the VMM (Firecracker always; QEMU under `-no-reboot`).
pub fn reboot() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; we are PID 1 and have nothing left to do.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

pub fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let cmd = if Path::new("/sys/firmware/acpi").exists() {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: reboot(2) with a valid command; we are PID 1 and have nothing left to do.
    unsafe { libc::reboot(cmd) };
    // SAFETY: as above; reached only if the first request failed.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Sets the kernel hostname, so the guest is named right even under an init that does not read
/// /etc/hostname.
pub fn set_hostname(name: &str) -> Result<(), AgentError> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(AgentError::Io {
            what: "setting hostname",
            path: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub target: String,
    pub fstype: String,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mounts field.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                let v = d.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mounts` text, in mount order.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some(MountEntry {
                source: unescape_mount_field(f.next()?),
                target: unescape_mount_field(f.next()?),
                fstype: f.next()?.to_string(),
            })
        })
        .collect()
}

/// The current mounts (empty if /proc is not mounted).
pub fn mounts() -> Vec<MountEntry> {
    parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default())
}

fn is_mounted(target: &str) -> bool {
    mounts().iter().any(|m| m.target == target)
}

/// Mounts devpts on /dev/pts unless something already did: ptys for ssh sessions. `gid=5` is
/// the `tty` group of Debian, Alpine and most others; `ptmxmode=0666` makes the devtmpfs
/// `/dev/ptmx` node usable.
pub fn ensure_devpts() -> Result<(), AgentError> {
    if is_mounted("/dev/pts") {
        return Ok(());
    }
    let target = Path::new("/dev/pts");
    mkdir_p(target)?;
    mount(
        "devpts",
        target,
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    )
}

/// What a container runtime (or an init system) provides and programs expect, for when the
/// agent stays PID 1: devpts, `/dev/shm`, and the `/dev/fd`, `/dev/std*` links (devtmpfs has
/// none of them; bash's process substitution needs `/dev/fd`).
pub fn mount_agent_init_fs() -> Result<Vec<&'static str>, AgentError> {
    let mut done = Vec::new();
    if !is_mounted("/dev/pts") {
        ensure_devpts()?;
        done.push("/dev/pts");
    }
    if !is_mounted("/dev/shm") {
        let shm = Path::new("/dev/shm");
        mkdir_p(shm)?;
        mount(
            "shm",
            shm,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        )?;
        done.push("/dev/shm");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            std::os::unix::fs::symlink(target, link)
                .map_err(AgentError::io("creating symlink", link))?;
        }
    }
    done.push("/dev/fd");
    Ok(done)
}

/// Makes Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) send SIGINT to PID 1 instead of an
/// immediate reboot without sync, so the agent can shut down cleanly.
pub fn disable_ctrl_alt_del() -> Result<(), AgentError> {
    // SAFETY: reboot(2) with RB_DISABLE_CAD only changes how the kernel treats the key combo.
    if unsafe { libc::reboot(libc::RB_DISABLE_CAD) } != 0 {
        return Err(AgentError::io("reboot(RB_DISABLE_CAD)", "ctrl-alt-del")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Filesystems that hold nothing to flush; shutdown leaves them alone.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "ramfs",
    "rootfs",
    "mqueue",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "binfmt_misc",
    "autofs",
    "efivarfs",
];

/// The mounts shutdown acts on, innermost first (pseudo filesystems are skipped).
pub fn teardown_order(mounts: &[MountEntry]) -> Vec<&MountEntry> {
    mounts
        .iter()
        .rev()
        .filter(|m| !PSEUDO_FS.contains(&m.fstype.as_str()))
        .collect()
}

/// Remounts every disk-backed filesystem read-only and then unmounts it (except `/`), so ext4
/// journals are clean and the overlay's upper disk is fully written before power-off.
/// Read-only first: the overlay's upper ext4 stays in use by the overlay even once its own
/// mount point is gone, so only a remount (after the overlay went read-only) makes it clean.
/// Best effort: returns one note per mount.
pub fn teardown_mounts() -> Vec<String> {
    let all = mounts();
    let mut notes = Vec::new();
    for m in teardown_order(&all) {
        let target = Path::new(&m.target);
        let ro = mount(
            "none",
            target,
            "none",
            libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        );
        let c = cstr(target);
        // SAFETY: umount2 with a valid NUL-terminated path.
        let unmounted = m.target != "/" && unsafe { libc::umount2(c.as_ptr(), 0) } == 0;
        notes.push(match (unmounted, ro) {
            (true, _) => format!("{} unmounted", m.target),
            (false, Ok(())) => format!("{} read-only", m.target),
            (false, Err(e)) => format!("{} left mounted ({e})", m.target),
        });
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
devtmpfs /dev devtmpfs rw,nosuid,size=1k,mode=755 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
/dev/vda /run/banger/lower ext4 ro,relatime,norecovery 0 0
/dev/vdc /run/banger/upper ext4 rw,relatime 0 0
overlay / overlay rw,relatime,lowerdir=/run/banger/lower 0 0
/dev/vdd /root ext4 rw,relatime 0 0
/dev/vdd /srv/my\\040dir ext4 rw,relatime 0 0
devpts /dev/pts devpts rw,nosuid,noexec,gid=5,mode=620,ptmxmode=666 0 0
";

    #[test]
    fn mounts_parse_with_escapes() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 10);
        assert_eq!(
            m[6],
            MountEntry {
                source: "overlay".into(),
                target: "/".into(),
                fstype: "overlay".into()
            }
        );
        assert_eq!(m[8].target, "/srv/my dir");
        assert_eq!(unescape_mount_field("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_field("trailing\\"), "trailing\\");
    }

    #[test]
    fn teardown_goes_innermost_first_and_skips_pseudo_filesystems() {
        let m = parse_mounts(MOUNTS);
        let order: Vec<&str> = teardown_order(&m)
            .iter()
            .map(|e| e.target.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "/srv/my dir",
                "/root",
                "/",
                "/run/banger/upper",
                "/run/banger/lower"
            ]
        );
    }
}
