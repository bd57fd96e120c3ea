//! Finding the VM's disks by content: the config disk by its magic, the others by ext4 UUID.
//! Attach order differs between VMMs (and between root-disk strategies), content does not.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_guest::GuestConfig;
use banger_guest::disk::{declared_len, has_magic};
use banger_guest::ext4::Ext4Info;

use crate::error::AgentError;

/// What one pass over the block devices saw.
#[derive(Debug, Default)]
pub struct Scan {
    /// The config disk and its decoded content (or why it could not be decoded).
    pub config: Option<(PathBuf, Result<GuestConfig, banger_guest::ConfigDiskError>)>,
    /// ext4 UUID → device.
    pub by_uuid: BTreeMap<String, PathBuf>,
    /// `vda (config)`, `vdb (ext4 <uuid>)`, `vdc (unknown)`, for error messages.
    pub seen: Vec<String>,
}

/// The result of [`wait_for_disks`]: a valid config and every disk it names.
#[derive(Debug)]
pub struct Found {
    pub config_device: PathBuf,
    pub config: GuestConfig,
    pub by_uuid: BTreeMap<String, PathBuf>,
}

impl Found {
    pub fn describe(&self) -> String {
        let mut s = format!("config {}", self.config_device.display());
        for uuid in self.config.disk_uuids() {
            if let Some(dev) = self.by_uuid.get(uuid) {
                s.push_str(&format!(", {} = {uuid}", dev.display()));
            }
        }
        s
    }
}

fn read_upto(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads one device: the config disk if it has the magic, else an ext4 superblock if any.
fn probe(dev: &Path) -> std::io::Result<Probe> {
    let f = std::fs::File::open(dev)?;
    let mut head = vec![0u8; 4096];
    let n = read_upto(&f, &mut head, 0)?;
    head.truncate(n);
    if has_magic(&head) {
        let total = match declared_len(&head) {
            Ok(t) => t,
            Err(e) => return Ok(Probe::Config(Box::new(Err(e)))),
        };
        if total > head.len() {
            let mut rest = vec![0u8; total - head.len()];
            let m = read_upto(&f, &mut rest, head.len() as u64)?;
            head.extend_from_slice(&rest[..m]);
        }
        return Ok(Probe::Config(Box::new(banger_guest::decode(&head))));
    }
    Ok(match Ext4Info::parse(&head) {
        Some(info) => Probe::Ext4(info.uuid),
        None => Probe::Other,
    })
}

enum Probe {
    // Boxed: a config is large and most devices are not the config disk.
    Config(Box<Result<GuestConfig, banger_guest::ConfigDiskError>>),
    Ext4(String),
    Other,
}

/// One pass over the virtio disks listed in `sys_block` (`vd*`), opened under `dev`.
pub fn scan(sys_block: &Path, dev: &Path) -> Scan {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    // vda..vdz then vdaa..: shorter names first keeps attach order in messages.
    names.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    let mut scan = Scan::default();
    for name in names {
        let path = dev.join(&name);
        match probe(&path) {
            Ok(Probe::Config(res)) => {
                scan.seen.push(format!("{name} (config)"));
                // The first config disk wins; a second one would be a daemon bug.
                if scan.config.is_none() {
                    scan.config = Some((path, *res));
                }
            }
            Ok(Probe::Ext4(uuid)) => {
                scan.seen.push(format!("{name} (ext4 {uuid})"));
                scan.by_uuid.entry(uuid).or_insert(path);
            }
            Ok(Probe::Other) => scan.seen.push(format!("{name} (no filesystem)")),
            // The sysfs entry can appear before devtmpfs has the node: the next pass sees it.
            Err(e) => scan.seen.push(format!("{name} ({e})")),
        }
    }
    scan
}

/// Scans until the config disk and every disk it names are present, or `timeout` passes.
pub fn wait_for_disks(
    sys_block: &Path,
    dev: &Path,
    timeout: Duration,
) -> Result<Found, AgentError> {
    let start = Instant::now();
    loop {
        let s = scan(sys_block, dev);
        let expired = start.elapsed() >= timeout;
        let waited_s = start.elapsed().as_secs();
        let seen = if s.seen.is_empty() {
            "no virtio disks".to_string()
        } else {
            s.seen.join(", ")
        };
        match s.config {
            // A config disk that does not decode will not get better by waiting.
            Some((device, Err(error))) => return Err(AgentError::ConfigDisk { device, error }),
            Some((device, Ok(config))) => {
                let missing = missing_disk(&config, &s.by_uuid);
                match missing {
                    None => {
                        return Ok(Found {
                            config_device: device,
                            config,
                            by_uuid: s.by_uuid,
                        });
                    }
                    Some((role, uuid)) if expired => {
                        return Err(AgentError::MissingDisk {
                            role,
                            uuid,
                            waited_s,
                            seen,
                        });
                    }
                    Some(_) => {}
                }
            }
            None if expired => return Err(AgentError::NoConfigDisk { waited_s, seen }),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn missing_disk(
    config: &GuestConfig,
    by_uuid: &BTreeMap<String, PathBuf>,
) -> Option<(&'static str, String)> {
    let mut roles: Vec<(&'static str, &str)> = match &config.root {
        banger_guest::RootLayout::Overlay {
            lower_uuid,
            upper_uuid,
        } => vec![
            ("root image (lower) disk", lower_uuid),
            ("root upper disk", upper_uuid),
        ],
        banger_guest::RootLayout::Direct { uuid } => vec![("root disk", uuid)],
    };
    if let Some(w) = &config.work_uuid {
        roles.push(("work disk", w));
    }
    roles
        .into_iter()
        .find(|(_, u)| !by_uuid.contains_key(*u))
        .map(|(r, u)| (r, u.to_string()))
}

/// The device holding `uuid`.
pub fn device_for<'a>(
    by_uuid: &'a BTreeMap<String, PathBuf>,
    uuid: &str,
    role: &'static str,
) -> Result<&'a Path, AgentError> {
    by_uuid
        .get(uuid)
        .map(PathBuf::as_path)
        .ok_or_else(|| AgentError::MissingDisk {
            role,
            uuid: uuid.to_string(),
            waited_s: 0,
            seen: by_uuid.keys().cloned().collect::<Vec<_>>().join(", "),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use banger_guest::{NetworkConfig, RootLayout};

    pub const LOWER: &str = "11111111-2222-3333-4444-555555555555";
    pub const UPPER: &str = "66666666-7777-8888-9999-aaaaaaaaaaaa";
    pub const WORK: &str = "bbbbbbbb-cccc-dddd-eeee-ffffffffffff";

    pub fn config() -> GuestConfig {
        GuestConfig {
            v: 1,
            hostname: "devbox".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            root: RootLayout::Overlay {
                lower_uuid: LOWER.into(),
                upper_uuid: UPPER.into(),
            },
            work_uuid: Some(WORK.into()),
            network: Some(NetworkConfig {
                mac: "06:00:0a:00:02:0f".into(),
                address: "10.0.2.15".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.2.2".parse().unwrap(),
                dns: vec!["10.0.2.3".parse().unwrap()],
            }),
            ssh: None,
            files: vec![],
            init: None,
            init_mode: Default::default(),
            ssh_server: Default::default(),
            env: vec![],
            workdir: None,
            modules: None,
        }
    }

    fn ext4_image(uuid: &str) -> Vec<u8> {
        let mut v = vec![0u8; 8192];
        v[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        let hex: String = uuid.chars().filter(|c| *c != '-').collect();
        for i in 0..16 {
            v[1024 + 104 + i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        v
    }

    /// A fake /sys/block and /dev: `disks` maps a name to its content.
    fn fake(disks: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sys")).unwrap();
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        std::fs::create_dir_all(d.path().join("sys/loop0")).unwrap();
        for (name, content) in disks {
            std::fs::create_dir(d.path().join("sys").join(name)).unwrap();
            std::fs::write(d.path().join("dev").join(name), content).unwrap();
        }
        d
    }

    #[test]
    fn finds_config_and_disks_whatever_the_order() {
        let mut cfg = config();
        // A config larger than the first 4 KiB block.
        cfg.files
            .push(banger_guest::GuestFile::new("/big", 0o644, &[1u8; 9000]));
        let d = fake(&[
            ("vda", ext4_image(WORK)),
            ("vdb", ext4_image(LOWER)),
            ("vdc", vec![0u8; 4096]),
            ("vdd", banger_guest::encode(&cfg)),
            ("vde", ext4_image(UPPER)),
        ]);
        let found =
            wait_for_disks(&d.path().join("sys"), &d.path().join("dev"), Duration::ZERO).unwrap();
        assert_eq!(found.config, cfg);
        assert_eq!(found.config_device, d.path().join("dev/vdd"));
        assert_eq!(found.by_uuid[LOWER], d.path().join("dev/vdb"));
        assert_eq!(found.by_uuid[WORK], d.path().join("dev/vda"));
        let desc = found.describe();
        assert!(desc.contains("vdd") && desc.contains(UPPER), "{desc}");
    }

    #[test]
    fn missing_disk_is_named_after_timeout() {
        let d = fake(&[
            ("vda", banger_guest::encode(&config())),
            ("vdb", ext4_image(LOWER)),
            ("vdc", vec![0u8; 100]),
        ]);
        let t0 = Instant::now();
        let e = wait_for_disks(
            &d.path().join("sys"),
            &d.path().join("dev"),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(100));
        let s = e.to_string();
        assert!(s.contains("root upper disk") && s.contains(UPPER), "{s}");
        assert!(
            s.contains("vdb (ext4 11111111") && s.contains("vdc (no filesystem)"),
            "{s}"
        );
    }

    #[test]
    fn no_config_disk_and_bad_config_disk() {
        let d = fake(&[("vda", ext4_image(LOWER))]);
        let e = wait_for_disks(&d.path().join("sys"), &d.path().join("dev"), Duration::ZERO)
            .unwrap_err();
        assert!(matches!(e, AgentError::NoConfigDisk { .. }), "{e}");
        assert!(e.to_string().contains("vda (ext4"), "{e}");

        let mut bad = banger_guest::encode(&config());
        bad[12] = b'!';
        let d = fake(&[("vda", bad)]);
        // Fails at once rather than waiting out the timeout.
        let t0 = Instant::now();
        let e = wait_for_disks(
            &d.path().join("sys"),
            &d.path().join("dev"),
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        let s = e.to_string();
        assert!(s.contains("dev/vda") && s.contains("JSON"), "{s}");
    }

    #[test]
    fn disk_appearing_late_is_waited_for() {
        let d = fake(&[
            ("vda", banger_guest::encode(&config())),
            ("vdb", ext4_image(LOWER)),
            ("vdc", ext4_image(UPPER)),
        ]);
        let root = d.path().to_path_buf();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(root.join("dev/vdd"), ext4_image(WORK)).unwrap();
            std::fs::create_dir(root.join("sys/vdd")).unwrap();
        });
        let found = wait_for_disks(
            &d.path().join("sys"),
            &d.path().join("dev"),
            Duration::from_secs(10),
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(found.by_uuid[WORK], d.path().join("dev/vdd"));
    }
}
