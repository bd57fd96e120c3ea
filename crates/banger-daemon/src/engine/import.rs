//! `image import`: an image from a bundle (`image export`), an ext4 file, a root filesystem
//! directory, or a tarball of one.
//!
//! Directories become an ext4 image with `mkfs.ext4 -d` (no mount, no loop device). A tarball
//! is treated as a one-layer image: the same hardened flattener as registry pulls
//! (`banger-rootfs`) keeps owners, modes and xattrs without root, refuses entries that would
//! land outside the image naming them, and skips device nodes (a VM's /dev is devtmpfs).

use std::path::Path;

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
        // Never a FIFO (opening one waits for a writer forever), a device (/dev/zero is an
        // endless "tarball") or an empty file: only a regular file with content, or a directory.
        // The checked fd is kept for the whole import and every read goes through it (its
        // `/proc/self/fd` path reopens that inode): a FIFO or another file renamed over
        // `source` after the check is never opened.
        let (file, file_len) = match crate::input::open_input(source, true)
            .map_err(|e| OpError::bad_request(e.to_string()))?
        {
            crate::input::Input::File(f, meta) => (Some(f), Some(meta.len())),
            crate::input::Input::Dir => (None, None),
        };
        let fd_src = file.as_ref().map(crate::input::fd_path);
        let src = fd_src.as_deref().unwrap_or(source);
        if file_len == Some(0) {
            return Err(OpError::bad_request(format!(
                "{} is empty: not an image bundle, an ext4 image or a root filesystem tarball",
                source.display()
            )));
        }
        let is_file = file_len.is_some();
        if is_file && is_bundle(src) {
            return self
                .import_bundle(source, src, name, kernel, None, ctx)
                .await;
        }
        let Some(name) = name else {
            return Err(OpError::bad_request(format!(
                "{} is not an image bundle: give the image a name (--name)",
                source.display()
            )));
        };
        if let Some(file) = file.as_ref().filter(|_| is_ext4(src)) {
            if let Some(problem) = ext4_problem(src, file_len.unwrap_or(0)) {
                return Err(OpError::bad_request(format!(
                    "{}: {problem}",
                    source.display()
                )));
            }
            let file = file
                .try_clone()
                .map_err(|e| OpError::failed(format!("{}: {e}", source.display())))?;
            return self.register_file(name, file, source, kernel).await;
        }
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let kernel = kernel.or_else(|| Some(self.config().default_kernel.clone()));
        let source_label = format!("import:{}", source.display());
        if !is_file {
            if !source.join("etc").is_dir()
                && !source.join("bin").exists()
                && !source.join("usr").is_dir()
            {
                return Err(OpError::bad_request(format!(
                    "{} does not look like a root filesystem (no /etc, /bin or /usr)",
                    source.display()
                )));
            }
            // mkfs.ext4 -d records each file's owner and mode as it finds them; no root needed
            // beyond being able to read the tree.
            let _g = self.inner.artifact_lock.lock().await;
            return self
                .image_from_tree(name, source, kernel, &source_label, ctx)
                .await;
        }
        // A tarball is one layer: the same hardened flattener as registry pulls, so no root
        // and no unpacking outside a private scratch dir.
        let scratch = self
            .layout()
            .build_dir()
            .join(format!("import-{name}.{}", std::process::id()));
        let _ = banger_sys::rmtree::remove_tree(&scratch);
        create_private_dir(&scratch)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", scratch.display())))?;
        let result = async {
            let layer = tarball_layer(src, source, &scratch, ctx).await?;
            check_rootfs_tar(&layer, source).await?;
            let mut meta = banger_core::ImageMeta::default();
            self.image_from_layers(name, vec![layer], &mut meta, kernel, &source_label, ctx)
                .await
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&scratch);
        result
    }
}

/// The tarball as a layer the flattener reads: gzip, zstd and plain tars as they are; other
/// compressions (xz, bzip2, lzma) decompressed into `scratch` first.
/// `src` is read, `source` names it in messages.
async fn tarball_layer(
    src: &Path,
    source: &Path,
    scratch: &Path,
    ctx: &OpCtx<'_>,
) -> OpResult<banger_rootfs::Layer> {
    use std::io::Read;
    let bad = |msg: String| OpError::bad_request(format!("{}: {msg}", source.display()));
    let mut head = [0u8; 6];
    let n = std::fs::File::open(src)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| bad(e.to_string()))?;
    let label = source.display().to_string();
    let compression = match Compression::detect(&head[..n]) {
        None => banger_rootfs::LayerCompression::None,
        Some(Compression::Gzip) => banger_rootfs::LayerCompression::Gzip,
        Some(Compression::Zstd) => banger_rootfs::LayerCompression::Zstd,
        Some(other) => {
            ctx.progress
                .stage("decompress", Some(format!("{other:?} {label}")));
            let (s, out) = (src.to_path_buf(), scratch.join("layer.tar"));
            let (out2, label2) = (out.clone(), label.clone());
            tokio::task::spawn_blocking(move || -> OpResult<()> {
                let bad = |msg: String| OpError::bad_request(format!("{label2}: {msg}"));
                let file = std::fs::File::open(&s).map_err(|e| bad(e.to_string()))?;
                let mut r = decoder(other, file, &label2).map_err(|e| bad(e.to_string()))?;
                let mut w = std::fs::File::create(&out2)
                    .map_err(|e| OpError::failed(format!("{}: {e}", out2.display())))?;
                std::io::copy(&mut r, &mut w).map_err(|e| bad(format!("decompressing: {e}")))?;
                Ok(())
            })
            .await
            .map_err(|e| OpError::failed(format!("decompress task: {e}")))??;
            return Ok(banger_rootfs::Layer {
                path: out,
                compression: banger_rootfs::LayerCompression::None,
                label,
            });
        }
    };
    Ok(banger_rootfs::Layer {
        path: src.to_path_buf(),
        compression,
        label,
    })
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

/// What makes an ext4 image (its magic is there) unusable as a root disk: a superblock whose
/// block size is impossible or whose blocks do not fit in the file (a truncated copy).
fn ext4_problem(path: &Path, file_len: u64) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    if let Err(e) = std::fs::File::open(path).and_then(|f| f.read_exact_at(&mut sb, 1024)) {
        return Some(format!("reading the ext4 superblock: {e}"));
    }
    let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    let log_block = le32(24);
    // 1 KiB to 64 KiB blocks, as mke2fs makes them.
    if log_block > 6 {
        return Some(format!(
            "not a usable ext4 image (superblock block size 2^{} KiB)",
            log_block
        ));
    }
    let incompat_64bit = le32(0x60) & 0x80 != 0;
    let blocks = le32(4) | if incompat_64bit { le32(0x150) << 32 } else { 0 };
    let needed = blocks.saturating_mul(1024 << log_block);
    (needed > file_len).then(|| {
        format!("ext4 image truncated: its superblock says {needed} bytes, the file has {file_len}")
    })
}

/// Refuses a tarball that is not a root filesystem before anything is built from it: garbage,
/// an empty archive, or a `docker save` archive (images and a manifest, not a filesystem).
/// Reads entry headers until one of a root filesystem's top-level dirs shows up, which in a
/// real root filesystem tarball is within its first few entries.
async fn check_rootfs_tar(layer: &banger_rootfs::Layer, source: &Path) -> OpResult<()> {
    let (path, compression) = (layer.path.clone(), layer.compression);
    let verdict = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let label = path.display().to_string();
        let reader: Box<dyn std::io::Read> = match compression {
            banger_rootfs::LayerCompression::Gzip => {
                decoder(Compression::Gzip, file, &label).map_err(|e| e.to_string())?
            }
            banger_rootfs::LayerCompression::Zstd => {
                decoder(Compression::Zstd, file, &label).map_err(|e| e.to_string())?
            }
            _ => Box::new(file),
        };
        let mut archive = tar::Archive::new(reader);
        // tar's own error text quotes the bad header bytes; the user needs the verdict.
        let not_tar = |_: std::io::Error| {
            "not an image bundle, an ext4 image or a root filesystem tarball".to_string()
        };
        let mut entries = 0u64;
        let mut docker_marks = 0;
        for entry in archive.entries().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            entries += 1;
            let name = entry
                .path()
                .map_err(not_tar)?
                .to_string_lossy()
                .into_owned();
            let name = name.trim_start_matches("./").trim_start_matches('/');
            let top = name.split('/').next().unwrap_or_default();
            if ["etc", "bin", "usr", "sbin"].contains(&top) {
                return Ok(());
            }
            if ["manifest.json", "repositories", "oci-layout", "index.json"].contains(&name)
                || name.ends_with("/layer.tar")
                || name.starts_with("blobs/sha256/")
            {
                docker_marks += 1;
            }
        }
        Err(if docker_marks > 0 {
            "is a docker-archive (`docker save` output), not a root filesystem: push it to a \
             registry and use `banger image pull`, or import `docker export CONTAINER` output"
                .to_string()
        } else if entries == 0 {
            "is an empty tar archive, not a root filesystem".to_string()
        } else {
            "does not look like a root filesystem (no /etc, /bin or /usr)".to_string()
        })
    })
    .await
    .map_err(|e| OpError::failed(format!("checking {}: {e}", source.display())))?;
    verdict.map_err(|msg| {
        let sep = if msg.starts_with("is ") || msg.starts_with("does ") {
            " "
        } else {
            ": "
        };
        OpError::bad_request(format!("{}{sep}{msg}", source.display()))
    })
}

fn is_ext4(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 1024 + 56))
        .is_ok()
        && magic == [0x53, 0xef]
}
