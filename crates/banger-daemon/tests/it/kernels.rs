//! Kernels from a `[[kernel_catalog]]` (served by a local HTTP server started here) and kernel
//! imports that bring modules.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_core::ErrorCode;
use banger_protocol::{KernelImportParams, NameParams, Request, VmCreateParams};
use banger_testkit::TestEnv;
use sha2::Digest;

/// A tiny HTTP/1.1 server on 127.0.0.1 serving `routes` (path → body), 404 otherwise. Returns
/// the base URL; the thread lives until the test process ends.
fn serve(routes: HashMap<String, Vec<u8>>) -> String {
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
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body): (&str, &[u8]) = match routes.get(path) {
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", b""),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body);
            let _ = s.flush();
        }
    });
    format!("http://{addr}")
}

fn fake_vmlinux(release: &str) -> Vec<u8> {
    let mut elf = vec![0u8; 64 * 1024];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x12] = 62;
    let banner = format!("Linux version {release} (ci@ci) #1 SMP\0");
    elf[8192..8192 + banner.len()].copy_from_slice(banner.as_bytes());
    elf
}

fn module(name: &str) -> Vec<u8> {
    let mut m = b"\x7fELF\x02\x01\x01\x00".to_vec();
    m.extend_from_slice(format!("name={name}").as_bytes());
    m
}

/// A plain (uncompressed) tarball of regular files.
fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn kernel_tarball(release: &str) -> Vec<u8> {
    tarball(&[
        ("vmlinux", &fake_vmlinux(release)),
        ("modules/virtio.ko", &module("virtio")),
        ("modules/virtio_blk.ko", &module("virtio_blk")),
        ("modules/load-order", b"virtio.ko\nvirtio_blk.ko\n"),
    ])
}

fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn catalog_entry(name: &str, url: &str, sha256: &str, extra: &str) -> String {
    format!(
        "\n[[kernel_catalog]]\nname = \"{name}\"\nurl = \"{url}\"\nsha256 = \"{sha256}\"\n{extra}"
    )
}

fn pull(env: &TestEnv, name: &str) -> banger_testkit::Reply {
    env.request(&Request::KernelPull(NameParams { name: name.into() }))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn catalog_kernel_is_pulled_and_auto_pulled_for_a_vm() {
    let pinned = kernel_tarball("6.12.8-cat");
    let unpinned = kernel_tarball("6.12.9-auto");
    let base = serve(HashMap::from([
        ("/kernels/cat.tar".to_string(), pinned.clone()),
        ("/kernels/auto.tar".to_string(), unpinned.clone()),
    ]));
    let url = format!("{base}/kernels/cat.tar");
    let auto_url = format!("{base}/kernels/auto.tar");
    let extra = format!(
        "{}{}",
        catalog_entry(
            "cat-6.12",
            &url,
            &sha(&pinned),
            &format!("size = {}\nversion = \"6.12.8\"\n", pinned.len())
        ),
        catalog_entry("auto-kernel", &auto_url, &sha(&unpinned), ""),
    );
    let mut env = TestEnv::new(&extra);
    env.start_daemon();

    let reply = pull(&env, "cat-6.12");
    let rec = reply.ok();
    assert_eq!(rec["name"], "cat-6.12");
    assert_eq!(rec["source"], format!("catalog:{url}"));
    assert_eq!(rec["version"], "6.12.8");
    assert_eq!(rec["initrd"], serde_json::Value::Null);
    assert_eq!(rec["sha256"], sha(&fake_vmlinux("6.12.8-cat")));
    let stages = reply.stages();
    for s in [
        "kernel_download",
        "kernel_extract",
        "kernel_vmlinux",
        "kernel_finish",
    ] {
        assert!(stages.iter().any(|x| x == s), "{s} not in {stages:?}");
    }
    let kdir = env.state_dir().join("kernels/cat-6.12");
    assert_eq!(
        dir_names(&kdir),
        ["manifest.json", "modules", "vmlinux"],
        "{}",
        kdir.display()
    );
    assert_eq!(
        dir_names(&kdir.join("modules")),
        ["load-order", "virtio.ko", "virtio_blk.ko"]
    );
    assert_eq!(
        PathBuf::from(rec["vmlinux"].as_str().unwrap()),
        kdir.join("vmlinux")
    );
    // Pulling what is there is a no-op answering the record.
    assert_eq!(pull(&env, "cat-6.12").ok()["created_at"], rec["created_at"]);

    // A VM naming a missing catalog kernel pulls it first, then boots it with banger's
    // initramfs built from the pulled modules.
    env.seed_artifacts();
    let reply = env.request(&Request::VmCreate(VmCreateParams {
        name: Some("cat".into()),
        kernel: Some("auto-kernel".into()),
        ..Default::default()
    }));
    reply.ok();
    assert!(
        reply.stages().iter().any(|s| s == "kernel_pull"),
        "{:?}",
        reply.stages()
    );
    let k = env
        .request(&Request::KernelShow(NameParams {
            name: "auto-kernel".into(),
        }))
        .ok();
    assert_eq!(k["source"], format!("catalog:{auto_url}"));
    assert_eq!(k["version"], "6.12.9-auto");
    let auto_dir = env.state_dir().join("kernels/auto-kernel");
    assert!(
        dir_names(&auto_dir)
            .iter()
            .any(|n| n.starts_with("initramfs-")),
        "{:?}",
        dir_names(&auto_dir)
    );
    env.stop_daemon();
}

#[test]
fn bad_hash_is_refused_with_name_and_url_and_nothing_is_left() {
    let body = kernel_tarball("6.12.8");
    let base = serve(HashMap::from([("/k.tar".to_string(), body.clone())]));
    let url = format!("{base}/k.tar");
    let wrong = "0".repeat(64);
    let mut env = TestEnv::new(&catalog_entry("tampered", &url, &wrong, ""));
    env.start_daemon();

    let (code, msg) = pull(&env, "tampered").err();
    assert_ne!(code, ErrorCode::NotFound, "{msg}");
    assert!(msg.contains("tampered") && msg.contains(&url), "{msg}");
    assert!(msg.contains(&wrong) && msg.contains(&sha(&body)), "{msg}");
    assert!(
        dir_names(&env.state_dir().join("kernels")).is_empty(),
        "{:?}",
        dir_names(&env.state_dir().join("kernels"))
    );
    let list = env.request(&Request::KernelList).ok();
    assert_eq!(list["kernels"], serde_json::json!([]));

    // An unknown name lists what is known: the built-in kernel and the configured ones.
    let (code, msg) = pull(&env, "nope").err();
    assert_eq!(code, ErrorCode::NotFound, "{msg}");
    assert!(
        msg.contains("nope") && msg.contains("debian-6.1-cloud") && msg.contains("tampered"),
        "{msg}"
    );
    env.stop_daemon();
}

#[test]
fn catalog_entry_named_like_a_builtin_kernel_is_a_config_error() {
    let env = TestEnv::new(&catalog_entry(
        "debian-6.1-cloud",
        "http://127.0.0.1:9/k.tar",
        &"a".repeat(64),
        "",
    ));
    let mut child = env
        .daemon_command()
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bangerd did not refuse the config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("kernel_catalog[0].name") && stderr.contains("built-in"),
        "{stderr}"
    );
}

#[test]
fn import_takes_the_modules_in_load_order() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    let src = env.root().join("debian-style");
    std::fs::create_dir_all(src.join("modules")).unwrap();
    std::fs::write(src.join("vmlinux"), fake_vmlinux("6.1.0-99-cloud-amd64")).unwrap();
    let import = |name: &str| {
        env.request(&Request::KernelImport(KernelImportParams {
            name: name.into(),
            dir: src.clone(),
        }))
    };

    // modules/ without load-order is refused, naming the file.
    let (code, msg) = import("k").err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("load-order"), "{msg}");
    // A listed module that is missing is refused, naming it.
    std::fs::write(src.join("modules/load-order"), "virtio.ko\nvsock.ko\n").unwrap();
    std::fs::write(src.join("modules/virtio.ko"), module("virtio")).unwrap();
    let (code, msg) = import("k").err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("vsock.ko"), "{msg}");
    // A bad load-order line is refused, naming the line.
    std::fs::write(src.join("modules/load-order"), "virtio.ko\n../evil.ko\n").unwrap();
    let (_, msg) = import("k").err();
    assert!(msg.contains("line 2"), "{msg}");
    assert!(dir_names(&env.state_dir().join("kernels")).is_empty());

    std::fs::write(
        src.join("modules/load-order"),
        "# deps first\nvsock.ko\nvirtio.ko\n",
    )
    .unwrap();
    std::fs::write(src.join("modules/vsock.ko"), module("vsock")).unwrap();
    // Not listed: not copied.
    std::fs::write(src.join("modules/e1000.ko"), module("e1000")).unwrap();
    let rec = import("debian-style").ok();
    assert_eq!(rec["initrd"], serde_json::Value::Null);
    assert_eq!(rec["version"], "6.1.0-99-cloud-amd64");
    let kdir = env.state_dir().join("kernels/debian-style");
    assert_eq!(
        dir_names(&kdir.join("modules")),
        ["load-order", "virtio.ko", "vsock.ko"]
    );
    assert_eq!(
        std::fs::read_to_string(kdir.join("modules/load-order")).unwrap(),
        "vsock.ko\nvirtio.ko\n"
    );
    assert_eq!(
        std::fs::read(kdir.join("modules/vsock.ko")).unwrap(),
        module("vsock")
    );

    // It boots with banger's initramfs carrying those modules.
    env.seed_artifacts();
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some("imp".into()),
        kernel: Some("debian-style".into()),
        ..Default::default()
    }))
    .ok();
    let initramfs = dir_names(&kdir)
        .into_iter()
        .find(|n| n.starts_with("initramfs-"))
        .expect("an initramfs was built");
    let cpio = std::fs::read(kdir.join(initramfs)).unwrap();
    let has = |s: &[u8]| cpio.windows(s.len()).any(|w| w == s);
    assert!(has(b"lib/modules/vsock.ko") && has(b"lib/modules/load-order"));
    assert!(!has(b"e1000"));

    // Without modules/ an import still works, as before.
    std::fs::remove_dir_all(src.join("modules")).unwrap();
    let rec = import("bare").ok();
    assert_eq!(rec["initrd"], serde_json::Value::Null);
    assert!(!env.state_dir().join("kernels/bare/modules").exists());
    env.stop_daemon();
}
