//! Picks the VMM backend from the config and what the host has.
//!
//! `vmm = "auto"`: Firecracker when its binary is found and hardware KVM is usable; otherwise
//! QEMU, with KVM when usable and TCG (software emulation) when not. A software KVM such as PVM
//! counts as unusable: stock guest kernels crawl under it and Firecracker guests crash.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use banger_config::{Config, VmmChoice};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::{Accel, Qemu, detect_accel};
use banger_vmm::{Vmm, VmmKind};

use crate::engine::VmmProvider;

pub use banger_sys::find_in_path;

/// The production provider. The backend is resolved at each start (cheaply, once it is known to
/// work) so installing Firecracker or QEMU does not need a daemon restart.
#[derive(Debug)]
pub struct ConfigVmmProvider {
    choice: VmmChoice,
    firecracker_bin: Option<PathBuf>,
    qemu_bin: Option<PathBuf>,
    firecracker: Mutex<Option<Arc<Firecracker>>>,
    qemu: Mutex<Option<Arc<Qemu>>>,
}

impl ConfigVmmProvider {
    pub fn new(config: &Config) -> Self {
        ConfigVmmProvider {
            choice: config.vmm,
            firecracker_bin: config.firecracker_bin.clone(),
            qemu_bin: config.qemu_bin.clone(),
            firecracker: Mutex::new(None),
            qemu: Mutex::new(None),
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
        let fc = Firecracker::new(bin).map_err(|e| e.to_string())?;
        fc.check_version().await.map_err(|e| e.to_string())?;
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
        let q = Qemu::new(bin, probe.accel).map_err(|e| e.to_string())?;
        q.version().await.map_err(|e| e.to_string())?;
        let q = Arc::new(q);
        *self.qemu.lock().expect("poisoned") = Some(q.clone());
        Ok(q)
    }
}

#[async_trait::async_trait]
impl VmmProvider for ConfigVmmProvider {
    async fn select(&self) -> Result<Arc<dyn Vmm>, String> {
        match self.choice {
            VmmChoice::Firecracker => Ok(self.firecracker().await? as Arc<dyn Vmm>),
            VmmChoice::Qemu => Ok(self.qemu().await? as Arc<dyn Vmm>),
            VmmChoice::Auto => {
                if detect_accel().accel == Accel::Kvm && self.firecracker_path().is_some() {
                    return Ok(self.firecracker().await? as Arc<dyn Vmm>);
                }
                self.qemu().await.map(|q| q as Arc<dyn Vmm>).map_err(|e| {
                    format!("no usable VMM: Firecracker needs hardware KVM and its binary, and {e}")
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
                    .unwrap_or_else(Firecracker::control_only);
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
                    .unwrap_or_else(|| Qemu::control_only(accel));
                Some(Arc::new(q))
            }
        }
    }
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
