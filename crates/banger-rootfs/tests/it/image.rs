//! End-to-end: three layers (gzip, plain, zstd) exercising every feature, built into ext4
//! and compared exactly with debugfs.

use std::collections::BTreeMap;
use std::path::Path;

use banger_rootfs::{BuildOptions, Layer, LayerCompression, Progress, build_rootfs};

use crate::support::*;

/// VFS capability v2: CAP_NET_RAW (13) permitted + effective.
const CAP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

fn long_component() -> String {
    "c".repeat(200)
}

/// A 3000+ byte path: 31 components of 99 bytes.
fn deep_path() -> String {
    (0..31)
        .map(|i| format!("{i:02}{}", "d".repeat(97)))
        .collect::<Vec<_>>()
        .join("/")
}

fn deep_parent() -> String {
    let d = deep_path();
    d[..d.rfind('/').unwrap()].to_string()
}

fn layers(dir: &Path) -> Vec<Layer> {
    let l1 = tar_of([
        // Owned by a builder's uid: the image root is root's regardless.
        E::dir("./", 0o755).owner(1000, 1000),
        E::dir("etc/", 0o755),
        E::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
        E::file("etc/shadow", "root:*:1::::::\n", 0o640).owner(0, 42),
        E::dir("usr/", 0o755),
        E::dir("usr/sbin/", 0o755),
        E::file("usr/sbin/sshd", "sshd", 0o755),
        E::symlink("sbin", "usr/sbin"),
        E::file("usr/lib/systemd/systemd", "systemd", 0o755),
        E::symlink("lib", "usr/lib"),
        E::file("usr/bin/apt-get", "apt", 0o755),
        E::file("usr/bin/su", "su-binary", 0o4755),
        E::file("usr/bin/ping", "ping", 0o755).xattr("security.capability", CAP),
        E::file("xattr-file", "x", 0o644).xattr("user.test", "hello"),
        E::dir("home/user/", 0o750).owner(1000, 1000),
        E::file("home/user/notes", "mine", 0o600).owner(1000, 1000),
        E::file("secret", "nobody reads me", 0o000),
        E::dir("ro/", 0o555),
        E::file("ro/a", "a", 0o444),
        E::dir("ro/sub/", 0o555),
        E::file("ro/sub/b", "b", 0o644),
        E::file("to-delete", "bye", 0o644),
        E::file("dir-to-delete/a/b", "bye", 0o644),
        E::file("opq/a", "lower", 0o644),
        E::file("opq/b/c", "lower", 0o644),
        E::file("opq2/old", "lower", 0o644),
        E::file("keep/x", "kept", 0o644),
        E::file("hard/orig", "shared inode", 0o755).owner(5, 6),
        E::hardlink("hard/link", "hard/orig"),
        E::file("empty", "", 0o644),
        E::fifo("run/fifo", 0o620),
        E::chardev("dev/null", 1, 3),
        E::blockdev("dev/sda", 8, 0),
        E::file(format!("long/{}", long_component()), "gnu long name", 0o644),
        E::file(format!("pax/{}", deep_path()), "pax long path", 0o644).pax(),
        E::file("sp ace/qu\"ote's file", "quoted", 0o644),
        E::file("ünïcødé/日本語.txt", "unicode", 0o644),
        E::file("weird/<12>", "angle", 0o644),
        E::file("weird/-dash", "dash", 0o644),
        E::file("weird/tab\tname", "tab", 0o644),
        E::file("weird/back\\slash", "bs", 0o644),
        E::dir("q\"dir/", 0o750).xattr("trusted.overlay.opaque", "y"),
        E::file("q\"dir/<2>/inner", "not the root inode", 0o644),
        E::file("q\"dir/<2>/\"\"", "quotes only", 0o644),
        E::file("root/.bashrc", "PS1=#", 0o644),
        E::file("root/.ssh/authorized_keys", "", 0o600),
        E::file("dir-to-file/child", "gone", 0o644),
        E::file("file-to-dir", "was a file", 0o644),
        E::symlink("link-to-dir", "/etc"),
        E::symlink(format!("deep-link/{}", "x".repeat(10)), "../etc/passwd"),
    ]);
    let l2 = tar_of([
        E::whiteout(".wh.to-delete"),
        E::whiteout(".wh.dir-to-delete"),
        E::whiteout(".wh.absent"),
        // Same-layer entries before the opaque marker survive it.
        E::dir("opq/", 0o755),
        E::file("opq/new", "upper", 0o644),
        E::dir("opq/b/", 0o711),
        E::file("opq/b/d", "upper", 0o644),
        E::whiteout("opq/.wh..wh..opq"),
        E::file("etc/passwd", "root:x:0:0::/root:/bin/bash\n", 0o644),
        E::hardlink("hard/link2", "./hard/orig"),
        E::file("dir-to-file", "now a file", 0o640),
        E::dir("file-to-dir/", 0o700),
        E::file("file-to-dir/child", "child", 0o644),
        E::dir("home/user/", 0o700).owner(1000, 1000),
        E::file(
            format!("pax/{}/sibling", deep_parent()),
            "gnu long path sibling",
            0o644,
        ),
    ]);
    let l3 = tar_of([
        // Opaque marker before this layer's entries.
        E::whiteout("opq2/.wh..wh..opq"),
        E::file("opq2/x", "new", 0o644),
        E::dir("link-to-dir/", 0o755),
        E::file("link-to-dir/f", "no longer a link", 0o644),
        E::dir("shared/", 0o2775).owner(0, 100),
        E::dir("tmp/", 0o1777),
        E::file("mtime-file", "t", 0o644).mtime(1_234_567_890),
    ]);
    vec![
        layer(dir, "l1", &gzip(&l1), LayerCompression::Auto),
        layer(dir, "l2", &l2, LayerCompression::None),
        layer(dir, "l3", &zstd(&l3), LayerCompression::Zstd),
    ]
}

fn expected() -> BTreeMap<String, Want> {
    let mut w = BTreeMap::new();
    let mut put = |p: &str, v: Want| {
        w.insert(p.to_string(), v);
    };
    put("/", Want::dir(0o755));
    put("/etc", Want::dir(0o755));
    put(
        "/etc/passwd",
        Want::file("root:x:0:0::/root:/bin/bash\n", 0o644),
    );
    put(
        "/etc/shadow",
        Want::file("root:*:1::::::\n", 0o640).owner(0, 42),
    );
    put("/usr", Want::dir(0o755));
    put("/usr/sbin", Want::dir(0o755));
    put("/usr/sbin/sshd", Want::file("sshd", 0o755));
    put("/sbin", Want::symlink("usr/sbin"));
    put("/usr/lib", Want::dir(0o755));
    put("/usr/lib/systemd", Want::dir(0o755));
    put("/usr/lib/systemd/systemd", Want::file("systemd", 0o755));
    put("/lib", Want::symlink("usr/lib"));
    put("/usr/bin", Want::dir(0o755));
    put("/usr/bin/apt-get", Want::file("apt", 0o755));
    put("/usr/bin/su", Want::file("su-binary", 0o4755));
    put(
        "/usr/bin/ping",
        Want::file("ping", 0o755).xattr("security.capability", CAP),
    );
    put(
        "/xattr-file",
        Want::file("x", 0o644).xattr("user.test", "hello"),
    );
    put("/home", Want::dir(0o755));
    put("/home/user", Want::dir(0o700).owner(1000, 1000));
    put(
        "/home/user/notes",
        Want::file("mine", 0o600).owner(1000, 1000),
    );
    put("/secret", Want::file("nobody reads me", 0o000));
    put("/ro", Want::dir(0o555));
    put("/ro/a", Want::file("a", 0o444));
    put("/ro/sub", Want::dir(0o555));
    put("/ro/sub/b", Want::file("b", 0o644));
    put("/opq", Want::dir(0o755));
    put("/opq/new", Want::file("upper", 0o644));
    put("/opq/b", Want::dir(0o711));
    put("/opq/b/d", Want::file("upper", 0o644));
    put("/opq2", Want::dir(0o755));
    put("/opq2/x", Want::file("new", 0o644));
    put("/keep", Want::dir(0o755));
    put("/keep/x", Want::file("kept", 0o644));
    put("/hard", Want::dir(0o755));
    for p in ["/hard/orig", "/hard/link", "/hard/link2"] {
        put(p, Want::file("shared inode", 0o755).owner(5, 6));
    }
    put("/empty", Want::file("", 0o644));
    put("/run", Want::dir(0o755));
    put("/run/fifo", Want::fifo(0o620));
    put("/long", Want::dir(0o755));
    put(
        &format!("/long/{}", long_component()),
        Want::file("gnu long name", 0o644),
    );
    put("/pax", Want::dir(0o755));
    let deep = deep_path();
    assert!(deep.len() > 3000);
    let comps: Vec<&str> = deep.split('/').collect();
    for i in 1..comps.len() {
        put(&format!("/pax/{}", comps[..i].join("/")), Want::dir(0o755));
    }
    put(&format!("/pax/{deep}"), Want::file("pax long path", 0o644));
    put(
        &format!("/pax/{}/sibling", deep_parent()),
        Want::file("gnu long path sibling", 0o644),
    );
    put("/sp ace", Want::dir(0o755));
    put("/sp ace/qu\"ote's file", Want::file("quoted", 0o644));
    put("/ünïcødé", Want::dir(0o755));
    put("/ünïcødé/日本語.txt", Want::file("unicode", 0o644));
    put("/weird", Want::dir(0o755));
    put("/weird/<12>", Want::file("angle", 0o644));
    put("/weird/-dash", Want::file("dash", 0o644));
    put("/weird/tab\tname", Want::file("tab", 0o644));
    put("/weird/back\\slash", Want::file("bs", 0o644));
    put(
        "/q\"dir",
        Want::dir(0o750).xattr("trusted.overlay.opaque", "y"),
    );
    put("/q\"dir/<2>", Want::dir(0o755));
    put("/q\"dir/<2>/inner", Want::file("not the root inode", 0o644));
    put("/q\"dir/<2>/\"\"", Want::file("quotes only", 0o644));
    put("/root", Want::dir(0o755));
    put("/root/.bashrc", Want::file("PS1=#", 0o644));
    put("/root/.ssh", Want::dir(0o755));
    put("/root/.ssh/authorized_keys", Want::file("", 0o600));
    put("/dir-to-file", Want::file("now a file", 0o640));
    put("/file-to-dir", Want::dir(0o700));
    put("/file-to-dir/child", Want::file("child", 0o644));
    put("/link-to-dir", Want::dir(0o755));
    put("/link-to-dir/f", Want::file("no longer a link", 0o644));
    put("/deep-link", Want::dir(0o755));
    put("/deep-link/xxxxxxxxxx", Want::symlink("../etc/passwd"));
    put("/shared", Want::dir(0o2775).owner(0, 100));
    put("/tmp", Want::dir(0o1777));
    put("/mtime-file", Want::file("t", 0o644));
    w
}

fn run_full(force_fixups: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let layers = layers(tmp.path());
    let scratch = tmp.path().join("scratch");
    let out = tmp.path().join("rootfs.ext4");
    let opts = BuildOptions {
        force_fixups,
        ..Default::default()
    };
    let mut events = Vec::new();
    let report = build_rootfs(&layers, &scratch, &out, &opts, &mut |p| events.push(p))
        .unwrap_or_else(|e| panic!("build failed: {e}"));
    assert!(!scratch.exists(), "scratch tree removed after success");

    // Progress: three layers in order, then mkfs, then fixups.
    let labels: Vec<_> = events
        .iter()
        .filter_map(|p| match p {
            Progress::Layer {
                index, count: 3, ..
            } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(labels, [0, 1, 2]);
    assert!(matches!(
        events.iter().rev().nth(1),
        Some(Progress::Mkfs { .. })
    ));
    let Some(Progress::Fixups { count }) = events.last() else {
        panic!("no fixups event: {events:?}")
    };
    assert!(*count > 0);
    if force_fixups {
        // mode + uid + gid for every inode (hardlinks once), plus the root, plus 3 xattrs.
        let inodes = report.files - 2 + 1;
        assert_eq!(*count, inodes * 3 + 3);
    }

    let img = Image::new(&out);
    img.fsck();
    let want = expected();
    let listed = assert_image(&img, &want);

    // Hard links share one inode.
    let ino = |p: &str| listed[p.as_bytes()].ino;
    assert_eq!(ino("/hard/orig"), ino("/hard/link"));
    assert_eq!(ino("/hard/orig"), ino("/hard/link2"));
    assert_ne!(ino("/hard/orig"), ino("/empty"));
    let stat = img.request("stat /hard/orig");
    assert!(stat.contains("Links: 3"), "{stat}");

    assert_eq!(img.mtime(b"/mtime-file"), 1_234_567_890);
    assert_eq!(img.mtime(b"/etc/shadow"), 1_600_000_000);
    assert_eq!(img.mtime(b"/etc"), 1_600_000_000);

    // Report.
    assert_eq!(report.files, want.len() as u64 - 1);
    assert!(report.has_sshd, "sbin -> usr/sbin resolves");
    assert_eq!(
        report.init.as_deref(),
        Some("/lib/systemd/systemd"),
        "lib -> usr/lib"
    );
    assert_eq!(report.package_manager.as_deref(), Some("apt"));
    assert_eq!(report.root_home_entries, 3);
    assert_eq!(
        report.skipped,
        ["/dev/null (char device 1:3)", "/dev/sda (block device 8:0)"]
    );
    let content: u64 = want
        .values()
        .filter_map(|w| match &w.kind {
            Kind::File(c) => Some(c.len() as u64),
            _ => None,
        })
        .sum::<u64>()
        - 2 * "shared inode".len() as u64;
    assert_eq!(report.content_bytes, content);
    assert_eq!(report.image_bytes, 512 << 20);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), report.image_bytes);

    let label = img.request("stats");
    assert!(
        label.contains("Filesystem volume name:   banger-rootfs"),
        "{label}"
    );
}

#[test]
fn full_image() {
    require_tools!();
    run_full(false);
}

/// Every owner and mode written by debugfs, as an unprivileged daemon does for almost every
/// inode.
#[test]
fn full_image_forced_fixups() {
    require_tools!();
    run_full(true);
}

/// When running as root, re-runs the two tests above as uid/gid 65534 to prove the
/// unprivileged path end to end.
#[test]
fn full_image_as_nobody() {
    require_tools!();
    if std::env::var_os("BANGER_ROOTFS_CHILD").is_some() {
        return;
    }
    if !is_root() {
        println!("SKIP: not root; this run already is the unprivileged path");
        return;
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        println!("SKIP: setpriv not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "image::full_image",
            "image::full_image_forced_fixups",
        ])
        .args(["--test-threads=1"])
        .env("TMPDIR", tmp.path())
        .env("BANGER_ROOTFS_CHILD", "1")
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "as nobody:\n{stdout}\n{stderr}");
    assert!(stdout.contains("2 passed"), "{stdout}");
    assert!(!stdout.contains("SKIP"), "{stdout}");
}

#[test]
fn report_init_and_alpine_layout() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let l = tar_of([
        E::file("bin/busybox", "bb", 0o755),
        E::symlink("sbin/init", "/bin/busybox"),
        E::file("sbin/apk", "apk", 0o755),
        E::chardev("dev/console", 5, 1),
    ]);
    let layers = [layer(tmp.path(), "alpine", &l, LayerCompression::Auto)];
    let out = tmp.path().join("img");
    let report = build_rootfs(
        &layers,
        &tmp.path().join("s"),
        &out,
        &BuildOptions {
            extra_bytes: 1 << 20,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.init.as_deref(), Some("/sbin/init"));
    assert_eq!(report.package_manager.as_deref(), Some("apk"));
    assert!(!report.has_sshd);
    assert_eq!(report.root_home_entries, 0);
    assert_eq!(report.image_bytes, (512 << 20) + (1 << 20));
    assert_eq!(report.skipped, ["/dev/console (char device 5:1)"]);
    Image::new(&out).fsck();
}

#[test]
fn cancel_cleans_up() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let l = tar_of((0..2000).map(|i| E::file(format!("f{i}"), "x", 0o644)));
    let layers = [layer(tmp.path(), "l", &l, LayerCompression::None)];
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = BuildOptions {
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    let scratch = tmp.path().join("scratch");
    let out = tmp.path().join("out.img");
    let err = build_rootfs(&layers, &scratch, &out, &opts, &mut |p| {
        if matches!(p, Progress::Entries { done } if done >= 512) {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap_err();
    assert!(
        matches!(err, banger_rootfs::RootfsError::Cancelled),
        "{err}"
    );
    assert!(!scratch.exists());
    assert!(!out.exists());
}

#[test]
fn sparse_and_larger_files_stream() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let mut big = vec![0u8; 3 << 20];
    big[1 << 20] = 1;
    let tail: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    big.extend_from_slice(&tail);
    big.extend(std::iter::repeat_n(0u8, 1 << 20)); // ends in a hole
    let l = tar_of([E::file("big", &big, 0o644)]);
    let layers = [layer(tmp.path(), "l", &gzip(&l), LayerCompression::Gzip)];
    let out = tmp.path().join("img");
    build_rootfs(
        &layers,
        &tmp.path().join("s"),
        &out,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    let img = Image::new(&out);
    img.fsck();
    let mut want = BTreeMap::new();
    want.insert("/".to_string(), Want::dir(0o755));
    want.insert("/big".to_string(), Want::file(&big, 0o644));
    assert_image(&img, &want);
}

/// Names are bytes: a Latin-1 name (not UTF-8) goes through unchanged.
#[test]
fn non_utf8_names() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let l = tar_of([
        E::file(b"caf\xe9/men\xfc".as_slice(), "latin-1", 0o600),
        E::symlink(b"link".as_slice(), b"caf\xe9/men\xfc".as_slice()),
    ]);
    let layers = [layer(tmp.path(), "l", &l, LayerCompression::None)];
    let out = tmp.path().join("img");
    build_rootfs(
        &layers,
        &tmp.path().join("s"),
        &out,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    let img = Image::new(&out);
    img.fsck();
    let listed = img.walk();
    let l = listed[b"/caf\xe9/men\xfc".as_slice()];
    assert_eq!((l.mode, l.uid, l.gid, l.size), (0o100600, 0, 0, 7));
    assert_eq!(listed[b"/caf\xe9".as_slice()].mode, 0o40755);
    let dump = img.rdump();
    use std::os::unix::ffi::OsStrExt;
    let host = dump.join(std::ffi::OsStr::from_bytes(b"caf\xe9/men\xfc"));
    assert_eq!(std::fs::read(host).unwrap(), b"latin-1");
    let target = std::fs::read_link(dump.join("link")).unwrap();
    assert_eq!(target.as_os_str().as_bytes(), b"caf\xe9/men\xfc");
}
