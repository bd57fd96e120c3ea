//! The one error type of this crate.

use std::path::PathBuf;

/// Everything a pull, a reference parse or a cache operation can fail with. Messages say what
/// failed and for which reference, registry or digest, so callers can show them as they are.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference does not follow the Docker/OCI reference grammar.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    /// `--insecure` was asked for a registry that is neither loopback nor listed in the config.
    #[error(
        "{registry}: --insecure only allows plain HTTP to loopback registries \
         (localhost, 127.0.0.0/8, [::1]); to use plain HTTP with {registry}, list it in the \
         config's `insecure_registries`"
    )]
    InsecureNotAllowed { registry: String },

    /// The docker config file (credentials) could not be read or parsed.
    #[error("docker config {}: {message}", path.display())]
    DockerConfig { path: PathBuf, message: String },

    /// The registry could not be reached (DNS, connection, TLS, timeout).
    #[error("{registry}: {message}")]
    Network { registry: String, message: String },

    /// The tag, digest or repository does not exist.
    #[error("pulling {reference}: {message}")]
    NotFound { reference: String, message: String },

    /// The registry refused our (possibly anonymous) credentials.
    #[error("pulling {reference}: {message}")]
    Unauthorized { reference: String, message: String },

    /// Any other error the registry answered with.
    #[error("pulling {reference}: {message}")]
    Registry { reference: String, message: String },

    /// A manifest or index banger cannot use: schema 1, an unknown media type, a broken
    /// document, an artifact that is not a container image, foreign layers.
    #[error("pulling {reference}: {message}")]
    Unsupported { reference: String, message: String },

    /// The index has no linux/amd64 image.
    #[error("pulling {reference}: no linux/amd64 image in the index (available: {available})")]
    NoMatchingPlatform {
        reference: String,
        available: String,
    },

    /// A manifest or config larger than banger accepts (they are read into memory).
    #[error("pulling {reference}: {what} {digest} is {size} bytes, more than the {limit} allowed")]
    TooLarge {
        reference: String,
        what: &'static str,
        digest: String,
        size: u64,
        limit: u64,
    },

    /// Downloaded bytes do not hash to the digest the manifest promised.
    #[error(
        "pulling {reference}: blob {expected}: digest mismatch: expected {expected}, got {got}"
    )]
    DigestMismatch {
        reference: String,
        expected: String,
        got: String,
    },

    /// The registry sent more or fewer bytes than the descriptor's size.
    #[error(
        "pulling {reference}: blob {digest}: size mismatch: expected {expected} bytes, got {got}"
    )]
    SizeMismatch {
        reference: String,
        digest: String,
        expected: u64,
        got: u64,
    },

    /// The image config could not be parsed.
    #[error("pulling {reference}: config {digest}: {message}")]
    InvalidConfig {
        reference: String,
        digest: String,
        message: String,
    },

    /// A digest that is not `sha256:<64 lowercase hex>` (the only kind the cache stores).
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },

    /// A local file operation failed (cache, lock, partial file).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The HTTP client could not be built (TLS setup).
    #[error("setting up the registry client: {0}")]
    Client(String),

    /// The caller's cancellation token fired.
    #[error("pull cancelled")]
    Cancelled,
}

impl OciError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> OciError {
        OciError::Io {
            context: context.into(),
            source,
        }
    }
}
