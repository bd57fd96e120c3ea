//! Integration tests of the QEMU backend against the real `qemu-system-x86_64` and a real Linux
//! kernel. Skipped (with a `SKIP:` line) when QEMU or a kernel is missing.
//!
//! The kernel is `$BANGER_TEST_KERNEL` (a vmlinux or bzImage), else the first readable
//! `/boot/vmlinuz-*`. It boots without a root disk, so it ends in a "VFS: Unable to mount root
//! fs" panic: with `panic=-1` that panic reboots, which ends QEMU (`-no-reboot`); with `panic=0`
//! the guest stays up, halted, until it is killed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use banger_vmm::process;
use banger_vmm::qemu::{Accel, QMP_SOCKET_NAME, Qemu, detect_accel};
use banger_vmm::{DriveSpec, LaunchSpec, Vmm, VmmError, VmmHandle};

/// How long a guest may take to print its first kernel line. TCG boots here print it within a
/// second; the margin covers a loaded CI machine.
const BOOT_LIMIT: Duration = Duration::from_secs(60);

fn qemu_bin() -> Option<PathBuf> {
    let bin = Qemu::find_binary();
    if bin.is_none() {
        println!("SKIP: qemu-system-x86_64 is not installed");
    }
    bin
}

fn kernel() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BANGER_TEST_KERNEL") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "BANGER_TEST_KERNEL={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
                && std::fs::File::open(p).is_ok()
        })
        .collect();
    found.sort();
    let kernel = found.pop();
    if kernel.is_none() {
        println!("SKIP: no guest kernel: set BANGER_TEST_KERNEL to a vmlinux/bzImage");
    }
    kernel
}

/// One test's world. Its directory name contains a comma, so every path QEMU gets exercises
/// the option escaping.
struct Fixture {
    dir: tempfile::TempDir,
    qemu: Qemu,
    kernel: PathBuf,
    vm_id: String,
}

impl Fixture {
    /// `None` (after printing why) when QEMU or a kernel is missing.
    fn new() -> Option<Fixture> {
        let bin = qemu_bin()?;
        let kernel = kernel()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new()
            .prefix("bq,")
            .tempdir_in("/tmp")
            .unwrap();
        let linked = dir.path().join("vmlinuz,1");
        std::os::unix::fs::symlink(&kernel, &linked).unwrap();
        for (name, size) in [("root,ro.img", 1 << 20), ("work.img", 2 << 20)] {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_len(size).unwrap();
        }
        let probe = detect_accel();
        println!("accelerator: {} ({})", probe.accel, probe.reason);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Some(Fixture {
            qemu: Qemu::new(bin, probe.accel).unwrap(),
            kernel: linked,
            vm_id: format!("{:08x}{:04x}", std::process::id(), n),
            dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spec(&self, panic: &str) -> LaunchSpec {
        LaunchSpec {
            vm_id: self.vm_id.clone(),
            run_dir: self.path("run"),
            log_path: self.path("qemu.log"),
            log_max_bytes: banger_vmm::DEFAULT_LOG_MAX_BYTES,
            vcpu: 1,
            memory_mib: 256,
            kernel: self.kernel.clone(),
            initrd: None,
            boot_args: format!("console=ttyS0 panic={panic}"),
            drives: vec![
                DriveSpec {
                    id: "root".into(),
                    path: self.path("root,ro.img"),
                    read_only: true,
                },
                DriveSpec {
                    id: "work".into(),
                    path: self.path("work.img"),
                    read_only: false,
                },
            ],
            net: None,
            vsock: None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("qemu.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns how long that took.
    async fn wait_log(&self, needle: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                started.elapsed() < limit,
                "{needle:?} not in the log within {limit:?}; log tail:\n{}",
                process::tail_file(&self.path("qemu.log"), 30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    /// Pids of live (non-zombie) processes whose command line mentions this fixture.
    fn processes(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let stat = process::proc_stat(pid)?;
                (stat.state != 'Z' && String::from_utf8_lossy(&cmdline).contains(&needle))
                    .then_some(pid)
            })
            .collect()
    }

    async fn assert_no_process_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes left: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Fixture {
    /// QEMU is detached by design; a failing test must not leak it.
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = process::signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn status(fx: &Fixture, handle: &VmmHandle) -> String {
    fx.qemu.qmp(handle).query_status().await.unwrap().status
}

#[tokio::test]
async fn qemu_boots_linux_only_after_boot_and_a_guest_reboot_ends_it() {
    let Some(fx) = Fixture::new() else { return };
    let spec = fx.spec("-1");

    let spawn_started = Instant::now();
    let handle = fx.qemu.spawn(&spec).await.unwrap();
    let spawned_in = spawn_started.elapsed();
    assert_eq!(handle.kind, fx.qemu.kind());
    assert_eq!(handle.control_socket, spec.run_dir.join(QMP_SOCKET_NAME));
    assert!(fx.qemu.is_alive(&handle));
    assert_eq!(status(&fx, &handle).await, "prelaunch");

    // The comma-laden drive paths reached QEMU intact, with their read-only flags.
    let blocks = fx
        .qemu
        .qmp(&handle)
        .execute("query-block", None)
        .await
        .unwrap();
    let drives: Vec<(String, String, bool)> = blocks
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["device"].as_str().unwrap().to_string(),
                b["inserted"]["file"].as_str().unwrap().to_string(),
                b["inserted"]["ro"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        drives,
        vec![
            (
                "drive-root".into(),
                fx.path("root,ro.img").to_string_lossy().into_owned(),
                true
            ),
            (
                "drive-work".into(),
                fx.path("work.img").to_string_lossy().into_owned(),
                false
            ),
        ]
    );
    let kvm = fx.qemu.qmp(&handle).query_kvm().await.unwrap();
    assert_eq!(kvm.enabled, fx.qemu.accel() == Accel::Kvm);

    // -S: the guest has not run a single instruction before boot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !fx.log().contains("Linux version"),
        "guest ran before boot: {}",
        fx.log()
    );

    fx.qemu.configure(&handle, &spec).await.unwrap();
    let mut other = spec.clone();
    other.memory_mib = 512;
    let err = fx.qemu.configure(&handle, &other).await.unwrap_err();
    assert!(matches!(err, VmmError::State { .. }), "{err:?}");
    assert!(err.to_string().contains("512M"), "{err}");

    let boot_started = Instant::now();
    fx.qemu.boot(&handle).await.unwrap();
    assert!(fx.qemu.is_alive(&handle));
    fx.wait_log("Linux version", BOOT_LIMIT).await;
    // The console reaches the log through a pump, in chunks: the command line may follow the
    // version line a moment later.
    fx.wait_log("Command line:", BOOT_LIMIT).await;
    println!(
        "{}: spawn until QMP ready {spawned_in:?}; boot until \"Linux version\" in the log \
         {:?}; spawn until then {:?}",
        fx.qemu.accel(),
        boot_started.elapsed(),
        spawn_started.elapsed()
    );
    assert!(
        fx.log()
            .contains(&format!("tsc_early_khz={}", fx.qemu.tsc_khz()))
            == (fx.qemu.accel() == Accel::Tcg),
        "TCG boot args must be on the command line exactly under TCG"
    );

    // No root disk: the kernel panics, panic=-1 reboots at once, and -no-reboot ends QEMU.
    tokio::time::timeout(Duration::from_secs(120), fx.qemu.wait_exit(&handle))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "QEMU still runs after the guest's panic; log tail:\n{}",
                process::tail_file(&spec.log_path, 30)
            )
        });
    assert!(fx.log().contains("Kernel panic"), "{}", fx.log());
    println!(
        "boot until the guest's reboot ended QEMU: {:?}",
        boot_started.elapsed()
    );
    assert!(!fx.qemu.is_alive(&handle));
    assert!(
        fx.qemu
            .shutdown(&handle, Duration::from_secs(1))
            .await
            .unwrap()
    );
    fx.qemu.kill(&handle).await.unwrap();
    fx.assert_no_process_left().await;
}

#[tokio::test]
async fn qemu_shutdown_of_an_unresponsive_guest_times_out_and_kill_ends_it() {
    let Some(fx) = Fixture::new() else { return };
    // panic=0: after the root-fs panic the guest halts but QEMU keeps running.
    let spec = fx.spec("0");
    let handle = fx.qemu.spawn(&spec).await.unwrap();
    fx.qemu.configure(&handle, &spec).await.unwrap();
    fx.qemu.boot(&handle).await.unwrap();
    assert_eq!(status(&fx, &handle).await, "running");
    fx.wait_log("Kernel panic", BOOT_LIMIT).await;

    // A booted guest cannot be configured any more.
    let err = fx.qemu.configure(&handle, &spec).await.unwrap_err();
    assert!(err.to_string().contains("\"running\""), "{err}");

    fx.qemu.pause(&handle).await.unwrap();
    assert_eq!(status(&fx, &handle).await, "paused");
    fx.qemu.resume(&handle).await.unwrap();
    assert_eq!(status(&fx, &handle).await, "running");

    // The panicked guest cannot react to the ACPI power button.
    let started = Instant::now();
    let exited = fx
        .qemu
        .shutdown(&handle, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(!exited, "a halted guest cannot power off");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(fx.qemu.is_alive(&handle));

    fx.qemu.kill(&handle).await.unwrap();
    assert!(!fx.qemu.is_alive(&handle));
    tokio::time::timeout(Duration::from_secs(1), fx.qemu.wait_exit(&handle))
        .await
        .unwrap();
    fx.qemu.kill(&handle).await.unwrap();
    fx.assert_no_process_left().await;
}

#[tokio::test]
async fn qemu_shutdown_before_boot_quits_at_once() {
    let Some(fx) = Fixture::new() else { return };
    let spec = fx.spec("-1");
    let handle = fx.qemu.spawn(&spec).await.unwrap();
    let started = Instant::now();
    assert!(
        fx.qemu
            .shutdown(&handle, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!fx.log().contains("Linux version"));
    fx.assert_no_process_left().await;
}

#[tokio::test]
async fn qemu_spawn_failures_leave_no_process() {
    let Some(fx) = Fixture::new() else { return };

    let mut spec = fx.spec("-1");
    spec.kernel = fx.path("missing-vmlinux");
    let err = fx.qemu.spawn(&spec).await.unwrap_err();
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    assert!(err.to_string().contains("missing-vmlinux"), "{err}");
    assert!(!spec.run_dir.join(QMP_SOCKET_NAME).exists());

    // A file QEMU cannot load as a kernel: QEMU itself refuses it and exits.
    std::fs::write(fx.path("not-a-kernel"), "this is not a kernel\n").unwrap();
    spec.kernel = fx.path("not-a-kernel");
    let err = fx.qemu.spawn(&spec).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
    // QEMU 7.2 says "qemu: invalid kernel header"; the log tail carries QEMU's own words.
    assert!(err.to_string().contains("kernel"), "{err}");
    println!("QEMU's refusal: {err}");
    fx.assert_no_process_left().await;
}

/// Opt-in: `BANGER_TEST_INITRD` is an initramfs whose init prints `banger-test-init: ready` once
/// it watches the ACPI power button, and powers the guest off when it is pressed. Checks that
/// `shutdown` reaches the guest through microvm's ACPI and that the guest's power-off ends QEMU.
#[tokio::test]
async fn qemu_power_button_shuts_down_a_guest_that_handles_it() {
    let Some(initrd) = std::env::var_os("BANGER_TEST_INITRD").map(PathBuf::from) else {
        println!(
            "SKIP: BANGER_TEST_INITRD (an init that powers off on the power button) is not set"
        );
        return;
    };
    let Some(fx) = Fixture::new() else { return };
    let mut spec = fx.spec("-1");
    spec.initrd = Some(initrd);
    let started = Instant::now();
    let handle = fx.qemu.spawn(&spec).await.unwrap();
    fx.qemu.configure(&handle, &spec).await.unwrap();
    fx.qemu.boot(&handle).await.unwrap();
    fx.wait_log("banger-test-init: ready", BOOT_LIMIT).await;
    println!(
        "{}: spawn until the guest's init was ready {:?}",
        fx.qemu.accel(),
        started.elapsed()
    );
    let pressed = Instant::now();
    assert!(
        fx.qemu
            .shutdown(&handle, Duration::from_secs(30))
            .await
            .unwrap(),
        "the guest did not power off; log tail:\n{}",
        process::tail_file(&spec.log_path, 30)
    );
    println!("power button until QEMU exited: {:?}", pressed.elapsed());
    assert!(!fx.log().contains("Kernel panic"), "{}", fx.log());
    fx.assert_no_process_left().await;
}

/// A static busybox for a guest initramfs: `$BANGER_TEST_BUSYBOX`, else `/bin/busybox`.
fn static_busybox() -> Option<PathBuf> {
    let path = std::env::var_os("BANGER_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    let linked = banger_sys::elf::x86_64_linkage(&path);
    if !matches!(linked, Ok(banger_sys::elf::Linkage::Static)) {
        println!(
            "SKIP: {} is not a static busybox ({linked:?}): apt-get install busybox-static",
            path.display()
        );
        return None;
    }
    Some(path)
}

/// An initramfs whose `/init` prints the guest's uptime every (guest) second, `lines` times,
/// then powers off.
fn clock_initramfs(dir: &std::path::Path, busybox: &std::path::Path, lines: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("initramfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /dev /proc\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         exec >/dev/ttyS0 2>&1\n\
         /bin/busybox mount -t proc proc /proc\n\
         i=0\n\
         while [ $i -lt {lines} ]; do\n\
         echo \"UPTIME $(/bin/busybox cat /proc/uptime)\"\n\
         /bin/busybox sleep 1\n\
         i=$((i+1))\n\
         done\n\
         /bin/busybox poweroff -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    for f in ["init", "bin/busybox"] {
        std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = dir.join("clock.cpio");
    let file = std::fs::File::create(&out).unwrap();
    let find = std::process::Command::new("find")
        .arg(".")
        .current_dir(&root)
        .output()
        .unwrap();
    let mut cpio = std::process::Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&root)
        .stdin(std::process::Stdio::piped())
        .stdout(file)
        .spawn()
        .expect("cpio (apt-get install cpio)");
    use std::io::Write;
    cpio.stdin.take().unwrap().write_all(&find.stdout).unwrap();
    assert!(cpio.wait().unwrap().success());
    out
}

/// A TCG guest's clock follows the TSC frequency banger tells it (`tsc_early_khz`), and its TSC
/// ticks at the host's rate: told the host's frequency, its clock advances at the host's rate.
/// (Told a fixed 2 GHz on this 2.6 GHz host, it ran 1.3x fast.)
#[tokio::test]
async fn a_guest_clock_advances_at_the_host_rate() {
    let Some(fx) = Fixture::new() else { return };
    let Some(busybox) = static_busybox() else {
        return;
    };
    if std::process::Command::new("cpio")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: cpio is not installed");
        return;
    }
    println!(
        "tsc_early_khz={} ({})",
        fx.qemu.tsc_khz(),
        banger_vmm::qemu::tsc::host_tsc().source
    );
    let mut spec = fx.spec("-1");
    spec.drives.clear();
    spec.initrd = Some(clock_initramfs(fx.dir.path(), &busybox, 14));
    spec.boot_args = "console=ttyS0 panic=-1 quiet".into();
    let handle = fx.qemu.spawn(&spec).await.unwrap();
    fx.qemu.configure(&handle, &spec).await.unwrap();
    fx.qemu.boot(&handle).await.unwrap();

    // Each new UPTIME line: (when the host saw it, the guest's uptime in it).
    let mut seen: Vec<(Instant, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < 14 && Instant::now() < deadline && fx.qemu.is_alive(&handle) {
        let log = fx.log();
        let values: Vec<f64> = log
            .lines()
            .filter_map(|l| l.trim().strip_prefix("UPTIME "))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect();
        let now = Instant::now();
        for v in values.into_iter().skip(seen.len()) {
            seen.push((now, v));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = fx.qemu.kill(&handle).await;
    // The first line may be late (boot); measure from the second.
    assert!(
        seen.len() >= 10,
        "only {} uptime lines; log tail:\n{}",
        seen.len(),
        process::tail_file(&fx.path("qemu.log"), 30)
    );
    let (h0, g0) = seen[1];
    let (h1, g1) = *seen.last().unwrap();
    let host = h1.duration_since(h0).as_secs_f64();
    let guest = g1 - g0;
    let ratio = guest / host;
    println!(
        "guest clock: {guest:.2}s over {host:.2}s of host time (ratio {ratio:.3}, {} lines)",
        seen.len()
    );
    assert!(
        (ratio - 1.0).abs() < 0.05,
        "the guest clock runs at {ratio:.3}x the host's (guest {guest:.2}s, host {host:.2}s)"
    );
    fx.assert_no_process_left().await;
}
