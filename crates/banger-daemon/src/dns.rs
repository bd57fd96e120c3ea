//! `<name>.vm`: the DNS responder and banger's ssh config, both kept in step with the store.
//!
//! At start-up the daemon binds the responder on `127.0.0.1:<dns_port>`; a port already taken
//! is a warning (log and `daemon.status`), not a failed start. One task follows the engine's
//! VM-change signal and, on each change, rebuilds from `store.list_vms()`:
//! - the responder's table: running VMs that have an address;
//! - `<state_dir>/ssh/ssh_config`: one `Host <name>.vm` block per VM with an address, written
//!   atomically and only when its text changes, so `ssh NAME.vm` works even without DNS once
//!   `banger ssh-config --install` includes it.
//!
//! The host resolver is not reconfigured: that needs root and a system file. `daemon.status`
//! carries the one-line recipe for this host instead (see docs/dns.md).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use banger_core::{VmRecord, VmState};
use banger_dns::{Names, Responder};
use banger_protocol::DnsStatus;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Engine;
use crate::layout::Layout;

/// banger's generated ssh config.
pub fn ssh_config_path(layout: &Layout) -> PathBuf {
    layout.ssh_dir().join("ssh_config")
}

/// Binds the responder and starts the task that keeps it and the ssh config current. Never
/// fails: what went wrong is in the returned status (and the log).
pub async fn start(engine: &Engine, shutdown: CancellationToken) -> DnsStatus {
    let port = engine.config().dns_port;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let names = Names::new();
    let recipe = resolver_recipe(port, has_systemd_resolved());
    let status = match Responder::bind(addr).await {
        Ok(responder) => {
            let listen = responder.local_addr().unwrap_or(addr);
            info!(%listen, "dns responder for <name>.vm listening");
            let stop = shutdown.clone();
            tokio::spawn(responder.serve(names.clone(), async move { stop.cancelled().await }));
            DnsStatus {
                listen: Some(listen),
                error: None,
                recipe,
            }
        }
        Err(e) => {
            let error = if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "{addr} is already in use (another bangerd or another program): <name>.vm DNS is off; set dns_port in the config to a free port and restart bangerd"
                )
            } else {
                format!("cannot bind {addr}: {e}; <name>.vm DNS is off")
            };
            warn!(%error, "dns responder not started; the daemon works on without it");
            DnsStatus {
                listen: None,
                error: Some(error),
                recipe,
            }
        }
    };
    tokio::spawn(follow(engine.clone(), names, shutdown));
    status
}

/// Rebuilds the table and the ssh config now and after every VM change, until shutdown.
async fn follow(engine: Engine, names: Names, shutdown: CancellationToken) {
    let mut changes = engine.subscribe_vm_changes();
    let path = ssh_config_path(engine.layout());
    loop {
        changes.mark_unchanged();
        sync(&engine, &names, &path);
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

fn sync(engine: &Engine, names: &Names, path: &Path) {
    let vms = match engine.store().list_vms() {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "dns: reading the VM list failed; names unchanged");
            return;
        }
    };
    names.replace(running_addresses(&vms));
    let text = render_ssh_config(
        &addressed(&vms),
        &engine.ssh().user_key(),
        &engine.ssh().known_hosts(),
    );
    if let Err(e) = write_if_changed(path, &text) {
        warn!(path = %path.display(), error = %e, "writing banger's ssh config failed");
    }
}

/// What the responder answers: running VMs with an address.
pub fn running_addresses(vms: &[VmRecord]) -> Vec<(String, Ipv4Addr)> {
    vms.iter()
        .filter(|v| v.state == VmState::Running)
        .filter_map(|v| v.ip.map(|ip| (v.name.to_string(), ip)))
        .collect()
}

/// What the ssh config lists: every VM with an address (held from create to delete).
pub fn addressed(vms: &[VmRecord]) -> Vec<(String, Ipv4Addr)> {
    vms.iter()
        .filter_map(|v| v.ip.map(|ip| (v.name.to_string(), ip)))
        .collect()
}

/// banger's ssh config: one `Host <name>.vm` block per host, sorted by name.
pub fn render_ssh_config(hosts: &[(String, Ipv4Addr)], key: &Path, known_hosts: &Path) -> String {
    let mut text = String::from(
        "# Written by bangerd whenever a VM changes; edits are overwritten.\n\
         # `banger ssh-config --install` includes it from ~/.ssh/config, so `ssh NAME.vm` works.\n",
    );
    let mut hosts: Vec<&(String, Ipv4Addr)> = hosts.iter().collect();
    hosts.sort();
    for (name, ip) in hosts {
        text.push_str(&format!(
            "\nHost {name}.vm\n    HostName {ip}\n    User root\n    IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
            ssh_path(key),
            ssh_path(known_hosts),
        ));
    }
    text
}

/// A path as an ssh_config argument: `%` doubled (ssh expands `%` tokens in these keywords),
/// double-quoted when it holds whitespace.
fn ssh_path(p: &Path) -> String {
    let s = p.display().to_string().replace('%', "%%");
    if s.chars().any(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    }
}

/// Writes `text` to `path` through a temp file and a rename, unless it already holds it.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, text: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        crate::layout::create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Whether the host resolves through systemd-resolved.
pub fn has_systemd_resolved() -> bool {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("resolvectl").is_file()));
    on_path && Path::new("/run/systemd/resolve").is_dir()
}

/// One line that makes the host resolver ask the responder for `.vm` names. systemd-resolved
/// (v246 and later take `address:port`) gets a global DNS server for the `~vm` routing domain;
/// elsewhere, dnsmasq's per-domain server line. Both need root, so banger prints them rather
/// than running them.
pub fn resolver_recipe(port: u16, resolved: bool) -> String {
    if resolved {
        format!(
            "printf '[Resolve]\\nDNS=127.0.0.1:{port}\\nDomains=~vm\\n' | sudo tee /etc/systemd/resolved.conf.d/banger-vm.conf && sudo systemctl restart systemd-resolved"
        )
    } else {
        format!(
            "no systemd-resolved here; with dnsmasq: echo 'server=/vm/127.0.0.1#{port}' | sudo tee /etc/dnsmasq.d/banger-vm.conf (ssh NAME.vm needs no DNS after `banger ssh-config --install`)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, ip: [u8; 4]) -> (String, Ipv4Addr) {
        (name.to_string(), Ipv4Addr::from(ip))
    }

    #[test]
    fn ssh_config_has_one_block_per_host_sorted() {
        let text = render_ssh_config(
            &[
                host("zeta", [172, 30, 0, 3]),
                host("alpha", [172, 30, 0, 2]),
            ],
            Path::new("/s/ssh/id_ed25519"),
            Path::new("/s/ssh/known_hosts"),
        );
        let want = "\nHost alpha.vm\n    HostName 172.30.0.2\n    User root\n    IdentityFile /s/ssh/id_ed25519\n    IdentitiesOnly yes\n    UserKnownHostsFile /s/ssh/known_hosts\n    StrictHostKeyChecking yes\n\nHost zeta.vm\n    HostName 172.30.0.3\n";
        assert!(text.contains(want), "{text}");
        assert_eq!(text.matches("\nHost ").count(), 2, "{text}");
        assert!(text.lines().all(|l| l.starts_with('#')
            || l.is_empty()
            || l.starts_with("Host ")
            || l.starts_with("    ")));
        let empty = render_ssh_config(&[], Path::new("/k"), Path::new("/h"));
        assert!(!empty.contains("Host "), "{empty}");
    }

    #[test]
    fn ssh_paths_are_quoted_and_percent_escaped() {
        let text = render_ssh_config(
            &[host("a", [10, 0, 0, 2])],
            Path::new("/home/me/My State/ssh/id_ed25519"),
            Path::new("/s/100%/known_hosts"),
        );
        assert!(
            text.contains("IdentityFile \"/home/me/My State/ssh/id_ed25519\"\n"),
            "{text}"
        );
        assert!(
            text.contains("UserKnownHostsFile /s/100%%/known_hosts\n"),
            "{text}"
        );
    }

    #[test]
    fn ssh_config_is_written_atomically_and_only_on_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh/ssh_config");
        assert!(write_if_changed(&path, "a\n").unwrap());
        assert!(!write_if_changed(&path, "a\n").unwrap());
        assert!(write_if_changed(&path, "b\n").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("ssh_config")],
            "no temp file left"
        );
    }

    #[test]
    fn recipes_name_the_port() {
        assert!(resolver_recipe(5353, true).contains("DNS=127.0.0.1:5353"));
        assert!(resolver_recipe(5353, true).contains("Domains=~vm"));
        assert!(resolver_recipe(5353, false).contains("server=/vm/127.0.0.1#5353"));
    }
}
