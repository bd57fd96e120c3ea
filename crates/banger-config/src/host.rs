//! Facts about the host that defaults are derived from, gathered once so tests can inject them.

use std::path::{Path, PathBuf};

use crate::ConfigError;

/// The XDG base directories from the environment. Unset, empty or relative values are `None`
/// (the XDG spec says relative ones must be ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdgDirs {
    pub config_home: Option<PathBuf>,
    pub state_home: Option<PathBuf>,
    pub cache_home: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
}

impl XdgDirs {
    pub fn from_env() -> XdgDirs {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        XdgDirs {
            config_home: var("XDG_CONFIG_HOME"),
            state_home: var("XDG_STATE_HOME"),
            cache_home: var("XDG_CACHE_HOME"),
            runtime_dir: var("XDG_RUNTIME_DIR"),
        }
    }
}

/// The host's size and the invoking user, as far as configuration defaults care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub home: PathBuf,
    pub uid: u32,
    /// XDG directories; [`HostInfo::new`] leaves them empty so defaults depend only on `home`.
    pub xdg: XdgDirs,
}

impl HostInfo {
    /// A host with no XDG variables set, for tests and callers that know their host.
    pub fn new(cpus: u32, memory_bytes: u64, home: impl Into<PathBuf>, uid: u32) -> HostInfo {
        HostInfo {
            cpus,
            memory_bytes,
            home: home.into(),
            uid,
            xdg: XdgDirs::default(),
        }
    }

    /// The running host: CPU count, `MemTotal` from /proc/meminfo, `$HOME` (root may lack it
    /// under an init system, so `/root` then), the real uid and the XDG variables.
    pub fn detect() -> Result<HostInfo, ConfigError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let meminfo = Path::new("/proc/meminfo");
        let text = std::fs::read_to_string(meminfo).map_err(|e| ConfigError::Host {
            what: "memory size",
            reason: format!("cannot read {}: {e}", meminfo.display()),
        })?;
        let memory_bytes = parse_mem_total(&text).ok_or_else(|| ConfigError::Host {
            what: "memory size",
            reason: format!("no MemTotal line in {}", meminfo.display()),
        })?;
        let uid = nix::unistd::getuid().as_raw();
        let home = match std::env::var_os("HOME").map(PathBuf::from) {
            Some(h) if h.is_absolute() => h,
            _ if uid == 0 => PathBuf::from("/root"),
            other => {
                return Err(ConfigError::Host {
                    what: "home directory",
                    reason: format!("$HOME is {other:?}; it must be set to an absolute path"),
                });
            }
        };
        Ok(HostInfo {
            cpus,
            memory_bytes,
            home,
            uid,
            xdg: XdgDirs::from_env(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// `MemTotal:       24576000 kB` → bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    let mult = match parts.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn detects_this_host() {
        let h = HostInfo::detect().unwrap();
        assert!(h.cpus >= 1);
        assert!(h.memory_bytes > 64 * 1024 * 1024);
        assert!(h.home.is_absolute());
        assert_eq!(h.uid, nix::unistd::getuid().as_raw());
    }
}
