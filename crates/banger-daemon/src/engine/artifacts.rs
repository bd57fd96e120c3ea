//! Kernels and images the VMs boot from: import, register, list, show, delete.
//!
//! Both are copied into banger's state dir, so a VM's base can never change under it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use banger_core::{ErrorCode, ImageRecord, KernelRecord, validate_artifact_name};
use sha2::Digest;

use super::{Engine, now};
use crate::disks::sparse_copy_from;
use crate::error::{OpError, OpResult};
use crate::layout::create_private_dir;

impl Engine {
    /// Imports `dir/vmlinux` (an ELF kernel), optional `dir/initrd.img` and optional
    /// `dir/modules/` (its `load-order` and every `*.ko` listed there) as kernel `name`. Without
    /// an `initrd.img` the record has no initrd, so starts build banger's initramfs from the
    /// copied modules, as for a pulled kernel.
    pub async fn kernel_import(&self, name: &str, dir: &Path) -> OpResult<KernelRecord> {
        validate_artifact_name("kernel", name).map_err(OpError::bad_request)?;
        // Every input is opened (without blocking), checked and kept open here, then copied
        // from that fd: nothing renamed over a path afterwards is read. Off the async runtime,
        // as the reads may still be slow (a network filesystem).
        let d = dir.to_path_buf();
        let inputs = tokio::task::spawn_blocking(move || kernel_inputs(&d))
            .await
            .expect("kernel input task panicked")?;
        let src = dir.join("vmlinux");
        let has_initrd = inputs.initrd.is_some();
        let _g = self.inner.artifact_lock.lock().await;
        if self.store().get_kernel(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a kernel named {name:?} already exists (banger kernel rm {name} first)"),
            ));
        }
        let dest = self.layout().kernels_dir().join(name);
        let staging = self.layout().kernel_staging_dir(name);
        let _ = banger_sys::rmtree::remove_tree(&staging);
        let result = async {
            create_private_dir(&staging).map_err(|e| io_fail(&staging, e))?;
            copy_file(inputs.vmlinux, &src, &staging.join("vmlinux")).await?;
            if let Some(initrd) = inputs.initrd {
                copy_file(initrd, &dir.join("initrd.img"), &staging.join("initrd.img")).await?;
            }
            if let Some(m) = inputs.modules {
                let out = staging.join("modules");
                create_private_dir(&out).map_err(|e| io_fail(&out, e))?;
                let text: String = m.load_order.iter().map(|(n, _)| format!("{n}\n")).collect();
                for (name, file) in m.load_order {
                    copy_file(file, &m.dir.join(&name), &out.join(&name)).await?;
                }
                let order = out.join(banger_kernel::LOAD_ORDER);
                std::fs::write(&order, text).map_err(|e| io_fail(&order, e))?;
            }
            let vmlinux = staging.join("vmlinux");
            let (sha, version) = tokio::task::spawn_blocking(move || kernel_facts(&vmlinux))
                .await
                .expect("hash task panicked")?;
            std::fs::rename(&staging, &dest).map_err(|e| io_fail(&dest, e))?;
            let rec = KernelRecord {
                name: name.to_string(),
                vmlinux: dest.join("vmlinux"),
                initrd: has_initrd.then(|| dest.join("initrd.img")),
                version,
                sha256: sha,
                source: format!("import:{}", dir.display()),
                created_at: now(),
            };
            if let Err(e) = self.store().insert_kernel(&rec) {
                let _ = banger_sys::rmtree::remove_tree(&dest);
                return Err(e.into());
            }
            Ok(rec)
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&staging);
        result
    }

    pub async fn kernel_delete(&self, name: &str) -> OpResult<KernelRecord> {
        let _g = self.inner.artifact_lock.lock().await;
        // Creates insert their row under the create lock after checking the kernel still
        // exists, so under it the users seen here are all there are (see `create`).
        let _alloc = self.inner.create_lock.lock().await;
        let rec = self
            .store()
            .get_kernel(name)?
            .ok_or_else(|| OpError::not_found("kernel", name))?;
        let users = self.store().vms_using_kernel(name)?;
        if !users.is_empty() {
            return Err(OpError::busy(format!(
                "kernel {name} is used by VM(s) {}: delete them first",
                join_names(&users)
            )));
        }
        self.store().delete_kernel(name)?;
        let _ = banger_sys::rmtree::remove_tree(&self.layout().kernels_dir().join(name));
        Ok(rec)
    }

    /// Copies an ext4 root filesystem into banger's images dir and registers it as `name`.
    pub async fn image_register(
        &self,
        name: &str,
        rootfs: &Path,
        kernel: Option<String>,
    ) -> OpResult<ImageRecord> {
        validate_artifact_name("image", name).map_err(OpError::bad_request)?;
        let file = check_magic(
            rootfs,
            1024 + 56,
            &[0x53, 0xef],
            "an ext2/3/4 filesystem image",
        )?;
        self.register_file(name, file, rootfs, kernel).await
    }

    /// [`Self::image_register`] of an opened, checked ext4 `file` (named `rootfs` in messages).
    pub(super) async fn register_file(
        &self,
        name: &str,
        file: File,
        rootfs: &Path,
        kernel: Option<String>,
    ) -> OpResult<ImageRecord> {
        if let Some(k) = &kernel
            && self.store().get_kernel(k)?.is_none()
        {
            return Err(OpError::not_found("kernel", k));
        }
        let _g = self.inner.artifact_lock.lock().await;
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let staging = self.layout().staging_dir(name);
        let _ = banger_sys::rmtree::remove_tree(&staging);
        let result = async {
            create_private_dir(&staging).map_err(|e| io_fail(&staging, e))?;
            copy_file(file, rootfs, &staging.join("rootfs.ext4")).await?;
            make_read_only(&staging.join("rootfs.ext4"))?;
            self.publish_image(
                &staging,
                name,
                kernel,
                &format!("register:{}", rootfs.display()),
                Default::default(),
            )
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&staging);
        result
    }

    pub async fn image_delete(&self, name: &str, force: bool) -> OpResult<ImageRecord> {
        let _g = self.inner.artifact_lock.lock().await;
        // Creates insert their row under the create lock after checking the image still
        // exists, so under it the users seen here are all there are (see `create`).
        let _alloc = self.inner.create_lock.lock().await;
        let rec = self
            .store()
            .get_image(name)?
            .ok_or_else(|| OpError::not_found("image", name))?;
        let users = self.store().vms_using_image(name)?;
        if !users.is_empty() && !force {
            return Err(OpError::busy(format!(
                "image {name} is used by VM(s) {}: delete them first, or pass --force (they will not start again)",
                join_names(&users)
            )));
        }
        // Even with --force, a running VM keeps its base: its VMM has the file open and its
        // next start would fail half-way through a user's work.
        let running: Vec<_> = self
            .store()
            .list_vms()?
            .into_iter()
            .filter(|v| v.image == name && v.state.may_have_vmm())
            .map(|v| v.name)
            .collect();
        if !running.is_empty() {
            return Err(OpError::busy(format!(
                "image {name} is the base of running VM(s) {}: stop them first",
                join_names(&running)
            )));
        }
        self.store().delete_image(name)?;
        if rec.managed {
            let _ = banger_sys::rmtree::remove_tree(&self.layout().images_dir().join(name));
        }
        Ok(rec)
    }
}

/// The modules `kernel import` takes from a `modules/` dir.
/// A kernel dir's inputs, each opened and checked.
struct KernelInputs {
    vmlinux: File,
    initrd: Option<File>,
    modules: Option<ImportModules>,
}

struct ImportModules {
    dir: PathBuf,
    /// `*.ko` file names with their checked files, in load order.
    load_order: Vec<(String, File)>,
}

/// The most a `modules/load-order` may hold: a line per module, and a guest kernel needs tens
/// to a few hundred of them, so 64 KiB is ample and bounds what a hostile file costs.
const LOAD_ORDER_CAP: u64 = 64 << 10;

fn kernel_inputs(dir: &Path) -> OpResult<KernelInputs> {
    let vmlinux = check_magic(&dir.join("vmlinux"), 0, b"\x7fELF", "an ELF vmlinux")?;
    let initrd_src = dir.join("initrd.img");
    let initrd = match crate::input::open_input(&initrd_src, false) {
        Ok(crate::input::Input::File(f, _)) => Some(f),
        Ok(crate::input::Input::Dir) => unreachable!("directories are refused"),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(OpError::bad_request(e.to_string())),
    };
    let modules = import_modules(&dir.join("modules"))?;
    Ok(KernelInputs {
        vmlinux,
        initrd,
        modules,
    })
}

/// Checks `dir` (a kernel dir's `modules/`): absent is fine (a kernel with everything built in,
/// or one booting its own initrd); present, it must hold a `load-order` whose every line names
/// an uncompressed `.ko` file in it, which is what banger's initramfs loads. The `load-order`
/// and modules are regular files directly in `dir`, never symlinks (so nothing outside the tree
/// is read), and the `load-order` is at most [`LOAD_ORDER_CAP`] bytes.
fn import_modules(dir: &Path) -> OpResult<Option<ImportModules>> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_DIRECTORY: anything else (a FIFO named `modules` too) fails at once, without blocking.
    let dir_file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(dir)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(OpError::bad_request(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Err(e) => return Err(OpError::bad_request(format!("{}: {e}", dir.display()))),
    };
    let order_path = dir.join(banger_kernel::LOAD_ORDER);
    let text = match crate::input::open_regular_in(&dir_file, dir, banger_kernel::LOAD_ORDER)
        .and_then(|f| crate::input::read_file_capped(f, &order_path, LOAD_ORDER_CAP))
    {
        Ok(t) => String::from_utf8(t).map_err(|_| {
            OpError::bad_request(format!("{} is not UTF-8 text", order_path.display()))
        })?,
        Err(e) if e.is_not_found() => {
            return Err(OpError::bad_request(format!(
                "{} has no {}: list the modules to load, one .ko file name per line, dependencies first",
                dir.display(),
                banger_kernel::LOAD_ORDER
            )));
        }
        Err(e) => return Err(OpError::bad_request(e.to_string())),
    };
    let entries = banger_guest::initramfs::parse_load_order(&text).map_err(|(line, reason)| {
        OpError::bad_request(format!("{} line {line}: {reason}", order_path.display()))
    })?;
    let mut load_order: Vec<(String, File)> = Vec::with_capacity(entries.len());
    for (line, name) in entries {
        if load_order.iter().any(|(n, _)| *n == name) {
            return Err(OpError::bad_request(format!(
                "{} line {line}: {name} is listed twice",
                order_path.display()
            )));
        }
        let path = dir.join(&name);
        let file = crate::input::open_regular_in(&dir_file, dir, &name)
            .map_err(|e| OpError::bad_request(e.to_string()))?;
        has_magic(
            &file,
            &path,
            0,
            b"\x7fELF",
            "an uncompressed kernel module (.ko)",
        )?;
        load_order.push((name, file));
    }
    Ok(Some(ImportModules {
        dir: dir.to_path_buf(),
        load_order,
    }))
}

fn join_names(names: &[banger_core::VmName]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_fail(path: &Path, e: std::io::Error) -> OpError {
    OpError::failed(format!("{}: {e}", path.display()))
}

/// Opens `path` and checks it is a regular file with `magic` at `offset`; returns the file, so
/// what is then read is what was checked.
fn check_magic(path: &Path, offset: u64, magic: &[u8], what: &str) -> OpResult<File> {
    // Checked on the opened fd, opened without blocking (a FIFO would wait for a writer).
    let crate::input::Input::File(f, _) =
        crate::input::open_input(path, false).map_err(|e| OpError::bad_request(e.to_string()))?
    else {
        unreachable!("directories are refused when dir_ok is false")
    };
    has_magic(&f, path, offset, magic, what)?;
    Ok(f)
}

fn has_magic(f: &File, path: &Path, offset: u64, magic: &[u8], what: &str) -> OpResult<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; magic.len()];
    if f.read_exact_at(&mut buf, offset).is_err() || buf != magic {
        return Err(OpError::bad_request(format!(
            "{} is not {what}",
            path.display()
        )));
    }
    Ok(())
}

/// Copies the checked file `src` (named `label` in errors) to `dst`, off the async runtime.
async fn copy_file(src: File, label: &Path, dst: &Path) -> OpResult<()> {
    let (l, d): (PathBuf, PathBuf) = (label.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || sparse_copy_from(&src, &l, &d))
        .await
        .expect("copy task panicked")
        .map_err(|e| OpError::failed(e.to_string()))
}

fn make_read_only(path: &Path) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| io_fail(path, e))
}

/// sha256 of the kernel and the version from its `Linux version X ...` banner.
fn kernel_facts(path: &Path) -> OpResult<(String, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| io_fail(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut version = None;
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    const BANNER: &[u8] = b"Linux version ";
    loop {
        let n = f.read(&mut buf).map_err(|e| io_fail(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if version.is_none() {
            carry.extend_from_slice(&buf[..n]);
            if let Some(pos) = carry.windows(BANNER.len()).position(|w| w == BANNER) {
                let rest = &carry[pos + BANNER.len()..];
                if let Some(end) = rest.iter().position(|&b| b == b' ' || b == 0) {
                    version = Some(String::from_utf8_lossy(&rest[..end]).into_owned());
                }
            }
            if version.is_none() && carry.len() > 256 {
                carry.drain(..carry.len() - 256);
            }
        }
    }
    Ok((
        hex::encode(hasher.finalize()),
        version.unwrap_or_else(|| "unknown".to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_from_banner() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        let mut data = b"\x7fELF".to_vec();
        data.extend(vec![0u8; 3 << 20]);
        data.extend_from_slice(
            b"Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org)",
        );
        std::fs::write(&p, &data).unwrap();
        let (sha, version) = kernel_facts(&p).unwrap();
        assert_eq!(version, "6.1.0-28-cloud-amd64");
        assert_eq!(sha.len(), 64);
    }
}
