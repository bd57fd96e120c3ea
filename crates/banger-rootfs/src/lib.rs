//! Flattens OCI image layers into an ext4 root file system image — without mounting
//! anything and without root.
//!
//! # Why not mount?
//!
//! The obvious way to build a root file system is `mkfs.ext4` on an empty image, a loop mount,
//! and `tar -x` into it. That needs root (loop devices, mount, chown to arbitrary uids,
//! device nodes) and runs hostile archive content through the host kernel's ext4 driver and
//! tar's path handling with full privileges. The daemon runs unprivileged, so instead:
//!
//! 1. **Flatten** ([`flatten`]): every layer is streamed (uncompressed, gzip or zstd, sniffed
//!    when asked) through the `tar` parser, oldest layer first. Each entry is first applied to
//!    an in-memory metadata table (path → kind, mode, uid, gid, mtime, xattrs, originating
//!    layer, inode identity), which decides what happens; only then is the scratch directory
//!    changed to match. The scratch copy is owned by the current user with permissive modes
//!    (directories `0700`, files `0600`) so that it can always be written, read back by
//!    `mkfs` and removed — the *real* metadata lives only in the table.
//! 2. **mkfs** ([`write_ext4`]): the scratch copy is first brought as close to the wanted
//!    metadata as this process may — mtimes always (set last, after all children exist),
//!    permission bits with the owner's `rw`/`rwx` kept, owners only when running as root —
//!    because `mkfs.ext4 -d <tree>` (e2fsprogs ≥ 1.43; 1.47.0 cannot read a tarball) copies
//!    mode, owner and times from it. mkfs then builds a fresh sparse image from the
//!    directory: structure, content (holes stay holes), hard links (it detects
//!    `st_nlink > 1`), symlinks and fifos. The image is sized from the table:
//!    `max(alloc × 1.5 + 256 MiB + inode tables, 512 MiB) + extra_bytes`, rounded to 4 KiB,
//!    where `alloc` is the content rounded up to 4 KiB blocks plus a block per directory,
//!    long symlink and xattr-bearing inode plus directory entries (plain content bytes would
//!    under-count images of many small files); `-N` inodes = entries × 1.3 + 8192; 4 KiB
//!    blocks, 256-byte inodes, lazy inode-table and journal init.
//! 3. **Inventory**: one read-only `debugfs` run lists every directory with `ls -p`, reached
//!    by relative `cd "./name"`s so that no command line holds more than one quoted
//!    component (debugfs reads 8 KiB lines; a 4 KiB path of quotes would double). Each
//!    listing is checked against the inode number its parent's listing announced, so a
//!    failed `cd` cannot shift listings onto the wrong paths, and the result must contain
//!    exactly the table's paths with the right file types (plus `lost+found`). This yields
//!    the inode number, mode and owner mkfs gave every path.
//! 4. **Fixups**: one `debugfs -w -f <script>` run writes what still differs — `sif <ino>
//!    mode` (the full `i_mode`, type bits included), `sif <ino> uid`/`gid` — and every xattr
//!    (`ea_set -f <valuefile> <ino> "<name>"`; the scratch copy never carries xattrs: as a
//!    normal user `security.*` and `trusted.*` cannot even be set). Inodes are addressed by
//!    number: no lookups (debugfs scans directories linearly, which is quadratic for big
//!    directories) and no path quoting at all. As root the script is nearly empty; as a
//!    normal user every owner differs. [`BuildOptions::force_fixups`] skips the host-side
//!    chmod/chown and writes every mode/uid/gid, so the unprivileged path is exercised
//!    anywhere. debugfs exits 0 even when a command fails and buffers the stdout where it
//!    echoes commands, so any stderr line but its banner fails the build; to name the path,
//!    the script is then run again (every command sets an absolute value, so repeating is
//!    harmless) with a marker command that always fails after each inode's group, and the
//!    error is attributed to the group before it.
//!
//! Quoting, where a name must appear in a debugfs command (the inventory's `cd`): libss
//! splits on blanks, and inside double quotes everything is literal except `""`, which is one
//! `"`. Relative names are written as `"./name"` because debugfs reads `<N>` as inode N.
//! Only `\n` and `\r` (and NUL) cannot be expressed; such names are refused at flatten time.
//!
//! The image root is always owned by `0:0` (`-E root_owner=0:0`; a `./` entry owned by a
//! builder's uid would otherwise hand that guest user `/`); its mode, mtime and xattrs come
//! from a `./` entry (default `0755`).
//!
//! Measured on the 2-core development VM (release build, 32,304 entries: 300 directories of
//! 100 small files plus one of 2,000): about 2.5 s end to end on tmpfs scratch, as root or
//! not — flatten ~0.6 s, mkfs + inventory ~1.3 s, fixups ~0.1–0.6 s (0 commands as root,
//! ~65k as uid 65534, ~97k forced). On the VM's busy disk, flatten is bound by file
//! creation (10–25 s for the same tree, as slow as any other writer there).
//!
//! # Layer semantics (OCI image-spec changesets)
//!
//! * Names: a leading `./` and trailing `/` are stripped (`.` and empty components are
//!   dropped). Refused: empty names, NUL, absolute paths, any `..` component, components over
//!   255 bytes, paths over 4095 bytes, and `\n`/`\r` (debugfs command files are read line by
//!   line; such names could not be fixed up, and are refused rather than mangled).
//! * `dir/.wh.NAME` hides NAME (and its subtree) from *lower* layers; `dir/.wh..wh..opq` hides
//!   every lower child of `dir`. Both apply at the point they occur in the tar but never hide
//!   entries of their own layer, in whatever order the layer lists them (every node records
//!   the layer that last wrote it). A lower directory that still holds entries of the current
//!   layer stays, as their parent. Whiteouts of absent paths are no-ops; markers never appear
//!   in the result, and a whiteout name used as a directory is refused. Other `.wh..wh.*`
//!   names (AUFS bookkeeping) are skipped and reported.
//! * Later entries replace earlier ones; a directory over a directory only updates metadata.
//!   Parents that a layer omits are created `0755 root:root`.
//! * Hard links need a normalized, existing regular-file target; they become real hard links
//!   (one inode in the image) and carry the target's metadata.
//! * Char/block devices are skipped and listed in [`RootfsReport::skipped`] (the guest's
//!   `/dev` is a devtmpfs). Mode bits incl. setuid/setgid/sticky, uid, gid, mtime (seconds,
//!   clamped to the signed 32-bit range) and `SCHILY.xattr.{user,trusted,security}.*` are
//!   kept; other xattr namespaces are skipped and reported.
//!
//! # Hardening
//!
//! * Nothing is ever written through a symlink: if any ancestor of an entry (or of a
//!   whiteout) is a symlink in the table — from this or an earlier layer — the entry is
//!   refused. The table is authoritative and mirrors the scratch tree exactly, so host
//!   operations only ever address paths whose every ancestor is a real directory created by
//!   this crate; files are additionally created `O_CREAT|O_EXCL|O_NOFOLLOW`, and hard links
//!   use `link(2)`, which does not follow. No path is ever canonicalized.
//! * Symlink targets are stored verbatim. Absolute targets are fine (they resolve inside the
//!   guest); a relative target that lexically climbs above the image root from the link's
//!   directory is refused, so the image never holds a link that only makes sense when
//!   resolved on the host.
//! * Any refusal fails the whole build: a layer with one hostile entry never yields an image.
//!   [`build_rootfs`] removes the scratch tree and `out` on any error and on cancel.
//! * Resource limits: a tar entry's metadata (headers, GNU long names, PAX records, which the
//!   parser buffers) is capped at 16 MiB; file content is streamed (all-zero chunks become
//!   holes); [`BuildOptions::max_content_bytes`] optionally caps the total content (against
//!   decompression bombs, including sparse entries claiming terabytes).
//! * Report facts (`has_sshd`, `init`, ...) resolve symlinks such as `sbin -> usr/sbin`
//!   lexically inside the table, never on the host.
//!
//! # Limits
//!
//! * mkfs 1.47.0 inserts directory entries linearly: a directory of tens of thousands of
//!   entries is slow to build (seconds), and the image's directories are not htree-indexed
//!   (`e2fsck -fyD` would index them). A real 275k-entry, 6.3 GB tree (a tarball of this
//!   host's `/usr`, `/etc`, `/root`) took 101 s on the busy development disk: flatten
//!   39 s, mkfs + inventory 41 s, cleanup 21 s; `e2fsck -fn` clean.
//! * `mkfs -d` also copies host xattrs of the scratch files; on an SELinux host that would
//!   include the scratch directory's labels (nothing on hosts without an LSM labelling
//!   files). Not filtered.
//! * Not supported: more than 65,000 hard links to one inode (mkfs fails the build), xattrs
//!   that do not fit one 4 KiB block (the fixup fails the build naming the path), and
//!   `system.*` / `LIBARCHIVE.xattr.*` attributes (skipped and reported). Times keep whole
//!   seconds.
//!
//! Everything here is blocking; call it from a blocking thread.

mod dirfacts;
mod error;
mod ext4;
mod flatten;
mod fsutil;
mod layer;
mod name;
mod table;
mod tree;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use dirfacts::{DirFacts, inspect_dir};
pub use error::{Reject, RootfsError};
pub use ext4::{check_image, find_tool};
pub use table::{Meta, Node, NodeKind, Xattr};
pub use tree::Tree;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
    /// Sniff the magic bytes (gzip, zstd, otherwise plain tar).
    Auto,
}

/// One layer blob on disk.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub compression: LayerCompression,
    /// Names the layer in error messages, e.g. its digest.
    pub label: String,
}

/// Knobs for a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// ext4 volume label (at most 16 bytes).
    pub fs_label: String,
    /// Raised by another thread to stop the build; checked at every entry, every 256 KiB of
    /// content and while the e2fsprogs tools run.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Headroom added to the computed image size.
    pub extra_bytes: u64,
    /// Write every inode's mode, uid and gid with debugfs even when mkfs already got them
    /// right (the path an unprivileged daemon takes for nearly every inode).
    pub force_fixups: bool,
    /// Refuse layers whose regular files add up to more than this many bytes.
    pub max_content_bytes: Option<u64>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            fs_label: "banger-rootfs".into(),
            cancel: None,
            extra_bytes: 0,
            force_fixups: false,
            max_content_bytes: None,
        }
    }
}

pub(crate) fn cancelled(opts: &BuildOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Progress reports, in order: per layer `Layer` then `Entries` (every 256 entries and at the
/// end of the layer; `done` counts across layers), then `Mkfs`, then `Fixups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Layer {
        index: usize,
        count: usize,
        label: String,
    },
    Entries {
        done: u64,
    },
    Mkfs {
        size_bytes: u64,
        files: u64,
    },
    /// Number of debugfs fixup commands about to run.
    Fixups {
        count: u64,
    },
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsReport {
    /// Paths in the image (the root and `lost+found` excluded).
    pub files: u64,
    /// Bytes of regular-file content (each hard-linked inode once).
    pub content_bytes: u64,
    /// Size of the image file (sparse).
    pub image_bytes: u64,
    /// What was left out, e.g. `"/dev/null (char device 1:3)"`.
    pub skipped: Vec<String>,
    /// `/usr/sbin/sshd`, `/sbin/sshd` or `/usr/bin/sshd` resolves to a file.
    pub has_sshd: bool,
    /// First of `/sbin/init`, `/lib/systemd/systemd`, `/usr/lib/systemd/systemd` that resolves
    /// to a file.
    pub init: Option<String>,
    /// `"apt" | "apk" | "dnf" | "yum" | "zypper" | "pacman"`, by presence of its binary.
    pub package_manager: Option<String>,
    /// Entries below `/root`, recursively.
    pub root_home_entries: u64,
}

/// Applies `layers` (oldest first) into a scratch tree under `scratch`, then writes `out` as
/// an ext4 image. `scratch` is created if missing (and then removed again); the tree lives
/// in a fresh subdirectory. On error or cancel, `out` and the scratch tree are removed.
pub fn build_rootfs(
    layers: &[Layer],
    scratch: &Path,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RootfsReport, RootfsError> {
    let created_scratch = !scratch.exists();
    fs::create_dir_all(scratch)
        .map_err(|e| RootfsError::io(format!("creating {}", scratch.display()), e))?;
    let cleanup = |work: Option<&Path>| -> io::Result<()> {
        if let Some(w) = work {
            fsutil::remove_tree(w)?;
        }
        if created_scratch {
            fs::remove_dir(scratch)?;
        }
        Ok(())
    };
    let work = match tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(scratch)
    {
        Ok(w) => w.keep(),
        Err(e) => {
            let _ = cleanup(None);
            return Err(RootfsError::io(
                format!("creating a work directory in {}", scratch.display()),
                e,
            ));
        }
    };
    let result = flatten(layers, &work.join("tree"), opts, progress)
        .and_then(|tree| write_ext4(&tree, out, opts, progress));
    let cleaned = cleanup(Some(&work));
    match (result, cleaned) {
        (Ok(report), Ok(())) => Ok(report),
        (Ok(_), Err(e)) => {
            let _ = fs::remove_file(out);
            Err(RootfsError::io("removing the scratch tree", e))
        }
        (Err(e), _) => {
            // write_ext4 already removes an image it started; a stale `out` from an earlier
            // run goes too, so an error never leaves an image behind.
            let _ = fs::remove_file(out);
            Err(e)
        }
    }
}

/// Flattens `layers` into the new or empty directory `tree`. On error `tree` is removed.
pub fn flatten(
    layers: &[Layer],
    tree: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tree, RootfsError> {
    flatten::flatten(layers, tree, opts, progress)
}

/// Writes `tree` into the ext4 image `out` (created or truncated; removed again on error).
pub fn write_ext4(
    tree: &Tree,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RootfsReport, RootfsError> {
    ext4::write_ext4(tree, out, opts, progress)
}
