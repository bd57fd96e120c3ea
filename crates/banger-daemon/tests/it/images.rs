//! `image import` from a directory and from a tarball: a real ext4 with the tree's owners and
//! modes, made without mounting; hostile tarballs are refused naming the entry.

use std::process::Command;

use banger_core::ErrorCode;
use banger_protocol::{ImageImportParams, Request};
use banger_testkit::TestEnv;

fn debugfs(image: &str, cmd: &str) -> String {
    let out = Command::new("/usr/sbin/debugfs")
        .args(["-R", cmd, image])
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn import_directory_and_tarball_and_refuse_traversal() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: importing a directory or tarball needs root (file owners)");
        return;
    }
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();

    // A tree with a file owned by another user and a setuid binary.
    let tree = env.root().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "imported\n").unwrap();
    std::fs::write(tree.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(tree.join("etc/hostname"), Some(1234), Some(4321)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tree.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
    }
    let import = |name: &str, source: &std::path::Path| {
        env.request(&Request::ImageImport(ImageImportParams {
            name: Some(name.into()),
            source: source.to_path_buf(),
            kernel: None,
        }))
    };
    let v = import("from-dir", &tree).ok();
    let rootfs = v["rootfs"].as_str().unwrap().to_string();
    let stat = debugfs(&rootfs, "stat /etc/hostname");
    assert!(
        stat.contains("User:  1234") && stat.contains("Group:  4321"),
        "{stat}"
    );
    let stat = debugfs(&rootfs, "stat /usr/bin/tool");
    assert!(stat.contains("Mode:  04755"), "{stat}");
    assert_eq!(debugfs(&rootfs, "cat /etc/hostname"), "imported\n");

    // The same tree as a gzip tarball.
    let tgz = env.root().join("tree.tar.gz");
    let st = Command::new("tar")
        .args(["-C"])
        .arg(&tree)
        .args(["-czf"])
        .arg(&tgz)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let v = import("from-tar", &tgz).ok();
    let rootfs = v["rootfs"].as_str().unwrap().to_string();
    assert!(debugfs(&rootfs, "stat /etc/hostname").contains("User:  1234"));

    // A tarball whose entry climbs out of the root.
    let evil_dir = env.root().join("evil");
    std::fs::create_dir_all(evil_dir.join("etc")).unwrap();
    std::fs::write(evil_dir.join("etc/x"), "x").unwrap();
    std::fs::write(env.root().join("outside"), "o").unwrap();
    let evil = env.root().join("evil.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&evil_dir)
        .args(["-cf"])
        .arg(&evil)
        .args([
            "etc",
            "--transform=s,^etc/x$,../../escaped,",
            "--absolute-names",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let (code, msg) = import("evil", &evil).err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("escaped"), "{msg}");
    assert!(!env.state_dir().join("images/evil").exists());
    let (code, _) = import("from-dir", &tree).err();
    assert_eq!(code, ErrorCode::AlreadyExists);
    // Nothing half-built is left in the build area.
    let leftovers: Vec<_> = std::fs::read_dir(env.state_dir().join("build"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
