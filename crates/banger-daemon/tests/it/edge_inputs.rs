//! Inputs that are not what they claim: FIFOs, devices, empty or oversized files, a
//! docker-archive or a truncated ext4 given as an image, a directory without sshd or init, a
//! dynamically linked agent. Each is refused in one line naming the path, promptly, and the
//! daemon keeps answering and stops on SIGTERM.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use banger_core::ErrorCode;
use banger_protocol::{ImageImportParams, Request, VmCreateParams};
use banger_testkit::{Reply, TestEnv, request};

/// The request's reply, or a test failure if none comes within `secs` (a daemon stuck on the
/// input would otherwise hang the test).
fn timed(env: &TestEnv, req: Request, secs: u64) -> Reply {
    let socket = env.socket();
    let (tx, rx) = mpsc::channel();
    let what = format!("{req:?}");
    std::thread::spawn(move || {
        let _ = tx.send(request(&socket, &req));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("no reply within {secs}s to {what}; the daemon is stuck"))
}

fn import(name: &str, source: &Path) -> Request {
    Request::ImageImport(ImageImportParams {
        name: Some(name.into()),
        source: source.to_path_buf(),
        kernel: None,
    })
}

fn create(name: &str) -> Request {
    Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    })
}

fn refused(reply: Reply, words: &[&str]) -> String {
    let (code, msg) = reply.err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    for w in words {
        assert!(msg.contains(w), "{w:?} missing from {msg:?}");
    }
    assert!(!msg.contains('\n'), "more than one line: {msg:?}");
    msg
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn fifo_device_and_huge_inputs_never_hang_the_daemon() {
    let sync = "[[file_sync]]\nhost = \"~/synced\"\nguest = \"~/synced\"\n";
    let mut env = TestEnv::new(sync);
    env.start_daemon();
    env.seed_artifacts();
    let fifo = env.root().join("pipe");
    mkfifo(&fifo);
    let synced = env.home().join("synced");
    std::fs::create_dir_all(env.home()).unwrap();
    mkfifo(&synced);

    // image import of a FIFO: refused at once, naming it.
    refused(
        timed(&env, import("p", &fifo), 10),
        &[&fifo.display().to_string(), "FIFO"],
    );
    // A FIFO as a [[file_sync]] host file fails the start, naming it.
    let msg = timed(&env, create("a"), 20).err().1;
    assert!(
        msg.contains(&synced.display().to_string()) && msg.contains("FIFO"),
        "{msg}"
    );
    // The daemon answers other requests meanwhile.
    assert!(matches!(
        timed(&env, Request::Ping, 5).last(),
        banger_protocol::Frame::Result { .. }
    ));
    // /dev/zero through file_sync (a symlink in the home): refused, not read forever.
    std::fs::remove_file(&synced).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &synced).unwrap();
    let msg = timed(&env, create("b"), 20).err().1;
    assert!(msg.contains("character device"), "{msg}");
    // A regular file over the cap: refused, not loaded whole.
    std::fs::remove_file(&synced).unwrap();
    std::fs::write(&synced, vec![b'x'; 5 << 20]).unwrap();
    let msg = timed(&env, create("c"), 20).err().1;
    assert!(msg.contains("over 4 MiB"), "{msg}");
    // Devices and empty input to image import.
    refused(
        timed(&env, import("z", Path::new("/dev/zero")), 10),
        &["/dev/zero", "character device"],
    );
    refused(
        timed(&env, import("n", Path::new("/dev/null")), 10),
        &["/dev/null", "character device"],
    );

    // SIGTERM ends it promptly.
    let pid: i32 = std::fs::read_to_string(env.runtime_dir().join("bangerd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    assert!(
        env.wait_daemon_exit(Duration::from_secs(10)).is_some(),
        "bangerd did not stop within 10s of SIGTERM"
    );
    println!("stopped {:?} after SIGTERM", t.elapsed());
}

#[test]
fn import_refuses_what_is_not_a_root_filesystem() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let root = env.root().to_path_buf();
    let path = |n: &str| root.join(n);

    std::fs::write(path("empty"), b"").unwrap();
    refused(
        timed(&env, import("e", &path("empty")), 10),
        &["empty", "is empty"],
    );

    std::fs::write(
        path("garbage"),
        banger_testkit::registry::pseudo_random(10_000, 7),
    )
    .unwrap();
    refused(
        timed(&env, import("g", &path("garbage")), 10),
        &[
            "garbage",
            "not an image bundle, an ext4 image or a root filesystem tarball",
        ],
    );

    // A tar of nothing (just the end-of-archive blocks).
    std::fs::write(path("zeros.tar"), vec![0u8; 10240]).unwrap();
    refused(
        timed(&env, import("t", &path("zeros.tar")), 10),
        &["zeros.tar", "empty tar archive"],
    );

    // What `docker save` writes: layer tarballs, a config, manifest.json and repositories.
    let layer = banger_testkit::registry::tar_with_files(&[("etc/hostname", b"x\n")]);
    let docker = banger_testkit::registry::tar_with_files(&[
        ("0123abcd/layer.tar", &layer),
        ("0123abcd/json", b"{}"),
        ("feed.json", b"{}"),
        (
            "manifest.json",
            b"[{\"Config\":\"feed.json\",\"Layers\":[\"0123abcd/layer.tar\"]}]",
        ),
        ("repositories", b"{}"),
    ]);
    std::fs::write(path("saved.tar"), docker).unwrap();
    refused(
        timed(&env, import("d", &path("saved.tar")), 10),
        &["saved.tar", "docker-archive", "image pull"],
    );

    // An ext4 image cut short (its superblock promises more blocks than the file holds).
    banger_testkit::make_ext4(&path("cut.ext4"), 16);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path("cut.ext4"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    refused(
        timed(&env, import("c", &path("cut.ext4")), 10),
        &["cut.ext4", "truncated"],
    );
    assert!(!env.state_dir().join("images/c").exists());

    // A directory that is a root filesystem without sshd or init is recorded as such, so its
    // VMs get the agent's ssh server and the agent as PID 1 instead of a boot that hangs.
    let bare = path("bare");
    std::fs::create_dir_all(bare.join("etc")).unwrap();
    std::fs::create_dir_all(bare.join("usr/bin")).unwrap();
    std::fs::write(bare.join("etc/hostname"), "bare\n").unwrap();
    let v = timed(&env, import("bare", &bare), 120).ok();
    assert_eq!(v["meta"]["has_sshd"], false, "{v}");
    assert_eq!(v["meta"]["has_init"], false, "{v}");
    // One with both (sbin a link into usr, as on merged-/usr systems) says so.
    let full = path("full");
    std::fs::create_dir_all(full.join("etc")).unwrap();
    std::fs::create_dir_all(full.join("usr/sbin")).unwrap();
    std::fs::create_dir_all(full.join("usr/bin")).unwrap();
    std::fs::write(full.join("usr/sbin/sshd"), "").unwrap();
    std::fs::write(full.join("usr/sbin/init"), "").unwrap();
    std::fs::write(full.join("usr/bin/apt-get"), "").unwrap();
    std::os::unix::fs::symlink("usr/sbin", full.join("sbin")).unwrap();
    let v = timed(&env, import("full", &full), 120).ok();
    assert_eq!(v["meta"]["has_sshd"], true, "{v}");
    assert_eq!(v["meta"]["has_init"], true, "{v}");
    assert_eq!(v["meta"]["package_manager"], "apt", "{v}");
}

#[test]
fn dynamically_linked_agent_is_refused_naming_it() {
    let mut env = TestEnv::new("");
    // What `cargo build --workspace` leaves beside bangerd: a dynamically linked binary.
    let agent = env.root().join("fake-agent");
    std::fs::copy("/bin/sh", &agent).unwrap();
    env.start_daemon();
    env.seed_artifacts();
    // A kernel without an initrd: its VMs boot banger's initramfs, the agent as /init.
    let bare = env.root().join("bare-kernel");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(env.root().join("kernel-src/vmlinux"), bare.join("vmlinux")).unwrap();
    env.request(&Request::KernelImport(
        banger_protocol::KernelImportParams {
            name: "bare-kernel".into(),
            dir: bare,
        },
    ))
    .ok();
    let create = |name: &str| {
        Request::VmCreate(VmCreateParams {
            name: Some(name.into()),
            kernel: Some("bare-kernel".into()),
            ..Default::default()
        })
    };
    let (_, msg) = timed(&env, create("dyn"), 30).err();
    for w in [
        &agent.display().to_string() as &str,
        "dynamically linked",
        "crt-static",
    ] {
        assert!(msg.contains(w), "{w:?} missing from {msg:?}");
    }
    assert!(!msg.contains('\n'), "{msg}");
    // A static one (the testkit's) boots.
    std::fs::write(&agent, banger_testkit::tiny_static_elf()).unwrap();
    timed(&env, create("stat"), 30).ok();
}

fn sigterm_stops_promptly(env: &mut TestEnv) {
    let pid: i32 = std::fs::read_to_string(env.runtime_dir().join("bangerd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(
        env.wait_daemon_exit(Duration::from_secs(10)).is_some(),
        "bangerd did not stop within 10s of SIGTERM"
    );
}

fn ping_answers(env: &TestEnv) {
    assert!(matches!(
        timed(env, Request::Ping, 5).last(),
        banger_protocol::Frame::Result { .. }
    ));
}

/// `kernel import` reads only regular files inside the kernel dir: a FIFO or a /dev/zero link
/// as `modules/load-order`, a link out of the tree, an oversized load-order or a FIFO initrd
/// are refused at once, naming them, and the daemon keeps answering and stops on SIGTERM.
#[test]
fn kernel_import_refuses_fifos_devices_links_and_huge_load_orders() {
    use banger_protocol::KernelImportParams;
    let mut env = TestEnv::new("");
    env.start_daemon();
    let k = env.root().join("k");
    let modules = k.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(k.join("vmlinux"), banger_testkit::tiny_static_elf()).unwrap();
    let order = modules.join("load-order");
    let import = |env: &TestEnv| {
        timed(
            env,
            Request::KernelImport(KernelImportParams {
                name: "k1".into(),
                dir: k.clone(),
            }),
            10,
        )
    };
    let order_s = order.display().to_string();

    mkfifo(&order);
    refused(import(&env), &[&order_s, "FIFO"]);
    ping_answers(&env);

    std::fs::remove_file(&order).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &order).unwrap();
    refused(import(&env), &[&order_s, "symlink"]);

    // A link to a regular file outside the tree is not followed either.
    let outside = env.root().join("outside-order");
    std::fs::write(&outside, "a.ko\n").unwrap();
    std::fs::remove_file(&order).unwrap();
    std::os::unix::fs::symlink(&outside, &order).unwrap();
    refused(import(&env), &[&order_s, "symlink"]);

    // A load-order over the cap is refused, not read whole.
    std::fs::remove_file(&order).unwrap();
    std::fs::write(&order, "# padding\n".repeat(10_000)).unwrap();
    refused(import(&env), &[&order_s, "larger than"]);

    // A listed module that links out of the tree (to /dev/zero or a real module) is refused.
    std::fs::write(&order, "a.ko\n").unwrap();
    std::os::unix::fs::symlink("/dev/zero", modules.join("a.ko")).unwrap();
    let a = modules.join("a.ko").display().to_string();
    refused(import(&env), &[&a, "symlink"]);
    std::fs::remove_file(modules.join("a.ko")).unwrap();
    mkfifo(&modules.join("a.ko"));
    refused(import(&env), &[&a, "FIFO"]);

    // A FIFO as initrd.img is refused rather than waited on.
    std::fs::remove_file(modules.join("a.ko")).unwrap();
    std::fs::write(modules.join("a.ko"), banger_testkit::tiny_static_elf()).unwrap();
    mkfifo(&k.join("initrd.img"));
    refused(import(&env), &["initrd.img", "FIFO"]);
    // And with the inputs fixed, the import works.
    std::fs::remove_file(k.join("initrd.img")).unwrap();
    let rec = import(&env).ok();
    assert_eq!(rec["name"], "k1", "{rec}");
    ping_answers(&env);
    sigterm_stops_promptly(&mut env);
}

/// `image import` keeps the fd it checked: a FIFO renamed over the source after the check is
/// never opened, so no import waits on it. A renaming loop races each import; every one must
/// answer promptly, and the daemon must still answer and stop on SIGTERM.
#[test]
fn image_import_never_reopens_a_swapped_source() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    let dir = env.root().join("src");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("img");
    let (plain, fifo) = (dir.join("plain"), dir.join("fifo"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (img, plain, fifo, stop) = (img.clone(), plain.clone(), fifo.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::write(&plain, vec![b'x'; 4096]);
                let _ = std::fs::rename(&plain, &img);
                let _ = nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600));
                let _ = std::fs::rename(&fifo, &img);
            }
        })
    };
    let mut answered = 0;
    for i in 0..60 {
        let reply = timed(&env, import(&format!("i{i}"), &img), 10);
        // Each is refused in one line (garbage or a FIFO); none waits.
        refused(reply, &[&img.display().to_string()]);
        answered += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert_eq!(answered, 60);
    ping_answers(&env);
    sigterm_stops_promptly(&mut env);
}
