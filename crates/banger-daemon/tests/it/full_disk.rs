//! A full disk: the state dir (and, separately, the blob cache) on a small loop-mounted ext4.
//! Image pulls and imports that do not fit, and VM creates whose disks do not fit, fail with
//! one clear error line that says the disk is full and names what was being written, and leave
//! no half image, no half VM and no scratch behind. Once space is freed, everything works.
//!
//! Needs root (mount, losetup); prints `SKIP: …` otherwise.

use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_core::ErrorCode;
use banger_protocol::{
    ImageImportParams, ImagePullParams, NameForceParams, Request, VmCreateParams, VmDeleteParams,
};
use banger_testkit::layers::LayerBuilder;
use banger_testkit::registry::{LocalRegistry, TestImage, TestLayer};
use banger_testkit::{TestEnv, have_program, processes_mentioning};

/// A file-backed ext4 mounted through a loop device. Dropping it unmounts (lazily if something
/// still holds it) and detaches the loop device.
struct LoopFs {
    dev: String,
    mnt: PathBuf,
}

impl LoopFs {
    fn mount(image: &Path, mib: u64, mnt: &Path) -> LoopFs {
        let f = std::fs::File::create(image).expect("create the fs image");
        f.set_len(mib << 20).expect("size the fs image");
        drop(f);
        // No reserved blocks: the daemon runs as root and could use them anyway.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", &image.display().to_string()],
        );
        let dev = run(
            "losetup",
            &["--find", "--show", &image.display().to_string()],
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        // From here on the guard owns the device: a failed mount still detaches it.
        let guard = LoopFs {
            dev,
            mnt: mnt.to_path_buf(),
        };
        std::fs::create_dir_all(mnt).expect("create the mount point");
        run("mount", &[&guard.dev, &mnt.display().to_string()]);
        guard
    }

    fn mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*self.mnt.to_string_lossy()))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mnt = self.mnt.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.mounted() {
            let ok = Command::new("umount")
                .arg(&mnt)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{mnt} is busy: unmounting it lazily");
                let _ = Command::new("umount").args(["-l", &mnt]).output();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A busy device is detached by the kernel once its last user closes it (autoclear).
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test environment with some of its dirs on small loop filesystems. Dropping it stops the
/// daemon and every VMM first (they hold files on the filesystems), then unmounts, then removes
/// the temp dir.
struct DiskEnv {
    env: TestEnv,
    mounts: Vec<LoopFs>,
}

impl DiskEnv {
    /// `None` (after `SKIP: …`) when this machine cannot loop-mount.
    fn new(extra: &str) -> Option<DiskEnv> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: full-disk tests need root (losetup, mount)");
            return None;
        }
        for p in ["losetup", "mount", "umount", "mkfs.ext4"] {
            if !have_program(p) {
                println!("SKIP: {p} is not installed");
                return None;
            }
        }
        if !Path::new("/dev/loop-control").exists() {
            println!("SKIP: no loop device support (/dev/loop-control)");
            return None;
        }
        Some(DiskEnv {
            env: TestEnv::new(extra),
            mounts: Vec::new(),
        })
    }

    /// Puts `dir` (a path inside the environment, not yet created) on a fresh `mib` MiB ext4.
    fn small_fs(&mut self, dir: &Path, mib: u64) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let image = self.env.root().join(format!("{name}.fs.img"));
        self.mounts.push(LoopFs::mount(&image, mib, dir));
    }
}

impl Deref for DiskEnv {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl DerefMut for DiskEnv {
    fn deref_mut(&mut self) -> &mut TestEnv {
        &mut self.env
    }
}

impl Drop for DiskEnv {
    fn drop(&mut self) {
        self.env.kill_daemon();
        for (pid, _) in processes_mentioning(self.env.root()) {
            // SAFETY: kill(2) on processes whose command line names our private temp dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_mentioning(self.env.root()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Taps of a real environment's VMs are named in handles files on the state fs: delete
        // them while it is still mounted (TestEnv's own drop runs after the unmount).
        for tap in self.env.recorded_taps() {
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
        }
        self.mounts.clear();
    }
}

/// Free bytes on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `s` is a valid, writable statvfs.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Fills the filesystem of `dir` with a ballast file, then frees `leave` bytes of it again.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n == buf.len() => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    path
}

/// Random bytes (incompressible).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    banger_testkit::registry::pseudo_random(len, seed)
}

fn config() -> serde_json::Value {
    serde_json::json!({ "Cmd": ["/bin/sh"] })
}

/// One layer: a dir with a file of `mib` MiB of random bytes.
fn big_layer(mib: usize, seed: u64) -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=full\n")
        .dir("data", 0o755)
        .file("data/blob", 0o644, &noise(mib << 20, seed))
        .build()
}

fn pull(env: &TestEnv, reference: &str) -> banger_testkit::Reply {
    env.request(&Request::ImagePull(ImagePullParams {
        reference: reference.into(),
        insecure: true,
        ..Default::default()
    }))
}

/// The error says, on one line, that the disk is full, and names what was being written.
fn assert_disk_full(what: &str, code: ErrorCode, msg: &str, names: &[&str]) {
    println!("{what}: {code:?}: {msg}");
    assert!(
        msg.contains("No space left on device") || msg.contains("disk is full"),
        "{what}: the error does not say the disk is full: {msg}"
    );
    assert!(!msg.contains('\n'), "{what}: not one line: {msg:?}");
    assert!(
        names.iter().any(|n| msg.contains(n)),
        "{what}: the error names none of {names:?}: {msg}"
    );
    assert_eq!(
        code,
        ErrorCode::OperationFailed,
        "{what}: a full disk is not the caller's fault: {msg}"
    );
}

/// No image row named `name`, no image dir, no staging dir, no build scratch, no partial blob.
fn assert_no_half_image(env: &TestEnv, name: &str) {
    let list = env.request(&Request::ImageList).ok();
    let names: Vec<&str> = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&name), "image row {name} left: {list}");
    let images = env.state_dir().join("images");
    assert!(!images.join(name).exists(), "images/{name} left");
    let stray: Vec<String> = entries(&images)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "staging left in images/: {stray:?}");
    let scratch = entries(&env.state_dir().join("build"));
    assert!(scratch.is_empty(), "scratch left in build/: {scratch:?}");
    let partials: Vec<_> = banger_testkit::files_under(&env.root().join("cache"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(partials.is_empty(), "partial blobs left: {partials:?}");
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn vm_names(env: &TestEnv) -> Vec<(String, String, Option<String>)> {
    let list = env.request(&Request::VmList).ok();
    list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
                v["last_error"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn create(env: &TestEnv, name: &str) -> banger_testkit::Reply {
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    }))
}

fn delete(env: &TestEnv, name: &str) {
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: name.into(),
        force: true,
    }))
    .ok();
}

/// Image pulls, imports and VM creates on a 64 MiB state dir.
#[test]
fn a_full_state_dir_fails_cleanly_and_recovers() {
    let Some(mut env) = DiskEnv::new("") else {
        return;
    };
    let reg = match LocalRegistry::start() {
        Ok(r) => Some(r),
        Err(why) => {
            println!("SKIP (pull cases): {why}");
            None
        }
    };
    let state = env.state_dir();
    env.small_fs(&state, 64);
    env.start_daemon();
    env.seed_artifacts();
    // One VM runs through everything below; (c2) deletes it on a full disk.
    create(&env, "first").ok();
    println!("free after setup: {} KiB", free_bytes(&state) >> 10);

    // (a) Pulls whose content does not fit: one fails while unpacking the layers into the
    // scratch tree, one while writing the ext4 image.
    if let Some(reg) = &reg {
        for (repo, mib) in [("huge", 80usize), ("big", 28)] {
            let layer = big_layer(mib, mib as u64);
            reg.push_image(
                &format!("full/{repo}"),
                Some("1"),
                &TestImage::new(vec![TestLayer::Tar(layer)], config()),
            );
            let r = format!("{}/full/{repo}:1", reg.addr());
            let t = Instant::now();
            let (code, msg) = pull(&env, &r).err();
            println!("pull of {mib} MiB failed in {:?}", t.elapsed());
            assert_disk_full(
                &format!("pull {repo}"),
                code,
                &msg,
                &["build/", "images/", "rootfs"],
            );
            assert_no_half_image(&env, &format!("{repo}-1"));
        }
    }

    // (b) Imports that do not fit: a rootfs tarball, a bundle, an ext4 file.
    {
        let tarball = env.root().join("rootfs.tar");
        std::fs::write(&tarball, big_layer(80, 7)).unwrap();
        let (code, msg) = env
            .request(&Request::ImageImport(ImageImportParams {
                name: Some("tarball".into()),
                source: tarball.clone(),
                kernel: None,
            }))
            .err();
        assert_disk_full("import tarball", code, &msg, &["build/", "images/"]);
        assert_no_half_image(&env, "tarball");

        let bundle = env.root().join("big.tar.zst");
        std::fs::write(&bundle, bundle_bytes(&noise(80 << 20, 8))).unwrap();
        let (code, msg) = env
            .request(&Request::ImageImport(ImageImportParams {
                name: Some("bundled".into()),
                source: bundle,
                kernel: None,
            }))
            .err();
        assert_disk_full("import bundle", code, &msg, &["images/"]);
        assert_no_half_image(&env, "bundled");

        // An ext4 file (only its superblock's magic, block size and block count are checked:
        // 4 KiB blocks, as many as fit, no 64-bit feature) is copied in.
        let ext4 = env.root().join("big.ext4");
        let mut bytes = noise(80 << 20, 9);
        bytes[1024 + 56] = 0x53;
        bytes[1024 + 57] = 0xef;
        bytes[1024 + 4..1024 + 8].copy_from_slice(&((80u32 << 20) / 4096).to_le_bytes());
        bytes[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes());
        bytes[1024 + 0x60] &= !0x80;
        std::fs::write(&ext4, bytes).unwrap();
        let (code, msg) = env
            .request(&Request::ImageImport(ImageImportParams {
                name: Some("ext4file".into()),
                source: ext4,
                kernel: None,
            }))
            .err();
        assert_disk_full("import ext4", code, &msg, &["images/"]);
        assert_no_half_image(&env, "ext4file");
    }
    let free = free_bytes(&state);
    println!("free after the failed images: {} KiB", free >> 10);
    assert!(free > 40 << 20, "the failed images left data behind");

    // (c) VM creates on a disk filled to a little below what they need: each fails before its
    // row is kept, or starts; nothing half-built stays.
    let mut outcomes = Vec::new();
    // The root disk (a sparse 8 GiB ext4) takes about 4.2 MiB, the work disk 0.4 MiB: the
    // fine steps around those sizes make later steps of the create fail too.
    let levels: Vec<u64> = [0u64, 8, 64, 1024]
        .into_iter()
        .chain((4096..4608).step_by(64))
        .chain((4608..4800).step_by(8))
        .chain((4800..=5376).step_by(64))
        .chain([6144, 8192])
        .map(|kib| kib << 10)
        .collect();
    for (i, leave) in levels.into_iter().enumerate() {
        let ballast = fill(&state, leave);
        let name = format!("full-{i}");
        let free = free_bytes(&state);
        let r = create(&env, &name);
        let vms = vm_names(&env);
        let row = vms.iter().find(|(n, _, _)| *n == name).cloned();
        match r.last() {
            banger_protocol::Frame::Error { code, message, .. } => {
                assert_disk_full(
                    &format!("create with {} KiB free", free >> 10),
                    *code,
                    message,
                    &["disk", "vms/", "database", "state"],
                );
                // Decided: a create that fails leaves no VM, except one whose start ran and
                // recorded the failing step (`error`, as for any failed start; `vm start`
                // retries it once there is space).
                match &row {
                    None => outcomes.push(format!("{} KiB free: failed, no VM", free >> 10)),
                    Some((_, state, last_error)) => {
                        assert_eq!(state, "error", "a failed create left its VM: {row:?}");
                        let last_error = last_error.as_deref().unwrap_or_default();
                        assert!(
                            last_error.contains("at step") && last_error.contains("No space"),
                            "{last_error}"
                        );
                        outcomes.push(format!("{} KiB free: failed, VM in error", free >> 10));
                        delete(&env, &name);
                    }
                }
            }
            _ => {
                outcomes.push(format!("{} KiB free: created", free >> 10));
                assert_eq!(row.as_ref().map(|r| r.1.as_str()), Some("running"));
                delete(&env, &name);
            }
        }
        let ids: Vec<String> = env.request(&Request::VmList).ok()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        let stray: Vec<_> = env
            .vm_leftovers()
            .into_iter()
            .filter(|p| !ids.iter().any(|id| p.ends_with(id)))
            .collect();
        assert!(stray.is_empty(), "VM dirs without a VM: {stray:?}");
        std::fs::remove_file(&ballast).unwrap();
    }
    println!("creates on a full disk:");
    for o in &outcomes {
        println!("  {o}");
    }
    assert!(
        outcomes.iter().any(|o| o.contains("failed")),
        "no create hit the full disk: {outcomes:?}"
    );

    // (c2) Deleting is how a user frees space: it works on a disk with no block left (a
    // stopped VM, and a running one with --force).
    create(&env, "victim").ok();
    env.request(&Request::VmStop(banger_protocol::VmStopParams {
        vm: "victim".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    let ballast = fill(&state, 0);
    let probe = std::fs::write(state.join("probe"), b"x");
    assert_eq!(
        probe.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "the disk is not full: {probe:?}"
    );
    let t = Instant::now();
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "victim".into(),
        force: false,
    }))
    .ok();
    delete(&env, "first");
    println!(
        "two VMs deleted on a full disk in {:?}; {} KiB free after",
        t.elapsed(),
        free_bytes(&state) >> 10
    );
    assert_eq!(vm_names(&env), []);
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
    std::fs::remove_file(&ballast).unwrap();

    // (d) With the space back, everything works again.
    create(&env, "after").ok();
    if let Some(reg) = &reg {
        reg.push_image(
            "full/small",
            Some("1"),
            &TestImage::new(vec![TestLayer::Tar(big_layer(2, 3))], config()),
        );
        pull(&env, &format!("{}/full/small:1", reg.addr())).ok();
    }
    delete(&env, "after");
    assert_eq!(vm_names(&env), []);
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
    let leaks = env.request(&Request::DaemonLeaks).ok();
    assert_eq!(leaks["leaks"], serde_json::json!([]), "{leaks}");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
    // The seeded image has no users left, so it can go.
    env.request(&Request::ImageDelete(NameForceParams {
        name: "test-image".into(),
        force: false,
    }))
    .ok();
}

/// The blob cache on a 24 MiB filesystem: a layer that does not fit fails the pull naming the
/// cache, with no partial file left; a small image still pulls afterwards.
#[test]
fn a_full_blob_cache_fails_cleanly() {
    let Some(mut env) = DiskEnv::new("") else {
        return;
    };
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let cache = env.root().join("cache");
    env.small_fs(&cache, 24);
    env.start_daemon();
    reg.push_image(
        "cache/huge",
        Some("1"),
        &TestImage::new(vec![TestLayer::Tar(big_layer(40, 11))], config()),
    );
    let (code, msg) = pull(&env, &format!("{}/cache/huge:1", reg.addr())).err();
    assert_disk_full("pull into a full cache", code, &msg, &["cache"]);
    assert_no_half_image(&env, "huge-1");
    let blobs = banger_testkit::files_under(&cache.join("oci"));
    println!("cache after the failed pull: {blobs:?}");
    assert!(
        free_bytes(&cache) > 16 << 20,
        "the failed download left data in the cache: {blobs:?}"
    );
    reg.push_image(
        "cache/small",
        Some("1"),
        &TestImage::new(vec![TestLayer::Tar(big_layer(2, 12))], config()),
    );
    pull(&env, &format!("{}/cache/small:1", reg.addr())).ok();
}

/// A bundle (`image export`'s format) holding `rootfs`.
fn bundle_bytes(rootfs: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let manifest = serde_json::to_vec(&banger_daemon::engine::BundleManifest {
        format: banger_daemon::engine::BUNDLE_FORMAT.into(),
        name: "bundled".into(),
        source: "test".into(),
        kernel: None,
        meta: Default::default(),
        rootfs_sha256: hex::encode(sha2::Sha256::digest(rootfs)),
        rootfs_size: rootfs.len() as u64,
    })
    .unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in [("manifest.json", &manifest[..]), ("rootfs.ext4", rootfs)] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    zstd::encode_all(tar.into_inner().unwrap().as_slice(), 1).unwrap()
}

/// A real guest (QEMU/TCG) filling its disk while the state dir's filesystem is nearly full:
/// QEMU pauses it (`werror=enospc`); `vm show` says so with the reason, and `vm stop` and
/// `vm kill` work although the store's filesystem is full.
#[test]
fn a_guest_filling_the_host_disk_is_shown_paused_and_stop_and_kill_work() {
    let Some(kdir) = std::env::var_os("BANGER_TEST_KERNEL_DIR").map(PathBuf::from) else {
        println!("SKIP: BANGER_TEST_KERNEL_DIR not set (a dir with vmlinux and modules/)");
        return;
    };
    let busybox = std::env::var_os("BANGER_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    if !busybox.is_file() {
        println!("SKIP: no static busybox (BANGER_TEST_BUSYBOX)");
        return;
    }
    if DiskEnv::new("").is_none() {
        return;
    }
    let Some(real) = TestEnv::real("") else {
        return;
    };
    let mut env = DiskEnv {
        env: real,
        mounts: Vec::new(),
    };
    let state = env.state_dir();
    env.small_fs(&state, 320);
    env.start_daemon();
    env.request(&Request::KernelImport(
        banger_protocol::KernelImportParams {
            name: "k".into(),
            dir: kdir,
        },
    ))
    .ok();
    // A busybox root filesystem: no sshd, no init (the agent serves ssh and is PID 1).
    let tree = env.root().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy(&busybox, tree.join("bin/busybox")).unwrap();
    for applet in ["sh", "dd", "sync", "cat", "df", "rm"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    let v = env
        .request(&Request::ImageImport(ImageImportParams {
            name: Some("bb".into()),
            source: tree.clone(),
            kernel: Some("k".into()),
        }))
        .ok();
    assert_eq!(v["meta"]["has_sshd"], false, "{v}");
    for name in ["full1", "full2"] {
        let o = env.cli(&[
            "vm", "create", "--name", name, "--image", "bb", "--kernel", "k",
        ]);
        assert!(
            o.status.success(),
            "create {name}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            env.daemon_log()
        );
    }
    println!("free on the state fs: {} MiB", free_bytes(&state) >> 20);
    // full1 writes more than the host filesystem has left.
    let mut dd = Command::new(banger_testkit::bin("banger"));
    dd.env("BANGER_CONFIG", env.root().join("config.toml"))
        .env("HOME", env.home())
        .args([
            "vm",
            "exec",
            "full1",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/root/fill",
            "bs=1M",
            "count=1000",
            "conv=fsync",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut dd = dd.spawn().unwrap();
    let show = |name: &str| {
        env.request(&Request::VmShow(banger_protocol::VmRef { vm: name.into() }))
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let paused = loop {
        let v = show("full1");
        if let Some(p) = v["paused"].as_str() {
            break p.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "full1 never shown paused (free {} KiB): {v}",
            free_bytes(&state) >> 10
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(paused.contains("host disk full"), "{paused}");
    assert_eq!(show("full1")["state"], "running");
    let text = env.cli(&["vm", "show", "full1"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("running (paused: host disk full"), "{text}");
    println!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("state"))
            .unwrap_or_default()
    );
    // The store's filesystem is full now: stop and kill still work.
    fill(&state, 0);
    println!("free on the state fs: {} KiB", free_bytes(&state) >> 10);
    let o = env.cli(&["vm", "stop", "full1"]);
    assert!(
        o.status.success(),
        "vm stop on a full disk: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(show("full1")["state"], "stopped");
    let o = env.cli(&["vm", "kill", "full2"]);
    assert!(
        o.status.success(),
        "vm kill on a full disk: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(show("full2")["state"], "stopped");
    let _ = dd.kill();
    let _ = dd.wait();
}
