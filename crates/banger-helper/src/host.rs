//! What the helper asks of the kernel directly rather than through a program: opening a tap
//! (`TUNSETIFF`), and reading what a loop device is backed by. Behind [`HostOps`] so the server
//! can be tested without root; [`RealHost`] is the kernel, [`FakeHost`] a recording fake.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use banger_net::{BridgeName, TapName};

use crate::error::HelperError;
use crate::validate::LoopDevice;

/// What backs a loop device: the kernel's path for the file and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopBacking {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
}

/// The kernel interfaces the helper uses without a program.
pub trait HostOps: Send + Sync + std::fmt::Debug {
    /// Opens existing tap `tap` (on `bridge`) the way a VMM would, and returns the descriptor.
    fn open_tap(&self, tap: &TapName, bridge: &BridgeName) -> Result<OwnedFd, HelperError>;
    /// What `dev` is attached to, or `None` when it is free (or does not exist).
    fn loop_backing(&self, dev: LoopDevice) -> Result<Option<LoopBacking>, HelperError>;
    /// The size of `dev` in 512-byte sectors.
    fn block_sectors(&self, dev: LoopDevice) -> Result<u64, HelperError>;
    /// Whether device-mapper is available (`/dev/mapper/control`).
    fn has_device_mapper(&self) -> bool;
    /// The block devices device-mapper mapping `name` is built on (`loop3`, …), or `None` when
    /// there is no mapping of that name.
    fn dm_devices(&self, name: &str) -> Result<Option<Vec<String>>, HelperError>;
}

/// The real kernel.
#[derive(Debug, Clone)]
pub struct RealHost {
    /// `/dev/net/tun`.
    pub tun: PathBuf,
    /// `/sys`.
    pub sys: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
}

impl Default for RealHost {
    fn default() -> Self {
        RealHost {
            tun: "/dev/net/tun".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

/// `struct loop_info64` from `<linux/loop.h>` (libc does not have it).
#[repr(C)]
#[derive(Debug)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::Ioctl = 0x4C05;

/// `struct ifreq` reduced to what TUNSETIFF/TUNGETIFF use: the name and the flags, padded to
/// the kernel's 40 bytes.
#[repr(C)]
#[derive(Debug)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

fn io_failed(what: String, e: std::io::Error) -> HelperError {
    HelperError::failed(format!("{what}: {e}"))
}

/// The tap flags VMMs open banger's taps with; banger-net creates them to match.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Reads a tun/tap descriptor's interface name and flags (`TUNGETIFF`).
pub fn tun_get_iff(fd: &impl AsRawFd) -> std::io::Result<(String, libc::c_int)> {
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes at most a `struct ifreq` (40 bytes) into the pointer, which
    // points at a live, writable IfReqFlags of exactly that size.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = req
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(req.name.len());
    Ok((
        String::from_utf8_lossy(&req.name[..len]).into_owned(),
        libc::c_int::from(req.flags) & 0xffff,
    ))
}

impl HostOps for RealHost {
    fn open_tap(&self, tap: &TapName, bridge: &BridgeName) -> Result<OwnedFd, HelperError> {
        let name = tap.as_str();
        let class = self.sys.join("class/net").join(name);
        // Only a tun/tap device has tun_flags; refusing early keeps TUNSETIFF from creating a
        // new tap under a name the caller chose.
        if !class.join("tun_flags").exists() {
            return Err(HelperError::failed(format!(
                "tap {name:?} does not exist (CreateTap first)"
            )));
        }
        let master = std::fs::read_link(class.join("master")).ok();
        let on = master
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned());
        if on.as_deref() != Some(bridge.as_str()) {
            return Err(HelperError::forbidden(format!(
                "tap: {name:?} is not a port of the bridge {:?} (it is on {on:?})",
                bridge.as_str()
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.tun)
            .map_err(|e| io_failed(format!("opening {}", self.tun.display()), e))?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            // The kernel's ifr_flags is a short; the flag values fit.
            flags: TAP_FLAGS as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) at the pointer, which
        // points at a live, writable IfReqFlags of that size with a NUL-terminated name.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut IfReqFlags,
            )
        };
        if rc < 0 {
            return Err(io_failed(
                format!("attaching to tap {name:?} (TUNSETIFF)"),
                std::io::Error::last_os_error(),
            ));
        }
        // If the tap vanished between the check and TUNSETIFF, the ioctl made a fresh,
        // non-persistent one; closing the descriptor (dropping `file`) destroys it again.
        let (got, flags) = tun_get_iff(&file)
            .map_err(|e| io_failed(format!("checking tap {name:?} (TUNGETIFF)"), e))?;
        if got != name || flags & libc::IFF_PERSIST == 0 {
            return Err(HelperError::failed(format!(
                "tap {name:?} vanished while it was being opened"
            )));
        }
        Ok(OwnedFd::from(file))
    }

    fn loop_backing(&self, dev: LoopDevice) -> Result<Option<LoopBacking>, HelperError> {
        let node = self.dev.join(dev.name());
        let file = match File::open(&node) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_failed(format!("opening {}", node.display()), e)),
        };
        // SAFETY: LoopInfo64 is plain old data; all-zero is a valid value.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64` (232 bytes) at the pointer,
        // which points at a live, writable LoopInfo64 of that layout.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                LOOP_GET_STATUS64,
                &mut info as *mut LoopInfo64,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: a free loop device.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(io_failed(format!("LOOP_GET_STATUS64 on {dev}"), e));
        }
        let sys = self
            .sys
            .join("block")
            .join(dev.name())
            .join("loop/backing_file");
        let path = std::fs::read_to_string(&sys)
            .map_err(|e| io_failed(format!("reading {}", sys.display()), e))?;
        Ok(Some(LoopBacking {
            path: path.trim_end_matches('\n').to_string(),
            dev: info.lo_device,
            ino: info.lo_inode,
        }))
    }

    fn block_sectors(&self, dev: LoopDevice) -> Result<u64, HelperError> {
        let p = self.sys.join("block").join(dev.name()).join("size");
        let s = std::fs::read_to_string(&p)
            .map_err(|e| io_failed(format!("reading {}", p.display()), e))?;
        s.trim()
            .parse()
            .map_err(|_| HelperError::failed(format!("{}: not a number: {s:?}", p.display())))
    }

    fn has_device_mapper(&self) -> bool {
        self.dev.join("mapper/control").exists()
    }

    fn dm_devices(&self, name: &str) -> Result<Option<Vec<String>>, HelperError> {
        let block = self.sys.join("block");
        let entries = match std::fs::read_dir(&block) {
            Ok(e) => e,
            Err(e) => return Err(io_failed(format!("listing {}", block.display()), e)),
        };
        for entry in entries.flatten() {
            let dm = entry.path();
            // `/sys/block/dm-N/dm/name` holds the mapping's name.
            let Ok(n) = std::fs::read_to_string(dm.join("dm/name")) else {
                continue;
            };
            if n.trim_end_matches('\n') != name {
                continue;
            }
            let slaves = dm.join("slaves");
            let mut devs: Vec<String> = std::fs::read_dir(&slaves)
                .map_err(|e| io_failed(format!("listing {}", slaves.display()), e))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            devs.sort();
            return Ok(Some(devs));
        }
        Ok(None)
    }
}

/// One action a [`FakeHost`] was asked to take (probes are not recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCall {
    OpenTap(TapName),
}

/// A recording fake: `open_tap` hands out a descriptor of `/dev/null`; loop devices are backed
/// by whatever files the test registers.
#[derive(Debug)]
pub struct FakeHost {
    calls: Mutex<Vec<HostCall>>,
    loops: Mutex<BTreeMap<u32, PathBuf>>,
    /// device-mapper mappings: name -> the devices under it.
    dms: Mutex<BTreeMap<String, Vec<String>>>,
    /// Whether device-mapper "exists".
    pub device_mapper: bool,
    /// What `block_sectors` answers.
    pub sectors: u64,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            calls: Mutex::new(Vec::new()),
            loops: Mutex::new(BTreeMap::new()),
            dms: Mutex::new(BTreeMap::new()),
            device_mapper: true,
            sectors: 131072,
        }
    }
}

impl FakeHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every action so far.
    pub fn calls(&self) -> Vec<HostCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes device-mapper mapping `name` exist on `devices` (`loop3`, …).
    pub fn set_dm(&self, name: &str, devices: &[&str]) {
        self.dms.lock().unwrap_or_else(|p| p.into_inner()).insert(
            name.to_string(),
            devices.iter().map(|d| d.to_string()).collect(),
        );
    }

    /// Makes `/dev/loop<n>` look attached to `file` (which need not be under the state dir).
    pub fn set_loop(&self, n: u32, file: impl Into<PathBuf>) {
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, file.into());
    }
}

impl HostOps for FakeHost {
    fn open_tap(&self, tap: &TapName, _bridge: &BridgeName) -> Result<OwnedFd, HelperError> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HostCall::OpenTap(tap.clone()));
        File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| io_failed("opening /dev/null".into(), e))
    }

    fn loop_backing(&self, dev: LoopDevice) -> Result<Option<LoopBacking>, HelperError> {
        use std::os::unix::fs::MetadataExt;
        let file = self
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dev.0)
            .cloned();
        let Some(file) = file else { return Ok(None) };
        // symlink_metadata: the kernel holds the inode it opened, never a symlink.
        let (d, i) = std::fs::symlink_metadata(&file)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or((0, 0));
        Ok(Some(LoopBacking {
            path: file.to_string_lossy().into_owned(),
            dev: d,
            ino: i,
        }))
    }

    fn block_sectors(&self, _dev: LoopDevice) -> Result<u64, HelperError> {
        Ok(self.sectors)
    }

    fn has_device_mapper(&self) -> bool {
        self.device_mapper
    }

    fn dm_devices(&self, name: &str) -> Result<Option<Vec<String>>, HelperError> {
        Ok(self
            .dms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_host_reports_free_and_missing_loops_as_none() {
        let d = tempfile::tempdir().unwrap();
        let h = RealHost {
            dev: d.path().to_path_buf(),
            ..RealHost::default()
        };
        assert_eq!(h.loop_backing(LoopDevice(3)).unwrap(), None);
        assert!(!h.has_device_mapper());
        let e = h.block_sectors(LoopDevice(123_456)).unwrap_err();
        assert!(e.to_string().contains("loop123456"), "{e}");
    }

    #[test]
    fn real_host_reads_dm_devices_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let dm = d.path().join("block/dm-2");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::create_dir_all(dm.join("slaves/loop8")).unwrap();
        std::fs::create_dir_all(dm.join("slaves/loop7")).unwrap();
        std::fs::write(dm.join("dm/name"), "banger-0123456789ab\n").unwrap();
        std::fs::create_dir_all(d.path().join("block/sda")).unwrap();
        let h = RealHost {
            sys: d.path().to_path_buf(),
            ..RealHost::default()
        };
        assert_eq!(
            h.dm_devices("banger-0123456789ab").unwrap(),
            Some(vec!["loop7".to_string(), "loop8".to_string()])
        );
        assert_eq!(h.dm_devices("banger-ffffffffffff").unwrap(), None);
    }

    #[test]
    fn real_host_refuses_a_missing_tap_without_creating_one() {
        let h = RealHost::default();
        let t = TapName::parse("bgtnosuchtap").unwrap();
        let e = h.open_tap(&t, &BridgeName::default()).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!Path::new("/sys/class/net/bgtnosuchtap").exists());
    }

    #[test]
    fn fake_host_records_and_reports() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("img");
        std::fs::write(&f, b"x").unwrap();
        let h = FakeHost::new();
        h.set_loop(7, &f);
        let b = h.loop_backing(LoopDevice(7)).unwrap().unwrap();
        assert_eq!(b.path, f.to_string_lossy());
        assert!(b.ino != 0);
        assert_eq!(h.loop_backing(LoopDevice(8)).unwrap(), None);
        assert!(h.calls().is_empty(), "probes are not actions");
        let t = TapName::parse("bgt1").unwrap();
        h.open_tap(&t, &BridgeName::default()).unwrap();
        assert_eq!(h.calls(), [HostCall::OpenTap(t)]);
    }
}
