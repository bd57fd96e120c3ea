//! What the guest is handed and how the daemon knows it is up: banger's initramfs (the agent
//! plus the kernel's modules), the per-VM config disk, and the ssh readiness probe.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_config::{NetworkMode, RootDiskStrategy};
use banger_core::VmRecord;
use banger_guest::config::{InitMode, SshServer};
use banger_guest::{GuestConfig, GuestFile, NetworkConfig, RootLayout, SshIdentity};
use banger_net::MacAddr;
use banger_sys::Cmd;
use banger_vmm::{Vmm, VmmHandle};
use sha2::Digest;
use tokio::io::AsyncReadExt;

use super::Engine;
use crate::progress::OpCtx;

/// Where the static guest agent is looked for, in order, when `agent_bin` is not configured.
pub fn agent_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        v.push(dir.join("banger-agent"));
        v.push(dir.join("../lib/banger/banger-agent"));
    }
    v.push(PathBuf::from("/usr/local/lib/banger/banger-agent"));
    v.push(PathBuf::from("/usr/lib/banger/banger-agent"));
    v
}

impl Engine {
    fn agent_path(&self) -> Result<PathBuf, String> {
        let path = self.find_agent()?;
        // Checked before every use: the file may be rebuilt between starts.
        use banger_sys::elf::{ElfError, Linkage, x86_64_linkage};
        let problem = match x86_64_linkage(&path) {
            Ok(Linkage::Static) => return Ok(path),
            Ok(Linkage::Dynamic { interpreter }) => {
                format!("it is dynamically linked (loader {interpreter})")
            }
            Err(ElfError::NotElf { why, .. }) => {
                format!("it is not an x86-64 ELF executable ({why})")
            }
            Err(ElfError::Io { source, .. }) => format!("reading it: {source}"),
        };
        Err(format!(
            "the guest agent {} cannot run as the guest's /init: {problem}; build it static \
             (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p banger-agent \
             --target x86_64-unknown-linux-gnu) and install it, or set agent_bin to a static build",
            path.display()
        ))
    }

    fn find_agent(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.config().agent_bin {
            return if p.is_file() {
                Ok(p.clone())
            } else {
                Err(format!("agent_bin {} does not exist", p.display()))
            };
        }
        let candidates = agent_candidates();
        candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            format!(
                "the guest agent banger-agent was not found (looked in {}); reinstall banger with scripts/install.sh",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The agent's sha256, hashed once per (path, size, mtime): every start needs it to find
    /// the cached initramfs, and the agent is megabytes.
    fn agent_digest(&self, agent: &Path) -> Result<String, String> {
        let meta = std::fs::metadata(agent).map_err(|e| format!("{}: {e}", agent.display()))?;
        let key = (agent.to_path_buf(), meta.len(), meta.modified().ok());
        let mut cache = self.inner.agent_digest.lock().expect("poisoned");
        if let Some((k, d)) = cache.as_ref()
            && *k == key
        {
            return Ok(d.clone());
        }
        let bytes =
            std::fs::read(agent).map_err(|e| format!("reading {}: {e}", agent.display()))?;
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        *cache = Some((key, digest.clone()));
        Ok(digest)
    }

    /// banger's initramfs for the kernel in `kernel_dir`: the agent as `/init` plus the kernel's
    /// modules, cached per (kernel, agent build) so it is built once.
    pub(super) async fn ensure_initramfs(&self, kernel_dir: &Path) -> Result<PathBuf, String> {
        let agent = self.agent_path()?;
        let digest = self.agent_digest(&agent)?;
        let out = kernel_dir.join(format!("initramfs-{}.cpio", &digest[..16]));
        if out.is_file() {
            return Ok(out);
        }
        let modules = kernel_dir.join("modules");
        let modules = modules.join("load-order").is_file().then_some(modules);
        let target = out.clone();
        tokio::task::spawn_blocking(move || {
            // One build at a time: simultaneous first starts of a kernel wrote the same temp
            // file (EEXIST for all but one, and their cleanup removed the winner's file). The
            // ones that waited find the finished archive.
            static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
            if target.is_file() {
                return Ok(());
            }
            banger_guest::build_initramfs(&agent, modules.as_deref(), &target).map(|_| ())
        })
        .await
        .map_err(|e| format!("initramfs build task: {e}"))?
        .map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// Writes the VM's config disk: its identity, disk layout and network, read by the agent.
    pub(super) async fn write_config_disk(
        &self,
        vm: &VmRecord,
        image: &Path,
        meta: &banger_core::ImageMeta,
        modules: Option<banger_guest::ModulesDisk>,
        path: &Path,
        ctx: &OpCtx<'_>,
    ) -> Result<(), String> {
        let layout = self.layout();
        let uuid = |p: &Path| -> Result<String, String> {
            banger_guest::read_ext4_uuid(p)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{} is not an ext4 filesystem", p.display()))
        };
        let root = match self.config().root_disk {
            RootDiskStrategy::Overlay => RootLayout::Overlay {
                lower_uuid: uuid(image)?,
                upper_uuid: uuid(&layout.root_disk(&vm.id))?,
            },
            // The snapshot shows the image's filesystem, UUID included.
            RootDiskStrategy::DmSnapshot => RootLayout::Direct { uuid: uuid(image)? },
            _ => RootLayout::Direct {
                uuid: uuid(&layout.root_disk(&vm.id))?,
            },
        };
        let machine_id = std::fs::read_to_string(layout.machine_id(&vm.id))
            .map_err(|e| format!("reading {}: {e}", layout.machine_id(&vm.id).display()))?;
        let key_path = layout.host_key(&vm.id);
        let host_key = std::fs::read_to_string(&key_path)
            .map_err(|e| format!("reading {}: {e}", key_path.display()))?;
        let host_pub = std::fs::read_to_string(key_path.with_extension("pub"))
            .map_err(|e| format!("reading {}.pub: {e}", key_path.display()))?;
        let user_key = self
            .ssh()
            .ensure_user_key(self.inner.runner.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let cidr = &self.config().bridge_cidr;
        let network = match (self.config().network, vm.ip) {
            (NetworkMode::Bridge, Some(ip)) => Some(NetworkConfig {
                mac: MacAddr::for_vm(vm.id.as_str()).to_string(),
                address: ip,
                prefix_len: cidr.prefix(),
                gateway: cidr.gateway(),
                dns: host_nameservers(),
            }),
            _ => None,
        };
        let config = GuestConfig {
            v: banger_guest::config::CONFIG_VERSION,
            hostname: vm.name.to_string(),
            machine_id: machine_id.trim().to_string(),
            root,
            work_uuid: Some(uuid(&layout.work_disk(&vm.id))?),
            network,
            ssh: Some(SshIdentity {
                host_key_ed25519: host_key,
                host_key_ed25519_pub: host_pub.trim().to_string(),
                authorized_keys: vec![user_key],
            }),
            files: self.file_sync_files(ctx)?,
            init: None,
            init_mode: if meta.agent_init() {
                InitMode::Agent
            } else {
                InitMode::Image
            },
            ssh_server: if meta.agent_ssh() && !self.layout().sshd_installed(&vm.id).exists() {
                SshServer::Agent
            } else {
                SshServer::Image
            },
            env: meta.env.clone(),
            workdir: meta.workdir.clone(),
            modules,
        };
        let _ = std::fs::remove_file(path);
        banger_guest::write_config_disk(path, &config).map_err(|e| e.to_string())
    }

    /// The `[[file_sync]]` files, read now so every start carries the host's current copy. A
    /// missing host file is a warning, not a failure (it may simply not exist on this machine).
    fn file_sync_files(&self, ctx: &OpCtx<'_>) -> Result<Vec<GuestFile>, String> {
        /// Keeps the config disk small; tokens and dotfiles are far below this.
        const MAX_TOTAL: usize = 4 << 20;
        let mut files = Vec::new();
        let mut total = 0usize;
        for entry in &self.config().file_sync {
            let guest = match entry.guest.strip_prefix("~") {
                Ok(rest) => Path::new("/root").join(rest),
                Err(_) => entry.guest.clone(),
            };
            // Only a regular file, read up to what is left of the cap: a FIFO, /dev/zero or a
            // growing log must neither hang nor fill the daemon's memory.
            let left = (MAX_TOTAL - total) as u64;
            let data = match crate::input::read_regular_capped(&entry.host, left) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => {
                    ctx.progress.warn(format!(
                        "file_sync: {} does not exist; not copied to {}",
                        entry.host.display(),
                        guest.display()
                    ));
                    continue;
                }
                Err(crate::input::InputError::TooLarge { .. }) => {
                    return Err(format!(
                        "file_sync: {} brings the synced files over {} MiB; sync smaller files",
                        entry.host.display(),
                        MAX_TOTAL >> 20
                    ));
                }
                Err(e) => return Err(format!("file_sync: {e}")),
            };
            total += data.len();
            files.push(GuestFile::new(
                guest.display().to_string(),
                entry.mode,
                &data,
            ));
        }
        Ok(files)
    }

    /// Waits until the guest's sshd accepts banger's key, or fails early when the VMM dies, the
    /// client cancels, or `timeout` passes.
    pub(super) async fn wait_for_ssh(
        &self,
        vm: &VmRecord,
        ip: Ipv4Addr,
        vmm: &Arc<dyn Vmm>,
        // The VMM's handle, and its log's length before it was spawned.
        (handle, log_mark): (&VmmHandle, u64),
        timeout: Duration,
        ctx: &OpCtx<'_>,
    ) -> Result<(), String> {
        let started = Instant::now();
        // Only this start's lines (see `Attempt::log_mark`).
        let tail = || banger_vmm::process::tail_file_since(&handle.log_path, log_mark, 8);
        let addr = SocketAddr::from((ip, 22));
        let mut announced = false;
        loop {
            if ctx.cancel.is_cancelled() {
                return Err("cancelled: the client went away".into());
            }
            if !vmm.is_alive(handle) {
                return Err(format!(
                    "the VM stopped while booting; last log lines: {}",
                    tail().trim()
                ));
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "no ssh answer from {ip} within {}s (boot_timeout_secs); last log lines: {}",
                    timeout.as_secs(),
                    tail().trim()
                ));
            }
            // Once sshd has answered, only `ssh true` is retried, a second apart: a new probe
            // connection every 50 ms costs a slow guest's sshd a fork each, and past its
            // MaxStartups it drops connections, banger's own login included (seen with nested
            // KVM on a loaded host: the guest was up, yet no login got through for minutes).
            if announced || ssh_banner(addr).await {
                if !announced {
                    ctx.progress.stage(
                        "ssh",
                        Some(format!(
                            "sshd answered after {:.1}s",
                            started.elapsed().as_secs_f64()
                        )),
                    );
                    announced = true;
                }
                match self
                    .ssh_run(vm, ip, &["true"], Duration::from_secs(10))
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) if started.elapsed() > timeout => return Err(e),
                    Err(_) => {}
                }
            }
            let pause = if announced { 1000 } else { 50 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// First boot of a `--nat` VM whose image has no sshd: installs one with the image's package
    /// manager, so later boots use it instead of the agent's built-in server. Best effort: a
    /// failure is a warning (the agent keeps serving ssh), and it is tried again next start.
    pub(super) async fn install_sshd_once(
        &self,
        vm: &VmRecord,
        ip: Ipv4Addr,
        meta: &banger_core::ImageMeta,
        ctx: &OpCtx<'_>,
    ) {
        let marker = self.layout().sshd_installed(&vm.id);
        if !meta.agent_ssh() || !vm.nat || marker.exists() {
            return;
        }
        let Some(argv) = meta
            .package_manager
            .as_deref()
            .and_then(sshd_install_command)
        else {
            return;
        };
        ctx.progress.stage(
            "sshd_install",
            Some(format!(
                "the image has no sshd: installing one with {} (first boot only)",
                meta.package_manager.as_deref().unwrap_or_default()
            )),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        match self.ssh_run(vm, ip, &argv, Duration::from_secs(600)).await {
            Ok(_) => {
                if let Err(e) = std::fs::write(&marker, b"") {
                    ctx.progress
                        .warn(format!("recording the sshd install: {}: {e}", marker.display()));
                }
            }
            Err(e) => ctx.progress.warn(format!(
                "installing sshd failed (banger's agent keeps serving ssh; retried at next start): {e}"
            )),
        }
    }

    /// Runs a command in the guest over ssh, as `banger vm exec` would.
    pub(super) async fn ssh_run(
        &self,
        vm: &VmRecord,
        ip: Ipv4Addr,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let info = banger_protocol::SshInfo {
            id: vm.id.to_string(),
            name: vm.name.to_string(),
            ip,
            user: "root".into(),
            key: self.ssh().user_key(),
            known_hosts: self.ssh().known_hosts(),
        };
        let command: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let cmd = Cmd::new("ssh").args(info.ssh_args(false, timeout.as_secs(), &command));
        match tokio::time::timeout(timeout, self.inner.runner.run(&cmd)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "ssh to VM {} ({ip}) timed out after {}s",
                vm.name,
                timeout.as_secs()
            )),
        }
    }
}

/// Whether something on `addr` speaks SSH (reads the `SSH-` banner).
async fn ssh_banner(addr: SocketAddr) -> bool {
    let connect = tokio::time::timeout(
        Duration::from_millis(700),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    let Ok(Ok(mut stream)) = connect else {
        return false;
    };
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"SSH-"
    )
}

/// The host's nameservers that a guest can use: loopback resolvers (systemd-resolved's stub,
/// dnsmasq) are not reachable from a VM, so they are left out.
pub fn host_nameservers() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out: Vec<Ipv4Addr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    if out.is_empty() {
        // systemd-resolved keeps the real upstreams here.
        let text = std::fs::read_to_string("/run/systemd/resolve/resolv.conf").unwrap_or_default();
        out = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback())
            .collect();
    }
    out.truncate(3);
    out
}

/// The argv (run by the guest's shell via ssh) installing an OpenSSH server with `pm`.
fn sshd_install_command(pm: &str) -> Option<Vec<String>> {
    let script = match pm {
        "apt" => {
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends openssh-server"
        }
        "apk" => "apk add --no-cache openssh-server",
        "dnf" => "dnf install -y openssh-server",
        "yum" => "yum install -y openssh-server",
        "zypper" => "zypper --non-interactive install openssh",
        "pacman" => "pacman -Sy --noconfirm openssh",
        _ => return None,
    };
    Some(vec!["sh".into(), "-c".into(), script.into()])
}
