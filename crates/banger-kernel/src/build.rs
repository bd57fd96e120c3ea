//! `banger kernel build`: a guest kernel compiled from Debian's `linux-source-6.1` package with
//! banger's own config fragment ([`DEFAULT_FRAGMENT`]).
//!
//! [`build_kernel`] fetches the source `.deb` through the same verified chain as the cloud kernel
//! (keyring → `InRelease` → `Packages` → `.deb`), unpacks `usr/src/linux-source-6.1.tar.xz` in
//! Rust (safe paths only), runs `make x86_64_defconfig`, merges the fragment into `.config`, runs
//! `make olddefconfig`, checks that every option of the fragment survived, and runs
//! `make -j<jobs> vmlinux`. Everything is built in (`# CONFIG_MODULES is not set`), so the
//! kernel directory has no `modules/` and banger's initramfs holds only the agent.
//!
//! The result is cached by a config hash over the fragment's options, the base config and the
//! source package version ([`config_hash`]); it is recorded as the manifest's `source_url`
//! (`build:linux-source-6.1 config <hash>`). A build whose hash equals the existing kernel's
//! returns that kernel without compiling anything.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::mirror::KernelPackage;
use crate::{
    DebianMirror, INITRAMFS_MODULES, KernelError, MANIFEST, PullProgress, PullStage, PulledKernel,
    config_option, deb, deb822, read_manifest, stage, staging_dir, write_manifest,
};

/// The Debian package holding the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The tarball inside [`SOURCE_PACKAGE`].
const SOURCE_TARBALL: &str = "usr/src/linux-source-6.1.tar.xz";
/// The base config the fragment is applied to.
pub const BASE_CONFIG: &str = "x86_64_defconfig";
/// banger's guest kernel options, applied on top of [`BASE_CONFIG`].
pub const DEFAULT_FRAGMENT: &str = include_str!("guest-6.1.fragment");
/// Bumped when the build procedure changes in a way that changes the kernel.
const RECIPE: &str = "banger-kernel-build v1";
/// Lines of build output kept for error messages.
const TAIL_LINES: usize = 20;
/// No single file of the kernel source is anywhere near this.
const MAX_SOURCE_FILE: u64 = 1 << 30;

/// What the build needs on the host: (what is checked, Debian package providing it). Programs
/// are looked up in `PATH`; entries starting with `/` are header files.
pub const BUILD_REQUIREMENTS: &[(&str, &str)] = &[
    ("gcc", "gcc"),
    ("make", "make"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
];

/// The Debian packages of [`BUILD_REQUIREMENTS`] that are missing, each once, in order.
pub fn missing_build_packages() -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = Vec::new();
    for &(what, package) in BUILD_REQUIREMENTS {
        let present = if what.starts_with('/') {
            Path::new(what).is_file()
        } else {
            banger_sys::find_in_path(what).is_some()
        };
        if !present && !missing.contains(&package) {
            missing.push(package);
        }
    }
    missing
}

/// Fails with [`KernelError::MissingBuildTools`] when anything of [`BUILD_REQUIREMENTS`] is
/// missing.
pub fn check_build_tools() -> Result<(), KernelError> {
    let missing = missing_build_packages();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingBuildTools {
            packages: missing.iter().map(|p| p.to_string()).collect(),
        })
    }
}

/// The value a fragment gives an option.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OptionValue {
    /// `CONFIG_X=y`
    Yes,
    /// `# CONFIG_X is not set`
    NotSet,
    /// `CONFIG_X=<string or number>`, kept verbatim (quotes included).
    Value(String),
}

/// A parsed config fragment: option name (with `CONFIG_`) → value, each option once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub options: BTreeMap<String, OptionValue>,
}

fn valid_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

impl Fragment {
    /// Parses `CONFIG_X=y`, `CONFIG_X=<value>` and `# CONFIG_X is not set` lines; blank lines
    /// and other comments are ignored. `=m` is refused (banger's kernel has no modules), as are
    /// malformed lines and an option given twice. Errors name the line.
    pub fn parse(text: &str) -> Result<Fragment, KernelError> {
        let err = |n: usize, message: String| KernelError::Fragment {
            line: n + 1,
            message,
        };
        let mut options = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let (name, value) = if line.is_empty() {
                continue;
            } else if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim();
                match comment.strip_suffix(" is not set") {
                    Some(name) if name.starts_with("CONFIG_") => {
                        (name.trim().to_string(), OptionValue::NotSet)
                    }
                    _ => continue,
                }
            } else {
                let Some((name, value)) = line.split_once('=') else {
                    return Err(err(n, format!("expected CONFIG_X=y, got {line:?}")));
                };
                let value = match value.trim() {
                    "y" => OptionValue::Yes,
                    "m" => {
                        return Err(err(
                            n,
                            format!(
                                "{name}=m: banger's kernel has no modules; use =y or is not set"
                            ),
                        ));
                    }
                    "n" => OptionValue::NotSet,
                    "" => return Err(err(n, format!("{name} has no value"))),
                    v => OptionValue::Value(v.to_string()),
                };
                (name.trim().to_string(), value)
            };
            if !valid_option_name(&name) {
                return Err(err(n, format!("invalid option name {name:?}")));
            }
            if options.insert(name.clone(), value).is_some() {
                return Err(err(n, format!("{name} is given twice")));
            }
        }
        if options.is_empty() {
            return Err(KernelError::Fragment {
                line: 0,
                message: "no options".into(),
            });
        }
        Ok(Fragment { options })
    }

    /// The fragment as `.config` lines, one per option, sorted by name.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.options {
            match value {
                OptionValue::Yes => out.push_str(&format!("{name}=y\n")),
                OptionValue::NotSet => out.push_str(&format!("# {name} is not set\n")),
                OptionValue::Value(v) => out.push_str(&format!("{name}={v}\n")),
            }
        }
        out
    }

    /// `config` (a `.config`) with every line about an option of the fragment replaced by the
    /// fragment's, which are appended at the end.
    pub fn merge_into(&self, config: &str) -> String {
        let mut out = String::new();
        for line in config.lines() {
            let name = line
                .split_once('=')
                .map(|(k, _)| k.trim())
                .or_else(|| {
                    line.strip_prefix("# ")
                        .and_then(|l| l.strip_suffix(" is not set"))
                })
                .unwrap_or_default();
            if !self.options.contains_key(name) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str("# banger fragment\n");
        out.push_str(&self.render());
        out
    }

    /// The options of the fragment that `config` (the `.config` after `make olddefconfig`) does
    /// not have as asked: `=y` that is not `y`, a value that differs, or a not-set option that is
    /// set. Each as `CONFIG_X=y (got ...)`.
    pub fn dropped(&self, config: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (name, want) in &self.options {
            let got = config_option(config, name).filter(|v| *v != "n");
            let ok = match want {
                OptionValue::Yes => got == Some("y"),
                OptionValue::NotSet => got.is_none(),
                OptionValue::Value(v) => got == Some(v.as_str()),
            };
            if !ok {
                let asked = match want {
                    OptionValue::Yes => format!("{name}=y"),
                    OptionValue::NotSet => format!("# {name} is not set"),
                    OptionValue::Value(v) => format!("{name}={v}"),
                };
                out.push(format!("{asked} (got {})", got.unwrap_or("not set")));
            }
        }
        out
    }
}

/// The cache key of a build: SHA256 over the build recipe, the base config, the source package
/// and version, and the fragment's options (sorted, so comments, blank lines and order do not
/// matter). Lowercase hex.
pub fn config_hash(fragment: &Fragment, package_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "{RECIPE}\nbase {BASE_CONFIG}\npackage {SOURCE_PACKAGE} {package_version}\n"
    ));
    h.update(fragment.render());
    hex::encode(h.finalize())
}

/// The manifest's `source_url` of a build with `hash`.
pub fn build_source(hash: &str) -> String {
    format!("build:{SOURCE_PACKAGE} config {hash}")
}

/// Picks the newest `package` from the text of a Packages index.
pub fn resolve_package(
    packages: &str,
    package: &str,
    suite: &str,
) -> Result<Option<KernelPackage>, String> {
    let mut best: Option<KernelPackage> = None;
    for stanza in deb822::parse_stanzas(packages) {
        let stanza = stanza.map_err(|e| e.to_string())?;
        if stanza.get("Package") != Some(package) {
            continue;
        }
        let field = |f: &str| stanza.get(f).ok_or(format!("{package} has no {f} field"));
        let version = field("Version")?;
        if best
            .as_ref()
            .is_some_and(|b| deb822::compare_versions(version, &b.package_version).is_le())
        {
            continue;
        }
        let filename = field("Filename")?;
        if filename.starts_with('/')
            || filename.contains("://")
            || filename.split('/').any(|c| c == ".." || c.is_empty())
        {
            return Err(format!("{package}: unsafe Filename {filename:?}"));
        }
        let sha256 = field("SHA256")?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{package} has a bad SHA256"));
        }
        best = Some(KernelPackage {
            suite: suite.to_string(),
            package: package.to_string(),
            package_version: version.to_string(),
            kernel_release: String::new(),
            filename: filename.to_string(),
            size: field("Size")?
                .parse()
                .map_err(|_| format!("{package} has a bad Size"))?,
            sha256: sha256.to_ascii_lowercase(),
        });
    }
    Ok(best)
}

/// Finds the newest [`SOURCE_PACKAGE`] across the mirror's suites (signed indexes only).
/// `work` holds the intermediate index files.
pub fn resolve_source(
    mirror: &DebianMirror,
    work: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<KernelPackage, KernelError> {
    let mut best: Option<KernelPackage> = None;
    for suite in mirror.suites() {
        stage(
            progress,
            PullStage::Release,
            mirror.url(&format!("dists/{suite}/InRelease")),
        );
        let release = mirror.fetch_release(suite, work)?;
        let packages = mirror.fetch_packages(suite, &release, progress)?;
        stage(
            progress,
            PullStage::Resolve,
            format!("{SOURCE_PACKAGE} in {suite}"),
        );
        let url = mirror.url(&format!(
            "dists/{suite}/main/binary-{}/Packages",
            mirror.arch
        ));
        let found = resolve_package(&packages, SOURCE_PACKAGE, suite)
            .map_err(|message| KernelError::Packages { url, message })?;
        if let Some(k) = found
            && best.as_ref().is_none_or(|b| {
                deb822::compare_versions(&k.package_version, &b.package_version).is_gt()
            })
        {
            best = Some(k);
        }
    }
    best.ok_or_else(|| KernelError::Packages {
        url: mirror.url(&format!("dists/{}/", mirror.suite)),
        message: format!("no {SOURCE_PACKAGE} in suites {:?}", mirror.suites()),
    })
}

/// Builds banger's guest kernel from [`SOURCE_PACKAGE`] with `fragment` into `dest`.
///
/// `work` is a scratch directory (created if missing; the source tree, ~1.5 GB, and the objects
/// go there and are removed at the end). When `dest/manifest.json` records the same config hash,
/// that kernel is returned without building. Otherwise the kernel is built in
/// [`staging_dir`]`(dest)` and renamed to `dest`, replacing an older build there. Build tools
/// are checked first ([`check_build_tools`]).
pub fn build_kernel(
    mirror: &DebianMirror,
    fragment: &str,
    work: &Path,
    dest: &Path,
    jobs: usize,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    let fragment = Fragment::parse(fragment)?;
    check_build_tools()?;
    std::fs::create_dir_all(work).map_err(KernelError::io(work))?;
    let pkg = resolve_source(mirror, work, progress)?;
    let hash = config_hash(&fragment, &pkg.package_version);
    if let Some(existing) = cached(dest, &hash) {
        stage(
            progress,
            PullStage::Finish,
            format!("unchanged config {hash}: {}", existing.version),
        );
        return Ok(existing);
    }
    let staging = staging_dir(dest);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(KernelError::io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(KernelError::io(&staging))?;
    let result = build_into(
        mirror, &pkg, &fragment, &hash, work, &staging, jobs, progress,
    )
    .and_then(|manifest| {
        replace_dir(&staging, dest)?;
        Ok(manifest)
    });
    for leftover in [
        "linux-source.deb",
        "linux-source.deb.part",
        "linux-source.tar.xz",
    ] {
        let _ = std::fs::remove_file(work.join(leftover));
    }
    let _ = std::fs::remove_dir_all(work.join("src"));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.and_then(|_| read_manifest(dest))
}

/// The kernel in `dest` when its manifest records `hash` and its vmlinux is there.
fn cached(dest: &Path, hash: &str) -> Option<PulledKernel> {
    if !dest.join(MANIFEST).is_file() {
        return None;
    }
    let k = read_manifest(dest).ok()?;
    (k.source_url == build_source(hash) && k.vmlinux.is_file()).then_some(k)
}

/// Renames `staging` to `dest`; an existing `dest` is moved aside first and removed after.
fn replace_dir(staging: &Path, dest: &Path) -> Result<(), KernelError> {
    if !dest.exists() {
        return std::fs::rename(staging, dest).map_err(KernelError::io(dest));
    }
    let mut old = dest.as_os_str().to_owned();
    old.push(".old");
    let old = PathBuf::from(old);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(KernelError::io(&old))?;
    }
    std::fs::rename(dest, &old).map_err(KernelError::io(&old))?;
    if let Err(e) = std::fs::rename(staging, dest) {
        let _ = std::fs::rename(&old, dest);
        return Err(KernelError::Io {
            path: dest.to_path_buf(),
            source: e,
        });
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build_into(
    mirror: &DebianMirror,
    pkg: &KernelPackage,
    fragment: &Fragment,
    hash: &str,
    work: &Path,
    staging: &Path,
    jobs: usize,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    let deb_path = work.join("linux-source.deb");
    let url = crate::download_package(mirror, pkg, &deb_path, progress)?;

    stage(progress, PullStage::Extract, SOURCE_TARBALL);
    let tarball = work.join("linux-source.tar.xz");
    extract_source_tarball(&deb_path, &tarball)?;
    let _ = std::fs::remove_file(&deb_path);
    let src_root = work.join("src");
    if src_root.exists() {
        std::fs::remove_dir_all(&src_root).map_err(KernelError::io(&src_root))?;
    }
    std::fs::create_dir_all(&src_root).map_err(KernelError::io(&src_root))?;
    let what = format!("{url}:{SOURCE_TARBALL}");
    unpack_source(&tarball, &src_root, &what)?;
    let _ = std::fs::remove_file(&tarball);
    let tree = find_tree(&src_root)?;

    stage(
        progress,
        PullStage::Configure,
        format!("{BASE_CONFIG} + {} options", fragment.options.len()),
    );
    let mut tail = Vec::new();
    run_make(&tree, &[BASE_CONFIG], progress, &mut tail)?;
    let config_path = tree.join(".config");
    let base = std::fs::read_to_string(&config_path).map_err(KernelError::io(&config_path))?;
    std::fs::write(&config_path, fragment.merge_into(&base))
        .map_err(KernelError::io(&config_path))?;
    run_make(&tree, &["olddefconfig"], progress, &mut tail)?;
    let config = std::fs::read_to_string(&config_path).map_err(KernelError::io(&config_path))?;
    let dropped = fragment.dropped(&config);
    if !dropped.is_empty() {
        return Err(KernelError::Kernel {
            what: format!("{SOURCE_PACKAGE} {} config", pkg.package_version),
            message: format!(
                "make olddefconfig dropped options of the fragment (missing dependencies?): {}",
                dropped.join(", ")
            ),
        });
    }

    stage(
        progress,
        PullStage::Build,
        format!("make -j{} vmlinux", jobs.max(1)),
    );
    let jobs_arg = format!("-j{}", jobs.max(1));
    run_make(&tree, &[&jobs_arg, "vmlinux"], progress, &mut tail)?;
    let release = make_output(&tree, &["-s", "kernelrelease"])?;

    stage(progress, PullStage::Finish, release.clone());
    let vmlinux = staging.join("vmlinux");
    std::fs::copy(tree.join("vmlinux"), &vmlinux).map_err(KernelError::io(&vmlinux))?;
    let facts = crate::catalog::inspect_vmlinux(&vmlinux, &format!("built {SOURCE_PACKAGE}"))?;
    let staged_config = staging.join("config");
    std::fs::write(&staged_config, &config).map_err(KernelError::io(&staged_config))?;
    let manifest = PulledKernel {
        version: release,
        package: pkg.package.clone(),
        package_version: pkg.package_version.clone(),
        vmlinux: PathBuf::from("vmlinux"),
        vmlinux_sha256: facts.sha256,
        deb_sha256: pkg.sha256.clone(),
        modules: Vec::new(),
        source_url: build_source(hash),
        config: Some(PathBuf::from("config")),
        built_in: INITRAMFS_MODULES.iter().map(|m| m.to_string()).collect(),
        vmlinuz_compression: None,
        suite: Some(pkg.suite.clone()),
        virtio_mmio_cmdline_devices: Some(
            config_option(&config, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == Some("y"),
        ),
        initrd: None,
    };
    write_manifest(staging, &manifest)?;
    Ok(manifest)
}

/// Copies [`SOURCE_TARBALL`] out of the source `.deb` to `out`.
fn extract_source_tarball(deb_path: &Path, out: &Path) -> Result<(), KernelError> {
    let mut found = false;
    deb::for_each_data_file(
        deb_path,
        |p| {
            if p == Path::new(SOURCE_TARBALL) {
                deb::Disposition::Extract
            } else {
                deb::Disposition::Skip
            }
        },
        |_, r| {
            let mut f = std::fs::File::create(out).map_err(KernelError::io(out))?;
            std::io::copy(r, &mut f).map_err(KernelError::io(out))?;
            f.flush().map_err(KernelError::io(out))?;
            found = true;
            Ok(())
        },
    )?;
    if found {
        Ok(())
    } else {
        Err(KernelError::Archive {
            path: deb_path.display().to_string(),
            message: format!("no {SOURCE_TARBALL} in the package"),
        })
    }
}

/// Whether a symlink at `link` (relative to the tree root) pointing to `target` stays inside the
/// tree, judged lexically.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: usize = link.components().count().saturating_sub(1);
    for c in target.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(_) => depth += 1,
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpacks the xz tarball at `tarball` into `root`: directories, regular files (with their
/// mode) and symlinks whose target stays inside `root`. An absolute path, a `..`, a link
/// leading out, a hard link or a special file refuses the whole tarball.
pub fn unpack_source(tarball: &Path, root: &Path, what: &str) -> Result<(), KernelError> {
    let file = std::fs::File::open(tarball).map_err(KernelError::io(tarball))?;
    let stream = crate::compress::decoder(
        crate::Compression::Xz,
        BufReader::with_capacity(1 << 20, file),
        what,
    )?;
    unpack_tar(stream, root, what)
}

pub(crate) fn unpack_tar(stream: impl Read, root: &Path, what: &str) -> Result<(), KernelError> {
    let archive_err = |message: String| KernelError::Archive {
        path: what.to_string(),
        message,
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(false);
    for entry in archive.entries().map_err(|e| archive_err(e.to_string()))? {
        let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| archive_err(e.to_string()))?
            .into_owned();
        let rel = deb::safe_relative_path(&raw, what)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path = root.join(&rel);
        let kind = entry.header().entry_type();
        let named = |m: &str| archive_err(format!("{}: {m}", rel.display()));
        if kind.is_dir() {
            std::fs::create_dir_all(&path).map_err(KernelError::io(&path))?;
            continue;
        }
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(KernelError::io(parent))?;
        }
        if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| archive_err(e.to_string()))?
                .ok_or_else(|| named("symlink without a target"))?
                .into_owned();
            if !link_stays_inside(&rel, &target) {
                return Err(named(&format!(
                    "symlink to {} leads out of the tree",
                    target.display()
                )));
            }
            std::os::unix::fs::symlink(&target, &path).map_err(KernelError::io(&path))?;
        } else if kind.is_file() {
            if entry.size() > MAX_SOURCE_FILE {
                return Err(named("implausibly large"));
            }
            let mode = entry.header().mode().unwrap_or(0o644);
            let mut f = std::fs::File::create(&path).map_err(KernelError::io(&path))?;
            std::io::copy(&mut entry, &mut f).map_err(KernelError::io(&path))?;
            use std::os::unix::fs::PermissionsExt;
            // Keep the executable bits (scripts), nothing else.
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(KernelError::io(&path))?;
        } else {
            return Err(named(&format!(
                "unexpected entry type {:?} in a source tarball",
                kind
            )));
        }
    }
    Ok(())
}

/// The single top-level directory of the unpacked source.
fn find_tree(src_root: &Path) -> Result<PathBuf, KernelError> {
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(src_root).map_err(KernelError::io(src_root))? {
        let e = e.map_err(KernelError::io(src_root))?;
        if e.file_type().map_err(KernelError::io(e.path()))?.is_dir() {
            dirs.push(e.path());
        }
    }
    match dirs.as_slice() {
        [one] if one.join("Makefile").is_file() => Ok(one.clone()),
        _ => Err(KernelError::Archive {
            path: src_root.display().to_string(),
            message: "the source tarball does not hold one kernel tree".into(),
        }),
    }
}

/// The environment make runs with: a fixed build user, host and timestamp, so the kernel does
/// not carry the daemon's host name.
fn make_command(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree)
        .env("KBUILD_BUILD_USER", "banger")
        .env("KBUILD_BUILD_HOST", "banger")
        .env("KBUILD_BUILD_TIMESTAMP", "2000-01-01")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

/// Runs `make args` in `tree`, sending every output line (stdout and stderr) as a
/// [`PullStage::Build`] progress detail and keeping the last [`TAIL_LINES`] in `tail` for the
/// error.
fn run_make(
    tree: &Path,
    args: &[&str],
    progress: &mut dyn FnMut(PullProgress),
    tail: &mut Vec<String>,
) -> Result<(), KernelError> {
    let (reader, writer) = std::io::pipe().map_err(KernelError::io(tree))?;
    let mut cmd = make_command(tree);
    cmd.args(args)
        .stdout(writer.try_clone().map_err(KernelError::io(tree))?)
        .stderr(writer);
    let mut child = cmd.spawn().map_err(|e| KernelError::Kernel {
        what: format!("make {}", args.join(" ")),
        message: format!("cannot run make: {e}"),
    })?;
    // The pipe's write ends live in `cmd`; drop them so the read end sees EOF at exit.
    drop(cmd);
    tail.clear();
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.map_err(KernelError::io(tree))?;
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        if tail.len() >= TAIL_LINES {
            tail.remove(0);
        }
        tail.push(line.clone());
        stage(progress, PullStage::Build, line);
    }
    let status = child.wait().map_err(KernelError::io(tree))?;
    if status.success() {
        Ok(())
    } else {
        Err(KernelError::Kernel {
            what: format!("make {}", args.join(" ")),
            message: format!("failed ({status}): {}", tail.join(" | ")),
        })
    }
}

/// Runs `make args` and returns its trimmed stdout.
fn make_output(tree: &Path, args: &[&str]) -> Result<String, KernelError> {
    let out = make_command(tree)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .map_err(KernelError::io(tree))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || text.is_empty() || text.contains(char::is_whitespace) {
        return Err(KernelError::Kernel {
            what: format!("make {}", args.join(" ")),
            message: format!(
                "failed ({}): {} {}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_fragment_parses_and_keeps_banger_essentials() {
        let f = Fragment::parse(DEFAULT_FRAGMENT).unwrap();
        for name in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_DEVTMPFS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_ACPI",
            "CONFIG_CGROUPS",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_TUN",
            "CONFIG_UNIX",
            "CONFIG_IPV6",
            "CONFIG_BLK_DEV_INITRD",
        ] {
            assert_eq!(f.options.get(name), Some(&OptionValue::Yes), "{name}");
        }
        assert_eq!(
            f.options.get("CONFIG_MODULES"),
            Some(&OptionValue::NotSet),
            "everything is built in"
        );
    }

    #[test]
    fn fragment_lines_are_parsed_and_bad_ones_named() {
        let f = Fragment::parse(
            "# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n  CONFIG_D=n\n",
        )
        .unwrap();
        assert_eq!(f.options.len(), 4);
        assert_eq!(f.options["CONFIG_A"], OptionValue::Yes);
        assert_eq!(f.options["CONFIG_B"], OptionValue::NotSet);
        assert_eq!(f.options["CONFIG_C"], OptionValue::Value("\"x y\"".into()));
        assert_eq!(f.options["CONFIG_D"], OptionValue::NotSet);
        assert_eq!(
            f.render(),
            "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n# CONFIG_D is not set\n"
        );
        for (bad, needle) in [
            (
                "CONFIG_A=y\nCONFIG_A=y\n",
                "line 2: CONFIG_A is given twice",
            ),
            ("CONFIG_A=m\n", "line 1: CONFIG_A=m"),
            ("CONFIG_A\n", "line 1: expected CONFIG_X=y"),
            ("FOO=y\n", "invalid option name \"FOO\""),
            ("CONFIG_a=y\n", "invalid option name"),
            ("CONFIG_A=\n", "CONFIG_A has no value"),
            ("# only comments\n", "no options"),
        ] {
            let e = Fragment::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn merging_replaces_the_fragments_options() {
        let f = Fragment::parse("CONFIG_A=y\n# CONFIG_B is not set\n").unwrap();
        let merged = f.merge_into("CONFIG_X=y\n# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_AB=y\n");
        assert_eq!(config_option(&merged, "CONFIG_A"), Some("y"));
        assert_eq!(config_option(&merged, "CONFIG_B"), None);
        assert_eq!(config_option(&merged, "CONFIG_X"), Some("y"));
        assert_eq!(config_option(&merged, "CONFIG_AB"), Some("y"));
        assert!(!merged.contains("# CONFIG_A is not set"), "{merged}");
    }

    #[test]
    fn dropped_options_are_named() {
        let f = Fragment::parse(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=\"-banger\"\nCONFIG_E=y\n",
        )
        .unwrap();
        // What olddefconfig might leave: B lost its dependency, C got selected, D reset.
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=\"\"\nCONFIG_E=m\n";
        assert_eq!(
            f.dropped(config),
            [
                "CONFIG_B=y (got not set)",
                "# CONFIG_C is not set (got y)",
                "CONFIG_D=\"-banger\" (got \"\")",
                "CONFIG_E=y (got m)",
            ]
        );
        let good = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=\"-banger\"\nCONFIG_E=y\n";
        assert!(f.dropped(good).is_empty());
    }

    #[test]
    fn the_config_hash_is_stable_and_sensitive() {
        let a = Fragment::parse("CONFIG_A=y\n# CONFIG_B is not set\n").unwrap();
        let same = Fragment::parse("# reordered, commented\n# CONFIG_B is not set\n\nCONFIG_A=y\n")
            .unwrap();
        let h = config_hash(&a, "6.1.192-2");
        assert_eq!(h.len(), 64);
        assert_eq!(h, config_hash(&same, "6.1.192-2"));
        // A fixed value: the key must not change between banger builds without a reason.
        assert_eq!(h, config_hash(&a, "6.1.192-2"));
        assert_ne!(h, config_hash(&a, "6.1.193-1"));
        let other = Fragment::parse("CONFIG_A=y\n").unwrap();
        assert_ne!(h, config_hash(&other, "6.1.192-2"));
        assert_eq!(
            build_source(&h),
            format!("build:linux-source-6.1 config {h}")
        );
    }

    #[test]
    fn the_source_package_is_resolved_from_the_index() {
        let sha = "ab".repeat(32);
        let index = format!(
            "Package: linux-source-6.1\nVersion: 6.1.170-1\nFilename: pool/main/l/linux/linux-source-6.1_6.1.170-1_all.deb\nSize: 10\nSHA256: {sha}\n\n\
             Package: linux-source-6.1\nVersion: 6.1.192-2\nFilename: pool/main/l/linux/linux-source-6.1_6.1.192-2_all.deb\nSize: 20\nSHA256: {sha}\n\n\
             Package: other\nVersion: 9\n"
        );
        let k = resolve_package(&index, SOURCE_PACKAGE, "bookworm")
            .unwrap()
            .unwrap();
        assert_eq!(k.package_version, "6.1.192-2");
        assert_eq!(k.size, 20);
        assert!(
            resolve_package(&index, "nope", "bookworm")
                .unwrap()
                .is_none()
        );
        let evil = index.replace("pool/main/l/linux/linux-source-6.1_6.1.192", "../x");
        assert!(resolve_package(&evil, SOURCE_PACKAGE, "b").is_err());
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if path.ends_with(".sh") { 0o755 } else { 0o644 });
            if kind.is_symlink() {
                h.set_size(0);
                h.set_link_name(data).unwrap();
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            } else {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn source_tarballs_unpack_safely() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = tar_with(&[
            ("linux/Makefile", tar::EntryType::Regular, "all:\n"),
            ("linux/scripts/x.sh", tar::EntryType::Regular, "#!/bin/sh\n"),
            (
                "linux/scripts/inc/arm",
                tar::EntryType::Symlink,
                "../../arch",
            ),
        ]);
        unpack_tar(&t[..], dir.path(), "t").unwrap();
        let tree = find_tree(dir.path()).unwrap();
        assert_eq!(tree, dir.path().join("linux"));
        let mode = std::fs::metadata(tree.join("scripts/x.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(tree.join("scripts/inc/arm").is_symlink());

        for (bad, needle) in [
            (
                tar_with(&[("linux/a", tar::EntryType::Symlink, "../../../etc")]),
                "leads out",
            ),
            (
                tar_with(&[("linux/a", tar::EntryType::Symlink, "/etc")]),
                "leads out",
            ),
            (
                tar_with(&[("linux/a", tar::EntryType::Link, "linux/b")]),
                "unexpected entry type",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let e = unpack_tar(&bad[..], d.path(), "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert!(link_stays_inside(Path::new("a/b/c"), Path::new("../../x")));
        assert!(!link_stays_inside(
            Path::new("a/b/c"),
            Path::new("../../../x")
        ));
    }

    #[test]
    fn an_unchanged_hash_is_a_cache_hit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("banger-6.1");
        assert!(cached(&dest, "h").is_none());
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("vmlinux"), b"\x7fELF").unwrap();
        let m = PulledKernel {
            version: "6.1.192-banger".into(),
            package: SOURCE_PACKAGE.into(),
            package_version: "6.1.192-2".into(),
            vmlinux: "vmlinux".into(),
            vmlinux_sha256: "00".repeat(32),
            deb_sha256: "11".repeat(32),
            modules: Vec::new(),
            source_url: build_source("h"),
            config: None,
            built_in: Vec::new(),
            vmlinuz_compression: None,
            suite: None,
            virtio_mmio_cmdline_devices: Some(true),
            initrd: None,
        };
        write_manifest(&dest, &m).unwrap();
        assert_eq!(cached(&dest, "h").unwrap().vmlinux, dest.join("vmlinux"));
        assert!(cached(&dest, "other").is_none());
        std::fs::remove_file(dest.join("vmlinux")).unwrap();
        assert!(cached(&dest, "h").is_none());
    }

    #[test]
    fn replacing_a_directory_keeps_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("k");
        let staging = staging_dir(&dest);
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("old"), "").unwrap();
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("new"), "").unwrap();
        replace_dir(&staging, &dest).unwrap();
        assert!(dest.join("new").exists());
        assert!(!dest.join("old").exists());
        assert!(!staging.exists());
        assert!(!dir.path().join("k.old").exists());
    }
}
