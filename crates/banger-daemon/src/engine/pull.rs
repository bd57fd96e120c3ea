//! `image pull`: an OCI image from a registry (layers cached by digest, flattened into an ext4
//! root filesystem without mounting), or a bundle from the image catalog; `image export` and
//! bundle import; `image cache prune`.
//!
//! Pulls of one image name are serialized (the second waits and then finds the first's image);
//! blob downloads are shared between concurrent pulls by the [`banger_oci::Puller`]. A pull
//! holds the cache's read lock from download to ext4, so `image cache prune` (the write lock)
//! never deletes a layer a pull is about to unpack.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use banger_config::ImageCatalogEntry;
use banger_core::{ErrorCode, ImageMeta, ImageRecord, validate_artifact_name};
use banger_oci::{PullEvent, PullPolicy, Puller, Reference};
use banger_protocol::{CachePruneReport, ImagePullParams};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Engine;
use crate::error::{OpError, OpResult};
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// The bundle format `image export` writes and `image import`/catalog pulls read.
pub const BUNDLE_FORMAT: &str = "banger-image-bundle/1";
/// The only entries a bundle may hold, in this order.
const BUNDLE_ENTRIES: [&str; 2] = ["manifest.json", "rootfs.ext4"];
/// Largest manifest accepted in a bundle.
const MAX_BUNDLE_MANIFEST: u64 = 1 << 20;
/// Largest bundle downloaded from a catalog entry without a size.
const MAX_BUNDLE_BYTES: u64 = 64 << 30;
/// Largest remote catalog document.
const MAX_CATALOG_BYTES: u64 = 4 << 20;

/// `manifest.json` of an image dir and of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub format: String,
    pub name: String,
    pub source: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub meta: ImageMeta,
    /// SHA256 (hex) of `rootfs.ext4`.
    pub rootfs_sha256: String,
    pub rootfs_size: u64,
}

/// Shared state of all pulls: the registry client (one, so concurrent pulls share blob
/// downloads) and the lock that keeps `image cache prune` away from running pulls.
#[derive(Debug, Default)]
pub(super) struct PullState {
    puller: std::sync::Mutex<Option<Arc<Puller>>>,
    cache_lock: tokio::sync::RwLock<()>,
    name_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    fn oci_cache_dir(&self) -> PathBuf {
        self.config().cache_dir.join("oci")
    }

    fn puller(&self) -> OpResult<Arc<Puller>> {
        let mut slot = self
            .inner
            .pulls
            .puller
            .lock()
            .expect("puller lock poisoned");
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let docker_config = docker_config_path();
        let p = Arc::new(
            Puller::new(&self.oci_cache_dir(), docker_config)
                .map_err(|e| OpError::failed(e.to_string()))?,
        );
        *slot = Some(p.clone());
        Ok(p)
    }

    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .pulls
            .name_locks
            .lock()
            .expect("pull lock map poisoned")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// `image pull`: a catalog name fetches its bundle; anything else is an OCI reference.
    pub async fn image_pull(&self, p: ImagePullParams, ctx: &OpCtx<'_>) -> OpResult<ImageRecord> {
        if let Some(name) = &p.name {
            validate_artifact_name("image", name).map_err(OpError::bad_request)?;
        }
        if let Some(k) = &p.kernel {
            validate_artifact_name("kernel", k).map_err(OpError::bad_request)?;
            self.kernel_or_provision(k, ctx).await?;
        }
        if let Some(entry) = self.catalog_image(&p.reference, ctx).await? {
            let name = p.name.clone().unwrap_or_else(|| entry.name.clone());
            let kernel = p.kernel.clone().or(entry.kernel.clone());
            return self.pull_bundle(&entry, &name, kernel, ctx).await;
        }
        if p.reference == self.config().default_image
            && let Some(suite) = p.reference.strip_prefix("debian-")
            && p.name.is_none()
        {
            // The built-in catalog entry: the default image is built locally, not downloaded.
            if let Some(img) = self.store().get_image(&p.reference)? {
                return Ok(img);
            }
            return self.image_build(&p.reference, suite, ctx).await;
        }
        self.pull_oci(&p, ctx).await
    }

    /// Whether `name` is something `image pull`/`vm create --image` may fetch: an OCI reference
    /// with a registry, repository path, tag or digest, or a catalog entry.
    pub(super) fn looks_pullable(&self, name: &str) -> bool {
        name.contains(['/', ':', '@']) || self.config().image_catalog.iter().any(|e| e.name == name)
    }

    /// An image already pulled from exactly this reference.
    pub(super) fn image_by_reference(&self, reference: &str) -> OpResult<Option<ImageRecord>> {
        let Ok(r) = reference.parse::<Reference>() else {
            return Ok(None);
        };
        let source = format!("oci:{r}");
        Ok(self
            .store()
            .list_images()?
            .into_iter()
            .find(|i| i.source == source))
    }

    async fn pull_oci(&self, p: &ImagePullParams, ctx: &OpCtx<'_>) -> OpResult<ImageRecord> {
        let reference: Reference = p
            .reference
            .parse()
            .map_err(|e: banger_oci::OciError| OpError::bad_request(e.to_string()))?;
        let source = format!("oci:{reference}");
        let name = match &p.name {
            Some(n) => n.clone(),
            None => derived_name(&reference),
        };
        let lock = self.name_lock(&name);
        let _g = lock.lock().await;
        if let Some(img) = self.store().get_image(&name)? {
            if img.source == source && p.name.is_none() {
                // A concurrent pull of the same reference finished while we waited. An explicit
                // pull re-checks the registry below only when the user names the image anew.
                ctx.progress.stage(
                    "image",
                    Some(format!("{name} is already pulled from {reference}")),
                );
                return Ok(img);
            }
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "an image named {name:?} already exists (from {}); remove it with `banger image rm {name}` or pass --name",
                    img.source
                ),
            ));
        }
        let policy = PullPolicy {
            insecure: p.insecure,
            insecure_registries: self.config().insecure_registries.clone(),
        };
        let _cache = self.inner.pulls.cache_lock.read().await;
        let puller = self.puller()?;
        ctx.progress.stage("resolve", Some(format!("{reference}")));
        let rate = RateTracker::new();
        let on_event = |e: PullEvent| rate.event(ctx, e);
        let pulled = puller
            .pull(&reference, &policy, &on_event, &ctx.cancel)
            .await
            .map_err(oci_error)?;
        rate.finish(ctx);

        let layers: Vec<banger_rootfs::Layer> = pulled
            .layers
            .iter()
            .map(|l| banger_rootfs::Layer {
                path: l.path.clone(),
                compression: layer_compression(&l.media_type),
                label: l.digest.clone(),
            })
            .collect();
        let cfg = &pulled.config;
        let mut meta = ImageMeta {
            digest: Some(pulled.manifest_digest.clone()),
            env: cfg.env.clone(),
            workdir: cfg.working_dir.clone().filter(|w| !w.is_empty()),
            user: cfg.user.clone().filter(|u| !u.is_empty()),
            entrypoint: cfg.entrypoint.clone(),
            cmd: cfg.cmd.clone(),
            ..Default::default()
        };
        let kernel = p
            .kernel
            .clone()
            .or_else(|| Some(self.config().default_kernel.clone()));
        self.image_from_layers(&name, layers, &mut meta, kernel, &source, ctx)
            .await
    }

    /// Flattens `layers` into `<images>/<name>/rootfs.ext4` (staged, then renamed) and records
    /// the image with what the flattener found out about it.
    pub(super) async fn image_from_layers(
        &self,
        name: &str,
        layers: Vec<banger_rootfs::Layer>,
        meta: &mut ImageMeta,
        kernel: Option<String>,
        source: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        let staging = self.layout().staging_dir(name);
        let scratch = self
            .layout()
            .build_dir()
            .join(format!("rootfs-{name}.{}", std::process::id()));
        let _ = banger_sys::rmtree::remove_tree(&staging);
        create_private_dir(&staging)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", staging.display())))?;
        let result = async {
            let cancel = Arc::new(AtomicBool::new(false));
            let out = staging.join("rootfs.ext4");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = {
                let (cancel, out, scratch) = (cancel.clone(), out.clone(), scratch.clone());
                tokio::task::spawn_blocking(move || {
                    let opts = banger_rootfs::BuildOptions {
                        cancel: Some(cancel),
                        ..Default::default()
                    };
                    banger_rootfs::build_rootfs(&layers, &scratch, &out, &opts, &mut |p| {
                        let _ = tx.send(p);
                    })
                })
            };
            let report = {
                let mut task = task;
                let mut last = Instant::now() - Duration::from_secs(1);
                loop {
                    tokio::select! {
                        r = &mut task => break r,
                        Some(p) = rx.recv() => {
                            if last.elapsed() > Duration::from_millis(250)
                                || !matches!(p, banger_rootfs::Progress::Entries { .. })
                            {
                                last = Instant::now();
                                report_build(ctx, &p);
                            }
                        }
                        _ = ctx.cancel.cancelled(), if !cancel.load(Ordering::Relaxed) => {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            .map_err(|e| OpError::failed(format!("rootfs build task: {e}")))?
            .map_err(|e| {
                use banger_rootfs::RootfsError as R;
                match e {
                    R::Cancelled => OpError::failed("the pull was cancelled (client went away)"),
                    // The layers' content is refused: the image's (or tarball's) fault.
                    e @ (R::Entry { .. } | R::Layer { .. }) => OpError::bad_request(e.to_string()),
                    // Writing failed on this host (a full disk, permissions): say where.
                    e @ R::EntryIo { .. } => OpError::failed(format!(
                        "building image {name}: unpacking the layers into {}: {e}",
                        scratch.display()
                    )),
                    e => OpError::failed(format!(
                        "building image {name} as {}: {}",
                        out.display(),
                        one_line(&e.to_string())
                    )),
                }
            })?;
            for s in &report.skipped {
                ctx.progress.warn(format!("skipped {s}"));
            }
            meta.has_sshd = Some(report.has_sshd);
            meta.has_init = Some(report.init.is_some());
            meta.package_manager = report.package_manager.clone();
            ctx.progress.stage(
                "image",
                Some(format!(
                    "{} files, {:.0} MiB; {}",
                    report.files,
                    report.content_bytes as f64 / (1 << 20) as f64,
                    meta.access_summary()
                )),
            );
            make_read_only(&out)?;
            let _g = self.inner.artifact_lock.lock().await;
            self.publish_image(&staging, name, kernel, source, meta.clone())
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&staging);
        let _ = banger_sys::rmtree::remove_tree(&scratch);
        result
    }

    /// A `[[image_catalog]]` entry named `name`, else one from `image_catalog_url`. Only bare
    /// names are looked up: anything with a `/`, `:` or `@` is an OCI reference.
    async fn catalog_image(
        &self,
        name: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<Option<ImageCatalogEntry>> {
        if name.contains(['/', ':', '@']) {
            return Ok(None);
        }
        if let Some(e) = self.config().image_catalog.iter().find(|e| e.name == name) {
            return Ok(Some(e.clone()));
        }
        let Some(url) = self.config().image_catalog_url.clone() else {
            return Ok(None);
        };
        ctx.progress.stage("catalog", Some(url.clone()));
        let body = tokio::task::spawn_blocking({
            let url = url.clone();
            move || banger_kernel::mirror::get_limited(&url, MAX_CATALOG_BYTES)
        })
        .await
        .map_err(|e| OpError::failed(format!("catalog task: {e}")))?
        .map_err(|e| OpError::failed(format!("fetching the image catalog: {e}")))?;
        let entries: Vec<ImageCatalogEntry> = serde_json::from_slice(&body).map_err(|e| {
            OpError::failed(format!(
                "the image catalog at {url} is not a JSON list of entries: {e}"
            ))
        })?;
        for (i, e) in entries.iter().enumerate() {
            if e.name == name {
                e.validate().map_err(|m| {
                    OpError::failed(format!("the image catalog at {url}: entry {i}: {m}"))
                })?;
                return Ok(Some(ImageCatalogEntry {
                    sha256: e.sha256.to_ascii_lowercase(),
                    ..e.clone()
                }));
            }
        }
        Ok(None)
    }

    /// Downloads a catalog bundle (hash-checked while it streams) and imports it as `name`.
    async fn pull_bundle(
        &self,
        entry: &ImageCatalogEntry,
        name: &str,
        kernel: Option<String>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        let lock = self.name_lock(name);
        let _g = lock.lock().await;
        let source = format!("catalog:{}", entry.url);
        if let Some(img) = self.store().get_image(name)? {
            if img.source == source {
                return Ok(img);
            }
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "an image named {name:?} already exists (from {}); remove it first or pass --name",
                    img.source
                ),
            ));
        }
        let dir = self.layout().build_dir();
        create_private_dir(&dir)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", dir.display())))?;
        let file = dir.join(format!("bundle-{name}.{}.tar.zst", std::process::id()));
        let result = async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
            let task = tokio::task::spawn_blocking({
                let (entry, file) = (entry.clone(), file.clone());
                move || {
                    banger_kernel::mirror::download_url_verified(
                        &entry.url,
                        entry.size,
                        MAX_BUNDLE_BYTES,
                        &entry.sha256,
                        &file,
                        &format!("image bundle {}", entry.name),
                        &mut |done, total| {
                            let _ = tx.send((done, total));
                        },
                    )
                }
            });
            let rate = RateTracker::new();
            let mut task = task;
            let r = loop {
                tokio::select! {
                    r = &mut task => break r,
                    Some((done, total)) = rx.recv() => rate.bytes(ctx, "download", &entry.name, done, total),
                    _ = ctx.cancel.cancelled() => {
                        return Err(OpError::failed("the pull was cancelled (client went away)"));
                    }
                }
            };
            r.map_err(|e| OpError::failed(format!("download task: {e}")))?
                .map_err(|e| OpError::failed(e.to_string()))?;
            rate.finish(ctx);
            self.import_bundle(&file, &file, Some(name), kernel, Some(&source), ctx)
                .await
        }
        .await;
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Imports a bundle file: exactly `manifest.json` then `rootfs.ext4`, the rootfs checked
    /// against the manifest's size and SHA256 while it is written into a staging dir. Read from
    /// `read_from` (the checked file's fd path for a user's file), named `bundle` in messages.
    pub(super) async fn import_bundle(
        &self,
        bundle: &Path,
        read_from: &Path,
        name: Option<&str>,
        kernel: Option<String>,
        source: Option<&str>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        ctx.progress
            .stage("unpack", Some(bundle.display().to_string()));
        let tmp_name = name.unwrap_or("bundle").to_string();
        let staging = self
            .layout()
            .images_dir()
            .join(format!(".{tmp_name}.{}.bundle", std::process::id()));
        let _ = banger_sys::rmtree::remove_tree(&staging);
        create_private_dir(&staging)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", staging.display())))?;
        let result = async {
            let manifest = tokio::task::spawn_blocking({
                let (bundle, read_from, staging) = (
                    bundle.to_path_buf(),
                    read_from.to_path_buf(),
                    staging.clone(),
                );
                move || unpack_bundle_from(&read_from, &bundle, &staging)
            })
            .await
            .map_err(|e| OpError::failed(format!("unpack task: {e}")))??;
            let name = name.map(str::to_string).unwrap_or(manifest.name.clone());
            validate_artifact_name("image", &name).map_err(OpError::bad_request)?;
            let kernel = kernel
                .or(manifest.kernel.clone())
                .or_else(|| Some(self.config().default_kernel.clone()));
            let source = source
                .map(str::to_string)
                .unwrap_or_else(|| format!("bundle:{}", bundle.display()));
            let final_dir = self.layout().staging_dir(&name);
            let _g = self.inner.artifact_lock.lock().await;
            if self.store().get_image(&name)?.is_some() {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "an image named {name:?} already exists (banger image rm {name} first)"
                    ),
                ));
            }
            let _ = banger_sys::rmtree::remove_tree(&final_dir);
            std::fs::rename(&staging, &final_dir)
                .map_err(|e| OpError::failed(format!("{}: {e}", final_dir.display())))?;
            let r = self.publish_image(&final_dir, &name, kernel, &source, manifest.meta.clone());
            let _ = banger_sys::rmtree::remove_tree(&final_dir);
            r
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&staging);
        result
    }

    /// `image export`: `<output>` becomes a bundle of the image (written beside it under a
    /// temporary name, then linked into place so an existing file is never replaced).
    pub async fn image_export(&self, name: &str, output: &Path, ctx: &OpCtx<'_>) -> OpResult<u64> {
        let img = self
            .store()
            .get_image(name)?
            .ok_or_else(|| OpError::not_found("image", name))?;
        if !output.is_absolute() {
            return Err(OpError::bad_request(format!(
                "output {} must be an absolute path",
                output.display()
            )));
        }
        if std::fs::symlink_metadata(output).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{} already exists; remove it or choose another -o",
                    output.display()
                ),
            ));
        }
        let parent = output.parent().filter(|p| p.is_dir()).ok_or_else(|| {
            OpError::bad_request(format!("no directory to write {} in", output.display()))
        })?;
        let tmp = parent.join(format!(
            ".{}.{}.partial",
            output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        ctx.progress.stage(
            "export",
            Some(format!("{} → {}", img.name, output.display())),
        );
        let r = tokio::task::spawn_blocking({
            let (img, tmp, output) = (img.clone(), tmp.clone(), output.to_path_buf());
            move || -> OpResult<u64> {
                write_bundle(&img, &tmp)?;
                std::fs::hard_link(&tmp, &output)
                    .map_err(|e| OpError::failed(format!("{}: {e}", output.display())))?;
                std::fs::metadata(&output)
                    .map(|m| m.len())
                    .map_err(|e| OpError::failed(format!("{}: {e}", output.display())))
            }
        })
        .await
        .map_err(|e| OpError::failed(format!("export task: {e}")))
        .and_then(|r| r);
        let _ = std::fs::remove_file(&tmp);
        r
    }

    /// `image cache prune`: deletes every cached registry blob. Waits for running pulls (they
    /// hold the cache's read lock) so none loses a layer it is about to unpack.
    pub async fn image_cache_prune(&self, dry_run: bool) -> OpResult<CachePruneReport> {
        let _w = self.inner.pulls.cache_lock.write().await;
        let dir = self.oci_cache_dir();
        let cache =
            banger_oci::BlobCache::open(&dir).map_err(|e| OpError::failed(e.to_string()))?;
        let report = cache
            .prune(&HashSet::new(), dry_run)
            .map_err(|e| OpError::failed(e.to_string()))?;
        Ok(CachePruneReport {
            blobs: report.blobs,
            bytes: report.bytes,
            dir,
            dry_run,
        })
    }
}

/// `~/.docker/config.json` of the daemon's user, or `$DOCKER_CONFIG/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    let p = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
    };
    p.is_file().then_some(p)
}

fn oci_error(e: banger_oci::OciError) -> OpError {
    match e {
        banger_oci::OciError::Cancelled => {
            OpError::failed("the pull was cancelled (client went away)")
        }
        e => OpError::failed(e.to_string()),
    }
}

fn layer_compression(media_type: &str) -> banger_rootfs::LayerCompression {
    if media_type.ends_with("+zstd") {
        banger_rootfs::LayerCompression::Zstd
    } else if media_type.ends_with("gzip") {
        banger_rootfs::LayerCompression::Gzip
    } else {
        banger_rootfs::LayerCompression::Auto
    }
}

/// `python-3.12` for `docker.io/library/python:3.12`, `app-<digest prefix>` for a digest.
pub(super) fn derived_name(r: &Reference) -> String {
    let base = r.repository.rsplit('/').next().unwrap_or("image");
    let suffix = match (r.tag.as_deref(), r.digest.as_deref()) {
        (_, Some(d)) => d.trim_start_matches("sha256:").chars().take(12).collect(),
        (Some(t), None) => t.to_string(),
        (None, None) => "latest".to_string(),
    };
    let raw = format!("{base}-{suffix}").to_ascii_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while name.contains("..") {
        name = name.replace("..", ".");
    }
    name.truncate(64);
    if validate_artifact_name("image", &name).is_err() {
        name = format!(
            "img-{}",
            name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        );
        name.truncate(64);
    }
    name
}

fn report_build(ctx: &OpCtx<'_>, p: &banger_rootfs::Progress) {
    use banger_rootfs::Progress as P;
    match p {
        P::Layer {
            index,
            count,
            label,
        } => ctx.progress.stage(
            "flatten",
            Some(format!("layer {}/{count} {}", index + 1, short(label))),
        ),
        P::Entries { done } => ctx
            .progress
            .stage("flatten", Some(format!("{done} entries"))),
        P::Mkfs { size_bytes, files } => ctx.progress.stage(
            "mkfs",
            Some(format!("{} MiB ext4 for {files} files", size_bytes >> 20)),
        ),
        P::Fixups { count } => ctx
            .progress
            .stage("ownership", Some(format!("{count} inode fixups"))),
    }
}

fn short(digest: &str) -> String {
    let d = digest.trim_start_matches("sha256:");
    d.chars().take(12).collect()
}

/// Turns download events into `done / total MiB, rate` progress lines a few times a second.
struct RateTracker {
    start: Instant,
    state: std::sync::Mutex<RateState>,
}

#[derive(Default)]
struct RateState {
    last: Option<Instant>,
    blobs: std::collections::HashMap<String, (u64, u64)>,
    fetched: HashSet<String>,
    cached: usize,
}

impl RateTracker {
    fn new() -> Self {
        RateTracker {
            start: Instant::now(),
            state: std::sync::Mutex::new(RateState::default()),
        }
    }

    fn event(&self, ctx: &OpCtx<'_>, e: PullEvent) {
        match e {
            PullEvent::Resolved {
                manifest_digest,
                layers,
                total_bytes,
            } => ctx.progress.stage(
                "resolve",
                Some(format!(
                    "{} layers, {:.1} MiB, manifest {}",
                    layers,
                    mib(total_bytes),
                    short(&manifest_digest)
                )),
            ),
            PullEvent::Blob {
                digest,
                done,
                total,
            } => {
                self.state
                    .lock()
                    .expect("rate lock")
                    .blobs
                    .insert(digest.clone(), (done, total));
                self.report(ctx, &digest, false);
            }
            PullEvent::BlobDone { digest, cached } => {
                let mut s = self.state.lock().expect("rate lock");
                if cached {
                    s.cached += 1;
                } else {
                    s.fetched.insert(digest.clone());
                }
                drop(s);
                self.report(ctx, &digest, true);
            }
        }
    }

    fn bytes(&self, ctx: &OpCtx<'_>, stage: &str, what: &str, done: u64, total: u64) {
        let mut s = self.state.lock().expect("rate lock");
        s.blobs.insert(what.to_string(), (done, total));
        if s.last
            .is_some_and(|l| l.elapsed() < Duration::from_millis(250))
            && done != total
        {
            return;
        }
        s.last = Some(Instant::now());
        drop(s);
        ctx.progress
            .stage(stage, Some(format!("{what}: {}", self.line(done, total))));
    }

    fn report(&self, ctx: &OpCtx<'_>, digest: &str, force: bool) {
        let mut s = self.state.lock().expect("rate lock");
        if !force
            && s.last
                .is_some_and(|l| l.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        s.last = Some(Instant::now());
        let (done, total) = s
            .blobs
            .values()
            .fold((0, 0), |(d, t), (bd, bt)| (d + bd, t + bt));
        drop(s);
        ctx.progress.stage(
            "download",
            Some(format!(
                "{} (layer {})",
                self.line(done, total),
                short(digest)
            )),
        );
    }

    fn line(&self, done: u64, total: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = mib(done) / secs;
        if let Some(filled) = (done.min(total) * 20).checked_div(total) {
            let filled = filled as usize;
            format!(
                "[{}{}] {:.1} / {:.1} MiB, {rate:.1} MiB/s",
                "#".repeat(filled),
                "-".repeat(20 - filled),
                mib(done),
                mib(total)
            )
        } else {
            format!("{:.1} MiB, {rate:.1} MiB/s", mib(done))
        }
    }

    fn finish(&self, ctx: &OpCtx<'_>) {
        let s = self.state.lock().expect("rate lock");
        let done: u64 = s.blobs.values().map(|(d, _)| d).sum();
        let secs = self.start.elapsed().as_secs_f64();
        let detail = format!(
            "{:.1} MiB in {secs:.1}s ({} blob(s) downloaded, {} cached)",
            mib(done),
            s.fetched.len(),
            s.cached
        );
        drop(s);
        ctx.progress.stage("downloaded", Some(detail));
    }
}

/// A tool's multi-line stderr as one line of an error message.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn make_read_only(p: &Path) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| OpError::failed(format!("{}: {e}", p.display())))
}

/// Writes `img` as a zstd tar of `manifest.json` and `rootfs.ext4` to `out`.
fn write_bundle(img: &ImageRecord, out: &Path) -> OpResult<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| OpError::failed(format!("{}: {e}", p.display()))
    };
    let rootfs_sha256 = sha256_file(&img.rootfs)?;
    let rootfs_size = std::fs::metadata(&img.rootfs)
        .map_err(io(&img.rootfs))?
        .len();
    let manifest = BundleManifest {
        format: BUNDLE_FORMAT.into(),
        name: img.name.clone(),
        source: img.source.clone(),
        kernel: img.kernel.clone(),
        meta: img.meta.clone(),
        rootfs_sha256,
        rootfs_size,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| OpError::failed(format!("encoding the manifest: {e}")))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io(out))?;
    let mut enc = zstd::Encoder::new(std::io::BufWriter::new(file), 3).map_err(io(out))?;
    // Two workers: compression is the export's bottleneck (a sparse image is mostly zeros).
    enc.multithread(2).map_err(io(out))?;
    let mut tar = tar::Builder::new(enc);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(img.created_at.max(0) as u64);
    h.set_cksum();
    tar.append_data(&mut h, BUNDLE_ENTRIES[0], json.as_slice())
        .map_err(io(out))?;
    let mut f = std::fs::File::open(&img.rootfs).map_err(io(&img.rootfs))?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(rootfs_size);
    h.set_mode(0o444);
    h.set_mtime(img.created_at.max(0) as u64);
    h.set_cksum();
    tar.append_data(&mut h, BUNDLE_ENTRIES[1], &mut f)
        .map_err(io(out))?;
    let enc = tar.into_inner().map_err(io(out))?;
    let w = enc.finish().map_err(io(out))?;
    let file = w
        .into_inner()
        .map_err(|e| OpError::failed(format!("{}: {}", out.display(), e.error())))?;
    file.sync_all().map_err(io(out))
}

fn sha256_file(p: &Path) -> OpResult<String> {
    let mut f =
        std::fs::File::open(p).map_err(|e| OpError::failed(format!("{}: {e}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| OpError::failed(format!("{}: {e}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Reads a bundle (`read_from`, named `bundle` in messages) into `dir` (`rootfs.ext4`, read-only) and returns its manifest. Anything but
/// exactly the two expected regular-file entries, a manifest of another format, or a rootfs
/// whose size or SHA256 differs from the manifest's is refused, naming the bundle.
pub fn unpack_bundle_from(read_from: &Path, bundle: &Path, dir: &Path) -> OpResult<BundleManifest> {
    let bad = |m: String| OpError::bad_request(format!("bundle {}: {m}", bundle.display()));
    let file = std::fs::File::open(read_from).map_err(|e| bad(e.to_string()))?;
    let dec = zstd::Decoder::new(file).map_err(|e| bad(format!("not zstd: {e}")))?;
    let mut archive = tar::Archive::new(dec);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut next = |want: &str| -> OpResult<
        tar::Entry<'_, zstd::Decoder<'static, std::io::BufReader<std::fs::File>>>,
    > {
        let e = entries
            .next()
            .ok_or_else(|| bad(format!("{want} is missing")))?
            .map_err(|e| bad(format!("reading the archive: {e}")))?;
        let path = e
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if path != want {
            return Err(bad(format!(
                "unexpected entry {path:?} (a bundle holds exactly manifest.json and rootfs.ext4, in that order)"
            )));
        }
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("{want} is not a regular file")));
        }
        Ok(e)
    };
    let manifest: BundleManifest = {
        let e = next(BUNDLE_ENTRIES[0])?;
        if e.size() > MAX_BUNDLE_MANIFEST {
            return Err(bad(format!(
                "manifest.json is larger than {MAX_BUNDLE_MANIFEST} bytes"
            )));
        }
        let mut buf = Vec::new();
        e.take(MAX_BUNDLE_MANIFEST)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("reading manifest.json: {e}")))?;
        serde_json::from_slice(&buf).map_err(|e| bad(format!("manifest.json: {e}")))?
    };
    if manifest.format != BUNDLE_FORMAT {
        return Err(bad(format!(
            "format {:?} is not {BUNDLE_FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.rootfs_sha256.len() != 64
        || !manifest
            .rootfs_sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
    {
        return Err(bad(
            "manifest.json: rootfs_sha256 is not 64 hex digits".into()
        ));
    }
    {
        let mut e = next(BUNDLE_ENTRIES[1])?;
        if e.size() != manifest.rootfs_size {
            return Err(bad(format!(
                "rootfs.ext4 is {} bytes, the manifest says {}",
                e.size(),
                manifest.rootfs_size
            )));
        }
        let out = dir.join(BUNDLE_ENTRIES[1]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(|e| OpError::failed(format!("{}: {e}", out.display())))?;
        let mut w = SparseHashWriter::new(f);
        std::io::copy(&mut e, &mut w).map_err(|err| {
            if w.write_failed {
                // This host's fault (a full disk), not the bundle's.
                OpError::failed(format!(
                    "importing bundle {}: writing {}: {err}",
                    bundle.display(),
                    out.display()
                ))
            } else {
                bad(format!("reading rootfs.ext4: {err}"))
            }
        })?;
        let (f, sum) = w
            .finish()
            .map_err(|e| OpError::failed(format!("{}: {e}", out.display())))?;
        if sum != manifest.rootfs_sha256.to_ascii_lowercase() {
            return Err(bad(format!(
                "rootfs.ext4 has SHA256 {sum}, the manifest says {}",
                manifest.rootfs_sha256
            )));
        }
        f.sync_all()
            .map_err(|e| OpError::failed(format!("{}: {e}", out.display())))?;
        make_read_only(&out)?;
    }
    if let Some(extra) = entries.next() {
        let name = extra
            .ok()
            .and_then(|e| e.path().ok().map(|p| p.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into());
        return Err(bad(format!("unexpected entry {name:?} after rootfs.ext4")));
    }
    Ok(manifest)
}

/// Hashes everything written and keeps all-zero blocks as holes, so a sparse 2 GiB image stays
/// sparse on import.
struct SparseHashWriter {
    file: std::fs::File,
    hash: Sha256,
    pos: u64,
    /// A write to the file failed (so a failed copy is not blamed on the bundle).
    write_failed: bool,
}

impl SparseHashWriter {
    fn new(file: std::fs::File) -> Self {
        SparseHashWriter {
            file,
            hash: Sha256::new(),
            pos: 0,
            write_failed: false,
        }
    }

    fn finish(self) -> std::io::Result<(std::fs::File, String)> {
        // Holes at the end need the length set explicitly.
        self.file.set_len(self.pos)?;
        Ok((self.file, hex::encode(self.hash.finalize())))
    }
}

impl Write for SparseHashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.hash.update(buf);
        for chunk in buf.chunks(4096) {
            if chunk.iter().any(|b| *b != 0) {
                self.file
                    .write_all_at(chunk, self.pos)
                    .inspect_err(|_| self.write_failed = true)?;
            }
            self.pos += chunk.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_are_valid_image_names() {
        for (r, want) in [
            ("alpine", "alpine-latest"),
            ("docker.io/library/python:3.12", "python-3.12"),
            ("localhost:5000/team/app_x:V1.0", "app_x-v1.0"),
            (
                "localhost:5000/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "x-0123456789ab",
            ),
        ] {
            let r: Reference = r.parse().unwrap();
            let n = derived_name(&r);
            assert_eq!(n, want);
            validate_artifact_name("image", &n).unwrap();
        }
    }

    fn bundle_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw: the builder itself refuses the hostile names under test.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            tar.append(&h, *data).unwrap();
        }
        zstd::encode_all(tar.into_inner().unwrap().as_slice(), 1).unwrap()
    }

    fn manifest_for(rootfs: &[u8]) -> Vec<u8> {
        serde_json::to_vec(&BundleManifest {
            format: BUNDLE_FORMAT.into(),
            name: "img".into(),
            source: "test".into(),
            kernel: None,
            meta: ImageMeta::default(),
            rootfs_sha256: hex::encode(Sha256::digest(rootfs)),
            rootfs_size: rootfs.len() as u64,
        })
        .unwrap()
    }

    #[test]
    fn bundles_hold_exactly_the_expected_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut rootfs = vec![0u8; 3 * 4096];
        rootfs[5000] = 7;
        let m = manifest_for(&rootfs);
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (
                bundle_bytes(&[("manifest.json", &m), ("rootfs.ext4", &rootfs)]),
                None,
            ),
            (
                bundle_bytes(&[("rootfs.ext4", &rootfs), ("manifest.json", &m)]),
                Some("unexpected entry \"rootfs.ext4\""),
            ),
            (
                bundle_bytes(&[
                    ("manifest.json", &m),
                    ("rootfs.ext4", &rootfs),
                    ("evil", b"x"),
                ]),
                Some("unexpected entry \"evil\""),
            ),
            (
                bundle_bytes(&[("manifest.json", &m), ("../rootfs.ext4", &rootfs)]),
                Some("unexpected entry"),
            ),
            (
                bundle_bytes(&[("manifest.json", &m), ("rootfs.ext4", &rootfs[..4096])]),
                Some("the manifest says"),
            ),
            (
                bundle_bytes(&[
                    ("manifest.json", &m),
                    ("rootfs.ext4", &vec![1u8; rootfs.len()]),
                ]),
                Some("SHA256"),
            ),
            (
                bundle_bytes(&[("manifest.json", b"{}")]),
                Some("manifest.json"),
            ),
            (b"not zstd".to_vec(), Some("bundle")),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let file = dir.path().join(format!("b{i}.tar.zst"));
            std::fs::write(&file, bytes).unwrap();
            let out = dir.path().join(format!("out{i}"));
            std::fs::create_dir(&out).unwrap();
            match (unpack_bundle_from(&file, &file, &out), want) {
                (Ok(man), None) => {
                    assert_eq!(man.name, "img");
                    let got = std::fs::read(out.join("rootfs.ext4")).unwrap();
                    assert_eq!(got, rootfs);
                }
                (Err(e), Some(w)) => {
                    assert!(e.message.contains(w), "case {i}: {}", e.message);
                    assert!(
                        e.message.contains(&format!("b{i}.tar.zst")),
                        "{}",
                        e.message
                    );
                }
                (r, w) => panic!("case {i}: {r:?} want {w:?}"),
            }
        }
    }
}
