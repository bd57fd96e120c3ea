//! Executes checked requests: [`NetOps`] for the network, argv through [`CommandRunner`] for
//! `losetup`, `dmsetup` and `mmdebstrap`, [`HostOps`] for taps and loop probes.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use banger_net::{NetOps, RealNetOps};
use banger_sys::{Cmd, CommandRunner, RealRunner};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, RenameFlags, openat, renameat2};
use nix::sys::stat::Mode;
use serde_json::json;

use crate::config::HelperConfig;
use crate::error::HelperError;
use crate::host::{HostOps, RealHost};
use crate::protocol::{HelperRequest, PROTOCOL_VERSION};
use crate::validate::{self, Checked, LoopDevice, NewFile, SafeFile};

/// What an op answers: a JSON value, and for `OpenTap` a descriptor passed along with it.
#[derive(Debug)]
pub struct Outcome {
    pub value: serde_json::Value,
    pub fd: Option<OwnedFd>,
}

impl Outcome {
    fn value(value: serde_json::Value) -> Self {
        Outcome { value, fd: None }
    }

    fn unit() -> Self {
        Self::value(serde_json::Value::Null)
    }
}

/// The helper: its policy and the things that act on the host.
#[derive(Debug)]
pub struct Helper {
    cfg: HelperConfig,
    net: Arc<dyn NetOps>,
    runner: Arc<dyn CommandRunner>,
    host: Arc<dyn HostOps>,
    scratch_dir: PathBuf,
}

/// The fixed `mmdebstrap` options; only the suite, the package list, the output and the mirror
/// vary, each validated.
pub const MMDEBSTRAP_FIXED: &[&str] = &[
    "--variant=minbase",
    "--mode=root",
    "--format=tar",
    // Docs and translations are dead weight in a sandbox image.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

impl Helper {
    pub fn new(
        cfg: HelperConfig,
        net: Arc<dyn NetOps>,
        runner: Arc<dyn CommandRunner>,
        host: Arc<dyn HostOps>,
    ) -> Self {
        Helper {
            cfg,
            net,
            runner,
            host,
            scratch_dir: std::env::temp_dir(),
        }
    }

    /// The production helper: `ip`/`nft` through [`RealNetOps`], programs through
    /// [`RealRunner`], the real kernel; mmdebstrap's scratch space in `/var/tmp` (disk-backed,
    /// sticky, so nobody else can move the helper's private directory there).
    pub fn real(cfg: HelperConfig) -> Self {
        let runner: Arc<dyn CommandRunner> = Arc::new(RealRunner);
        let net = RealNetOps::new(runner.clone())
            .for_bridge(&cfg.bridge_name)
            .with_tap_owner(cfg.owner_uid);
        Helper::new(cfg, Arc::new(net), runner, Arc::new(RealHost::default()))
            .with_scratch_dir("/var/tmp")
    }

    /// Where `Debootstrap` makes its private working directory. It must be a directory only
    /// root can rename entries in (root-owned, or sticky like `/tmp`).
    pub fn with_scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scratch_dir = dir.into();
        self
    }

    pub fn config(&self) -> &HelperConfig {
        &self.cfg
    }

    /// Checks `req` and, if it passes, runs it.
    pub async fn handle(&self, req: &HelperRequest) -> Result<Outcome, HelperError> {
        let checked = validate::check_request(&self.cfg, self.host.as_ref(), req)?;
        self.run(checked).await
    }

    async fn run(&self, op: Checked) -> Result<Outcome, HelperError> {
        let net = |e: banger_net::NetError| HelperError::failed(e.to_string());
        Ok(match op {
            Checked::Ping => Outcome::value(json!({ "version": PROTOCOL_VERSION })),
            Checked::EnsureBridge {
                bridge,
                gateway,
                prefix,
            } => {
                self.net
                    .ensure_bridge(&bridge, gateway, prefix)
                    .await
                    .map_err(net)?;
                Outcome::unit()
            }
            Checked::CreateTap {
                tap,
                bridge,
                owner_uid,
            } => {
                self.net
                    .create_tap(&tap, &bridge, Some(owner_uid))
                    .await
                    .map_err(net)?;
                Outcome::unit()
            }
            Checked::DeleteTap { tap } => {
                self.net.delete_tap(&tap).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::ListTaps => {
                let taps = self.net.list_taps().await.map_err(net)?;
                Outcome::value(json!(taps.iter().map(|t| t.as_str()).collect::<Vec<_>>()))
            }
            Checked::EnsureNat { bridge, cidr } => {
                self.net.ensure_nat(&bridge, &cidr).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::AddVmNat { vm_id, ip, tap } => {
                self.net.add_vm_nat(&vm_id, ip, &tap).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::RemoveVmNat { vm_id } => {
                self.net.remove_vm_nat(&vm_id).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::ListNatVms => {
                Outcome::value(json!(self.net.list_nat_vms().await.map_err(net)?))
            }
            Checked::ForgetNeighbor { bridge, ip } => {
                self.net.forget_neighbor(&bridge, ip).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::RemoveAll { bridge } => {
                self.net.remove_all(bridge.as_ref()).await.map_err(net)?;
                Outcome::unit()
            }
            Checked::OpenTap { tap } => {
                let fd = self.host.open_tap(&tap, &self.cfg.bridge_name)?;
                Outcome {
                    value: json!({ "tap": tap.as_str() }),
                    fd: Some(fd),
                }
            }
            Checked::LoopAttach { file, read_only } => {
                Outcome::value(json!(self.loop_attach(&file, read_only).await?.path()))
            }
            Checked::LoopDetach { device, attached } => {
                if attached {
                    self.loop_detach(device).await?;
                }
                Outcome::unit()
            }
            Checked::DmSnapshotCreate { vm_id, origin, cow } => {
                if !self.host.has_device_mapper() {
                    return Err(HelperError::failed(
                        "this host lacks device-mapper (no /dev/mapper/control)",
                    ));
                }
                let sectors = self.host.block_sectors(origin)?;
                let name = validate::dm_name(&vm_id);
                // A persistent snapshot with 4 KiB chunks: the COW survives stop/start.
                let table = format!("0 {sectors} snapshot {origin} {cow} P 8");
                let cmd = Cmd::new("dmsetup").args(["create", name.as_str(), "--table", &table]);
                self.runner
                    .run(&cmd)
                    .await
                    .map_err(|e| HelperError::failed(e.to_string()))?;
                Outcome::value(json!(format!("/dev/mapper/{name}")))
            }
            Checked::DmRemove { vm_id } => {
                self.dm_remove(&validate::dm_name(&vm_id)).await?;
                Outcome::unit()
            }
            Checked::Debootstrap {
                suite,
                mirror,
                packages,
                output,
            } => self.debootstrap(&suite, &mirror, &packages, output).await?,
        })
    }

    async fn loop_attach(
        &self,
        file: &SafeFile,
        read_only: bool,
    ) -> Result<LoopDevice, HelperError> {
        let mut cmd = Cmd::new("losetup").args(["--find", "--show"]);
        if read_only {
            cmd = cmd.arg("--read-only");
        }
        let cmd = cmd.arg(&file.path);
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|e| HelperError::failed(e.to_string()))?;
        let text = String::from_utf8_lossy(&out);
        let dev = validate::loop_device("losetup output", text.trim()).map_err(|_| {
            HelperError::failed(format!(
                "losetup --find --show printed {:?}, not a /dev/loopN path",
                text.trim()
            ))
        })?;
        // losetup opened the path by name; the checked file is the inode held in `file.fd`.
        // If something was swapped in between, the device is released before anyone learns
        // its name.
        let same = self
            .host
            .loop_backing(dev)?
            .is_some_and(|b| b.dev == file.dev && b.ino == file.ino);
        if !same {
            let _ = self.loop_detach(dev).await;
            return Err(HelperError::forbidden(format!(
                "path: {:?} changed while it was being attached; {dev} was released",
                file.path.display().to_string()
            )));
        }
        Ok(dev)
    }

    async fn loop_detach(&self, dev: LoopDevice) -> Result<(), HelperError> {
        let cmd = Cmd::new("losetup").args(["--detach".to_string(), dev.path()]);
        match self.runner.run(&cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("No such device") => Ok(()),
            Err(e) => Err(HelperError::failed(e.to_string())),
        }
    }

    /// `dmsetup remove`, retried while the mapping is busy (its VMM has just exited); a mapping
    /// that does not exist is fine.
    async fn dm_remove(&self, name: &str) -> Result<(), HelperError> {
        let cmd = Cmd::new("dmsetup").args(["remove", name]);
        let mut last = String::new();
        for attempt in 0..5u32 {
            match self.runner.run(&cmd).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    last = e.to_string();
                    if last.contains("No such device") || last.contains("not found") {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        Err(HelperError::failed(last))
    }

    /// mmdebstrap writes into a fresh root-only directory; the tar is then given to the owner
    /// and moved (or copied) into the build directory through the descriptor the validation
    /// opened, as a new entry that cannot replace anything. Nothing root does ever resolves a
    /// name in the owner's directory again.
    async fn debootstrap(
        &self,
        suite: &str,
        mirror: &str,
        packages: &[String],
        output: NewFile,
    ) -> Result<Outcome, HelperError> {
        let scratch = tempfile::Builder::new()
            .prefix("banger-helper-")
            .tempdir_in(&self.scratch_dir)
            .map_err(|e| {
                HelperError::failed(format!(
                    "creating a scratch directory in {}: {e}",
                    self.scratch_dir.display()
                ))
            })?;
        // Removed however this op ends (a dropped future included), mounts first; see Scratch.
        let scratch = Scratch(scratch.keep());
        let tar = scratch.0.join("rootfs.tar");
        // mmdebstrap's own temporary tree (with /proc, /sys, /dev mounted in it) goes into the
        // scratch dir too, so whatever an interruption leaves is found and cleaned there.
        let cmd = mmdebstrap_cmd(suite, mirror, packages, &tar).env("TMPDIR", &scratch.0);
        self.runner
            .run(&cmd)
            .await
            .map_err(|e| HelperError::failed(e.to_string()))?;
        let owner = self.cfg.owner_uid;
        let shown = output.path.display().to_string();
        let bytes = tokio::task::spawn_blocking(move || place_tar(&tar, &output, owner, true))
            .await
            .map_err(|e| HelperError::failed(format!("placing the tar: {e}")))??;
        drop(scratch);
        Ok(Outcome::value(json!({ "output": shown, "bytes": bytes })))
    }
}

/// The helper's private scratch dir for one `Debootstrap`. Dropping it (the op finished, failed
/// or was abandoned: its program group is killed first, see `banger_sys::group`) detaches
/// whatever is still mounted under it, deepest first, and deletes it without crossing a mount
/// point; a few retries give processes that were just killed time to go.
#[derive(Debug)]
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        for attempt in 0..5 {
            if let Err(e) = banger_sys::mounts::unmount_under(&self.0) {
                tracing::warn!(error = %e, "cleaning the debootstrap scratch dir");
            }
            match banger_sys::rmtree::remove_tree(&self.0) {
                Ok(()) => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(error = %e, "removing the debootstrap scratch dir");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// The mmdebstrap argv: fixed options, then `--include` when packages are given, then
/// `<suite> <output> <mirror>`.
pub fn mmdebstrap_cmd(
    suite: &str,
    mirror: &str,
    packages: &[String],
    output: &std::path::Path,
) -> Cmd {
    let mut cmd = Cmd::new("mmdebstrap").args(MMDEBSTRAP_FIXED);
    if !packages.is_empty() {
        cmd = cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(suite).arg(output).arg(mirror)
}

/// Opens the finished tar (root-private, so no race), gives it to the owner, then puts it in
/// place with `renameat2(RENAME_NOREPLACE)` relative to the checked directory, or copies it
/// into an `O_EXCL` file there when the scratch area is on another filesystem (or when
/// `rename_first` is false, for tests of that path).
fn place_tar(
    tar: &std::path::Path,
    out: &NewFile,
    owner: u32,
    rename_first: bool,
) -> Result<u64, HelperError> {
    let fail = |what: &str, e: Errno| {
        HelperError::failed(format!("{what} {}: {}", out.path.display(), e.desc()))
    };
    let src = openat(
        AT_FDCWD,
        tar,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        HelperError::failed(format!(
            "mmdebstrap left no tar at {}: {}",
            tar.display(),
            e.desc()
        ))
    })?;
    let st = nix::sys::stat::fstat(&src).map_err(|e| fail("checking the tar for", e))?;
    if !crate::safepath::is_regular(&st) {
        return Err(HelperError::failed(format!(
            "mmdebstrap's output {} is not a regular file",
            tar.display()
        )));
    }
    let uid = Some(nix::unistd::Uid::from_raw(owner));
    nix::unistd::fchown(src.as_fd(), uid, None).map_err(|e| fail("chowning", e))?;
    nix::sys::stat::fchmod(src.as_fd(), Mode::from_bits_truncate(0o600))
        .map_err(|e| fail("chmodding", e))?;
    let renamed = if rename_first {
        renameat2(
            AT_FDCWD,
            tar,
            &out.dir,
            out.name.as_str(),
            RenameFlags::RENAME_NOREPLACE,
        )
    } else {
        Err(Errno::EXDEV)
    };
    match renamed {
        Ok(()) => return Ok(u64::try_from(st.st_size).unwrap_or(0)),
        Err(Errno::EEXIST) => {
            return Err(HelperError::forbidden(format!(
                "output: {:?} appeared while the image was being built",
                out.path.display().to_string()
            )));
        }
        Err(Errno::EXDEV) => {}
        Err(e) => return Err(fail("moving the tar to", e)),
    }
    let dst = openat(
        &out.dir,
        out.name.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| match e {
        Errno::EEXIST => HelperError::forbidden(format!(
            "output: {:?} appeared while the image was being built",
            out.path.display().to_string()
        )),
        e => fail("creating", e),
    })?;
    nix::unistd::fchown(dst.as_fd(), uid, None).map_err(|e| fail("chowning", e))?;
    let mut from = std::fs::File::from(src);
    let mut to = std::fs::File::from(dst);
    let copied = std::io::copy(&mut from, &mut to).and_then(|n| to.sync_all().map(|()| n));
    match copied {
        Ok(n) => Ok(n),
        Err(e) => {
            // Leave no partial tar behind (the entry is ours: O_EXCL made it).
            let _ = nix::unistd::unlinkat(
                &out.dir,
                out.name.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            Err(HelperError::failed(format!(
                "copying the tar to {}: {e}",
                out.path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn setup() -> (tempfile::TempDir, HelperConfig) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("state/build")).unwrap();
        std::fs::create_dir_all(d.path().join("scratch")).unwrap();
        let cfg = HelperConfig {
            owner_uid: if me() == 0 { 4242 } else { me() },
            state_dir: d.path().join("state"),
            runtime_dir: d.path().join("run"),
            bridge_name: banger_net::BridgeName::default(),
            bridge_cidr: banger_config::Ipv4Cidr::parse("172.30.0.0/24").unwrap(),
        };
        (d, cfg)
    }

    #[test]
    fn the_tar_is_moved_or_copied_to_the_owner_and_never_replaces_anything() {
        for rename_first in [true, false] {
            let (d, cfg) = setup();
            let tar = d.path().join("scratch/rootfs.tar");
            std::fs::write(&tar, b"tarball").unwrap();
            let out_path = d.path().join("state/build/out.tar");
            let out = validate::new_build_file(&cfg, out_path.to_str().unwrap()).unwrap();
            let n = place_tar(&tar, &out, cfg.owner_uid, rename_first).unwrap();
            assert_eq!(n, 7);
            assert_eq!(std::fs::read(&out_path).unwrap(), b"tarball");
            let m = std::fs::symlink_metadata(&out_path).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o777), (cfg.owner_uid, 0o600));

            // Something appearing at the output meanwhile is never replaced or followed.
            let tar2 = d.path().join("scratch/rootfs2.tar");
            std::fs::write(&tar2, b"second").unwrap();
            let out2_path = d.path().join("state/build/out2.tar");
            let out2 = validate::new_build_file(&cfg, out2_path.to_str().unwrap()).unwrap();
            let victim = d.path().join("victim");
            std::fs::write(&victim, b"keep").unwrap();
            std::os::unix::fs::symlink(&victim, &out2_path).unwrap();
            let e = place_tar(&tar2, &out2, cfg.owner_uid, rename_first).unwrap_err();
            assert!(matches!(e, HelperError::Forbidden(_)), "{e}");
            assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        }
    }

    #[test]
    fn a_missing_tar_is_a_failure() {
        let (d, cfg) = setup();
        let out_path = d.path().join("state/build/out.tar");
        let out = validate::new_build_file(&cfg, out_path.to_str().unwrap()).unwrap();
        let e = place_tar(
            &d.path().join("scratch/none.tar"),
            &out,
            cfg.owner_uid,
            true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("left no tar"), "{e}");
        assert!(!out_path.exists());
    }

    #[test]
    fn the_mmdebstrap_argv_has_a_fixed_shape() {
        let cmd = mmdebstrap_cmd(
            "bookworm",
            "http://deb.debian.org/debian",
            &[],
            std::path::Path::new("/s/rootfs.tar"),
        );
        assert_eq!(cmd.program, std::path::Path::new("mmdebstrap"));
        let args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut want: Vec<String> = MMDEBSTRAP_FIXED.iter().map(|s| s.to_string()).collect();
        want.extend(
            ["bookworm", "/s/rootfs.tar", "http://deb.debian.org/debian"].map(String::from),
        );
        assert_eq!(args, want, "no --include without packages");
        assert!(cmd.stdin.is_none());
    }
}
