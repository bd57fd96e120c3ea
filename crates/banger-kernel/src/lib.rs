//! banger's default guest kernel: Debian's cloud kernel, pulled from a Debian mirror.
//!
//! [`pull_debian_cloud_kernel`] resolves `linux-image-cloud-<arch>` in the mirror's signed index,
//! downloads the kernel `.deb` (verified keyring → `InRelease` → `Packages` → `.deb`), unpacks it
//! in Rust, turns the compressed `vmlinuz` into the ELF `vmlinux` Firecracker and QEMU microvm
//! boot, and extracts the modules banger's initramfs loads (virtio, vsock, overlay, ...) in
//! dependency order. Everything is blocking; the daemon calls it from `spawn_blocking`.
//!
//! [`pull_catalog_kernel`] fetches other kernels: a tarball at a URL, pinned by its SHA256 (see
//! [`catalog`]), unpacked into the same layout (plus `initrd.img` when the tarball has one).
//!
//! The result is a directory:
//!
//! ```text
//! vmlinux              ELF kernel
//! config               the kernel's build config
//! modules/<name>.ko    uncompressed modules
//! modules/load-order   one file name per line, dependencies first
//! manifest.json        PulledKernel, paths relative to the directory
//! ```

pub mod build;
pub mod bzimage;
pub mod catalog;
pub mod compress;
pub mod deb;
pub mod deb822;
mod error;
pub mod mirror;
pub mod modules;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use build::{DEFAULT_FRAGMENT, Fragment, build_kernel, check_build_tools, config_hash};
pub use catalog::{CatalogEntry, pull_catalog_kernel};
pub use compress::Compression;
pub use error::KernelError;
pub use mirror::{DebianMirror, KernelPackage};
pub use modules::INITRAMFS_MODULES;

/// The file name of the manifest inside a kernel directory.
pub const MANIFEST: &str = "manifest.json";
/// The file listing modules in load order, inside `modules/`.
pub const LOAD_ORDER: &str = "load-order";

/// Largest `vmlinuz` or config accepted from a package.
const MAX_BOOT_FILE: u64 = 256 << 20;
/// Largest total of module bytes written while unpacking (Debian's are ~100 MiB).
const MAX_MODULE_BYTES: u64 = 4 << 30;

/// A pulled kernel, as returned by [`pull_debian_cloud_kernel`] and stored in `manifest.json`.
///
/// In the manifest file, paths are relative to the kernel directory (so it can be moved);
/// [`read_manifest`] and [`pull_debian_cloud_kernel`] return them joined onto the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledKernel {
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64`.
    pub version: String,
    /// Debian package the kernel came from.
    pub package: String,
    pub package_version: String,
    pub vmlinux: PathBuf,
    pub vmlinux_sha256: String,
    pub deb_sha256: String,
    /// Modules to load, in load order.
    pub modules: Vec<PathBuf>,
    /// URL of the `.deb`.
    pub source_url: String,
    /// The kernel's build config.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Modules of [`INITRAMFS_MODULES`] built into this kernel (nothing to load for them).
    #[serde(default)]
    pub built_in: Vec<String>,
    /// Compression of the payload inside `vmlinuz`.
    #[serde(default)]
    pub vmlinuz_compression: Option<Compression>,
    #[serde(default)]
    pub suite: Option<String>,
    /// Whether the kernel takes `virtio_mmio.device=` on its command line
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). Debian's cloud kernel does not: its virtio-mmio
    /// devices must be described by ACPI (QEMU microvm's default, Firecracker >= 1.8).
    #[serde(default)]
    pub virtio_mmio_cmdline_devices: Option<bool>,
    /// An initrd shipped with the kernel (catalog tarballs may hold `initrd.img`); `None` means
    /// banger builds its own initramfs from `modules/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
}

/// The value of `name` (e.g. `CONFIG_EXT4_FS`) in a kernel `.config`: `Some("y")`, `Some("m")`,
/// a string or number, or `None` when unset (`# CONFIG_X is not set`) or absent.
pub fn config_option<'a>(config: &'a str, name: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// A step of a pull, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullStage {
    /// Fetching and verifying a suite's InRelease.
    Release,
    /// Downloading a Packages index.
    Packages,
    /// Picking the kernel package.
    Resolve,
    /// Downloading the kernel `.deb`.
    Download,
    /// Unpacking the `.deb`.
    Extract,
    /// Decompressing `vmlinuz` to `vmlinux`.
    Vmlinux,
    /// Selecting modules.
    Modules,
    /// Configuring a kernel build (`kernel build`).
    Configure,
    /// Compiling a kernel (`kernel build`); details are make's output lines.
    Build,
    /// Writing the manifest and moving the directory into place.
    Finish,
}

impl PullStage {
    pub fn as_str(self) -> &'static str {
        match self {
            PullStage::Release => "release",
            PullStage::Packages => "packages",
            PullStage::Resolve => "resolve",
            PullStage::Download => "download",
            PullStage::Extract => "extract",
            PullStage::Vmlinux => "vmlinux",
            PullStage::Modules => "modules",
            PullStage::Configure => "configure",
            PullStage::Build => "build",
            PullStage::Finish => "finish",
        }
    }
}

/// Progress of a pull: stage changes, and byte counts during downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullProgress {
    Stage {
        stage: PullStage,
        detail: String,
    },
    Download {
        stage: PullStage,
        url: String,
        done: u64,
        total: u64,
    },
}

/// The staging directory used for `dest`: a sibling (same filesystem, so the final rename is
/// atomic) named `<dest>.staging`. Appended rather than `with_extension`, which would cut names
/// such as `debian-6.1-cloud` at the dot.
pub fn staging_dir(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".staging");
    PathBuf::from(s)
}

/// Pulls Debian's cloud kernel into `dest`, which must not exist. Work happens in
/// [`staging_dir`]`(dest)` (a stale one from a crashed pull is removed first) and is renamed to
/// `dest` only when complete; on any error the staging directory is removed.
pub fn pull_debian_cloud_kernel(
    mirror: &DebianMirror,
    dest: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    pull_staged(dest, |staging| pull_into(mirror, staging, progress))
}

/// Runs `work` in a fresh [`staging_dir`]`(dest)` (a stale one is removed first) and renames it
/// to `dest` when `work` succeeded; on any error the staging directory is removed. `work` returns
/// the manifest with relative paths; the result has them joined onto `dest`.
pub(crate) fn pull_staged(
    dest: &Path,
    work: impl FnOnce(&Path) -> Result<PulledKernel, KernelError>,
) -> Result<PulledKernel, KernelError> {
    if dest.exists() {
        return Err(KernelError::AlreadyExists {
            path: dest.to_path_buf(),
        });
    }
    let staging = staging_dir(dest);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(KernelError::io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(KernelError::io(&staging))?;
    let result = work(&staging).and_then(|manifest| {
        std::fs::rename(&staging, dest).map_err(KernelError::io(dest))?;
        Ok(absolute(manifest, dest))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Reads `dir/manifest.json`, returning paths joined onto `dir`.
pub fn read_manifest(dir: &Path) -> Result<PulledKernel, KernelError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(KernelError::io(&path))?;
    let manifest: PulledKernel =
        serde_json::from_str(&text).map_err(|e| KernelError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
    Ok(absolute(manifest, dir))
}

fn absolute(mut k: PulledKernel, dir: &Path) -> PulledKernel {
    k.vmlinux = dir.join(&k.vmlinux);
    k.config = k.config.map(|c| dir.join(c));
    k.initrd = k.initrd.map(|i| dir.join(i));
    k.modules = k.modules.iter().map(|m| dir.join(m)).collect();
    k
}

pub(crate) fn stage(
    progress: &mut dyn FnMut(PullProgress),
    stage: PullStage,
    detail: impl Into<String>,
) {
    progress(PullProgress::Stage {
        stage,
        detail: detail.into(),
    });
}

/// Downloads `pkg`'s .deb to `dest` (size and SHA256 checked against the signed index),
/// reporting the stage and byte counts; returns its URL.
pub(crate) fn download_package(
    mirror: &DebianMirror,
    pkg: &KernelPackage,
    dest: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<String, KernelError> {
    let url = mirror.url(&pkg.filename);
    stage(
        progress,
        PullStage::Download,
        format!(
            "{} {} ({} bytes)",
            pkg.package, pkg.package_version, pkg.size
        ),
    );
    mirror.download_verified(
        &pkg.filename,
        pkg.size,
        &pkg.sha256,
        dest,
        &mut |done, total| {
            progress(PullProgress::Download {
                stage: PullStage::Download,
                url: url.clone(),
                done,
                total,
            })
        },
    )?;
    Ok(url)
}

/// Does the whole pull inside `staging`; returns the manifest (relative paths), already written.
fn pull_into(
    mirror: &DebianMirror,
    staging: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    let work = staging.join(".work");
    std::fs::create_dir_all(&work).map_err(KernelError::io(&work))?;

    let pkg = mirror.resolve_cloud_kernel(&work, progress)?;
    let deb = work.join("kernel.deb");
    let url = download_package(mirror, &pkg, &deb, progress)?;

    stage(progress, PullStage::Extract, deb.display().to_string());
    let unpacked = unpack_kernel_deb(&deb, &pkg.kernel_release, staging, &work.join("modules"))?;

    stage(
        progress,
        PullStage::Vmlinux,
        format!("vmlinuz-{}", pkg.kernel_release),
    );
    let what = format!("{url}:boot/vmlinuz-{}", pkg.kernel_release);
    let vmlinux = bzimage::extract_vmlinux(&unpacked.vmlinuz, &what)?;
    let vmlinux_path = staging.join("vmlinux");
    std::fs::write(&vmlinux_path, &vmlinux.elf).map_err(KernelError::io(&vmlinux_path))?;
    let vmlinux_sha256 = hex::encode(Sha256::digest(&vmlinux.elf));

    stage(progress, PullStage::Modules, INITRAMFS_MODULES.join(" "));
    let (modules, built_in) = install_modules(&unpacked, &pkg.kernel_release, staging)?;
    install_module_tree(unpacked, &pkg.kernel_release, staging)?;

    let config_path = staging.join("config");
    let config = std::fs::read_to_string(&config_path).map_err(KernelError::io(&config_path))?;
    let virtio_mmio_cmdline_devices =
        config_option(&config, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == Some("y");

    stage(progress, PullStage::Finish, String::new());
    std::fs::remove_dir_all(&work).map_err(KernelError::io(&work))?;
    let manifest = PulledKernel {
        version: pkg.kernel_release.clone(),
        package: pkg.package.clone(),
        package_version: pkg.package_version.clone(),
        vmlinux: PathBuf::from("vmlinux"),
        vmlinux_sha256,
        deb_sha256: pkg.sha256.clone(),
        modules,
        source_url: url,
        config: Some(PathBuf::from("config")),
        built_in,
        vmlinuz_compression: Some(vmlinux.compression),
        suite: Some(pkg.suite.clone()),
        virtio_mmio_cmdline_devices: Some(virtio_mmio_cmdline_devices),
        initrd: None,
    };
    write_manifest(staging, &manifest)?;
    Ok(manifest)
}

/// Writes `dir/manifest.json` via a temporary file and a rename.
pub fn write_manifest(dir: &Path, manifest: &PulledKernel) -> Result<(), KernelError> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| KernelError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&tmp, json).map_err(KernelError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(KernelError::io(&path))
}

/// What [`unpack_kernel_deb`] found in a kernel package.
#[derive(Debug, Default)]
pub struct UnpackedKernel {
    pub vmlinuz: Vec<u8>,
    pub modules_dep: Option<String>,
    pub modules_builtin: Option<String>,
    /// Module name → (plain `.ko` written below the scratch dir, its `.modinfo`, path below
    /// `lib/modules/<release>/` as in the package).
    pub modules: BTreeMap<String, (PathBuf, modules::ModInfo, String)>,
}

/// Unpacks the parts of a kernel `.deb` banger uses: `boot/vmlinuz-<release>` (into memory),
/// `boot/config-<release>` (to `out/config`), `modules.dep` / `modules.builtin`, and every module
/// below `lib/modules/<release>/` (or `usr/lib/modules/...`), decompressed to `scratch`.
pub fn unpack_kernel_deb(
    deb: &Path,
    release: &str,
    out: &Path,
    scratch: &Path,
) -> Result<UnpackedKernel, KernelError> {
    let vmlinuz = PathBuf::from(format!("boot/vmlinuz-{release}"));
    let config = PathBuf::from(format!("boot/config-{release}"));
    let module_dirs = [
        PathBuf::from(format!("lib/modules/{release}")),
        PathBuf::from(format!("usr/lib/modules/{release}")),
    ];
    let below_modules = |p: &Path| -> Option<String> {
        module_dirs
            .iter()
            .find_map(|d| p.strip_prefix(d).ok())
            .and_then(|r| r.to_str())
            .map(str::to_string)
    };
    let mut found = UnpackedKernel::default();
    let mut saw_config = false;
    let mut module_bytes = 0u64;
    let deb_name = deb.display().to_string();
    let read_limited = |r: &mut dyn Read, what: &Path| -> Result<Vec<u8>, KernelError> {
        let mut v = Vec::new();
        r.take(MAX_BOOT_FILE + 1)
            .read_to_end(&mut v)
            .map_err(|e| KernelError::Archive {
                path: format!("{deb_name}:{}", what.display()),
                message: e.to_string(),
            })?;
        if v.len() as u64 > MAX_BOOT_FILE {
            return Err(KernelError::Archive {
                path: format!("{deb_name}:{}", what.display()),
                message: format!("larger than {MAX_BOOT_FILE} bytes"),
            });
        }
        Ok(v)
    };
    deb::for_each_data_file(
        deb,
        |p| {
            let wanted = p == vmlinuz
                || p == config
                || below_modules(p).is_some_and(|r| {
                    r == "modules.dep" || r == "modules.builtin" || modules::is_module_file(&r)
                });
            if wanted {
                deb::Disposition::Extract
            } else {
                deb::Disposition::Skip
            }
        },
        |p, r| {
            let data = read_limited(r, p)?;
            if p == vmlinuz {
                found.vmlinuz = data;
            } else if p == config {
                let dest = out.join("config");
                std::fs::write(&dest, &data).map_err(KernelError::io(&dest))?;
                saw_config = true;
            } else if let Some(rel) = below_modules(p) {
                let text = || String::from_utf8_lossy(&data).into_owned();
                match rel.as_str() {
                    "modules.dep" => found.modules_dep = Some(text()),
                    "modules.builtin" => found.modules_builtin = Some(text()),
                    _ => {
                        let what = format!("{deb_name}:{}", p.display());
                        let elf = modules::decompress_module(&what, data)?;
                        module_bytes += elf.len() as u64;
                        if module_bytes > MAX_MODULE_BYTES {
                            return Err(KernelError::Archive {
                                path: deb_name.clone(),
                                message: format!("modules exceed {MAX_MODULE_BYTES} bytes"),
                            });
                        }
                        let info = modules::ModInfo::from_elf(&elf, &what)?;
                        let name = info
                            .name
                            .clone()
                            .unwrap_or_else(|| modules::module_name_from_path(&rel));
                        let file = scratch.join(format!("{}.ko", found.modules.len()));
                        std::fs::create_dir_all(scratch).map_err(KernelError::io(scratch))?;
                        std::fs::write(&file, &elf).map_err(KernelError::io(&file))?;
                        found.modules.insert(name, (file, info, rel));
                    }
                }
            }
            Ok(())
        },
    )?;
    let missing = |f: &Path| KernelError::Archive {
        path: deb_name.clone(),
        message: format!("has no {}", f.display()),
    };
    if found.vmlinuz.is_empty() {
        return Err(missing(&vmlinuz));
    }
    if !saw_config {
        return Err(missing(&config));
    }
    Ok(found)
}

/// Resolves [`INITRAMFS_MODULES`] against the unpacked package and copies the modules to load
/// into `out/modules/`, writing `load-order`. Returns the module paths (relative to `out`) and
/// the wanted modules that are built in.
pub fn install_modules(
    unpacked: &UnpackedKernel,
    release: &str,
    out: &Path,
) -> Result<(Vec<PathBuf>, Vec<String>), KernelError> {
    let builtin = unpacked
        .modules_builtin
        .as_deref()
        .map(modules::parse_modules_builtin)
        .unwrap_or_default();
    let index = match &unpacked.modules_dep {
        // depmod's view, when the package has one; module files are matched by name.
        Some(dep) => modules::ModuleIndex {
            modules: modules::parse_modules_dep(dep)?,
            builtin,
        },
        None => modules::ModuleIndex {
            modules: unpacked
                .modules
                .iter()
                .map(|(name, (_, info, rel))| {
                    (
                        name.clone(),
                        modules::ModuleEntry {
                            path: rel.clone(),
                            depends: info.depends.clone(),
                        },
                    )
                })
                .collect(),
            builtin,
        },
    };
    let mut wanted: Vec<&str> = INITRAMFS_MODULES.to_vec();
    wanted.extend(
        modules::OPTIONAL_INITRAMFS_MODULES
            .iter()
            .filter(|m| index.modules.contains_key(**m) || index.builtin.contains(**m)),
    );
    let resolution = index.resolve(&wanted)?;
    let dir = out.join("modules");
    std::fs::create_dir_all(&dir).map_err(KernelError::io(&dir))?;
    let mut paths = Vec::new();
    let mut order = String::new();
    for name in &resolution.load_order {
        let (file, info, _) = unpacked
            .modules
            .get(name)
            .ok_or_else(|| KernelError::Module {
                module: name.clone(),
                message: "listed in modules.dep but not in the package".into(),
            })?;
        // A module built for another kernel would be refused by finit_module at boot; say so now.
        let vermagic = info.vermagic.as_deref().unwrap_or_default();
        if vermagic.split_whitespace().next() != Some(release) {
            return Err(KernelError::Module {
                module: name.clone(),
                message: format!("vermagic {vermagic:?} is not for kernel {release}"),
            });
        }
        let file_name = format!("{name}.ko");
        let dest = dir.join(&file_name);
        std::fs::copy(file, &dest).map_err(KernelError::io(&dest))?;
        paths.push(PathBuf::from("modules").join(&file_name));
        order.push_str(&file_name);
        order.push('\n');
    }
    let order_path = dir.join(LOAD_ORDER);
    std::fs::write(&order_path, order).map_err(KernelError::io(&order_path))?;
    Ok((paths, resolution.built_in))
}

/// Where [`install_module_tree`] puts the kernel's whole module tree, relative to the kernel
/// directory: `lib/modules/<release>`, the layout depmod and modprobe expect below a root.
pub fn module_tree_dir(release: &str) -> PathBuf {
    PathBuf::from("lib/modules").join(release)
}

/// Keeps every module of the package (uncompressed, at its path below `lib/modules/<release>/`
/// with a plain `.ko` name) and `modules.builtin`, in `out/lib/modules/<release>/`: guests
/// started with `--nested` get this tree (kvm, tun, bridge, nf_tables, ...) on a read-only disk,
/// so banger, QEMU or modprobe can run inside them. Moves the unpacked files (no copy).
pub fn install_module_tree(
    unpacked: UnpackedKernel,
    release: &str,
    out: &Path,
) -> Result<PathBuf, KernelError> {
    let rel_dir = module_tree_dir(release);
    let tree = out.join(&rel_dir);
    std::fs::create_dir_all(&tree).map_err(KernelError::io(&tree))?;
    for (file, _, rel) in unpacked.modules.into_values() {
        // `rel` comes from an archive path already checked for `..` and absolute components.
        let plain = rel
            .strip_suffix(".xz")
            .or_else(|| rel.strip_suffix(".zst"))
            .or_else(|| rel.strip_suffix(".gz"))
            .unwrap_or(&rel);
        let dest = tree.join(plain);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(KernelError::io(parent))?;
        }
        std::fs::rename(&file, &dest).map_err(KernelError::io(&dest))?;
    }
    if let Some(builtin) = &unpacked.modules_builtin {
        let path = tree.join("modules.builtin");
        std::fs::write(&path, builtin).map_err(KernelError::io(&path))?;
    }
    Ok(rel_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deb::tests::{ar_archive, tarball};
    use crate::modules::tests::fake_module;

    const REL: &str = "6.1.0-99-cloud-amd64";

    fn vermagic() -> String {
        format!("vermagic={REL} SMP preempt mod_unload modversions ")
    }

    fn fake_vmlinuz() -> Vec<u8> {
        let mut elf = vec![0u8; 70_000];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        // No setup header: exercises the magic scan on a plain concatenation.
        let mut img = vec![0u8; 2048];
        img.extend(crate::compress::tests::compress(Compression::Gzip, &elf));
        img
    }

    fn fake_deb(dir: &Path, with_dep_file: bool) -> PathBuf {
        let vm = vermagic();
        let virtio = fake_module(&["name=virtio", "depends=", &vm]);
        let ring = fake_module(&["name=virtio_ring", "depends=virtio", &vm]);
        let mmio = fake_module(&["name=virtio_mmio", "depends=virtio,virtio_ring", &vm]);
        let blk = fake_module(&["name=virtio_blk", "depends=virtio,virtio_ring", &vm]);
        let net = fake_module(&[
            "name=virtio_net",
            "depends=virtio,virtio_ring,net_failover",
            &vm,
        ]);
        let failover = fake_module(&["name=net_failover", "depends=", &vm]);
        let rng = fake_module(&["name=virtio_rng", "depends=virtio,virtio_ring", &vm]);
        let overlay = fake_module(&["name=overlay", "depends=", &vm]);
        let vsock = fake_module(&["name=vsock", "depends=", &vm]);
        let common = fake_module(&[
            "name=vmw_vsock_virtio_transport_common",
            "depends=vsock",
            &vm,
        ]);
        let transport = fake_module(&[
            "name=vmw_vsock_virtio_transport",
            "depends=vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock",
            &vm,
        ]);
        let unrelated = fake_module(&["name=e1000", "depends=", &vm]);
        let overlay_zst = crate::compress::tests::compress(Compression::Zstd, &overlay);
        let vmlinuz = fake_vmlinuz();
        let m = format!("./lib/modules/{REL}");
        let p = |s: &str| format!("{m}/{s}");
        let names = [
            (format!("./boot/vmlinuz-{REL}"), vmlinuz),
            (
                format!("./boot/config-{REL}"),
                b"CONFIG_EXT4_FS=y\n".to_vec(),
            ),
            (
                p("modules.builtin"),
                b"kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n".to_vec(),
            ),
            (p("kernel/drivers/virtio/virtio.ko"), virtio),
            (p("kernel/drivers/virtio/virtio_ring.ko"), ring),
            (p("kernel/drivers/virtio/virtio_mmio.ko"), mmio),
            (p("kernel/drivers/block/virtio_blk.ko"), blk),
            (p("kernel/drivers/net/virtio_net.ko"), net),
            (p("kernel/drivers/net/net_failover.ko"), failover),
            (p("kernel/drivers/char/hw_random/virtio-rng.ko"), rng),
            (p("kernel/fs/overlayfs/overlay.ko.zst"), overlay_zst),
            (p("kernel/net/vmw_vsock/vsock.ko"), vsock),
            (
                p("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko"),
                common,
            ),
            (
                p("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"),
                transport,
            ),
            (p("kernel/drivers/net/e1000.ko"), unrelated),
        ];
        let mut files: Vec<(&str, &[u8])> = names
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        // A modules.dep that disagrees with modinfo, to show which one wins.
        let dep = "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n\
            kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko\n\
            kernel/drivers/block/virtio_blk.ko:\nkernel/drivers/net/virtio_net.ko:\n\
            kernel/drivers/char/hw_random/virtio-rng.ko:\nkernel/fs/overlayfs/overlay.ko.zst:\n\
            kernel/net/vmw_vsock/vsock.ko:\nkernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vsock.ko\n";
        let dep_path = p("modules.dep");
        if with_dep_file {
            files.push((&dep_path, dep.as_bytes()));
        }
        let tar = tarball(&files);
        let data = crate::compress::tests::compress(Compression::Xz, &tar);
        let path = dir.join("k.deb");
        std::fs::write(
            &path,
            ar_archive(&[("debian-binary", b"2.0\n"), ("data.tar.xz", &data)]),
        )
        .unwrap();
        path
    }

    #[test]
    fn deb_to_kernel_dir_without_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_deb(dir.path(), false);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let u = unpack_kernel_deb(&deb, REL, &out, &dir.path().join("scratch")).unwrap();
        assert!(bzimage::extract_vmlinux(&u.vmlinuz, "v").is_ok());
        assert_eq!(
            std::fs::read_to_string(out.join("config")).unwrap(),
            "CONFIG_EXT4_FS=y\n"
        );
        assert_eq!(u.modules.len(), 12);
        let (paths, built_in) = install_modules(&u, REL, &out).unwrap();
        assert_eq!(built_in, ["ext4"]);
        let order = std::fs::read_to_string(out.join("modules/load-order")).unwrap();
        let order: Vec<&str> = order.lines().collect();
        assert_eq!(order.len(), paths.len());
        assert!(!order.contains(&"e1000.ko"));
        let pos = |m: &str| {
            order
                .iter()
                .position(|x| *x == m)
                .unwrap_or_else(|| panic!("{m}"))
        };
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert!(pos("virtio.ko") < pos("virtio_ring.ko"));
        assert!(pos("vsock.ko") < pos("vmw_vsock_virtio_transport_common.ko"));
        assert!(pos("vmw_vsock_virtio_transport_common.ko") < pos("vmw_vsock_virtio_transport.ko"));
        // The .ko.zst arrived as a plain ELF.
        let overlay = std::fs::read(out.join("modules/overlay.ko")).unwrap();
        assert!(overlay.starts_with(b"\x7fELF"));
        assert!(pos("virtio_rng.ko") > pos("virtio_ring.ko"));
    }

    #[test]
    fn whole_module_tree_is_kept_for_nested_guests() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_deb(dir.path(), false);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let u = unpack_kernel_deb(&deb, REL, &out, &dir.path().join("scratch")).unwrap();
        install_modules(&u, REL, &out).unwrap();
        let rel = install_module_tree(u, REL, &out).unwrap();
        assert_eq!(rel, Path::new("lib/modules").join(REL));
        let tree = out.join(rel);
        // Modules not wanted by the initramfs are kept too, and a compressed one as a plain ELF
        // at its package path without the compression suffix.
        assert!(tree.join("kernel/drivers/net/e1000.ko").is_file());
        let overlay = std::fs::read(tree.join("kernel/fs/overlayfs/overlay.ko")).unwrap();
        assert!(overlay.starts_with(b"\x7fELF"));
        assert!(!tree.join("kernel/fs/overlayfs/overlay.ko.zst").exists());
        assert!(tree.join("modules.builtin").is_file());
        // The initramfs copy is independent of the tree.
        assert!(out.join("modules/overlay.ko").is_file());
    }

    #[test]
    fn modules_dep_wins_over_modinfo_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_deb(dir.path(), true);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let u = unpack_kernel_deb(&deb, REL, &out, &dir.path().join("scratch")).unwrap();
        let (paths, _) = install_modules(&u, REL, &out).unwrap();
        // modules.dep gives virtio_net no dependencies, so net_failover is not pulled in.
        assert!(
            !paths.iter().any(|p| p.ends_with("net_failover.ko")),
            "{paths:?}"
        );
        assert!(paths.iter().any(|p| p.ends_with("virtio_net.ko")));
    }

    #[test]
    fn modules_for_another_kernel_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_deb(dir.path(), false);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut u = unpack_kernel_deb(&deb, REL, &out, &dir.path().join("scratch")).unwrap();
        u.modules.get_mut("vsock").unwrap().1.vermagic = Some("6.1.0-1-amd64 SMP".into());
        let e = install_modules(&u, REL, &out).unwrap_err();
        assert!(
            e.to_string().contains("module vsock") && e.to_string().contains("vermagic"),
            "{e}"
        );
    }

    #[test]
    fn wrong_release_finds_no_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_deb(dir.path(), false);
        let e = unpack_kernel_deb(
            &deb,
            "6.1.0-1-cloud-amd64",
            dir.path(),
            &dir.path().join("s"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("has no boot/vmlinuz-6.1.0-1-cloud-amd64"),
            "{e}"
        );
    }

    #[test]
    fn manifest_round_trips_with_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let m = PulledKernel {
            version: REL.into(),
            package: format!("linux-image-{REL}"),
            package_version: "6.1.1-1".into(),
            vmlinux: "vmlinux".into(),
            vmlinux_sha256: "a".repeat(64),
            deb_sha256: "b".repeat(64),
            modules: vec!["modules/virtio.ko".into()],
            source_url: "http://deb.debian.org/debian/pool/x.deb".into(),
            config: Some("config".into()),
            built_in: vec!["ext4".into()],
            vmlinuz_compression: Some(Compression::Lz4Legacy),
            suite: Some("bookworm".into()),
            virtio_mmio_cmdline_devices: Some(false),
            initrd: None,
        };
        write_manifest(dir.path(), &m).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        assert!(text.contains("\"vmlinux\": \"vmlinux\""), "{text}");
        assert!(text.contains("\"lz4legacy\""), "{text}");
        let back = read_manifest(dir.path()).unwrap();
        assert_eq!(back.vmlinux, dir.path().join("vmlinux"));
        assert_eq!(back.modules, [dir.path().join("modules/virtio.ko")]);
        assert_eq!(back.version, m.version);
        std::fs::write(dir.path().join(MANIFEST), "{").unwrap();
        let e = read_manifest(dir.path()).unwrap_err();
        assert!(e.to_string().contains("manifest.json"), "{e}");
    }

    #[test]
    fn existing_dest_is_refused_and_staging_name_keeps_dots() {
        let dir = tempfile::tempdir().unwrap();
        let e = pull_debian_cloud_kernel(&DebianMirror::default(), dir.path(), &mut |_| {})
            .unwrap_err();
        assert!(matches!(e, KernelError::AlreadyExists { .. }), "{e}");
        assert_eq!(
            staging_dir(Path::new("/k/debian-6.1-cloud")),
            Path::new("/k/debian-6.1-cloud.staging")
        );
    }

    #[test]
    fn failed_pull_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("debian-6.1-cloud");
        // Nothing listens on port 9 of localhost: the pull fails at the first request.
        let mirror = DebianMirror {
            base_url: "http://127.0.0.1:9/debian".into(),
            ..DebianMirror::default()
        };
        std::fs::create_dir(staging_dir(&dest)).unwrap();
        std::fs::write(staging_dir(&dest).join("stale"), "x").unwrap();
        let e = pull_debian_cloud_kernel(&mirror, &dest, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::Http { .. }
                    | KernelError::MissingProgram { .. }
                    | KernelError::MissingKeyring { .. }
            ),
            "{e}"
        );
        assert!(!dest.exists());
        assert!(!staging_dir(&dest).exists());
    }

    #[test]
    fn config_options_are_looked_up() {
        let cfg = "CONFIG_EXT4_FS=y\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n\
                   CONFIG_VIRTIO_MMIO=m\nCONFIG_LOCALVERSION=\"\"\nCONFIG_EXT4_FS_SECURITY=y\n";
        assert_eq!(config_option(cfg, "CONFIG_EXT4_FS"), Some("y"));
        assert_eq!(config_option(cfg, "CONFIG_VIRTIO_MMIO"), Some("m"));
        assert_eq!(config_option(cfg, "CONFIG_LOCALVERSION"), Some("\"\""));
        assert_eq!(
            config_option(cfg, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
            None
        );
        assert_eq!(config_option(cfg, "CONFIG_EXT4"), None);
    }

    #[test]
    fn progress_events_serialize_for_the_protocol() {
        let p = PullProgress::Download {
            stage: PullStage::Download,
            url: "u".into(),
            done: 1,
            total: 2,
        };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"event":"download","stage":"download","url":"u","done":1,"total":2}"#
        );
    }
}
