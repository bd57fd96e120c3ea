//! The `dm-snapshot` root disk: the shared image behind a read-only loop device, a per-VM
//! copy-on-write file behind another, joined by a persistent device-mapper snapshot
//! (`/dev/mapper/banger-<vm id>`) that the VM boots from. This is how the Go original made
//! root disks; `overlay` does the same job without privileges or device-mapper, so it is the
//! default, and this strategy is for hosts and images where overlayfs in the guest is not wanted.
//!
//! Every command goes through [`CommandRunner`] as argv. Each resource is reported through a
//! callback the moment it exists, so the engine records it in the VM's handles file before
//! anything else can fail; a failure half-way releases what was made, in reverse order.

use std::path::Path;
use std::time::Duration;

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
}

/// The device-mapper name of a VM's snapshot.
pub fn mapper_name(vm_id: &str) -> String {
    format!("banger-{vm_id}")
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

/// Creates the snapshot of `image` with `cow` for VM `vm_id`; returns the device path.
pub async fn attach(
    runner: &dyn CommandRunner,
    vm_id: &str,
    image: &Path,
    cow: &Path,
    on_resource: &mut (dyn FnMut(&DmResource) -> Result<(), String> + Send),
) -> Result<String, DmError> {
    if !Path::new("/dev/mapper/control").exists() {
        return Err(DmError::Unavailable("no /dev/mapper/control".into()));
    }
    let mut made: Vec<DmResource> = Vec::new();
    let result = attach_inner(runner, vm_id, image, cow, on_resource, &mut made).await;
    if result.is_err() {
        for r in made.iter().rev() {
            let _ = release(runner, r).await;
        }
    }
    result
}

async fn attach_inner(
    runner: &dyn CommandRunner,
    vm_id: &str,
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
    let base = losetup(runner, image, true).await?;
    note(DmResource::Loop(base.clone()), made)?;
    let over = losetup(runner, cow, false).await?;
    note(DmResource::Loop(over.clone()), made)?;
    let sectors = std::fs::metadata(image)
        .map_err(|e| DmError::Command {
            what: format!("sizing {}", image.display()),
            reason: e.to_string(),
        })?
        .len()
        / 512;
    let name = mapper_name(vm_id);
    // A persistent snapshot with 4 KiB chunks: the COW file survives stop/start.
    let table = format!("0 {sectors} snapshot {base} {over} P 8");
    let cmd = Cmd::new("dmsetup").args(["create", &name, "--table", &table]);
    runner.run(&cmd).await.map_err(|e| DmError::Command {
        what: format!("creating device-mapper snapshot {name}"),
        reason: e.to_string(),
    })?;
    note(DmResource::Mapper(name.clone()), made)?;
    Ok(format!("/dev/mapper/{name}"))
}

async fn losetup(
    runner: &dyn CommandRunner,
    file: &Path,
    read_only: bool,
) -> Result<String, DmError> {
    let mut cmd = Cmd::new("losetup").args(["--find", "--show"]);
    if read_only {
        cmd = cmd.arg("--read-only");
    }
    let cmd = cmd.arg(file);
    let out = runner.run(&cmd).await.map_err(|e| DmError::Command {
        what: format!("attaching {} to a loop device", file.display()),
        reason: e.to_string(),
    })?;
    let dev = String::from_utf8_lossy(&out).trim().to_string();
    check_resource(&DmResource::Loop(dev.clone())).map_err(|_| DmError::Output {
        what: "losetup --find --show".into(),
        output: dev.clone(),
        expected: "a /dev/loopN path",
    })?;
    Ok(dev)
}

/// Releases one resource. A mapping that is still busy (the VMM just exited) is retried a few
/// times; one that does not exist any more is fine.
pub async fn release(runner: &dyn CommandRunner, r: &DmResource) -> Result<(), DmError> {
    check_resource(r)?;
    match r {
        DmResource::Mapper(name) => {
            let cmd = Cmd::new("dmsetup").args(["remove", name.as_str()]);
            let mut last = String::new();
            for attempt in 0..5 {
                match runner.run(&cmd).await {
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
        DmResource::Loop(dev) => {
            let cmd = Cmd::new("losetup").args(["--detach", dev.as_str()]);
            match runner.run(&cmd).await {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("No such device") => Ok(()),
                Err(e) => Err(DmError::Command {
                    what: format!("detaching {dev}"),
                    reason: e.to_string(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_sys::RunError;
    use std::sync::Mutex;

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

    fn files() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("rootfs.ext4");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let cow = d.path().join("cow");
        std::fs::File::create(&cow)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        (d, img, cow)
    }

    fn skip_without_dm() -> bool {
        if Path::new("/dev/mapper/control").exists() {
            return false;
        }
        println!("note: no device-mapper here; exercising attach_inner directly");
        true
    }

    async fn run_attach(
        r: &FakeDm,
        img: &Path,
        cow: &Path,
        seen: &mut Vec<DmResource>,
    ) -> Result<String, DmError> {
        let mut made = Vec::new();
        let mut cb = |x: &DmResource| -> Result<(), String> {
            seen.push(x.clone());
            Ok(())
        };
        let res = attach_inner(r, "0123456789ab", img, cow, &mut cb, &mut made).await;
        if res.is_err() {
            for m in made.iter().rev() {
                let _ = release(r, m).await;
            }
        }
        res
    }

    #[tokio::test]
    async fn attach_runs_the_exact_commands_and_reports_each_resource() {
        let _ = skip_without_dm();
        let (_d, img, cow) = files();
        let r = FakeDm::default();
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
        let r = FakeDm {
            fail: Some("dmsetup create"),
            ..Default::default()
        };
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
        let r = FakeDm {
            fail: Some("losetup --find --show /"),
            ..Default::default()
        };
        let mut seen = Vec::new();
        run_attach(&r, &img, &cow, &mut seen).await.unwrap_err();
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(calls.last().unwrap(), "losetup --detach /dev/loop7");
        assert_eq!(seen, [DmResource::Loop("/dev/loop7".into())]);
    }

    #[tokio::test]
    async fn busy_mapping_is_retried_then_removed() {
        let r = FakeDm::default();
        *r.busy_removes.lock().unwrap() = 2;
        release(&r, &DmResource::Mapper("banger-0123456789ab".into()))
            .await
            .unwrap();
        assert_eq!(r.calls.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn foreign_names_are_never_released() {
        let r = FakeDm::default();
        for bad in [
            DmResource::Loop("/dev/sda".into()),
            DmResource::Loop("/dev/loop".into()),
            DmResource::Loop("/dev/loop1; rm".into()),
            DmResource::Mapper("root".into()),
            DmResource::Mapper("banger-../../x".into()),
        ] {
            assert!(
                matches!(release(&r, &bad).await, Err(DmError::ForeignName(_))),
                "{bad:?}"
            );
        }
        assert!(r.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn without_device_mapper_attach_says_so() {
        if Path::new("/dev/mapper/control").exists() {
            println!("SKIP: this host has device-mapper");
            return;
        }
        let (_d, img, cow) = files();
        let r = FakeDm::default();
        let mut cb = |_: &DmResource| -> Result<(), String> { Ok(()) };
        let err = attach(&r, "0123456789ab", &img, &cow, &mut cb)
            .await
            .unwrap_err();
        assert!(matches!(err, DmError::Unavailable(_)), "{err}");
        assert!(r.calls.lock().unwrap().is_empty(), "nothing attempted");
    }
}
