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
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let kernel = kernel.or_else(|| Some(self.config().default_kernel.clone()));
        let source_label = format!("import:{}", source.display());
        if meta.is_dir() {
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
            let layer = tarball_layer(source, &scratch, ctx).await?;
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
async fn tarball_layer(
    src: &Path,
    scratch: &Path,
    ctx: &OpCtx<'_>,
) -> OpResult<banger_rootfs::Layer> {
    use std::io::Read;
    let bad = |msg: String| OpError::bad_request(format!("{}: {msg}", src.display()));
    let mut head = [0u8; 6];
    let n = std::fs::File::open(src)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| bad(e.to_string()))?;
    let label = src.display().to_string();
    let compression = match Compression::detect(&head[..n]) {
        None => banger_rootfs::LayerCompression::None,
        Some(Compression::Gzip) => banger_rootfs::LayerCompression::Gzip,
        Some(Compression::Zstd) => banger_rootfs::LayerCompression::Zstd,
        Some(other) => {
            ctx.progress
                .stage("decompress", Some(format!("{other:?} {label}")));
            let (s, out) = (src.to_path_buf(), scratch.join("layer.tar"));
            let out2 = out.clone();
            tokio::task::spawn_blocking(move || -> OpResult<()> {
                let bad = |msg: String| OpError::bad_request(format!("{}: {msg}", s.display()));
                let file = std::fs::File::open(&s).map_err(|e| bad(e.to_string()))?;
                let mut r = decoder(other, file, &s.display().to_string())
                    .map_err(|e| bad(e.to_string()))?;
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

fn is_ext4(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 1024 + 56))
        .is_ok()
        && magic == [0x53, 0xef]
}
