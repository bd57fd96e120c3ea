//! Pulling OCI / Docker v2 images from registries into a digest-verified blob cache.
//!
//! The registry protocol (manifest and blob requests, `Docker-Content-Digest` checks of
//! manifests, the `WWW-Authenticate` bearer-token dance, Basic auth) is the maintained
//! [`oci_client`] crate's. This crate adds what banger needs around it: reference parsing
//! ([`Reference`]), the plain-HTTP policy ([`PullPolicy`]), credentials from a docker config
//! ([`DockerCredentials`]), linux/amd64 selection, media-type and size checks, and the cache.
//!
//! # Cache layout
//!
//! ```text
//! <cache_dir>/blobs/sha256/<hex>                  a blob (config or layer), complete and verified
//! <cache_dir>/blobs/sha256/<hex>.partial-<random> a download in progress (never read)
//! <cache_dir>/blobs/sha256/<hex>.lock             flock held while a process downloads <hex>
//! ```
//!
//! Blobs are content-addressed, so images share layers. Manifests are not cached: a pull
//! always asks the registry what a tag points at (one small request), and everything it
//! lists that is already in the cache is not downloaded again. [`BlobCache::prune`] removes
//! blobs no longer referenced by the images the caller keeps.
//!
//! # Verification
//!
//! A download streams into a fresh `<hex>.partial-<random>` file while a blocking thread
//! hashes it (sha256) and writes it. Only when the byte count equals the descriptor's size
//! and the hash equals its digest is the file fsynced and renamed to `<hex>` (then the
//! directory is fsynced). Any mismatch is an error naming the expected and actual digest (or
//! size) and the partial file is removed; a registry sending more bytes than promised is cut
//! off as soon as it does. Digests are checked to be `sha256:<64 hex>` before they become file
//! names, so a hostile manifest cannot name a path outside the cache. Manifests and configs
//! larger than 4 MiB are refused.
//!
//! A blob already in the cache is trusted if its size matches (a wrong size means it is
//! corrupt: it is removed and downloaded again). It is **not** re-hashed on every pull: it
//! was verified before it got its name, re-hashing a few hundred MiB would add seconds to
//! every VM create, and anyone able to modify the cache could equally modify it after a
//! check. [`BlobCache::verify`] re-hashes on demand.
//!
//! (oci-client also verifies each blob stream against its digest, so blobs are hashed twice;
//! the second hash runs on the network task while ours runs on the writer thread, so on a
//! multi-core host this costs CPU, not time.)
//!
//! # Concurrency: single flight
//!
//! Share one [`Puller`] (in an `Arc`) between tasks. Each blob being fetched has an async
//! mutex in the puller: a second pull needing the same blob waits for the first and then finds
//! it in the cache. If the first pull fails or is cancelled, its mutex guard is dropped, the
//! waiter finds the cache still empty and downloads the blob itself, so a waiter never hangs on
//! a dead leader. Across processes, the downloader of a blob holds an flock on `<hex>.lock`;
//! the lock file is unlinked (while still locked) when the download ends, and lockers check
//! that the file they locked is still the one at that path, so lock files do not accumulate.
//! Up to three layers of one image download at once.
//!
//! # Cancellation
//!
//! [`Puller::pull`] races the pull against the caller's [`CancellationToken`]; when it fires,
//! the pull future is dropped at its current await point (a chunk read, a lock wait, a
//! manifest request), which is prompt, not just "at the next chunk". Partial files, locks and
//! single-flight slots are guards that clean up in `Drop`, so by the time
//! [`OciError::Cancelled`] is returned no partial file of this pull is left. The same holds if
//! the caller simply drops the future (a timeout, an aborted task).
//!
//! # Transport security
//!
//! HTTPS by default, with certificates checked against the system's trust store
//! (reqwest's rustls backend with `rustls-platform-verifier`, which on Linux loads the system
//! roots via `rustls-native-certs`, so a local CA in `/etc/ssl/certs` is honoured; no bundled
//! webpki roots). oci-client is built with `rustls-tls-no-provider` rather than `rustls-tls`:
//! both use the platform verifier, but `rustls-tls` also compiles aws-lc-rs (a large C/asm
//! build) while the workspace already has ring; [`Puller::new`] installs ring as rustls's
//! process-wide default provider if the program has not chosen one. Plain HTTP only under
//! [`PullPolicy`]'s rules.
//!
//! [`CancellationToken`]: tokio_util::sync::CancellationToken

mod auth;
mod cache;
mod error;
mod manifest;
mod pull;
mod reference;

pub use auth::{BasicCredentials, DockerCredentials};
pub use cache::{BlobCache, PruneReport};
pub use error::OciError;
pub use manifest::{ImageConfig, LAYER_MEDIA_TYPES, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};
pub use pull::{CachedLayer, PullEvent, PullPolicy, PulledImage, Puller};
pub use reference::{DOCKER_HUB, Reference};
