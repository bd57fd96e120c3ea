//! What the helper allows, fixed at start-up: whose requests it serves, where banger's files
//! live and which network banger may shape. Nothing a request carries can widen it.

use std::path::{Path, PathBuf};

use banger_config::{Config, HostInfo, Ipv4Cidr};
use banger_net::BridgeName;

use crate::error::HelperError;
use crate::safepath;

/// The system config file the helper reads by default.
pub const DEFAULT_CONFIG: &str = "/etc/banger/config.toml";

/// The helper's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperConfig {
    /// The unprivileged user bangerd runs as; the only uid besides root that may connect, and
    /// the owner of every tap and tar the helper makes.
    pub owner_uid: u32,
    /// banger's state directory: loop devices are only made for files under its `images/` and
    /// `vms/`, and images are only built into its `build/`.
    pub state_dir: PathBuf,
    /// banger's runtime directory (sockets; never a source of files for root).
    pub runtime_dir: PathBuf,
    /// The one bridge the helper manages.
    pub bridge_name: BridgeName,
    /// The one network on it: the gateway is its first address, VMs get the others.
    pub bridge_cidr: Ipv4Cidr,
}

impl HelperConfig {
    /// Takes the policy from banger's config (as root reads it) and the owner given on the
    /// command line, and checks it (see [`HelperConfig::check`]).
    pub fn from_config(config: &Config, owner_uid: u32) -> Result<Self, HelperError> {
        let bridge_name = BridgeName::parse(&config.bridge_name)
            .map_err(|e| HelperError::bad_request(format!("config bridge_name: {e}")))?;
        let cfg = HelperConfig {
            owner_uid,
            state_dir: config.state_dir.clone(),
            runtime_dir: config.runtime_dir.clone(),
            bridge_name,
            bridge_cidr: config.bridge_cidr,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Loads `path` (a missing file means banger's defaults for root: `/var/lib/banger`,
    /// `/run/banger`, `br-banger`, `172.30.0.0/24`).
    pub fn load(path: &Path, owner_uid: u32) -> Result<Self, HelperError> {
        let host = HostInfo::detect()
            .map_err(|e| HelperError::failed(format!("detecting the host: {e}")))?;
        let config = Config::load(path, &host)
            .map_err(|e| HelperError::bad_request(format!("{}: {e}", path.display())))?;
        Self::from_config(&config, owner_uid)
    }

    /// Checks the policy itself: an unprivileged owner, and state and runtime directories
    /// that are absolute and normalized and, where they exist already, reached without a
    /// symlink, owned by root or the owner and not writable by anyone else. A directory that
    /// does not exist yet is fine (the daemon creates it); every request walks it again.
    pub fn check(&self) -> Result<(), HelperError> {
        if self.owner_uid == 0 {
            return Err(HelperError::bad_request(
                "owner: uid 0 given; the owner must be the unprivileged user bangerd runs as",
            ));
        }
        for (field, dir) in [
            ("state_dir", &self.state_dir),
            ("runtime_dir", &self.runtime_dir),
        ] {
            let shown = dir.to_string_lossy();
            let comps = crate::validate::absolute_path(field, &shown)?;
            if comps.is_empty() {
                return Err(HelperError::bad_request(format!(
                    "{field}: {} cannot be the root directory",
                    crate::protocol::show(&shown)
                )));
            }
            match safepath::walk_dir(&comps, self.owner_uid) {
                Ok(_) => {}
                Err(safepath::WalkError::Missing(_)) => {}
                Err(e) => return Err(HelperError::forbidden(format!("{field}: {e}"))),
            }
        }
        if self.state_dir.starts_with(&self.runtime_dir)
            || self.runtime_dir.starts_with(&self.state_dir)
        {
            return Err(HelperError::bad_request(format!(
                "state_dir {} and runtime_dir {} must not contain each other",
                self.state_dir.display(),
                self.runtime_dir.display()
            )));
        }
        Ok(())
    }

    /// `<state_dir>/<area>`.
    pub fn area(&self, area: &str) -> PathBuf {
        self.state_dir.join(area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Someone else than root when we are root, ourselves otherwise (so the temp dirs we
    /// make belong to root or the owner either way).
    fn owner() -> u32 {
        match nix::unistd::geteuid().as_raw() {
            0 => 1000,
            me => me,
        }
    }

    fn config_in(dir: &Path) -> Config {
        let host = HostInfo::new(2, 1 << 30, dir, 0);
        let mut c = Config::defaults(&host);
        c.state_dir = dir.join("state");
        c.runtime_dir = dir.join("run");
        c
    }

    #[test]
    fn takes_the_policy_from_banger_config() {
        let d = tempfile::tempdir().unwrap();
        let c = config_in(d.path());
        let h = HelperConfig::from_config(&c, owner()).unwrap();
        assert_eq!(h.owner_uid, owner());
        assert_eq!(h.bridge_name.as_str(), "br-banger");
        assert_eq!(h.bridge_cidr.to_string(), "172.30.0.0/24");
        assert_eq!(h.area("build"), d.path().join("state/build"));
    }

    #[test]
    fn loads_a_file_and_defaults() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        std::fs::write(
            &f,
            format!(
                "state_dir = \"{0}/s\"\nruntime_dir = \"{0}/r\"\nbridge_name = \"br-banger-x\"\nbridge_cidr = \"10.9.0.0/16\"\n",
                d.path().display()
            ),
        )
        .unwrap();
        let h = HelperConfig::load(&f, owner()).unwrap();
        assert_eq!(h.bridge_name.as_str(), "br-banger-x");
        assert_eq!(h.bridge_cidr.to_string(), "10.9.0.0/16");
        std::fs::write(&f, "bogus = 1\n").unwrap();
        let e = HelperConfig::load(&f, owner()).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn refuses_a_root_owner_and_bad_dirs() {
        let d = tempfile::tempdir().unwrap();
        let c = config_in(d.path());
        let e = HelperConfig::from_config(&c, 0).unwrap_err();
        assert!(e.to_string().contains("owner"), "{e}");

        let mut c2 = c.clone();
        c2.state_dir = "relative/state".into();
        let e = HelperConfig::from_config(&c2, owner()).unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");

        let mut c3 = c.clone();
        c3.runtime_dir = c.state_dir.join("run");
        HelperConfig::from_config(&c3, owner()).unwrap_err();

        // A symlinked state dir is refused.
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        let mut c4 = c.clone();
        c4.state_dir = d.path().join("link");
        let e = HelperConfig::from_config(&c4, owner()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");

        // A world-writable one too.
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(d.path().join("state")).unwrap();
        std::fs::set_permissions(
            d.path().join("state"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let e = HelperConfig::from_config(&c, owner()).unwrap_err();
        assert!(e.to_string().contains("writable"), "{e}");
    }

    #[test]
    fn refuses_a_foreign_bridge_name() {
        let d = tempfile::tempdir().unwrap();
        let mut c = config_in(d.path());
        c.bridge_name = "docker0".into();
        let e = HelperConfig::from_config(&c, owner()).unwrap_err();
        assert!(e.to_string().contains("docker0"), "{e}");
    }
}
