//! `--nested` VMs: the kernel's whole module tree as a read-only ext4 "modules disk".
//!
//! The tree of a pulled Debian kernel is ~90 MB: far too much for banger's initramfs, which
//! stays in guest RAM and is shared by every VM of the kernel. The disk is built once per
//! kernel (next to its initramfs, `<kernel dir>/modules-nested-v1.ext4`) from
//! `<kernel dir>/lib/modules/<release>/` with depmod's indexes (so modprobe works in the guest)
//! and a [`banger_guest::MODULES_LOAD_ORDER`] of [`NESTED_MODULES`] with their dependencies,
//! which the agent loads at boot.

use std::path::{Path, PathBuf};

use banger_guest::ModulesDisk;
use banger_kernel::modules::{ModuleIndex, parse_modules_builtin, parse_modules_dep};
use banger_sys::Cmd;

use super::Engine;

/// Modules a `--nested` guest loads at boot (with their dependencies): KVM for both CPU
/// vendors (the other vendor's fails harmlessly) and what banger itself needs there — taps,
/// a bridge, and the nftables expressions of its NAT and isolation rules. Images with kmod
/// autoload anything else from the tree.
pub const NESTED_MODULES: &[&str] = &[
    "kvm_amd",
    "kvm_intel",
    "tun",
    "bridge",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nft_limit",
];

/// The disk's file name in the kernel dir; the suffix changes whenever its content would.
const DISK_NAME: &str = "modules-nested-v1.ext4";

impl Engine {
    /// The modules disk of the kernel whose `vmlinux` is in `kernel_dir`, built on first use.
    pub(super) async fn ensure_modules_disk(
        &self,
        kernel_name: &str,
        kernel_dir: &Path,
        release: &str,
    ) -> Result<(PathBuf, ModulesDisk), String> {
        let tree = kernel_dir.join(banger_kernel::module_tree_dir(release));
        if !tree.is_dir() {
            return Err(format!(
                "--nested needs the kernel's module tree, and kernel {kernel_name} has none ({} \
                 is missing: kernels pulled by an older banger, built or imported have only the \
                 initramfs modules); pull it again: banger kernel rm {kernel_name} && banger \
                 kernel pull {kernel_name}",
                tree.display()
            ));
        }
        let out = kernel_dir.join(DISK_NAME);
        // One build at a time, as for the initramfs: concurrent first starts would share the
        // staging dir.
        static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = BUILD.lock().await;
        if !out.is_file() {
            let staging = kernel_dir.join(format!(".{DISK_NAME}.staging"));
            let r = self
                .build_modules_disk(&tree, release, &staging, &out)
                .await;
            let _ = std::fs::remove_dir_all(&staging);
            r?;
        }
        let uuid = banger_guest::read_ext4_uuid(&out)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} is not an ext4 filesystem", out.display()))?;
        Ok((
            out,
            ModulesDisk {
                uuid,
                release: release.to_string(),
            },
        ))
    }

    async fn build_modules_disk(
        &self,
        tree: &Path,
        release: &str,
        staging: &Path,
        out: &Path,
    ) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(staging);
        let base = staging.join("root");
        let copy = base.join(banger_kernel::module_tree_dir(release));
        let (src, dst) = (tree.to_path_buf(), copy.clone());
        tokio::task::spawn_blocking(move || link_tree(&src, &dst))
            .await
            .map_err(|e| format!("modules disk task: {e}"))?
            .map_err(|e| format!("copying the module tree {}: {e}", tree.display()))?;
        let depmod = banger_sys::find_in_path("depmod").ok_or_else(|| {
            "--nested needs depmod to index the guest's modules: apt-get install kmod".to_string()
        })?;
        self.inner
            .runner
            .run(&Cmd::new(depmod).arg("-b").arg(&base).arg(release))
            .await
            .map_err(|e| format!("depmod for the modules disk: {e}"))?;
        let order = load_order(&copy)?;
        let order_path = copy.join(banger_guest::MODULES_LOAD_ORDER);
        std::fs::write(&order_path, order)
            .map_err(|e| format!("writing {}: {e}", order_path.display()))?;
        let size_mib = super::provision::dir_size(&copy) / (1 << 20) * 5 / 4 + 32;
        let image = staging.join("disk.ext4");
        let f = std::fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(size_mib << 20)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        drop(f);
        self.inner
            .runner
            .run(
                &Cmd::new("mkfs.ext4")
                    .args(["-F", "-q", "-L", "banger-modules", "-E"])
                    .arg("lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0")
                    .arg("-d")
                    .arg(&copy)
                    .arg(&image),
            )
            .await
            .map_err(|e| format!("making the modules disk: {e}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| format!("{}: {e}", image.display()))?;
        std::fs::rename(&image, out).map_err(|e| format!("{}: {e}", out.display()))
    }
}

/// The agent's load order for [`NESTED_MODULES`] from depmod's `modules.dep` in `tree`:
/// relative paths, dependencies first. Modules this kernel lacks or has built in are skipped.
pub fn load_order(tree: &Path) -> Result<String, String> {
    let read = |name: &str| {
        let p = tree.join(name);
        std::fs::read_to_string(&p).map_err(|e| format!("reading {}: {e}", p.display()))
    };
    let index = ModuleIndex {
        modules: parse_modules_dep(&read("modules.dep")?).map_err(|e| e.to_string())?,
        builtin: read("modules.builtin")
            .map(|t| parse_modules_builtin(&t))
            .unwrap_or_default(),
    };
    let wanted: Vec<&str> = NESTED_MODULES
        .iter()
        .copied()
        .filter(|m| index.modules.contains_key(*m))
        .collect();
    let resolution = index.resolve(&wanted).map_err(|e| e.to_string())?;
    let mut out = String::new();
    for name in &resolution.load_order {
        out.push_str(&index.modules[name].path);
        out.push('\n');
    }
    Ok(out)
}

/// Mirrors `src` into `dst` with hard links (a copy across filesystems); never follows or
/// creates symlinks (a pulled tree has none).
fn link_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let ty = e.file_type()?;
        let to = dst.join(e.file_name());
        if ty.is_dir() {
            link_tree(&e.path(), &to)?;
        } else if ty.is_file() && std::fs::hard_link(e.path(), &to).is_err() {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_resolves_dependencies_and_skips_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
             kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
             kernel/virt/lib/irqbypass.ko:\n\
             kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
             kernel/net/llc/llc.ko:\n",
        )
        .unwrap();
        let order = load_order(dir.path()).unwrap();
        let lines: Vec<&str> = order.lines().collect();
        let pos = |m: &str| lines.iter().position(|l| l.ends_with(m)).unwrap();
        assert!(pos("irqbypass.ko") < pos("kvm.ko"));
        assert!(pos("kvm.ko") < pos("kvm-amd.ko"));
        assert!(pos("llc.ko") < pos("stp.ko") && pos("stp.ko") < pos("bridge.ko"));
        // tun, nf_tables, kvm_intel are not in this index: skipped, not an error.
        assert_eq!(lines.len(), 6);
        assert!(banger_guest::parse_modules_load_order(&order).is_ok());
    }
}
