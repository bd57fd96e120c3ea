//! Applying layers: tar entries → table decisions → scratch-tree operations.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Reject, RootfsError, show};
use crate::layer::{self, METADATA_LIMIT, Meter, Metered};
use crate::name::{self, Whiteout};
use crate::table::{Meta, New, Op, Xattr};
use crate::{BuildOptions, Layer, Progress, Tree, cancelled, fsutil};

const CHUNK: usize = 256 << 10;

/// Per-build state that outlives one layer.
struct Ctx<'a> {
    opts: &'a BuildOptions,
    progress: &'a mut dyn FnMut(Progress),
    buf: Vec<u8>,
    ops: Vec<Op>,
    entries: u64,
    content: u64,
    /// The umask stripped owner bits from a fresh directory: chmod what we create, or the
    /// scratch tree would not be writable (and `mkfs -d` could not read it).
    fix_modes: bool,
}

pub fn flatten(
    layers: &[Layer],
    dir: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tree, RootfsError> {
    prepare_dir(dir)?;
    let fix_modes = fs::symlink_metadata(dir)
        .map(|m| m.permissions().mode() & 0o700 != 0o700)
        .unwrap_or(true);
    if fix_modes {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| RootfsError::io(format!("chmod {}", dir.display()), e))?;
    }
    let mut tree = Tree {
        root: dir.to_path_buf(),
        table: Default::default(),
        skipped: Vec::new(),
    };
    let mut ctx = Ctx {
        opts,
        progress,
        buf: vec![0; CHUNK],
        ops: Vec::new(),
        entries: 0,
        content: 0,
        fix_modes,
    };
    let result = layers.iter().enumerate().try_for_each(|(index, layer)| {
        (ctx.progress)(Progress::Layer {
            index,
            count: layers.len(),
            label: layer.label.clone(),
        });
        apply_layer(&mut tree, index, layer, &mut ctx)
    });
    match result {
        Ok(()) => Ok(tree),
        Err(e) => {
            // Best effort: the error that stopped us is the one worth reporting.
            let _ = fsutil::remove_tree(dir);
            Err(e)
        }
    }
}

/// The tree directory must be new or empty: flattening into someone's populated directory
/// would mix unrelated files into the image (and removing it on error would destroy them).
fn prepare_dir(dir: &Path) -> Result<(), RootfsError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mut it = fs::read_dir(dir)
                .map_err(|e| RootfsError::io(format!("reading {}", dir.display()), e))?;
            if it.next().is_some() {
                return Err(RootfsError::Invalid(format!(
                    "tree directory {} is not empty",
                    dir.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(RootfsError::Invalid(format!(
            "tree directory {} exists and is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| RootfsError::io(format!("creating {}", dir.display()), e)),
        Err(e) => Err(RootfsError::io(format!("stat {}", dir.display()), e)),
    }
}

fn apply_layer(
    tree: &mut Tree,
    index: usize,
    layer: &Layer,
    ctx: &mut Ctx<'_>,
) -> Result<(), RootfsError> {
    let meter = Rc::new(Meter::default());
    let reader = Metered {
        inner: layer::open(layer)?,
        meter: meter.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let tar_err = |source| RootfsError::Layer {
        layer: layer.label.clone(),
        context: "reading the tar stream",
        source,
    };
    let mut entries = archive.entries().map_err(tar_err)?;
    loop {
        if cancelled(ctx.opts) {
            return Err(RootfsError::Cancelled);
        }
        meter.arm(METADATA_LIMIT);
        let next = entries.next();
        meter.disarm();
        let mut entry = match next {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(tar_err(e)),
        };
        apply_entry(tree, index, layer, &mut entry, ctx)?;
        // Whatever the entry did not consume (data of a directory entry, a device, a global
        // PAX header...) is read here rather than inside `next()`, so the meter only ever
        // sees metadata.
        drain(&mut entry, ctx, layer)?;
        ctx.entries += 1;
        if ctx.entries.is_multiple_of(256) {
            (ctx.progress)(Progress::Entries { done: ctx.entries });
        }
    }
    (ctx.progress)(Progress::Entries { done: ctx.entries });
    Ok(())
}

fn apply_entry<R: Read>(
    tree: &mut Tree,
    index: usize,
    layer: &Layer,
    entry: &mut tar::Entry<'_, R>,
    ctx: &mut Ctx<'_>,
) -> Result<(), RootfsError> {
    let raw = entry.path_bytes().into_owned();
    let fail = |reason: Reject| RootfsError::Entry {
        layer: layer.label.clone(),
        path: show(&raw),
        reason,
    };
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        // Archive-wide defaults (charset, comments): nothing an image needs.
        return Ok(());
    }
    let path = name::normalize(&raw).map_err(fail)?;
    let (_, last) = name::split_last(&path);
    ctx.ops.clear();
    match name::classify(last).map_err(fail)? {
        Whiteout::None => {}
        Whiteout::Hide(hidden) => {
            let hidden = hidden.to_vec();
            tree.table
                .whiteout(index, &path, &hidden, &mut ctx.ops)
                .map_err(fail)?;
            return run_ops(tree, ctx, None, layer, &raw);
        }
        Whiteout::Opaque => {
            tree.table
                .opaque(index, &path, &mut ctx.ops)
                .map_err(fail)?;
            return run_ops(tree, ctx, None, layer, &raw);
        }
        Whiteout::Reserved => {
            tree.table.skip(&path, &mut ctx.ops).map_err(fail)?;
            tree.skipped
                .push(format!("/{} (reserved whiteout name)", show(&path)));
            return Ok(());
        }
    }

    let new = match kind.as_byte() {
        b'0' | b'\0' | b'7' if raw.ends_with(b"/") => New::Dir,
        b'0' | b'\0' | b'7' | b'S' => {
            let size = entry.size();
            if let Some(max) = ctx.opts.max_content_bytes {
                let remaining = max.saturating_sub(ctx.content);
                if size > remaining {
                    return Err(fail(Reject::TooLarge { size, remaining }));
                }
            }
            ctx.content += size;
            New::File { size }
        }
        b'1' => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| fail(Reject::BadHeader("hardlink without a target".into())))?;
            let target = name::normalize(&target).map_err(|reason| {
                fail(Reject::HardlinkTarget {
                    target: show(&target),
                    reason: Box::new(reason),
                })
            })?;
            New::Hardlink { target }
        }
        b'2' => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| fail(Reject::BadHeader("symlink without a target".into())))?;
            New::Symlink {
                target: target.into_owned(),
            }
        }
        b'3' | b'4' => {
            // A VM's /dev is a devtmpfs: device nodes in an image are never used, and
            // creating them would need privilege.
            tree.table.skip(&path, &mut ctx.ops).map_err(fail)?;
            run_ops(tree, ctx, None, layer, &raw)?;
            let what = if kind.as_byte() == b'3' {
                "char"
            } else {
                "block"
            };
            let h = entry.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            tree.skipped
                .push(format!("/{} ({what} device {major}:{minor})", show(&path)));
            return Ok(());
        }
        b'5' => New::Dir,
        b'6' => New::Fifo,
        other => return Err(fail(Reject::UnsupportedType(char::from(other)))),
    };
    let is_symlink = matches!(new, New::Symlink { .. });
    let is_file = matches!(new, New::File { .. });
    let mut meta = read_meta(entry, &path, &mut tree.skipped).map_err(fail)?;
    if is_symlink {
        // Linux ignores and cannot change a symlink's permission bits; ext4 stores 0777.
        meta.mode = 0o777;
    }
    tree.table
        .add(index, &path, new, meta, &mut ctx.ops)
        .map_err(fail)?;
    run_ops(
        tree,
        ctx,
        is_file.then_some(entry as &mut dyn Read),
        layer,
        &raw,
    )
}

/// Mode, owner, mtime and xattrs from the header and its PAX records.
fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &[u8],
    skipped: &mut Vec<String>,
) -> Result<Meta, Reject> {
    let bad = |what: &str, e: io::Error| Reject::BadHeader(format!("{what}: {e}"));
    let h = entry.header();
    let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
    // The tar crate has already applied PAX uid/gid to the header.
    let uid = h.uid().map_err(|e| bad("uid", e))?;
    let gid = h.gid().map_err(|e| bad("gid", e))?;
    let mut mtime = clamp_time(
        h.mtime()
            .map_err(|e| bad("mtime", e))?
            .try_into()
            .unwrap_or(i64::MAX),
    );
    let uid = u32::try_from(uid).map_err(|_| Reject::IdRange {
        field: "uid",
        value: uid,
    })?;
    let gid = u32::try_from(gid).map_err(|_| Reject::IdRange {
        field: "gid",
        value: gid,
    })?;
    let mut xattrs: Vec<Xattr> = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(|e| bad("PAX records", e))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad("PAX record", e))?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(ext.value_bytes())
                    .ok_or_else(|| Reject::BadHeader("PAX mtime".into()))?;
            } else if key.starts_with(b"GNU.sparse.") {
                return Err(Reject::PaxSparse);
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if !xattr_supported(name) {
                    skipped.push(format!(
                        "/{} (xattr {} not supported by ext4)",
                        show(path),
                        show(name)
                    ));
                    continue;
                }
                let name = std::str::from_utf8(name)
                    .ok()
                    .filter(|n| !n.contains(['\n', '\r', '\0']))
                    .ok_or_else(|| Reject::BadXattr(show(name)))?;
                let value = ext.value_bytes().to_vec();
                match xattrs.iter_mut().find(|x| x.name == name) {
                    Some(x) => x.value = value,
                    None => xattrs.push(Xattr {
                        name: name.to_string(),
                        value,
                    }),
                }
            } else if key.starts_with(b"LIBARCHIVE.xattr.") {
                skipped.push(format!(
                    "/{} (LIBARCHIVE.xattr records are not supported)",
                    show(path)
                ));
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// Namespaces ext4 stores and debugfs's `ea_set` writes verbatim. (`system.*` would need
/// ACL format conversion; other namespaces do not exist on ext4.)
fn xattr_supported(name: &[u8]) -> bool {
    ["user.", "trusted.", "security."].iter().any(|p| {
        name.strip_prefix(p.as_bytes())
            .is_some_and(|rest| !rest.is_empty() && rest.len() <= 255)
    })
}

/// ext4 with 256-byte inodes and `mkfs -d` (which stores `st_mtime` in the 32-bit field)
/// round-trip the signed 32-bit range only.
fn clamp_time(t: i64) -> i64 {
    t.clamp(i64::from(i32::MIN), i64::from(i32::MAX))
}

/// PAX times are decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let int = s.split('.').next()?;
    if int.is_empty() || int == "-" {
        return Some(0);
    }
    let n: i128 = int.parse().ok()?;
    Some(clamp_time(
        n.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
    ))
}

fn host(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn run_ops(
    tree: &Tree,
    ctx: &mut Ctx<'_>,
    mut content: Option<&mut dyn Read>,
    layer: &Layer,
    raw: &[u8],
) -> Result<(), RootfsError> {
    let io_err = |e: io::Error| RootfsError::EntryIo {
        layer: layer.label.clone(),
        path: show(raw),
        source: e,
    };
    let ops = std::mem::take(&mut ctx.ops);
    let root = tree.root.as_path();
    for op in &ops {
        match op {
            Op::Remove { path, dir: true } => fs::remove_dir(host(root, path)).map_err(io_err)?,
            Op::Remove { path, dir: false } => fs::remove_file(host(root, path)).map_err(io_err)?,
            Op::Mkdir { path } => {
                let p = host(root, path);
                DirBuilder::new().mode(0o700).create(&p).map_err(io_err)?;
                if ctx.fix_modes {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
                }
            }
            Op::File { path } => {
                let p = host(root, path);
                // O_EXCL + O_NOFOLLOW: never reuse or follow whatever might sit there.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                    .open(&p)
                    .map_err(io_err)?;
                if ctx.fix_modes {
                    f.set_permissions(fs::Permissions::from_mode(0o600))
                        .map_err(io_err)?;
                }
                let size = match tree.table.get(path).map(|n| &n.kind) {
                    Some(crate::NodeKind::File { size }) => *size,
                    _ => 0,
                };
                if let Some(src) = content.take() {
                    match copy_sparse(src, &mut f, size, &mut ctx.buf, ctx.opts) {
                        Ok(()) => {}
                        Err(Copy::Cancelled) => return Err(RootfsError::Cancelled),
                        Err(Copy::Io(e)) => return Err(io_err(e)),
                    }
                }
            }
            Op::Symlink { path, target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), host(root, path))
                    .map_err(io_err)?
            }
            Op::Hardlink { path, target } => {
                // link(2) (linkat without AT_SYMLINK_FOLLOW) never follows; the target is a
                // regular file the table knows about.
                fs::hard_link(host(root, target), host(root, path)).map_err(io_err)?
            }
            Op::Fifo { path } => nix::unistd::mkfifo(
                &host(root, path),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| io_err(e.into()))?,
        }
    }
    ctx.ops = ops;
    Ok(())
}

enum Copy {
    Cancelled,
    Io(io::Error),
}

impl From<io::Error> for Copy {
    fn from(e: io::Error) -> Self {
        Copy::Io(e)
    }
}

/// Copies exactly `size` bytes, turning all-zero chunks into holes so that sparse content
/// (VM images, databases) does not cost scratch space; `mkfs -d` keeps them sparse too.
fn copy_sparse(
    src: &mut dyn Read,
    dst: &mut File,
    size: u64,
    buf: &mut [u8],
    opts: &BuildOptions,
) -> Result<(), Copy> {
    let mut total: u64 = 0;
    let mut hole = false;
    loop {
        if cancelled(opts) {
            return Err(Copy::Cancelled);
        }
        let n = read_full(src, buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
            hole = true;
        } else {
            dst.write_all(chunk)?;
            hole = false;
        }
        total += n as u64;
    }
    if total != size {
        return Err(Copy::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("layer ended after {total} of {size} content bytes"),
        )));
    }
    if hole {
        dst.set_len(total)?;
    }
    Ok(())
}

fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn drain<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ctx: &mut Ctx<'_>,
    layer: &Layer,
) -> Result<(), RootfsError> {
    loop {
        if cancelled(ctx.opts) {
            return Err(RootfsError::Cancelled);
        }
        match entry.read(&mut ctx.buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(RootfsError::Layer {
                    layer: layer.label.clone(),
                    context: "reading the tar stream",
                    source: e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.123456"), Some(1_700_000_000));
        assert_eq!(parse_pax_time(b"-5.5"), Some(-5));
        assert_eq!(
            parse_pax_time(b"99999999999999999999"),
            Some(i64::from(i32::MAX))
        );
        assert_eq!(parse_pax_time(b"abc"), None);
    }

    #[test]
    fn xattr_namespaces() {
        assert!(xattr_supported(b"user.test"));
        assert!(xattr_supported(b"security.capability"));
        assert!(xattr_supported(b"trusted.overlay.opaque"));
        assert!(!xattr_supported(b"user."));
        assert!(!xattr_supported(b"system.posix_acl_access"));
        assert!(!xattr_supported(b"bogus.x"));
    }
}
