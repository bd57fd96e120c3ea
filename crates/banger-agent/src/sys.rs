//! Thin wrappers over the syscalls the agent needs (mount, finit_module, reboot), each turning
//! errno into an [`AgentError`] that names its input.

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
