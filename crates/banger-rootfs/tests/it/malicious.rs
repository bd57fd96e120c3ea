//! Hostile layers: every one fails the whole build, names the layer and the entry, and leaves
//! neither an image nor scratch space behind.

use banger_rootfs::{BuildOptions, LayerCompression, RootfsError, build_rootfs};

use crate::support::*;

/// Builds `layers` (plain tar, named l0, l1, …) and expects a refusal mentioning `entry`
/// of layer `layer` and containing `reason`.
fn refused_with(
    layers: Vec<Vec<u8>>,
    opts: BuildOptions,
    layer_idx: usize,
    entry: &str,
    reason: &str,
) {
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, bytes)| layer(tmp.path(), &format!("l{i}"), bytes, LayerCompression::Auto))
        .collect();
    let scratch = tmp.path().join("scratch");
    let out = tmp.path().join("out.ext4");
    // A stale image from an earlier run must not survive a failed build either.
    std::fs::write(&out, b"stale").unwrap();
    let err = build_rootfs(&layers, &scratch, &out, &opts, &mut |_| {})
        .expect_err("hostile layer accepted");
    let msg = err.to_string();
    let prefix = format!("layer sha256:l{layer_idx}: entry {entry:?}: ");
    assert!(
        msg.starts_with(&prefix),
        "message {msg:?} should start with {prefix:?}"
    );
    assert!(
        msg.contains(reason),
        "message {msg:?} should contain {reason:?}"
    );
    assert!(!out.exists(), "{msg}: image left behind");
    assert!(!scratch.exists(), "{msg}: scratch left behind");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('l'))
        .collect();
    assert!(left.is_empty(), "{msg}: left {left:?}");
}

fn refused(entries: Vec<E>, entry: &str, reason: &str) {
    refused_with(
        vec![tar_of(entries)],
        BuildOptions::default(),
        0,
        entry,
        reason,
    );
}

#[test]
fn dotdot_names() {
    refused(
        vec![E::file("../evil", "x", 0o644)],
        "../evil",
        "escapes the image root",
    );
    refused(
        vec![
            E::file("a/b", "x", 0o644),
            E::file("a/../../evil", "x", 0o644),
        ],
        "a/../../evil",
        "escapes the image root",
    );
    refused(
        vec![E::dir("./../", 0o755)],
        "./../",
        "escapes the image root",
    );
}

#[test]
fn absolute_name() {
    refused(
        vec![E::file("/etc/passwd", "x", 0o644)],
        "/etc/passwd",
        "absolute path",
    );
}

#[test]
fn through_symlink_same_and_later_layer() {
    refused(
        vec![
            E::symlink("link", "/etc"),
            E::file("link/passwd", "x", 0o644),
        ],
        "link/passwd",
        "passes through symlink \"link\"",
    );
    refused_with(
        vec![
            tar_of([E::symlink("etc", "/tmp")]),
            tar_of([E::file("etc/cron.d/evil", "x", 0o644)]),
        ],
        BuildOptions::default(),
        1,
        "etc/cron.d/evil",
        "passes through symlink \"etc\"",
    );
    // Whiteouts and opaque markers do not act through symlinks either.
    refused(
        vec![E::symlink("link", "/etc"), E::whiteout("link/.wh.passwd")],
        "link/.wh.passwd",
        "passes through symlink",
    );
    refused(
        vec![E::symlink("d", "/"), E::whiteout("d/.wh..wh..opq")],
        "d/.wh..wh..opq",
        "passes through symlink",
    );
    // A device entry (which is skipped) is still checked.
    refused(
        vec![E::symlink("dev", "/host-dev"), E::chardev("dev/null", 1, 3)],
        "dev/null",
        "passes through symlink",
    );
}

#[test]
fn escaping_symlinks() {
    // The brief's classic: the link is refused before anything can pass through it.
    refused(
        vec![
            E::symlink("link", "../../../etc"),
            E::file("link/passwd", "x", 0o644),
        ],
        "link",
        "escapes the image root",
    );
    refused(
        vec![E::symlink("a/b", "../../../etc/shadow")],
        "a/b",
        "symlink target \"../../../etc/shadow\" escapes the image root",
    );
}

#[test]
fn hardlink_targets() {
    refused(
        vec![E::hardlink("h", "../../etc/shadow")],
        "h",
        "hardlink target \"../../etc/shadow\": path escapes the image root",
    );
    refused(
        vec![E::hardlink("h", "/etc/shadow")],
        "h",
        "hardlink target \"/etc/shadow\": absolute path",
    );
    refused(vec![E::hardlink("h", "missing")], "h", "does not exist");
    refused(
        vec![E::dir("d", 0o755), E::hardlink("h", "d")],
        "h",
        "is not a regular file",
    );
    refused(
        vec![E::symlink("s", "/etc/shadow"), E::hardlink("h", "s")],
        "h",
        "is not a regular file",
    );
}

#[test]
fn unencodable_and_oversized_names() {
    let long = "x".repeat(256);
    refused(
        vec![E::file(&long, "x", 0o644)],
        &long,
        "256 bytes exceeds ext4's 255-byte name limit",
    );
    refused(vec![E::file("a\nb", "x", 0o644)], "a\nb", "cannot encode");
    refused(
        vec![E::file("nul\0name", "x", 0o644).pax_path_with_nul()],
        "nul\0name",
        "NUL",
    );
}

#[test]
fn structural_refusals() {
    refused(
        vec![E::file("f", "x", 0o644), E::file("f/g", "x", 0o644)],
        "f/g",
        "parent \"f\" is not a directory",
    );
    refused(
        vec![E::file("a/.wh.b/c", "x", 0o644)],
        "a/.wh.b/c",
        "cannot be a directory",
    );
    refused(vec![E::fifo("./", 0o644)], "./", "image root");
    let mut odd = E::file("vol", "", 0o644);
    odd.kind = b'V';
    refused(vec![odd], "vol", "unsupported tar entry type 'V'");
}

#[test]
fn content_budget() {
    refused_with(
        vec![tar_of([
            E::file("a", vec![1u8; 600], 0o644),
            E::file("b", vec![1u8; 600], 0o644),
        ])],
        BuildOptions {
            max_content_bytes: Some(1000),
            ..Default::default()
        },
        0,
        "b",
        "exceeds the remaining content budget of 400 bytes",
    );
}

/// Errors that are about the layer stream rather than an entry.
fn stream_refused(bytes: Vec<u8>, needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [layer(tmp.path(), "bad", &bytes, LayerCompression::Auto)];
    let scratch = tmp.path().join("scratch");
    let out = tmp.path().join("out");
    let err = build_rootfs(&layers, &scratch, &out, &Default::default(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, RootfsError::Layer { .. } | RootfsError::EntryIo { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("layer sha256:bad: "), "{msg}");
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    assert!(!out.exists() && !scratch.exists());
}

#[test]
fn broken_streams() {
    let mut gz = gzip(&tar_of([E::file("a", vec![7u8; 100_000], 0o644)]));
    let n = gz.len();
    gz.truncate(n / 2);
    // Either while reading a header or in the middle of the file's content.
    stream_refused(gz, "deflate");
    let mut t = tar_of([E::file("a", "hello", 0o644)]);
    t[0] ^= 0x55; // checksum mismatch
    stream_refused(t, "checksum");
    stream_refused(b"BZh91AY&SY".to_vec(), "bzip2");
    // A GNU long name of 20 MiB: the parser would buffer it whole.
    let mut t = Tar::new();
    let huge = "n".repeat(20 << 20);
    t.add(E::file(&huge, "x", 0o644));
    stream_refused(gzip(&t.finish()), "exceeds");
}

/// A debugfs command that fails (here: an xattr ext4 cannot store) fails the build, naming
/// the path — debugfs itself exits 0.
#[test]
fn fixup_failure_names_the_path() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let l = tar_of([
        E::file("ok/a", "a", 0o644).xattr("user.small", "s"),
        E::file("ok/b", "b", 0o644),
        E::file("big/xattr", "x", 0o644).xattr("user.big", vec![7u8; 70_000]),
        E::file("ok/c", "c", 0o644).xattr("user.small", "s"),
    ]);
    let layers = [layer(tmp.path(), "l", &l, LayerCompression::None)];
    let out = tmp.path().join("out");
    let scratch = tmp.path().join("scratch");
    let err = build_rootfs(&layers, &scratch, &out, &Default::default(), &mut |_| {}).unwrap_err();
    match &err {
        RootfsError::Fixup { path, message } => {
            assert_eq!(path, "/big/xattr", "{err}");
            assert!(message.contains("extended attribute"), "{err}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!out.exists() && !scratch.exists());
}
