//! banger's configuration: one optional TOML file, every key optional.
//!
//! [`Config::load`] reads the file (a missing file means all defaults), rejects unknown keys and
//! bad values with the file, key and value named, and fills the rest from defaults, some of which
//! are derived from the [`HostInfo`] (CPU count, memory, home, uid). The result is plain data with
//! proper types; it serializes back to TOML or JSON for `banger doctor` and `daemon status`.
//! Every key is described in `docs/config.md`.

use std::collections::HashSet;
use std::fmt::Display;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use banger_core::ByteSize;
use serde::{Deserialize, Serialize, Serializer};
use toml::Value;

mod cidr;
pub mod dirs;
mod host;
pub mod trust;

pub use cidr::{CidrError, Ipv4Cidr};
pub use host::{HostInfo, XdgDirs};

/// The system-wide config file, used by root when it exists.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/banger/config.toml";
/// Written by `banger system install`: who owns the system daemon.
pub const INSTALL_RECORD_PATH: &str = "/etc/banger/install.toml";

/// The owner uid recorded by `banger system install`, if there is a readable record.
pub fn system_owner_uid() -> Option<u32> {
    let text = std::fs::read_to_string(INSTALL_RECORD_PATH).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    v.get("uid")?
        .as_integer()
        .and_then(|u| u32::try_from(u).ok())
}

/// The owner (uid, gid) recorded by `banger system install`, if there is a readable record.
pub fn system_owner() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(INSTALL_RECORD_PATH).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let id = |k: &str| v.get(k)?.as_integer().and_then(|u| u32::try_from(u).ok());
    Some((id("uid")?, id("gid")?))
}

/// What can go wrong loading the configuration. Messages name the file, and the key and value
/// when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {}: {key} = {value}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot detect host {what}: {reason}")]
    Host { what: &'static str, reason: String },
}

/// Defines a closed set of lowercase words with `as_str`, `Display`, `FromStr` and `Serialize`.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            /// The accepted words, for error messages: `a, b, c`.
            pub fn choices() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(format!("expected one of {}", Self::choices())),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

word_enum!(
    /// How much the daemon logs.
    LogLevel {
        Error = "error",
        Warn = "warn",
        Info = "info",
        Debug = "debug",
        Trace = "trace",
    }
);

word_enum!(
    /// Which VMM backend runs VMs. `Auto` picks Firecracker when its binary is found and KVM is
    /// usable, else QEMU.
    VmmChoice {
        Auto = "auto",
        Firecracker = "firecracker",
        Qemu = "qemu",
    }
);

word_enum!(
    /// How a VM's root disk is made from its image.
    RootDiskStrategy {
        /// The image read-only plus a sparse per-VM upper disk, joined by overlayfs in the guest.
        Overlay = "overlay",
        /// A FICLONE copy of the image (XFS, btrfs).
        Reflink = "reflink",
        /// A sparse full copy of the image.
        Copy = "copy",
        /// A device-mapper snapshot over loop devices.
        DmSnapshot = "dm-snapshot",
    }
);

word_enum!(
    /// Whether VMs get a network interface on banger's bridge.
    NetworkMode {
        /// A tap on the bridge, a fixed IPv4 address, ssh access (needs root or the helper).
        Bridge = "bridge",
        /// No network device at all: an offline sandbox, reachable only through its console.
        None = "none",
    }
);

/// Resources a VM gets when `vm create` does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmDefaults {
    pub vcpu: u32,
    pub memory_mib: u32,
    #[serde(serialize_with = "serialize_size")]
    pub work_disk_size: ByteSize,
    /// New VMs get `/dev/kvm` and the kernel's module tree as with `vm create --nested`.
    pub nested: bool,
}

impl VmDefaults {
    pub const MAX_VCPU: u32 = 32;
    pub const MIN_MEMORY_MIB: u32 = 128;
    pub const MIN_WORK_DISK: ByteSize = ByteSize(64 * ByteSize::MIB);

    /// A quarter of the CPUs (1 to 4) and an eighth of the RAM (512 MiB to 8 GiB): several
    /// sandboxes fit on the host without anyone tuning anything.
    pub fn for_host(host: &HostInfo) -> VmDefaults {
        let memory_mib = (host.memory_bytes / 8 / ByteSize::MIB).clamp(512, 8192);
        VmDefaults {
            vcpu: (host.cpus / 4).clamp(1, 4),
            memory_mib: memory_mib as u32,
            work_disk_size: ByteSize::gib(8),
            nested: false,
        }
    }
}

/// Sizes print as `8G` / `512M` (or `<n>B`), which [`ByteSize::parse`] reads back.
fn serialize_size<S: Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    if size.bytes().is_multiple_of(ByteSize::MIB) {
        s.collect_str(size)
    } else {
        s.collect_str(&format_args!("{}B", size.bytes()))
    }
}

/// A host file copied into every new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSync {
    /// Absolute, inside the owner's home (`~/` already expanded).
    pub host: PathBuf,
    /// As written: `/root/...` or `~/...` (the guest user's home).
    pub guest: PathBuf,
    /// Permission bits of the guest copy, at most 0o777.
    #[serde(serialize_with = "serialize_mode")]
    pub mode: u32,
}

impl FileSync {
    pub const DEFAULT_MODE: u32 = 0o600;
}

fn serialize_mode<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

/// A kernel `kernel pull NAME` can fetch: a tarball (`vmlinux`, optionally `initrd.img` and
/// `modules/`) at `url`, trusted because its SHA256 matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelCatalogEntry {
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
    /// Tarball size in bytes; any other size is refused when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Kernel release; read from the kernel's version banner when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// An image bundle `image pull NAME` can fetch: a `.tar.zst` of `manifest.json` and
/// `rootfs.ext4` (what `image export` writes) at `url`, trusted because its SHA256 matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCatalogEntry {
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
    /// Bundle size in bytes; any other size is refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The kernel the image boots; the configured default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

impl ImageCatalogEntry {
    /// Checks one entry (from the config file or a remote catalog); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        banger_core::validate_artifact_name("image", &self.name)?;
        check_url(&self.url).map_err(|e| format!("url {:?}: {e}", self.url))?;
        check_sha256(&self.sha256).map_err(|e| format!("sha256 {:?}: {e}", self.sha256))?;
        if let Some(k) = &self.kernel {
            banger_core::validate_artifact_name("kernel", k)?;
        }
        Ok(())
    }
}

fn check_url(url: &str) -> Result<(), &'static str> {
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if !host.is_some_and(|h| !h.is_empty() && !h.starts_with('/'))
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("expected an http:// or https:// URL");
    }
    Ok(())
}

fn check_sha256(s: &str) -> Result<(), &'static str> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 64 hex digits");
    }
    Ok(())
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub log_level: LogLevel,
    pub vmm: VmmChoice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firecracker_bin: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_bin: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_bin: Option<PathBuf>,
    /// The uid and gid the jailer runs Firecracker as (both or neither; never 0). Unset: the
    /// owner recorded by `banger system install`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_gid: Option<u32>,
    /// The static guest agent put into banger's initramfs as `/init`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_bin: Option<PathBuf>,
    /// The root helper's socket (`banger system install` sets it): bridge, taps and NAT go
    /// through the helper, so the daemon needs no privilege. Unset: the daemon does them itself
    /// (it must then run as root for bridged networking).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helper_socket: Option<PathBuf>,
    pub root_disk: RootDiskStrategy,
    pub network: NetworkMode,
    /// Debian mirror for the default kernel and image.
    pub debian_mirror: String,
    /// How long a start waits for the guest to answer ssh.
    pub boot_timeout_secs: u64,
    /// How long banger waits for a VMM's control socket to appear and for one control call
    /// (Firecracker API request, QMP command) to answer. Unset: derived from
    /// `boot_timeout_secs` (see [`Config::vmm_timeout`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_timeout_secs: Option<u64>,
    pub bridge_name: String,
    pub bridge_cidr: Ipv4Cidr,
    /// Whether the file set `bridge_cidr`. When it did not, the daemon may pick a free network
    /// instead of the default (see docs/network.md).
    #[serde(skip)]
    pub bridge_cidr_explicit: bool,
    pub tap_pool_size: u32,
    pub dns_port: u16,
    pub default_image: String,
    pub default_kernel: String,
    pub stop_timeout_secs: u64,
    /// The cap on each VM's console log (`vmm.log`), and on its one rotated file.
    #[serde(serialize_with = "serialize_size")]
    pub vmm_log_max_size: ByteSize,
    // Tables last: TOML needs plain keys before them.
    pub vm_defaults: VmDefaults,
    pub file_sync: Vec<FileSync>,
    /// Kernels `kernel pull` knows besides the built-in ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel_catalog: Vec<KernelCatalogEntry>,
    /// Registries (`host` or `host:port`) `image pull --insecure` may reach over plain HTTP
    /// besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// A JSON list of [`ImageCatalogEntry`] fetched by `image pull NAME` for names not in
    /// `[[image_catalog]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_catalog_url: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_catalog: Vec<ImageCatalogEntry>,
}

impl Config {
    pub const DEFAULT_BRIDGE: &str = "br-banger";
    pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
    pub const DEFAULT_CIDR: &str = "172.30.0.0/24";
    pub const DEFAULT_DNS_PORT: u16 = 42069;
    pub const DEFAULT_IMAGE: &str = "debian-bookworm";
    pub const DEFAULT_KERNEL: &str = "debian-6.1-cloud";
    pub const MAX_TAP_POOL: u32 = 64;
    pub const MAX_STOP_TIMEOUT_SECS: u64 = 600;
    /// `vmm_log_max_size` by default, and its bounds (a pump write must fit in an empty file).
    pub const DEFAULT_VMM_LOG_MAX: ByteSize = ByteSize(4 * ByteSize::MIB);
    pub const MIN_VMM_LOG_MAX: ByteSize = ByteSize(64 * ByteSize::KIB);
    /// Kernels `kernel pull` knows without configuration; a `[[kernel_catalog]]` entry may not
    /// take one of these names.
    pub const BUILTIN_KERNELS: &[&str] = &["debian-6.1-cloud"];

    /// The floor of the derived [`Config::vmm_timeout`].
    pub const MIN_DERIVED_VMM_TIMEOUT_SECS: u64 = 10;

    /// How long a VMM may take to open its control socket and to answer one control call:
    /// `vmm_timeout_secs` when set, else a third of `boot_timeout_secs` and at least
    /// [`Self::MIN_DERIVED_VMM_TIMEOUT_SECS`]. A loaded or nested host takes many seconds for
    /// Firecracker's InstanceStart (it loads the kernel into guest memory), and a host slow
    /// enough for that needs a longer `boot_timeout_secs` too, so one follows the other.
    pub fn vmm_timeout(&self) -> std::time::Duration {
        let secs = self.vmm_timeout_secs.unwrap_or_else(|| {
            (self.boot_timeout_secs / 3).max(Self::MIN_DERIVED_VMM_TIMEOUT_SECS)
        });
        std::time::Duration::from_secs(secs)
    }

    /// Every key at its default for `host`.
    pub fn defaults(host: &HostInfo) -> Config {
        let (state_dir, runtime_dir, cache_dir) = if host.is_root() {
            (
                PathBuf::from("/var/lib/banger"),
                PathBuf::from("/run/banger"),
                PathBuf::from("/var/cache/banger"),
            )
        } else {
            let xdg = &host.xdg;
            (
                xdg.state_home
                    .clone()
                    .unwrap_or_else(|| host.home.join(".local/state"))
                    .join("banger"),
                xdg.runtime_dir
                    .as_ref()
                    .map(|d| d.join("banger"))
                    .unwrap_or_else(|| PathBuf::from(format!("/tmp/banger-{}", host.uid))),
                xdg.cache_home
                    .clone()
                    .unwrap_or_else(|| host.home.join(".cache"))
                    .join("banger"),
            )
        };
        Config {
            state_dir,
            runtime_dir,
            cache_dir,
            log_level: LogLevel::Info,
            vmm: VmmChoice::Auto,
            firecracker_bin: None,
            qemu_bin: None,
            jailer_bin: None,
            jailer_uid: None,
            jailer_gid: None,
            agent_bin: None,
            helper_socket: None,
            root_disk: RootDiskStrategy::Overlay,
            network: NetworkMode::Bridge,
            debian_mirror: Self::DEFAULT_MIRROR.to_string(),
            boot_timeout_secs: 180,
            vmm_timeout_secs: None,
            bridge_name: Self::DEFAULT_BRIDGE.to_string(),
            bridge_cidr: Ipv4Cidr::parse(Self::DEFAULT_CIDR).unwrap_or_else(|e| {
                unreachable!("built-in default {} is invalid: {e}", Self::DEFAULT_CIDR)
            }),
            bridge_cidr_explicit: false,
            tap_pool_size: 4,
            dns_port: Self::DEFAULT_DNS_PORT,
            default_image: Self::DEFAULT_IMAGE.to_string(),
            default_kernel: Self::DEFAULT_KERNEL.to_string(),
            stop_timeout_secs: 10,
            vmm_log_max_size: Self::DEFAULT_VMM_LOG_MAX,
            vm_defaults: VmDefaults::for_host(host),
            file_sync: Vec::new(),
            kernel_catalog: Vec::new(),
            insecure_registries: Vec::new(),
            image_catalog_url: None,
            image_catalog: Vec::new(),
        }
    }

    /// Where the config file is for the current user (see [`Config::default_path_for`]).
    pub fn default_path() -> PathBuf {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        let mut host = HostInfo::new(1, 0, home, nix::unistd::getuid().as_raw());
        host.xdg = XdgDirs::from_env();
        Self::default_path_for(&host)
    }

    /// `/etc/banger/config.toml` for root when that file exists (a system install); otherwise
    /// `$XDG_CONFIG_HOME/banger/config.toml`, else `~/.config/banger/config.toml`.
    pub fn default_path_for(host: &HostInfo) -> PathBuf {
        let system = Path::new(SYSTEM_CONFIG_PATH);
        if host.is_root() && system.is_file() {
            return system.to_path_buf();
        }
        let user = host
            .xdg
            .config_home
            .clone()
            .unwrap_or_else(|| host.home.join(".config"))
            .join("banger/config.toml");
        // The owner of a system install (`banger system install --owner USER`) talks to the
        // system daemon unless they keep a config of their own.
        if !user.exists() && system.is_file() && system_owner_uid() == Some(host.uid) {
            return system.to_path_buf();
        }
        user
    }

    /// Reads `path`; a missing file gives [`Config::defaults`].
    pub fn load(path: &Path, host: &HostInfo) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml_str(&text, host, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::defaults(host)),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses config text; `origin` names the file in errors.
    pub fn from_toml_str(
        text: &str,
        host: &HostInfo,
        origin: &Path,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(origin, text, &e))?;
        Checker { origin, host }.apply(raw, Self::defaults(host))
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }
}

/// "line 3 (`bogus = 1`): unknown field `bogus`, expected one of ...": the line's text names
/// the key even when serde's message does not.
fn parse_error(origin: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let location = e
        .span()
        .map(|span| {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} (`{line}`): ")
        })
        .unwrap_or_default();
    ConfigError::Parse {
        path: origin.to_path_buf(),
        message: format!("{location}{}", e.message().trim()),
    }
}

// The file as written. Scalars are kept as raw TOML values so that a wrong type is reported by
// `Checker` with the key and value named, like every other bad value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Value>,
    runtime_dir: Option<Value>,
    cache_dir: Option<Value>,
    log_level: Option<Value>,
    vmm: Option<Value>,
    firecracker_bin: Option<Value>,
    qemu_bin: Option<Value>,
    jailer_bin: Option<Value>,
    jailer_uid: Option<Value>,
    jailer_gid: Option<Value>,
    agent_bin: Option<Value>,
    helper_socket: Option<Value>,
    root_disk: Option<Value>,
    network: Option<Value>,
    debian_mirror: Option<Value>,
    boot_timeout_secs: Option<Value>,
    vmm_timeout_secs: Option<Value>,
    bridge_name: Option<Value>,
    bridge_cidr: Option<Value>,
    tap_pool_size: Option<Value>,
    dns_port: Option<Value>,
    default_image: Option<Value>,
    default_kernel: Option<Value>,
    stop_timeout_secs: Option<Value>,
    vmm_log_max_size: Option<Value>,
    vm_defaults: Option<RawVmDefaults>,
    file_sync: Option<Vec<RawFileSync>>,
    kernel_catalog: Option<Vec<RawKernelCatalogEntry>>,
    insecure_registries: Option<Vec<Value>>,
    image_catalog_url: Option<Value>,
    image_catalog: Option<Vec<Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmDefaults {
    vcpu: Option<Value>,
    memory_mib: Option<Value>,
    work_disk_size: Option<Value>,
    nested: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSync {
    host: Value,
    guest: Value,
    mode: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernelCatalogEntry {
    name: Value,
    url: Value,
    sha256: Value,
    size: Option<Value>,
    version: Option<Value>,
}

/// Validates raw values against one file and host.
struct Checker<'a> {
    origin: &'a Path,
    host: &'a HostInfo,
}

impl Checker<'_> {
    fn invalid(&self, key: &str, value: impl Display, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn string<'v>(&self, key: &str, v: &'v Value) -> Result<&'v str, ConfigError> {
        v.as_str()
            .ok_or_else(|| self.invalid(key, v, "expected a string"))
    }

    fn int(&self, key: &str, v: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n = v
            .as_integer()
            .ok_or_else(|| self.invalid(key, v, "expected an integer"))?;
        if n < min || n > max {
            return Err(self.invalid(key, v, format!("must be between {min} and {max}")));
        }
        Ok(n)
    }

    fn word<T: std::str::FromStr<Err = String>>(
        &self,
        key: &str,
        v: &Value,
    ) -> Result<T, ConfigError> {
        self.string(key, v)?
            .parse()
            .map_err(|reason: String| self.invalid(key, v, reason))
    }

    /// `~` and `~/x` mean the owner's home; the result must be absolute, since the daemon's
    /// working directory is not the user's.
    fn abs_path(&self, key: &str, v: &Value) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, v)?;
        let p = expand_home(s, &self.host.home);
        if !p.is_absolute() {
            return Err(self.invalid(key, v, "expected an absolute path or one starting with ~/"));
        }
        Ok(p)
    }

    /// A directory banger makes its own (and owner-only): never `/`, a system directory or
    /// the home directory itself (see [`dirs`]).
    fn own_dir(&self, key: &str, v: &Value) -> Result<PathBuf, ConfigError> {
        let p = self.abs_path(key, v)?;
        match dirs::forbidden_reason(&p, &self.host.home) {
            Some(reason) => Err(self.invalid(
                key,
                v,
                format!(
                    "{reason}; banger needs a directory of its own, e.g. {}",
                    p.join("banger").display()
                ),
            )),
            None => Ok(p),
        }
    }

    fn apply(&self, raw: RawConfig, mut c: Config) -> Result<Config, ConfigError> {
        if let Some(v) = &raw.state_dir {
            c.state_dir = self.own_dir("state_dir", v)?;
        }
        if let Some(v) = &raw.runtime_dir {
            c.runtime_dir = self.own_dir("runtime_dir", v)?;
        }
        if let Some(v) = &raw.cache_dir {
            c.cache_dir = self.own_dir("cache_dir", v)?;
        }
        if let Some(v) = &raw.log_level {
            c.log_level = self.word("log_level", v)?;
        }
        if let Some(v) = &raw.vmm {
            c.vmm = self.word("vmm", v)?;
        }
        if let Some(v) = &raw.firecracker_bin {
            c.firecracker_bin = Some(self.abs_path("firecracker_bin", v)?);
        }
        if let Some(v) = &raw.qemu_bin {
            c.qemu_bin = Some(self.abs_path("qemu_bin", v)?);
        }
        if let Some(v) = &raw.jailer_bin {
            c.jailer_bin = Some(self.abs_path("jailer_bin", v)?);
        }
        // Never 0 (root) and never u32::MAX ((uid_t)-1 means "unchanged" to the kernel).
        let max_id = i64::from(u32::MAX) - 1;
        if let Some(v) = &raw.jailer_uid {
            c.jailer_uid = Some(self.int("jailer_uid", v, 1, max_id)? as u32);
        }
        if let Some(v) = &raw.jailer_gid {
            c.jailer_gid = Some(self.int("jailer_gid", v, 1, max_id)? as u32);
        }
        match (&raw.jailer_uid, &raw.jailer_gid) {
            (Some(v), None) => {
                return Err(self.invalid("jailer_uid", v, "set jailer_gid too"));
            }
            (None, Some(v)) => {
                return Err(self.invalid("jailer_gid", v, "set jailer_uid too"));
            }
            _ => {}
        }
        if let Some(v) = &raw.helper_socket {
            c.helper_socket = Some(self.abs_path("helper_socket", v)?);
        }
        if let Some(v) = &raw.agent_bin {
            c.agent_bin = Some(self.abs_path("agent_bin", v)?);
        }
        if let Some(v) = &raw.root_disk {
            c.root_disk = self.word("root_disk", v)?;
        }
        if let Some(v) = &raw.network {
            c.network = self.word("network", v)?;
        }
        if let Some(v) = &raw.debian_mirror {
            let s = self.string("debian_mirror", v)?;
            if !(s.starts_with("http://") || s.starts_with("https://"))
                || s.contains(char::is_whitespace)
            {
                return Err(self.invalid(
                    "debian_mirror",
                    v,
                    "expected an http:// or https:// URL",
                ));
            }
            c.debian_mirror = s.trim_end_matches('/').to_string();
        }
        if let Some(v) = &raw.boot_timeout_secs {
            c.boot_timeout_secs = self.int("boot_timeout_secs", v, 5, 3600)? as u64;
        }
        if let Some(v) = &raw.vmm_timeout_secs {
            c.vmm_timeout_secs = Some(self.int("vmm_timeout_secs", v, 1, 3600)? as u64);
        }
        if let Some(v) = &raw.bridge_name {
            let s = self.string("bridge_name", v)?;
            check_bridge_name(s).map_err(|reason| self.invalid("bridge_name", v, reason))?;
            c.bridge_name = s.to_string();
        }
        if let Some(v) = &raw.bridge_cidr {
            c.bridge_cidr = Ipv4Cidr::parse(self.string("bridge_cidr", v)?)
                .map_err(|e| self.invalid("bridge_cidr", v, e.to_string()))?;
            c.bridge_cidr_explicit = true;
        }
        if let Some(v) = &raw.tap_pool_size {
            c.tap_pool_size =
                self.int("tap_pool_size", v, 0, i64::from(Config::MAX_TAP_POOL))? as u32;
        }
        if let Some(v) = &raw.dns_port {
            c.dns_port = self.int("dns_port", v, 1, 65535)? as u16;
        }
        if let Some(v) = &raw.default_image {
            c.default_image = self.artefact_name("default_image", v)?;
        }
        if let Some(v) = &raw.default_kernel {
            c.default_kernel = self.artefact_name("default_kernel", v)?;
        }
        if let Some(v) = &raw.stop_timeout_secs {
            let max = Config::MAX_STOP_TIMEOUT_SECS as i64;
            c.stop_timeout_secs = self.int("stop_timeout_secs", v, 1, max)? as u64;
        }
        if let Some(v) = &raw.vmm_log_max_size {
            let key = "vmm_log_max_size";
            let size = match v {
                Value::String(s) => {
                    ByteSize::parse(s).map_err(|e| self.invalid(key, v, e.to_string()))?
                }
                _ => return Err(self.invalid(key, v, "expected a size string like \"4M\"")),
            };
            if size < Config::MIN_VMM_LOG_MAX {
                return Err(self.invalid(key, v, "must be at least 64K"));
            }
            c.vmm_log_max_size = size;
        }
        if let Some(d) = &raw.vm_defaults {
            self.vm_defaults(d, &mut c.vm_defaults)?;
        }
        if let Some(entries) = &raw.file_sync {
            c.file_sync = self.file_sync(entries)?;
        }
        if let Some(entries) = &raw.kernel_catalog {
            c.kernel_catalog = self.kernel_catalog(entries)?;
        }
        if let Some(list) = &raw.insecure_registries {
            for (i, v) in list.iter().enumerate() {
                let key = format!("insecure_registries[{i}]");
                let s = self.string(&key, v)?;
                let ok = !s.is_empty()
                    && s.len() <= 253
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
                if !ok {
                    return Err(self.invalid(&key, v, "expected a registry host or host:port"));
                }
                c.insecure_registries.push(s.to_ascii_lowercase());
            }
        }
        if let Some(v) = &raw.image_catalog_url {
            let s = self.string("image_catalog_url", v)?;
            check_url(s).map_err(|e| self.invalid("image_catalog_url", v, e))?;
            c.image_catalog_url = Some(s.to_string());
        }
        if let Some(entries) = &raw.image_catalog {
            for (i, v) in entries.iter().enumerate() {
                let key = format!("image_catalog[{i}]");
                let e: ImageCatalogEntry = v
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| self.invalid(&key, v, e.message()))?;
                e.validate().map_err(|e| self.invalid(&key, v, e))?;
                if c.image_catalog.iter().any(|o| o.name == e.name) {
                    return Err(self.invalid(&key, v, "another image_catalog entry has this name"));
                }
                c.image_catalog.push(ImageCatalogEntry {
                    sha256: e.sha256.to_ascii_lowercase(),
                    ..e
                });
            }
        }
        Ok(c)
    }

    /// Image and kernel names become directory names under the state dir.
    fn artefact_name(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        let s = self.string(key, v)?;
        let ok = !s.is_empty()
            && s.len() <= 128
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:+".contains(c));
        if !ok {
            return Err(self.invalid(
                key,
                v,
                "expected 1 to 128 characters of a-z, A-Z, 0-9, '.', '_', '-', ':', '+'",
            ));
        }
        Ok(s.to_string())
    }

    fn vm_defaults(&self, raw: &RawVmDefaults, d: &mut VmDefaults) -> Result<(), ConfigError> {
        if let Some(v) = &raw.vcpu {
            d.vcpu = self.int("vm_defaults.vcpu", v, 1, i64::from(VmDefaults::MAX_VCPU))? as u32;
        }
        if let Some(v) = &raw.memory_mib {
            let min = i64::from(VmDefaults::MIN_MEMORY_MIB);
            d.memory_mib = self.int("vm_defaults.memory_mib", v, min, i64::from(u32::MAX))? as u32;
        }
        if let Some(v) = &raw.work_disk_size {
            let key = "vm_defaults.work_disk_size";
            let size = match v {
                Value::String(s) => {
                    ByteSize::parse(s).map_err(|e| self.invalid(key, v, e.to_string()))?
                }
                _ => return Err(self.invalid(key, v, "expected a size string like \"8G\"")),
            };
            if size < VmDefaults::MIN_WORK_DISK {
                return Err(self.invalid(key, v, "must be at least 64M"));
            }
            d.work_disk_size = size;
        }
        if let Some(v) = &raw.nested {
            d.nested = v
                .as_bool()
                .ok_or_else(|| self.invalid("vm_defaults.nested", v, "expected true or false"))?;
        }
        Ok(())
    }

    fn file_sync(&self, entries: &[RawFileSync]) -> Result<Vec<FileSync>, ConfigError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let key = |field: &str| format!("file_sync[{i}].{field}");

            let host_key = key("host");
            let host_raw = self.string(&host_key, &e.host)?;
            let host = expand_home(host_raw, &self.host.home);
            let home = &self.host.home;
            if has_parent_component(&host) {
                return Err(self.invalid(&host_key, &e.host, "'..' is not allowed"));
            }
            if !host.is_absolute() || !host.starts_with(home) || host == *home {
                return Err(self.invalid(
                    &host_key,
                    &e.host,
                    format!("must be a path under the home directory {}", home.display()),
                ));
            }

            let guest_key = key("guest");
            let guest_raw = self.string(&guest_key, &e.guest)?;
            let rest = guest_raw
                .strip_prefix("/root/")
                .or_else(|| guest_raw.strip_prefix("~/"));
            let Some(rest) = rest.filter(|r| !r.trim_matches('/').is_empty()) else {
                return Err(self.invalid(
                    &guest_key,
                    &e.guest,
                    "must be a path under /root/ or ~/",
                ));
            };
            if has_parent_component(Path::new(rest)) {
                return Err(self.invalid(&guest_key, &e.guest, "'..' is not allowed"));
            }
            // Both spellings name the same guest file when the guest user is root.
            if !seen.insert(rest.trim_end_matches('/').to_string()) {
                return Err(self.invalid(
                    &guest_key,
                    &e.guest,
                    "another file_sync entry already writes this guest path",
                ));
            }

            let mode = match &e.mode {
                None => FileSync::DEFAULT_MODE,
                Some(v) => {
                    let mode_key = key("mode");
                    parse_mode(self.string(&mode_key, v)?)
                        .map_err(|r| self.invalid(&mode_key, v, r))?
                }
            };
            out.push(FileSync {
                host,
                guest: PathBuf::from(guest_raw),
                mode,
            });
        }
        Ok(out)
    }
}

impl Checker<'_> {
    fn kernel_catalog(
        &self,
        entries: &[RawKernelCatalogEntry],
    ) -> Result<Vec<KernelCatalogEntry>, ConfigError> {
        let mut out: Vec<KernelCatalogEntry> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let key = |field: &str| format!("kernel_catalog[{i}].{field}");

            let name_key = key("name");
            let name = self.string(&name_key, &e.name)?;
            banger_core::validate_artifact_name("kernel", name)
                .map_err(|reason| self.invalid(&name_key, &e.name, reason))?;
            if Config::BUILTIN_KERNELS.contains(&name) {
                return Err(self.invalid(
                    &name_key,
                    &e.name,
                    "is a built-in kernel; give the catalog entry another name",
                ));
            }
            if out.iter().any(|o| o.name == name) {
                return Err(self.invalid(
                    &name_key,
                    &e.name,
                    "another kernel_catalog entry has this name",
                ));
            }

            let url_key = key("url");
            let url = self.string(&url_key, &e.url)?;
            check_url(url).map_err(|r| self.invalid(&url_key, &e.url, r))?;

            let sha_key = key("sha256");
            let sha256 = self.string(&sha_key, &e.sha256)?;
            check_sha256(sha256).map_err(|r| self.invalid(&sha_key, &e.sha256, r))?;

            let size = match &e.size {
                None => None,
                Some(v) => Some(self.int(&key("size"), v, 1, i64::MAX)? as u64),
            };
            let version = match &e.version {
                None => None,
                Some(v) => {
                    let version_key = key("version");
                    let s = self.string(&version_key, v)?;
                    if s.is_empty()
                        || s.len() > 128
                        || s.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(self.invalid(
                            &version_key,
                            v,
                            "expected 1 to 128 characters without spaces",
                        ));
                    }
                    Some(s.to_string())
                }
            };
            out.push(KernelCatalogEntry {
                name: name.to_string(),
                url: url.to_string(),
                sha256: sha256.to_ascii_lowercase(),
                size,
                version,
            });
        }
        Ok(out)
    }
}

fn expand_home(s: &str, home: &Path) -> PathBuf {
    if s == "~" {
        home.to_path_buf()
    } else if let Some(rest) = s.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(s)
    }
}

fn has_parent_component(p: &Path) -> bool {
    p.components().any(|c| c == Component::ParentDir)
}

/// `br-banger` or `br-banger-<suffix>`, the suffix 1+ of `a-z0-9`, and at most 15 bytes in all:
/// Linux interface names are limited to 15 bytes.
fn check_bridge_name(s: &str) -> Result<(), String> {
    const MAX_IFNAME: usize = 15;
    let ok = match s.strip_prefix("br-banger") {
        Some("") => true,
        Some(rest) => rest.strip_prefix('-').is_some_and(|suffix| {
            !suffix.is_empty()
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }),
        None => false,
    };
    if !ok || s.len() > MAX_IFNAME {
        return Err(format!(
            "expected br-banger or br-banger-<1 to {} of a-z0-9> (interface names are at most {MAX_IFNAME} bytes)",
            MAX_IFNAME - "br-banger-".len()
        ));
    }
    Ok(())
}

/// An octal permission string: `0600`, `600`, `0o600`; no setuid, setgid or sticky bits.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let reason = "expected an octal mode string like \"0600\" (at most 0777)";
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(reason.to_string());
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| reason.to_string())?;
    if mode > 0o777 {
        return Err(reason.to_string());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests;
