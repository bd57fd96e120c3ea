//! A Debian mirror as a source of signed package metadata and packages.
//!
//! Chain of trust: the archive keyring verifies `InRelease` (via `gpgv`), the signed text gives
//! the SHA256 and size of `Packages.xz`, and `Packages` gives the SHA256 and size of each `.deb`.
//! Nothing downloaded is used before its hash matched.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::deb822::{self, Release};
use crate::{KernelError, PullProgress, PullStage};

/// InRelease files are ~150 KiB; anything far larger is not one.
const MAX_INRELEASE: u64 = 32 << 20;
/// Uncompressed Packages files are ~50 MiB for bookworm main.
const MAX_PACKAGES: u64 = 1 << 30;
/// Report download progress at most this often (bytes).
const PROGRESS_STEP: u64 = 256 << 10;

/// Where and how to fetch Debian packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebianMirror {
    /// e.g. `http://deb.debian.org/debian`. Plain HTTP is fine: integrity comes from signatures.
    pub base_url: String,
    /// The release searched first, e.g. `bookworm`.
    pub suite: String,
    /// Further suites on the same mirror searched for a newer kernel, e.g. `bookworm-updates`.
    #[serde(default)]
    pub extra_suites: Vec<String>,
    pub arch: String,
    /// OpenPGP keyring `InRelease` must be signed with.
    pub keyring: PathBuf,
}

impl Default for DebianMirror {
    fn default() -> Self {
        DebianMirror {
            base_url: "http://deb.debian.org/debian".into(),
            suite: "bookworm".into(),
            extra_suites: Vec::new(),
            arch: "amd64".into(),
            keyring: "/usr/share/keyrings/debian-archive-keyring.gpg".into(),
        }
    }
}

/// The kernel package chosen from the index, with what is needed to fetch and check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    pub suite: String,
    /// e.g. `linux-image-6.1.0-28-cloud-amd64`.
    pub package: String,
    /// Debian version, e.g. `6.1.119-1`.
    pub package_version: String,
    /// Kernel release (`uname -r`), e.g. `6.1.0-28-cloud-amd64`.
    pub kernel_release: String,
    /// Path below the mirror root, e.g. `pool/main/l/linux-signed-amd64/....deb`.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
}

impl DebianMirror {
    /// The suites searched, first the main one.
    pub fn suites(&self) -> Vec<&str> {
        std::iter::once(self.suite.as_str())
            .chain(self.extra_suites.iter().map(String::as_str))
            .collect()
    }

    /// The metapackage that always depends on the current cloud kernel.
    pub fn meta_package(&self) -> String {
        format!("linux-image-cloud-{}", self.arch)
    }

    /// The absolute URL of `rel` (a path below the mirror root).
    pub fn url(&self, rel: &str) -> String {
        format!(
            "{}/{}",
            self.base_url.trim_end_matches('/'),
            rel.trim_start_matches('/')
        )
    }

    /// Whether the mirror answers at all (for tests and `doctor`).
    pub fn reachable(&self) -> bool {
        let url = self.url(&format!("dists/{}/InRelease", self.suite));
        agent(Duration::from_secs(10)).head(&url).call().is_ok()
    }

    /// Fetches `dists/<suite>/InRelease`, verifies its signature with the keyring and parses the
    /// signed text. `work` is a directory for the intermediate files.
    pub fn fetch_release(&self, suite: &str, work: &Path) -> Result<Release, KernelError> {
        let url = self.url(&format!("dists/{suite}/InRelease"));
        // Check the tools before the network, so a missing gpgv is the error shown.
        let gpgv = find_gpgv()?;
        if !self.keyring.is_file() {
            return Err(KernelError::MissingKeyring {
                path: self.keyring.clone(),
            });
        }
        let body = get_bytes(&url, MAX_INRELEASE)?;
        let signed = work.join(format!("InRelease-{suite}"));
        std::fs::write(&signed, &body).map_err(KernelError::io(&signed))?;
        let verified = work.join(format!("Release-{suite}"));
        verify_inrelease_with(&gpgv, &self.keyring, &signed, &verified, &url)?;
        let text = std::fs::read_to_string(&verified).map_err(KernelError::io(&verified))?;
        let release = Release::parse(&text).map_err(|e| KernelError::Release {
            url: url.clone(),
            message: e.to_string(),
        })?;
        check_suite(&release, suite).map_err(|message| KernelError::Release { url, message })?;
        Ok(release)
    }

    /// Fetches the `main` Packages index of `release` (xz preferred, else gzip), checks its size and
    /// SHA256 against the signed Release, and returns it decompressed.
    pub fn fetch_packages(
        &self,
        suite: &str,
        release: &Release,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<String, KernelError> {
        let dir = format!("main/binary-{}", self.arch);
        let (entry, format) = [
            ("Packages.xz", crate::Compression::Xz),
            ("Packages.gz", crate::Compression::Gzip),
        ]
        .into_iter()
        .find_map(|(name, f)| release.entry(&format!("{dir}/{name}")).map(|e| (e, f)))
        .ok_or_else(|| KernelError::Release {
            url: self.url(&format!("dists/{suite}/InRelease")),
            message: format!("lists no {dir}/Packages.xz or Packages.gz"),
        })?;
        // By-hash paths cannot change under us if the mirror updates in the middle of a pull.
        let rel = if release.acquire_by_hash {
            format!("dists/{suite}/{dir}/by-hash/SHA256/{}", entry.sha256)
        } else {
            format!("dists/{suite}/{}", entry.path)
        };
        let url = self.url(&rel);
        let mut report = |done, total| {
            progress(PullProgress::Download {
                stage: PullStage::Packages,
                url: url.clone(),
                done,
                total,
            })
        };
        let packed = match self.fetch_verified(
            &rel,
            entry.size,
            &entry.sha256,
            "Packages index",
            &mut report,
        ) {
            Err(KernelError::Http { .. }) if release.acquire_by_hash => {
                let plain = format!("dists/{suite}/{}", entry.path);
                self.fetch_verified(
                    &plain,
                    entry.size,
                    &entry.sha256,
                    "Packages index",
                    &mut report,
                )?
            }
            r => r?,
        };
        let text = crate::compress::decompress(format, &packed, MAX_PACKAGES, &url)?;
        String::from_utf8(text).map_err(|_| KernelError::Packages {
            url,
            message: "not UTF-8".into(),
        })
    }

    /// Fetches `rel` into memory and checks it against the expected size and SHA256 (lowercase
    /// hex). `what` names the file in errors.
    pub fn fetch_verified(
        &self,
        rel: &str,
        size: u64,
        sha256: &str,
        what: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<u8>, KernelError> {
        let url = self.url(rel);
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 30));
        let actual = stream_verified(&url, Some(size), size, what, &mut out, progress)?;
        check_digest(what, &url, sha256, &actual)?;
        Ok(out)
    }

    /// Downloads `rel` to `dest`, hashing while it streams into `dest` + `.part`; the file is
    /// renamed into place only when size and SHA256 match, and removed otherwise.
    pub fn download_verified(
        &self,
        rel: &str,
        size: u64,
        sha256: &str,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), KernelError> {
        let url = self.url(rel);
        let what = dest
            .file_name()
            .map_or_else(|| rel.to_string(), |n| n.to_string_lossy().into_owned());
        download_url_verified(&url, Some(size), size, sha256, dest, &what, progress)
    }

    /// Finds the newest cloud kernel package across the configured suites.
    pub fn resolve_cloud_kernel(
        &self,
        work: &Path,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<KernelPackage, KernelError> {
        let mut best: Option<KernelPackage> = None;
        for suite in self.suites() {
            progress(PullProgress::Stage {
                stage: PullStage::Release,
                detail: self.url(&format!("dists/{suite}/InRelease")),
            });
            let release = self.fetch_release(suite, work)?;
            let packages = self.fetch_packages(suite, &release, progress)?;
            progress(PullProgress::Stage {
                stage: PullStage::Resolve,
                detail: format!("{} in {suite}", self.meta_package()),
            });
            let url = self.url(&format!("dists/{suite}/main/binary-{}/Packages", self.arch));
            let found = resolve_kernel_package(&packages, &self.meta_package(), suite)
                .map_err(|message| KernelError::Packages { url, message })?;
            if let Some(k) = found {
                let newer = best.as_ref().is_none_or(|b| {
                    deb822::compare_versions(&k.package_version, &b.package_version).is_gt()
                });
                if newer {
                    best = Some(k);
                }
            }
        }
        best.ok_or_else(|| KernelError::Packages {
            url: self.url(&format!("dists/{}/", self.suite)),
            message: format!("no {} in suites {:?}", self.meta_package(), self.suites()),
        })
    }
}

/// Picks, from the text of a Packages index, the kernel that the newest `meta` package depends on.
/// `Ok(None)` when `meta` is not in the index. When the dependency names a package that is not in
/// the index but its `-unsigned` twin is, that one is taken (same kernel, no Secure Boot signature,
/// which a microVM does not use).
pub fn resolve_kernel_package(
    packages: &str,
    meta: &str,
    suite: &str,
) -> Result<Option<KernelPackage>, String> {
    let mut newest_meta: Option<(String, String)> = None;
    for stanza in deb822::parse_stanzas(packages) {
        let stanza = stanza.map_err(|e| e.to_string())?;
        if stanza.get("Package") != Some(meta) {
            continue;
        }
        let version = stanza
            .get("Version")
            .ok_or(format!("{meta} has no Version"))?;
        let depends = stanza.get("Depends").unwrap_or_default();
        if newest_meta
            .as_ref()
            .is_none_or(|(v, _)| deb822::compare_versions(version, v).is_gt())
        {
            newest_meta = Some((version.to_string(), depends.to_string()));
        }
    }
    let Some((meta_version, depends)) = newest_meta else {
        return Ok(None);
    };
    let target = deb822::parse_relations(&depends)
        .into_iter()
        .filter_map(|group| group.into_iter().next())
        .find(|r| r.name.starts_with("linux-image-") && r.name != meta)
        .ok_or(format!(
            "{meta} {meta_version} depends on no linux-image package: {depends:?}"
        ))?;
    let unsigned = format!("{}-unsigned", target.name);
    // (is the exact name, version, stanza fields)
    let mut best: Option<(bool, KernelPackage)> = None;
    for stanza in deb822::parse_stanzas(packages) {
        let stanza = stanza.map_err(|e| e.to_string())?;
        let Some(name) = stanza.get("Package") else {
            continue;
        };
        let exact = name == target.name;
        if !exact && name != unsigned {
            continue;
        }
        let field = |f: &str| stanza.get(f).ok_or(format!("{name} has no {f} field"));
        let version = field("Version")?;
        if let Some((op, want)) = &target.constraint
            && !deb822::satisfies(version, op, want)
        {
            continue;
        }
        let candidate = KernelPackage {
            suite: suite.to_string(),
            package: name.to_string(),
            package_version: version.to_string(),
            kernel_release: kernel_release_of(&target.name)?,
            filename: safe_pool_path(field("Filename")?)?,
            size: field("Size")?
                .parse()
                .map_err(|_| format!("{name} has a bad Size"))?,
            sha256: checked_sha256(field("SHA256")?).ok_or(format!("{name} has a bad SHA256"))?,
        };
        let better = match &best {
            None => true,
            Some((best_exact, b)) => {
                (exact && !best_exact)
                    || (exact == *best_exact
                        && deb822::compare_versions(version, &b.package_version).is_gt())
            }
        };
        if better {
            best = Some((exact, candidate));
        }
    }
    best.map(|(_, k)| Some(k)).ok_or(format!(
        "{meta} {meta_version} depends on {}{}, which is not in the index",
        target.name,
        target
            .constraint
            .map(|(op, v)| format!(" ({op} {v})"))
            .unwrap_or_default()
    ))
}

/// `linux-image-6.1.0-28-cloud-amd64[-unsigned]` → `6.1.0-28-cloud-amd64`, which becomes part of
/// file names, so only a conservative character set is accepted.
fn kernel_release_of(package: &str) -> Result<String, String> {
    let rel = package
        .strip_prefix("linux-image-")
        .map(|r| r.strip_suffix("-unsigned").unwrap_or(r))
        .unwrap_or_default();
    let ok = !rel.is_empty()
        && rel.chars().next().is_some_and(|c| c.is_ascii_digit())
        && rel
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if ok {
        Ok(rel.to_string())
    } else {
        Err(format!(
            "cannot derive a kernel release from package {package:?}"
        ))
    }
}

/// A validly signed Release of another suite (an older one replayed by a mirror, say) must not
/// pass for the one asked for.
fn check_suite(release: &Release, suite: &str) -> Result<(), String> {
    let names = [release.codename.as_deref(), release.suite.as_deref()];
    if names.contains(&Some(suite)) {
        Ok(())
    } else {
        Err(format!(
            "signed for suite {:?} / codename {:?}, not {suite}",
            release.suite, release.codename
        ))
    }
}

fn safe_pool_path(p: &str) -> Result<String, String> {
    if p.starts_with('/') || p.split('/').any(|c| c == ".." || c.is_empty()) || p.contains("://") {
        return Err(format!("unsafe Filename {p:?}"));
    }
    Ok(p.to_string())
}

fn checked_sha256(h: &str) -> Option<String> {
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_ascii_lowercase())
}

fn find_gpgv() -> Result<PathBuf, KernelError> {
    banger_sys::find_in_path("gpgv").ok_or_else(|| KernelError::MissingProgram {
        program: "gpgv".into(),
    })
}

/// Verifies the clearsigned `inrelease` with `keyring` by running
/// `gpgv --keyring <keyring> --output <out> <inrelease>`; on success `out` holds the signed text
/// (and only that: text outside the signature never reaches the parser).
pub fn verify_inrelease(
    keyring: &Path,
    inrelease: &Path,
    out: &Path,
    url: &str,
) -> Result<(), KernelError> {
    let gpgv = find_gpgv()?;
    if !keyring.is_file() {
        return Err(KernelError::MissingKeyring {
            path: keyring.to_path_buf(),
        });
    }
    verify_inrelease_with(&gpgv, keyring, inrelease, out, url)
}

fn verify_inrelease_with(
    gpgv: &Path,
    keyring: &Path,
    inrelease: &Path,
    out: &Path,
    url: &str,
) -> Result<(), KernelError> {
    // gpgv will not overwrite, and a stale file must never pass for verified output.
    match std::fs::remove_file(out) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(KernelError::Io {
                path: out.to_path_buf(),
                source: e,
            });
        }
        _ => {}
    }
    let output = Command::new(gpgv)
        .arg("--keyring")
        .arg(keyring)
        .arg("--output")
        .arg(out)
        .arg(inrelease)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(KernelError::io(gpgv))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(KernelError::BadSignature {
            url: url.to_string(),
            keyring: keyring.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn agent(timeout: Duration) -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig};
    ureq::Agent::config_builder()
        // HTTPS mirrors may use a CA that is only in the system trust store.
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::PlatformVerifier)
                .build(),
        )
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .user_agent(concat!("banger-kernel/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

fn http_err(url: &str, message: impl std::fmt::Display) -> KernelError {
    KernelError::Http {
        url: url.to_string(),
        message: message.to_string(),
    }
}

/// GETs `url` (plain HTTP or HTTPS with the platform's trust store), refusing more than `limit`
/// bytes.
pub fn get_limited(url: &str, limit: u64) -> Result<Vec<u8>, KernelError> {
    get_bytes(url, limit)
}

fn get_bytes(url: &str, limit: u64) -> Result<Vec<u8>, KernelError> {
    let resp = agent(Duration::from_secs(60))
        .get(url)
        .call()
        .map_err(|e| http_err(url, e))?;
    let mut out = Vec::new();
    resp.into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| http_err(url, e))?;
    if out.len() as u64 > limit {
        return Err(http_err(url, format!("response larger than {limit} bytes")));
    }
    Ok(out)
}

/// Downloads `url` to `dest`, hashing while it streams into `dest` + `.part`. The file is renamed
/// into place only when its SHA256 (and its size, when `size` is given) match; otherwise the
/// `.part` file is removed. More than `limit` bytes are refused even when `size` is unknown.
/// `progress` gets (bytes done, expected total; 0 when neither `size` nor the response says).
pub fn download_url_verified(
    url: &str,
    size: Option<u64>,
    limit: u64,
    sha256: &str,
    dest: &Path,
    what: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), KernelError> {
    let mut part = dest.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let result = (|| {
        let file = std::fs::File::create(&part).map_err(KernelError::io(&part))?;
        let mut w = std::io::BufWriter::new(file);
        let actual = stream_verified(url, size, limit, what, &mut w, progress)?;
        check_digest(what, url, sha256, &actual)?;
        let file = w.into_inner().map_err(|e| KernelError::Io {
            path: part.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(KernelError::io(&part))?;
        std::fs::rename(&part, dest).map_err(KernelError::io(dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Streams `url` into `sink`, refusing more than `size` bytes (or `limit` when the size is not
/// known) and, when `size` is given, fewer; returns the SHA256 (hex).
fn stream_verified(
    url: &str,
    size: Option<u64>,
    limit: u64,
    what: &str,
    sink: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String, KernelError> {
    let resp = agent(Duration::from_secs(60))
        .get(url)
        .call()
        .map_err(|e| http_err(url, e))?;
    let max = size.unwrap_or(limit);
    let total = size.or_else(|| resp.body().content_length()).unwrap_or(0);
    let mut reader = resp.into_body().into_reader().take(max + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    let mut last_report = 0u64;
    progress(0, total);
    loop {
        let n = reader.read(&mut buf).map_err(|e| http_err(url, e))?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > max {
            return Err(match size {
                Some(expected) => KernelError::SizeMismatch {
                    what: what.to_string(),
                    url: url.to_string(),
                    expected,
                    actual: done,
                },
                None => http_err(url, format!("{what} is larger than {limit} bytes")),
            });
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])
            .map_err(|e| http_err(url, format!("writing {what}: {e}")))?;
        if done - last_report >= PROGRESS_STEP || done == total {
            progress(done, total);
            last_report = done;
        }
    }
    if let Some(expected) = size
        && done != expected
    {
        return Err(KernelError::SizeMismatch {
            what: what.to_string(),
            url: url.to_string(),
            expected,
            actual: done,
        });
    }
    if last_report != done {
        progress(done, total.max(done));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Compares a computed digest with the signed one.
pub fn check_digest(
    what: &str,
    url: &str,
    expected: &str,
    actual: &str,
) -> Result<(), KernelError> {
    if expected.eq_ignore_ascii_case(actual) {
        Ok(())
    } else {
        Err(KernelError::HashMismatch {
            what: what.to_string(),
            url: url.to_string(),
            expected: expected.to_ascii_lowercase(),
            actual: actual.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(pkg: &str, version: &str, depends: &str, sha: char) -> String {
        format!(
            "Package: {pkg}\nVersion: {version}\nArchitecture: amd64\nDepends: {depends}\n\
             Filename: pool/main/l/linux/{pkg}_{version}_amd64.deb\nSize: 1234\n\
             SHA256: {}\n\n",
            sha.to_string().repeat(64)
        )
    }

    #[test]
    fn newest_meta_and_its_exact_dependency_win() {
        let text = [
            stanza(
                "linux-image-cloud-amd64",
                "6.1.170-1",
                "linux-image-6.1.0-44-cloud-amd64 (= 6.1.170-1)",
                'a',
            ),
            stanza(
                "linux-image-cloud-amd64",
                "6.1.176-1",
                "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)",
                'b',
            ),
            stanza("linux-image-6.1.0-44-cloud-amd64", "6.1.170-1", "kmod", 'c'),
            stanza("linux-image-6.1.0-50-cloud-amd64-dbg", "6.1.176-1", "", 'd'),
            stanza(
                "linux-image-6.1.0-50-cloud-amd64-unsigned",
                "6.1.176-1",
                "kmod",
                'e',
            ),
            stanza(
                "linux-image-6.1.0-50-cloud-amd64",
                "6.1.176-1",
                "kmod, linux-base (>= 4.3~)",
                'f',
            ),
            stanza("linux-image-6.1.0-50-cloud-amd64", "6.1.175-1", "kmod", '0'),
        ]
        .concat();
        let k = resolve_kernel_package(&text, "linux-image-cloud-amd64", "bookworm")
            .unwrap()
            .unwrap();
        assert_eq!(k.package, "linux-image-6.1.0-50-cloud-amd64");
        assert_eq!(k.package_version, "6.1.176-1");
        assert_eq!(k.kernel_release, "6.1.0-50-cloud-amd64");
        assert_eq!(k.sha256, "f".repeat(64));
        assert_eq!(k.size, 1234);
        assert_eq!(k.suite, "bookworm");
        assert!(k.filename.starts_with("pool/main/l/linux/"));
    }

    #[test]
    fn unsigned_twin_is_used_when_the_signed_package_is_absent() {
        let text = [
            stanza(
                "linux-image-cloud-amd64",
                "6.1.176-1",
                "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)",
                'b',
            ),
            stanza(
                "linux-image-6.1.0-50-cloud-amd64-unsigned",
                "6.1.176-1",
                "kmod",
                'e',
            ),
        ]
        .concat();
        let k = resolve_kernel_package(&text, "linux-image-cloud-amd64", "bookworm")
            .unwrap()
            .unwrap();
        assert_eq!(k.package, "linux-image-6.1.0-50-cloud-amd64-unsigned");
        assert_eq!(k.kernel_release, "6.1.0-50-cloud-amd64");
        // A metapackage pointing straight at the -unsigned name works too.
        let text = [
            stanza(
                "linux-image-cloud-amd64",
                "6.1.176-1",
                "linux-image-6.1.0-50-cloud-amd64-unsigned (= 6.1.176-1)",
                'b',
            ),
            stanza(
                "linux-image-6.1.0-50-cloud-amd64-unsigned",
                "6.1.176-1",
                "kmod",
                'e',
            ),
        ]
        .concat();
        let k = resolve_kernel_package(&text, "linux-image-cloud-amd64", "bookworm")
            .unwrap()
            .unwrap();
        assert_eq!(k.kernel_release, "6.1.0-50-cloud-amd64");
    }

    #[test]
    fn missing_meta_missing_target_and_bad_fields() {
        let none = resolve_kernel_package(
            &stanza("bash", "5.2-1", "libc6", 'a'),
            "linux-image-cloud-amd64",
            "b",
        );
        assert_eq!(none, Ok(None));
        let text = stanza(
            "linux-image-cloud-amd64",
            "1",
            "linux-image-6.1.0-9-cloud-amd64 (= 1)",
            'a',
        ) + &stanza("linux-image-6.1.0-9-cloud-amd64", "2", "kmod", 'b');
        let e = resolve_kernel_package(&text, "linux-image-cloud-amd64", "b").unwrap_err();
        assert!(e.contains("(= 1)"), "{e}");
        let text = stanza(
            "linux-image-cloud-amd64",
            "1",
            "linux-image-6.1.0-9-cloud-amd64",
            'a',
        ) + &stanza("linux-image-6.1.0-9-cloud-amd64", "1", "kmod", 'b')
            .replace(&"b".repeat(64), "nothex");
        assert!(resolve_kernel_package(&text, "linux-image-cloud-amd64", "b").is_err());
        let text = stanza("linux-image-cloud-amd64", "1", "linux-image-../../x", 'a')
            + &stanza("linux-image-../../x", "1", "kmod", 'b');
        assert!(resolve_kernel_package(&text, "linux-image-cloud-amd64", "b").is_err());
    }

    #[test]
    fn release_of_another_suite_is_refused() {
        let r = Release::parse(&format!(
            "Suite: oldstable\nCodename: bookworm\nSHA256:\n {} 1 main/x\n",
            "a".repeat(64)
        ))
        .unwrap();
        assert!(check_suite(&r, "bookworm").is_ok());
        assert!(check_suite(&r, "oldstable").is_ok());
        let e = check_suite(&r, "trixie").unwrap_err();
        assert!(e.contains("not trixie"), "{e}");
    }

    #[test]
    fn pool_paths_are_checked() {
        assert!(safe_pool_path("pool/main/l/linux/x.deb").is_ok());
        for bad in [
            "/etc/passwd",
            "pool/../../x",
            "http://evil/x.deb",
            "pool//x",
        ] {
            assert!(safe_pool_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_comparison_names_both_hashes() {
        assert!(check_digest("Packages", "u", &"AB".repeat(32), &"ab".repeat(32)).is_ok());
        let e = check_digest(
            "Packages index",
            "http://m/P.xz",
            &"a".repeat(64),
            &"b".repeat(64),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("Packages index") && s.contains("http://m/P.xz"),
            "{s}"
        );
        assert!(
            s.contains(&"a".repeat(64)) && s.contains(&"b".repeat(64)),
            "{s}"
        );
    }

    #[test]
    fn urls_join_cleanly_and_suites_are_listed() {
        let m = DebianMirror {
            base_url: "http://deb.debian.org/debian/".into(),
            extra_suites: vec!["bookworm-updates".into()],
            ..DebianMirror::default()
        };
        assert_eq!(m.url("/dists/x"), "http://deb.debian.org/debian/dists/x");
        assert_eq!(m.suites(), ["bookworm", "bookworm-updates"]);
        assert_eq!(m.meta_package(), "linux-image-cloud-amd64");
    }

    #[test]
    fn missing_keyring_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("InRelease");
        std::fs::write(&f, "x").unwrap();
        let e = verify_inrelease(
            Path::new("/nonexistent/k.gpg"),
            &f,
            &dir.path().join("o"),
            "u",
        )
        .unwrap_err();
        if banger_sys::find_in_path("gpgv").is_some() {
            assert!(matches!(e, KernelError::MissingKeyring { .. }), "{e}");
            assert!(e.to_string().contains("/nonexistent/k.gpg"), "{e}");
        } else {
            assert!(matches!(e, KernelError::MissingProgram { .. }), "{e}");
        }
    }

    #[test]
    fn unsigned_text_is_refused_by_gpgv() {
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if banger_sys::find_in_path("gpgv").is_none() || !keyring.is_file() {
            println!("SKIP: gpgv or debian-archive-keyring not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("InRelease");
        std::fs::write(&f, "Origin: Debian\nCodename: bookworm\n").unwrap();
        let out = dir.path().join("Release");
        let e = verify_inrelease(keyring, &f, &out, "http://m/InRelease").unwrap_err();
        assert!(matches!(e, KernelError::BadSignature { .. }), "{e}");
        assert!(!out.exists());
    }

    /// Serves one HTTP response on localhost, for download tests.
    fn serve_once(body: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn download_is_renamed_only_when_verified() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"pretend this is a .deb".to_vec();
        let good = hex::encode(Sha256::digest(&body));
        let dest = dir.path().join("k.deb");

        let m = DebianMirror {
            base_url: serve_once(body.clone()),
            ..DebianMirror::default()
        };
        let e = m
            .download_verified(
                "pool/k.deb",
                body.len() as u64,
                &"0".repeat(64),
                &dest,
                &mut |_, _| {},
            )
            .unwrap_err();
        assert!(matches!(e, KernelError::HashMismatch { .. }), "{e}");
        assert!(!dest.exists() && !dir.path().join("k.deb.part").exists());

        let m = DebianMirror {
            base_url: serve_once(body.clone()),
            ..DebianMirror::default()
        };
        let e = m
            .download_verified(
                "pool/k.deb",
                body.len() as u64 - 1,
                &good,
                &dest,
                &mut |_, _| {},
            )
            .unwrap_err();
        assert!(matches!(e, KernelError::SizeMismatch { .. }), "{e}");
        assert!(!dest.exists());

        let m = DebianMirror {
            base_url: serve_once(body.clone()),
            ..DebianMirror::default()
        };
        let mut last = (0, 0);
        m.download_verified(
            "pool/k.deb",
            body.len() as u64,
            &good,
            &dest,
            &mut |d, t| last = (d, t),
        )
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(last, (body.len() as u64, body.len() as u64));
        assert!(!dir.path().join("k.deb.part").exists());
    }
}
