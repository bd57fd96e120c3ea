//! Every input of every op is checked here before anything runs.
//!
//! The leaf validators are pure functions of the request and the [`HelperConfig`]; the path
//! checks additionally walk the filesystem through [`crate::safepath`] (never following a
//! symlink), and the loop-device checks ask the [`HostOps`] what a loop device is backed by.
//! [`check_request`] turns a [`HelperRequest`] into a [`Checked`] op whose fields are typed,
//! parsed values: executing it needs no further judgement.
//!
//! Refusals are [`HelperError::BadRequest`] when the value is malformed (not an address, a
//! prefix out of range) and [`HelperError::Forbidden`] when it is well-formed but outside what
//! banger may touch; each message names the field and shows the value with `{:?}`.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use banger_config::Ipv4Cidr;
use banger_core::ids::VmId;
use banger_net::{BridgeName, TapName, check_vm_id};

use crate::config::HelperConfig;
use crate::error::HelperError;
use crate::host::HostOps;
use crate::protocol::{HelperRequest, show};
use crate::safepath::{self, WalkError};

/// The longest path accepted (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// The most packages a `Debootstrap` may name.
pub const MAX_PACKAGES: usize = 64;
/// The longest mirror URL accepted.
pub const MAX_MIRROR: usize = 512;
/// The highest loop device number accepted (`/dev/loop1048575`, the kernel's minor limit).
pub const MAX_LOOP: u32 = (1 << 20) - 1;

fn bad(field: &str, value: &str, why: impl std::fmt::Display) -> HelperError {
    HelperError::bad_request(format!("{field}: {} {why}", show(value)))
}

fn forbidden(field: &str, value: &str, why: impl std::fmt::Display) -> HelperError {
    HelperError::forbidden(format!("{field}: {} {why}", show(value)))
}

/// The configured bridge, and nothing else: the name must parse as a banger bridge and equal
/// the one in the helper's config.
pub fn bridge(cfg: &HelperConfig, field: &str, s: &str) -> Result<BridgeName, HelperError> {
    let b = BridgeName::parse(s).map_err(|e| HelperError::forbidden(format!("{field}: {e}")))?;
    if b != cfg.bridge_name {
        return Err(forbidden(
            field,
            s,
            format!(
                "is not the configured bridge {:?}",
                cfg.bridge_name.as_str()
            ),
        ));
    }
    Ok(b)
}

/// A banger tap name (`bgt<1 to 12 of a-z0-9>`), which no foreign interface has.
pub fn tap(field: &str, s: &str) -> Result<TapName, HelperError> {
    TapName::parse(s).map_err(|e| HelperError::forbidden(format!("{field}: {e}")))
}

/// A VM id as NAT rule comments carry it (1 to 64 of `a-z0-9_-`).
pub fn nat_vm_id(s: &str) -> Result<String, HelperError> {
    check_vm_id(s).map_err(|e| HelperError::forbidden(format!("vm_id: {e}")))?;
    Ok(s.to_string())
}

/// A banger VM id proper (12 of `0-9a-f`), as device-mapper names `banger-<id>` need.
pub fn dm_vm_id(s: &str) -> Result<VmId, HelperError> {
    VmId::parse(s).ok_or_else(|| {
        forbidden(
            "vm_id",
            s,
            "is not a banger VM id (12 of 0-9a-f); banger's device-mapper names are banger-<vm id>",
        )
    })
}

/// The device-mapper name of VM `id`'s snapshot.
pub fn dm_name(id: &VmId) -> String {
    format!("banger-{id}")
}

/// A dotted-quad IPv4 address (Rust's parser: no leading zeros, no shorthand).
pub fn ipv4(field: &str, s: &str) -> Result<Ipv4Addr, HelperError> {
    s.parse()
        .map_err(|_| bad(field, s, "is not an IPv4 address like 172.30.0.2"))
}

/// A VM's address: inside the configured network and neither its network, broadcast nor
/// gateway address.
pub fn vm_ip(cfg: &HelperConfig, field: &str, s: &str) -> Result<Ipv4Addr, HelperError> {
    let ip = ipv4(field, s)?;
    let net = &cfg.bridge_cidr;
    if !net.contains(ip) {
        return Err(forbidden(
            field,
            s,
            format!("is outside the configured network {net}"),
        ));
    }
    let role = if ip == net.network() {
        Some("network")
    } else if ip == net.broadcast() {
        Some("broadcast")
    } else if ip == net.gateway() {
        Some("gateway")
    } else {
        None
    };
    if let Some(role) = role {
        return Err(forbidden(
            field,
            s,
            format!("is the {role} address of {net}, not a VM address"),
        ));
    }
    Ok(ip)
}

/// The bridge's address: exactly the configured gateway with the configured prefix.
pub fn gateway(cfg: &HelperConfig, gw: &str, prefix: u8) -> Result<(Ipv4Addr, u8), HelperError> {
    if !(Ipv4Cidr::MIN_PREFIX..=Ipv4Cidr::MAX_PREFIX).contains(&prefix) {
        return Err(HelperError::bad_request(format!(
            "prefix: {prefix} is outside /{}../{}",
            Ipv4Cidr::MIN_PREFIX,
            Ipv4Cidr::MAX_PREFIX
        )));
    }
    if prefix != cfg.bridge_cidr.prefix() {
        return Err(HelperError::forbidden(format!(
            "prefix: {prefix} is not the configured network's /{}",
            cfg.bridge_cidr.prefix()
        )));
    }
    let ip = ipv4("gateway", gw)?;
    if ip != cfg.bridge_cidr.gateway() {
        return Err(forbidden(
            "gateway",
            gw,
            format!(
                "is not the gateway {} of the configured network {}",
                cfg.bridge_cidr.gateway(),
                cfg.bridge_cidr
            ),
        ));
    }
    Ok((ip, prefix))
}

/// The bridge's network: exactly the configured one.
pub fn cidr(cfg: &HelperConfig, s: &str) -> Result<Ipv4Cidr, HelperError> {
    let c = Ipv4Cidr::parse(s).map_err(|e| bad("cidr", s, e))?;
    if c != cfg.bridge_cidr {
        return Err(forbidden(
            "cidr",
            s,
            format!("is not the configured network {}", cfg.bridge_cidr),
        ));
    }
    Ok(c)
}

/// Taps are made for the owner only: a root-owned tap is useless to the unprivileged VMM, and
/// another user's tap would hand that user a port on banger's bridge.
pub fn owner_uid(cfg: &HelperConfig, uid: Option<u32>) -> Result<u32, HelperError> {
    match uid {
        Some(u) if u == cfg.owner_uid => Ok(u),
        Some(u) => Err(HelperError::forbidden(format!(
            "owner_uid: uid {u} is not the owner (uid {})",
            cfg.owner_uid
        ))),
        None => Err(HelperError::forbidden(format!(
            "owner_uid: missing; taps are made for the owner (uid {})",
            cfg.owner_uid
        ))),
    }
}

/// A loop device, `/dev/loopN` exactly (no leading zeros, N ≤ 1048575).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoopDevice(pub u32);

impl LoopDevice {
    pub fn path(&self) -> String {
        format!("/dev/loop{}", self.0)
    }

    /// The name under `/sys/block`.
    pub fn name(&self) -> String {
        format!("loop{}", self.0)
    }
}

impl std::fmt::Display for LoopDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/dev/loop{}", self.0)
    }
}

pub fn loop_device(field: &str, s: &str) -> Result<LoopDevice, HelperError> {
    let refuse = || forbidden(field, s, "is not a loop device path /dev/loopN");
    let digits = s.strip_prefix("/dev/loop").ok_or_else(refuse)?;
    if digits.is_empty()
        || digits.len() > 7
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return Err(refuse());
    }
    let n: u32 = digits.parse().map_err(|_| refuse())?;
    if n > MAX_LOOP {
        return Err(refuse());
    }
    Ok(LoopDevice(n))
}

/// Splits an absolute path into its components, refusing anything that is not plainly
/// spelled: relative paths, NUL bytes, `.`, `..`, empty components (`//`, a trailing `/`).
/// `"/"` gives no components.
pub fn absolute_path<'a>(field: &str, s: &'a str) -> Result<Vec<&'a str>, HelperError> {
    if s.is_empty() {
        return Err(HelperError::bad_request(format!("{field}: empty path")));
    }
    if s.len() > MAX_PATH {
        return Err(bad(field, s, format!("is longer than {MAX_PATH} bytes")));
    }
    if s.contains('\0') {
        return Err(bad(field, s, "contains a NUL byte"));
    }
    let Some(rest) = s.strip_prefix('/') else {
        return Err(bad(field, s, "is not an absolute path"));
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let comps: Vec<&str> = rest.split('/').collect();
    for c in &comps {
        match *c {
            ".." => return Err(forbidden(field, s, "contains `..`")),
            "." | "" => {
                return Err(bad(
                    field,
                    s,
                    "is not normalized (`.`, `//` or a trailing `/`)",
                ));
            }
            c if c.len() > 255 => {
                return Err(bad(field, s, "has a component longer than 255 bytes"));
            }
            _ => {}
        }
    }
    Ok(comps)
}

/// The components of the configured state dir (validated when the config was checked).
fn state_comps(cfg: &HelperConfig) -> Result<Vec<String>, HelperError> {
    let s = cfg.state_dir.to_str().ok_or_else(|| {
        HelperError::failed(format!(
            "state_dir {} is not UTF-8",
            cfg.state_dir.display()
        ))
    })?;
    Ok(absolute_path("state_dir", s)?
        .into_iter()
        .map(str::to_string)
        .collect())
}

/// Where under the state dir a path lies: `Some(area)` when `comps` is
/// `<state_dir>/<area>/<at least one more>` for one of `areas`.
pub fn area_of<'a>(state: &[String], comps: &[&str], areas: &[&'a str]) -> Option<&'a str> {
    if comps.len() < state.len() + 2 || comps[..state.len()].iter().ne(state.iter()) {
        return None;
    }
    areas.iter().copied().find(|a| *a == comps[state.len()])
}

/// The areas of the state dir whose files may become loop devices.
pub const LOOP_AREAS: &[&str] = &["images", "vms"];

fn walk_err(field: &str, e: WalkError) -> HelperError {
    HelperError::forbidden(format!("{field}: {e}"))
}

/// A file opened by the symlink-proof walk: the `O_PATH` descriptor proves which inode the
/// checks were made on.
#[derive(Debug)]
pub struct SafeFile {
    pub path: PathBuf,
    pub fd: OwnedFd,
    pub dev: u64,
    pub ino: u64,
}

/// `LoopAttach.path`: a regular file under `<state_dir>/images` or `<state_dir>/vms`, reached
/// without a symlink at any level, owned by the owner (or by root with a single link).
pub fn loop_file(cfg: &HelperConfig, path: &str) -> Result<SafeFile, HelperError> {
    let comps = absolute_path("path", path)?;
    let state = state_comps(cfg)?;
    if area_of(&state, &comps, LOOP_AREAS).is_none() {
        return Err(forbidden(
            "path",
            path,
            format!(
                "is not a file under {}/images or {}/vms",
                cfg.state_dir.display(),
                cfg.state_dir.display()
            ),
        ));
    }
    let (leaf, dirs) = comps
        .split_last()
        .ok_or_else(|| bad("path", path, "has no file name"))?;
    let dir = safepath::walk_dir(dirs, cfg.owner_uid).map_err(|e| walk_err("path", e))?;
    let (fd, st) =
        safepath::open_regular(&dir, leaf, path, cfg.owner_uid).map_err(|e| walk_err("path", e))?;
    Ok(SafeFile {
        path: PathBuf::from(path),
        fd,
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// A file name the helper creates: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (no hidden files, no
/// separators).
pub fn build_file_name(field: &str, s: &str) -> Result<(), HelperError> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            field,
            s,
            "has a file name that is not 1 to 128 of A-Za-z0-9._- starting with a letter or digit",
        ))
    }
}

/// A file the helper is about to create: the directory it goes in (held open, reached without
/// a symlink) and its name there.
#[derive(Debug)]
pub struct NewFile {
    pub path: PathBuf,
    pub dir: OwnedFd,
    pub name: String,
}

/// `Debootstrap.output`: a file that does not exist yet, directly in `<state_dir>/build`.
pub fn new_build_file(cfg: &HelperConfig, output: &str) -> Result<NewFile, HelperError> {
    let comps = absolute_path("output", output)?;
    let state = state_comps(cfg)?;
    if comps.len() != state.len() + 2 || area_of(&state, &comps, &["build"]).is_none() {
        return Err(forbidden(
            "output",
            output,
            format!(
                "is not a file directly in {}/build",
                cfg.state_dir.display()
            ),
        ));
    }
    let (leaf, dirs) = comps
        .split_last()
        .ok_or_else(|| bad("output", output, "has no file name"))?;
    build_file_name("output", leaf)?;
    let dir = safepath::walk_dir(dirs, cfg.owner_uid).map_err(|e| walk_err("output", e))?;
    safepath::must_be_absent(&dir, leaf, output).map_err(|e| walk_err("output", e))?;
    Ok(NewFile {
        path: PathBuf::from(output),
        dir,
        name: leaf.to_string(),
    })
}

/// A Debian suite name: `^[a-z]{2,20}$` (`bookworm`, `trixie`, `sid`).
pub fn suite(s: &str) -> Result<(), HelperError> {
    if (2..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(bad(
            "suite",
            s,
            "is not a Debian suite name (2 to 20 of a-z)",
        ))
    }
}

/// A Debian package name: `^[a-z0-9][a-z0-9+.-]{0,63}$`, so it can neither be an option
/// (`--foo`) nor split the comma-separated `--include` list.
pub fn package(s: &str) -> Result<(), HelperError> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(
            "packages",
            s,
            "is not a Debian package name (a-z0-9, then up to 63 of a-z0-9+.-)",
        ))
    }
}

pub fn packages(list: &[String]) -> Result<(), HelperError> {
    if list.len() > MAX_PACKAGES {
        return Err(HelperError::bad_request(format!(
            "packages: {} given, at most {MAX_PACKAGES}",
            list.len()
        )));
    }
    list.iter().try_for_each(|p| package(p))
}

/// The Debian mirror: an `http://` or `https://` URL with a host, of printable ASCII without
/// whitespace or quotes. Without whitespace it cannot be a sources.list line, so it cannot
/// carry `[trusted=yes]`: apt still checks every index against the host's Debian keyring,
/// which is what makes an arbitrary mirror harmless.
pub fn mirror(s: &str) -> Result<(), HelperError> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| forbidden("mirror", s, "is not an http:// or https:// URL"))?;
    if s.len() > MAX_MIRROR {
        return Err(bad(
            "mirror",
            s,
            format!("is longer than {MAX_MIRROR} bytes"),
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'`'))
    {
        return Err(bad(
            "mirror",
            s,
            "contains whitespace, quotes or non-ASCII characters",
        ));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.starts_with('-') {
        return Err(bad("mirror", s, "has no host"));
    }
    Ok(())
}

/// Checks what the kernel says backs a loop device (`/sys/block/loopN/loop/backing_file`):
/// a file under `<state_dir>/images` or `<state_dir>/vms`. The kernel reports the file's
/// current path (with ` (deleted)` once it was unlinked), so a lexical check is exact.
pub fn backing_in_state(
    cfg: &HelperConfig,
    field: &str,
    device: LoopDevice,
    backing: &str,
) -> Result<(), HelperError> {
    let path = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    let state = state_comps(cfg)?;
    let inside = absolute_path(field, path)
        .ok()
        .is_some_and(|comps| area_of(&state, &comps, LOOP_AREAS).is_some());
    if inside {
        Ok(())
    } else {
        Err(HelperError::forbidden(format!(
            "{field}: {device} is backed by {}, not by a file under {}/images or {}/vms",
            show(backing),
            cfg.state_dir.display(),
            cfg.state_dir.display()
        )))
    }
}

/// A loop device that exists and is backed by one of banger's files.
fn banger_loop(
    cfg: &HelperConfig,
    host: &dyn HostOps,
    field: &str,
    s: &str,
) -> Result<LoopDevice, HelperError> {
    let dev = loop_device(field, s)?;
    match host.loop_backing(dev)? {
        Some(b) => backing_in_state(cfg, field, dev, &b.path).map(|()| dev),
        None => Err(forbidden(field, s, "is not attached to any file")),
    }
}

/// Mapping `banger-<vm_id>`, if it exists, is this installation's: every device under it is a
/// loop device backed by a file of this state dir. The name alone is not enough: every
/// installation on the host names its mappings `banger-<vm id>`.
fn own_mapping(cfg: &HelperConfig, host: &dyn HostOps, vm_id: &VmId) -> Result<(), HelperError> {
    let name = dm_name(vm_id);
    let Some(devices) = host.dm_devices(&name)? else {
        return Ok(());
    };
    for d in &devices {
        let dev = d
            .strip_prefix("loop")
            .and_then(|n| loop_device("vm_id", &format!("/dev/loop{n}")).ok())
            .ok_or_else(|| {
                forbidden(
                    "vm_id",
                    vm_id.as_str(),
                    format!("mapping {name} is built on {d}, not on one of banger's loop devices"),
                )
            })?;
        match host.loop_backing(dev)? {
            Some(b) => backing_in_state(cfg, "vm_id", dev, &b.path).map_err(|e| {
                HelperError::forbidden(format!(
                    "mapping {name} is not this installation's: {}",
                    e.message()
                ))
            })?,
            None => {
                return Err(forbidden(
                    "vm_id",
                    vm_id.as_str(),
                    format!("mapping {name} is built on {dev}, which is attached to no file"),
                ));
            }
        }
    }
    Ok(())
}

/// A request whose every input was checked: fields are parsed values, paths are open
/// descriptors.
#[derive(Debug)]
pub enum Checked {
    Ping,
    EnsureBridge {
        bridge: BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    },
    CreateTap {
        tap: TapName,
        bridge: BridgeName,
        owner_uid: u32,
    },
    DeleteTap {
        tap: TapName,
    },
    ListTaps,
    EnsureNat {
        bridge: BridgeName,
        cidr: Ipv4Cidr,
    },
    AddVmNat {
        vm_id: String,
        ip: Ipv4Addr,
        tap: TapName,
    },
    RemoveVmNat {
        vm_id: String,
    },
    ListNatVms,
    ForgetNeighbor {
        bridge: BridgeName,
        ip: Ipv4Addr,
    },
    RemoveAll {
        bridge: Option<BridgeName>,
    },
    OpenTap {
        tap: TapName,
    },
    LoopAttach {
        file: SafeFile,
        read_only: bool,
    },
    /// `None` when the device is not attached (detaching it is then a no-op).
    LoopDetach {
        device: LoopDevice,
        attached: bool,
    },
    DmSnapshotCreate {
        vm_id: VmId,
        origin: LoopDevice,
        cow: LoopDevice,
    },
    DmRemove {
        vm_id: VmId,
    },
    Debootstrap {
        suite: String,
        mirror: String,
        packages: Vec<String>,
        output: NewFile,
    },
}

/// Checks every input of `req` against `cfg` (and, for loop devices, what `host` reports).
pub fn check_request(
    cfg: &HelperConfig,
    host: &dyn HostOps,
    req: &HelperRequest,
) -> Result<Checked, HelperError> {
    Ok(match req {
        HelperRequest::Ping {} => Checked::Ping,
        HelperRequest::EnsureBridge {
            bridge: b,
            gateway: g,
            prefix,
        } => {
            let bridge = bridge(cfg, "bridge", b)?;
            let (gateway, prefix) = gateway(cfg, g, *prefix)?;
            Checked::EnsureBridge {
                bridge,
                gateway,
                prefix,
            }
        }
        HelperRequest::CreateTap {
            tap: t,
            bridge: b,
            owner_uid: o,
        } => Checked::CreateTap {
            tap: tap("tap", t)?,
            bridge: bridge(cfg, "bridge", b)?,
            owner_uid: owner_uid(cfg, *o)?,
        },
        HelperRequest::DeleteTap { tap: t } => Checked::DeleteTap {
            tap: tap("tap", t)?,
        },
        HelperRequest::ListTaps {} => Checked::ListTaps,
        HelperRequest::EnsureNat { bridge: b, cidr: c } => Checked::EnsureNat {
            bridge: bridge(cfg, "bridge", b)?,
            cidr: cidr(cfg, c)?,
        },
        HelperRequest::AddVmNat { vm_id, ip, tap: t } => Checked::AddVmNat {
            vm_id: nat_vm_id(vm_id)?,
            ip: vm_ip(cfg, "ip", ip)?,
            tap: tap("tap", t)?,
        },
        HelperRequest::RemoveVmNat { vm_id } => Checked::RemoveVmNat {
            vm_id: nat_vm_id(vm_id)?,
        },
        HelperRequest::ListNatVms {} => Checked::ListNatVms,
        HelperRequest::ForgetNeighbor { bridge: b, ip } => Checked::ForgetNeighbor {
            bridge: bridge(cfg, "bridge", b)?,
            ip: vm_ip(cfg, "ip", ip)?,
        },
        HelperRequest::RemoveAll { bridge: b } => Checked::RemoveAll {
            bridge: b.as_deref().map(|b| bridge(cfg, "bridge", b)).transpose()?,
        },
        HelperRequest::OpenTap { tap: t } => Checked::OpenTap {
            tap: tap("tap", t)?,
        },
        HelperRequest::LoopAttach { path, read_only } => Checked::LoopAttach {
            file: loop_file(cfg, path)?,
            read_only: *read_only,
        },
        HelperRequest::LoopDetach { device } => {
            let dev = loop_device("device", device)?;
            let attached = match host.loop_backing(dev)? {
                Some(b) => {
                    backing_in_state(cfg, "device", dev, &b.path)?;
                    true
                }
                None => false,
            };
            Checked::LoopDetach {
                device: dev,
                attached,
            }
        }
        HelperRequest::DmSnapshotCreate {
            vm_id,
            origin_loop,
            cow_loop,
        } => {
            let vm_id = dm_vm_id(vm_id)?;
            let origin = banger_loop(cfg, host, "origin_loop", origin_loop)?;
            let cow = banger_loop(cfg, host, "cow_loop", cow_loop)?;
            if origin == cow {
                return Err(forbidden(
                    "cow_loop",
                    cow_loop,
                    "is the origin device too; a snapshot needs two devices",
                ));
            }
            Checked::DmSnapshotCreate { vm_id, origin, cow }
        }
        HelperRequest::DmRemove { vm_id } => {
            let vm_id = dm_vm_id(vm_id)?;
            own_mapping(cfg, host, &vm_id)?;
            Checked::DmRemove { vm_id }
        }
        HelperRequest::Debootstrap {
            suite: s,
            mirror: m,
            packages: p,
            output,
        } => {
            suite(s)?;
            mirror(m)?;
            packages(p)?;
            // Last: it touches the filesystem.
            let output = new_build_file(cfg, output)?;
            Checked::Debootstrap {
                suite: s.clone(),
                mirror: m.clone(),
                packages: p.clone(),
                output,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg_at(state: &Path) -> HelperConfig {
        HelperConfig {
            owner_uid: me_or(4242),
            state_dir: state.to_path_buf(),
            runtime_dir: "/run/banger-test".into(),
            bridge_name: BridgeName::default(),
            bridge_cidr: Ipv4Cidr::parse("172.30.0.0/24").unwrap(),
        }
    }

    /// The owner for tests: someone else than root when we are root (so "root or owner"
    /// covers two uids), ourselves otherwise (so files we make are the owner's).
    fn me_or(other: u32) -> u32 {
        match nix::unistd::geteuid().as_raw() {
            0 => other,
            me => me,
        }
    }

    fn cfg() -> HelperConfig {
        cfg_at(Path::new("/var/lib/banger"))
    }

    fn is_bad(r: Result<impl std::fmt::Debug, HelperError>, needle: &str) {
        match r {
            Err(e @ HelperError::BadRequest(_)) => {
                assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
            }
            other => panic!("expected bad_request with {needle:?}, got {other:?}"),
        }
    }

    fn is_forbidden(r: Result<impl std::fmt::Debug, HelperError>, needle: &str) {
        match r {
            Err(e @ HelperError::Forbidden(_)) => {
                assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
            }
            other => panic!("expected forbidden with {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn bridges() {
        let c = cfg();
        assert_eq!(
            bridge(&c, "bridge", "br-banger").unwrap().as_str(),
            "br-banger"
        );
        for b in [
            "eth0",
            "lo",
            "docker0",
            "br-other",
            "br-banger/x",
            "br banger",
            "",
        ] {
            is_forbidden(bridge(&c, "bridge", b), &format!("{b:?}"));
        }
        is_forbidden(
            bridge(&c, "bridge", "br-banger-x"),
            "not the configured bridge",
        );
    }

    #[test]
    fn taps() {
        for t in ["bgt0", "bgtpool3", "bgt0123456789ab"] {
            tap("tap", t).unwrap();
        }
        for t in [
            "eth0",
            "lo",
            "bgt",
            "bgt-1",
            "bgt0123456789abc",
            "bgt/x",
            "bgt x",
            "BGT1",
        ] {
            is_forbidden(tap("tap", t), &format!("{t:?}"));
        }
    }

    #[test]
    fn vm_ids() {
        nat_vm_id("0123456789ab").unwrap();
        nat_vm_id("vm-1_x").unwrap();
        for v in ["", "A", "a b", "a;b", "a\"b", "a/b"] {
            is_forbidden(nat_vm_id(v), "vm_id");
        }
        assert_eq!(dm_vm_id("0123456789ab").unwrap().as_str(), "0123456789ab");
        assert_eq!(
            dm_name(&dm_vm_id("0123456789ab").unwrap()),
            "banger-0123456789ab"
        );
        for v in [
            "vg0-root",
            "banger-XYZ",
            "0123456789AB",
            "0123456789a",
            "../x",
            "",
        ] {
            is_forbidden(dm_vm_id(v), &format!("{v:?}"));
        }
    }

    #[test]
    fn addresses() {
        let c = cfg();
        assert_eq!(
            vm_ip(&c, "ip", "172.30.0.2").unwrap().to_string(),
            "172.30.0.2"
        );
        assert_eq!(
            vm_ip(&c, "ip", "172.30.0.254").unwrap().to_string(),
            "172.30.0.254"
        );
        is_forbidden(vm_ip(&c, "ip", "172.30.1.2"), "outside");
        is_forbidden(vm_ip(&c, "ip", "8.8.8.8"), "outside");
        is_forbidden(vm_ip(&c, "ip", "172.30.0.0"), "network address");
        is_forbidden(vm_ip(&c, "ip", "172.30.0.255"), "broadcast address");
        is_forbidden(vm_ip(&c, "ip", "172.30.0.1"), "gateway address");
        for s in ["", "172.30.0", "172.30.0.02", "172.30.0.2/32", "::1", "x"] {
            is_bad(vm_ip(&c, "ip", s), "ip:");
        }
    }

    #[test]
    fn gateways_and_networks() {
        let c = cfg();
        assert_eq!(
            gateway(&c, "172.30.0.1", 24).unwrap(),
            ("172.30.0.1".parse().unwrap(), 24)
        );
        for p in [0, 7, 31, 32, 33, 255] {
            is_bad(gateway(&c, "172.30.0.1", p), &format!("prefix: {p}"));
        }
        is_forbidden(gateway(&c, "172.30.0.1", 16), "prefix: 16");
        is_forbidden(gateway(&c, "172.30.0.2", 24), "gateway: \"172.30.0.2\"");
        is_forbidden(gateway(&c, "10.0.0.1", 24), "gateway");
        is_bad(gateway(&c, "x", 24), "gateway");
        assert_eq!(cidr(&c, "172.30.0.0/24").unwrap(), c.bridge_cidr);
        is_forbidden(cidr(&c, "172.30.0.0/16"), "not the configured network");
        is_forbidden(cidr(&c, "10.0.0.0/24"), "not the configured network");
        is_bad(cidr(&c, "172.30.0.0/31"), "cidr");
        is_bad(cidr(&c, "172.30.0.1/24"), "host bits");
        is_bad(cidr(&c, "0.0.0.0/0"), "cidr");
    }

    #[test]
    fn owners() {
        let c = cfg();
        owner_uid(&c, Some(c.owner_uid)).unwrap();
        is_forbidden(owner_uid(&c, Some(0)), "uid 0 is not the owner");
        is_forbidden(owner_uid(&c, Some(c.owner_uid + 1)), "is not the owner");
        is_forbidden(owner_uid(&c, None), "missing");
    }

    #[test]
    fn loop_devices() {
        assert_eq!(loop_device("d", "/dev/loop0").unwrap(), LoopDevice(0));
        assert_eq!(
            loop_device("d", "/dev/loop12").unwrap().path(),
            "/dev/loop12"
        );
        assert_eq!(loop_device("d", "/dev/loop12").unwrap().name(), "loop12");
        loop_device("d", "/dev/loop1048575").unwrap();
        for s in [
            "/dev/sda",
            "/dev/loop",
            "/dev/loop1x",
            "../loop0",
            "/dev/loop01",
            "/dev/loop-1",
            "/dev/loop1048576",
            "/dev/loop99999999",
            "/dev/loop0/",
            "/dev//loop0",
            "loop0",
            "/dev/loop-control",
            "/dev/mapper/control",
        ] {
            is_forbidden(loop_device("device", s), &format!("device: {s:?}"));
        }
    }

    #[test]
    fn path_spelling() {
        assert_eq!(absolute_path("p", "/").unwrap(), Vec::<&str>::new());
        assert_eq!(absolute_path("p", "/a/b").unwrap(), ["a", "b"]);
        is_bad(absolute_path("p", ""), "empty");
        is_bad(absolute_path("p", "a/b"), "not an absolute path");
        is_bad(absolute_path("p", "/a\0b"), "NUL");
        is_forbidden(absolute_path("p", "/a/../b"), "`..`");
        is_forbidden(absolute_path("p", "/.."), "`..`");
        is_bad(absolute_path("p", "/a/./b"), "normalized");
        is_bad(absolute_path("p", "/a//b"), "normalized");
        is_bad(absolute_path("p", "/a/"), "normalized");
        is_bad(absolute_path("p", &format!("/{}", "a".repeat(256))), "255");
        is_bad(absolute_path("p", &"/a".repeat(3000)), "4096");
    }

    #[test]
    fn areas() {
        let st: Vec<String> = ["var", "lib", "banger"].map(String::from).to_vec();
        let a = |p: &str| area_of(&st, &absolute_path("p", p).unwrap(), LOOP_AREAS);
        assert_eq!(a("/var/lib/banger/images/x/rootfs.ext4"), Some("images"));
        assert_eq!(a("/var/lib/banger/vms/x"), Some("vms"));
        assert_eq!(a("/var/lib/banger/images"), None);
        assert_eq!(a("/var/lib/banger/build/x"), None);
        assert_eq!(a("/var/lib/banger2/images/x"), None);
        assert_eq!(a("/var/lib/images/x/y"), None);
        assert_eq!(a("/etc/shadow"), None);
    }

    #[test]
    fn debootstrap_inputs() {
        for s in ["bookworm", "sid", "trixie"] {
            suite(s).unwrap();
        }
        for s in [
            "",
            "a",
            "../x",
            "Bookworm",
            "bookworm-backports",
            &"a".repeat(21),
        ] {
            is_bad(suite(s), "suite");
        }
        for p in ["openssh-server", "libc6", "g++", "python3.11", "0ad"] {
            package(p).unwrap();
        }
        for p in [
            "",
            "--foo",
            "-x",
            "a;b",
            "a,b",
            "a b",
            "A",
            ".x",
            "+x",
            &"a".repeat(65),
        ] {
            is_bad(package(p), "packages");
        }
        packages(&vec!["a".to_string(); MAX_PACKAGES]).unwrap();
        is_bad(
            packages(&vec!["a".to_string(); MAX_PACKAGES + 1]),
            "65 given",
        );
        for m in [
            "http://deb.debian.org/debian",
            "https://mirror.example/debian/",
            "http://10.0.0.1:3142/debian",
        ] {
            mirror(m).unwrap();
        }
        is_forbidden(mirror("file:///"), "http");
        is_forbidden(mirror("ftp://x/debian"), "http");
        is_forbidden(mirror("--help"), "http");
        for m in [
            "http://",
            "http:///x",
            "http://x/ debian",
            "http://x/\tdebian",
            "http://x/\"",
            "http://x/é",
            "http://x\n",
        ] {
            is_bad(mirror(m), "mirror");
        }
        is_bad(mirror(&format!("http://x/{}", "a".repeat(600))), "512");
        for n in ["rootfs.tar", "debian-bookworm.1234.tar", "a"] {
            build_file_name("output", n).unwrap();
        }
        for n in [".hidden", "-x", "a b", "a/b", "", &"a".repeat(129)] {
            is_bad(build_file_name("output", n), "output");
        }
    }

    #[test]
    fn backing_files() {
        let c = cfg();
        let d = LoopDevice(3);
        backing_in_state(&c, "device", d, "/var/lib/banger/images/x/rootfs.ext4").unwrap();
        backing_in_state(&c, "device", d, "/var/lib/banger/vms/a/cow (deleted)").unwrap();
        for b in [
            "/etc/shadow",
            "/var/lib/banger/build/x",
            "/var/lib/banger/images",
            "/var/lib/bangerx/images/a",
            "relative",
            "",
        ] {
            is_forbidden(
                backing_in_state(&c, "device", d, b),
                "/dev/loop3 is backed by",
            );
        }
    }

    #[test]
    fn loop_files_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(state.join("images/base")).unwrap();
        std::fs::create_dir_all(state.join("vms/a")).unwrap();
        let c = cfg_at(&state);
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&state, Some(c.owner_uid), None).unwrap();
        }
        let img = state.join("images/base/rootfs.ext4");
        std::fs::write(&img, b"x").unwrap();
        let f = loop_file(&c, img.to_str().unwrap()).unwrap();
        let st = std::fs::metadata(&img).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((f.dev, f.ino), (st.dev(), st.ino()));

        let p = |rel: &str| state.join(rel).to_str().unwrap().to_string();
        is_forbidden(loop_file(&c, &p("build/x")), "is not a file under");
        is_forbidden(loop_file(&c, &p("images")), "is not a file under");
        is_forbidden(
            loop_file(&c, &p("images/base")),
            "directory, not a regular file",
        );
        is_forbidden(loop_file(&c, &p("images/none")), "does not exist");
        std::os::unix::fs::symlink(&img, state.join("images/link")).unwrap();
        is_forbidden(loop_file(&c, &p("images/link")), "symlink");

        let out = new_build_file(&c, &p("build/x.tar"));
        is_forbidden(out, "does not exist"); // no build dir yet
        std::fs::create_dir(state.join("build")).unwrap();
        let nf = new_build_file(&c, &p("build/x.tar")).unwrap();
        assert_eq!(nf.name, "x.tar");
        std::fs::write(state.join("build/x.tar"), b"").unwrap();
        is_forbidden(new_build_file(&c, &p("build/x.tar")), "already exists");
        is_forbidden(new_build_file(&c, &p("build/sub/x.tar")), "directly in");
        is_forbidden(new_build_file(&c, &p("images/x.tar")), "directly in");
        is_bad(new_build_file(&c, &p("build/.x")), "output");
    }
}
