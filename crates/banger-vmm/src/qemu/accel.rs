//! Choosing QEMU's accelerator: KVM where hardware virtualisation really works, TCG otherwise.

use std::path::PathBuf;

use crate::VmmKind;

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's software CPU emulator (`-accel tcg,thread=multi -cpu max`).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The [`VmmKind`] recorded for VMs run with this accelerator.
    pub fn kind(self) -> VmmKind {
        match self {
            Accel::Kvm => VmmKind::QemuKvm,
            Accel::Tcg => VmmKind::QemuTcg,
        }
    }

    /// The accelerator of a QEMU handle kind; `None` for other backends.
    pub fn from_kind(kind: VmmKind) -> Option<Accel> {
        match kind {
            VmmKind::QemuKvm => Some(Accel::Kvm),
            VmmKind::QemuTcg => Some(Accel::Tcg),
            VmmKind::Firecracker => None,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`detect_accel`]: which accelerator to use, and why (for `doctor` and
/// `vm show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    pub accel: Accel,
    pub reason: String,
}

/// Where [`detect_accel_with`] looks; [`AccelPaths::default`] is the real host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelPaths {
    /// `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// `/proc/cpuinfo`.
    pub cpuinfo: PathBuf,
    /// `/sys/module`; a `kvm_pvm` entry in it marks PVM, a software KVM.
    pub sys_module: PathBuf,
}

impl Default for AccelPaths {
    fn default() -> Self {
        AccelPaths {
            kvm_device: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: "/sys/module".into(),
        }
    }
}

/// Picks the accelerator for this host: see [`detect_accel_with`].
pub fn detect_accel() -> AccelProbe {
    detect_accel_with(&AccelPaths::default())
}

/// KVM only when all of these hold, else TCG with the first reason that failed:
/// - the KVM device opens read-write;
/// - it is not PVM (`<sys_module>/kvm_pvm` is absent): PVM implements /dev/kvm in software, and
///   stock guest kernels crawl under it;
/// - the CPU advertises hardware virtualisation (`vmx` or `svm` among the cpuinfo flags).
pub fn detect_accel_with(paths: &AccelPaths) -> AccelProbe {
    let tcg = |reason: String| AccelProbe {
        accel: Accel::Tcg,
        reason,
    };
    let kvm = paths.kvm_device.display();
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths.kvm_device)
    {
        return tcg(format!("cannot open {kvm} read-write: {e}"));
    }
    let pvm = paths.sys_module.join("kvm_pvm");
    if pvm.exists() {
        return tcg(format!(
            "{kvm} is PVM (software KVM: {} exists), too slow for stock guest kernels",
            pvm.display()
        ));
    }
    let cpuinfo = match std::fs::read_to_string(&paths.cpuinfo) {
        Ok(text) => text,
        Err(e) => return tcg(format!("cannot read {}: {e}", paths.cpuinfo.display())),
    };
    match virt_flag(&cpuinfo) {
        Some(flag) => AccelProbe {
            accel: Accel::Kvm,
            reason: format!("{kvm} is usable and the CPU advertises {flag}"),
        },
        None => tcg(format!(
            "the CPU advertises neither vmx nor svm in {} (no hardware virtualisation)",
            paths.cpuinfo.display()
        )),
    }
}

/// `vmx` or `svm` if a `flags` line of cpuinfo lists it.
fn virt_flag(cpuinfo: &str) -> Option<&'static str> {
    cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "flags"))
        .flat_map(|l| {
            l.split_once(':')
                .map(|(_, v)| v)
                .unwrap_or("")
                .split_whitespace()
        })
        .find_map(|f| match f {
            "vmx" => Some("vmx"),
            "svm" => Some("svm"),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr vmx smx est\nbugs\t\t: spectre_v1\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm lahf_lm\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor vmxnet\nvmx flags\t: vnmi\n";

    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        /// A fake host: `kvm` creates the device (a regular file opens read-write just like
        /// it), `pvm` creates `sys/module/kvm_pvm`.
        fn new(kvm: bool, cpuinfo: Option<&str>, pvm: bool) -> Host {
            let dir = tempfile::tempdir().unwrap();
            if kvm {
                std::fs::write(dir.path().join("kvm"), "").unwrap();
            }
            if let Some(text) = cpuinfo {
                std::fs::write(dir.path().join("cpuinfo"), text).unwrap();
            }
            std::fs::create_dir(dir.path().join("module")).unwrap();
            if pvm {
                std::fs::create_dir(dir.path().join("module/kvm_pvm")).unwrap();
            }
            Host { dir }
        }

        fn probe(&self) -> AccelProbe {
            detect_accel_with(&AccelPaths {
                kvm_device: self.dir.path().join("kvm"),
                cpuinfo: self.dir.path().join("cpuinfo"),
                sys_module: self.dir.path().join("module"),
            })
        }
    }

    #[test]
    fn kvm_with_vmx_or_svm_and_no_pvm() {
        let probe = Host::new(true, Some(INTEL), false).probe();
        assert_eq!(probe.accel, Accel::Kvm, "{}", probe.reason);
        assert!(probe.reason.contains("vmx"), "{}", probe.reason);
        let probe = Host::new(true, Some(AMD), false).probe();
        assert_eq!(probe.accel, Accel::Kvm, "{}", probe.reason);
        assert!(probe.reason.contains("svm"), "{}", probe.reason);
    }

    #[test]
    fn pvm_is_tcg_even_with_vmx() {
        let probe = Host::new(true, Some(INTEL), true).probe();
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(
            probe.reason.contains("is PVM (software KVM"),
            "{}",
            probe.reason
        );
        assert!(probe.reason.contains("kvm_pvm"), "{}", probe.reason);
    }

    #[test]
    fn no_hardware_flag_is_tcg() {
        // "vmxnet" and a "vmx flags" line must not count as the vmx flag.
        let probe = Host::new(true, Some(NONE), false).probe();
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(
            probe.reason.contains("neither vmx nor svm"),
            "{}",
            probe.reason
        );
    }

    #[test]
    fn missing_device_or_cpuinfo_is_tcg_naming_the_path() {
        let host = Host::new(false, Some(INTEL), false);
        let probe = host.probe();
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("cannot open"), "{}", probe.reason);
        assert!(probe.reason.contains("kvm"), "{}", probe.reason);

        let probe = Host::new(true, None, false).probe();
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("cpuinfo"), "{}", probe.reason);
    }

    #[test]
    fn read_only_device_is_tcg() {
        use std::os::unix::fs::PermissionsExt;
        let host = Host::new(true, Some(INTEL), false);
        // A directory never opens for writing, whoever runs the test (root included).
        let dev = host.dir.path().join("kvm");
        std::fs::remove_file(&dev).unwrap();
        std::fs::create_dir(&dev).unwrap();
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o755)).unwrap();
        let probe = host.probe();
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("read-write"), "{}", probe.reason);
    }

    #[test]
    fn kinds() {
        assert_eq!(Accel::Kvm.kind(), VmmKind::QemuKvm);
        assert_eq!(Accel::Tcg.kind(), VmmKind::QemuTcg);
        assert_eq!(Accel::from_kind(VmmKind::QemuTcg), Some(Accel::Tcg));
        assert_eq!(Accel::from_kind(VmmKind::Firecracker), None);
        assert_eq!(Accel::Tcg.to_string(), "tcg");
    }

    #[test]
    fn flag_parsing() {
        assert_eq!(virt_flag(INTEL), Some("vmx"));
        assert_eq!(virt_flag(AMD), Some("svm"));
        assert_eq!(virt_flag(NONE), None);
        assert_eq!(virt_flag(""), None);
    }
}
