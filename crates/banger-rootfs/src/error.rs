//! Error types. Every message that concerns layer content names the layer (its label, normally
//! the blob digest) and the entry path as written in the tar, because the person reading it has
//! to decide whether the image is broken, hostile, or hit a limit of this crate.

use std::io;

/// Why one tar entry was refused. A refusal fails the whole build: a layer that contains one
/// hostile or unencodable entry never produces an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    #[error("empty name")]
    Empty,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("absolute path (layer entries must be relative to the image root)")]
    Absolute,
    #[error("path escapes the image root")]
    DotDot,
    #[error("path component of {0} bytes exceeds ext4's 255-byte name limit")]
    ComponentTooLong(usize),
    #[error("path of {0} bytes exceeds the 4095-byte PATH_MAX limit")]
    PathTooLong(usize),
    #[error(
        "name contains {0:?}, which the ext4 writer cannot encode (debugfs command files are \
         line based)"
    )]
    Unencodable(char),
    #[error("a whiteout marker ({0:?}) cannot be a directory")]
    WhiteoutAsDirectory(String),
    #[error("whiteout {0:?} names nothing")]
    EmptyWhiteout(String),
    #[error("path passes through symlink {0:?}")]
    ThroughSymlink(String),
    #[error("parent {0:?} is not a directory")]
    ParentNotDir(String),
    #[error("only a directory entry can describe the image root")]
    ReplacesRoot,
    #[error("symlink target {0:?} escapes the image root")]
    SymlinkEscapes(String),
    #[error("symlink target is empty")]
    EmptySymlink,
    #[error("symlink target contains a NUL byte")]
    SymlinkNul,
    #[error("symlink target of {0} bytes exceeds 4095 bytes")]
    SymlinkTooLong(usize),
    #[error("hardlink target {target:?}: {reason}")]
    HardlinkTarget { target: String, reason: Box<Reject> },
    #[error("hardlink target {0:?} does not exist")]
    HardlinkMissing(String),
    #[error("hardlink target {0:?} is not a regular file")]
    HardlinkNotFile(String),
    #[error("hardlink target {0:?} would be removed by replacing the link's own path")]
    HardlinkSelf(String),
    #[error("hardlink target is the image root")]
    HardlinkRoot,
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    #[error("malformed header: {0}")]
    BadHeader(String),
    #[error("PAX sparse files (GNU.sparse.*) are not supported")]
    PaxSparse,
    #[error("extended attribute {0:?} cannot be encoded")]
    BadXattr(String),
    #[error("{field} {value} does not fit in 32 bits")]
    IdRange { field: &'static str, value: u64 },
    #[error("file of {size} bytes exceeds the remaining content budget of {remaining} bytes")]
    TooLarge { size: u64, remaining: u64 },
}

/// Everything that can go wrong in [`crate::build_rootfs`], [`crate::flatten`] and
/// [`crate::write_ext4`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    /// A layer entry was refused.
    #[error("layer {layer}: entry {path:?}: {reason}")]
    Entry {
        layer: String,
        path: String,
        reason: Reject,
    },
    /// Writing one entry into the scratch tree failed (disk full, permissions, ...).
    #[error("layer {layer}: entry {path:?}: {source}")]
    EntryIo {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The layer blob itself could not be opened, decompressed or parsed as tar.
    #[error("layer {layer}: {context}: {source}")]
    Layer {
        layer: String,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// The cancel flag was raised.
    #[error("cancelled")]
    Cancelled,
    /// The options or arguments cannot be used.
    #[error("invalid arguments: {0}")]
    Invalid(String),
    /// Scratch-space or image-file I/O outside of any single entry.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// An e2fsprogs tool is not installed (searched in `$PATH`, `/usr/sbin` and `/sbin`).
    #[error("{0} not found (install e2fsprogs)")]
    ToolMissing(&'static str),
    /// An e2fsprogs tool failed as a whole.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    /// `debugfs` rejected the metadata fixup of one path.
    #[error("setting the metadata of {path:?} in the image failed: {message}")]
    Fixup { path: String, message: String },
    /// The image written by `mkfs.ext4 -d` does not match the scratch tree.
    #[error("the ext4 image does not match the flattened tree: {0}")]
    Mismatch(String),
}

impl RootfsError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        RootfsError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Lossy, for messages only: names are bytes, messages are text.
pub(crate) fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
