//! Where banger keeps things on disk.
//!
//! State (survives reboots): `<state_dir>/banger.db`, `<state_dir>/vms/<id>/` (disks, VMM log,
//! handles), `<state_dir>/kernels/`, `<state_dir>/images/`, `<state_dir>/bangerd.log`.
//! Runtime (sockets, gone at reboot): `<runtime_dir>/bangerd.sock`, `<runtime_dir>/vms/<id>/`.

use std::path::{Path, PathBuf};

use banger_core::VmId;

#[derive(Debug, Clone)]
pub struct Layout {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: PathBuf, runtime_dir: PathBuf) -> Self {
        Layout {
            state_dir,
            runtime_dir,
        }
    }

    pub fn db(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }

    /// Space set aside so a stop or kill can be recorded on a full disk ([`crate::reserve`]).
    pub fn space_reserve(&self) -> PathBuf {
        self.state_dir.join("space-reserve")
    }

    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.pid")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms_dir().join(id.as_str())
    }

    pub fn vm_run_dir(&self, id: &VmId) -> PathBuf {
        self.runtime_dir.join("vms").join(id.as_str())
    }

    pub fn vm_run_root(&self) -> PathBuf {
        self.runtime_dir.join("vms")
    }

    pub fn handles_file(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("handles.json")
    }

    pub fn vmm_log(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("vmm.log")
    }

    pub fn work_disk(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("work.ext4")
    }

    pub fn root_disk(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("root.ext4")
    }

    pub fn ssh_dir(&self) -> PathBuf {
        self.state_dir.join("ssh")
    }

    pub fn machine_id(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("machine-id")
    }

    pub fn host_key(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("ssh_host_ed25519_key")
    }

    /// Marks a VM of an sshd-less image whose first boot installed an sshd: later boots use it
    /// instead of the agent's built-in server.
    pub fn sshd_installed(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join("sshd-installed")
    }

    pub fn config_disk(&self, id: &VmId) -> PathBuf {
        self.vm_run_dir(id).join("config.img")
    }

    pub fn build_dir(&self) -> PathBuf {
        self.state_dir.join("build")
    }

    pub fn kernels_dir(&self) -> PathBuf {
        self.state_dir.join("kernels")
    }

    /// A staging dir for an image being made, unique per operation (two operations on one
    /// name never share one; the loser of the final rename fails cleanly). Leftovers of a
    /// crash are removed by reconcile ([`Layout::clear_staging`]).
    pub fn staging_dir(&self, name: &str) -> PathBuf {
        self.images_dir().join(unique_staging(name))
    }

    /// Like [`Layout::staging_dir`], for kernels.
    pub fn kernel_staging_dir(&self, name: &str) -> PathBuf {
        self.kernels_dir().join(unique_staging(name))
    }

    /// Removes every staging dir (only called before any operation runs: at daemon start).
    pub fn clear_staging(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for dir in [self.images_dir(), self.kernels_dir()] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && (n.ends_with(".staging") || n.ends_with(".bundle")) {
                    let p = e.path();
                    if banger_sys::rmtree::remove_tree(&p).is_ok() {
                        removed.push(p);
                    }
                }
            }
        }
        removed
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// Creates the top-level directories with owner-only permissions.
    pub fn ensure(&self) -> std::io::Result<()> {
        for dir in [
            &self.state_dir,
            &self.runtime_dir,
            &self.vms_dir(),
            &self.vm_run_root(),
            &self.kernels_dir(),
            &self.images_dir(),
        ] {
            create_private_dir(dir)?;
        }
        Ok(())
    }
}

/// `mkdir -p` then chmod 0700 on the leaf: runtime and state dirs hold sockets and disks that
/// nobody else may read.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn unique_staging(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.{}-{n}.staging", std::process::id())
}
