//! `image pull` against a real local registry (Debian's `docker-registry`), with images these
//! tests build and push themselves: the flattened ext4 matches the layers exactly, hostile
//! layers are refused naming the path, concurrent pulls share downloads, a pull cut off half-way
//! leaves nothing, bundles round-trip through export/import and the catalog, and the cache prunes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_core::{ErrorCode, OpId};
use banger_protocol::{
    Envelope, ImageCachePruneParams, ImageExportParams, ImageImportParams, ImagePullParams,
    NameForceParams, PROTOCOL_VERSION, Request, VmCreateParams,
};
use banger_testkit::TestEnv;
use banger_testkit::layers::LayerBuilder;
use banger_testkit::registry::LocalRegistry;

fn registry() -> Option<LocalRegistry> {
    match LocalRegistry::start() {
        Ok(r) => Some(r),
        Err(why) => {
            println!("SKIP: {why}");
            None
        }
    }
}

fn debugfs(image: &str, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd, image])
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pull(env: &TestEnv, reference: &str) -> banger_testkit::Reply {
    env.request(&Request::ImagePull(ImagePullParams {
        reference: reference.into(),
        insecure: true,
        ..Default::default()
    }))
}

fn config() -> serde_json::Value {
    serde_json::json!({
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=test"],
        "WorkingDir": "/srv/app",
        "User": "1000:1000",
        "Cmd": ["/bin/sh"],
    })
}

/// Three layers exercising whiteouts, an opaque dir, hardlinks, symlinks, setuid, owners and a
/// long name.
fn multi_layer() -> Vec<Vec<u8>> {
    let long = format!("usr/share/{}", "n".repeat(200));
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=banger-test\n")
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .hardlink("usr/bin/tool-again", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .dir("opt", 0o755)
        .file("opt/old-a", 0o644, b"a")
        .file("opt/old-b", 0o644, b"b")
        .dir("var", 0o755)
        .file("var/gone", 0o644, b"x")
        .dir("home", 0o755)
        .dir("home/user", 0o750)
        .file_owned("home/user/notes", 0o600, 1000, 1000, b"mine")
        .dir("root", 0o700)
        .file("root/.profile", 0o644, b"export X=1\n")
        .dir("usr/share", 0o755)
        .file(&long, 0o644, b"long")
        .char_device("dev-null-copy", 1, 3)
        .build();
    let middle = LayerBuilder::new()
        .whiteout("var/gone")
        .opaque("opt")
        .file("opt/new", 0o644, b"new")
        .build();
    let top = LayerBuilder::new()
        .file("etc/os-release", 0o644, b"ID=banger-test\nVERSION=2\n")
        .build();
    vec![base, middle, top]
}

#[test]
fn pull_flattens_layers_exactly() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    reg.push("team/multi", "1", &multi_layer(), config());
    let r = format!("{}/team/multi:1", reg.addr());
    let reply = pull(&env, &r);
    let img = reply.ok();
    assert_eq!(img["name"], "multi-1", "{img}");
    assert_eq!(img["source"], format!("oci:{r}"));
    let meta = &img["meta"];
    assert_eq!(meta["workdir"], "/srv/app");
    assert_eq!(meta["env"][1], "APP_MODE=test");
    assert_eq!(meta["has_sshd"], false);
    assert_eq!(meta["has_init"], false);
    assert!(meta["digest"].as_str().unwrap().starts_with("sha256:"));
    let stages = reply.stages();
    assert!(stages.iter().any(|s| s == "download"), "{stages:?}");

    let rootfs = img["rootfs"].as_str().unwrap().to_string();
    let fsck = Command::new("e2fsck")
        .args(["-fn", &rootfs])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        debugfs(&rootfs, "cat /etc/os-release"),
        "ID=banger-test\nVERSION=2\n"
    );
    assert!(debugfs(&rootfs, "stat /usr/bin/tool").contains("Mode:  04755"));
    let ls_opt = debugfs(&rootfs, "ls -l /opt");
    assert!(
        ls_opt.contains("new") && !ls_opt.contains("old-a"),
        "{ls_opt}"
    );
    assert!(!debugfs(&rootfs, "ls -l /var").contains("gone"));
    assert!(!debugfs(&rootfs, "ls -l /var").contains(".wh."));
    let notes = debugfs(&rootfs, "stat /home/user/notes");
    assert!(
        notes.contains("User:  1000") && notes.contains("Group:  1000"),
        "{notes}"
    );
    assert!(debugfs(&rootfs, "stat /bin").contains("Fast link dest: \"usr/bin\""));
    // Hard links share one inode.
    let inode = |p: &str| {
        let s = debugfs(&rootfs, &format!("stat {p}"));
        s.split_whitespace().nth(1).unwrap_or_default().to_string()
    };
    assert_eq!(inode("/usr/bin/tool"), inode("/usr/bin/tool-again"));
    assert!(!debugfs(&rootfs, "ls -l /").contains("dev-null-copy"));
    let warned = reply
        .frames
        .iter()
        .any(|f| format!("{f:?}").contains("dev-null-copy"));
    assert!(warned, "the skipped device node is reported");

    // Pulling the same reference again reuses the image and downloads nothing.
    let gets: usize = reg.total_blob_gets();
    let again = pull(&env, &r).ok();
    assert_eq!(again["name"], "multi-1");
    assert_eq!(reg.total_blob_gets(), gets);

    // `image show` says how VMs of it are reached.
    let out = env.cli(&["image", "show", "multi-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agent serves ssh"), "{text}");

    // A VM created from the reference uses the pulled image.
    let vm = env
        .request(&Request::VmCreate(VmCreateParams {
            name: Some("from-oci".into()),
            image: Some(r.clone()),
            no_start: true,
            ..Default::default()
        }))
        .ok();
    assert_eq!(vm["image"], "multi-1");
    env.request(&Request::VmDelete(banger_protocol::VmDeleteParams {
        vm: "from-oci".into(),
        force: true,
    }))
    .ok();
}

#[test]
fn hostile_layers_are_refused_naming_the_path() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    use tar::EntryType as T;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            LayerBuilder::new()
                .raw(T::Regular, "../../evil", None, b"x")
                .build(),
            "../../evil",
        ),
        (
            "absolute",
            LayerBuilder::new()
                .raw(T::Regular, "/etc/evil", None, b"x")
                .build(),
            "/etc/evil",
        ),
        (
            "escaping-symlink",
            LayerBuilder::new()
                .raw(T::Symlink, "etc/link", Some("../../../../etc/shadow"), b"")
                .build(),
            "etc/link",
        ),
        (
            "through-symlink",
            LayerBuilder::new()
                .raw(T::Symlink, "sneaky", Some("/etc"), b"")
                .raw(T::Regular, "sneaky/passwd", None, b"x")
                .build(),
            "sneaky/passwd",
        ),
        (
            "hardlink-out",
            LayerBuilder::new()
                .raw(T::Link, "stolen", Some("../../etc/shadow"), b"")
                .build(),
            "stolen",
        ),
    ];
    for (repo, layer, path) in cases {
        reg.push(&format!("evil/{repo}"), "1", &[layer], config());
        let (code, msg) = pull(&env, &format!("{}/evil/{repo}:1", reg.addr())).err();
        assert_eq!(code, ErrorCode::BadRequest, "{repo}: {msg}");
        assert!(msg.contains(path), "{repo}: {msg}");
        assert!(!env.state_dir().join(format!("images/{repo}-1")).exists());
    }
    // A device node alone is skipped, not an error.
    reg.push(
        "odd/device",
        "1",
        &[LayerBuilder::new()
            .dir("etc", 0o755)
            .char_device("etc/tty0", 4, 0)
            .build()],
        config(),
    );
    pull(&env, &format!("{}/odd/device:1", reg.addr())).ok();
    assert_no_leftovers(&env);
}

fn assert_no_leftovers(env: &TestEnv) {
    for dir in [
        env.state_dir().join("build"),
        env.state_dir().join("images"),
    ] {
        let stray: Vec<_> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        n.starts_with('.') || n.starts_with("rootfs-") || n.starts_with("bundle-")
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(stray.is_empty(), "{}: {stray:?}", dir.display());
    }
    let partials: Vec<_> = banger_testkit::files_under(&env.root().join("cache"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

/// Random bytes (incompressible, so the gzip layer is as big as the file).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn concurrent_pulls_download_each_blob_once() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    let layers = vec![
        LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/a", 0o644, &noise(3 << 20, 1))
            .build(),
        LayerBuilder::new()
            .file("etc/b", 0o644, &noise(2 << 20, 2))
            .build(),
    ];
    let pushed = reg.push_image(
        "shared/img",
        Some("1"),
        &banger_testkit::registry::TestImage::new(
            layers
                .into_iter()
                .map(banger_testkit::registry::TestLayer::Gzip)
                .collect(),
            config(),
        ),
    );
    let r = format!("{}/shared/img:1", reg.addr());
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| pull(&env, &r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.ok()["name"], "img-1");
    }
    assert_eq!(pushed.layer_digests.len(), 2);
    for d in pushed.layer_digests {
        assert_eq!(reg.blob_gets(&d), 1, "blob {d}");
    }
}

#[test]
fn a_pull_cut_off_half_way_leaves_nothing() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    let big = LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/big", 0o644, &noise(96 << 20, 3))
        .build();
    reg.push("big/img", "1", &[big], config());
    let r = format!("{}/big/img:1", reg.addr());
    reg.set_throttle(8 << 20);
    // Send the pull, wait for its first download progress, then hang up.
    let op = OpId::generate();
    let req = Request::ImagePull(ImagePullParams {
        reference: r.clone(),
        insecure: true,
        ..Default::default()
    });
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id: &op,
        request: &req,
    }
    .to_line();
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        buf.clear();
        assert!(
            reader.read_line(&mut buf).unwrap() > 0,
            "daemon hung up first"
        );
        if buf.contains("\"download\"") && buf.contains("MiB") {
            break;
        }
        assert!(Instant::now() < deadline, "no download progress");
    }
    drop(reader);
    drop(s);
    // The daemon notices, stops the download and removes what it wrote.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let partials: Vec<_> = banger_testkit::files_under(&env.root().join("cache"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("partial"))
            .collect();
        if partials.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partial downloads left: {partials:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = env.request(&Request::ImageList).ok();
    assert_eq!(list["images"].as_array().unwrap().len(), 0, "{list}");
    assert_no_leftovers(&env);
    // The next pull succeeds.
    reg.set_throttle(0);
    assert_eq!(pull(&env, &r).ok()["name"], "img-1");
}

#[test]
fn bundles_round_trip_through_export_import_and_the_catalog() {
    let Some(reg) = registry() else { return };
    let http = banger_testkit::http::StaticServer::start();
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    reg.push("team/multi", "1", &multi_layer(), config());
    let img = pull(&env, &format!("{}/team/multi:1", reg.addr())).ok();
    let rootfs = img["rootfs"].as_str().unwrap().to_string();
    let original = std::fs::read(&rootfs).unwrap();

    let bundle = env.root().join("multi.tar.zst");
    env.request(&Request::ImageExport(ImageExportParams {
        name: "multi-1".into(),
        output: bundle.clone(),
    }))
    .ok();
    // Never overwrites.
    let (code, _) = env
        .request(&Request::ImageExport(ImageExportParams {
            name: "multi-1".into(),
            output: bundle.clone(),
        }))
        .err();
    assert_eq!(code, ErrorCode::AlreadyExists);

    // Import under another name: same bytes, same metadata.
    let copy = env
        .request(&Request::ImageImport(ImageImportParams {
            name: Some("multi-copy".into()),
            source: bundle.clone(),
            kernel: None,
        }))
        .ok();
    assert_eq!(
        std::fs::read(copy["rootfs"].as_str().unwrap()).unwrap(),
        original
    );
    assert_eq!(copy["meta"], img["meta"]);

    // A tampered bundle is refused.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    let bad = env.root().join("bad.tar.zst");
    std::fs::write(&bad, &bytes).unwrap();
    let (code, msg) = env
        .request(&Request::ImageImport(ImageImportParams {
            name: Some("bad".into()),
            source: bad,
            kernel: None,
        }))
        .err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("bad.tar.zst"), "{msg}");

    // The catalog: a configured entry pointing at the bundle over HTTP.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&bundle).unwrap()))
    };
    let url = http.serve("multi.tar.zst", std::fs::read(&bundle).unwrap());
    drop(env);
    let mut env = TestEnv::new(&format!(
        "[[image_catalog]]\nname = \"team-image\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\n"
    ));
    env.start_daemon();
    env.seed_artifacts();
    let got = env
        .request(&Request::ImagePull(ImagePullParams {
            reference: "team-image".into(),
            ..Default::default()
        }))
        .ok();
    assert_eq!(got["name"], "team-image");
    assert_eq!(
        std::fs::read(got["rootfs"].as_str().unwrap()).unwrap(),
        original
    );
    // A wrong hash in the catalog is refused and leaves nothing.
    drop(env);
    let mut env = TestEnv::new(&format!(
        "[[image_catalog]]\nname = \"team-image\"\nurl = \"{url}\"\nsha256 = \"{}\"\n",
        "0".repeat(64)
    ));
    env.start_daemon();
    let (_, msg) = env
        .request(&Request::ImagePull(ImagePullParams {
            reference: "team-image".into(),
            ..Default::default()
        }))
        .err();
    assert!(msg.contains("SHA256") || msg.contains("sha256"), "{msg}");
    assert_no_leftovers(&env);
}

#[test]
fn cache_prune_frees_blobs_and_images_keep_working() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    reg.push("team/multi", "1", &multi_layer(), config());
    let r = format!("{}/team/multi:1", reg.addr());
    pull(&env, &r).ok();
    let dry = env
        .request(&Request::ImageCachePrune(ImageCachePruneParams {
            dry_run: true,
        }))
        .ok();
    assert!(dry["blobs"].as_u64().unwrap() >= 3, "{dry}");
    let done = env
        .request(&Request::ImageCachePrune(ImageCachePruneParams::default()))
        .ok();
    assert_eq!(done["blobs"], dry["blobs"]);
    let again = env
        .request(&Request::ImageCachePrune(ImageCachePruneParams {
            dry_run: true,
        }))
        .ok();
    assert_eq!(again["blobs"], 0);
    // The image is still there; a fresh pull under another name downloads again.
    env.request(&Request::ImageDelete(NameForceParams {
        name: "multi-1".into(),
        force: false,
    }))
    .ok();
    let before = reg.total_blob_gets();
    pull(&env, &r).ok();
    assert!(reg.total_blob_gets() > before);
}

#[test]
fn bad_references_and_insecure_policy_are_clear() {
    let Some(reg) = registry() else { return };
    let mut env = TestEnv::new("");
    env.start_daemon();
    let (code, msg) = pull(&env, "UPPER/Case").err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("UPPER/Case"), "{msg}");
    let (_, msg) = pull(&env, &format!("{}/no/such:tag", reg.addr())).err();
    assert!(msg.contains("no/such"), "{msg}");
    // --insecure for a registry that is neither loopback nor listed.
    let (_, msg) = pull(&env, "registry.invalid:5000/x:1").err();
    assert!(msg.contains("insecure_registries"), "{msg}");
}
