//! ssh connection sharing per VM.
//!
//! Every `vm exec`, `workspace sync` or `vm cp` is its own `ssh` run, and a handshake costs
//! about a second under software emulation. The first run opens a master connection
//! (`ControlMaster=auto`) that later runs reuse for 60 s after the last one; its socket is keyed
//! by the VM's id, which is never reused, so a connection can never reach another VM. Deleting a
//! VM through the CLI closes its master; a VM that stops takes its master down within ~15 s
//! (server-alive probes).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use banger_protocol::SshInfo;

/// The per-user directory for master sockets, created 0700 and checked to be ours (it may be
/// under /tmp); `None` disables sharing rather than trusting a directory someone else made.
fn control_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("banger-ssh"),
        _ => PathBuf::from(format!("/tmp/banger-ssh-{uid}")),
    };
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).ok()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    // Ours and private, and so is every directory above it (a sticky /tmp aside).
    (meta.is_dir()
        && meta.uid() == uid
        && meta.mode() & 0o077 == 0
        && banger_config::trust::check_dir_chain(&dir, uid).is_ok())
    .then_some(dir)
}

fn control_path(vm_id: &str) -> Option<PathBuf> {
    // Ids are 12 hex digits; anything else (an older daemon) disables sharing.
    let ok = vm_id.len() == 12 && vm_id.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(control_dir).flatten().map(|d| d.join(vm_id))
}

/// The `-o` options that make an ssh run share this VM's master connection (none when sharing
/// is unavailable). They go before the rest of the arguments.
pub fn options(info: &SshInfo) -> Vec<String> {
    let Some(path) = control_path(&info.id) else {
        return Vec::new();
    };
    [
        "ControlMaster=auto".to_string(),
        format!("ControlPath={}", path.display()),
        "ControlPersist=60".to_string(),
        "ServerAliveInterval=5".to_string(),
        "ServerAliveCountMax=3".to_string(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_string(), o])
    .collect()
}

/// An `ssh` command for `info`: shared connection options, then the usual strict arguments.
pub fn command(info: &SshInfo, tty: bool, remote: &[String]) -> Command {
    let mut c = Command::new("ssh");
    c.args(options(info));
    c.args(info.ssh_args(tty, 10, remote));
    c
}

/// Closes the master connection of VM `vm_id`, if there is one (best effort: the VM is being
/// deleted).
pub fn close(vm_id: &str) {
    let Some(path) = control_path(vm_id) else {
        return;
    };
    if !path.exists() {
        return;
    }
    let _ = Command::new("ssh")
        .arg("-o")
        .arg(format!("ControlPath={}", path.display()))
        .args(["-O", "exit", "banger-vm"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> SshInfo {
        SshInfo {
            id: id.into(),
            name: "box".into(),
            ip: "172.30.0.2".parse().unwrap(),
            user: "root".into(),
            key: "/k".into(),
            known_hosts: "/kh".into(),
        }
    }

    #[test]
    fn options_key_the_socket_by_vm_id_and_precede_the_destination() {
        let o = options(&info("0123456789ab"));
        if o.is_empty() {
            println!("SKIP: no private control directory available here");
            return;
        }
        let path = o.iter().find(|a| a.starts_with("ControlPath=")).unwrap();
        assert!(path.ends_with("/0123456789ab"), "{path}");
        let args: Vec<String> = command(&info("0123456789ab"), false, &[])
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let cp = args
            .iter()
            .position(|a| a.starts_with("ControlPath="))
            .unwrap();
        let dest = args.iter().position(|a| a == "172.30.0.2").unwrap();
        assert!(cp < dest);
    }

    #[test]
    fn foreign_ids_disable_sharing() {
        for bad in ["", "../../etc", "0123456789abc", "ZZZZZZZZZZZZ"] {
            assert!(options(&info(bad)).is_empty(), "{bad:?}");
        }
    }
}
