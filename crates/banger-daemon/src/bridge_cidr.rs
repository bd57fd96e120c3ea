//! Which network banger's bridge uses when `bridge_cidr` is not configured.
//!
//! The built-in default may already be routed by the host (banger inside a VM whose own network
//! is `172.30.0.0/24`): then the first free network of [`DEFAULT_CIDR_CANDIDATES`] is used.
//! The choice is written to `<state_dir>/bridge_cidr` and used from then on, whatever the routes
//! say later, because VMs keep their addresses in it: a later collision is reported by the start
//! step (`network`) instead of silently moving every VM. An installation that already has VMs
//! with addresses and no such file keeps the default (its VMs' addresses are in it). With the
//! root helper (`helper_socket`) nothing is picked: the helper only manages the network of the
//! config file root reads.

use std::path::{Path, PathBuf};

use banger_config::{Config, Ipv4Cidr, NetworkMode};
use banger_net::NetOps;
use banger_net::routes::{DEFAULT_CIDR_CANDIDATES, pick_free_cidr};
use banger_store::Store;

use crate::layout::Layout;

/// The file holding the chosen network.
pub fn chosen_file(layout: &Layout) -> PathBuf {
    layout.state_dir.join("bridge_cidr")
}

/// Sets `config.bridge_cidr` to this installation's network when the config does not name
/// one: the recorded choice, else a free one (recorded). Errors only for a damaged record.
pub async fn resolve(
    config: &mut Config,
    net: &dyn NetOps,
    layout: &Layout,
    store: &Store,
) -> Result<(), String> {
    // With the root helper, the bridge's network is the helper's policy, read by root from the
    // config file: a choice recorded in the owner's state dir must not widen what root does.
    // An overlap is then reported by the start step, asking for bridge_cidr in that file.
    if config.network != NetworkMode::Bridge
        || config.bridge_cidr_explicit
        || config.helper_socket.is_some()
    {
        return Ok(());
    }
    let file = chosen_file(layout);
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            config.bridge_cidr = Ipv4Cidr::parse(text.trim()).map_err(|e| {
                format!(
                    "{} is damaged ({e}); it records the bridge network banger chose: restore \
                     it, or set bridge_cidr in the config",
                    file.display()
                )
            })?;
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    }
    let has_addressed_vms = store
        .list_vms()
        .map_err(|e| e.to_string())?
        .iter()
        .any(|vm| vm.ip.is_some());
    let chosen = if has_addressed_vms {
        // Their addresses were taken from the default before banger recorded a choice.
        config.bridge_cidr
    } else {
        let routes = match net.host_routes().await {
            Ok(r) => r,
            Err(e) => {
                // Nothing recorded: the next daemon tries again.
                tracing::warn!(error = %e, "cannot read the host's routes; using the default bridge network for now");
                return Ok(());
            }
        };
        match pick_free_cidr(&config.bridge_name, &routes) {
            Some(c) => c,
            None => {
                tracing::warn!(
                    candidates = ?DEFAULT_CIDR_CANDIDATES,
                    "every default bridge network overlaps a host route; set bridge_cidr"
                );
                return Ok(());
            }
        }
    };
    if chosen != config.bridge_cidr {
        tracing::info!(default = %config.bridge_cidr, chosen = %chosen, "the default bridge network overlaps a host route; using a free one");
    }
    write_atomically(&file, &format!("{chosen}\n"))
        .map_err(|e| format!("recording the bridge network in {}: {e}", file.display()))?;
    config.bridge_cidr = chosen;
    Ok(())
}

/// A complete file or none: written beside, synced, renamed over.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
