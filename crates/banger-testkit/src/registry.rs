//! A throw-away OCI registry for tests: Debian's `docker-registry` (distribution v2.8) on a
//! loopback port, with filesystem storage in a temp dir, behind a small counting proxy.
//!
//! The proxy is what tests talk to ([`LocalRegistry::addr`]). It parses each HTTP/1.1
//! request head before forwarding it, so [`LocalRegistry::blob_gets`] is exact the moment a
//! client has received an answer (no log scraping, no race with the registry's log writer).
//! It can also slow responses down ([`LocalRegistry::set_throttle`]) so a test can cancel a
//! download half-way. Pushes go straight to the registry and are not counted.
//!
//! ```no_run
//! use banger_testkit::registry::{LocalRegistry, tar_with_files};
//! let reg = match LocalRegistry::start() {
//!     Ok(r) => r,
//!     Err(why) => { println!("SKIP: {why}"); return; }
//! };
//! let layer = tar_with_files(&[("etc/hostname", b"x\n")]);
//! let digest = reg.push("app", "1", &[layer], serde_json::json!({"Cmd": ["sh"]}));
//! // pull `{reg.addr()}/app:1` with --insecure ...
//! # let _ = digest;
//! ```

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The user and password of [`LocalRegistry::start_with_basic_auth`].
pub const TEST_USER: &str = "banger";
pub const TEST_PASSWORD: &str = "banger-secret";
/// bcrypt (cost 4, the minimum: the registry checks it on every request) of [`TEST_PASSWORD`];
/// the registry's htpasswd backend only takes bcrypt.
const TEST_PASSWORD_BCRYPT: &str = "$2b$04$yNzSFSxzK7MIvlPJA95JIuJw/u6QKlbDGe.0IudxyiKOlGJhfsxQO";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar archive of regular files (`0644`, parent dirs implied), for layer contents.
pub fn tar_with_files(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).expect("append to tar");
    }
    b.into_inner().expect("finish tar")
}

/// `len` bytes of deterministic noise (xorshift): incompressible like real binaries, and far
/// faster than a CSPRNG in an unoptimised test build.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A layer to push.
#[derive(Debug, Clone)]
pub enum TestLayer {
    /// Tar bytes, gzipped on push (`…tar+gzip`, or Docker's `rootfs.diff.tar.gzip`).
    Gzip(Vec<u8>),
    /// Tar bytes pushed as they are (`application/vnd.oci.image.layer.v1.tar`): no compression
    /// cost for big test layers.
    Tar(Vec<u8>),
}

/// An image to push with [`LocalRegistry::push_image`].
#[derive(Debug, Clone)]
pub struct TestImage {
    pub layers: Vec<TestLayer>,
    /// The image config's `config` object (`Env`, `Cmd`, `WorkingDir`, `User`, …).
    pub config: Value,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// Docker v2 schema 2 media types instead of OCI ones.
    pub docker_media_types: bool,
}

impl TestImage {
    /// A linux/amd64 OCI image.
    pub fn new(layers: Vec<TestLayer>, config: Value) -> TestImage {
        TestImage {
            layers,
            config,
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            docker_media_types: false,
        }
    }
}

/// What [`LocalRegistry::push_image`] pushed.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub manifest_media_type: String,
    pub config_digest: String,
    /// As pushed (compressed), bottom layer first.
    pub layer_digests: Vec<String>,
}

/// What [`LocalRegistry::push_index`] pushed.
#[derive(Debug, Clone)]
pub struct PushedIndex {
    pub index_digest: String,
    /// `("linux/arm64/v8", image)` per entry, in index order.
    pub manifests: Vec<(String, PushedImage)>,
}

/// A running registry. Dropping it kills the registry, stops the proxy and removes the temp
/// dir.
pub struct LocalRegistry {
    child: Child,
    dir: tempfile::TempDir,
    backend: SocketAddr,
    proxy: Proxy,
    auth: bool,
    agent: ureq::Agent,
}

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRegistry")
            .field("addr", &self.proxy.addr)
            .field("backend", &self.backend)
            .field("dir", &self.dir.path())
            .field("auth", &self.auth)
            .finish()
    }
}

/// The registry binary: Debian's package installs `/usr/bin/docker-registry`; upstream builds
/// call it `registry`.
fn registry_binary() -> Option<PathBuf> {
    ["docker-registry", "registry"]
        .into_iter()
        .find_map(|name| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
}

impl LocalRegistry {
    /// Starts an anonymous registry. `Err` says why it cannot (callers print `SKIP: …`).
    pub fn start() -> Result<LocalRegistry, String> {
        Self::start_inner(false)
    }

    /// Starts a registry that requires HTTP Basic auth ([`TEST_USER`] / [`TEST_PASSWORD`]).
    /// distribution's htpasswd backend works without TLS (it only logs a warning).
    pub fn start_with_basic_auth() -> Result<LocalRegistry, String> {
        Self::start_inner(true)
    }

    fn start_inner(auth: bool) -> Result<LocalRegistry, String> {
        let bin = registry_binary()
            .ok_or("docker-registry not installed (apt-get install docker-registry)")?;
        let dir = tempfile::Builder::new()
            .prefix("banger-registry")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        if auth {
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("{TEST_USER}:{TEST_PASSWORD_BCRYPT}\n"),
            )
            .map_err(|e| format!("writing htpasswd: {e}"))?;
        }
        // The port is picked by binding :0 and released before the registry binds it, so
        // another process may grab it in between: retry a few times.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port: {e}"))?
                .port();
            let backend: SocketAddr = ([127, 0, 0, 1], port).into();
            let config = dir.path().join("config.yml");
            std::fs::write(&config, registry_config(dir.path(), backend, auth))
                .map_err(|e| format!("writing registry config: {e}"))?;
            let log = std::fs::File::create(dir.path().join("registry.log"))
                .map_err(|e| format!("creating registry log: {e}"))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log);
            // The registry reads REGISTRY_* variables as config overrides.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(k);
                }
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting {}: {e}", bin.display()))?;
            match wait_ready(backend, &mut child) {
                Ok(()) => {
                    let proxy = Proxy::start(backend).map_err(|e| format!("proxy: {e}"))?;
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    return Ok(LocalRegistry {
                        child,
                        dir,
                        backend,
                        proxy,
                        auth,
                        agent,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.path().join("registry.log"))
                        .unwrap_or_default();
                    last_err = format!("{e}; registry log:\n{log}");
                }
            }
        }
        Err(format!("docker-registry did not start: {last_err}"))
    }

    /// `127.0.0.1:PORT` of the (counting) proxy: what clients should pull from.
    pub fn addr(&self) -> String {
        self.proxy.addr.to_string()
    }

    /// The registry itself, bypassing the proxy (not counted, not throttled).
    pub fn backend_addr(&self) -> String {
        self.backend.to_string()
    }

    /// The credentials the registry requires, if any.
    pub fn credentials(&self) -> Option<(&'static str, &'static str)> {
        self.auth.then_some((TEST_USER, TEST_PASSWORD))
    }

    /// A docker `config.json` with this registry's credentials (empty `auths` if it has none).
    pub fn docker_config(&self) -> Value {
        match self.credentials() {
            Some((u, p)) => json!({"auths": {
                self.addr(): {"auth": base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))}
            }}),
            None => json!({"auths": {}}),
        }
    }

    /// The registry's own log (stderr), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many `GET /v2/<repo>/blobs/<digest>` requests reached the registry.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.proxy
            .shared
            .blob_gets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .copied()
            .unwrap_or(0)
    }

    /// All blob GETs, any digest.
    pub fn total_blob_gets(&self) -> usize {
        self.proxy
            .shared
            .blob_gets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }

    /// Limits what the proxy sends to clients to about `bytes_per_sec` per connection (0: no
    /// limit). Applies at once, also to responses in flight.
    pub fn set_throttle(&self, bytes_per_sec: u64) {
        self.proxy
            .shared
            .throttle
            .store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Flips one byte in the middle of the stored blob (same size, wrong content), as disk
    /// corruption or a tampering mirror would.
    pub fn corrupt_blob(&self, digest: &str) {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let path = self
            .dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading stored blob {}: {e}", path.display()));
        assert!(!data.is_empty(), "cannot corrupt an empty blob");
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&path, data).expect("rewrite stored blob");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.backend)
    }

    fn with_auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match self.credentials() {
            Some((u, p)) => req.header(
                "Authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                ),
            ),
            None => req,
        }
    }

    /// Uploads a blob (monolithic: POST then PUT) unless the registry has it; returns its
    /// digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let head = self
            .with_auth(
                self.agent
                    .head(self.url(&format!("/v2/{repo}/blobs/{digest}"))),
            )
            .call()
            .expect("HEAD blob");
        if head.status() == 200 {
            return digest;
        }
        let mut start = self
            .with_auth(
                self.agent
                    .post(self.url(&format!("/v2/{repo}/blobs/uploads/"))),
            )
            .send_empty()
            .expect("POST blob upload");
        assert_eq!(
            start.status(),
            202,
            "starting upload: {}",
            start.body_mut().read_to_string().unwrap_or_default()
        );
        let location = start
            .headers()
            .get("Location")
            .and_then(|v| v.to_str().ok())
            .expect("upload Location")
            .to_string();
        let location = if location.starts_with('/') {
            self.url(&location)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut put = self
            .with_auth(self.agent.put(format!("{location}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .expect("PUT blob");
        assert_eq!(
            put.status(),
            201,
            "uploading blob {digest}: {}",
            put.body_mut().read_to_string().unwrap_or_default()
        );
        digest
    }

    /// Puts a manifest (any JSON, any media type) under `reference` (a tag or its digest);
    /// returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let mut resp = self
            .with_auth(
                self.agent
                    .put(self.url(&format!("/v2/{repo}/manifests/{reference}"))),
            )
            .header("Content-Type", media_type)
            .send(body)
            .expect("PUT manifest");
        assert_eq!(
            resp.status(),
            201,
            "pushing manifest {repo}:{reference}: {}",
            resp.body_mut().read_to_string().unwrap_or_default()
        );
        sha256_digest(body)
    }

    /// Pushes a linux/amd64 OCI image whose layers are the given tars (gzipped here) and whose
    /// config's `config` object is `config`; returns the manifest digest.
    pub fn push(&self, repo: &str, tag: &str, layers: &[Vec<u8>], config: Value) -> String {
        let image = TestImage::new(
            layers.iter().cloned().map(TestLayer::Gzip).collect(),
            config,
        );
        self.push_image(repo, Some(tag), &image).manifest_digest
    }

    /// Pushes an image; without a tag it is reachable only by digest (an index entry).
    pub fn push_image(&self, repo: &str, tag: Option<&str>, image: &TestImage) -> PushedImage {
        let (manifest_type, config_type, gzip_type) = if image.docker_media_types {
            (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP)
        } else {
            (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
        };
        let mut diff_ids = Vec::new();
        let mut descriptors = Vec::new();
        let mut layer_digests = Vec::new();
        for layer in &image.layers {
            let (tar, blob, media_type) = match layer {
                TestLayer::Gzip(tar) => (tar, gzip(tar), gzip_type),
                TestLayer::Tar(tar) => (tar, tar.clone(), OCI_LAYER_TAR),
            };
            // A pushed-as-is tar's diff id is its own digest: hash it once.
            let digest = self.push_blob(repo, &blob);
            diff_ids.push(if matches!(layer, TestLayer::Tar(_)) {
                digest.clone()
            } else {
                sha256_digest(tar)
            });
            descriptors
                .push(json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
            layer_digests.push(digest);
        }
        let mut config = json!({
            "architecture": image.architecture,
            "os": image.os,
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [],
        });
        if let Some(v) = &image.variant {
            config["variant"] = json!(v);
        }
        let config_bytes = serde_json::to_vec(&config).expect("config json");
        let config_digest = self.push_blob(repo, &config_bytes);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config_bytes.len()},
            "layers": descriptors,
        });
        let body = serde_json::to_vec(&manifest).expect("manifest json");
        let digest = sha256_digest(&body);
        let manifest_digest =
            self.push_manifest(repo, tag.unwrap_or(&digest), manifest_type, &body);
        PushedImage {
            manifest_digest,
            manifest_size: body.len() as u64,
            manifest_media_type: manifest_type.to_string(),
            config_digest,
            layer_digests,
        }
    }

    /// Pushes one small image per platform (`"linux/amd64"`, `"linux/arm64/v8"`, …: each with
    /// one layer holding `/platform` and a config saying that platform) and an OCI index of
    /// them under `tag`.
    pub fn push_index(&self, repo: &str, tag: &str, platforms: &[&str]) -> PushedIndex {
        let mut entries = Vec::new();
        let mut manifests = Vec::new();
        for platform in platforms {
            let mut parts = platform.split('/');
            let os = parts.next().expect("os/arch").to_string();
            let architecture = parts.next().expect("os/arch").to_string();
            let variant = parts.next().map(str::to_string);
            let layer = tar_with_files(&[("platform", platform.as_bytes())]);
            let image = TestImage {
                os: os.clone(),
                architecture: architecture.clone(),
                variant: variant.clone(),
                ..TestImage::new(
                    vec![TestLayer::Gzip(layer)],
                    json!({"Cmd": ["/bin/sh"], "Env": [format!("PLATFORM={platform}")]}),
                )
            };
            let pushed = self.push_image(repo, None, &image);
            let mut p = json!({"os": os, "architecture": architecture});
            if let Some(v) = &variant {
                p["variant"] = json!(v);
            }
            entries.push(json!({
                "mediaType": pushed.manifest_media_type,
                "digest": pushed.manifest_digest,
                "size": pushed.manifest_size,
                "platform": p,
            }));
            manifests.push((platform.to_string(), pushed));
        }
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
        let body = serde_json::to_vec(&index).expect("index json");
        PushedIndex {
            index_digest: self.push_manifest(repo, tag, OCI_INDEX, &body),
            manifests,
        }
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.proxy.stop();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_config(dir: &Path, addr: SocketAddr, auth: bool) -> String {
    let mut text = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: banger-test-registry\n\
         validation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\n",
        data = dir.join("data").display(),
    );
    if auth {
        text.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
            dir.join("htpasswd").display()
        ));
    }
    text
}

/// Waits until `GET /v2/` answers (200, or 401 with auth on).
fn wait_ready(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("the registry exited with {status}"));
        }
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let mut answer = String::new();
            if s.write_all(req.as_bytes()).is_ok() && s.read_to_string(&mut answer).is_ok() {
                let status = answer.split_whitespace().nth(1).unwrap_or("");
                if status == "200" || status == "401" {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no answer to GET /v2/ on {addr} within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct ProxyShared {
    backend: SocketAddr,
    blob_gets: Mutex<HashMap<String, usize>>,
    throttle: AtomicU64,
    stop: AtomicBool,
    /// The sockets of every open connection, by connection number, to shut them down when the
    /// registry goes away (threads blocked in reads then return).
    sockets: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_conn: AtomicU64,
}

struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(backend: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ProxyShared {
            backend,
            blob_gets: Mutex::new(HashMap::new()),
            throttle: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("registry-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let _ = serve_connection(&s, client);
                    });
                }
            })?;
        Ok(Proxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .flat_map(|(_, pair)| pair)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve_connection(shared: &Arc<ProxyShared>, client: TcpStream) -> io::Result<()> {
    let backend = TcpStream::connect(shared.backend)?;
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    shared
        .sockets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, [client.try_clone()?, backend.try_clone()?]);
    let (b_read, c_write) = (backend.try_clone()?, client.try_clone()?);
    let s = shared.clone();
    let down = std::thread::spawn(move || copy_responses(&s, b_read, c_write));
    let result = forward_requests(shared, client, backend);
    let _ = down.join();
    shared
        .sockets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    result
}

/// Client → registry: request by request, counting blob GETs before forwarding them.
fn forward_requests(
    shared: &ProxyShared,
    client: TcpStream,
    mut backend: TcpStream,
) -> io::Result<()> {
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                let _ = backend.shutdown(Shutdown::Write);
                return Ok(());
            }
            let blank = line == b"\r\n" || line == b"\n";
            if blank && head.is_empty() {
                continue; // stray CRLF between requests
            }
            head.extend_from_slice(&line);
            if blank {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.lines();
        let mut request_line = lines.next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("");
        let target = request_line.next().unwrap_or("");
        let mut content_length = 0u64;
        let mut chunked = false;
        for h in lines {
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        if method == "GET"
            && let Some(digest) = blob_digest(target)
        {
            *shared
                .blob_gets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(digest)
                .or_insert(0) += 1;
        }
        backend.write_all(&head)?;
        if chunked {
            copy_chunked(&mut reader, &mut backend)?;
        } else if content_length > 0 {
            io::copy(&mut (&mut reader).take(content_length), &mut backend)?;
        }
    }
}

/// `/v2/<name>/blobs/<digest>[?…]` → the digest (uploads excluded).
fn blob_digest(target: &str) -> Option<String> {
    let path = target.split('?').next()?;
    let (name, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    (!name.is_empty() && digest.starts_with("sha256:")).then(|| digest.to_string())
}

fn copy_chunked(reader: &mut BufReader<TcpStream>, out: &mut TcpStream) -> io::Result<()> {
    loop {
        let mut size_line = Vec::new();
        reader.read_until(b'\n', &mut size_line)?;
        out.write_all(&size_line)?;
        let text = String::from_utf8_lossy(&size_line);
        let size = u64::from_str_radix(text.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers, then the final CRLF.
            loop {
                let mut line = Vec::new();
                reader.read_until(b'\n', &mut line)?;
                out.write_all(&line)?;
                if line == b"\r\n" || line == b"\n" || line.is_empty() {
                    return Ok(());
                }
            }
        }
        io::copy(&mut reader.take(size + 2), out)?;
    }
}

/// Registry → client, raw bytes, paced when a throttle is set.
fn copy_responses(shared: &ProxyShared, mut backend: TcpStream, mut client: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let rate = shared.throttle.load(Ordering::Relaxed);
        // Small writes when throttled, so the pacing is smooth and a client sees a steady
        // trickle rather than bursts.
        let want = if rate > 0 {
            buf.len().min((rate / 20).max(512) as usize)
        } else {
            buf.len()
        };
        let n = match backend.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        if rate > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = client.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(blob_digest(&format!("/v2/x/y/blobs/{d}")), Some(d.clone()));
        assert_eq!(
            blob_digest(&format!("/v2/x/blobs/{d}?ns=1")),
            Some(d.clone())
        );
        assert_eq!(blob_digest("/v2/x/blobs/uploads/abc"), None);
        assert_eq!(blob_digest(&format!("/v2/x/manifests/{d}")), None);
    }

    #[test]
    fn noise_is_deterministic() {
        assert_eq!(pseudo_random(1000, 1), pseudo_random(1000, 1));
        assert_ne!(pseudo_random(1000, 1), pseudo_random(1000, 2));
        assert_eq!(pseudo_random(13, 1).len(), 13);
    }
}
