//! Assembling the root filesystem at `/newroot` and mounting the work disk at its `/root`.
//!
//! With the overlay layout the shared image is mounted `ro,noload`: read-only, and with journal
//! replay disabled, so not even a dirty journal left by an image build is ever written back to a
//! file other VMs share. (The VMM attaches it read-only as well.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use banger_guest::RootLayout;

use crate::disks::device_for;
use crate::error::AgentError;
use crate::sys;

pub const NEWROOT: &str = "/newroot";
/// Staging mounts, moved into the new root together with the rest of /run.
pub const RUN_BANGER: &str = "/run/banger";

/// One action of a mount plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Mkdir(PathBuf),
    Mount {
        source: String,
        target: PathBuf,
        fstype: &'static str,
        flags: libc::c_ulong,
        data: Option<String>,
    },
}

/// The mounts that build the root for `layout` at `newroot`, as data so the plan is testable
/// without privileges.
pub fn root_plan(
    layout: &RootLayout,
    by_uuid: &BTreeMap<String, PathBuf>,
    newroot: &Path,
) -> Result<Vec<Op>, AgentError> {
    let run = Path::new(RUN_BANGER);
    Ok(match layout {
        RootLayout::Overlay {
            lower_uuid,
            upper_uuid,
        } => {
            let lower_dev = device_for(by_uuid, lower_uuid, "root image (lower) disk")?;
            let upper_dev = device_for(by_uuid, upper_uuid, "root upper disk")?;
            let (lower, upper) = (run.join("lower"), run.join("upper"));
            let (upperdir, workdir) = (upper.join("upper"), upper.join("work"));
            vec![
                Op::Mkdir(lower.clone()),
                Op::Mount {
                    source: lower_dev.display().to_string(),
                    target: lower.clone(),
                    fstype: "ext4",
                    flags: libc::MS_RDONLY,
                    data: Some("noload".into()),
                },
                Op::Mkdir(upper.clone()),
                Op::Mount {
                    source: upper_dev.display().to_string(),
                    target: upper.clone(),
                    fstype: "ext4",
                    flags: 0,
                    data: None,
                },
                Op::Mkdir(upperdir.clone()),
                Op::Mkdir(workdir.clone()),
                Op::Mkdir(newroot.to_path_buf()),
                Op::Mount {
                    source: "overlay".into(),
                    target: newroot.to_path_buf(),
                    fstype: "overlay",
                    flags: 0,
                    data: Some(format!(
                        "lowerdir={},upperdir={},workdir={}",
                        lower.display(),
                        upperdir.display(),
                        workdir.display()
                    )),
                },
            ]
        }
        RootLayout::Direct { uuid } => {
            let dev = device_for(by_uuid, uuid, "root disk")?;
            vec![
                Op::Mkdir(newroot.to_path_buf()),
                Op::Mount {
                    source: dev.display().to_string(),
                    target: newroot.to_path_buf(),
                    fstype: "ext4",
                    flags: 0,
                    data: None,
                },
            ]
        }
    })
}

pub fn execute(plan: &[Op]) -> Result<(), AgentError> {
    for op in plan {
        match op {
            Op::Mkdir(p) => sys::mkdir_p(p)?,
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => sys::mount(source, target, fstype, *flags, data.as_deref())?,
        }
    }
    Ok(())
}

pub fn describe(layout: &RootLayout, by_uuid: &BTreeMap<String, PathBuf>) -> String {
    let dev = |u: &str| {
        by_uuid
            .get(u)
            .map_or("?".into(), |p| p.display().to_string())
    };
    match layout {
        RootLayout::Overlay {
            lower_uuid,
            upper_uuid,
        } => format!(
            "overlay of {} (ro,noload) and {}",
            dev(lower_uuid),
            dev(upper_uuid)
        ),
        RootLayout::Direct { uuid } => format!("{} read-write", dev(uuid)),
    }
}

/// Mounts the work disk `dev` at `newroot/root`, seeding it from the image's `/root` on first
/// use. Returns whether it seeded.
pub fn mount_work(dev: &Path, newroot: &Path) -> Result<bool, AgentError> {
    // Mounted at a staging point first: the image's /root is still visible at newroot/root
    // to copy from.
    let staging = Path::new(RUN_BANGER).join("work");
    sys::mkdir_p(&staging)?;
    sys::mount(&dev.display().to_string(), &staging, "ext4", 0, None)?;
    let image_root = newroot.join("root");
    let seeded = crate::seed::seed_if_needed(&image_root, &staging)?;
    sys::mkdir_p(&image_root)?;
    sys::move_mount(&staging, &image_root)?;
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::tests::{LOWER, UPPER};

    fn devices() -> BTreeMap<String, PathBuf> {
        [(LOWER, "/dev/vdb"), (UPPER, "/dev/vdc")]
            .into_iter()
            .map(|(u, d)| (u.to_string(), PathBuf::from(d)))
            .collect()
    }

    #[test]
    fn overlay_plan_mounts_the_image_read_only_without_journal_replay() {
        let layout = RootLayout::Overlay {
            lower_uuid: LOWER.into(),
            upper_uuid: UPPER.into(),
        };
        let plan = root_plan(&layout, &devices(), Path::new("/newroot")).unwrap();
        let mounts: Vec<_> = plan
            .iter()
            .filter_map(|op| match op {
                Op::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => Some((
                    source.as_str(),
                    target.to_str().unwrap(),
                    *fstype,
                    *flags,
                    data.clone(),
                )),
                Op::Mkdir(_) => None,
            })
            .collect();
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            mounts[0],
            (
                "/dev/vdb",
                "/run/banger/lower",
                "ext4",
                libc::MS_RDONLY,
                Some("noload".to_string())
            )
        );
        assert_eq!(
            mounts[1],
            ("/dev/vdc", "/run/banger/upper", "ext4", 0, None)
        );
        assert_eq!(mounts[2].1, "/newroot");
        assert_eq!(
            mounts[2].4.as_deref(),
            Some(
                "lowerdir=/run/banger/lower,upperdir=/run/banger/upper/upper,workdir=/run/banger/upper/work"
            )
        );
        // upper/work dirs are created after the upper disk is mounted, i.e. on it.
        let pos = |want: &Op| plan.iter().position(|o| o == want).unwrap();
        assert!(pos(&Op::Mkdir("/run/banger/upper/work".into())) > 2);
        assert_eq!(
            describe(&layout, &devices()),
            "overlay of /dev/vdb (ro,noload) and /dev/vdc"
        );
    }

    #[test]
    fn direct_plan_and_missing_disk() {
        let layout = RootLayout::Direct { uuid: UPPER.into() };
        let plan = root_plan(&layout, &devices(), Path::new("/newroot")).unwrap();
        assert!(
            matches!(&plan[1], Op::Mount { source, flags: 0, fstype: "ext4", .. } if source == "/dev/vdc")
        );
        let layout = RootLayout::Direct {
            uuid: "00000000-0000-0000-0000-000000000000".into(),
        };
        let e = root_plan(&layout, &devices(), Path::new("/newroot"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("root disk") && e.contains("00000000-0000"),
            "{e}"
        );
    }
}
