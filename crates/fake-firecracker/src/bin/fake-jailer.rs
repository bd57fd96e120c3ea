//! `fake-jailer`: stands in for Firecracker's jailer (v1.x) in banger's tests, in front of
//! `fake-firecracker`.
//!
//! ```text
//! fake-jailer --id ID --exec-file PATH --uid UID --gid GID [--chroot-base-dir DIR]
//!             [--cgroup-version 1|2] [--parent-cgroup REL] [--cgroup FILE=VALUE]...
//!             [--resource-limit fsize=N|no-file=N]... [-- FIRECRACKER ARGS...]
//! fake-jailer --version
//! ```
//!
//! What it does, in the real jailer's order:
//! 1. Parses its command line strictly: unknown flags, positional words, a flag given twice
//!    (except `--cgroup`/`--resource-limit`), a flag without its value, a missing `--id`,
//!    `--exec-file`, `--uid` or `--gid`, an id not matching `^[a-zA-Z0-9-]{1,64}$`, a non-numeric
//!    uid/gid, a cgroup version other than 1 or 2, a `--parent-cgroup` with `.`, `..` or a
//!    leading `/`, a `--cgroup` not of the form `file=value`, an unknown resource limit, and an
//!    `--id` among Firecracker's arguments (the jailer passes it itself) are all refused with
//!    exit code 1. `--daemonize`, `--new-pid-ns` and `--netns` are real jailer flags that banger
//!    never passes; the fake refuses them as unsupported rather than pretend.
//! 2. Closes every inherited descriptor but 0, 1 and 2, and will run Firecracker with an empty
//!    environment except the `FAKE_FIRECRACKER_*` variables (the real jailer clears it all; the
//!    fake's control and record files must still reach it).
//! 3. Canonicalizes `--exec-file` (must be a regular file whose name contains `firecracker`, the
//!    real jailer's rule) and `--chroot-base-dir` (default
//!    `/srv/jailer`, must be a directory), creates `<base>/<exec file name>/<id>/root` (the jail
//!    root), copies the exec file to `<root>/<exec file name>` owned by uid:gid (refused if that
//!    path is a hard link), applies the resource limits (`no-file` 2048 unless given).
//! 4. Creates no cgroup and writes no cgroup setting (the `--cgroup` arguments are only
//!    validated), but with `--cgroup-version 2`, `--parent-cgroup P` and no `--cgroup` it does
//!    what the real jailer does: when `<cgroup2 mount>/P` exists it moves itself (so Firecracker)
//!    into it, a failed write being an error; when it does not exist, nothing happens.
//! 5. Does **not** chroot: `fake-firecracker` is dynamically linked and could not be loaded in a
//!    jail holding only banger's files. It `chdir`s into the jail root instead, so every path
//!    relative to the jail (banger gives Firecracker only those) resolves as under a chroot,
//!    and it rewrites the absolute values of Firecracker's `--api-sock`, `--log-path`,
//!    `--metrics-path` and `--config-file` to the same paths relative to the jail root. An
//!    absolute path inside an API request is *not* rewritten: it would reach the host file, so
//!    tests check the recorded requests for jail-relative paths.
//! 6. Creates `/`, `/dev`, `/dev/net`, `/run` of the jail with mode 0700 owned by uid:gid, and
//!    the device nodes `/dev/net/tun` (10,200), `/dev/kvm` (10,232) (both failing if they exist:
//!    a stale jail) and `/dev/urandom` (1,9; a failure is only a warning), owned by uid:gid.
//! 7. Checks the jail: no symlink anywhere in it (a chroot would resolve it differently), and
//!    every other entry of the jail root is a regular file or a block device (what banger links
//!    in).
//! 8. Writes `<root>/<exec file name>.pid` (must not exist), drops to the uid/gid (no
//!    supplementary groups, `setgid` then `setuid`, verified), then opens every regular file and
//!    block device banger put in the jail root for reading as that user, failing with its name
//!    if one cannot be read (`fake-firecracker` itself then opens the kernel and the drives
//!    named in the API requests, read-write ones for writing).
//! 9. Execs `./<exec file name> --id ID --start-time-us N --start-time-cpu-us N
//!    --parent-cpu-time-us N FIRECRACKER ARGS...` in place (same pid), with argv[0] set to the
//!    copy's host path so test helpers that look for processes by their temp dir find it.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};

const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
const DEFAULT_NO_FILE: u64 = 2048;
/// Firecracker flags whose value is a path inside the jail.
const PATH_FLAGS: [&str; 4] = [
    "--api-sock",
    "--log-path",
    "--metrics-path",
    "--config-file",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    FileSize,
    NoFile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct JailArgs {
    id: String,
    exec_file: PathBuf,
    uid: u32,
    gid: u32,
    chroot_base: PathBuf,
    cgroup_version: u8,
    parent_cgroup: Option<String>,
    cgroups: Vec<(String, String)>,
    limits: Vec<(Limit, u64)>,
    extra: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Version,
    Help,
    Jail(Box<JailArgs>),
}

const USAGE: &str = "fake-jailer: a fake Firecracker jailer for tests\n\
\n\
Usage: fake-jailer --id ID --exec-file PATH --uid UID --gid GID [--chroot-base-dir DIR]\n\
       [--cgroup-version 1|2] [--parent-cgroup REL] [--cgroup FILE=VALUE]...\n\
       [--resource-limit fsize=N|no-file=N]... [-- FIRECRACKER ARGS...]\n\
       fake-jailer --version";

fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A relative path with only normal components (the real jailer's rule for cgroup paths).
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    const VALUE_FLAGS: [&str; 10] = [
        "--id",
        "--exec-file",
        "--uid",
        "--gid",
        "--chroot-base-dir",
        "--cgroup-version",
        "--parent-cgroup",
        "--cgroup",
        "--resource-limit",
        "--netns",
    ];
    const MULTI: [&str; 2] = ["--cgroup", "--resource-limit"];
    let mut args = args.into_iter();
    let mut seen: Vec<String> = Vec::new();
    let mut single: Vec<(String, String)> = Vec::new();
    let mut cgroups = Vec::new();
    let mut limits = Vec::new();
    let mut extra = Vec::new();
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            "--" => {
                extra.extend(args.by_ref());
                break;
            }
            "--version" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--daemonize" | "--new-pid-ns" | "--netns" => {
                return Err(format!(
                    "{flag} is a jailer flag banger never passes; fake-jailer does not implement it"
                ));
            }
            _ => {}
        }
        if !VALUE_FLAGS.contains(&flag) {
            return Err(format!("Found argument '{arg}' which wasn't expected"));
        }
        if !MULTI.contains(&flag) {
            if seen.iter().any(|s| s == flag) {
                return Err(format!("The argument '{arg}' was provided more than once"));
            }
            seen.push(arg.clone());
        }
        let value = match args.next() {
            Some(v) if !v.starts_with("--") => v,
            _ => return Err(format!("The argument '{arg}' requires a value")),
        };
        match flag {
            "--cgroup" => {
                let (file, val) = value
                    .split_once('=')
                    .filter(|(f, v)| !v.is_empty() && !v.contains('=') && is_plain_relative(f))
                    .ok_or_else(|| format!("invalid --cgroup {value:?} (expected FILE=VALUE)"))?;
                if file.contains('/') {
                    return Err(format!("invalid --cgroup file {file:?}"));
                }
                cgroups.push((file.to_string(), val.to_string()));
            }
            "--resource-limit" => {
                let (name, val) = value
                    .split_once('=')
                    .ok_or_else(|| format!("invalid --resource-limit {value:?}"))?;
                let limit = match name {
                    "fsize" => Limit::FileSize,
                    "no-file" => Limit::NoFile,
                    _ => return Err(format!("unknown resource limit {name:?}")),
                };
                let n = val
                    .parse::<u64>()
                    .map_err(|e| format!("invalid --resource-limit value {val:?}: {e}"))?;
                limits.push((limit, n));
            }
            _ => single.push((arg, value)),
        }
    }
    let get = |name: &str| {
        single
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.clone())
    };
    let need = |name: &str| get(name).ok_or_else(|| format!("missing required argument {name}"));
    let id = need("--id")?;
    if !is_valid_id(&id) {
        return Err(format!(
            "Invalid instance ID: {id:?} (1 to 64 of A-Z, a-z, 0-9 and -)"
        ));
    }
    let exec_file = PathBuf::from(need("--exec-file")?);
    let uid_s = need("--uid")?;
    let uid = uid_s
        .parse::<u32>()
        .map_err(|_| format!("Invalid uid: {uid_s}"))?;
    let gid_s = need("--gid")?;
    let gid = gid_s
        .parse::<u32>()
        .map_err(|_| format!("Invalid gid: {gid_s}"))?;
    let chroot_base =
        PathBuf::from(get("--chroot-base-dir").unwrap_or_else(|| DEFAULT_CHROOT_BASE.into()));
    let cgroup_version = match get("--cgroup-version").as_deref() {
        None | Some("1") => 1,
        Some("2") => 2,
        Some(v) => return Err(format!("Invalid cgroup version: {v}")),
    };
    let parent_cgroup = get("--parent-cgroup");
    if let Some(p) = &parent_cgroup
        && !is_plain_relative(p)
    {
        return Err(format!("Invalid parent cgroup path {p:?}"));
    }
    if extra.iter().any(|a| a == "--id") {
        return Err("--id after `--`: the jailer passes Firecracker's --id itself".into());
    }
    Ok(Command::Jail(Box::new(JailArgs {
        id,
        exec_file,
        uid,
        gid,
        chroot_base,
        cgroup_version,
        parent_cgroup,
        cgroups,
        limits,
        extra,
    })))
}

/// Firecracker's arguments with the absolute values of path flags made relative to the jail
/// root (the process's working directory), e.g. `/run/firecracker.socket` →
/// `run/firecracker.socket`.
fn rewrite_extra(extra: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(extra.len());
    let mut prev_is_path_flag = false;
    for a in extra {
        if prev_is_path_flag && a.starts_with('/') {
            let rel = a.trim_start_matches('/');
            out.push(if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            });
        } else {
            out.push(a.clone());
        }
        prev_is_path_flag = PATH_FLAGS.contains(&a.as_str());
    }
    out
}

/// Only the fake's own control variables survive into the jailed process.
fn kept_env<I: IntoIterator<Item = (OsString, OsString)>>(vars: I) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(k, _)| k.as_bytes().starts_with(b"FAKE_FIRECRACKER_"))
        .collect()
}

fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains NUL", p.display()))
}

fn now_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

fn close_inherited_fds() {
    // SAFETY: close_range on descriptors this process does not use (nothing is open above 2
    // at the start of main that the fake needs).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        // Kernels before 5.9: mark them close-on-exec instead.
        if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<i32> = rd
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in fds {
                // SAFETY: setting FD_CLOEXEC on a descriptor number is harmless even if it
                // was the directory stream's own, now closed.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
    }
}

fn copy_exec_file(src: &Path, dst: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let mut from =
        std::fs::File::open(src).map_err(|e| format!("opening {}: {e}", src.display()))?;
    let mode = from
        .metadata()
        .map_err(|e| format!("{}: {e}", src.display()))?
        .mode();
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode & 0o7777)
        .open(dst)
        .map_err(|e| format!("creating {}: {e}", dst.display()))?;
    let meta = to
        .metadata()
        .map_err(|e| format!("{}: {e}", dst.display()))?;
    if meta.nlink() > 1 {
        return Err(format!("{} is a hard link", dst.display()));
    }
    std::os::unix::fs::fchown(&to, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", dst.display()))?;
    std::io::copy(&mut from, &mut to).map_err(|e| format!("copying to {}: {e}", dst.display()))?;
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, n: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one rlimit struct from the live local.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(os_err(format!("setrlimit({resource}, {n})")));
    }
    Ok(())
}

fn setup_folder(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", dir.display()))
}

fn mknod_owned(path: &Path, major: u32, minor: u32, uid: u32, gid: u32) -> Result<(), String> {
    let c = cpath(path)?;
    // SAFETY: mknod reads the NUL-terminated path; the mode and device are plain values.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        return Err(os_err(format!("mknod {}", path.display())));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Fails on any symlink under `dir` (not followed).
fn refuse_symlinks(dir: &Path) -> Result<(), String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let ft = e
            .file_type()
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
        if ft.is_symlink() {
            return Err(format!(
                "{} is a symlink; a chroot would not resolve it as the host does",
                e.path().display()
            ));
        }
        if ft.is_dir() {
            refuse_symlinks(&e.path())?;
        }
    }
    Ok(())
}

/// The entries of the jail root that the daemon put there (everything the jailer did not
/// create itself); each must be a regular file or a block device.
fn daemon_files(root: &Path, exec_name: &str) -> Result<Vec<PathBuf>, String> {
    let ours = [
        exec_name.to_string(),
        format!("{exec_name}.pid"),
        "dev".into(),
        "run".into(),
    ];
    let mut out = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| format!("reading {}: {e}", root.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("reading {}: {e}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if ours.contains(&name) {
            continue;
        }
        let ft = e
            .file_type()
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(format!(
                "{} is neither a regular file nor a block device",
                e.path().display()
            ));
        }
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: setgroups with a zero count reads no memory; setgid/setuid take plain values.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_err("setgroups([])"));
        }
        if libc::setgid(gid) != 0 {
            return Err(os_err(format!("setgid({gid})")));
        }
        if libc::setuid(uid) != 0 {
            return Err(os_err(format!("setuid({uid})")));
        }
    }
    // SAFETY: the getters have no preconditions.
    let now = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if now != (uid, uid, gid, gid) {
        return Err(format!(
            "privileges not dropped: uid/euid/gid/egid are {now:?}"
        ));
    }
    Ok(())
}

/// As the real jailer with `--cgroup-version 2`, a parent cgroup and no `--cgroup`: when
/// `<cgroup2 mount>/<parent>` exists, the process moves into it (its pid written to
/// `cgroup.procs`; a failed write is an error); when it does not, nothing happens and the VMM
/// stays in the cgroup it was started in.
fn move_to_parent_cgroup(parent: &str) -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| format!("Failed to read /proc/mounts: {e}"))?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or("Cgroup error: cgroup2 mount point not found")?;
    let dir = mount.join(parent);
    if !dir.exists() {
        return Ok(());
    }
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("Cgroup write error: {e}"))
}

fn jail(a: &JailArgs) -> Result<std::convert::Infallible, String> {
    let start_us = now_us(libc::CLOCK_MONOTONIC);
    let start_cpu_us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let exec_file = std::fs::canonicalize(&a.exec_file)
        .map_err(|e| format!("Failed to canonicalize path {}: {e}", a.exec_file.display()))?;
    if !exec_file.is_file() {
        return Err(format!("{} is not a file", exec_file.display()));
    }
    let exec_name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no file name", exec_file.display()))?
        .to_string();
    if !exec_name.contains("firecracker") {
        return Err(format!(
            "Invalid filename. The filename of `--exec-file` option must contain \"firecracker\": \
             {exec_name}"
        ));
    }
    // Cgroup arguments are validated by the parser; only the move into an existing parent
    // cgroup is done (module docs, 4).
    if a.cgroup_version == 2
        && a.cgroups.is_empty()
        && let Some(parent) = &a.parent_cgroup
    {
        move_to_parent_cgroup(parent)?;
    }

    let base = std::fs::canonicalize(&a.chroot_base).map_err(|e| {
        format!(
            "Failed to canonicalize path {}: {e}",
            a.chroot_base.display()
        )
    })?;
    if !base.is_dir() {
        return Err(format!("{} is not a directory", base.display()));
    }
    let root = base.join(&exec_name).join(&a.id).join("root");
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let jailed_exec = root.join(&exec_name);
    copy_exec_file(&exec_file, &jailed_exec, a.uid, a.gid)?;

    let no_file = a
        .limits
        .iter()
        .rev()
        .find(|(l, _)| *l == Limit::NoFile)
        .map_or(DEFAULT_NO_FILE, |(_, n)| *n);
    set_limit(libc::RLIMIT_NOFILE, no_file)?;
    if let Some((_, n)) = a.limits.iter().rev().find(|(l, _)| *l == Limit::FileSize) {
        set_limit(libc::RLIMIT_FSIZE, *n)?;
    }

    // Instead of the chroot (see the module docs).
    std::env::set_current_dir(&root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    for dir in [".", "dev", "dev/net", "run"] {
        setup_folder(Path::new(dir), a.uid, a.gid)?;
    }
    mknod_owned(Path::new("dev/net/tun"), 10, 200, a.uid, a.gid)?;
    mknod_owned(Path::new("dev/kvm"), 10, 232, a.uid, a.gid)?;
    if let Err(e) = mknod_owned(Path::new("dev/urandom"), 1, 9, a.uid, a.gid) {
        println!("Warning! Could not create /dev/urandom device inside jailer: {e}.");
    }

    refuse_symlinks(Path::new("."))?;
    let files = daemon_files(Path::new("."), &exec_name)?;

    let pid_file = PathBuf::from(format!("{exec_name}.pid"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&pid_file)
        .and_then(|mut f| {
            use std::io::Write;
            write!(f, "{}", std::process::id())
        })
        .map_err(|e| format!("writing {}: {e}", root.join(&pid_file).display()))?;

    drop_privileges(a.uid, a.gid)?;
    for f in &files {
        std::fs::File::open(f).map_err(|e| {
            format!(
                "{} in the jail cannot be read by uid {} gid {}: {e}",
                root.join(f).display(),
                a.uid,
                a.gid
            )
        })?;
    }

    let cpu_us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start_cpu_us);
    let err = std::process::Command::new(Path::new(".").join(&exec_name))
        .arg0(&jailed_exec)
        .env_clear()
        .envs(kept_env(std::env::vars_os()))
        .args(["--id", &a.id])
        .args(["--start-time-us", &start_us.to_string()])
        .args(["--start-time-cpu-us", &start_cpu_us.to_string()])
        .args(["--parent-cpu-time-us", &cpu_us.to_string()])
        .args(rewrite_extra(&a.extra))
        .exec();
    Err(format!("exec {}: {err}", jailed_exec.display()))
}

fn main() {
    close_inherited_fds();
    let code = match parse_args(std::env::args().skip(1)) {
        Err(e) => {
            eprintln!("fake-jailer: Arguments parsing error: {e}");
            1
        }
        Ok(Command::Version) => {
            println!("Jailer v{}\n", fake_firecracker::cli::reported_version());
            0
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Command::Jail(args)) => match jail(&args) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("fake-jailer: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    const BASE: [&str; 8] = [
        "--id",
        "vm-1",
        "--exec-file",
        "/bin/firecracker",
        "--uid",
        "65534",
        "--gid",
        "65533",
    ];

    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&'a str> = BASE.to_vec();
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn parses_banger_command_line() {
        let Command::Jail(a) = parse(&with(&[
            "--chroot-base-dir",
            "/var/lib/banger/jail",
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "banger",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ]))
        .unwrap() else {
            panic!("not a jail command")
        };
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.exec_file, Path::new("/bin/firecracker"));
        assert_eq!((a.uid, a.gid), (65534, 65533));
        assert_eq!(a.chroot_base, Path::new("/var/lib/banger/jail"));
        assert_eq!(a.cgroup_version, 2);
        assert_eq!(a.parent_cgroup.as_deref(), Some("banger"));
        assert_eq!(a.extra, ["--api-sock", "/run/firecracker.socket"]);

        let Command::Jail(d) = parse(&BASE).unwrap() else {
            panic!()
        };
        assert_eq!(d.chroot_base, Path::new("/srv/jailer"));
        assert_eq!(d.cgroup_version, 1);
        assert!(d.extra.is_empty());

        let Command::Jail(m) = parse(&with(&[
            "--cgroup",
            "cpu.weight=100",
            "--cgroup",
            "memory.max=1G",
            "--resource-limit",
            "no-file=1024",
            "--resource-limit",
            "fsize=10",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.cgroups.len(), 2);
        assert_eq!(m.limits, [(Limit::NoFile, 1024), (Limit::FileSize, 10)]);
        assert_eq!(parse(&["--version"]).unwrap(), Command::Version);
    }

    #[test]
    fn refuses_bad_command_lines() {
        let bad: &[(&[&str], &str)] = &[
            (&["--bogus"], "wasn't expected"),
            (&["stray"], "wasn't expected"),
            (&["--daemonize"], "does not implement"),
            (&["--new-pid-ns"], "does not implement"),
            (&["--netns", "/var/run/netns/x"], "does not implement"),
            (&["--uid", "1"], "more than once"),
            (&["--chroot-base-dir"], "requires a value"),
            (&["--chroot-base-dir", "--uid"], "requires a value"),
            (&["--cgroup-version", "3"], "cgroup version"),
            (&["--parent-cgroup", "../x"], "parent cgroup"),
            (&["--parent-cgroup", "/abs"], "parent cgroup"),
            (&["--cgroup", "cpu.weight"], "FILE=VALUE"),
            (&["--cgroup", "a/b=1"], "--cgroup file"),
            (&["--cgroup", "x="], "FILE=VALUE"),
            (&["--resource-limit", "nproc=1"], "unknown resource limit"),
            (&["--resource-limit", "fsize=x"], "value"),
            (&["--", "--id", "x"], "passes Firecracker's --id"),
        ];
        for (extra, needle) in bad {
            let e = parse(&with(extra)).unwrap_err();
            assert!(e.contains(needle), "{extra:?}: {e} lacks {needle}");
        }
        for (drop, needle) in [
            ("--id", "missing required argument --id"),
            ("--exec-file", "--exec-file"),
            ("--uid", "--uid"),
            ("--gid", "--gid"),
        ] {
            let mut v = BASE.to_vec();
            let i = v.iter().position(|a| *a == drop).unwrap();
            v.drain(i..i + 2);
            let e = parse(&v).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        for id in ["", "a_b", "a.b", "a b", &"a".repeat(65)] {
            let mut v = BASE.to_vec();
            v[1] = id;
            let e = parse(&v).unwrap_err();
            assert!(e.contains("Invalid instance ID"), "{id:?}: {e}");
        }
        let mut v = BASE.to_vec();
        v[5] = "-1";
        assert!(parse(&v).unwrap_err().contains("Invalid uid"));
        v[5] = "nobody";
        assert!(parse(&v).unwrap_err().contains("Invalid uid"));
        assert!(is_valid_id(&"a".repeat(64)));
    }

    #[test]
    fn path_flags_become_jail_relative() {
        let args: Vec<String> = [
            "--api-sock",
            "/run/firecracker.socket",
            "--level",
            "/not-a-path-flag",
            "--log-path",
            "relative.log",
            "--metrics-path",
            "/",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            rewrite_extra(&args),
            [
                "--api-sock",
                "run/firecracker.socket",
                "--level",
                "/not-a-path-flag",
                "--log-path",
                "relative.log",
                "--metrics-path",
                "."
            ]
        );
    }

    #[test]
    fn only_fake_variables_survive() {
        let vars = [
            ("PATH", "/bin"),
            ("FAKE_FIRECRACKER_CONTROL", "/c"),
            ("HOME", "/root"),
            ("FAKE_FIRECRACKER_RECORD", "/r"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let kept: Vec<String> = kept_env(vars)
            .into_iter()
            .map(|(k, _)| k.into_string().unwrap())
            .collect();
        assert_eq!(
            kept,
            ["FAKE_FIRECRACKER_CONTROL", "FAKE_FIRECRACKER_RECORD"]
        );
    }
}
