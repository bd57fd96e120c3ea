//! Getting the default kernel and image onto a fresh machine: `kernel pull` (Debian's cloud
//! kernel from the configured mirror, signature-checked) and `image build debian` (mmdebstrap),
//! and the automatic provisioning `vm create` does when the defaults are missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_core::{ErrorCode, ImageMeta, ImageRecord, KernelRecord, validate_artifact_name};
use banger_kernel::{DebianMirror, PullProgress};
use tokio::io::AsyncBufReadExt;
use tracing::{info, warn};

use super::{Engine, now};
use crate::error::{OpError, OpResult};
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// Kernels `kernel pull` knows without configuration: name → Debian suite whose cloud kernel it
/// is. More come from `[[kernel_catalog]]` in the config (tarballs pinned by SHA256). Every name
/// here must be in `banger_config::Config::BUILTIN_KERNELS`, which the config loader keeps
/// catalog entries from taking.
pub const KERNEL_CATALOG: &[(&str, &str)] = &[("debian-6.1-cloud", "bookworm")];

/// Where a catalog kernel comes from.
#[derive(Debug, Clone)]
enum CatalogKernel {
    /// Debian's cloud kernel of this suite, from the configured mirror.
    Debian { suite: &'static str },
    /// A tarball pinned by its SHA256.
    Tarball(banger_kernel::CatalogEntry),
}

/// Packages of the default image, on top of Debian's minbase.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "git",
    "curl",
    "ca-certificates",
    "build-essential",
    "iproute2",
    "iputils-ping",
    "netbase",
    "procps",
    "sudo",
    "less",
    "vim-tiny",
    // modprobe: module autoloading in --nested guests (their module tree is mounted).
    "kmod",
];

impl Engine {
    /// The image, building the default one or pulling an OCI reference or catalog entry first
    /// when it is missing.
    pub(super) async fn image_or_provision(
        &self,
        name: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        if let Some(img) = self.store().get_image(name)? {
            return Ok(img);
        }
        if let Some(img) = self.image_by_reference(name)? {
            return Ok(img);
        }
        if self.looks_pullable(name) {
            ctx.progress.stage(
                "image_pull",
                Some(format!("the image {name} is missing: pulling it once")),
            );
            return self
                .image_pull(
                    banger_protocol::ImagePullParams {
                        reference: name.to_string(),
                        ..Default::default()
                    },
                    ctx,
                )
                .await;
        }
        if name == self.config().default_image
            && let Some(suite) = name.strip_prefix("debian-")
        {
            ctx.progress.stage(
                "image_build",
                Some(format!(
                    "the default image {name} is missing: building it once (a few minutes)"
                )),
            );
            return self.image_build(name, suite, ctx).await;
        }
        // A bare word is an image name; a registry image needs its tag or path to be pulled
        // implicitly (`alpine:latest`, `library/alpine`), so say how.
        Err(OpError::new(
            ErrorCode::NotFound,
            format!(
                "no image named {name:?} (banger image ls); to use the registry image, run `banger image pull {name}` or pass --image {name}:latest"
            ),
        ))
    }

    /// The kernel, pulling it first when it is missing and `kernel pull` knows it (the built-in
    /// Debian kernel or a `[[kernel_catalog]]` entry), as for the default kernel.
    pub(super) async fn kernel_or_provision(
        &self,
        name: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<KernelRecord> {
        if let Some(k) = self.store().get_kernel(name)? {
            return Ok(k);
        }
        if self.catalog_kernel(name)?.is_some() {
            ctx.progress.stage(
                "kernel_pull",
                Some(format!("the kernel {name} is missing: pulling it once")),
            );
            return self.kernel_pull(name, ctx).await;
        }
        Err(OpError::not_found("kernel", name))
    }

    /// Where `kernel pull NAME` gets `name` from: the built-in Debian entry or a configured
    /// `[[kernel_catalog]]` one. The config loader refuses a configured entry named like a
    /// built-in one; a config built some other way that does so is refused here, rather than one
    /// silently shadowing the other.
    fn catalog_kernel(&self, name: &str) -> OpResult<Option<CatalogKernel>> {
        let builtin = KERNEL_CATALOG.iter().find(|(n, _)| *n == name);
        let configured = self.config().kernel_catalog.iter().find(|e| e.name == name);
        Ok(match (builtin, configured) {
            (Some(_), Some(_)) => {
                return Err(OpError::bad_request(format!(
                    "kernel {name} is built in and also a [[kernel_catalog]] entry; rename the entry"
                )));
            }
            (Some(&(_, suite)), None) => Some(CatalogKernel::Debian { suite }),
            (None, Some(e)) => Some(CatalogKernel::Tarball(banger_kernel::CatalogEntry {
                name: e.name.clone(),
                url: e.url.clone(),
                sha256: e.sha256.clone(),
                size: e.size,
                version: e.version.clone(),
            })),
            (None, None) => None,
        })
    }

    /// Names `kernel pull` knows: built-in first, then configured.
    pub fn catalog_kernel_names(&self) -> Vec<String> {
        KERNEL_CATALOG
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(self.config().kernel_catalog.iter().map(|e| e.name.clone()))
            .collect()
    }

    /// Fetches a catalog kernel into `<state>/kernels/<name>`: the built-in Debian kernel from
    /// the configured mirror (signature-checked), or a `[[kernel_catalog]]` tarball (checked
    /// against its SHA256).
    pub async fn kernel_pull(&self, name: &str, ctx: &OpCtx<'_>) -> OpResult<KernelRecord> {
        let Some(source) = self.catalog_kernel(name)? else {
            return Err(OpError::not_found(
                "kernel in the catalog",
                &format!(
                    "{name}\" (known: {})",
                    self.catalog_kernel_names().join(", ")
                ),
            ));
        };
        let _g = self.inner.artifact_lock.lock().await;
        if let Some(k) = self.store().get_kernel(name)? {
            // Another request pulled it while this one waited for the lock.
            return Ok(k);
        }
        let dest = self.layout().kernels_dir().join(name);
        if dest.exists() {
            // Leftover of a pull whose record was never written (daemon killed at the end).
            banger_sys::rmtree::remove_tree(&dest)
                .map_err(|e| OpError::failed(format!("removing stale {}: {e}", dest.display())))?;
        }
        let mirror_url = self.config().debian_mirror.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PullProgress>();
        let dest2 = dest.clone();
        let source2 = source.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut report = |p: PullProgress| {
                let _ = tx.send(p);
            };
            match &source2 {
                CatalogKernel::Debian { suite } => {
                    let mirror = DebianMirror {
                        base_url: mirror_url,
                        suite: suite.to_string(),
                        extra_suites: vec![format!("{suite}-updates")],
                        ..DebianMirror::default()
                    };
                    banger_kernel::pull_debian_cloud_kernel(&mirror, &dest2, &mut report)
                }
                CatalogKernel::Tarball(entry) => {
                    banger_kernel::pull_catalog_kernel(entry, &dest2, &mut report)
                }
            }
        });
        forward_pull_progress(&mut rx, ctx).await;
        let pulled = task
            .await
            .map_err(|e| OpError::failed(format!("kernel pull task: {e}")))?
            .map_err(|e| match &source {
                CatalogKernel::Debian { .. } => {
                    OpError::failed(format!("pulling kernel {name}: {e}"))
                }
                CatalogKernel::Tarball(entry) => {
                    OpError::failed(format!("pulling kernel {name} from {}: {e}", entry.url))
                }
            })?;
        let (source, initrd) = match &source {
            CatalogKernel::Debian { .. } => (
                format!("debian:{}={}", pulled.package, pulled.package_version),
                None,
            ),
            CatalogKernel::Tarball(entry) => {
                (format!("catalog:{}", entry.url), pulled.initrd.clone())
            }
        };
        let rec = KernelRecord {
            name: name.to_string(),
            vmlinux: pulled.vmlinux.clone(),
            initrd,
            version: pulled.version.clone(),
            sha256: pulled.vmlinux_sha256.clone(),
            source,
            created_at: now(),
        };
        if let Err(e) = self.store().insert_kernel(&rec) {
            let _ = banger_sys::rmtree::remove_tree(&dest);
            return Err(e.into());
        }
        info!(kernel = name, version = %rec.version, source = %rec.source, "kernel pulled");
        Ok(rec)
    }

    /// Compiles banger's guest kernel from Debian's `linux-source-6.1` with
    /// [`banger_kernel::DEFAULT_FRAGMENT`] into `<state>/kernels/<name>` (default
    /// `banger-6.1`) and records it. Build tools are checked first (one error line naming the
    /// missing packages; the daemon installs nothing). A kernel of that name built with the same
    /// config hash is returned as is; one built with another hash is replaced. A kernel of that
    /// name that was not built here (pulled, imported) is never overwritten.
    pub async fn kernel_build(
        &self,
        name: Option<&str>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<KernelRecord> {
        let name = name.unwrap_or(banger_protocol::KernelBuildParams::DEFAULT_NAME);
        validate_artifact_name("kernel", name).map_err(OpError::bad_request)?;
        if self.catalog_kernel(name)?.is_some() {
            return Err(OpError::bad_request(format!(
                "{name} is the name of a kernel `kernel pull` fetches; pick another name for a build"
            )));
        }
        let _g = self.inner.artifact_lock.lock().await;
        let existing = self.store().get_kernel(name)?;
        if let Some(k) = &existing
            && !k.source.starts_with("build:")
        {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "kernel {name} exists and was not built by banger ({}); banger kernel rm {name} first",
                    k.source
                ),
            ));
        }
        banger_kernel::check_build_tools().map_err(|e| OpError::failed(e.to_string()))?;
        // A directory without a record (daemon killed before recording it) is fine: the build
        // reuses it when its config hash matches and replaces it otherwise.
        let dest = self.layout().kernels_dir().join(name);
        let work = self
            .layout()
            .build_dir()
            .join(format!("kernel-{name}.{}", std::process::id()));
        let _ = banger_sys::rmtree::remove_tree(&work);
        create_private_dir(&work)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", work.display())))?;
        let mirror = DebianMirror {
            base_url: self.config().debian_mirror.clone(),
            suite: "bookworm".into(),
            extra_suites: vec!["bookworm-updates".into()],
            ..DebianMirror::default()
        };
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PullProgress>();
        let (work2, dest2) = (work.clone(), dest.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut report = |p: PullProgress| {
                let _ = tx.send(p);
            };
            banger_kernel::build_kernel(
                &mirror,
                banger_kernel::DEFAULT_FRAGMENT,
                &work2,
                &dest2,
                jobs,
                &mut report,
            )
        });
        forward_pull_progress(&mut rx, ctx).await;
        let result = task
            .await
            .map_err(|e| OpError::failed(format!("kernel build task: {e}")));
        let _ = banger_sys::rmtree::remove_tree(&work);
        let built = result?.map_err(|e| OpError::failed(format!("building kernel {name}: {e}")))?;
        if let Some(k) = existing {
            if k.sha256 == built.vmlinux_sha256 && k.source == built.source_url {
                info!(
                    kernel = name,
                    "kernel build: config unchanged, nothing built"
                );
                return Ok(k);
            }
            self.store().delete_kernel(name)?;
        }
        let rec = KernelRecord {
            name: name.to_string(),
            vmlinux: built.vmlinux.clone(),
            initrd: None,
            version: built.version.clone(),
            sha256: built.vmlinux_sha256.clone(),
            source: built.source_url.clone(),
            created_at: now(),
        };
        if let Err(e) = self.store().insert_kernel(&rec) {
            let _ = banger_sys::rmtree::remove_tree(&dest);
            return Err(e.into());
        }
        info!(
            kernel = name,
            version = %rec.version,
            secs = started.elapsed().as_secs(),
            "kernel built"
        );
        Ok(rec)
    }

    /// Builds a Debian root filesystem with mmdebstrap and registers it as image `name`.
    pub async fn image_build(
        &self,
        name: &str,
        suite: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        validate_artifact_name("image", name).map_err(OpError::bad_request)?;
        if !suite.chars().all(|c| c.is_ascii_lowercase() || c == '-') || suite.is_empty() {
            return Err(OpError::bad_request(format!(
                "invalid Debian suite {suite:?}"
            )));
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root && self.config().helper_socket.is_none() {
            return Err(OpError::failed(
                "building the Debian image needs root (mmdebstrap must create files owned by other users): run bangerd as root, set up the root helper (banger system install), or pull an image (banger image pull)",
            ));
        }
        if !root {
            return self.image_build_via_helper(name, suite, ctx).await;
        }
        let _g = self.inner.artifact_lock.lock().await;
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let build = self
            .layout()
            .build_dir()
            .join(format!("{name}.{}", std::process::id()));
        clean_build_tree(&build).await?;
        create_private_dir(&build)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", build.display())))?;
        let result = self.image_build_in(name, suite, &build, ctx).await;
        // mmdebstrap's group is gone by now (run_streaming); its mounts may not be.
        if let Err(e) = clean_build_tree(&build).await {
            warn!("{}", e.message);
        }
        result
    }

    /// The unprivileged daemon's image build: the root helper runs mmdebstrap into a tarball
    /// (owned by the daemon's user), and the tarball plus a small layer of banger's changes are
    /// flattened into the ext4 like any pulled image — no root needed on this side.
    async fn image_build_via_helper(
        &self,
        name: &str,
        suite: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        let sock = self
            .config()
            .helper_socket
            .clone()
            .ok_or_else(|| OpError::failed("no helper_socket configured"))?;
        if self.store().get_image(name)?.is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an image named {name:?} already exists (banger image rm {name} first)"),
            ));
        }
        let build = self.layout().build_dir();
        create_private_dir(&build)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", build.display())))?;
        let tar = build.join(format!("debian-{name}.{}.tar", std::process::id()));
        let custom = build.join(format!("custom-{name}.{}.tar", std::process::id()));
        let started = Instant::now();
        let result = async {
            ctx.progress.stage(
                "mmdebstrap",
                Some(format!(
                    "Debian {suite} from {} (through banger-helper)",
                    self.config().debian_mirror
                )),
            );
            let packages: Vec<String> = DEBIAN_PACKAGES.iter().map(|p| p.to_string()).collect();
            banger_helper::HelperClient::new(sock)
                .debootstrap(suite, &self.config().debian_mirror, &packages, &tar)
                .await
                .map_err(|e| OpError::failed(format!("building the Debian image: {e}")))?;
            std::fs::write(&custom, customization_layer())
                .map_err(|e| OpError::failed(format!("{}: {e}", custom.display())))?;
            let layers = vec![
                banger_rootfs::Layer {
                    path: tar.clone(),
                    compression: banger_rootfs::LayerCompression::None,
                    label: format!("mmdebstrap {suite}"),
                },
                banger_rootfs::Layer {
                    path: custom.clone(),
                    compression: banger_rootfs::LayerCompression::None,
                    label: "banger's image changes".into(),
                },
            ];
            let mut meta = ImageMeta::default();
            self.image_from_layers(
                name,
                layers,
                &mut meta,
                Some(self.config().default_kernel.clone()),
                &format!("build:debian:{suite}"),
                ctx,
            )
            .await
        }
        .await;
        let _ = std::fs::remove_file(&tar);
        let _ = std::fs::remove_file(&custom);
        if result.is_ok() {
            info!(
                image = name,
                secs = started.elapsed().as_secs(),
                "image built"
            );
        }
        result
    }

    async fn image_build_in(
        &self,
        name: &str,
        suite: &str,
        build: &Path,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        let rootfs_dir = build.join("rootfs");
        let started = Instant::now();
        ctx.progress.stage(
            "mmdebstrap",
            Some(format!(
                "Debian {suite} from {}",
                self.config().debian_mirror
            )),
        );
        let mut args: Vec<String> = vec![
            "--variant=minbase".into(),
            "--mode=root".into(),
            "--format=directory".into(),
            format!("--include={}", DEBIAN_PACKAGES.join(",")),
            // Docs and translations are dead weight in a sandbox image.
            "--dpkgopt=path-exclude=/usr/share/doc/*".into(),
            "--dpkgopt=path-exclude=/usr/share/man/*".into(),
            "--dpkgopt=path-exclude=/usr/share/locale/*".into(),
            suite.to_string(),
        ];
        args.push(rootfs_dir.display().to_string());
        args.push(self.config().debian_mirror.clone());
        run_streaming("mmdebstrap", &args, ctx, "mmdebstrap").await?;
        ctx.progress.stage("customize", None);
        customize_rootfs(&rootfs_dir)
            .map_err(|e| OpError::failed(format!("preparing the image: {e}")))?;

        let r = self
            .image_from_tree(
                name,
                &rootfs_dir,
                Some(self.config().default_kernel.clone()),
                &format!("build:debian:{suite}"),
                ctx,
            )
            .await;
        if r.is_ok() {
            info!(
                image = name,
                secs = started.elapsed().as_secs(),
                "image built"
            );
        }
        r
    }

    /// Makes image `name` from a root filesystem tree: a sparse ext4 (`mkfs.ext4 -d`, no
    /// mount) sized for the content plus room to grow, staged and renamed into place, then
    /// registered. The caller holds the artifact lock.
    pub(super) async fn image_from_tree(
        &self,
        name: &str,
        tree: &Path,
        kernel: Option<String>,
        source: &str,
        ctx: &OpCtx<'_>,
    ) -> OpResult<ImageRecord> {
        let content = dir_size(tree);
        // Content plus room to grow for VMs whose root disk is a copy; sparse, so free space
        // costs nothing on the host.
        let size_mib = (content / (1 << 20)) * 3 / 2 + 2048;
        let staging = self.layout().staging_dir(name);
        let _ = banger_sys::rmtree::remove_tree(&staging);
        create_private_dir(&staging)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", staging.display())))?;
        let image_file = staging.join("rootfs.ext4");
        ctx.progress.stage(
            "mkfs",
            Some(format!(
                "{size_mib} MiB ext4 from {:.0} MiB of files",
                mib(content)
            )),
        );
        let r = async {
            let f = std::fs::File::create(&image_file)
                .map_err(|e| OpError::failed(format!("{}: {e}", image_file.display())))?;
            f.set_len(size_mib << 20)
                .map_err(|e| OpError::failed(format!("{}: {e}", image_file.display())))?;
            drop(f);
            let args: Vec<String> = vec![
                "-F".into(),
                "-q".into(),
                "-L".into(),
                "banger-rootfs".into(),
                "-E".into(),
                "lazy_itable_init=1,lazy_journal_init=1".into(),
                "-d".into(),
                tree.display().to_string(),
                image_file.display().to_string(),
            ];
            run_streaming("mkfs.ext4", &args, ctx, "mkfs").await?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&image_file, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| OpError::failed(format!("{}: {e}", image_file.display())))?;
            // What the tree really holds decides how its VMs boot (the agent serves ssh and
            // stays PID 1 when the image has no sshd or init), as for pulled images.
            let facts = banger_rootfs::inspect_dir(tree);
            let meta = ImageMeta {
                has_sshd: Some(facts.has_sshd),
                has_init: Some(facts.init.is_some()),
                package_manager: facts.package_manager,
                ..ImageMeta::default()
            };
            self.publish_image(&staging, name, kernel, source, meta)
        }
        .await;
        let _ = banger_sys::rmtree::remove_tree(&staging);
        r
    }
}

impl Engine {
    /// Moves a staged image dir (holding `rootfs.ext4`) to `<images>/<name>` and records it;
    /// the dir is removed again if the record cannot be written.
    pub(super) fn publish_image(
        &self,
        staging: &Path,
        name: &str,
        kernel: Option<String>,
        source: &str,
        meta: ImageMeta,
    ) -> OpResult<ImageRecord> {
        let dir = self.layout().images_dir().join(name);
        std::fs::rename(staging, &dir)
            .map_err(|e| OpError::failed(format!("{}: {e}", dir.display())))?;
        let rootfs = dir.join("rootfs.ext4");
        let rec = ImageRecord {
            name: name.to_string(),
            size_bytes: std::fs::metadata(&rootfs)
                .map_err(|e| OpError::failed(format!("{}: {e}", rootfs.display())))?
                .len(),
            rootfs,
            kernel,
            source: source.to_string(),
            managed: true,
            created_at: now(),
            meta,
        };
        if let Err(e) = self.store().insert_image(&rec) {
            let _ = banger_sys::rmtree::remove_tree(&dir);
            return Err(e.into());
        }
        Ok(rec)
    }
}

/// Forwards a blocking pull's or build's progress to the client until the worker is done:
/// stages as they come, download byte counts and make output lines a few times a second.
async fn forward_pull_progress(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<PullProgress>,
    ctx: &OpCtx<'_>,
) {
    let mut last = Instant::now() - Duration::from_secs(1);
    let started = Instant::now();
    while let Some(p) = rx.recv().await {
        match p {
            PullProgress::Stage { stage, detail } => {
                let chatty = stage == banger_kernel::PullStage::Build;
                if !chatty || last.elapsed() > Duration::from_millis(300) {
                    last = Instant::now();
                    ctx.progress.stage(
                        &format!("kernel_{}", stage.as_str()),
                        Some(detail.chars().take(160).collect()),
                    );
                }
            }
            PullProgress::Download {
                stage, done, total, ..
            } => {
                if last.elapsed() > Duration::from_millis(250) || done == total {
                    last = Instant::now();
                    let rate = mib(done) / started.elapsed().as_secs_f64().max(0.001);
                    let detail = if total > 0 {
                        format!("{:.1} / {:.1} MiB, {rate:.1} MiB/s", mib(done), mib(total))
                    } else {
                        format!("{:.1} MiB, {rate:.1} MiB/s", mib(done))
                    };
                    ctx.progress
                        .stage(&format!("kernel_{}", stage.as_str()), Some(detail));
                }
            }
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Runs a long build command (argv, no shell), forwarding its output lines as progress details
/// (at most a few per second) and keeping the tail for the error message.
async fn run_streaming(
    program: &str,
    args: &[String],
    ctx: &OpCtx<'_>,
    stage: &str,
) -> OpResult<()> {
    let path = banger_sys::find_in_path(program).ok_or_else(|| {
        OpError::failed(format!(
            "{program} is not installed (apt-get install {})",
            package_of(program)
        ))
    })?;
    let mut command = tokio::process::Command::new(&path);
    // Its own process group: cancelling stops everything it started (apt, dpkg, ...), not
    // only the program itself.
    banger_sys::group::in_new_group(&mut command);
    let mut child = command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| OpError::failed(format!("running {program}: {e}")))?;
    let mut group = banger_sys::group::GroupGuard::new(&child);
    let stderr = child.stderr.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut out_lines = tokio::io::BufReader::new(stdout).lines();
    let mut tail: Vec<String> = Vec::new();
    let mut last = Instant::now() - Duration::from_secs(1);
    let mut out_open = true;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => match l { Ok(Some(l)) => l, _ => break },
            l = out_lines.next_line(), if out_open => match l { Ok(Some(l)) => l, _ => { out_open = false; continue } },
            _ = ctx.cancel.cancelled() => {
                // SIGTERM first: mmdebstrap then unmounts what it mounted in its tree.
                group.terminate(&mut child, Duration::from_secs(10)).await;
                return Err(OpError::failed(format!("{program} cancelled: the client went away")));
            }
        };
        if tail.len() >= 8 {
            tail.remove(0);
        }
        tail.push(line.clone());
        if last.elapsed() > Duration::from_millis(300) {
            last = Instant::now();
            ctx.progress
                .stage(stage, Some(line.chars().take(100).collect()));
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| OpError::failed(format!("waiting for {program}: {e}")))?;
    group.disarm();
    if !status.success() {
        return Err(OpError::failed(format!(
            "{program} failed ({status}): {}",
            tail.join(" | ")
        )));
    }
    Ok(())
}

/// Removes a build tree: processes in it killed, mounts under it detached, then deleted
/// without crossing a mount point ([`crate::build_dir`]).
async fn clean_build_tree(tree: &Path) -> OpResult<()> {
    let t = tree.to_path_buf();
    tokio::task::spawn_blocking(move || crate::build_dir::clean(&t))
        .await
        .map_err(|e| OpError::failed(format!("cleaning {}: {e}", tree.display())))?
        .map_err(|e| OpError::failed(format!("cleaning the build dir: {e}")))
}

fn package_of(program: &str) -> &'static str {
    match program {
        "mmdebstrap" => "mmdebstrap",
        "mkfs.ext4" => "e2fsprogs",
        _ => "the package providing it",
    }
}

/// Small fixes that make a bare Debian tree a good sandbox image. Per-VM identity is not here:
/// the guest agent writes it at every boot.
/// [`customize_rootfs`] as a layer on top of the mmdebstrap tarball (whiteouts for the
/// build-time host keys), for the unprivileged build.
fn customization_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, data)
            .expect("appending to an in-memory tar cannot fail");
    };
    for key in ["ecdsa", "ed25519", "rsa", "dsa"] {
        for suffix in ["", ".pub"] {
            file(
                &mut tar,
                &format!("etc/ssh/.wh.ssh_host_{key}_key{suffix}"),
                b"",
            );
        }
    }
    file(&mut tar, "etc/hostname", b"banger\n");
    file(
        &mut tar,
        "etc/fstab",
        b"# banger mounts / and /root from its initramfs\n",
    );
    file(&mut tar, "etc/machine-id", b"");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_link(
        &mut h,
        "etc/systemd/system/serial-getty@ttyS0.service",
        "/dev/null",
    )
    .expect("appending to an in-memory tar cannot fail");
    tar.into_inner()
        .expect("finishing an in-memory tar cannot fail")
}

fn customize_rootfs(root: &Path) -> std::io::Result<()> {
    // Keys generated at build time would be shared by every VM; the agent writes a per-VM one.
    for entry in std::fs::read_dir(root.join("etc/ssh"))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path())?;
        }
    }
    std::fs::write(root.join("etc/hostname"), "banger\n")?;
    std::fs::write(
        root.join("etc/fstab"),
        "# banger mounts / and /root from its initramfs\n",
    )?;
    // Each VM gets its own machine-id from the agent; an empty one here marks the image generic.
    std::fs::write(root.join("etc/machine-id"), "")?;
    // No udev in a minimal image, so dev-ttyS0.device never appears and a serial getty would
    // keep the boot "starting" forever; the console is a log (the VMM's stdin is closed), so
    // nobody could log in on it anyway.
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units)?;
    let masked = units.join("serial-getty@ttyS0.service");
    if std::fs::symlink_metadata(&masked).is_err() {
        std::os::unix::fs::symlink("/dev/null", &masked)?;
    }
    Ok(())
}

pub(super) fn dir_size(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            // Every inode costs at least a block.
            total += m.len().max(4096);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_kernels_are_reserved_in_the_config() {
        for (name, _) in KERNEL_CATALOG {
            assert!(
                banger_config::Config::BUILTIN_KERNELS.contains(name),
                "{name} is not in Config::BUILTIN_KERNELS"
            );
        }
    }
}
