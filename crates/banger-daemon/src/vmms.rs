//! Picks the VMM backend from the config and what the host has.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_config::{Config, VmmChoice};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::{Vmm, VmmKind};

use crate::engine::VmmProvider;

/// The production provider. The backend is resolved at each start (cheaply, once it is known to
/// work) so installing Firecracker does not need a daemon restart.
#[derive(Debug)]
pub struct ConfigVmmProvider {
    choice: VmmChoice,
    firecracker_bin: Option<PathBuf>,
    firecracker: Mutex<Option<Arc<Firecracker>>>,
}

impl ConfigVmmProvider {
    pub fn new(config: &Config) -> Self {
        ConfigVmmProvider {
            choice: config.vmm,
            firecracker_bin: config.firecracker_bin.clone(),
            firecracker: Mutex::new(None),
        }
    }

    fn firecracker_path(&self) -> Option<PathBuf> {
        self.firecracker_bin
            .clone()
            .or_else(|| find_in_path("firecracker"))
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
}

#[async_trait::async_trait]
impl VmmProvider for ConfigVmmProvider {
    async fn select(&self) -> Result<Arc<dyn Vmm>, String> {
        match self.choice {
            VmmChoice::Firecracker => Ok(self.firecracker().await? as Arc<dyn Vmm>),
            VmmChoice::Auto => {
                if !kvm_usable() {
                    return Err("no usable VMM: /dev/kvm is missing or not usable for Firecracker, and this build has no QEMU backend; set vmm = \"firecracker\" to force it".into());
                }
                Ok(self.firecracker().await? as Arc<dyn Vmm>)
            }
            VmmChoice::Qemu => Err("vmm = \"qemu\" is not supported by this build of banger yet; use vmm = \"firecracker\"".into()),
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
            VmmKind::QemuKvm | VmmKind::QemuTcg => None,
        }
    }
}

/// Whether hardware virtualisation is there for Firecracker: `/dev/kvm` opens read-write and
/// the CPU advertises VMX or SVM. (A software KVM such as PVM has /dev/kvm but no such flag,
/// and Firecracker guests crash on it.)
pub fn kvm_usable() -> bool {
    let dev_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpu_ok = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    dev_ok && cpu_ok && !Path::new("/sys/module/kvm_pvm").exists()
}

pub use banger_sys::find_in_path;
