//! Loading the kernel modules shipped in the initramfs, in the order the kernel crate computed
//! (dependencies first), so no modules.dep or modprobe is needed.

use std::path::Path;

use crate::error::AgentError;

/// What happened to each module.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModuleReport {
    pub loaded: Vec<String>,
    pub already: Vec<String>,
    /// A failing module is not fatal: the kernel may have the driver built in, and a missing
    /// disk is reported precisely later.
    pub failed: Vec<(String, String)>,
}

impl ModuleReport {
    pub fn summary(&self) -> String {
        if self.loaded.is_empty() && self.already.is_empty() && self.failed.is_empty() {
            return "none listed".into();
        }
        format!(
            "{} loaded, {} already present, {} failed",
            self.loaded.len(),
            self.already.len(),
            self.failed.len()
        )
    }
}

/// Loads every module named in `load_order` (a file next to the `.ko` files) with `load`.
/// A missing load-order file means a kernel with everything built in.
pub fn load_with(
    load_order: &Path,
    mut load: impl FnMut(&Path) -> Result<bool, std::io::Error>,
) -> Result<ModuleReport, AgentError> {
    let text = match std::fs::read_to_string(load_order) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ModuleReport::default()),
        Err(e) => return Err(AgentError::io("reading", load_order)(e)),
    };
    let dir = load_order.parent().unwrap_or(Path::new("/"));
    let mut report = ModuleReport::default();
    let entries = match banger_guest::initramfs::parse_load_order(&text) {
        Ok(e) => e,
        Err((line, reason)) => {
            // The builder validated this file; a bad line here means a hand-made initramfs.
            report
                .failed
                .push((format!("load-order line {line}"), reason));
            return Ok(report);
        }
    };
    for (_, name) in entries {
        match load(&dir.join(&name)) {
            Ok(true) => report.loaded.push(name),
            Ok(false) => report.already.push(name),
            Err(e) => report.failed.push((name, e.to_string())),
        }
    }
    Ok(report)
}

pub fn load_all(load_order: &Path) -> Result<ModuleReport, AgentError> {
    load_with(load_order, crate::sys::finit_module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_in_order_and_tolerates_failures() {
        let dir = tempfile::tempdir().unwrap();
        let lo = dir.path().join("load-order");
        std::fs::write(
            &lo,
            "virtio_ring.ko\nvirtio.ko\n# comment\nbroken.ko\noverlay.ko\n",
        )
        .unwrap();
        let mut seen = Vec::new();
        let report = load_with(&lo, |p| {
            seen.push(p.to_path_buf());
            match p.file_name().unwrap().to_str().unwrap() {
                "broken.ko" => Err(std::io::Error::from_raw_os_error(libc::ENOEXEC)),
                "overlay.ko" => Ok(false),
                _ => Ok(true),
            }
        })
        .unwrap();
        assert_eq!(seen[0], dir.path().join("virtio_ring.ko"));
        assert_eq!(seen.len(), 4);
        assert_eq!(report.loaded, ["virtio_ring.ko", "virtio.ko"]);
        assert_eq!(report.already, ["overlay.ko"]);
        assert_eq!(report.failed[0].0, "broken.ko");
        assert!(report.failed[0].1.contains("Exec format error"));
        assert_eq!(report.summary(), "2 loaded, 1 already present, 1 failed");
    }

    #[test]
    fn missing_load_order_means_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let r = load_with(&dir.path().join("load-order"), |_| {
            panic!("nothing to load")
        })
        .unwrap();
        assert_eq!(r.summary(), "none listed");
    }

    #[test]
    fn real_finit_module_reports_errors() {
        // Without CAP_SYS_MODULE (or with a non-module file) finit_module must fail cleanly.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("junk.ko");
        std::fs::write(&f, b"not an ELF module").unwrap();
        assert!(crate::sys::finit_module(&f).is_err());
        assert!(crate::sys::finit_module(&dir.path().join("absent.ko")).is_err());
    }
}
