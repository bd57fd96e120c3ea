//! `pull_catalog_kernel` against a local HTTP server serving tarballs built here.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_kernel::{
    CatalogEntry, KernelError, PullProgress, PullStage, pull_catalog_kernel, read_manifest,
    staging_dir,
};
use sha2::{Digest, Sha256};

/// What the server answers for one path: the body, and the Content-Length it claims (larger
/// than the body for a connection cut short).
#[derive(Clone)]
struct Reply {
    body: Vec<u8>,
    claimed_len: usize,
}

/// A tiny HTTP/1.1 server on 127.0.0.1: one thread, one request per connection, unknown paths
/// get 404. Returns the base URL. The thread lives until the test process ends.
fn serve(routes: HashMap<String, Reply>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = Arc::new(routes);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            match routes.get(&path) {
                Some(r) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        r.claimed_len
                    );
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.write_all(&r.body);
                }
                None => {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
            let _ = s.flush();
        }
    });
    format!("http://{addr}")
}

fn ok(body: Vec<u8>) -> Reply {
    Reply {
        claimed_len: body.len(),
        body,
    }
}

fn fake_vmlinux(release: &str) -> Vec<u8> {
    let mut elf = vec![0u8; 300_000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x12] = 62;
    let banner = format!("Linux version {release} (builder@ci) #1 SMP PREEMPT_DYNAMIC\0");
    elf[200_000..200_000 + banner.len()].copy_from_slice(banner.as_bytes());
    elf
}

fn module(name: &str) -> Vec<u8> {
    let mut m = b"\x7fELF\x02\x01\x01\x00".to_vec();
    m.extend_from_slice(format!("name={name}").as_bytes());
    m
}

/// A tarball of regular files, names written raw so hostile ones arrive unchanged.
fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn entry(name: &str, url: String, body: &[u8]) -> CatalogEntry {
    CatalogEntry {
        name: name.into(),
        url,
        sha256: sha(body),
        size: Some(body.len() as u64),
        version: None,
    }
}

/// Nothing of a failed pull may remain next to `dest`.
fn assert_nothing_left(dest: &Path) {
    let parent = dest.parent().unwrap();
    let left: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!staging_dir(dest).exists());
}

fn good_kernel_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("./vmlinux", fake_vmlinux("6.12.8-banger")),
        ("./initrd.img", b"070701initrd".to_vec()),
        ("./modules/virtio.ko", module("virtio")),
        ("./modules/virtio_mmio.ko", module("virtio_mmio")),
        (
            "./modules/load-order",
            b"virtio.ko\nvirtio_mmio.ko\n".to_vec(),
        ),
    ]
}

fn as_refs<'a>(v: &'a [(&'a str, Vec<u8>)]) -> Vec<(&'a str, &'a [u8])> {
    v.iter().map(|(p, d)| (*p, d.as_slice())).collect()
}

#[test]
fn good_tarball_is_pulled_into_the_kernel_layout() {
    let files = good_kernel_files();
    let tar_zst = zstd(&tarball(&as_refs(&files)));
    let plain_gz = gzip(&tarball(&[("vmlinux", &fake_vmlinux("6.1.99-plain"))]));
    let base = serve(HashMap::from([
        ("/k/generic.tar.zst".to_string(), ok(tar_zst.clone())),
        ("/k/plain.tar.gz".to_string(), ok(plain_gz.clone())),
    ]));
    let kernels = tempfile::tempdir().unwrap();
    let dest = kernels.path().join("generic-6.12");
    let mut e = entry(
        "generic-6.12",
        format!("{base}/k/generic.tar.zst"),
        &tar_zst,
    );
    e.version = Some("6.12.8".into());
    let mut stages = Vec::new();
    let mut last_download = None;
    let k = pull_catalog_kernel(&e, &dest, &mut |p| match p {
        PullProgress::Stage { stage, .. } => stages.push(stage),
        PullProgress::Download {
            stage, done, total, ..
        } => last_download = Some((stage, done, total)),
    })
    .unwrap();

    let n = tar_zst.len() as u64;
    assert_eq!(last_download, Some((PullStage::Download, n, n)));
    for s in [
        PullStage::Download,
        PullStage::Extract,
        PullStage::Vmlinux,
        PullStage::Finish,
    ] {
        assert!(stages.contains(&s), "{s:?} not in {stages:?}");
    }
    // The entry's version wins over the banner; paths are absolute in the result.
    assert_eq!(k.version, "6.12.8");
    assert_eq!(k.package, "generic-6.12");
    assert_eq!(k.source_url, e.url);
    assert_eq!(k.deb_sha256, e.sha256);
    assert_eq!(k.vmlinux, dest.join("vmlinux"));
    assert_eq!(k.initrd, Some(dest.join("initrd.img")));
    assert_eq!(
        k.modules,
        [
            dest.join("modules/virtio.ko"),
            dest.join("modules/virtio_mmio.ko")
        ]
    );
    assert_eq!(k.vmlinux_sha256, sha(&fake_vmlinux("6.12.8-banger")));
    assert_eq!(
        std::fs::read(&k.vmlinux).unwrap(),
        fake_vmlinux("6.12.8-banger")
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("modules/load-order")).unwrap(),
        "virtio.ko\nvirtio_mmio.ko\n"
    );
    assert_eq!(read_manifest(&dest).unwrap(), k);
    let manifest = std::fs::read_to_string(dest.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"vmlinux\": \"vmlinux\""), "{manifest}");
    let mut names: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["initrd.img", "manifest.json", "modules", "vmlinux"]);
    assert!(!staging_dir(&dest).exists());

    // A second pull into the same place is refused and leaves the first alone.
    let again = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(again, KernelError::AlreadyExists { .. }),
        "{again}"
    );
    assert!(dest.join("vmlinux").is_file());

    // No size in the entry, gzip, vmlinux only: the version comes from the banner.
    let dest = kernels.path().join("plain");
    let mut e = entry("plain", format!("{base}/k/plain.tar.gz"), &plain_gz);
    e.size = None;
    let k = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap();
    assert_eq!(k.version, "6.1.99-plain");
    assert_eq!(k.initrd, None);
    assert!(k.modules.is_empty());
}

#[test]
fn traversal_entry_is_refused_by_name_and_nothing_is_left() {
    let mut files = good_kernel_files();
    files.push((
        "./modules/../../../etc/cron.d/evil",
        b"* * * * * root sh".to_vec(),
    ));
    let body = gzip(&tarball(&as_refs(&files)));
    let base = serve(HashMap::from([(
        "/evil.tar.gz".to_string(),
        ok(body.clone()),
    )]));
    let kernels = tempfile::tempdir().unwrap();
    let dest = kernels.path().join("evil");
    let e = entry("evil", format!("{base}/evil.tar.gz"), &body);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::UnsafePath { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("../../../etc/cron.d/evil") && msg.contains(&e.url),
        "{msg}"
    );
    assert_nothing_left(&dest);
}

#[test]
fn wrong_hash_is_refused_with_name_and_url() {
    let body = zstd(&tarball(&as_refs(&good_kernel_files())));
    let base = serve(HashMap::from([(
        "/k.tar.zst".to_string(),
        ok(body.clone()),
    )]));
    let kernels = tempfile::tempdir().unwrap();
    let dest = kernels.path().join("tampered");
    let mut e = entry("tampered", format!("{base}/k.tar.zst"), &body);
    e.sha256 = "0".repeat(64);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    match &err {
        KernelError::HashMismatch {
            url,
            expected,
            actual,
            what,
        } => {
            assert_eq!(url, &e.url);
            assert_eq!(expected, &"0".repeat(64));
            assert_eq!(actual, &sha(&body));
            assert!(what.contains("tampered"), "{what}");
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
    assert_nothing_left(&dest);
}

#[test]
fn truncated_wrong_size_and_missing_downloads_are_refused() {
    let body = zstd(&tarball(&as_refs(&good_kernel_files())));
    let half = body[..body.len() / 2].to_vec();
    let base = serve(HashMap::from([
        (
            // Claims the full length, sends half, closes.
            "/cut.tar.zst".to_string(),
            Reply {
                body: half.clone(),
                claimed_len: body.len(),
            },
        ),
        ("/half.tar.zst".to_string(), ok(half.clone())),
        ("/full.tar.zst".to_string(), ok(body.clone())),
    ]));
    let kernels = tempfile::tempdir().unwrap();
    let dest = kernels.path().join("k");

    // Connection cut short: an HTTP error with or without a size in the entry.
    for size in [Some(body.len() as u64), None] {
        let mut e = entry("k", format!("{base}/cut.tar.zst"), &body);
        e.size = size;
        let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Http { .. } | KernelError::SizeMismatch { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&e.url), "{err}");
        assert_nothing_left(&dest);
    }

    // A complete response of the wrong length: the size check catches it before the hash.
    let e = entry("k", format!("{base}/half.tar.zst"), &body);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    match &err {
        KernelError::SizeMismatch {
            expected, actual, ..
        } => assert_eq!((*expected, *actual), (body.len() as u64, half.len() as u64)),
        other => panic!("expected a size mismatch, got {other}"),
    }
    assert_nothing_left(&dest);
    let mut e = entry("k", format!("{base}/full.tar.zst"), &body);
    e.size = Some(body.len() as u64 - 1);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::SizeMismatch { .. }), "{err}");
    assert_nothing_left(&dest);

    // A truncated tarball whose hash the catalog vouches for still fails to unpack.
    let e = entry("k", format!("{base}/half.tar.zst"), &half);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Archive { .. } | KernelError::Decompress { .. }
        ),
        "{err}"
    );
    assert_nothing_left(&dest);

    // 404.
    let e = entry("k", format!("{base}/nothing-here.tar.zst"), &body);
    let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::Http { .. }), "{err}");
    assert!(err.to_string().contains("nothing-here.tar.zst"), "{err}");
    assert_nothing_left(&dest);
}
