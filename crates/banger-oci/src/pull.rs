//! [`Puller`]: resolve a reference to a linux/amd64 manifest, then fetch its config and layers
//! into the [`BlobCache`].

use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use tokio_util::sync::CancellationToken;

use crate::auth::DockerCredentials;
use crate::cache::{BlobCache, digest_hex};
use crate::manifest::{
    ACCEPTED_MANIFESTS, Descriptor, ImageConfig, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Parsed,
    check_descriptor, check_manifest, parse_document, select_platform,
};
use crate::reference::split_port;
use crate::{OciError, Reference};

/// At most this many layers download at once: enough to hide per-request latency, few enough
/// not to split a slow link into many slower streams.
const LAYER_CONCURRENCY: usize = 3;
/// Progress events for one blob are at least this far apart (plus one at the start and one at
/// the end), whatever the chunk size.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout (TCP and TLS handshake) for HTTPS to a loopback registry. The usual mistake
/// there is a plain-HTTP registry without `--insecure`: the server then waits for a request
/// line that never comes while we wait for a ServerHello, until a timeout. Loopback handshakes
/// take milliseconds, so fail fast and say what is probably wrong.
const LOOPBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest silence in the middle of a response before the pull fails: a registry that stops
/// sending must not hang a VM create forever.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How a pull may talk to the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullPolicy {
    /// The user's `--insecure`: plain HTTP to a loopback registry.
    pub insecure: bool,
    /// Registries (`host` or `host:port`) from the config that are always spoken to over plain
    /// HTTP.
    pub insecure_registries: Vec<String>,
}

impl PullPolicy {
    /// Whether the registry of `reference` is spoken to over plain HTTP (`Ok(false)`: HTTPS
    /// with certificates checked against the system's trust store). `--insecure` alone only
    /// covers loopback registries, so a typo'd or hijacked name can never downgrade a remote
    /// pull; remote plain-HTTP registries must be listed in the config.
    pub fn plain_http(&self, reference: &Reference) -> Result<bool, OciError> {
        let registry = reference.registry.to_ascii_lowercase();
        let host = split_port(&registry).0;
        let listed = self.insecure_registries.iter().any(|entry| {
            let entry = entry.trim().to_ascii_lowercase();
            let entry = entry
                .strip_prefix("http://")
                .or_else(|| entry.strip_prefix("https://"))
                .unwrap_or(&entry)
                .trim_end_matches('/');
            // `host:port` must match exactly; a bare `host` covers all of its ports.
            entry == registry || entry == host
        });
        if listed {
            return Ok(true);
        }
        if self.insecure {
            if reference.is_loopback() {
                return Ok(true);
            }
            return Err(OciError::InsecureNotAllowed {
                registry: reference.registry.clone(),
            });
        }
        Ok(false)
    }
}

/// Progress of a pull, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is known: how many layers and how many bytes (compressed) they are.
    Resolved {
        manifest_digest: String,
        layers: usize,
        total_bytes: u64,
    },
    /// A layer is downloading: `done` of `total` bytes. Throttled to a few per second.
    Blob {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer is in the cache; `cached` when this pull did not download it (it was there, or
    /// a concurrent pull fetched it).
    BlobDone { digest: String, cached: bool },
}

/// A layer in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    pub digest: String,
    /// As in the manifest (gzip, zstd or plain tar).
    pub media_type: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// `<cache_dir>/blobs/sha256/<hex>`.
    pub path: PathBuf,
}

/// The result of a pull: everything is in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The fully qualified reference that was pulled.
    pub reference: String,
    /// The linux/amd64 image manifest's digest (pin it to pull the same image again).
    pub manifest_digest: String,
    /// The index's digest when the reference named an index.
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<CachedLayer>,
}

/// Pulls images into a blob cache. Share one (`Arc`) between tasks: concurrent pulls then
/// download each blob once, and reuse connections and tokens.
pub struct Puller {
    cache: BlobCache,
    credentials: DockerCredentials,
    https: oci_client::Client,
    https_loopback: oci_client::Client,
    http: oci_client::Client,
    /// One async mutex per blob being fetched in this process (single flight). Weak, so an
    /// entry lives only while some pull holds or waits for it.
    inflight: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("cache", &self.cache)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

type Progress<'a> = &'a (dyn Fn(PullEvent) + Send + Sync);

/// What one pull talks to.
struct Ctx<'a> {
    reference: &'a Reference,
    oci_ref: oci_client::Reference,
    client: &'a oci_client::Client,
    auth: RegistryAuth,
    plain_http: bool,
    has_credentials: bool,
}

impl Puller {
    /// A puller caching blobs under `cache_dir/blobs/sha256`, with the `auths` of the docker
    /// config at `docker_config` (a missing file means anonymous pulls; finding the file,
    /// including `$DOCKER_CONFIG`, is the caller's job).
    pub fn new(cache_dir: &Path, docker_config: Option<PathBuf>) -> Result<Puller, OciError> {
        let credentials = match docker_config {
            Some(path) => DockerCredentials::load(&path)?,
            None => DockerCredentials::none(),
        };
        Self::with_credentials(cache_dir, credentials)
    }

    /// Like [`Puller::new`] with credentials already loaded.
    pub fn with_credentials(
        cache_dir: &Path,
        credentials: DockerCredentials,
    ) -> Result<Puller, OciError> {
        for note in credentials.notes() {
            tracing::warn!("docker config: {note}");
        }
        install_crypto_provider();
        Ok(Puller {
            cache: BlobCache::open(cache_dir)?,
            credentials,
            https: build_client(ClientProtocol::Https, CONNECT_TIMEOUT)?,
            https_loopback: build_client(ClientProtocol::Https, LOOPBACK_CONNECT_TIMEOUT)?,
            http: build_client(ClientProtocol::Http, CONNECT_TIMEOUT)?,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    pub fn cache(&self) -> &BlobCache {
        &self.cache
    }

    pub fn credentials(&self) -> &DockerCredentials {
        &self.credentials
    }

    /// Pulls the linux/amd64 image of `reference` into the cache. Stops when `cancel` fires,
    /// removing its partial files, and returns [`OciError::Cancelled`].
    pub async fn pull(
        &self,
        reference: &Reference,
        policy: &PullPolicy,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<PulledImage, OciError> {
        if cancel.is_cancelled() {
            return Err(OciError::Cancelled);
        }
        // Dropping the pull future is the cancellation: every partial file, lock and
        // single-flight slot is a guard that cleans up in `Drop`, so this stops at once (not at
        // the next chunk) and leaves nothing behind.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(OciError::Cancelled),
            r = self.pull_inner(reference, policy, progress) => r,
        }
    }

    async fn pull_inner(
        &self,
        reference: &Reference,
        policy: &PullPolicy,
        progress: Progress<'_>,
    ) -> Result<PulledImage, OciError> {
        // The fields are public: re-check that they still form a valid reference before they
        // become URLs and cache paths.
        let checked: Reference = reference.to_string().parse()?;
        let reference = &checked;
        let plain_http = policy.plain_http(reference)?;
        let creds = self.credentials.get(&reference.registry);
        let ctx = Ctx {
            reference,
            oci_ref: reference.to_oci(),
            client: match (plain_http, reference.is_loopback()) {
                (true, _) => &self.http,
                (false, true) => &self.https_loopback,
                (false, false) => &self.https,
            },
            auth: creds.map_or(RegistryAuth::Anonymous, |c| {
                RegistryAuth::Basic(c.username.clone(), c.password.clone())
            }),
            plain_http,
            has_credentials: creds.is_some(),
        };

        let (body, digest) = ctx.manifest(&ctx.oci_ref).await?;
        let (manifest_digest, index_digest, config, layers) =
            match parse_document(&body).map_err(|m| ctx.unsupported(m))? {
                Parsed::Manifest { config, layers } => (digest, None, config, layers),
                Parsed::Index(entries) => {
                    let entry = select_platform(&entries).map_err(|available| {
                        OciError::NoMatchingPlatform {
                            reference: reference.to_string(),
                            available,
                        }
                    })?;
                    check_descriptor(entry).map_err(|m| ctx.unsupported(m))?;
                    ctx.check_size("manifest", entry, MAX_MANIFEST_BYTES)?;
                    let child = ctx.oci_ref.clone_with_digest(entry.digest.clone());
                    // oci-client checks that the body hashes to the digest we asked for.
                    let (body, child_digest) = ctx.manifest(&child).await?;
                    match parse_document(&body).map_err(|m| ctx.unsupported(m))? {
                        Parsed::Manifest { config, layers } => {
                            (child_digest, Some(digest), config, layers)
                        }
                        Parsed::Index(_) => {
                            return Err(ctx.unsupported(format!(
                                "the index's linux/amd64 entry {} is itself an index",
                                entry.digest
                            )));
                        }
                    }
                }
            };
        check_manifest(&config, &layers).map_err(|m| ctx.unsupported(m))?;
        ctx.check_size("config", &config, MAX_CONFIG_BYTES)?;
        progress(PullEvent::Resolved {
            manifest_digest: manifest_digest.clone(),
            layers: layers.len(),
            total_bytes: layers.iter().map(desc_size).sum(),
        });

        let (config_path, _) = self.fetch_blob(&ctx, &config, None).await?;
        let config_bytes = tokio::fs::read(&config_path)
            .await
            .map_err(|e| OciError::io(format!("reading {}", config_path.display()), e))?;
        let image_config =
            ImageConfig::parse(&config_bytes).map_err(|message| OciError::InvalidConfig {
                reference: reference.to_string(),
                digest: config.digest.clone(),
                message,
            })?;
        // Empty means "not said" (some hand-made images); anything else must be linux/amd64.
        let os_ok = image_config.os.is_empty() || image_config.os == "linux";
        let arch_ok = image_config.architecture.is_empty() || image_config.architecture == "amd64";
        if !(os_ok && arch_ok) {
            return Err(ctx.unsupported(format!(
                "the image is for {}/{}, banger runs linux/amd64",
                image_config.os, image_config.architecture
            )));
        }

        // A few layers at a time, results in the manifest's order. On the first error the
        // other downloads are dropped (their guards clean up). An explicit queue rather than
        // `stream::iter(..).buffered(..)`: the closure version makes this future's `Send`
        // proof fail for callers that `tokio::spawn` it.
        let mut queue = layers.iter();
        let mut running = futures::stream::FuturesOrdered::new();
        for layer in queue.by_ref().take(LAYER_CONCURRENCY) {
            running.push_back(self.fetch_layer(&ctx, layer, progress));
        }
        let mut cached = Vec::with_capacity(layers.len());
        while let Some(result) = running.next().await {
            cached.push(result?);
            if let Some(layer) = queue.next() {
                running.push_back(self.fetch_layer(&ctx, layer, progress));
            }
        }

        Ok(PulledImage {
            reference: reference.to_string(),
            manifest_digest,
            index_digest,
            config_digest: config.digest.clone(),
            config: image_config,
            layers: cached,
        })
    }

    async fn fetch_layer(
        &self,
        ctx: &Ctx<'_>,
        layer: &Descriptor,
        progress: Progress<'_>,
    ) -> Result<CachedLayer, OciError> {
        let (path, was_cached) = self.fetch_blob(ctx, layer, Some(progress)).await?;
        progress(PullEvent::BlobDone {
            digest: layer.digest.clone(),
            cached: was_cached,
        });
        Ok(CachedLayer {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: desc_size(layer),
            path,
        })
    }

    /// The single-flight slot of blob `hex`.
    fn gate(&self, hex: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gate) = map.get(hex).and_then(Weak::upgrade) {
            return gate;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(hex.to_string(), Arc::downgrade(&gate));
        gate
    }

    /// Makes sure blob `desc` is in the cache; `true` when it was not downloaded by this call.
    ///
    /// Order: cache hit → in-process single flight (a second pull of the same blob waits for the
    /// first; if the first fails or is cancelled its guard is released and the waiter, finding
    /// the cache still empty, downloads itself) → cross-process flock → cache re-check →
    /// download.
    async fn fetch_blob(
        &self,
        ctx: &Ctx<'_>,
        desc: &Descriptor,
        progress: Option<Progress<'_>>,
    ) -> Result<(PathBuf, bool), OciError> {
        let hex = digest_hex(&desc.digest)?;
        let size = desc_size(desc);
        if let Some(path) = self.cache.lookup(hex, size, false)? {
            return Ok((path, true));
        }
        let gate = self.gate(hex);
        let _in_process = gate.lock().await;
        if let Some(path) = self.cache.lookup(hex, size, false)? {
            return Ok((path, true));
        }
        let _cross_process = self.cache.lock(hex).await?;
        if let Some(path) = self.cache.lookup(hex, size, true)? {
            return Ok((path, true));
        }
        let path = self.download(ctx, desc, hex, size, progress).await?;
        Ok((path, false))
    }

    async fn download(
        &self,
        ctx: &Ctx<'_>,
        desc: &Descriptor,
        hex: &str,
        size: u64,
        progress: Option<Progress<'_>>,
    ) -> Result<PathBuf, OciError> {
        let mut stream = ctx
            .client
            .pull_blob_stream(&ctx.oci_ref, desc.digest.as_str())
            .await
            .map_err(|e| ctx.map_err(e, Some(&desc.digest)))?;
        if let Some(len) = stream.content_length
            && len != size
        {
            return Err(ctx.size_mismatch(desc, len));
        }
        let mut writer = self.cache.writer(hex)?;
        let mut ticker = Ticker::new(progress, &desc.digest, size);
        let mut done = 0u64;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    done += chunk.len() as u64;
                    if done > size {
                        return Err(ctx.size_mismatch(desc, done));
                    }
                    writer.write(chunk).await?;
                    ticker.tick(done);
                }
                Err(e) => {
                    // oci-client verifies the digest too and fails the stream at its end; our
                    // own check gives the better message.
                    if done == size {
                        let written = writer.finish().await?;
                        if written.digest != desc.digest {
                            return Err(ctx.digest_mismatch(desc, written.digest));
                        }
                    }
                    return Err(ctx.stream_error(&e, &desc.digest));
                }
            }
        }
        if done != size {
            return Err(ctx.size_mismatch(desc, done));
        }
        let written = writer.finish().await?;
        if written.digest != desc.digest || written.size != size {
            return Err(ctx.digest_mismatch(desc, written.digest));
        }
        let path = writer.commit()?;
        ticker.finish();
        Ok(path)
    }
}

fn desc_size(d: &Descriptor) -> u64 {
    // check_descriptor rejected negative sizes before any blob is fetched.
    u64::try_from(d.size).unwrap_or(0)
}

/// Throttled [`PullEvent::Blob`] events for one blob.
struct Ticker<'a> {
    progress: Option<Progress<'a>>,
    digest: &'a str,
    total: u64,
    last: Instant,
}

impl<'a> Ticker<'a> {
    fn new(progress: Option<Progress<'a>>, digest: &'a str, total: u64) -> Ticker<'a> {
        if let Some(p) = progress {
            p(PullEvent::Blob {
                digest: digest.to_string(),
                done: 0,
                total,
            });
        }
        Ticker {
            progress,
            digest,
            total,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, done: u64) {
        if let Some(p) = self.progress
            && self.last.elapsed() >= PROGRESS_INTERVAL
            && done < self.total
        {
            self.last = Instant::now();
            p(PullEvent::Blob {
                digest: self.digest.to_string(),
                done,
                total: self.total,
            });
        }
    }

    fn finish(&self) {
        if let Some(p) = self.progress {
            p(PullEvent::Blob {
                digest: self.digest.to_string(),
                done: self.total,
                total: self.total,
            });
        }
    }
}

impl Ctx<'_> {
    async fn manifest(
        &self,
        oci_ref: &oci_client::Reference,
    ) -> Result<(bytes::Bytes, String), OciError> {
        let (body, digest) = self
            .client
            .pull_manifest_raw(oci_ref, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.map_err(e, None))?;
        // oci-client has read the body by now (its API buffers manifests); the limit still
        // keeps an oversized document from being parsed and acted on. Index entries are
        // checked against their descriptor size before they are fetched.
        if body.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(OciError::TooLarge {
                reference: self.reference.to_string(),
                what: "manifest",
                digest,
                size: body.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        Ok((body, digest))
    }

    fn check_size(&self, what: &'static str, d: &Descriptor, limit: u64) -> Result<(), OciError> {
        let size = desc_size(d);
        if size > limit {
            return Err(OciError::TooLarge {
                reference: self.reference.to_string(),
                what,
                digest: d.digest.clone(),
                size,
                limit,
            });
        }
        Ok(())
    }

    fn unsupported(&self, message: String) -> OciError {
        OciError::Unsupported {
            reference: self.reference.to_string(),
            message,
        }
    }

    fn size_mismatch(&self, d: &Descriptor, got: u64) -> OciError {
        OciError::SizeMismatch {
            reference: self.reference.to_string(),
            digest: d.digest.clone(),
            expected: desc_size(d),
            got,
        }
    }

    fn digest_mismatch(&self, d: &Descriptor, got: String) -> OciError {
        OciError::DigestMismatch {
            reference: self.reference.to_string(),
            expected: d.digest.clone(),
            got,
        }
    }

    fn registry_error(&self, message: String) -> OciError {
        OciError::Registry {
            reference: self.reference.to_string(),
            message,
        }
    }

    fn unauthorized(&self, detail: Option<&str>) -> OciError {
        let registry = &self.reference.registry;
        let mut message = if self.has_credentials {
            format!("access denied with the docker config's credentials for {registry}")
        } else {
            format!(
                "access denied to an anonymous pull (does the repository exist? if it is private, run `docker login {registry}`)"
            )
        };
        if let Some(d) = detail.filter(|d| !d.is_empty()) {
            message.push_str(&format!(": {d}"));
        }
        OciError::Unauthorized {
            reference: self.reference.to_string(),
            message,
        }
    }

    fn not_found(&self, blob: Option<&str>, code: Option<&OciErrorCode>) -> OciError {
        let message = match (blob, code) {
            (Some(d), _) => format!("blob {d} is unknown to the registry"),
            (None, Some(OciErrorCode::NameUnknown)) => {
                "repository unknown (is the name right?)".to_string()
            }
            _ if self.reference.digest.is_some() => {
                "manifest unknown (is the digest in this repository?)".to_string()
            }
            _ => "manifest unknown (does the tag exist?)".to_string(),
        };
        OciError::NotFound {
            reference: self.reference.to_string(),
            message,
        }
    }

    /// Turns oci-client's error into ours, saying what failed in words a user can act on.
    fn map_err(&self, e: OciDistributionError, blob: Option<&str>) -> OciError {
        match e {
            OciDistributionError::RegistryError { envelope, .. } => {
                let first = envelope.errors.first();
                match first.map(|e| &e.code) {
                    Some(
                        code @ (OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound),
                    ) => self.not_found(blob, Some(code)),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        self.unauthorized(first.map(|e| e.message.as_str()))
                    }
                    Some(OciErrorCode::Toomanyrequests) => self.registry_error(format!(
                        "rate limited by the registry: {}",
                        first.map_or("", |e| e.message.as_str())
                    )),
                    _ => self.registry_error(
                        envelope
                            .errors
                            .iter()
                            .map(|e| format!("{:?}: {}", e.code, e.message))
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => self.not_found(blob, None),
                401 | 403 => self.unauthorized(None),
                429 => self.registry_error("rate limited by the registry (HTTP 429)".into()),
                _ => self.registry_error(format!("HTTP {code}: {}", short(&message))),
            },
            OciDistributionError::UnauthorizedError { .. } => self.unauthorized(None),
            OciDistributionError::AuthenticationFailure(reason) => {
                self.unauthorized(Some(&format!("authentication failed: {}", short(&reason))))
            }
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => OciError::DigestMismatch {
                reference: self.reference.to_string(),
                expected,
                got: actual,
            },
            OciDistributionError::RequestError(e) => self.network_error(&e),
            OciDistributionError::IoError(e) => self.network_error(&e),
            other => self.registry_error(other.to_string()),
        }
    }

    fn stream_error(&self, e: &io::Error, digest: &str) -> OciError {
        match self.network_error(e) {
            OciError::Network { registry, message } => OciError::Network {
                registry,
                message: format!("downloading blob {digest}: {message}"),
            },
            other => other,
        }
    }

    /// A transport failure, described by its innermost cause ("connection refused", "timed
    /// out", the TLS alert) rather than reqwest's outer "error sending request".
    fn network_error(&self, e: &(dyn StdError + 'static)) -> OciError {
        let mut kind = None;
        let mut tls = false;
        let mut timeout = false;
        let mut innermost = e.to_string();
        let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                kind = Some(io.kind());
            }
            if err.downcast_ref::<rustls::Error>().is_some() {
                tls = true;
            }
            timeout |= err.to_string().contains("timed out");
            innermost = err.to_string();
            // io::Error::source() skips the error it wraps; look inside it explicitly so a
            // rustls error under an io::Error is found.
            cur = match err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => err.source(),
            };
        }
        let mut message = match kind {
            Some(io::ErrorKind::ConnectionRefused) => "connection refused".to_string(),
            Some(io::ErrorKind::ConnectionReset) => "connection reset by the registry".to_string(),
            Some(io::ErrorKind::TimedOut) => "timed out".to_string(),
            _ if timeout => "timed out".to_string(),
            _ if tls => format!("TLS error: {innermost}"),
            _ => innermost,
        };
        if (tls || timeout || kind == Some(io::ErrorKind::TimedOut))
            && !self.plain_http
            && self.reference.is_loopback()
        {
            message.push_str(" (if this registry serves plain HTTP, pass --insecure)");
        }
        OciError::Network {
            registry: self.reference.registry.clone(),
            message,
        }
    }
}

/// The first line of a server's message, capped: error bodies can be whole HTML pages.
fn short(s: &str) -> String {
    let line = s.trim().lines().next().unwrap_or("");
    let mut out: String = line.chars().take(200).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

/// reqwest is built with `rustls-no-provider` (see the crate docs): it uses rustls's
/// process-wide default crypto provider, which we set to ring unless the program already chose
/// one.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn build_client(
    protocol: ClientProtocol,
    connect_timeout: Duration,
) -> Result<oci_client::Client, OciError> {
    let config = ClientConfig {
        protocol,
        connect_timeout: Some(connect_timeout),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("banger/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    // Not `Client::new`: it silently falls back to a default client when the config fails.
    oci_client::Client::try_from(config).map_err(|e| OciError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_policy() {
        let r = |s: &str| s.parse::<Reference>().unwrap();
        let p = PullPolicy::default();
        assert!(
            !p.plain_http(&r("localhost:5000/x")).unwrap(),
            "HTTPS by default"
        );
        let insecure = PullPolicy {
            insecure: true,
            insecure_registries: vec![],
        };
        assert!(insecure.plain_http(&r("localhost:5000/x")).unwrap());
        assert!(insecure.plain_http(&r("127.0.0.1:5000/x")).unwrap());
        assert!(insecure.plain_http(&r("[::1]:5000/x")).unwrap());
        let e = insecure
            .plain_http(&r("registry.example:5000/x"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("registry.example:5000") && e.contains("insecure_registries"),
            "{e}"
        );
        let listed = PullPolicy {
            insecure: false,
            insecure_registries: vec![
                "registry.example:5000".into(),
                "http://other.example/".into(),
            ],
        };
        assert!(listed.plain_http(&r("registry.example:5000/x")).unwrap());
        assert!(!listed.plain_http(&r("registry.example:6000/x")).unwrap());
        assert!(listed.plain_http(&r("other.example:1234/x")).unwrap());
        assert!(!listed.plain_http(&r("ghcr.io/x/y")).unwrap());
    }

    #[test]
    fn short_messages() {
        assert_eq!(short("  a\nb"), "a");
        assert_eq!(short(&"x".repeat(300)).chars().count(), 201);
    }
}
