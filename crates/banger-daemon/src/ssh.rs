//! banger's ssh material: the user's key, per-VM host keys, and banger's own known_hosts.
//!
//! Every VM gets a fresh ed25519 host key generated on the host at create and handed to the
//! guest on its config disk, and the key goes into banger's known_hosts at the same moment. So
//! `ssh` checks the host key strictly from the first connection: no trust-on-first-use guess,
//! and `~/.ssh/known_hosts` is never touched.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use banger_sys::{Cmd, CommandRunner};

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("generating ssh key {path}: {reason}")]
    Keygen { path: PathBuf, reason: String },
    #[error("ssh file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SshError + '_ {
    move |source| SshError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A generated key pair, as OpenSSH text.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

/// The ssh directory of one banger installation (`<state_dir>/ssh`).
#[derive(Debug)]
pub struct SshDir {
    dir: PathBuf,
    // known_hosts is rewritten whole; one writer at a time.
    known_hosts_lock: Mutex<()>,
    // Parallel first creates must not generate (and delete) the user key twice.
    user_key_lock: tokio::sync::Mutex<()>,
}

impl SshDir {
    pub fn new(dir: PathBuf) -> Self {
        SshDir {
            dir,
            known_hosts_lock: Mutex::new(()),
            user_key_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn user_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Creates the user's key on first use; returns the public key line.
    pub async fn ensure_user_key(&self, runner: &dyn CommandRunner) -> Result<String, SshError> {
        let _g = self.user_key_lock.lock().await;
        let key = self.user_key();
        let pubkey = key.with_extension("pub");
        if !key.exists() || !pubkey.exists() {
            crate::layout::create_private_dir(&self.dir).map_err(io(&self.dir))?;
            let _ = std::fs::remove_file(&key);
            let _ = std::fs::remove_file(&pubkey);
            keygen(runner, &key, "banger").await?;
        }
        std::fs::read_to_string(&pubkey)
            .map(|s| s.trim().to_string())
            .map_err(io(&pubkey))
    }

    /// Records `public` as the host key of every name in `names` (address, `<name>.vm`).
    pub fn add_known_host(&self, names: &[String], public: &str) -> Result<(), SshError> {
        let _g = self.known_hosts_lock.lock().expect("poisoned");
        let mut lines = self.read_known_hosts_without(names)?;
        let key = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        lines.push(format!("{} {key}", names.join(",")));
        self.write_known_hosts(&lines)
    }

    /// Forgets every entry naming any of `names`.
    pub fn remove_known_host(&self, names: &[String]) -> Result<(), SshError> {
        let _g = self.known_hosts_lock.lock().expect("poisoned");
        let lines = self.read_known_hosts_without(names)?;
        self.write_known_hosts(&lines)
    }

    fn read_known_hosts_without(&self, names: &[String]) -> Result<Vec<String>, SshError> {
        let path = self.known_hosts();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(text
            .lines()
            .filter(|l| {
                let hosts = l.split_whitespace().next().unwrap_or("");
                !hosts.split(',').any(|h| names.iter().any(|n| n == h))
            })
            .map(str::to_string)
            .collect())
    }

    fn write_known_hosts(&self, lines: &[String]) -> Result<(), SshError> {
        crate::layout::create_private_dir(&self.dir).map_err(io(&self.dir))?;
        let path = self.known_hosts();
        let tmp = path.with_extension("tmp");
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}

/// Generates a fresh ed25519 host key pair for a VM (in a private temp dir under `dir`).
pub async fn generate_host_key(
    runner: &dyn CommandRunner,
    dir: &Path,
) -> Result<KeyPair, SshError> {
    let path = dir.join("ssh_host_ed25519_key");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    keygen(runner, &path, "banger-vm").await?;
    let private = std::fs::read_to_string(&path).map_err(io(&path))?;
    let pubpath = path.with_extension("pub");
    let public = std::fs::read_to_string(&pubpath).map_err(io(&pubpath))?;
    Ok(KeyPair {
        private,
        public: public.trim().to_string(),
    })
}

async fn keygen(runner: &dyn CommandRunner, path: &Path, comment: &str) -> Result<(), SshError> {
    let cmd = Cmd::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path);
    runner.run(&cmd).await.map_err(|e| SshError::Keygen {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn known_hosts_add_replace_remove() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = SshDir::new(dir.path().join("ssh"));
        let names = vec!["172.30.0.2".to_string(), "a.vm".to_string()];
        ssh.add_known_host(&names, "ssh-ed25519 AAAAkey1 comment")
            .unwrap();
        ssh.add_known_host(&["172.30.0.3".into()], "ssh-ed25519 AAAAother")
            .unwrap();
        ssh.add_known_host(&names, "ssh-ed25519 AAAAkey2").unwrap();
        let text = std::fs::read_to_string(ssh.known_hosts()).unwrap();
        assert_eq!(
            text,
            "172.30.0.3 ssh-ed25519 AAAAother\n172.30.0.2,a.vm ssh-ed25519 AAAAkey2\n"
        );
        ssh.remove_known_host(&["a.vm".into()]).unwrap();
        let text = std::fs::read_to_string(ssh.known_hosts()).unwrap();
        assert_eq!(text, "172.30.0.3 ssh-ed25519 AAAAother\n");
    }

    #[tokio::test]
    async fn keys_are_generated() {
        if !std::path::Path::new("/usr/bin/ssh-keygen").exists() {
            eprintln!("SKIP: ssh-keygen not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ssh = SshDir::new(dir.path().join("ssh"));
        let pubkey = ssh.ensure_user_key(&banger_sys::RealRunner).await.unwrap();
        assert!(pubkey.starts_with("ssh-ed25519 "), "{pubkey}");
        assert_eq!(
            ssh.ensure_user_key(&banger_sys::RealRunner).await.unwrap(),
            pubkey,
            "stable"
        );
        let hk = generate_host_key(&banger_sys::RealRunner, dir.path())
            .await
            .unwrap();
        assert!(hk.private.contains("OPENSSH PRIVATE KEY"));
        assert!(hk.public.starts_with("ssh-ed25519 "));
    }
}
