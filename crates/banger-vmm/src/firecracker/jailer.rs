//! Launching Firecracker through its jailer (`jailer_bin`): a chroot per VM, the uid/gid drop,
//! cgroup v2.
//!
//! The jailer builds `<chroot_base>/<exec name>/<vm id>/root/` (the *jail root*), copies the
//! Firecracker binary into it, creates `/dev/kvm`, `/dev/net/tun` and `/run` there, pivots into
//! it, drops to the given uid/gid and execs Firecracker **in place** (no `--daemonize`, no
//! `--new-pid-ns`), so the pid banger spawned is Firecracker's pid and the usual pid + start
//! time identity holds.
//!
//! Before the jailer runs, banger makes the jail root itself and puts the VM's files in it
//! under fixed names ([`jail_files`]): hard links (a copy of a read-only file on another
//! filesystem; a block device is re-created with `mknod`), owned so the dropped uid can use
//! them: writable disks become `uid:gid 0600`, read-only files keep their owner and get group
//! `gid`, mode `0440`. Every path Firecracker is given afterwards is relative to the jail root
//! ([`jailed_spec`]), the API socket is `/run/firecracker.socket` inside the jail, which is
//! [`JailLayout::api_socket`] from the host.
//!
//! Cleanup ([`remove_jail`]) removes `<chroot_base>/<exec name>/<vm id>` without following
//! symlinks and the per-VM cgroup if the jailer made one; it finds the jail from the API socket
//! path in the VM's handle, so a restarted daemon cleans up the same way.

use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{LaunchSpec, VmmError};

/// The API socket as Firecracker sees it inside the jail (the jailer creates `/run`).
pub const API_SOCKET_IN_JAIL: &str = "/run/firecracker.socket";
/// The cgroup v2 parent the jailer is pointed at (`--parent-cgroup`). The jailer moves the VMM
/// into `<cgroup2 mount>/banger` when that cgroup exists and silently does nothing otherwise,
/// leaving the VMM in the daemon's own cgroup (see [`ensure_parent_cgroup`]).
pub const PARENT_CGROUP: &str = "banger";
/// The kernel's name in the jail root.
pub const KERNEL_FILE: &str = "vmlinux";
/// The initrd's name in the jail root.
pub const INITRD_FILE: &str = "initrd";
/// Where the cgroup v2 mount is looked up.
pub const PROC_MOUNTS: &str = "/proc/mounts";

/// How banger runs the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The jailer binary.
    pub bin: PathBuf,
    /// `--chroot-base-dir` (banger uses `<state_dir>/jail`, created 0700).
    pub chroot_base: PathBuf,
    /// The uid and gid Firecracker runs as inside the jail; never 0.
    pub uid: u32,
    pub gid: u32,
}

impl JailerConfig {
    /// Checks the identity Firecracker gets: root (uid or gid 0) is refused.
    pub fn validate(&self) -> Result<(), VmmError> {
        check_identity(self.uid, self.gid)
    }
}

/// Refuses to run Firecracker as root (uid 0) or with group root (gid 0) inside the jail.
pub fn check_identity(uid: u32, gid: u32) -> Result<(), VmmError> {
    if uid == 0 || gid == 0 {
        return Err(VmmError::Spec(format!(
            "the jailer would run Firecracker as uid {uid} gid {gid}; banger never runs it as \
             root inside the jail (set jailer_uid and jailer_gid to an unprivileged user)"
        )));
    }
    Ok(())
}

/// The jailer's id rule (and Firecracker's `--id` rule): 1 to 64 of `[A-Za-z0-9-]`.
pub fn is_valid_jail_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// One file of the VM put into the jail root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    /// The file on the host.
    pub source: PathBuf,
    /// Its name in the jail root (a single path component).
    pub name: String,
    /// Whether the VM writes to it (a read-write drive).
    pub writable: bool,
}

/// A drive's file name in the jail root. Drive ids are `[A-Za-z0-9_]+`, so the name is a
/// single safe component.
pub fn drive_file(id: &str) -> String {
    format!("drive-{id}")
}

/// The files a VM needs inside its jail: kernel, initrd, every drive.
pub fn jail_files(spec: &LaunchSpec) -> Vec<JailFile> {
    let mut files = vec![JailFile {
        source: spec.kernel.clone(),
        name: KERNEL_FILE.into(),
        writable: false,
    }];
    if let Some(initrd) = &spec.initrd {
        files.push(JailFile {
            source: initrd.clone(),
            name: INITRD_FILE.into(),
            writable: false,
        });
    }
    for d in &spec.drives {
        files.push(JailFile {
            source: d.path.clone(),
            name: drive_file(&d.id),
            writable: !d.read_only,
        });
    }
    files
}

/// `spec` as the jailed Firecracker must be told it: every file by its name in the jail root,
/// relative (the jailer leaves Firecracker in `/` of the jail, so a relative name and
/// `/<name>` are the same file).
pub fn jailed_spec(spec: &LaunchSpec) -> LaunchSpec {
    let mut s = spec.clone();
    s.kernel = PathBuf::from(KERNEL_FILE);
    if s.initrd.is_some() {
        s.initrd = Some(PathBuf::from(INITRD_FILE));
    }
    for d in &mut s.drives {
        d.path = PathBuf::from(drive_file(&d.id));
    }
    s
}

/// Where one VM's jail is, seen from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLayout {
    base: PathBuf,
    exec_name: String,
    id: String,
}

impl JailLayout {
    /// The jail of VM `id` for the Firecracker binary named `exec_name` (the file name of the
    /// canonical `--exec-file`, as the jailer takes it) under the canonical chroot `base`.
    pub fn new(base: &Path, exec_name: &str, id: &str) -> Result<Self, VmmError> {
        if !is_single_component(exec_name) {
            return Err(VmmError::Spec(format!(
                "Firecracker binary name {exec_name:?} cannot name a jail directory"
            )));
        }
        if !is_valid_jail_id(id) {
            return Err(VmmError::Spec(format!(
                "VM id {id:?} is not a valid jailer id (1-64 of A-Z, a-z, 0-9, -)"
            )));
        }
        if !base.is_absolute() {
            return Err(VmmError::Spec(format!(
                "jail base {} is not an absolute path",
                base.display()
            )));
        }
        Ok(JailLayout {
            base: base.to_path_buf(),
            exec_name: exec_name.to_string(),
            id: id.to_string(),
        })
    }

    /// Recognises a jailed VMM's API socket (`<base>/<exec>/<id>/root/run/firecracker.socket`)
    /// and returns its jail; `None` for any other path (an unjailed VMM's socket).
    pub fn from_api_socket(base: &Path, socket: &Path) -> Option<Self> {
        let rest = socket.strip_prefix(base).ok()?;
        let parts: Vec<&str> = rest
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect::<Option<_>>()?;
        match parts.as_slice() {
            [exec, id, "root", "run", "firecracker.socket"] => JailLayout::new(base, exec, id).ok(),
            _ => None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn exec_name(&self) -> &str {
        &self.exec_name
    }

    /// `<base>/<exec name>`, shared by every VM of this binary.
    pub fn exec_dir(&self) -> PathBuf {
        self.base.join(&self.exec_name)
    }

    /// `<base>/<exec name>/<id>`: what cleanup removes.
    pub fn instance_dir(&self) -> PathBuf {
        self.exec_dir().join(&self.id)
    }

    /// The jail root, `/` for the jailed Firecracker.
    pub fn root(&self) -> PathBuf {
        self.instance_dir().join("root")
    }

    /// The API socket from the host.
    pub fn api_socket(&self) -> PathBuf {
        self.host_path(API_SOCKET_IN_JAIL)
    }

    /// A path inside the jail (absolute or relative to its `/`) seen from the host.
    pub fn host_path(&self, in_jail: &str) -> PathBuf {
        self.root().join(in_jail.trim_start_matches('/'))
    }

    /// The per-VM cgroup the jailer makes under the v2 mount when given `--cgroup` settings.
    pub fn cgroup_dir(&self, cgroup2_mount: &Path) -> PathBuf {
        cgroup2_mount.join(PARENT_CGROUP).join(&self.id)
    }
}

fn is_single_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// The jailer's command line for VM `layout.id()`: no `--daemonize` and no `--new-pid-ns` (the
/// jailer execs Firecracker in place), cgroup v2 with banger's parent cgroup, and Firecracker's
/// own arguments after `--`. The jailer passes `--id` to Firecracker itself.
pub fn jailer_argv(cfg: &JailerConfig, exec_file: &Path, layout: &JailLayout) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |a: &str, b: OsString| {
        v.push(a.into());
        v.push(b);
    };
    push("--id", layout.id.clone().into());
    push("--exec-file", exec_file.as_os_str().to_owned());
    push("--uid", cfg.uid.to_string().into());
    push("--gid", cfg.gid.to_string().into());
    push("--chroot-base-dir", layout.base.as_os_str().to_owned());
    push("--cgroup-version", "2".into());
    push("--parent-cgroup", PARENT_CGROUP.into());
    v.push("--".into());
    v.push("--api-sock".into());
    v.push(API_SOCKET_IN_JAIL.into());
    v
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |source| VmmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `dir` (whose parent must exist) a real directory with mode 0700: created if missing,
/// refused if it is a symlink or not a directory.
fn ensure_private_dir(dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => {
            return Err(VmmError::Spec(format!(
                "{} exists and is not a directory (a symlink is refused too)",
                dir.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        Err(e) => return Err(io(dir)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// Creates the chroot base (mode 0700, its parent must exist) and returns its canonical path,
/// which is what the jailer builds jails under.
pub fn ensure_base(base: &Path) -> Result<PathBuf, VmmError> {
    ensure_private_dir(base)?;
    std::fs::canonicalize(base).map_err(io(base))
}

/// Builds a fresh jail root for `layout` holding `files`, as described in the module docs. A
/// jail left by an earlier run of the same VM is removed first (the jailer refuses to create
/// its device nodes over old ones). On error the caller removes the jail.
pub fn prepare(
    layout: &JailLayout,
    files: &[JailFile],
    uid: u32,
    gid: u32,
) -> Result<(), VmmError> {
    check_identity(uid, gid)?;
    ensure_private_dir(&layout.base)?;
    ensure_private_dir(&layout.exec_dir())?;
    remove_dir_nofollow(&layout.instance_dir())?;
    ensure_private_dir(&layout.instance_dir())?;
    ensure_private_dir(&layout.root())?;
    let root = layout.root();
    for f in files {
        if !is_single_component(&f.name) {
            return Err(VmmError::Spec(format!(
                "jail file name {:?} is not a single path component",
                f.name
            )));
        }
        place(&f.source, &root.join(&f.name), f.writable, uid, gid)?;
    }
    Ok(())
}

/// Puts `src` at `dst` (which must not exist) for the jailed uid/gid.
fn place(src: &Path, dst: &Path, writable: bool, uid: u32, gid: u32) -> Result<(), VmmError> {
    // The real file, not a symlink to it: a symlink would be resolved inside the chroot.
    let real = std::fs::canonicalize(src).map_err(io(src))?;
    let meta = std::fs::metadata(&real).map_err(io(&real))?;
    let ft = meta.file_type();
    let (owner, group, mode) = if writable {
        (Some(uid), Some(gid), 0o600)
    } else {
        (None, Some(gid), 0o440)
    };
    if ft.is_block_device() {
        // A device-mapper snapshot or loop device: the same device node inside the jail.
        let kind = nix::sys::stat::SFlag::S_IFBLK;
        let perm = nix::sys::stat::Mode::from_bits_truncate(mode);
        nix::sys::stat::mknod(dst, kind, perm, meta.rdev()).map_err(|e| VmmError::Io {
            path: dst.to_path_buf(),
            source: std::io::Error::from(e),
        })?;
        // The node is the jail's own: it may belong to the jailed user either way.
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io(dst))?;
        return std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
            .map_err(io(dst));
    }
    if !ft.is_file() {
        return Err(VmmError::Spec(format!(
            "{} is neither a regular file nor a block device and cannot go into the jail",
            real.display()
        )));
    }
    match std::fs::hard_link(&real, dst) {
        Ok(()) => {
            // The link shares the inode: this sets the owner and mode of the original too
            // (the daemon, root, is not limited by them).
            std::os::unix::fs::chown(dst, owner, group).map_err(io(dst))?;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode)).map_err(io(dst))
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            if writable {
                return Err(VmmError::Spec(format!(
                    "{} is writable by the VM and on another filesystem than the jail {}; \
                     a copy would lose the VM's writes (keep the VM disks and state_dir on one \
                     filesystem)",
                    real.display(),
                    dst.display()
                )));
            }
            tracing::warn!(src = %real.display(), dst = %dst.display(), "copying a read-only file into the jail (another filesystem)");
            copy_new(&real, dst)?;
            std::os::unix::fs::chown(dst, owner, group).map_err(io(dst))?;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode)).map_err(io(dst))
        }
        Err(e) => Err(io(dst)(e)),
    }
}

fn copy_new(src: &Path, dst: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = std::fs::File::open(src).map_err(io(src))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o400)
        .open(dst)
        .map_err(io(dst))?;
    std::io::copy(&mut from, &mut to).map_err(io(dst))?;
    to.sync_all().map_err(io(dst))
}

/// Removes `dir` and everything in it without following symlinks; a symlink at `dir` itself
/// is removed as a link. Missing is fine.
fn remove_dir_nofollow(dir: &Path) -> Result<(), VmmError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
        Ok(m) if m.file_type().is_dir() => {
            // std's remove_dir_all walks with openat/O_NOFOLLOW: a symlink inside (which the
            // jailed Firecracker could plant) is unlinked, never followed.
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir)(e)),
                _ => Ok(()),
            }
        }
        Ok(_) => std::fs::remove_file(dir).map_err(io(dir)),
    }
}

/// The cgroup v2 mount point in a `/proc/mounts` text (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one), as the jailer finds it.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| banger_sys::mounts::unescape(dir))
    })
}

/// Removes a VM's jail (`<base>/<exec>/<id>`, symlinks never followed) and its per-VM cgroup
/// under `cgroup2` if there is one. Only call once the VMM is gone.
pub fn remove_jail(layout: &JailLayout, cgroup2: Option<&Path>) -> Result<(), VmmError> {
    let mut result = remove_dir_nofollow(&layout.instance_dir());
    if let Some(mount) = cgroup2 {
        let cg = layout.cgroup_dir(mount);
        // rmdir(2) never follows a symlink, and an empty cgroup is removed by it alone.
        if let Err(e) = std::fs::remove_dir(&cg)
            && e.kind() != std::io::ErrorKind::NotFound
            && result.is_ok()
        {
            result = Err(io(&cg)(e));
        }
    }
    result
}

/// Makes the cgroup v2 parent the jailer is given (`<cgroup2 mount>/banger`, see
/// [`PARENT_CGROUP`]) when it is missing. Without it the jailer silently leaves Firecracker in
/// the daemon's cgroup — under systemd the daemon's service, whose stop or restart then kills
/// every VM with it. An empty cgroup with no controllers enabled limits nothing; an
/// administrator may cap all VMs through it. Returns its path.
pub fn ensure_parent_cgroup(cgroup2_mount: Option<&Path>) -> Result<PathBuf, VmmError> {
    let Some(mount) = cgroup2_mount else {
        return Err(VmmError::Spec(format!(
            "no cgroup v2 filesystem in {PROC_MOUNTS}: the jailer (--cgroup-version 2) needs one"
        )));
    };
    let dir = mount.join(PARENT_CGROUP);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(VmmError::Spec(format!(
            "{} exists and is not a cgroup directory",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(&dir) {
            // A concurrent start may have made it meanwhile.
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(VmmError::Io {
                path: dir,
                source: e,
            }),
            _ => Ok(dir),
        },
        Err(e) => Err(VmmError::Io {
            path: dir,
            source: e,
        }),
    }
}

/// Refuses a Firecracker binary the jailer cannot run: one whose (canonical) file name lacks
/// `firecracker` (the jailer's own rule), one that is dynamically linked (its loader and
/// libraries are not in the chroot) or not an ELF executable at all.
pub fn check_jailable(firecracker: &Path) -> Result<(), VmmError> {
    let canonical = std::fs::canonicalize(firecracker).map_err(io(firecracker))?;
    let name = canonical.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.contains("firecracker") {
        return Err(VmmError::Binary {
            path: firecracker.to_path_buf(),
            reason: format!(
                "is named {name:?}, and the jailer only runs a binary whose file name contains \
                 \"firecracker\": rename it or link it under such a name"
            ),
        });
    }
    use banger_sys::elf::{ElfError, Linkage, x86_64_linkage};
    match x86_64_linkage(firecracker) {
        Ok(Linkage::Static) => Ok(()),
        Ok(Linkage::Dynamic { interpreter }) => Err(VmmError::Binary {
            path: firecracker.to_path_buf(),
            reason: format!(
                "is dynamically linked (loader {interpreter}), but the jailer runs it in a chroot \
                 without a loader or libraries: use a statically linked Firecracker (the release \
                 binaries are) or unset jailer_bin"
            ),
        }),
        Err(ElfError::Io { source, .. }) => Err(io(firecracker)(source)),
        Err(e @ ElfError::NotElf { .. }) => Err(VmmError::Binary {
            path: firecracker.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// The cgroup v2 mount of this host, from `/proc/mounts`.
pub fn host_cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string(PROC_MOUNTS)
        .ok()
        .and_then(|t| cgroup2_mount(&t))
}

/// Gives the existing persistent tap `name` to `uid`/`gid` (`TUNSETOWNER`, `TUNSETGROUP`), so
/// the jailed Firecracker, which has no `CAP_NET_ADMIN`, may attach to it. Needs root.
pub fn set_tap_owner(name: &str, uid: u32, gid: u32) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;

    #[repr(C)]
    struct IfReqFlags {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(VmmError::Spec(format!("tap name {name:?} is not valid")));
    }
    let class = Path::new("/sys/class/net").join(name).join("tun_flags");
    if !class.exists() {
        // TUNSETIFF would create a fresh tap under that name instead.
        return Err(VmmError::Spec(format!("tap {name:?} does not exist")));
    }
    let tun = Path::new("/dev/net/tun");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tun)
        .map_err(io(tun))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        // What banger's taps are created with (`ip tuntap add ... mode tap vnet_hdr`).
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fail = |what: &str| VmmError::Io {
        path: PathBuf::from(format!("tap {name} ({what})")),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) at the pointer, which
    // points at a live, writable IfReqFlags of that size with a NUL-terminated name.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut IfReqFlags,
        )
    } < 0
    {
        return Err(fail("TUNSETIFF"));
    }
    // SAFETY: TUNSETOWNER and TUNSETGROUP take the id by value and touch no memory of ours.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOWNER,
            libc::c_ulong::from(uid),
        )
    } < 0
    {
        return Err(fail("TUNSETOWNER"));
    }
    // SAFETY: as above.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETGROUP,
            libc::c_ulong::from(gid),
        )
    } < 0
    {
        return Err(fail("TUNSETGROUP"));
    }
    // Closing the descriptor leaves the persistent tap in place.
    Ok(())
}

/// Parses the first line of `jailer --version`, `Jailer v1.16.1`.
pub fn parse_version_output(output: &str) -> Option<super::Version> {
    let line = output.lines().find(|l| !l.trim().is_empty())?;
    let rest = line.trim().strip_prefix("Jailer ")?;
    super::parse_version_output(&format!("Firecracker {rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DriveSpec, NetSpec};

    fn spec() -> LaunchSpec {
        LaunchSpec {
            vm_id: "0123456789ab".into(),
            run_dir: "/run/banger/vms/0123456789ab".into(),
            log_path: "/var/lib/banger/vms/0123456789ab/vmm.log".into(),
            log_max_bytes: crate::DEFAULT_LOG_MAX_BYTES,
            vcpu: 1,
            memory_mib: 256,
            kernel: "/var/lib/banger/kernels/k/vmlinux".into(),
            initrd: Some("/var/lib/banger/kernels/k/initramfs-0011.cpio".into()),
            boot_args: "console=ttyS0".into(),
            drives: vec![
                DriveSpec {
                    id: "image".into(),
                    path: "/var/lib/banger/images/i/rootfs.ext4".into(),
                    read_only: true,
                },
                DriveSpec {
                    id: "root".into(),
                    path: "/var/lib/banger/vms/0123456789ab/root.ext4".into(),
                    read_only: false,
                },
            ],
            net: Some(NetSpec {
                tap: "tap-x".into(),
                mac: "06:00:00:00:00:01".into(),
                tap_fd: None,
            }),
            vsock: None,
        }
    }

    fn cfg() -> JailerConfig {
        JailerConfig {
            bin: "/usr/bin/jailer".into(),
            chroot_base: "/var/lib/banger/jail".into(),
            uid: 1000,
            gid: 1001,
        }
    }

    #[test]
    fn argv_is_exact() {
        let layout = JailLayout::new(
            Path::new("/var/lib/banger/jail"),
            "firecracker",
            "0123456789ab",
        )
        .unwrap();
        let argv = jailer_argv(&cfg(), Path::new("/usr/bin/firecracker"), &layout);
        let argv: Vec<String> = argv.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "--id",
                "0123456789ab",
                "--exec-file",
                "/usr/bin/firecracker",
                "--uid",
                "1000",
                "--gid",
                "1001",
                "--chroot-base-dir",
                "/var/lib/banger/jail",
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "banger",
                "--",
                "--api-sock",
                "/run/firecracker.socket",
            ]
        );
        assert!(
            !argv
                .iter()
                .any(|a| a == "--daemonize" || a == "--new-pid-ns")
        );
    }

    #[test]
    fn layout_paths() {
        let l = JailLayout::new(Path::new("/var/lib/banger/jail"), "firecracker", "vm-1").unwrap();
        assert_eq!(
            l.instance_dir(),
            Path::new("/var/lib/banger/jail/firecracker/vm-1")
        );
        assert_eq!(
            l.root(),
            Path::new("/var/lib/banger/jail/firecracker/vm-1/root")
        );
        assert_eq!(
            l.api_socket(),
            Path::new("/var/lib/banger/jail/firecracker/vm-1/root/run/firecracker.socket")
        );
        assert_eq!(
            l.host_path("vmlinux"),
            Path::new("/var/lib/banger/jail/firecracker/vm-1/root/vmlinux")
        );
        assert_eq!(
            l.cgroup_dir(Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/cgroup/banger/vm-1")
        );
        // Production paths stay far below the socket limit.
        assert!(l.api_socket().as_os_str().len() < 90);

        assert!(JailLayout::new(Path::new("/j"), "firecracker", "a_b").is_err());
        assert!(JailLayout::new(Path::new("/j"), "firecracker", "").is_err());
        assert!(JailLayout::new(Path::new("/j"), "firecracker", &"a".repeat(65)).is_err());
        assert!(JailLayout::new(Path::new("/j"), "..", "vm").is_err());
        assert!(JailLayout::new(Path::new("/j"), "a/b", "vm").is_err());
        assert!(JailLayout::new(Path::new("j"), "firecracker", "vm").is_err());
    }

    #[test]
    fn socket_paths_map_back_to_their_jail_only() {
        let base = Path::new("/var/lib/banger/jail");
        let l = JailLayout::new(base, "firecracker", "0123456789ab").unwrap();
        assert_eq!(JailLayout::from_api_socket(base, &l.api_socket()), Some(l));
        for other in [
            "/run/banger/vms/0123456789ab/fc.sock",
            "/var/lib/banger/jail/firecracker/0123456789ab/root/run/other.socket",
            "/var/lib/banger/jail/firecracker/../x/root/run/firecracker.socket",
            "/var/lib/banger/jail/firecracker/bad_id/root/run/firecracker.socket",
            "/var/lib/banger/jail/0123456789ab/root/run/firecracker.socket",
            "/var/lib/banger/jail/a/b/c/root/run/firecracker.socket",
            "/elsewhere/firecracker/0123456789ab/root/run/firecracker.socket",
        ] {
            assert_eq!(
                JailLayout::from_api_socket(base, Path::new(other)),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn files_and_jailed_spec_use_the_same_names() {
        let s = spec();
        let files = jail_files(&s);
        let names: Vec<(&str, bool)> = files
            .iter()
            .map(|f| (f.name.as_str(), f.writable))
            .collect();
        assert_eq!(
            names,
            [
                ("vmlinux", false),
                ("initrd", false),
                ("drive-image", false),
                ("drive-root", true)
            ]
        );
        assert_eq!(files[0].source, s.kernel);
        assert_eq!(files[3].source, s.drives[1].path);

        let j = jailed_spec(&s);
        assert_eq!(j.kernel, Path::new("vmlinux"));
        assert_eq!(j.initrd.as_deref(), Some(Path::new("initrd")));
        let drive_paths: Vec<&Path> = j.drives.iter().map(|d| d.path.as_path()).collect();
        assert_eq!(
            drive_paths,
            [Path::new("drive-image"), Path::new("drive-root")]
        );
        // Everything but the paths is unchanged.
        assert_eq!(j.drives[1].read_only, s.drives[1].read_only);
        assert_eq!(j.net, s.net);
        assert_eq!(j.boot_args, s.boot_args);
        for f in &files {
            assert!(
                j.kernel == Path::new(&f.name)
                    || j.initrd.as_deref() == Some(Path::new(&f.name))
                    || j.drives.iter().any(|d| d.path == Path::new(&f.name))
            );
        }

        let mut no_initrd = s.clone();
        no_initrd.initrd = None;
        assert!(jail_files(&no_initrd).iter().all(|f| f.name != "initrd"));
        assert_eq!(jailed_spec(&no_initrd).initrd, None);
    }

    #[test]
    fn root_is_refused() {
        assert!(check_identity(0, 1000).is_err());
        assert!(check_identity(1000, 0).is_err());
        check_identity(65534, 65534).unwrap();
        let mut c = cfg();
        c.uid = 0;
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("never runs it as root"), "{e}");
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            cgroup2_mount("none /a\\040b cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/a b"))
        );
    }

    #[test]
    fn parent_cgroup_is_made_when_missing() {
        let d = tempfile::tempdir().unwrap();
        let dir = ensure_parent_cgroup(Some(d.path())).unwrap();
        assert_eq!(dir, d.path().join("banger"));
        assert!(dir.is_dir());
        // Present: left as it is.
        std::fs::write(dir.join("marker"), b"").unwrap();
        ensure_parent_cgroup(Some(d.path())).unwrap();
        assert!(dir.join("marker").exists());
        let e = ensure_parent_cgroup(None).unwrap_err().to_string();
        assert!(e.contains("cgroup v2"), "{e}");
        let f = tempfile::tempdir().unwrap();
        std::fs::write(f.path().join("banger"), b"").unwrap();
        let e = ensure_parent_cgroup(Some(f.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a cgroup directory"), "{e}");
    }

    #[test]
    fn jailable_firecrackers_are_named_so_static_and_elf() {
        let d = tempfile::tempdir().unwrap();
        let dynamic = d.path().join("firecracker-dyn");
        std::fs::copy("/bin/dash", &dynamic).unwrap();
        let e = check_jailable(&dynamic).unwrap_err().to_string();
        assert!(
            e.contains("dynamically linked") && e.contains("firecracker-dyn"),
            "{e}"
        );
        if Path::new("/bin/busybox").is_file() {
            // The name the jailer sees is the canonical file's.
            let e = check_jailable(Path::new("/bin/busybox"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("\"busybox\"") && e.contains("contains"), "{e}");
            let copy = d.path().join("my-firecracker");
            std::fs::copy("/bin/busybox", &copy).unwrap();
            check_jailable(&copy).unwrap();
        }
        let script = d.path().join("firecracker.sh");
        std::fs::write(&script, b"#!/bin/sh\nexit 0\n").unwrap();
        let e = check_jailable(&script).unwrap_err().to_string();
        assert!(e.contains("not an x86-64 ELF"), "{e}");
    }

    #[test]
    fn jailer_version_lines() {
        assert_eq!(
            parse_version_output("Jailer v1.16.1\n\n"),
            Some(super::super::Version::new(1, 16, 1))
        );
        assert_eq!(parse_version_output("Firecracker v1.16.1"), None);
        assert_eq!(parse_version_output(""), None);
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn prepare_links_files_for_the_jailed_user_and_remove_cleans_up() {
        if !is_root() {
            println!("SKIP: needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let kernel = src.join("vmlinux");
        let disk = src.join("root.ext4");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&disk, b"disk").unwrap();
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A symlinked source: the jail gets the real file.
        let link = src.join("kernel-link");
        std::os::unix::fs::symlink(&kernel, &link).unwrap();

        let base = ensure_base(&dir.path().join("jail")).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&base), 0o700);
        let layout = JailLayout::new(&base, "firecracker", "vm-1").unwrap();
        // A stale jail of an earlier run is replaced.
        std::fs::create_dir_all(layout.root().join("dev/net")).unwrap();
        std::fs::write(layout.root().join("dev/kvm"), b"").unwrap();

        let files = vec![
            JailFile {
                source: link.clone(),
                name: "vmlinux".into(),
                writable: false,
            },
            JailFile {
                source: disk.clone(),
                name: "drive-root".into(),
                writable: true,
            },
        ];
        prepare(&layout, &files, 65534, 65533).unwrap();
        assert!(!layout.root().join("dev").exists(), "stale jail kept");
        assert_eq!(mode(&layout.instance_dir()), 0o700);
        assert_eq!(mode(&layout.root()), 0o700);

        let k = std::fs::symlink_metadata(layout.root().join("vmlinux")).unwrap();
        assert!(k.file_type().is_file());
        assert_eq!(
            k.ino(),
            std::fs::metadata(&kernel).unwrap().ino(),
            "not a hard link"
        );
        assert_eq!((k.uid(), k.gid(), k.mode() & 0o7777), (0, 65533, 0o440));
        let d = std::fs::metadata(layout.root().join("drive-root")).unwrap();
        assert_eq!(d.ino(), std::fs::metadata(&disk).unwrap().ino());
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (65534, 65533, 0o600));

        // A symlink planted inside the jail is removed, not followed.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, layout.root().join("escape")).unwrap();

        let cg = dir.path().join("cg");
        std::fs::create_dir_all(layout.cgroup_dir(&cg)).unwrap();
        remove_jail(&layout, Some(&cg)).unwrap();
        assert!(!layout.instance_dir().exists());
        assert!(!layout.cgroup_dir(&cg).exists());
        assert!(outside.join("keep").exists());
        assert!(kernel.exists() && disk.exists(), "sources must survive");
        // Missing is fine.
        remove_jail(&layout, Some(&cg)).unwrap();

        // Refusals: root, a name with a slash, a missing source, a non-file.
        assert!(prepare(&layout, &files, 0, 1).is_err());
        let bad = vec![JailFile {
            source: kernel.clone(),
            name: "../x".into(),
            writable: false,
        }];
        assert!(prepare(&layout, &bad, 1, 1).is_err());
        let missing = vec![JailFile {
            source: src.join("nope"),
            name: "x".into(),
            writable: false,
        }];
        let e = prepare(&layout, &missing, 1, 1).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let dirfile = vec![JailFile {
            source: src.clone(),
            name: "x".into(),
            writable: false,
        }];
        assert!(prepare(&layout, &dirfile, 1, 1).is_err());
        remove_jail(&layout, None).unwrap();

        // A symlinked base is refused.
        let fake_base = dir.path().join("jail-link");
        std::os::unix::fs::symlink(&outside, &fake_base).unwrap();
        assert!(ensure_base(&fake_base).is_err());
    }

    #[test]
    fn tap_owner_is_set_on_an_existing_tap_only() {
        let e = set_tap_owner("bgt-no-such-tap", 65534, 65534).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(set_tap_owner("a/b", 1, 1).is_err());
        if !is_root() || !Path::new("/dev/net/tun").exists() {
            println!("SKIP: needs root and /dev/net/tun");
            return;
        }
        let name = format!("bgtj{}", std::process::id() % 100_000);
        let made = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            println!("SKIP: cannot create a tap here");
            return;
        }
        let result = set_tap_owner(&name, 65534, 65533);
        let owner = std::fs::read_to_string(format!("/sys/class/net/{name}/owner"));
        let group = std::fs::read_to_string(format!("/sys/class/net/{name}/group"));
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
        result.unwrap();
        assert_eq!(owner.unwrap().trim(), "65534");
        assert_eq!(group.unwrap().trim(), "65533");
    }
}
