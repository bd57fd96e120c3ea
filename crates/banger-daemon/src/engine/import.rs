//! `image import`: an image from an ext4 file, a root filesystem directory, or a tarball of one.
//!
//! Directories and tarballs become an ext4 image with `mkfs.ext4 -d` (no mount, no loop
//! device). A tarball is unpacked first into a private scratch dir with its owners, modes and
//! xattrs kept; the tar reader refuses entries that would land outside it, and device nodes
//! are skipped (a VM's /dev is devtmpfs).

use std::path::{Path, PathBuf};

use banger_core::{ErrorCode, ImageRecord, validate_artifact_name};
use banger_kernel::compress::{Compression, decoder};

use super::Engine;
use crate::error::{OpError, OpResult};
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

impl Engine {
    pub async fn image_import(
        &self,
        name: Option<&str>,
        source: &Path,
        kernel: Option<String>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        if let Some(name) = name {
            validate_artifact_name("image", name).map_err(OpError::bad_request)?;
        }
        if let Some(k) = &kernel
            && self.store().get_kernel(k)?.is_none()
        {
            return Err(OpError::not_found("kernel", k));
        }
        let meta = std::fs::metadata(source)
            .map_err(|e| OpError::bad_request(format!("{}: {e}", source.display())))?;
        if meta.is_file() && is_bundle(source) {
            return self.import_bundle(source, name, kernel, None, ctx).await;
        }
        let Some(name) = name else {
            return Err(OpError::bad_request(format!(
                "{} is not an image bundle: give the image a name (--name)",
                source.display()
            )));
        };
        if meta.is_file() && is_ext4(source) {
            return self.image_register(name, source, kernel).await;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(OpError::failed(
                "importing a directory or tarball needs root (its files belong to many users); import an ext4 image instead",
            ));
        }
        let _g = self.inner.artifact_lock.lock().await;
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let scratch = self
            .layout()
            .build_dir()
            .join(format!("import-{name}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        create_private_dir(&scratch)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", scratch.display())))?;
        let result = async {
            let tree: PathBuf = if meta.is_dir() {
                source.to_path_buf()
            } else {
                ctx.progress
                    .stage("unpack", Some(source.display().to_string()));
                let dest = scratch.join("rootfs");
                let (src, dst) = (source.to_path_buf(), dest.clone());
                let skipped = tokio::task::spawn_blocking(move || unpack_tarball(&src, &dst))
                    .await
                    .map_err(|e| OpError::failed(format!("unpack task: {e}")))??;
                if skipped > 0 {
                    ctx.progress
                        .warn(format!("skipped {skipped} device node(s) in the tarball"));
                }
                dest
            };
            if !tree.join("etc").is_dir()
                && !tree.join("bin").exists()
                && !tree.join("usr").is_dir()
            {
                return Err(OpError::bad_request(format!(
                    "{} does not look like a root filesystem (no /etc, /bin or /usr)",
                    source.display()
                )));
            }
            let kernel = kernel.or_else(|| Some(self.config().default_kernel.clone()));
            self.image_from_tree(
                name,
                &tree,
                kernel,
                &format!("import:{}", source.display()),
                ctx,
            )
            .await
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }
}

/// Whether `path` is a zstd tar whose first entry is `manifest.json` (an `image export`
/// bundle), as opposed to a compressed root filesystem tarball.
fn is_bundle(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(dec) = zstd::Decoder::new(file) else {
        return false;
    };
    let mut archive = tar::Archive::new(dec);
    let Ok(mut entries) = archive.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(e)) if e.path().is_ok_and(|p| p.as_os_str() == "manifest.json"))
}

fn is_ext4(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 1024 + 56))
        .is_ok()
        && magic == [0x53, 0xef]
}

/// Unpacks a (possibly compressed) tarball into `dest`; returns how many device nodes were
/// skipped.
fn unpack_tarball(src: &Path, dest: &Path) -> OpResult<usize> {
    use std::io::Read;
    let bad = |msg: String| OpError::bad_request(format!("{}: {msg}", src.display()));
    let mut file = std::fs::File::open(src).map_err(|e| bad(e.to_string()))?;
    let mut head = [0u8; 6];
    let n = file.read(&mut head).map_err(|e| bad(e.to_string()))?;
    drop(file);
    let file = std::fs::File::open(src).map_err(|e| bad(e.to_string()))?;
    let reader: Box<dyn Read> = match Compression::detect(&head[..n]) {
        Some(c) => decoder(c, file, &src.display().to_string()).map_err(|e| bad(e.to_string()))?,
        None => Box::new(file),
    };
    std::fs::create_dir_all(dest).map_err(|e| bad(format!("creating {}: {e}", dest.display())))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut skipped = 0;
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("reading the archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            skipped += 1;
            continue;
        }
        // unpack_in refuses (returns false for) entries that would escape `dest`.
        let inside = entry.unpack_in(dest).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            bad(format!("unpacking {}: {e}{cause}", path.display()))
        })?;
        if !inside {
            return Err(bad(format!(
                "entry {} points outside the root filesystem",
                path.display()
            )));
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            // Bypass the builder's own path checks: the point is to feed hostile names.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpacks_a_tree_and_refuses_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.tar");
        std::fs::write(
            &good,
            tarball(&[("etc/hostname", b"x\n"), ("bin/sh", b"#!")]),
        )
        .unwrap();
        let dest = dir.path().join("out");
        assert_eq!(unpack_tarball(&good, &dest).unwrap(), 0);
        assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"x\n");

        let evil = dir.path().join("evil.tar");
        std::fs::write(&evil, tarball(&[("etc/ok", b"1"), ("../../escape", b"2")])).unwrap();
        let err = unpack_tarball(&evil, &dir.path().join("out2")).unwrap_err();
        assert!(err.message.contains("escape"), "{}", err.message);
        assert!(!dir.path().join("escape").exists());
        assert!(!dir.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn not_a_tarball_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.tar");
        std::fs::write(&junk, vec![7u8; 2048]).unwrap();
        let err = unpack_tarball(&junk, &dir.path().join("out")).unwrap_err();
        assert!(err.message.contains("junk.tar"), "{}", err.message);
    }
}
