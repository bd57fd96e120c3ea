//! The per-VM guest configuration: everything that makes one VM distinct from another built on
//! the same image. The daemon writes it to the config disk; the agent applies it at boot.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The only config version this crate reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// The init the agent runs when [`GuestConfig::init`] is unset: the first of these that exists
/// in the assembled root.
pub const DEFAULT_INITS: [&str; 3] = ["/sbin/init", "/lib/systemd/systemd", "/bin/sh"];

/// The `PATH` of commands the agent starts when [`GuestConfig::env`] sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A VM's identity and disk layout, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Format version; always [`CONFIG_VERSION`].
    pub v: u32,
    /// A DNS label: the VM's name.
    pub hostname: String,
    /// 32 lowercase hex digits (systemd's machine-id format).
    pub machine_id: String,
    pub root: RootLayout,
    /// ext4 UUID of the persistent work disk, mounted at `/root`.
    #[serde(default)]
    pub work_uuid: Option<String>,
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    #[serde(default)]
    pub ssh: Option<SshIdentity>,
    #[serde(default)]
    pub files: Vec<GuestFile>,
    /// Absolute path of the init to run; unset means the first of [`DEFAULT_INITS`] that exists.
    /// Only meaningful with [`InitMode::Image`].
    #[serde(default)]
    pub init: Option<String>,
    /// Who is PID 1 once the root is assembled.
    #[serde(default)]
    pub init_mode: InitMode,
    /// Who serves ssh on port 22.
    #[serde(default)]
    pub ssh_server: SshServer,
    /// The image's environment (`KEY=VALUE`, from the OCI config), for the commands the agent
    /// starts: ssh sessions of its own server and an sshd it spawns. Without a `PATH` entry,
    /// [`DEFAULT_PATH`] is used.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of ssh sessions of the agent's server (the OCI `WorkingDir`); unset
    /// means the user's home.
    #[serde(default)]
    pub workdir: Option<String>,
    /// `--nested` VMs: the kernel's module tree on a read-only ext4 disk, whose
    /// [`MODULES_LOAD_ORDER`] modules the agent loads (kvm, tun, bridge, nf_tables, ...) and
    /// which it mounts at `/lib/modules/<release>` in the guest for modprobe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<ModulesDisk>,
}

/// The file at the top of a modules disk listing the modules the agent loads at boot, one path
/// relative to the tree per line, dependencies first.
pub const MODULES_LOAD_ORDER: &str = "banger-load-order";

/// A read-only ext4 holding `lib/modules/<release>/`'s content (with depmod's indexes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulesDisk {
    pub uuid: String,
    /// The kernel release the tree belongs to: a single path component.
    pub release: String,
}

/// Parses a modules disk's [`MODULES_LOAD_ORDER`]: relative paths of `.ko` files without `..`
/// (`#` comments and blank lines skipped). Err: (line number, why).
pub fn parse_modules_load_order(text: &str) -> Result<Vec<String>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let clean = !line.starts_with('/')
            && line.ends_with(".ko")
            && line
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
            && !line.contains('\0');
        if !clean {
            return Err((i + 1, format!("{line:?} is not a relative .ko path")));
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Who is PID 1 after the switch to the image's root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// Exec the image's init ([`GuestConfig::init`] or the first of [`DEFAULT_INITS`]).
    #[default]
    Image,
    /// The image has no init system: the agent stays PID 1, reaps orphans, runs the ssh service
    /// and turns shutdown requests (signals, power button) into a clean power-off.
    Agent,
}

/// Who answers ssh on port 22.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SshServer {
    /// The image's own sshd: started by the image's init, or, with [`InitMode::Agent`], spawned
    /// (and restarted) by the agent as `sshd -D -e`.
    #[default]
    Image,
    /// The agent's built-in server: publickey auth for `root` with [`SshIdentity`]'s keys only;
    /// exec, shell, pty. Needs [`GuestConfig::ssh`].
    Agent,
}

/// How the root filesystem is assembled. Disks are named by ext4 UUID, never by attach order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootLayout {
    /// The shared image (read-only, never written) under a per-VM upper disk, joined by overlayfs.
    Overlay {
        lower_uuid: String,
        upper_uuid: String,
    },
    /// A per-VM full copy (reflink or sparse copy) of the image, mounted read-write.
    Direct { uuid: String },
}

/// Static IPv4 configuration of the VM's one interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// `aa:bb:cc:dd:ee:ff`: how the agent finds the interface.
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// The VM's own ssh host key and the keys allowed to log in as root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshIdentity {
    /// OpenSSH private key text (`-----BEGIN OPENSSH PRIVATE KEY-----` ...).
    pub host_key_ed25519: String,
    /// `ssh-ed25519 AAAA... comment`.
    pub host_key_ed25519_pub: String,
    /// One public key per entry, written to `/root/.ssh/authorized_keys`.
    #[serde(default)]
    pub authorized_keys: Vec<String>,
}

/// An extra file the agent writes into the guest, owned by root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFile {
    /// Absolute path inside the guest, without `..`.
    pub path: String,
    /// Permission bits, at most `0o7777`.
    pub mode: u32,
    /// The content, standard padded base64.
    pub content_b64: String,
}

impl GuestFile {
    /// A file entry holding `content`.
    pub fn new(path: impl Into<String>, mode: u32, content: &[u8]) -> Self {
        GuestFile {
            path: path.into(),
            mode,
            content_b64: crate::base64::encode(content),
        }
    }

    /// The decoded content.
    pub fn content(&self) -> Result<Vec<u8>, ConfigError> {
        crate::base64::decode(&self.content_b64).map_err(|e| ConfigError::FileContent {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// Why a [`GuestConfig`] is invalid. Each variant names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported guest config version {0} (this build reads version {CONFIG_VERSION})")]
    Version(u32),
    #[error(
        "hostname {0:?} is not a DNS label (1-63 of a-z, A-Z, 0-9, '-', not starting or ending with '-')"
    )]
    Hostname(String),
    #[error("machine id {0:?} is not 32 lowercase hex digits")]
    MachineId(String),
    #[error("{field} {value:?} is not a canonical lowercase UUID (8-4-4-4-12 hex)")]
    Uuid { field: &'static str, value: String },
    #[error("MAC address {0:?} is not six colon-separated hex bytes")]
    Mac(String),
    #[error("prefix length {0} is larger than 32")]
    PrefixLen(u8),
    #[error("gateway {gateway} is not inside {address}/{prefix_len}")]
    Gateway {
        gateway: Ipv4Addr,
        address: Ipv4Addr,
        prefix_len: u8,
    },
    #[error("ssh {field}: {reason}")]
    Ssh { field: &'static str, reason: String },
    #[error("file path {0:?} must be absolute, without '..' or empty components, and not '/'")]
    FilePath(String),
    #[error("file {path:?}: mode {mode:#o} is larger than 0o7777")]
    FileMode { path: String, mode: u32 },
    #[error("file {path:?}: content is not valid base64: {reason}")]
    FileContent { path: String, reason: String },
    #[error("init {0:?} must be an absolute path without '..'")]
    Init(String),
    #[error(
        "init {0:?} is set but init_mode is \"agent\" (the agent stays PID 1 and runs no init)"
    )]
    InitWithAgentInit(String),
    #[error("ssh_server \"agent\" needs the ssh identity (host key and authorized keys)")]
    SshServerWithoutIdentity,
    #[error("ssh_server \"agent\" needs at least one authorized key")]
    SshServerWithoutKeys,
    #[error("env entry {0:?} is not KEY=VALUE (non-empty KEY, no NUL)")]
    Env(String),
    #[error("workdir {0:?} must be an absolute path without '..' components or NUL")]
    Workdir(String),
    #[error("modules release {0:?} must be one path component (no '/', not '.' or '..')")]
    ModulesRelease(String),
}

impl GuestConfig {
    /// Checks every field the agent relies on, so a bad config fails at `vm create` on the host
    /// rather than at boot inside the guest.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.v != CONFIG_VERSION {
            return Err(ConfigError::Version(self.v));
        }
        if !is_dns_label(&self.hostname) {
            return Err(ConfigError::Hostname(self.hostname.clone()));
        }
        if self.machine_id.len() != 32 || !self.machine_id.bytes().all(is_lower_hex) {
            return Err(ConfigError::MachineId(self.machine_id.clone()));
        }
        match &self.root {
            RootLayout::Overlay {
                lower_uuid,
                upper_uuid,
            } => {
                check_uuid("root.lower_uuid", lower_uuid)?;
                check_uuid("root.upper_uuid", upper_uuid)?;
            }
            RootLayout::Direct { uuid } => check_uuid("root.uuid", uuid)?,
        }
        if let Some(u) = &self.work_uuid {
            check_uuid("work_uuid", u)?;
        }
        if let Some(net) = &self.network {
            net.validate()?;
        }
        if let Some(ssh) = &self.ssh {
            ssh.validate()?;
        }
        for f in &self.files {
            if !is_clean_absolute(&f.path) || f.path == "/" {
                return Err(ConfigError::FilePath(f.path.clone()));
            }
            if f.mode > 0o7777 {
                return Err(ConfigError::FileMode {
                    path: f.path.clone(),
                    mode: f.mode,
                });
            }
            f.content()?;
        }
        if let Some(init) = &self.init {
            if !is_clean_absolute(init) {
                return Err(ConfigError::Init(init.clone()));
            }
            if self.init_mode == InitMode::Agent {
                return Err(ConfigError::InitWithAgentInit(init.clone()));
            }
        }
        if self.ssh_server == SshServer::Agent {
            match &self.ssh {
                None => return Err(ConfigError::SshServerWithoutIdentity),
                Some(ssh) if ssh.authorized_keys.is_empty() => {
                    return Err(ConfigError::SshServerWithoutKeys);
                }
                Some(_) => {}
            }
        }
        for e in &self.env {
            if env_pair(e).is_none() {
                return Err(ConfigError::Env(e.clone()));
            }
        }
        if let Some(w) = &self.workdir {
            // OCI configs carry whatever the image author wrote ("/app/", "/a//b"), so only what
            // could escape or break a C string is refused; the path is used as is.
            let abs = w.starts_with('/');
            if !abs || w.contains('\0') || w.split('/').any(|c| c == "..") {
                return Err(ConfigError::Workdir(w.clone()));
            }
        }
        if let Some(m) = &self.modules {
            check_uuid("modules.uuid", &m.uuid)?;
            let r = &m.release;
            if r.is_empty() || r == "." || r == ".." || r.contains('/') || r.contains('\0') {
                return Err(ConfigError::ModulesRelease(r.clone()));
            }
        }
        Ok(())
    }

    /// The environment of commands the agent starts: [`env`](Self::env) in order (a later entry
    /// replaces an earlier one with the same key), plus `PATH` = [`DEFAULT_PATH`] if none is
    /// set. Malformed entries (refused by [`validate`](Self::validate)) are skipped.
    pub fn command_env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in self.env.iter().filter_map(|e| env_pair(e)) {
            match out.iter_mut().find(|(ok, _)| ok == k) {
                Some(slot) => slot.1 = v.to_string(),
                None => out.push((k.to_string(), v.to_string())),
            }
        }
        if !out.iter().any(|(k, _)| k == "PATH") {
            out.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        out
    }

    /// The disk UUIDs this config names, in the order the agent needs them.
    pub fn disk_uuids(&self) -> Vec<&str> {
        let mut v: Vec<&str> = match &self.root {
            RootLayout::Overlay {
                lower_uuid,
                upper_uuid,
            } => vec![lower_uuid, upper_uuid],
            RootLayout::Direct { uuid } => vec![uuid],
        };
        v.extend(self.work_uuid.as_deref());
        v.extend(self.modules.as_ref().map(|m| m.uuid.as_str()));
        v
    }

    /// The inits to try, in order.
    pub fn init_candidates(&self) -> Vec<&str> {
        match &self.init {
            Some(i) => vec![i.as_str()],
            None => DEFAULT_INITS.to_vec(),
        }
    }
}

impl NetworkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if parse_mac(&self.mac).is_none() {
            return Err(ConfigError::Mac(self.mac.clone()));
        }
        if self.prefix_len > 32 {
            return Err(ConfigError::PrefixLen(self.prefix_len));
        }
        let mask = self.netmask();
        if u32::from(self.gateway) & u32::from(mask) != u32::from(self.address) & u32::from(mask) {
            return Err(ConfigError::Gateway {
                gateway: self.gateway,
                address: self.address,
                prefix_len: self.prefix_len,
            });
        }
        Ok(())
    }

    /// The netmask for [`prefix_len`](Self::prefix_len) (which must be at most 32).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
    }

    /// The MAC as bytes, if well formed.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

impl SshIdentity {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.host_key_ed25519.contains("PRIVATE KEY-----") {
            return Err(ConfigError::Ssh {
                field: "host_key_ed25519",
                reason: "not an OpenSSH private key".into(),
            });
        }
        if !self.host_key_ed25519_pub.starts_with("ssh-ed25519 ")
            || self.host_key_ed25519_pub.trim_end().contains('\n')
        {
            return Err(ConfigError::Ssh {
                field: "host_key_ed25519_pub",
                reason: "not one 'ssh-ed25519 ...' line".into(),
            });
        }
        for k in &self.authorized_keys {
            if k.trim().is_empty() || k.trim_end().contains('\n') {
                return Err(ConfigError::Ssh {
                    field: "authorized_keys",
                    reason: format!("entry {k:?} is not one non-empty line"),
                });
            }
        }
        Ok(())
    }
}

/// Splits `KEY=VALUE` at the first `=`; `None` for an empty key, no `=` or a NUL byte.
pub fn env_pair(entry: &str) -> Option<(&str, &str)> {
    let (k, v) = entry.split_once('=')?;
    (!k.is_empty() && !entry.contains('\0')).then_some((k, v))
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether `s` is a canonical lowercase UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => is_lower_hex(b),
        })
}

fn check_uuid(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if is_canonical_uuid(value) {
        Ok(())
    } else {
        Err(ConfigError::Uuid {
            field,
            value: value.to_string(),
        })
    }
}

/// Absolute, no `.`/`..`/empty components (so `a//b` and a trailing `/` are refused), no NUL.
fn is_clean_absolute(p: &str) -> bool {
    let Some(rest) = p.strip_prefix('/') else {
        return false;
    };
    !p.contains('\0')
        && (rest.is_empty()
            || rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> GuestConfig {
        GuestConfig {
            v: 1,
            hostname: "devbox".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            root: RootLayout::Overlay {
                lower_uuid: "11111111-2222-3333-4444-555555555555".into(),
                upper_uuid: "66666666-7777-8888-9999-aaaaaaaaaaaa".into(),
            },
            work_uuid: Some("bbbbbbbb-cccc-dddd-eeee-ffffffffffff".into()),
            network: Some(NetworkConfig {
                mac: "06:00:ac:10:00:02".into(),
                address: Ipv4Addr::new(172, 16, 0, 2),
                prefix_len: 24,
                gateway: Ipv4Addr::new(172, 16, 0, 1),
                dns: vec![Ipv4Addr::new(172, 16, 0, 1)],
            }),
            ssh: Some(SshIdentity {
                host_key_ed25519:
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
                        .into(),
                host_key_ed25519_pub: "ssh-ed25519 AAAAC3Nza host".into(),
                authorized_keys: vec!["ssh-ed25519 AAAAC3Nzb user@laptop".into()],
            }),
            files: vec![GuestFile::new("/etc/banger/hello", 0o644, b"hi\n")],
            init: None,
            init_mode: InitMode::Image,
            ssh_server: SshServer::Image,
            env: vec!["PATH=/usr/bin:/bin".into(), "LANG=C.UTF-8".into()],
            workdir: Some("/srv/app".into()),
            modules: None,
        }
    }

    #[test]
    fn sample_is_valid_and_json_shape_is_stable() {
        let c = sample();
        c.validate().unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["root"]["kind"], "overlay");
        assert_eq!(
            json["root"]["lower_uuid"],
            "11111111-2222-3333-4444-555555555555"
        );
        assert_eq!(json["network"]["address"], "172.16.0.2");
        assert_eq!(json["files"][0]["content_b64"], "aGkK");
        let back: GuestConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let c: GuestConfig = serde_json::from_str(
            r#"{"v":1,"hostname":"a","machine_id":"0123456789abcdef0123456789abcdef",
                "root":{"kind":"direct","uuid":"11111111-2222-3333-4444-555555555555"}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.disk_uuids(), ["11111111-2222-3333-4444-555555555555"]);
        assert_eq!(c.init_candidates(), DEFAULT_INITS);
        assert!(c.files.is_empty() && c.network.is_none() && c.ssh.is_none());
        // A config written before the modes existed means: the image's init and sshd.
        assert_eq!(c.init_mode, InitMode::Image);
        assert_eq!(c.ssh_server, SshServer::Image);
        assert!(c.env.is_empty() && c.workdir.is_none());
        assert_eq!(
            c.command_env(),
            [("PATH".to_string(), DEFAULT_PATH.to_string())]
        );
    }

    #[test]
    fn modes_env_and_workdir_json_shape() {
        let mut c = sample();
        c.init_mode = InitMode::Agent;
        c.ssh_server = SshServer::Agent;
        c.validate().unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["init_mode"], "agent");
        assert_eq!(json["ssh_server"], "agent");
        assert_eq!(json["env"][1], "LANG=C.UTF-8");
        assert_eq!(json["workdir"], "/srv/app");
        let back: GuestConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, c);
        let image = serde_json::to_value(sample()).unwrap();
        assert_eq!(image["init_mode"], "image");
        assert_eq!(image["ssh_server"], "image");
        let mut bad = json;
        bad["init_mode"] = "systemd".into();
        let err = serde_json::from_value::<GuestConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("systemd"), "{err}");
    }

    #[test]
    fn command_env_adds_path_and_keeps_the_last_duplicate() {
        let mut c = sample();
        assert_eq!(
            c.command_env(),
            [
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("LANG".to_string(), "C.UTF-8".to_string())
            ]
        );
        c.env = vec!["A=1".into(), "B==x=".into(), "A=2".into(), "EMPTY=".into()];
        assert_eq!(
            c.command_env(),
            [
                ("A".to_string(), "2".to_string()),
                ("B".to_string(), "=x=".to_string()),
                ("EMPTY".to_string(), String::new()),
                ("PATH".to_string(), DEFAULT_PATH.to_string())
            ]
        );
        assert_eq!(env_pair("K=V"), Some(("K", "V")));
        assert_eq!(env_pair("=V"), None);
        assert_eq!(env_pair("KV"), None);
        assert_eq!(env_pair("K=a\0b"), None);
    }

    #[test]
    fn each_invalid_field_is_named() {
        type Mutation = Box<dyn Fn(&mut GuestConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.v = 2), "version 2"),
            (Box::new(|c| c.hostname = "-bad".into()), "\"-bad\""),
            (Box::new(|c| c.hostname = "a.b".into()), "\"a.b\""),
            (Box::new(|c| c.hostname = "x".repeat(64)), "DNS label"),
            (
                Box::new(|c| c.machine_id = "0123456789ABCDEF0123456789abcdef".into()),
                "machine id",
            ),
            (Box::new(|c| c.machine_id = "abc".into()), "\"abc\""),
            (
                Box::new(|c| c.work_uuid = Some("BBBBBBBB-cccc-dddd-eeee-ffffffffffff".into())),
                "work_uuid",
            ),
            (
                Box::new(|c| {
                    c.root = RootLayout::Direct {
                        uuid: "1111111122223333444455555555555".into(),
                    }
                }),
                "root.uuid",
            ),
            (
                Box::new(|c| c.network.as_mut().unwrap().mac = "06:00:ac:10:00".into()),
                "MAC",
            ),
            (
                Box::new(|c| c.network.as_mut().unwrap().prefix_len = 33),
                "33",
            ),
            (
                Box::new(|c| c.network.as_mut().unwrap().gateway = Ipv4Addr::new(10, 0, 0, 1)),
                "10.0.0.1",
            ),
            (
                Box::new(|c| c.ssh.as_mut().unwrap().host_key_ed25519 = "nope".into()),
                "host_key_ed25519",
            ),
            (
                Box::new(|c| c.ssh.as_mut().unwrap().authorized_keys.push("a\nb".into())),
                "authorized_keys",
            ),
            (Box::new(|c| c.files[0].path = "etc/x".into()), "\"etc/x\""),
            (
                Box::new(|c| c.files[0].path = "/etc/../x".into()),
                "/etc/../x",
            ),
            (Box::new(|c| c.files[0].path = "/etc//x".into()), "/etc//x"),
            (Box::new(|c| c.files[0].path = "/".into()), "\"/\""),
            (Box::new(|c| c.files[0].mode = 0o10000), "0o10000"),
            (
                Box::new(|c| c.files[0].content_b64 = "!!!!".into()),
                "base64",
            ),
            (Box::new(|c| c.init = Some("sbin/init".into())), "init"),
            (
                Box::new(|c| {
                    c.init = Some("/sbin/init".into());
                    c.init_mode = InitMode::Agent;
                }),
                "init_mode is \"agent\"",
            ),
            (
                Box::new(|c| {
                    c.ssh = None;
                    c.ssh_server = SshServer::Agent;
                }),
                "needs the ssh identity",
            ),
            (
                Box::new(|c| {
                    c.ssh.as_mut().unwrap().authorized_keys.clear();
                    c.ssh_server = SshServer::Agent;
                }),
                "at least one authorized key",
            ),
            (Box::new(|c| c.env.push("NOEQUALS".into())), "\"NOEQUALS\""),
            (Box::new(|c| c.env.push("=value".into())), "env entry"),
            (Box::new(|c| c.env.push("K=a\0b".into())), "KEY=VALUE"),
            (
                Box::new(|c| c.workdir = Some("app".into())),
                "workdir \"app\"",
            ),
            (Box::new(|c| c.workdir = Some("/a/../b".into())), "/a/../b"),
            (Box::new(|c| c.workdir = Some("/a\0".into())), "workdir"),
        ];
        for (mutate, needle) in cases {
            let mut c = sample();
            mutate(&mut c);
            let err = c.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
    }

    #[test]
    fn lenient_but_safe_workdir_and_agent_modes_without_ssh() {
        let mut c = sample();
        for ok in ["/", "/app/", "/usr/src//app"] {
            c.workdir = Some(ok.into());
            c.validate().unwrap();
        }
        // The agent as PID 1 with the image's sshd (or none at all) needs no identity.
        c.init_mode = InitMode::Agent;
        c.ssh = None;
        c.validate().unwrap();
    }

    #[test]
    fn netmask_and_mac() {
        let mut n = sample().network.unwrap();
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        n.prefix_len = 0;
        assert_eq!(n.netmask(), Ipv4Addr::new(0, 0, 0, 0));
        n.prefix_len = 32;
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(n.mac_bytes(), Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(
            parse_mac("AA:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("aabbccddeeff"), None);
    }

    #[test]
    fn uuid_canonical_form() {
        assert!(is_canonical_uuid("0f0e0d0c-0b0a-0908-0706-050403020100"));
        assert!(!is_canonical_uuid("0f0e0d0c0b0a09080706050403020100"));
        assert!(!is_canonical_uuid("0f0e0d0c-0b0a-0908-0706-05040302010g"));
        assert!(!is_canonical_uuid("{f0e0d0c-0b0a-0908-0706-050403020100}"));
    }

    #[test]
    fn modules_disk_is_validated_and_waited_for() {
        let mut c = sample();
        c.modules = Some(ModulesDisk {
            uuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            release: "6.1.0-50-cloud-amd64".into(),
        });
        c.validate().unwrap();
        assert!(
            c.disk_uuids()
                .contains(&"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        );
        for bad in ["..", "a/b", ""] {
            c.modules.as_mut().unwrap().release = bad.into();
            assert_eq!(c.validate(), Err(ConfigError::ModulesRelease(bad.into())));
        }
        assert_eq!(
            parse_modules_load_order(
                "# kvm\nkernel/virt/lib/irqbypass.ko\n\nkernel/arch/x86/kvm/kvm.ko\n"
            ),
            Ok(vec![
                "kernel/virt/lib/irqbypass.ko".to_string(),
                "kernel/arch/x86/kvm/kvm.ko".to_string()
            ])
        );
        for bad in [
            "/kernel/x.ko",
            "kernel/../x.ko",
            "kernel/x.o",
            "kernel//x.ko",
        ] {
            assert!(parse_modules_load_order(bad).is_err(), "{bad}");
        }
    }
}
