//! The `dm-snapshot` root disk: the shared image behind a read-only loop device, a per-VM
//! copy-on-write file behind another, joined by a persistent device-mapper snapshot
//! (`/dev/mapper/banger-<vm id>`) that the VM boots from. This is how the Go original made
//! root disks; `overlay` does the same job without privileges or device-mapper, so it is the
//! default, and this strategy is for hosts and images where overlayfs in the guest is not wanted.
//!
//! The four privileged steps (attach a loop, detach it, create the snapshot, remove it) go
//! through [`BlockOps`], which [`block_ops`] picks by config: [`Commands`] runs `losetup` and
//! `dmsetup` as argv through [`CommandRunner`] (a daemon running as root), and
//! [`banger_helper::HelperClient`] asks the root helper (`LoopAttach`, `DmSnapshotCreate`,
//! `DmRemove`, `LoopDetach`) when the daemon runs unprivileged. Either way each resource is
//! reported through a callback the moment it exists, so the engine records it in the VM's
//! handles file before anything else can fail; a failure half-way releases what was made, in
//! reverse order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_config::Config;
use banger_core::VmId;
use banger_helper::{HelperClient, HelperError};
use banger_sys::{Cmd, CommandRunner};

/// One resource of a snapshot, reported as soon as it exists and recorded as such in the
/// VM's handles file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum DmResource {
    Loop(String),
    Mapper(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "dm-snapshot needs device-mapper, which this host lacks ({0}); set root_disk = \"overlay\""
    )]
    Unavailable(String),
    #[error("{what}: {reason}")]
    Command { what: String, reason: String },
    #[error("{what} printed {output:?}, expected {expected}")]
    Output {
        what: String,
        output: String,
        expected: &'static str,
    },
    #[error(
        "refusing device name {0:?}: banger only touches /dev/loopN and banger-<vm id> mappings"
    )]
    ForeignName(String),
    /// A failed attach whose clean-up failed too: both are reported.
    #[error("{error}; releasing what was made also failed: {release}")]
    Unreleased {
        error: Box<DmError>,
        release: String,
    },
}

/// The device-mapper name of a VM's snapshot.
pub fn mapper_name(vm_id: &str) -> String {
    format!("banger-{vm_id}")
}

/// The privileged operations behind a snapshot. Implementations do exactly one thing per
/// call; ordering, reporting and clean-up are [`attach`]'s and [`release`]'s.
#[async_trait::async_trait]
pub trait BlockOps: Send + Sync + std::fmt::Debug {
    /// Attaches `file` to a free loop device; returns its `/dev/loopN` path.
    async fn attach_loop(&self, file: &Path, read_only: bool) -> Result<String, DmError>;
    /// Detaches `device`; one that is no longer attached is fine.
    async fn detach_loop(&self, device: &str) -> Result<(), DmError>;
    /// Creates the persistent snapshot `banger-<vm_id>` of `origin` (the loop device over
    /// `image`) with the copy-on-write device `cow`.
    async fn create_snapshot(
        &self,
        vm_id: &VmId,
        image: &Path,
        origin: &str,
        cow: &str,
    ) -> Result<(), DmError>;
    /// Removes `banger-<vm_id>`, retrying while it is busy (its VMM just exited); a mapping
    /// that does not exist is fine.
    async fn remove_snapshot(&self, vm_id: &VmId) -> Result<(), DmError>;
}

/// The block operations this daemon uses: through the root helper when `helper_socket` is set
/// and the daemon is not root, else run here (which needs root).
pub fn block_ops(config: &Config, runner: Arc<dyn CommandRunner>) -> Arc<dyn BlockOps> {
    block_ops_as(
        config.helper_socket.as_deref(),
        nix::unistd::geteuid().as_raw(),
        runner,
    )
}

fn block_ops_as(
    helper_socket: Option<&Path>,
    euid: u32,
    runner: Arc<dyn CommandRunner>,
) -> Arc<dyn BlockOps> {
    match helper_socket {
        Some(socket) if euid != 0 => Arc::new(HelperClient::new(socket)),
        _ => Arc::new(Commands(runner)),
    }
}

/// Creates the snapshot of `image` with `cow` for VM `vm_id`; returns the device path.
pub async fn attach(
    ops: &dyn BlockOps,
    vm_id: &VmId,
    image: &Path,
    cow: &Path,
    on_resource: &mut (dyn FnMut(&DmResource) -> Result<(), String> + Send),
) -> Result<String, DmError> {
    // Checked here whichever way the devices are made, so the message stays this clear one
    // (the helper would only notice after attaching both loops).
    if !Path::new("/dev/mapper/control").exists() {
        return Err(DmError::Unavailable("no /dev/mapper/control".into()));
    }
    create(ops, vm_id, image, cow, on_resource).await
}

/// [`attach`] without the host check: makes, reports, and on failure releases in reverse.
async fn create(
    ops: &dyn BlockOps,
    vm_id: &VmId,
    image: &Path,
    cow: &Path,
    on_resource: &mut (dyn FnMut(&DmResource) -> Result<(), String> + Send),
) -> Result<String, DmError> {
    let mut made: Vec<DmResource> = Vec::new();
    let result = create_inner(ops, vm_id, image, cow, on_resource, &mut made).await;
    let Err(error) = result else {
        return result;
    };
    let mut failed = Vec::new();
    for r in made.iter().rev() {
        if let Err(e) = release(ops, r).await {
            failed.push(e.to_string());
        }
    }
    if failed.is_empty() {
        Err(error)
    } else {
        Err(DmError::Unreleased {
            error: Box::new(error),
            release: failed.join("; "),
        })
    }
}

async fn create_inner(
    ops: &dyn BlockOps,
    vm_id: &VmId,
    image: &Path,
    cow: &Path,
    on_resource: &mut (dyn FnMut(&DmResource) -> Result<(), String> + Send),
    made: &mut Vec<DmResource>,
) -> Result<String, DmError> {
    let mut note = |r: DmResource, made: &mut Vec<DmResource>| -> Result<(), DmError> {
        made.push(r.clone());
        on_resource(&r).map_err(|reason| DmError::Command {
            what: "recording the device in the handles file".into(),
            reason,
        })
    };
    let base = ops.attach_loop(image, true).await?;
    note(DmResource::Loop(base.clone()), made)?;
    let over = ops.attach_loop(cow, false).await?;
    note(DmResource::Loop(over.clone()), made)?;
    let name = mapper_name(vm_id.as_str());
    ops.create_snapshot(vm_id, image, &base, &over).await?;
    note(DmResource::Mapper(name.clone()), made)?;
    Ok(format!("/dev/mapper/{name}"))
}

/// Releases one resource through `ops`. Names are checked first: a tampered handles file
/// cannot make banger release anything but its own loop devices and mappings.
pub async fn release(ops: &dyn BlockOps, r: &DmResource) -> Result<(), DmError> {
    check_resource(r)?;
    match r {
        DmResource::Mapper(name) => {
            let id = name
                .strip_prefix("banger-")
                .and_then(VmId::parse)
                .ok_or_else(|| DmError::ForeignName(name.clone()))?;
            ops.remove_snapshot(&id).await
        }
        DmResource::Loop(dev) => ops.detach_loop(dev).await,
    }
}

/// Whether `name` is a loop device or a mapping banger may release (never anything else, even
/// if a handles file was tampered with).
pub fn check_resource(r: &DmResource) -> Result<(), DmError> {
    let ok = match r {
        DmResource::Loop(p) => p
            .strip_prefix("/dev/loop")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        DmResource::Mapper(n) => n
            .strip_prefix("banger-")
            .is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())),
    };
    if ok {
        Ok(())
    } else {
        Err(DmError::ForeignName(match r {
            DmResource::Loop(s) | DmResource::Mapper(s) => s.clone(),
        }))
    }
}

/// A loop device path as reported by `what`, checked to be `/dev/loopN`.
fn loop_path(what: &str, dev: &str) -> Result<String, DmError> {
    let dev = dev.trim().to_string();
    check_resource(&DmResource::Loop(dev.clone())).map_err(|_| DmError::Output {
        what: what.into(),
        output: dev.clone(),
        expected: "a /dev/loopN path",
    })?;
    Ok(dev)
}

/// The root daemon's way: `losetup` and `dmsetup` as argv.
#[derive(Debug, Clone)]
pub struct Commands(pub Arc<dyn CommandRunner>);

#[async_trait::async_trait]
impl BlockOps for Commands {
    async fn attach_loop(&self, file: &Path, read_only: bool) -> Result<String, DmError> {
        let mut cmd = Cmd::new("losetup").args(["--find", "--show"]);
        if read_only {
            cmd = cmd.arg("--read-only");
        }
        let cmd = cmd.arg(file);
        let out = self.0.run(&cmd).await.map_err(|e| DmError::Command {
            what: format!("attaching {} to a loop device", file.display()),
            reason: e.to_string(),
        })?;
        loop_path("losetup --find --show", &String::from_utf8_lossy(&out))
    }

    async fn detach_loop(&self, dev: &str) -> Result<(), DmError> {
        let cmd = Cmd::new("losetup").args(["--detach", dev]);
        match self.0.run(&cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("No such device") => Ok(()),
            Err(e) => Err(DmError::Command {
                what: format!("detaching {dev}"),
                reason: e.to_string(),
            }),
        }
    }

    async fn create_snapshot(
        &self,
        vm_id: &VmId,
        image: &Path,
        origin: &str,
        cow: &str,
    ) -> Result<(), DmError> {
        let sectors = std::fs::metadata(image)
            .map_err(|e| DmError::Command {
                what: format!("sizing {}", image.display()),
                reason: e.to_string(),
            })?
            .len()
            / 512;
        let name = mapper_name(vm_id.as_str());
        // A persistent snapshot with 4 KiB chunks: the COW file survives stop/start.
        let table = format!("0 {sectors} snapshot {origin} {cow} P 8");
        let cmd = Cmd::new("dmsetup").args(["create", &name, "--table", &table]);
        self.0
            .run(&cmd)
            .await
            .map(drop)
            .map_err(|e| DmError::Command {
                what: format!("creating device-mapper snapshot {name}"),
                reason: e.to_string(),
            })
    }

    async fn remove_snapshot(&self, vm_id: &VmId) -> Result<(), DmError> {
        let name = mapper_name(vm_id.as_str());
        let cmd = Cmd::new("dmsetup").args(["remove", name.as_str()]);
        let mut last = String::new();
        for attempt in 0..5 {
            match self.0.run(&cmd).await {
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
        Err(DmError::Command {
            what: format!("removing device-mapper snapshot {name}"),
            reason: last,
        })
    }
}

fn through_helper(what: String, e: HelperError) -> DmError {
    DmError::Command {
        what: format!("{what} (through banger-helper)"),
        reason: e.to_string(),
    }
}

/// The unprivileged daemon's way: the root helper's typed ops, which check every device and
/// path against banger's own state dir. The helper retries a busy mapping itself and treats
/// a detached loop or a missing mapping as done.
#[async_trait::async_trait]
impl BlockOps for HelperClient {
    async fn attach_loop(&self, file: &Path, read_only: bool) -> Result<String, DmError> {
        let dev = self.loop_attach(file, read_only).await.map_err(|e| {
            through_helper(format!("attaching {} to a loop device", file.display()), e)
        })?;
        loop_path("banger-helper LoopAttach", &dev)
    }

    async fn detach_loop(&self, dev: &str) -> Result<(), DmError> {
        self.loop_detach(dev)
            .await
            .map_err(|e| through_helper(format!("detaching {dev}"), e))
    }

    async fn create_snapshot(
        &self,
        vm_id: &VmId,
        _image: &Path,
        origin: &str,
        cow: &str,
    ) -> Result<(), DmError> {
        // The helper sizes the snapshot from the origin device itself.
        self.dm_snapshot_create(vm_id, origin, cow)
            .await
            .map(drop)
            .map_err(|e| {
                through_helper(
                    format!(
                        "creating device-mapper snapshot {}",
                        mapper_name(vm_id.as_str())
                    ),
                    e,
                )
            })
    }

    async fn remove_snapshot(&self, vm_id: &VmId) -> Result<(), DmError> {
        self.dm_remove(vm_id).await.map_err(|e| {
            through_helper(
                format!(
                    "removing device-mapper snapshot {}",
                    mapper_name(vm_id.as_str())
                ),
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_sys::RunError;
    use std::sync::Mutex;

    const VM: &str = "0123456789ab";

    fn vm() -> VmId {
        VmId::parse(VM).unwrap()
    }

    /// Answers losetup with successive loop devices and fails the program named in `fail`.
    #[derive(Debug, Default)]
    struct FakeDm {
        calls: Mutex<Vec<String>>,
        fail: Option<&'static str>,
        busy_removes: Mutex<u32>,
    }

    #[async_trait::async_trait]
    impl CommandRunner for FakeDm {
        async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
            let line = cmd.display();
            let n = {
                let mut c = self.calls.lock().unwrap();
                c.push(line.clone());
                c.len()
            };
            let prog = cmd.program.display().to_string();
            if self.fail.is_some_and(|f| line.starts_with(f)) {
                return Err(RunError::Failed {
                    cmd: line,
                    status: "exit status: 1".into(),
                    stderr: "injected".into(),
                });
            }
            if prog == "dmsetup" && line.contains(" remove ") {
                let mut b = self.busy_removes.lock().unwrap();
                if *b > 0 {
                    *b -= 1;
                    return Err(RunError::Failed {
                        cmd: line,
                        status: "exit status: 1".into(),
                        stderr: "Device or resource busy".into(),
                    });
                }
            }
            Ok(if prog == "losetup" && line.contains("--find") {
                format!("/dev/loop{}\n", n + 6).into_bytes()
            } else {
                Vec::new()
            })
        }
    }

    fn files_in(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let img = dir.join("rootfs.ext4");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let cow = dir.join("root.ext4");
        std::fs::File::create(&cow)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        (img, cow)
    }

    fn files() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (img, cow) = files_in(d.path());
        (d, img, cow)
    }

    /// `create` (attach without the device-mapper check, which this host may fail) through
    /// the root daemon's commands.
    async fn run_attach(
        r: &Arc<FakeDm>,
        img: &Path,
        cow: &Path,
        seen: &mut Vec<DmResource>,
    ) -> Result<String, DmError> {
        let mut cb = |x: &DmResource| -> Result<(), String> {
            seen.push(x.clone());
            Ok(())
        };
        create(&Commands(r.clone()), &vm(), img, cow, &mut cb).await
    }

    #[tokio::test]
    async fn attach_runs_the_exact_commands_and_reports_each_resource() {
        let (_d, img, cow) = files();
        let r = Arc::new(FakeDm::default());
        let mut seen = Vec::new();
        let dev = run_attach(&r, &img, &cow, &mut seen).await.unwrap();
        assert_eq!(dev, "/dev/mapper/banger-0123456789ab");
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(
            calls[0],
            format!("losetup --find --show --read-only {}", img.display())
        );
        assert_eq!(calls[1], format!("losetup --find --show {}", cow.display()));
        assert_eq!(
            calls[2],
            "dmsetup create banger-0123456789ab --table 0 131072 snapshot /dev/loop7 /dev/loop8 P 8"
        );
        assert_eq!(
            seen,
            [
                DmResource::Loop("/dev/loop7".into()),
                DmResource::Loop("/dev/loop8".into()),
                DmResource::Mapper("banger-0123456789ab".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_dmsetup_releases_both_loops_in_reverse() {
        let (_d, img, cow) = files();
        let r = Arc::new(FakeDm {
            fail: Some("dmsetup create"),
            ..Default::default()
        });
        let mut seen = Vec::new();
        let err = run_attach(&r, &img, &cow, &mut seen).await.unwrap_err();
        assert!(err.to_string().contains("banger-0123456789ab"), "{err}");
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(
            calls[3..],
            ["losetup --detach /dev/loop8", "losetup --detach /dev/loop7"]
        );
    }

    #[tokio::test]
    async fn a_failing_second_losetup_releases_the_first() {
        let (_d, img, cow) = files();
        let r = Arc::new(FakeDm {
            fail: Some("losetup --find --show /"),
            ..Default::default()
        });
        let mut seen = Vec::new();
        run_attach(&r, &img, &cow, &mut seen).await.unwrap_err();
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(calls.last().unwrap(), "losetup --detach /dev/loop7");
        assert_eq!(seen, [DmResource::Loop("/dev/loop7".into())]);
    }

    #[tokio::test]
    async fn busy_mapping_is_retried_then_removed() {
        let r = Arc::new(FakeDm::default());
        *r.busy_removes.lock().unwrap() = 2;
        release(
            &Commands(r.clone()),
            &DmResource::Mapper("banger-0123456789ab".into()),
        )
        .await
        .unwrap();
        assert_eq!(r.calls.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn foreign_names_are_never_released() {
        let r = Arc::new(FakeDm::default());
        // Neither by the commands nor through the helper (whose socket does not even exist:
        // a refusal must come before any attempt).
        let d = tempfile::tempdir().unwrap();
        let helper = HelperClient::new(d.path().join("helper.sock"));
        let ops: [&dyn BlockOps; 2] = [&Commands(r.clone()), &helper];
        for ops in ops {
            for bad in [
                DmResource::Loop("/dev/sda".into()),
                DmResource::Loop("/dev/loop".into()),
                DmResource::Loop("/dev/loop1; rm".into()),
                DmResource::Mapper("root".into()),
                DmResource::Mapper("banger-../../x".into()),
                DmResource::Mapper("banger-0123456789AB".into()),
            ] {
                assert!(
                    matches!(release(ops, &bad).await, Err(DmError::ForeignName(_))),
                    "{ops:?} {bad:?}"
                );
            }
        }
        assert!(r.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn without_device_mapper_attach_says_so() {
        if Path::new("/dev/mapper/control").exists() {
            println!("SKIP: this host has device-mapper");
            return;
        }
        let (d, img, cow) = files();
        let r = Arc::new(FakeDm::default());
        // Through the helper too: the same clear message, before any request is sent.
        let helper = HelperClient::new(d.path().join("helper.sock"));
        let ops: [&dyn BlockOps; 2] = [&Commands(r.clone()), &helper];
        for ops in ops {
            let mut cb = |_: &DmResource| -> Result<(), String> { Ok(()) };
            let err = attach(ops, &vm(), &img, &cow, &mut cb).await.unwrap_err();
            assert!(matches!(err, DmError::Unavailable(_)), "{err}");
            assert!(err.to_string().contains("root_disk = \"overlay\""), "{err}");
        }
        assert!(r.calls.lock().unwrap().is_empty(), "nothing attempted");
    }

    #[test]
    fn the_helper_is_used_by_an_unprivileged_daemon_that_has_one() {
        let r: Arc<dyn CommandRunner> = Arc::new(FakeDm::default());
        let sock = Some(Path::new("/run/banger-helper/helper.sock"));
        let kind = |o: Arc<dyn BlockOps>| format!("{o:?}");
        assert!(kind(block_ops_as(sock, 1000, r.clone())).starts_with("HelperClient"));
        assert!(kind(block_ops_as(sock, 0, r.clone())).starts_with("Commands"));
        assert!(kind(block_ops_as(None, 1000, r.clone())).starts_with("Commands"));
        assert!(kind(block_ops_as(None, 0, r)).starts_with("Commands"));
    }

    /// The unprivileged daemon's path against a real `banger-helper` server on a socket in a
    /// temp dir: the helper's own validation and executor, with its recording fakes (a
    /// [`FakeHost`] for the kernel's loop state and a runner standing in for
    /// losetup/dmsetup) behind it. No real device-mapper: this host has none, and the
    /// helper's `real_*` tests are the place for root-only ones.
    mod via_helper {
        use super::*;
        use crate::handles::Handles;
        use banger_helper::{FakeHost, Helper, HelperConfig, HostOps, ServeOptions};
        use std::os::unix::fs::PermissionsExt;
        use std::path::PathBuf;

        /// Stands in for losetup/dmsetup: `losetup --find --show FILE` answers /dev/loop7,
        /// 8, … and makes the fake host report FILE behind it, as the kernel would. Commands
        /// starting with any of `fail` fail.
        #[derive(Debug)]
        struct Kernel {
            host: Arc<FakeHost>,
            calls: Mutex<Vec<String>>,
            next: Mutex<u32>,
            fail: Vec<&'static str>,
        }

        impl Kernel {
            fn calls(&self) -> Vec<String> {
                self.calls.lock().unwrap().clone()
            }
        }

        #[async_trait::async_trait]
        impl CommandRunner for Kernel {
            async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
                let line = cmd.display();
                self.calls.lock().unwrap().push(line.clone());
                if self.fail.iter().any(|f| line.starts_with(f)) {
                    return Err(RunError::Failed {
                        cmd: line,
                        status: "exit status: 1".into(),
                        stderr: "injected".into(),
                    });
                }
                if line.starts_with("losetup --find --show") {
                    let file = PathBuf::from(cmd.args.last().expect("a file"));
                    let n = {
                        let mut next = self.next.lock().unwrap();
                        *next += 1;
                        *next - 1
                    };
                    self.host.set_loop(n, file);
                    return Ok(format!("/dev/loop{n}\n").into_bytes());
                }
                Ok(Vec::new())
            }
        }

        struct Served {
            _dir: tempfile::TempDir,
            img: PathBuf,
            cow: PathBuf,
            handles: PathBuf,
            run: PathBuf,
            socket: PathBuf,
            kernel: Arc<Kernel>,
            stop: tokio::sync::oneshot::Sender<()>,
            server: tokio::task::JoinHandle<()>,
        }

        impl Served {
            async fn stop(self) {
                let _ = self.stop.send(());
                self.server.await.unwrap();
            }

            /// Records each resource in a real handles file, as the `root_device` step does,
            /// noting how many commands had run when it was told.
            fn recorder(
                &self,
                seen: Arc<Mutex<Vec<(DmResource, usize)>>>,
            ) -> impl FnMut(&DmResource) -> Result<(), String> + Send + use<> {
                let mut handles = Handles::new(self.run.clone());
                let path = self.handles.clone();
                let kernel = self.kernel.clone();
                move |r: &DmResource| {
                    handles.block.push(r.clone());
                    handles.write(&path).map_err(|e| e.to_string())?;
                    seen.lock().unwrap().push((r.clone(), kernel.calls().len()));
                    Ok(())
                }
            }

            fn recorded(&self) -> Vec<DmResource> {
                Handles::read(&self.handles).unwrap().unwrap().block
            }
        }

        fn mode(p: &Path, m: u32) {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }

        /// `<tmp>/state/{images/base/rootfs.ext4, vms/<id>/root.ext4}`, `<tmp>/run`, and a
        /// helper serving `<tmp>/sock/helper.sock` with the production socket mode.
        async fn serve(fail: Vec<&'static str>) -> Served {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let run = dir.path().join("run");
            let base = state.join("images/base");
            let vm_dir = state.join("vms").join(VM);
            let sock = dir.path().join("sock");
            for d in [&base, &vm_dir, &run, &sock] {
                std::fs::create_dir_all(d).unwrap();
            }
            for d in [&state, &run] {
                mode(d, 0o700);
            }
            for d in [
                &state.join("images"),
                &base,
                &state.join("vms"),
                &vm_dir,
                &sock,
            ] {
                mode(d, 0o755);
            }
            let (img, _) = files_in(&base);
            let (_, cow) = files_in(&vm_dir);
            let euid = nix::unistd::geteuid().as_raw();
            let cfg = HelperConfig {
                // Root connects regardless; otherwise the owner is us.
                owner_uid: if euid == 0 { 4242 } else { euid },
                state_dir: state.clone(),
                runtime_dir: run.clone(),
                bridge_name: banger_net::BridgeName::default(),
                bridge_cidr: banger_config::Ipv4Cidr::parse("172.30.0.0/24").unwrap(),
            };
            cfg.check().expect("the test config is valid");
            let host = Arc::new(FakeHost::new());
            let kernel = Arc::new(Kernel {
                host: host.clone(),
                calls: Mutex::default(),
                next: Mutex::new(7),
                fail,
            });
            let helper = Helper::new(
                cfg.clone(),
                Arc::new(banger_net::RecordingNetOps::new()),
                kernel.clone(),
                host as Arc<dyn HostOps>,
            )
            .with_scratch_dir(dir.path());
            let socket = sock.join("helper.sock");
            let listener =
                banger_helper::bind(&socket, &cfg, banger_helper::DEFAULT_SOCKET_MODE).unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(banger_helper::serve(
                listener,
                Arc::new(helper),
                ServeOptions::default(),
                async move {
                    let _ = stopped.await;
                },
            ));
            Served {
                handles: vm_dir.join("handles.json"),
                _dir: dir,
                img,
                cow,
                run,
                socket,
                kernel,
                stop,
                server,
            }
        }

        fn loop_(n: u32) -> DmResource {
            DmResource::Loop(format!("/dev/loop{n}"))
        }

        fn mapper() -> DmResource {
            DmResource::Mapper(mapper_name(VM))
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn each_device_is_recorded_as_it_appears_and_released_in_reverse() {
            if !Path::new("/dev/mapper/control").exists() {
                println!(
                    "SKIP: no real dm-snapshot through the helper: this host has no device-mapper; \
                     its losetup/dmsetup are a recording runner behind a real helper server"
                );
            }
            let s = serve(vec![]).await;
            let ops = HelperClient::new(&s.socket);
            let seen = Arc::default();
            let mut record = s.recorder(Arc::clone(&seen));
            let dev = create(&ops, &vm(), &s.img, &s.cow, &mut record)
                .await
                .unwrap();
            assert_eq!(dev, "/dev/mapper/banger-0123456789ab");
            let calls = s.kernel.calls();
            assert_eq!(
                calls,
                [
                    format!("losetup --find --show --read-only {}", s.img.display()),
                    format!("losetup --find --show {}", s.cow.display()),
                    // The helper sizes the snapshot from the origin device (the fake's 131072).
                    "dmsetup create banger-0123456789ab --table 0 131072 snapshot /dev/loop7 /dev/loop8 P 8".into(),
                ]
            );
            // Each resource was in the handles file before the next command ran.
            assert_eq!(
                *seen.lock().unwrap(),
                [(loop_(7), 1), (loop_(8), 2), (mapper(), 3)]
            );
            let recorded = s.recorded();
            assert_eq!(recorded, [loop_(7), loop_(8), mapper()]);

            // Teardown, as the engine does it: the handles file's list in reverse.
            for r in recorded.iter().rev() {
                release(&ops, r).await.unwrap();
            }
            assert_eq!(
                s.kernel.calls()[3..],
                [
                    "dmsetup remove banger-0123456789ab",
                    "losetup --detach /dev/loop8",
                    "losetup --detach /dev/loop7"
                ]
            );
            s.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failing_snapshot_releases_both_loops_in_reverse() {
            let s = serve(vec!["dmsetup create"]).await;
            let ops = HelperClient::new(&s.socket);
            let seen = Arc::default();
            let mut record = s.recorder(Arc::clone(&seen));
            let err = create(&ops, &vm(), &s.img, &s.cow, &mut record)
                .await
                .unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("banger-0123456789ab")
                    && msg.contains("through banger-helper")
                    && msg.contains("failed: ")
                    && msg.contains("injected"),
                "{msg}"
            );
            assert_eq!(
                s.kernel.calls()[3..],
                ["losetup --detach /dev/loop8", "losetup --detach /dev/loop7"]
            );
            assert_eq!(s.recorded(), [loop_(7), loop_(8)]);
            s.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failing_second_attach_releases_the_first() {
            let s = serve(vec!["losetup --find --show /"]).await;
            let ops = HelperClient::new(&s.socket);
            let seen = Arc::default();
            let mut record = s.recorder(Arc::clone(&seen));
            let err = create(&ops, &vm(), &s.img, &s.cow, &mut record)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("root.ext4"), "{err}");
            let calls = s.kernel.calls();
            assert_eq!(calls.len(), 3, "{calls:?}");
            assert_eq!(calls[2], "losetup --detach /dev/loop7");
            assert_eq!(s.recorded(), [loop_(7)]);
            s.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_unrecordable_device_is_released_at_once() {
            let s = serve(vec![]).await;
            let ops = HelperClient::new(&s.socket);
            let mut n = 0;
            let mut record = |_: &DmResource| -> Result<(), String> {
                n += 1;
                if n == 2 {
                    Err("disk full".into())
                } else {
                    Ok(())
                }
            };
            let err = create(&ops, &vm(), &s.img, &s.cow, &mut record)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("disk full"), "{err}");
            // The second loop exists but could not be recorded: it is released too, first.
            assert_eq!(
                s.kernel.calls()[2..],
                ["losetup --detach /dev/loop8", "losetup --detach /dev/loop7"]
            );
            s.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_release_that_fails_too_is_reported_with_the_cause() {
            let s = serve(vec!["dmsetup create", "losetup --detach /dev/loop8"]).await;
            let ops = HelperClient::new(&s.socket);
            let seen = Arc::default();
            let mut record = s.recorder(Arc::clone(&seen));
            let err = create(&ops, &vm(), &s.img, &s.cow, &mut record)
                .await
                .unwrap_err();
            assert!(matches!(err, DmError::Unreleased { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("creating device-mapper snapshot banger-0123456789ab")
                    && msg.contains("detaching /dev/loop8"),
                "{msg}"
            );
            // The other loop is still released.
            assert_eq!(
                s.kernel.calls().last().unwrap(),
                "losetup --detach /dev/loop7"
            );
            s.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_helper_refuses_files_outside_the_state_dir() {
            let s = serve(vec![]).await;
            let ops = HelperClient::new(&s.socket);
            let outside = s._dir.path().join("elsewhere.ext4");
            std::fs::write(&outside, b"x").unwrap();
            let mut record = |_: &DmResource| -> Result<(), String> { Ok(()) };
            let err = create(&ops, &vm(), &outside, &s.cow, &mut record)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("forbidden"), "{err}");
            assert!(s.kernel.calls().is_empty(), "nothing ran");
            s.stop().await;
        }
    }
}
