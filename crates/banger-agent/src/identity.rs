//! Writing the VM's identity into the assembled root: hostname, machine id, ssh host key and
//! authorized keys, sshd drop-in, resolv.conf, the systemd-networkd unit and extra files.
//!
//! Everything takes a root prefix, so it runs against a temporary directory in tests and against
//! `/` after the switch_root in the guest. Files are replaced, never written through a symlink:
//! the image's `/etc/resolv.conf -> ../run/...` becomes a plain file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use banger_guest::{GuestConfig, SshIdentity};

use crate::error::AgentError;

pub const SSHD_DROPIN: &str = "etc/ssh/sshd_config.d/00-banger.conf";
pub const SSHD_DROPIN_TEXT: &str = "# Written by banger-agent at every boot.\n\
PermitRootLogin prohibit-password\n\
PasswordAuthentication no\n\
KbdInteractiveAuthentication no\n\
PubkeyAuthentication yes\n";

fn at(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Creates `dir` and missing parents as root-owned 0755 directories.
fn ensure_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(AgentError::io("creating directory", dir))
}

/// Writes `content` to `path` with exactly `mode`, owned by root. A symlink at `path` is replaced
/// rather than followed.
pub fn put(path: &Path, content: &[u8], mode: u32) -> Result<(), AgentError> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path).map_err(AgentError::io("removing symlink", path))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(AgentError::io("writing", path))?;
    f.write_all(content)
        .map_err(AgentError::io("writing", path))?;
    // Root owns everything the agent writes; chown before chmod, which keeps set-id bits.
    std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(AgentError::io("chown", path))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(AgentError::io("chmod", path))?;
    Ok(())
}

/// `/etc/hosts` with the Debian-style `127.0.1.1 <hostname>` line replacing any previous one.
pub fn hosts_with(existing: Option<&str>, hostname: &str) -> String {
    let base =
        existing.unwrap_or("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let mut out: String = base
        .lines()
        .filter(|l| l.split_whitespace().next() != Some("127.0.1.1"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

pub fn write_hostname(root: &Path, hostname: &str) -> Result<(), AgentError> {
    put(
        &at(root, "/etc/hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
    )?;
    let hosts = at(root, "/etc/hosts");
    let existing = std::fs::read_to_string(&hosts).ok();
    put(
        &hosts,
        hosts_with(existing.as_deref(), hostname).as_bytes(),
        0o644,
    )
}

pub fn write_machine_id(root: &Path, id: &str) -> Result<(), AgentError> {
    put(
        &at(root, "/etc/machine-id"),
        format!("{id}\n").as_bytes(),
        0o444,
    )
}

/// Installs the VM's own host key (removing every other `ssh_host_*`, so the image's shared keys
/// are never offered), root's authorized_keys, and the sshd drop-in when the image has sshd.
pub fn write_ssh(root: &Path, ssh: &SshIdentity) -> Result<(), AgentError> {
    let etc_ssh = at(root, "/etc/ssh");
    ensure_dir(&etc_ssh)?;
    let entries =
        std::fs::read_dir(&etc_ssh).map_err(AgentError::io("reading directory", &etc_ssh))?;
    for e in entries {
        let e = e.map_err(AgentError::io("reading directory", &etc_ssh))?;
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(e.path()).map_err(AgentError::io("removing", e.path()))?;
        }
    }
    let mut key = ssh.host_key_ed25519.clone();
    if !key.ends_with('\n') {
        key.push('\n'); // OpenSSH refuses a private key without its final newline.
    }
    put(&etc_ssh.join("ssh_host_ed25519_key"), key.as_bytes(), 0o600)?;
    let pubkey = format!("{}\n", ssh.host_key_ed25519_pub.trim_end());
    put(
        &etc_ssh.join("ssh_host_ed25519_key.pub"),
        pubkey.as_bytes(),
        0o644,
    )?;

    let dot_ssh = at(root, "/root/.ssh");
    ensure_dir(&dot_ssh)?;
    std::os::unix::fs::lchown(&dot_ssh, Some(0), Some(0))
        .map_err(AgentError::io("chown", &dot_ssh))?;
    std::fs::set_permissions(&dot_ssh, std::fs::Permissions::from_mode(0o700))
        .map_err(AgentError::io("chmod", &dot_ssh))?;
    let keys: String = ssh
        .authorized_keys
        .iter()
        .map(|k| format!("{}\n", k.trim_end()))
        .collect();
    put(&dot_ssh.join("authorized_keys"), keys.as_bytes(), 0o600)?;

    let has_sshd = at(root, "/etc/ssh/sshd_config.d").is_dir()
        || ["/usr/sbin/sshd", "/sbin/sshd"]
            .iter()
            .any(|p| at(root, p).exists());
    if has_sshd {
        put(&root.join(SSHD_DROPIN), SSHD_DROPIN_TEXT.as_bytes(), 0o644)?;
    }
    Ok(())
}

pub fn write_resolv_conf(root: &Path, dns: &[std::net::Ipv4Addr]) -> Result<(), AgentError> {
    let text: String = dns.iter().map(|a| format!("nameserver {a}\n")).collect();
    put(&at(root, "/etc/resolv.conf"), text.as_bytes(), 0o644)
}

/// Applies the whole identity of `config` under `root`; returns a one-line summary.
pub fn apply(root: &Path, config: &GuestConfig) -> Result<String, AgentError> {
    let mut done = vec![format!("hostname {}", config.hostname)];
    write_hostname(root, &config.hostname)?;
    write_machine_id(root, &config.machine_id)?;
    done.push("machine-id".into());
    if let Some(ssh) = &config.ssh {
        write_ssh(root, ssh)?;
        done.push(format!(
            "ssh host key + {} authorized key(s)",
            ssh.authorized_keys.len()
        ));
    }
    if let Some(net) = &config.network {
        if !net.dns.is_empty() {
            write_resolv_conf(root, &net.dns)?;
            done.push("resolv.conf".into());
        }
        put(
            &at(root, crate::net::NETWORKD_UNIT),
            crate::net::networkd_unit(net).as_bytes(),
            0o644,
        )?;
        done.push("networkd unit".into());
    }
    for f in &config.files {
        let content = f.content().map_err(|e| AgentError::Io {
            what: "decoding",
            path: f.path.clone().into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        put(&at(root, &f.path), &content, f.mode)?;
    }
    if !config.files.is_empty() {
        done.push(format!("{} file(s)", config.files.len()));
    }
    Ok(done.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn ssh() -> SshIdentity {
        SshIdentity {
            host_key_ed25519:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----"
                    .into(),
            host_key_ed25519_pub: "ssh-ed25519 AAAAC3 vm".into(),
            authorized_keys: vec![
                "ssh-ed25519 AAAAkey1 me@laptop".into(),
                "ssh-ed25519 AAAAkey2 ci\n".into(),
            ],
        }
    }

    #[test]
    fn hosts_line_is_replaced_not_duplicated() {
        let h = hosts_with(
            Some("127.0.0.1 localhost\n127.0.1.1 debian\n# c\n"),
            "devbox",
        );
        assert_eq!(h, "127.0.0.1 localhost\n# c\n127.0.1.1\tdevbox\n");
        assert_eq!(hosts_with(Some(&h), "devbox"), h);
        assert!(hosts_with(None, "x").starts_with("127.0.0.1\tlocalhost\n"));
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn full_identity_in_a_fake_root() {
        if !is_root() {
            eprintln!("SKIP: writing root-owned files needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc/ssh/sshd_config.d")).unwrap();
        std::fs::create_dir_all(root.join("run/systemd/resolve")).unwrap();
        for k in [
            "ssh_host_rsa_key",
            "ssh_host_rsa_key.pub",
            "ssh_host_ecdsa_key",
            "ssh_host_ed25519_key",
        ] {
            std::fs::write(root.join("etc/ssh").join(k), "shared image key").unwrap();
        }
        std::fs::write(
            root.join("etc/ssh/sshd_config"),
            "Include /etc/ssh/sshd_config.d/*.conf\n",
        )
        .unwrap();
        let stub = root.join("run/systemd/resolve/stub-resolv.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .unwrap();

        let mut cfg = crate::disks::tests::config();
        cfg.ssh = Some(ssh());
        cfg.files = vec![
            banger_guest::GuestFile::new("/etc/banger/motd", 0o640, b"hello\n"),
            banger_guest::GuestFile::new("/usr/local/bin/tool", 0o4755, b"#!/bin/sh\n"),
        ];
        let summary = apply(root, &cfg).unwrap();
        assert!(
            summary.contains("hostname devbox") && summary.contains("2 file(s)"),
            "{summary}"
        );

        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "devbox\n"
        );
        assert!(
            std::fs::read_to_string(root.join("etc/hosts"))
                .unwrap()
                .contains("127.0.1.1\tdevbox\n")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/machine-id")).unwrap(),
            format!("{}\n", cfg.machine_id)
        );

        let mut host_keys: Vec<String> = std::fs::read_dir(root.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ssh_host_"))
            .collect();
        host_keys.sort();
        assert_eq!(
            host_keys,
            ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
        );
        let key = root.join("etc/ssh/ssh_host_ed25519_key");
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .ends_with("KEY-----\n")
        );
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&root.join("etc/ssh/ssh_host_ed25519_key.pub")), 0o644);
        assert_eq!(mode(&root.join("root/.ssh")), 0o700);
        let ak = root.join("root/.ssh/authorized_keys");
        assert_eq!(mode(&ak), 0o600);
        assert_eq!(std::fs::metadata(&ak).unwrap().uid(), 0);
        assert_eq!(
            std::fs::read_to_string(&ak).unwrap(),
            "ssh-ed25519 AAAAkey1 me@laptop\nssh-ed25519 AAAAkey2 ci\n"
        );
        let dropin = std::fs::read_to_string(root.join(SSHD_DROPIN)).unwrap();
        for line in [
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
        ] {
            assert!(dropin.lines().any(|l| l == line), "{line}");
        }

        // resolv.conf: the symlink is replaced and its old target left alone.
        let resolv = root.join("etc/resolv.conf");
        assert!(
            !std::fs::symlink_metadata(&resolv)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(&resolv).unwrap(),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(
            std::fs::read_to_string(&stub).unwrap(),
            "nameserver 127.0.0.53\n"
        );

        let unit =
            std::fs::read_to_string(root.join("etc/systemd/network/10-banger.network")).unwrap();
        assert!(unit.contains("Address=10.0.2.15/24"), "{unit}");

        assert_eq!(
            std::fs::read(root.join("etc/banger/motd")).unwrap(),
            b"hello\n"
        );
        assert_eq!(mode(&root.join("etc/banger/motd")), 0o640);
        assert_eq!(mode(&root.join("usr/local/bin/tool")), 0o4755);

        // Idempotent: a second boot gives the same result.
        apply(root, &cfg).unwrap();
        assert_eq!(std::fs::read_to_string(&ak).unwrap().lines().count(), 2);
    }

    #[test]
    fn no_sshd_means_no_dropin_and_minimal_config_is_enough() {
        if !is_root() {
            eprintln!("SKIP: writing root-owned files needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut cfg = crate::disks::tests::config();
        cfg.network = None;
        cfg.ssh = Some(ssh());
        apply(d.path(), &cfg).unwrap();
        assert!(!d.path().join(SSHD_DROPIN).exists());
        assert!(!d.path().join("etc/resolv.conf").exists());
        assert!(d.path().join("etc/ssh/ssh_host_ed25519_key").exists());
    }

    #[test]
    fn put_names_the_failing_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), "x").unwrap();
        let e = put(&d.path().join("file/below"), b"x", 0o644)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file/below") || e.contains("/file"), "{e}");
    }
}
