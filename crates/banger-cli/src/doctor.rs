//! `banger doctor`: read-only checks of this host and of banger's state, one line each:
//! `PASS|WARN|FAIL  <check>: <detail>`. The exit code is 1 when any check FAILs.
//!
//! Doctor never starts bangerd (a start reconciles, which changes state): when no daemon
//! answers, that is a WARN and the checks that need it are skipped. Everything else is read
//! from the host. The one write is the reflink probe, a pair of tiny temp files in the state
//! dir's filesystem, removed at once. Checks that need root report what they could not see
//! instead of failing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_config::{Config, ConfigError, HostInfo, NetworkMode, RootDiskStrategy, VmmChoice};
use banger_protocol::{DaemonStatus, LeakReport, Request};
use banger_vmm::qemu::{Accel, Qemu, detect_accel};

use crate::error::CliError;
use crate::{Ctx, client};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub name: String,
    pub detail: String,
}

impl Check {
    fn new(level: Level, name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            level,
            name: name.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  {}: {}", self.level, self.name, self.detail)
    }
}

/// Why a probe could not run; names its input.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("running {program} --version: {source}")]
    Run {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} --version failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs doctor with a loaded configuration and prints the report.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let mut checks = vec![platform()];
    let loaded = HostInfo::detect()
        .map_err(|e| e.to_string())
        .and_then(|host| {
            let path = ctx
                .daemon
                .config
                .clone()
                .unwrap_or_else(|| Config::default_path_for(&host));
            Config::load(&path, &host)
                .map(|c| (path, c))
                .map_err(|e: ConfigError| e.to_string())
        });
    let config = match loaded {
        Ok((path, config)) => {
            let how = if path.is_file() {
                format!("{} loads", path.display())
            } else {
                format!("{} does not exist; using the defaults", path.display())
            };
            checks.push(Check::new(Level::Pass, "config", how));
            Some(config)
        }
        Err(e) => {
            checks.push(Check::new(Level::Fail, "config", e));
            None
        }
    };
    checks.extend(host_checks(config.as_ref()));
    if let Some(config) = &config {
        checks.extend(root_disk_checks(config));
    }
    checks.push(migrations(ctx.daemon.config.as_deref()));
    checks.extend(daemon_checks(ctx, config.as_ref()));
    print(ctx, &checks)
}

/// Doctor when the configuration does not even load (the CLI cannot find its daemon): the
/// host checks and a FAIL for the config. Returns the exit code.
pub fn run_without_config(error: &CliError, out: &mut dyn std::io::Write) -> i32 {
    let mut checks = vec![platform()];
    let reason = error
        .line()
        .map(|l| l.trim_start_matches("banger: ").to_string())
        .unwrap_or_else(|| "cannot be loaded".into());
    checks.push(Check::new(Level::Fail, "config", reason));
    checks.extend(host_checks(None));
    for c in &checks {
        let _ = writeln!(out, "{c}");
    }
    CliError::FAILURE
}

fn print(ctx: &mut Ctx<'_>, checks: &[Check]) -> Result<(), CliError> {
    let text: String = checks.iter().map(|c| format!("{c}\n")).collect();
    ctx.print(&text)?;
    let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
    if fails > 0 {
        ctx.note(&format!(
            "banger: doctor: {fails} check{} failed",
            if fails == 1 { "" } else { "s" }
        ));
        return Err(CliError::reported(CliError::FAILURE));
    }
    Ok(())
}

fn platform() -> Check {
    let arch = std::env::consts::ARCH;
    if arch == "x86_64" {
        Check::new(Level::Pass, "platform", "x86_64 Linux")
    } else {
        Check::new(
            Level::Fail,
            "platform",
            format!("{arch}: banger runs x86_64 guests on x86_64 hosts only"),
        )
    }
}

/// A program in PATH, or in the sbin dirs an unprivileged PATH often lacks.
pub fn which(name: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let sbin = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|d| d.is_absolute())
        .chain(sbin)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find(name: &str) -> Option<PathBuf> {
    which(name, std::env::var_os("PATH").as_deref())
}

/// `<program> --version`'s first line.
fn version_line(program: &Path) -> Result<String, ProbeError> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProbeError::Run {
            program: program.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProbeError::Failed {
            program: program.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// What the host offers, whatever the daemon's state: VMMs, KVM, devices and programs.
fn host_checks(config: Option<&Config>) -> Vec<Check> {
    let mut v = Vec::new();
    let choice = config.map(|c| c.vmm).unwrap_or(VmmChoice::Auto);

    let qemu = config
        .and_then(|c| c.qemu_bin.clone())
        .or_else(Qemu::find_binary);
    let qemu_needed = choice == VmmChoice::Qemu;
    v.push(match qemu {
        Some(bin) => match version_line(&bin) {
            Ok(line) => Check::new(Level::Pass, "qemu", format!("{} ({line})", bin.display())),
            Err(e) => Check::new(Level::Fail, "qemu", e.to_string()),
        },
        None => Check::new(
            if qemu_needed {
                Level::Fail
            } else {
                Level::Warn
            },
            "qemu",
            "qemu-system-x86_64 not found: apt-get install qemu-system-x86 (or set qemu_bin)",
        ),
    });

    let fc = config
        .and_then(|c| c.firecracker_bin.clone())
        .or_else(|| find("firecracker"));
    let fc_needed = choice == VmmChoice::Firecracker;
    v.push(match fc {
        Some(bin) => match version_line(&bin) {
            Ok(line) => match banger_vmm::firecracker::parse_version_output(&line) {
                Some(ver) if ver < banger_vmm::firecracker::MIN_VERSION => Check::new(
                    Level::Fail,
                    "firecracker",
                    format!(
                        "{} is {ver}, older than the {} banger needs",
                        bin.display(),
                        banger_vmm::firecracker::MIN_VERSION
                    ),
                ),
                Some(ver) => Check::new(
                    Level::Pass,
                    "firecracker",
                    format!("{} ({ver})", bin.display()),
                ),
                None => Check::new(
                    Level::Warn,
                    "firecracker",
                    format!("{}: unexpected --version output {line:?}", bin.display()),
                ),
            },
            Err(e) => Check::new(Level::Fail, "firecracker", e.to_string()),
        },
        None => Check::new(
            if fc_needed { Level::Fail } else { Level::Warn },
            "firecracker",
            "not installed (optional: vmm = auto uses QEMU without it)",
        ),
    });

    v.push(kvm_check(choice, &detect_accel()));

    v.push(match std::fs::metadata("/dev/net/tun") {
        Ok(_) => Check::new(Level::Pass, "/dev/net/tun", "present"),
        Err(e) => Check::new(
            Level::Warn,
            "/dev/net/tun",
            format!("{e}: taps cannot be made (network = \"none\" still works)"),
        ),
    });

    let bridge = config.is_none_or(|c| c.network == NetworkMode::Bridge);
    let programs: [(&str, &str, Level, &str); 7] = [
        (
            "ip",
            "iproute2",
            if bridge { Level::Fail } else { Level::Warn },
            "bridge and taps",
        ),
        (
            "nft",
            "nftables",
            if bridge { Level::Fail } else { Level::Warn },
            "the bridge's firewall (guests off the host) and --nat",
        ),
        (
            "ssh",
            "openssh-client",
            Level::Fail,
            "vm ssh, vm run, vm exec",
        ),
        (
            "ssh-keygen",
            "openssh-client",
            Level::Fail,
            "VM host and user keys",
        ),
        ("mkfs.ext4", "e2fsprogs", Level::Fail, "work disks"),
        ("mmdebstrap", "mmdebstrap", Level::Warn, "image build"),
        ("gpgv", "gpgv", Level::Warn, "kernel pull signature checks"),
    ];
    for (name, package, missing, used_for) in programs {
        v.push(match find(name) {
            Some(p) => Check::new(Level::Pass, name, p.display().to_string()),
            None => Check::new(
                missing,
                name,
                format!("not found, needed for {used_for}: apt-get install {package}"),
            ),
        });
    }
    // The keyring banger-kernel's Debian mirror checks Release files with.
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    v.push(if keyring.is_file() {
        Check::new(Level::Pass, "debian keyring", keyring.display().to_string())
    } else {
        Check::new(
            Level::Warn,
            "debian keyring",
            format!(
                "{} missing, needed for kernel pull and image build: apt-get install debian-archive-keyring",
                keyring.display()
            ),
        )
    });
    v
}

/// The nearest existing directory at or above `dir` (the state dir may not exist yet).
fn existing_ancestor(dir: &Path) -> Option<&Path> {
    dir.ancestors().find(|d| d.is_dir())
}

/// Whether the filesystem of `dir` clones files (FICLONE): a one-byte file cloned to a second
/// one, both removed again.
pub fn reflink_works(dir: &Path) -> Result<bool, ProbeError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let tag = format!(".banger-doctor-{}", std::process::id());
    let src = dir.join(format!("{tag}.src"));
    let dst = dir.join(format!("{tag}.dst"));
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ProbeError::Io { what, path, source }
    };
    let result = (|| {
        let mut s = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src)
            .map_err(io("creating", &src))?;
        s.write_all(b"x").map_err(io("writing", &src))?;
        s.sync_all().map_err(io("syncing", &src))?;
        let d = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(io("creating", &dst))?;
        // SAFETY: both fds are open for the duration of the call; FICLONE takes the source fd
        // as its integer argument and touches no memory of ours.
        let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE, s.as_raw_fd()) };
        Ok(rc == 0)
    })();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    result
}

fn root_disk_checks(config: &Config) -> Vec<Check> {
    let chosen = config.root_disk;
    let mut works = vec![RootDiskStrategy::Overlay, RootDiskStrategy::Copy];
    let mut notes = Vec::new();
    match existing_ancestor(&config.state_dir) {
        Some(dir) => match reflink_works(dir) {
            Ok(true) => works.push(RootDiskStrategy::Reflink),
            Ok(false) => notes.push(format!(
                "reflink: the filesystem of {} does not clone files",
                dir.display()
            )),
            Err(e) => notes.push(format!("reflink: cannot probe: {e}")),
        },
        None => notes.push(format!(
            "reflink: no directory of {} exists to probe",
            config.state_dir.display()
        )),
    }
    if Path::new("/dev/mapper/control").exists() {
        works.push(RootDiskStrategy::DmSnapshot);
    } else {
        notes.push("dm-snapshot: no /dev/mapper/control".into());
    }
    let names: Vec<&str> = works.iter().map(|s| s.as_str()).collect();
    let mut detail = format!("works here: {}", names.join(", "));
    if !notes.is_empty() {
        detail.push_str(&format!("; not: {}", notes.join("; ")));
    }
    let level = if works.contains(&chosen) {
        Level::Pass
    } else {
        Level::Fail
    };
    vec![Check::new(
        level,
        "root disk",
        format!("root_disk = \"{}\"; {detail}", chosen.as_str()),
    )]
}

/// `bangerd --check-migrations`: 0 up to date, 1 would migrate, 2 newer than this banger.
fn migrations(config: Option<&Path>) -> Check {
    let exe = std::env::current_exe().ok();
    let path_var = std::env::var_os("PATH");
    let Some(bangerd) = crate::autostart::locate_bangerd(exe.as_deref(), path_var.as_deref())
    else {
        return Check::new(
            Level::Warn,
            "store",
            "no bangerd executable beside banger or in PATH to check the store with",
        );
    };
    let mut cmd = Command::new(&bangerd);
    cmd.arg("--check-migrations").stdin(Stdio::null());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    match cmd.output() {
        Ok(out) => {
            let said = String::from_utf8_lossy(if out.stdout.is_empty() {
                &out.stderr
            } else {
                &out.stdout
            })
            .trim()
            .to_string();
            match out.status.code() {
                Some(0) => Check::new(Level::Pass, "store", said),
                Some(1) if !out.stdout.is_empty() => Check::new(
                    Level::Warn,
                    "store",
                    format!("{said}; bangerd migrates it at its next start"),
                ),
                Some(2) => Check::new(Level::Fail, "store", said),
                _ => Check::new(
                    Level::Fail,
                    "store",
                    format!("{} --check-migrations: {said}", bangerd.display()),
                ),
            }
        }
        Err(e) => Check::new(
            Level::Warn,
            "store",
            format!("running {}: {e}", bangerd.display()),
        ),
    }
}

/// Checks that ask the running daemon; one WARN when there is none.
fn daemon_checks(ctx: &mut Ctx<'_>, config: Option<&Config>) -> Vec<Check> {
    ctx.daemon.autostart = false;
    let socket = ctx.daemon.socket.clone();
    match client::connect(&socket) {
        Ok(_) => {}
        Err(e) if e.is_not_running() => {
            let mut v = vec![Check::new(
                Level::Warn,
                "daemon",
                format!(
                    "bangerd is not running (no answer on {}); doctor does not start it, so the DNS and leak checks are skipped: banger daemon start",
                    socket.display()
                ),
            )];
            if config.is_some_and(|c| c.vmm == VmmChoice::Auto) {
                v.push(Check::new(
                    Level::Pass,
                    "vmm",
                    format!("auto: {}", local_auto()),
                ));
            }
            return v;
        }
        Err(e) => {
            return vec![Check::new(
                Level::Fail,
                "daemon",
                format!(
                    "cannot connect to {}: {}",
                    socket.display(),
                    crate::describe_call_error(&e)
                ),
            )];
        }
    }
    let status: DaemonStatus = match ctx
        .request(&Request::DaemonStatus)
        .and_then(|a| a.decode("daemon.status"))
    {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::new(
                Level::Fail,
                "daemon",
                e.line().unwrap_or_else(|| "daemon.status failed".into()),
            )];
        }
    };
    let mut v = Vec::new();
    let mine = env!("CARGO_PKG_VERSION");
    v.push(if status.version == mine {
        Check::new(
            Level::Pass,
            "daemon",
            format!(
                "bangerd {} (pid {}) answers on {}",
                status.version,
                status.pid,
                status.socket.display()
            ),
        )
    } else {
        Check::new(
            Level::Warn,
            "daemon",
            format!(
                "bangerd is {} but this banger is {mine}: restart it with banger daemon stop",
                status.version
            ),
        )
    });
    v.push(Check::new(Level::Pass, "vmm", status.vmm.clone()));
    v.push(match &status.dns {
        Some(dns) => match (&dns.listen, &dns.error) {
            (Some(addr), _) => Check::new(
                Level::Pass,
                "dns",
                format!(
                    "<name>.vm is answered on {addr}; to resolve it from the host: {}",
                    dns.recipe
                ),
            ),
            (None, err) => Check::new(
                Level::Warn,
                "dns",
                format!(
                    "{}; resolver recipe: {}",
                    err.as_deref().unwrap_or("the responder is not running"),
                    dns.recipe
                ),
            ),
        },
        None => Check::new(Level::Warn, "dns", "this bangerd reports no DNS status"),
    });
    let generated = status
        .ssh_config
        .clone()
        .unwrap_or_else(|| status.state_dir.join("ssh").join("ssh_config"));
    v.push(ssh_config_check(&generated));
    v.extend(leak_checks(ctx));
    v
}

/// The `kvm` line for the configured backend. Only QEMU falls back to TCG: with
/// `vmm = "firecracker"` an unusable KVM means no VM can start, and the line says so.
fn kvm_check(choice: VmmChoice, probe: &banger_vmm::qemu::AccelProbe) -> Check {
    match (probe.accel, choice) {
        (Accel::Kvm, VmmChoice::Firecracker) => Check::new(
            Level::Pass,
            "kvm",
            format!("{}: Firecracker can run guests", probe.reason),
        ),
        (Accel::Kvm, _) => Check::new(Level::Pass, "kvm", probe.reason.clone()),
        (Accel::Tcg, VmmChoice::Firecracker) => Check::new(
            Level::Fail,
            "kvm",
            format!(
                "not usable, and vmm = \"firecracker\" needs it (Firecracker has no software \
                 fallback, no VM can start): {}; set vmm = \"auto\" or \"qemu\" to run guests \
                 under QEMU TCG",
                probe.reason
            ),
        ),
        (Accel::Tcg, _) => Check::new(
            Level::Warn,
            "kvm",
            format!(
                "not usable, guests run under QEMU TCG (slow): {}",
                probe.reason
            ),
        ),
    }
}

/// `vmm = auto`'s choice seen from here, when no daemon can say.
fn local_auto() -> String {
    let probe = detect_accel();
    match (probe.accel, find("firecracker").is_some()) {
        (Accel::Kvm, true) => "firecracker (hardware KVM)".into(),
        (Accel::Kvm, false) => "qemu-kvm (Firecracker not installed)".into(),
        (Accel::Tcg, _) => format!("qemu-tcg ({})", probe.reason),
    }
}

fn ssh_config_check(generated: &Path) -> Check {
    let user = match crate::ssh_config::user_config_path() {
        Ok(p) => p,
        Err(e) => {
            return Check::new(
                Level::Warn,
                "ssh-config",
                e.line().unwrap_or_else(|| "no ~/.ssh/config".into()),
            );
        }
    };
    let current = match std::fs::read_to_string(&user) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Check::new(
                Level::Warn,
                "ssh-config",
                format!("reading {}: {e}", user.display()),
            );
        }
    };
    match crate::ssh_config::install_text(current.as_deref(), generated, &user) {
        Ok(None) => Check::new(
            Level::Pass,
            "ssh-config",
            format!("{} includes {}", user.display(), generated.display()),
        ),
        Ok(Some(_)) => Check::new(
            Level::Warn,
            "ssh-config",
            format!(
                "{} does not include banger's {}: ssh NAME.vm needs banger ssh-config --install",
                user.display(),
                generated.display()
            ),
        ),
        Err(e) => Check::new(Level::Warn, "ssh-config", e),
    }
}

fn leak_checks(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let report: LeakReport = match ctx
        .request(&Request::DaemonLeaks)
        .and_then(|a| a.decode("daemon.leaks"))
    {
        Ok(r) => r,
        Err(e) => {
            return vec![Check::new(
                Level::Warn,
                "leaks",
                e.line().unwrap_or_else(|| "daemon.leaks failed".into()),
            )];
        }
    };
    let mut v: Vec<Check> = report
        .leaks
        .iter()
        .map(|l| {
            Check::new(
                Level::Warn,
                format!("leak {} {}", l.kind, l.name),
                l.detail.clone(),
            )
        })
        .collect();
    if v.is_empty() {
        v.push(Check::new(
            Level::Pass,
            "leaks",
            "no host resource with banger's marks is unaccounted for",
        ));
    }
    v.extend(
        report
            .unchecked
            .iter()
            .map(|u| Check::new(Level::Warn, "leaks unchecked", u.clone())),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        let c = Check::new(Level::Warn, "leak tap bgt0123456789ab", "on no bridge");
        assert_eq!(
            c.to_string(),
            "WARN  leak tap bgt0123456789ab: on no bridge"
        );
        assert_eq!(Check::new(Level::Fail, "x", "y").to_string(), "FAIL  x: y");
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Pass);
    }

    #[test]
    fn kvm_line_follows_the_configured_backend() {
        let tcg = banger_vmm::qemu::AccelProbe {
            accel: Accel::Tcg,
            reason: "/dev/kvm is PVM".into(),
        };
        let kvm = banger_vmm::qemu::AccelProbe {
            accel: Accel::Kvm,
            reason: "/dev/kvm is usable and the CPU advertises svm".into(),
        };
        let c = kvm_check(VmmChoice::Firecracker, &tcg);
        assert_eq!(c.level, Level::Fail);
        assert!(
            !c.detail.contains("guests run under QEMU TCG"),
            "{}",
            c.detail
        );
        assert!(
            c.detail.contains("Firecracker") && c.detail.contains("PVM"),
            "{}",
            c.detail
        );
        for choice in [VmmChoice::Auto, VmmChoice::Qemu] {
            let c = kvm_check(choice, &tcg);
            assert_eq!(c.level, Level::Warn);
            assert!(c.detail.contains("QEMU TCG"), "{}", c.detail);
        }
        let c = kvm_check(VmmChoice::Firecracker, &kvm);
        assert_eq!(c.level, Level::Pass);
        assert!(
            c.detail.contains("Firecracker can run guests"),
            "{}",
            c.detail
        );
    }

    /// On this host, whatever it is: the `kvm` line of `vmm = "firecracker"` never claims a
    /// QEMU fallback (it did: "guests run under QEMU TCG" above a start that could only fail).
    #[test]
    fn host_kvm_line_with_firecracker_configured() {
        let mut config = Config::defaults(&banger_config::HostInfo::new(2, 1 << 30, "/root", 0));
        config.vmm = VmmChoice::Firecracker;
        let checks = host_checks(Some(&config));
        let line = checks.iter().find(|c| c.name == "kvm").expect("a kvm line");
        match detect_accel().accel {
            Accel::Tcg => {
                assert_eq!(line.level, Level::Fail, "{}", line.detail);
                assert!(
                    !line.detail.contains("guests run under QEMU TCG"),
                    "{}",
                    line.detail
                );
            }
            Accel::Kvm => assert_eq!(line.level, Level::Pass, "{}", line.detail),
        }
    }

    #[test]
    fn which_searches_path_then_sbin() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("banger-doctor-probe");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([d.path()]).unwrap();
        assert_eq!(
            which("banger-doctor-probe", Some(&path)),
            None,
            "not executable"
        );
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(which("banger-doctor-probe", Some(&path)), Some(exe));
        // Relative PATH entries are ignored.
        let rel = std::ffi::OsString::from(".");
        assert_eq!(which("banger-doctor-probe", Some(&rel)), None);
    }

    #[test]
    fn reflink_probe_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        // tmpfs and ext4 say no, btrfs and XFS yes: either way it answers and cleans up.
        reflink_works(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let err = reflink_works(&d.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
