//! `banger system install | uninstall | status`: banger as two systemd services.
//!
//! `banger-helper.service` runs as root and is the only privileged process (bridge, taps, NAT,
//! tap descriptors, loop and device-mapper, the default image's debootstrap);
//! `bangerd.service` runs as the owner user with no capabilities and reaches the helper over
//! its socket. Both use `KillMode=process`, so restarting either never touches running VMs
//! (their VMMs live in their own sessions and are re-adopted by the next daemon). The config is
//! `/etc/banger/config.toml`, the install record `/etc/banger/install.toml`, state
//! `/var/lib/banger`, cache `/var/cache/banger`.
//!
//! Where systemd is not running (containers, CI), the files are written and the two commands to
//! start by hand are printed; a plain `cargo install` / dev setup without any of this keeps
//! working (the daemon then does the network steps itself, as root).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::CliError;

/// Where a system install puts things; `root` is `/` except in tests.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub root: PathBuf,
}

impl SystemPaths {
    pub fn host() -> Self {
        SystemPaths {
            root: PathBuf::from("/"),
        }
    }

    fn at(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn etc(&self) -> PathBuf {
        self.at("/etc/banger")
    }
    pub fn config(&self) -> PathBuf {
        self.at("/etc/banger/config.toml")
    }
    pub fn record(&self) -> PathBuf {
        self.at("/etc/banger/install.toml")
    }
    pub fn units(&self) -> PathBuf {
        self.at("/etc/systemd/system")
    }
    pub fn state(&self) -> PathBuf {
        self.at("/var/lib/banger")
    }
    pub fn cache(&self) -> PathBuf {
        self.at("/var/cache/banger")
    }
}

/// The runtime paths (never prefixed: systemd creates them).
pub const DAEMON_RUNTIME: &str = "/run/banger";
pub const HELPER_SOCKET: &str = "/run/banger-helper/helper.sock";
pub const DAEMON_UNIT: &str = "bangerd.service";
pub const HELPER_UNIT: &str = "banger-helper.service";

/// The owner of a system install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Owner {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<Owner, CliError> {
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            && !name.starts_with('-');
        if !valid {
            return Err(CliError::input(format!("invalid user name {name:?}")));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| CliError::input("bad user name"))?;
        // SAFETY: getpwnam returns a pointer to static storage or null; we copy out what we
        // need at once and this CLI is single-threaded here.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if pw.is_null() {
            return Err(CliError::input(format!(
                "no user {name:?} on this machine (create it first, e.g. useradd -m {name})"
            )));
        }
        // SAFETY: pw is non-null and points to a valid passwd record (see above).
        let (uid, gid, dir) = unsafe {
            let p = &*pw;
            (
                p.pw_uid,
                p.pw_gid,
                std::ffi::CStr::from_ptr(p.pw_dir)
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        if uid == 0 {
            return Err(CliError::input(
                "the owner must be an ordinary user: the daemon runs as the owner, unprivileged",
            ));
        }
        Ok(Owner {
            name: name.to_string(),
            uid,
            gid,
            home: PathBuf::from(dir),
        })
    }
}

/// The daemon's unit: the owner, no capabilities, a preserved runtime dir (VM sockets live
/// there and VMs outlive the daemon).
pub fn daemon_unit(owner: &Owner, bin_dir: &Path, config: &Path) -> String {
    format!(
        "# Written by `banger system install`; `banger system uninstall` removes it.\n\
[Unit]\n\
Description=banger daemon (sandbox VMs)\n\
Requires={HELPER_UNIT}\n\
After={HELPER_UNIT} network-online.target\n\
\n\
[Service]\n\
Type=simple\n\
User={user}\n\
Group={gid}\n\
Environment=HOME={home}\n\
Environment=BANGER_CONFIG={config}\n\
ExecStart={bin}/bangerd --config {config}\n\
RuntimeDirectory=banger\n\
RuntimeDirectoryMode=0700\n\
RuntimeDirectoryPreserve=yes\n\
# VMMs run in their own sessions; stopping or restarting the daemon must not kill them.\n\
KillMode=process\n\
Restart=on-failure\n\
NoNewPrivileges=yes\n\
CapabilityBoundingSet=\n\
AmbientCapabilities=\n\
UMask=0077\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n",
        user = owner.name,
        gid = owner.gid,
        home = owner.home.display(),
        config = config.display(),
        bin = bin_dir.display(),
    )
}

/// The helper's unit: root, its own runtime dir for the socket.
pub fn helper_unit(owner: &Owner, bin_dir: &Path, config: &Path) -> String {
    format!(
        "# Written by `banger system install`; `banger system uninstall` removes it.\n\
[Unit]\n\
Description=banger root helper (bridge, taps, NAT for bangerd)\n\
After=network-online.target\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart={bin}/banger-helper serve --socket {HELPER_SOCKET} --owner {uid} --config {config}\n\
RuntimeDirectory=banger-helper\n\
RuntimeDirectoryMode=0755\n\
KillMode=process\n\
Restart=on-failure\n\
UMask=0077\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n",
        uid = owner.uid,
        config = config.display(),
        bin = bin_dir.display(),
    )
}

/// The config a system install starts from; an existing file is kept.
pub fn default_config(paths: &SystemPaths) -> String {
    format!(
        "# Written by `banger system install`; every key is documented in docs/config.md.\n\
state_dir = \"{state}\"\n\
runtime_dir = \"{DAEMON_RUNTIME}\"\n\
cache_dir = \"{cache}\"\n\
helper_socket = \"{HELPER_SOCKET}\"\n",
        state = paths.state().display(),
        cache = paths.cache().display(),
    )
}

fn systemd_running(paths: &SystemPaths) -> bool {
    paths.root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn io_err(what: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::local(format!("{}: {e}", what.display()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn owned_dir(path: &Path, owner: &Owner) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    // State left by a root setup (install.sh) becomes the owner's, all of it: the unprivileged
    // daemon must be able to write its database, images and VM dirs.
    chown_tree(path, owner)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io_err(path))
}

/// `chown -R` without following symlinks (a link is re-owned itself, never its target).
fn chown_tree(path: &Path, owner: &Owner) -> Result<(), CliError> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).map_err(io_err(path))?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            chown_tree(&entry.path(), owner)?;
        }
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<(), CliError> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| CliError::local(format!("systemctl: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CliError::local(format!(
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn require_root() -> Result<(), CliError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CliError::input(
            "banger system install/uninstall change /etc and systemd units: run as root (sudo)",
        ));
    }
    Ok(())
}

/// `system install --owner USER`: the two units, config, install record and the state and
/// cache dirs owned by the owner; starts both services where systemd runs.
pub fn install(
    out: &mut dyn Write,
    owner: &str,
    paths: &SystemPaths,
    bin_dir: &Path,
) -> Result<(), CliError> {
    if paths.root == Path::new("/") {
        require_root()?;
    }
    let owner = Owner::lookup(owner)?;
    // A daemon already running here (the quick root setup) owns VMs whose VMMs run as root;
    // an unprivileged daemon could not manage them. Stop it (and its VMs) first.
    let running = Path::new(DAEMON_RUNTIME).join("bangerd.sock");
    if paths.root == Path::new("/") && std::os::unix::net::UnixStream::connect(&running).is_ok() {
        return Err(CliError::local(format!(
            "a banger daemon is running ({}): stop its VMs and the daemon first (banger vm stop …; banger daemon stop), then install",
            running.display()
        )));
    }
    for bin in ["bangerd", "banger-helper"] {
        if !bin_dir.join(bin).is_file() {
            return Err(CliError::local(format!(
                "{} is missing: install banger's binaries first (./scripts/install.sh)",
                bin_dir.join(bin).display()
            )));
        }
    }
    let say = |out: &mut dyn Write, line: String| {
        let _ = writeln!(out, "{line}");
    };
    std::fs::create_dir_all(paths.etc()).map_err(io_err(&paths.etc()))?;
    if paths.config().exists() {
        say(out, format!("kept {}", paths.config().display()));
    } else {
        write_file(&paths.config(), &default_config(paths), 0o644)?;
        say(out, format!("wrote {}", paths.config().display()));
    }
    let record = format!(
        "# Written by `banger system install`.\nowner = \"{}\"\nuid = {}\ngid = {}\nhome = \"{}\"\nversion = \"{}\"\ninstalled_at = {}\n",
        owner.name,
        owner.uid,
        owner.gid,
        owner.home.display(),
        env!("CARGO_PKG_VERSION"),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    write_file(&paths.record(), &record, 0o644)?;
    say(out, format!("wrote {}", paths.record().display()));
    for dir in [paths.state(), paths.cache()] {
        owned_dir(&dir, &owner)?;
        say(
            out,
            format!("{} owned by {} (0700)", dir.display(), owner.name),
        );
    }
    std::fs::create_dir_all(paths.units()).map_err(io_err(&paths.units()))?;
    write_file(
        &paths.units().join(HELPER_UNIT),
        &helper_unit(&owner, bin_dir, &paths.config()),
        0o644,
    )?;
    write_file(
        &paths.units().join(DAEMON_UNIT),
        &daemon_unit(&owner, bin_dir, &paths.config()),
        0o644,
    )?;
    say(
        out,
        format!(
            "wrote {} and {} in {}",
            HELPER_UNIT,
            DAEMON_UNIT,
            paths.units().display()
        ),
    );
    if systemd_running(paths) {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", HELPER_UNIT])?;
        systemctl(&["enable", "--now", DAEMON_UNIT])?;
        say(out, format!("started {HELPER_UNIT} and {DAEMON_UNIT}"));
    } else {
        say(
            out,
            format!(
                "systemd is not running here: start the two services yourself:\n  {bin}/banger-helper serve --socket {HELPER_SOCKET} --owner {uid} --config {cfg}   # as root\n  BANGER_CONFIG={cfg} {bin}/bangerd                                  # as {user}",
                bin = bin_dir.display(),
                uid = owner.uid,
                cfg = paths.config().display(),
                user = owner.name
            ),
        );
    }
    Ok(())
}

/// `system uninstall [--purge]`: stops and removes the units, removes banger's bridge,
/// nftables table and taps (through `banger-helper remove-all`), the install record; with
/// `--purge` also the config, state and cache.
pub fn uninstall(
    out: &mut dyn Write,
    purge: bool,
    paths: &SystemPaths,
    bin_dir: &Path,
) -> Result<(), CliError> {
    if paths.root == Path::new("/") {
        require_root()?;
    }
    let mut errors = Vec::new();
    let say = |out: &mut dyn Write, line: String| {
        let _ = writeln!(out, "{line}");
    };
    if systemd_running(paths) {
        for unit in [DAEMON_UNIT, HELPER_UNIT] {
            if let Err(e) = systemctl(&["disable", "--now", unit]) {
                errors.push(e.to_string());
            }
        }
    }
    // Host network state: the helper binary owns that code (bridge, table, taps).
    let helper = bin_dir.join("banger-helper");
    if helper.is_file() && paths.root == Path::new("/") {
        let st = Command::new(&helper)
            .args(["remove-all", "--config"])
            .arg(paths.config())
            .status();
        match st {
            Ok(s) if s.success() => say(
                out,
                "removed banger's bridge, taps and nftables table".into(),
            ),
            Ok(s) => errors.push(format!("banger-helper remove-all exited with {s}")),
            Err(e) => errors.push(format!("{}: {e}", helper.display())),
        }
    }
    for unit in [DAEMON_UNIT, HELPER_UNIT] {
        let p = paths.units().join(unit);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => say(out, format!("removed {}", p.display())),
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            }
        }
    }
    if systemd_running(paths) {
        let _ = systemctl(&["daemon-reload"]);
    }
    let _ = std::fs::remove_file(paths.record());
    if purge {
        for dir in [paths.state(), paths.cache(), paths.etc()] {
            if dir.exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => say(out, format!("removed {}", dir.display())),
                    Err(e) => errors.push(format!("{}: {e}", dir.display())),
                }
            }
        }
    } else {
        say(
            out,
            format!(
                "kept {}, {} and {} (--purge removes them)",
                paths.config().display(),
                paths.state().display(),
                paths.cache().display()
            ),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::local(errors.join("; ")))
    }
}

/// `system status`: the install record, the units' states and whether the sockets answer.
pub fn status(out: &mut dyn Write, paths: &SystemPaths) -> Result<(), CliError> {
    let record = std::fs::read_to_string(paths.record()).ok();
    let mut lines = Vec::new();
    match &record {
        Some(r) => {
            let v: toml::Value =
                toml::from_str(r).unwrap_or(toml::Value::Table(Default::default()));
            lines.push(format!(
                "installed: yes (owner {}, uid {}, version {})",
                v.get("owner").and_then(|x| x.as_str()).unwrap_or("?"),
                v.get("uid").and_then(|x| x.as_integer()).unwrap_or(-1),
                v.get("version").and_then(|x| x.as_str()).unwrap_or("?")
            ));
        }
        None => lines.push(format!(
            "installed: no ({} missing; `banger system install --owner USER`)",
            paths.record().display()
        )),
    }
    for unit in [HELPER_UNIT, DAEMON_UNIT] {
        let file = paths.units().join(unit);
        let state = if !file.exists() {
            "no unit file".to_string()
        } else if systemd_running(paths) {
            Command::new("systemctl")
                .args(["is-active", unit])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|e| format!("systemctl: {e}"))
        } else {
            "unit file present (systemd not running)".to_string()
        };
        lines.push(format!("{unit}: {state}"));
    }
    let sock = |p: &Path| {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            "answers"
        } else if p.exists() {
            "present but not answering"
        } else {
            "absent"
        }
    };
    lines.push(format!(
        "helper socket {HELPER_SOCKET}: {}",
        sock(Path::new(HELPER_SOCKET))
    ));
    let daemon_sock = Path::new(DAEMON_RUNTIME).join("bangerd.sock");
    lines.push(format!(
        "daemon socket {}: {}",
        daemon_sock.display(),
        sock(&daemon_sock)
    ));
    writeln!(out, "{}", lines.join("\n")).map_err(|e| CliError::local(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            name: "dev".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/dev".into(),
        }
    }

    #[test]
    fn units_run_unprivileged_and_keep_vms_alive() {
        let d = daemon_unit(
            &owner(),
            Path::new("/usr/local/bin"),
            Path::new("/etc/banger/config.toml"),
        );
        for want in [
            "User=dev",
            "KillMode=process",
            "CapabilityBoundingSet=\n",
            "NoNewPrivileges=yes",
            "RuntimeDirectoryPreserve=yes",
            "ExecStart=/usr/local/bin/bangerd --config /etc/banger/config.toml",
            "Requires=banger-helper.service",
        ] {
            assert!(d.contains(want), "daemon unit lacks {want:?}:\n{d}");
        }
        let h = helper_unit(
            &owner(),
            Path::new("/usr/local/bin"),
            Path::new("/etc/banger/config.toml"),
        );
        for want in [
            "KillMode=process",
            "--owner 1000",
            "--socket /run/banger-helper/helper.sock",
        ] {
            assert!(h.contains(want), "helper unit lacks {want:?}:\n{h}");
        }
        assert!(!h.contains("User="), "the helper is the one root process");
    }

    #[test]
    fn systemd_accepts_the_units() {
        if !Path::new("/usr/bin/systemd-analyze").is_file() {
            println!("SKIP: systemd-analyze is not installed");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for b in ["bangerd", "banger-helper"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(bin.join(b), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(bin.join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let nobody = Owner {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
        };
        let cfg = t.path().join("config.toml");
        std::fs::write(t.path().join(DAEMON_UNIT), daemon_unit(&nobody, &bin, &cfg)).unwrap();
        std::fs::write(t.path().join(HELPER_UNIT), helper_unit(&nobody, &bin, &cfg)).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(t.path().join(DAEMON_UNIT))
            .arg(t.path().join(HELPER_UNIT))
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Complaints about the host's own units are not ours; ours are named by file.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains(DAEMON_UNIT) || l.contains(HELPER_UNIT))
            .collect();
        assert!(out.status.success() && ours.is_empty(), "{err}");
    }

    #[test]
    fn bad_owner_names_are_refused() {
        for bad in ["", "-rf", "a b", "root", "x/y", &"u".repeat(40)] {
            assert!(Owner::lookup(bad).is_err(), "{bad:?}");
        }
        assert!(
            Owner::lookup("no-such-user-banger")
                .unwrap_err()
                .to_string()
                .contains("no user")
        );
    }

    #[test]
    fn install_writes_everything_and_uninstall_purges_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: chowning the state dir needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let paths = SystemPaths {
            root: t.path().join("root"),
        };
        let bin = t.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let mut out = Vec::new();
        let err = install(&mut out, "nobody", &paths, &bin).unwrap_err();
        assert!(err.to_string().contains("bangerd is missing"), "{err}");
        for b in ["bangerd", "banger-helper"] {
            std::fs::write(bin.join(b), "#!/bin/sh\n").unwrap();
        }
        install(&mut out, "nobody", &paths, &bin).unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        assert!(text.contains("systemd is not running"), "{text}");
        let cfg = std::fs::read_to_string(paths.config()).unwrap();
        assert!(cfg.contains("helper_socket = \"/run/banger-helper/helper.sock\""));
        let record = std::fs::read_to_string(paths.record()).unwrap();
        assert!(record.contains("owner = \"nobody\""), "{record}");
        use std::os::unix::fs::MetadataExt;
        let nobody = Owner::lookup("nobody").unwrap();
        let m = std::fs::metadata(paths.state()).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (nobody.uid, 0o700));
        // State of an earlier root setup becomes the owner's; a symlink in it is re-owned
        // itself, never its target.
        std::fs::create_dir_all(paths.state().join("images/x")).unwrap();
        std::fs::write(paths.state().join("banger.db"), b"db").unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"o").unwrap();
        std::os::unix::fs::symlink(&outside, paths.state().join("link")).unwrap();
        install(&mut Vec::new(), "nobody", &paths, &bin).unwrap();
        for p in ["banger.db", "images", "images/x"] {
            let m = std::fs::metadata(paths.state().join(p)).unwrap();
            assert_eq!(m.uid(), nobody.uid, "{p}");
        }
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);
        assert!(paths.units().join(DAEMON_UNIT).is_file());
        assert!(paths.units().join(HELPER_UNIT).is_file());
        // A second install keeps the (possibly edited) config.
        std::fs::write(paths.config(), "log_level = \"debug\"\n").unwrap();
        install(&mut Vec::new(), "nobody", &paths, &bin).unwrap();
        assert_eq!(
            std::fs::read_to_string(paths.config()).unwrap(),
            "log_level = \"debug\"\n"
        );
        let mut s = Vec::new();
        status(&mut s, &paths).unwrap();
        let s = String::from_utf8_lossy(&s).to_string();
        assert!(s.contains("installed: yes (owner nobody"), "{s}");

        uninstall(&mut Vec::new(), false, &paths, &bin).unwrap();
        assert!(!paths.units().join(DAEMON_UNIT).exists());
        assert!(paths.config().exists() && paths.state().exists());
        uninstall(&mut Vec::new(), true, &paths, &bin).unwrap();
        assert!(!paths.config().exists() && !paths.state().exists() && !paths.cache().exists());
    }
}
