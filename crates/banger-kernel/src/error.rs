//! The one error type of this crate. Every variant names the input it is about (URL, file,
//! package, module, hash) so a failed pull says what to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("fetching {url}: {message}")]
    Http { url: String, message: String },

    #[error("{what} from {url}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        url: String,
        expected: u64,
        actual: u64,
    },

    #[error("{what} from {url}: sha256 {actual} does not match the signed {expected}")]
    HashMismatch {
        what: String,
        url: String,
        expected: String,
        actual: String,
    },

    #[error("{program} not found in PATH; install the gpgv package to verify Debian's signatures")]
    MissingProgram { program: String },

    #[error(
        "keyring {path} not found; install debian-archive-keyring or point the mirror at a keyring"
    )]
    MissingKeyring { path: PathBuf },

    #[error("signature check of {url} with keyring {keyring} failed: {stderr}")]
    BadSignature {
        url: String,
        keyring: PathBuf,
        stderr: String,
    },

    #[error("release file {url}: {message}")]
    Release { url: String, message: String },

    #[error("package index {url}: {message}")]
    Packages { url: String, message: String },

    #[error("{path}: {message}")]
    Archive { path: String, message: String },

    #[error("unsafe path {path:?} in {archive}: absolute or containing '..'")]
    UnsafePath { archive: String, path: String },

    #[error("{what}: {message}")]
    Decompress { what: String, message: String },

    #[error("{what}: unsupported compression {format}")]
    UnsupportedCompression { what: String, format: String },

    #[error("{what}: {message}")]
    Kernel { what: String, message: String },

    #[error("module {module}: {message}")]
    Module { module: String, message: String },

    #[error("module dependency cycle: {}", chain.join(" -> "))]
    ModuleCycle { chain: Vec<String> },

    #[error("catalog kernel {name}: {message}")]
    Catalog { name: String, message: String },

    #[error("kernel config fragment line {line}: {message}")]
    Fragment { line: usize, message: String },

    #[error(
        "kernel build tools missing: {}; install them with: apt-get install {}",
        packages.join(" "),
        packages.join(" ")
    )]
    MissingBuildTools { packages: Vec<String> },

    #[error("{} already exists", path.display())]
    AlreadyExists { path: PathBuf },

    #[error("manifest {}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> KernelError {
        let path = path.into();
        move |source| KernelError::Io { path, source }
    }
}
