//! Picks the VMM backend from the config and what the host has.
//!
//! `vmm = "auto"`: Firecracker when its binary is found and hardware KVM is usable; otherwise
//! QEMU, with KVM when usable and TCG (software emulation) when not. A software KVM such as PVM
//! counts as unusable: stock guest kernels crawl under it and Firecracker guests crash.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_config::{Config, VmmChoice};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::firecracker::jailer::JailerConfig;
use banger_vmm::qemu::{Accel, Qemu, detect_accel};
use banger_vmm::{Vmm, VmmKind};

use crate::engine::VmmProvider;

pub use banger_sys::find_in_path;

/// Set to `1` for a jailer that does not chroot (the tests' `fake-jailer`, in front of the
/// dynamically linked `fake-firecracker`): skips the check that Firecracker is static.
pub const JAILER_NO_CHROOT_ENV: &str = "BANGER_TEST_JAILER_NO_CHROOT";

/// The production provider. The backend is resolved at each start (cheaply, once it is known to
/// work) so installing Firecracker or QEMU does not need a daemon restart.
#[derive(Debug)]
pub struct ConfigVmmProvider {
    choice: VmmChoice,
    firecracker_bin: Option<PathBuf>,
    qemu_bin: Option<PathBuf>,
    firecracker: Mutex<Option<Arc<Firecracker>>>,
    qemu: Mutex<Option<Arc<Qemu>>>,
    /// Set: Firecracker VMMs are launched through this jailer.
    jailer_bin: Option<PathBuf>,
    jailer_ids: (Option<u32>, Option<u32>),
    /// `<state_dir>/jail`: the jailer's chroot base, also known without a jailer so the jails
    /// of VMMs launched by an earlier config are still cleaned up.
    jail_base: PathBuf,
    /// Control socket wait and per-call limit ([`Config::vmm_timeout`]).
    vmm_timeout: std::time::Duration,
}

impl ConfigVmmProvider {
    pub fn new(config: &Config) -> Self {
        ConfigVmmProvider {
            choice: config.vmm,
            firecracker_bin: config.firecracker_bin.clone(),
            qemu_bin: config.qemu_bin.clone(),
            firecracker: Mutex::new(None),
            qemu: Mutex::new(None),
            jailer_bin: config.jailer_bin.clone(),
            jailer_ids: (config.jailer_uid, config.jailer_gid),
            jail_base: config.state_dir.join("jail"),
            vmm_timeout: config.vmm_timeout(),
        }
    }

    fn firecracker_path(&self) -> Option<PathBuf> {
        self.firecracker_bin
            .clone()
            .or_else(|| find_in_path("firecracker"))
    }

    fn qemu_path(&self) -> Option<PathBuf> {
        self.qemu_bin.clone().or_else(Qemu::find_binary)
    }

    async fn firecracker(&self) -> Result<Arc<Firecracker>, String> {
        if let Some(fc) = self.firecracker.lock().expect("poisoned").clone() {
            return Ok(fc);
        }
        let bin = self.firecracker_path().ok_or_else(|| {
            "Firecracker was not found: install it in PATH or set firecracker_bin in the config"
                .to_string()
        })?;
        let mut fc = Firecracker::new(bin)
            .map_err(|e| e.to_string())?
            .with_jail_base(self.jail_base.clone())
            .with_socket_timeout(self.vmm_timeout)
            .with_api_timeout(self.vmm_timeout);
        if let Some(jailer) = &self.jailer_bin {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            let (uid, gid) = jail_identity(self.jailer_ids, euid, banger_config::system_owner)?;
            fc = fc
                .with_jailer(JailerConfig {
                    bin: jailer.clone(),
                    chroot_base: self.jail_base.clone(),
                    uid,
                    gid,
                })
                .map_err(|e| e.to_string())?;
            if std::env::var_os(JAILER_NO_CHROOT_ENV).is_none_or(|v| v != "1") {
                banger_vmm::firecracker::jailer::check_jailable(fc.bin())
                    .map_err(|e| e.to_string())?;
            }
        }
        let version = fc.check_version().await.map_err(|e| e.to_string())?;
        if let Some(jv) = fc.check_jailer_version().await.map_err(|e| e.to_string())?
            && jv != version
        {
            return Err(format!(
                "the jailer is v{jv} but Firecracker is v{version}: use the jailer of the same \
                 Firecracker release"
            ));
        }
        let fc = Arc::new(fc);
        *self.firecracker.lock().expect("poisoned") = Some(fc.clone());
        Ok(fc)
    }

    async fn qemu(&self) -> Result<Arc<Qemu>, String> {
        if let Some(q) = self.qemu.lock().expect("poisoned").clone() {
            return Ok(q);
        }
        let bin = self.qemu_path().ok_or_else(|| {
            "QEMU was not found: apt-get install qemu-system-x86 (or set qemu_bin in the config)".to_string()
        })?;
        let probe = detect_accel();
        tracing::info!(accel = ?probe.accel, reason = %probe.reason, "QEMU accelerator chosen");
        let q = Qemu::new(bin, probe.accel)
            .map_err(|e| e.to_string())?
            .with_socket_timeout(self.vmm_timeout)
            .with_qmp_timeout(self.vmm_timeout);
        q.version().await.map_err(|e| e.to_string())?;
        let q = Arc::new(q);
        *self.qemu.lock().expect("poisoned") = Some(q.clone());
        Ok(q)
    }
}

#[async_trait::async_trait]
impl VmmProvider for ConfigVmmProvider {
    async fn select(&self, nested: bool) -> Result<Arc<dyn Vmm>, String> {
        let qemu = || async {
            let q = self.qemu().await?;
            if nested {
                nested_support(q.accel(), Path::new("/sys/module"))?;
            }
            Ok::<_, String>(q as Arc<dyn Vmm>)
        };
        match self.choice {
            VmmChoice::Firecracker if nested => Err(FIRECRACKER_NOT_NESTED.into()),
            VmmChoice::Firecracker => Ok(self.firecracker().await? as Arc<dyn Vmm>),
            VmmChoice::Qemu => qemu().await,
            VmmChoice::Auto => {
                if !nested
                    && detect_accel().accel == Accel::Kvm
                    && self.firecracker_path().is_some()
                {
                    return Ok(self.firecracker().await? as Arc<dyn Vmm>);
                }
                qemu().await.map_err(|e| {
                    if nested {
                        e
                    } else {
                        format!(
                            "no usable VMM: Firecracker needs hardware KVM and its binary, and {e}"
                        )
                    }
                })
            }
        }
    }

    fn for_kind(&self, kind: VmmKind) -> Option<Arc<dyn Vmm>> {
        match kind {
            VmmKind::Firecracker => {
                if let Some(fc) = self.firecracker.lock().expect("poisoned").clone() {
                    return Some(fc);
                }
                let fc = self
                    .firecracker_path()
                    .and_then(|p| Firecracker::new(p).ok())
                    .unwrap_or_else(Firecracker::control_only)
                    .with_jail_base(self.jail_base.clone())
                    .with_api_timeout(self.vmm_timeout);
                Some(Arc::new(fc))
            }
            VmmKind::QemuKvm | VmmKind::QemuTcg => {
                let accel = Accel::from_kind(kind)?;
                if let Some(q) = self.qemu.lock().expect("poisoned").clone()
                    && q.accel() == accel
                {
                    return Some(q);
                }
                let q = self
                    .qemu_path()
                    .and_then(|p| Qemu::new(p, accel).ok())
                    .unwrap_or_else(|| Qemu::control_only(accel))
                    .with_qmp_timeout(self.vmm_timeout);
                Some(Arc::new(q))
            }
        }
    }
}

/// Why `--nested` is refused with `vmm = "firecracker"`.
pub const FIRECRACKER_NOT_NESTED: &str = "--nested needs QEMU: Firecracker gives its guests no \
     hardware virtualisation (its CPUID normalisation hides VMX/SVM and it has no nested \
     support); set vmm = \"qemu\" or \"auto\" (auto picks QEMU for --nested VMs)";

/// Whether QEMU with `accel` can give a guest hardware virtualisation: under TCG `-cpu max`
/// emulates AMD SVM with nested paging; under KVM `-cpu host` passes VMX/SVM through only
/// when the host's kvm_intel/kvm_amd has `nested` on (`sys_module` is `/sys/module`).
pub fn nested_support(accel: Accel, sys_module: &Path) -> Result<(), String> {
    if accel == Accel::Tcg {
        return Ok(());
    }
    let mut seen = Vec::new();
    for m in ["kvm_amd", "kvm_intel"] {
        let p = sys_module.join(m).join("parameters/nested");
        if let Ok(v) = std::fs::read_to_string(&p) {
            let v = v.trim();
            if v == "Y" || v == "1" {
                return Ok(());
            }
            seen.push(format!("{} is {v}", p.display()));
        }
    }
    Err(if seen.is_empty() {
        format!(
            "--nested with QEMU/KVM needs nested virtualisation in the host's KVM, and neither \
             kvm_amd nor kvm_intel is loaded (no {}/kvm_{{amd,intel}}/parameters/nested)",
            sys_module.display()
        )
    } else {
        format!(
            "--nested with QEMU/KVM needs nested virtualisation in the host's KVM, but {}: \
             reload the module with nested=1 (e.g. `modprobe -r kvm_amd && modprobe kvm_amd \
             nested=1`, and `options kvm_amd nested=1` in /etc/modprobe.d/ to keep it)",
            seen.join(", ")
        )
    })
}

/// Who the jailer runs Firecracker as: `jailer_uid`/`jailer_gid` when configured, else the
/// owner recorded by `banger system install`. The jailer needs a root daemon, and Firecracker
/// never runs as root inside the jail.
pub fn jail_identity(
    configured: (Option<u32>, Option<u32>),
    euid: u32,
    install_owner: impl FnOnce() -> Option<(u32, u32)>,
) -> Result<(u32, u32), String> {
    if euid != 0 {
        return Err(format!(
            "jailer_bin is set, but bangerd runs as uid {euid}: the jailer needs root (chroot, \
             device nodes, cgroups, the uid switch); run the daemon as root or unset jailer_bin"
        ));
    }
    let (uid, gid) = match configured {
        (Some(u), Some(g)) => (u, g),
        _ => install_owner().ok_or_else(|| {
            "jailer_bin is set, but there is no user to run Firecracker as: set jailer_uid and \
             jailer_gid in the config (an unprivileged user, e.g. 65534), or install with \
             `banger system install --owner USER`"
                .to_string()
        })?,
    };
    if uid == 0 || gid == 0 {
        return Err(format!(
            "the jailer would run Firecracker as uid {uid} gid {gid}; banger never runs it as \
             root inside the jail: set jailer_uid and jailer_gid to an unprivileged user"
        ));
    }
    Ok((uid, gid))
}

/// Which backend `vmm = "auto"` would choose here and why, for `doctor` and `daemon status`.
pub fn describe_auto() -> String {
    let probe = detect_accel();
    match (probe.accel, find_in_path("firecracker").is_some()) {
        (Accel::Kvm, true) => "firecracker (hardware KVM)".into(),
        (Accel::Kvm, false) => "qemu-kvm (Firecracker not installed)".into(),
        (Accel::Tcg, _) => format!("qemu-tcg ({})", probe.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_needs_tcg_or_nested_kvm() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(nested_support(Accel::Tcg, dir.path()), Ok(()));
        let e = nested_support(Accel::Kvm, dir.path()).unwrap_err();
        assert!(e.contains("neither kvm_amd nor kvm_intel is loaded"), "{e}");
        let p = dir.path().join("kvm_amd/parameters");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("nested"), "0\n").unwrap();
        let e = nested_support(Accel::Kvm, dir.path()).unwrap_err();
        assert!(e.contains("kvm_amd/parameters/nested is 0"), "{e}");
        assert!(e.contains("nested=1"), "{e}");
        std::fs::write(p.join("nested"), "1\n").unwrap();
        assert_eq!(nested_support(Accel::Kvm, dir.path()), Ok(()));
        let p = dir.path().join("kvm_intel/parameters");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("nested"), "Y\n").unwrap();
        std::fs::write(dir.path().join("kvm_amd/parameters/nested"), "N\n").unwrap();
        assert_eq!(nested_support(Accel::Kvm, dir.path()), Ok(()));
    }

    #[test]
    fn jail_identity_prefers_the_config_then_the_install_owner() {
        let none = || None;
        assert_eq!(
            jail_identity((Some(65534), Some(65533)), 0, || Some((1000, 1000))),
            Ok((65534, 65533))
        );
        assert_eq!(
            jail_identity((None, None), 0, || Some((1000, 1001))),
            Ok((1000, 1001))
        );
        let e = jail_identity((None, None), 0, none).unwrap_err();
        assert!(e.contains("set jailer_uid and jailer_gid"), "{e}");
        let e = jail_identity((Some(65534), Some(65534)), 1000, none).unwrap_err();
        assert!(e.contains("needs root"), "{e}");
        // An install record naming root is refused like a configured root.
        let e = jail_identity((None, None), 0, || Some((0, 0))).unwrap_err();
        assert!(e.contains("never runs it as root"), "{e}");
        let e = jail_identity((Some(0), Some(5)), 0, none).unwrap_err();
        assert!(e.contains("never runs it as root"), "{e}");
    }
}
