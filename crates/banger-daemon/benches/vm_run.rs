//! Benchmark: `banger vm run --rm -- true` on a real guest against a raw QEMU boot of the same
//! kernel, image and banger initramfs to sshd with no daemon, alternated in one process so a
//! machine busy with something else slows both sides alike.
//!
//! Per iteration:
//! - banger, as a user sees it: the `banger vm run --rm -- true` CLI, wall time;
//! - banger, through the protocol: `vm.create` with every progress frame timestamped (the
//!   phases), then `true` over ssh with the daemon's `vm.ssh_info`, then `vm.delete`;
//! - raw: per-iteration disks (sparse upper and work ext4, a config disk with a fresh host key),
//!   a tap on the test bridge, `qemu-system-x86_64` with exactly `Qemu::argv` of the equivalent
//!   launch spec (started paused, `cont` over QMP, as the daemon does), the SSH banner, then
//!   `ssh … true` with strict host key checking; QEMU killed and everything removed after.
//!
//! Needs what the real-guest tests need (root, QEMU, mmdebstrap, the static agent, release
//! builds):
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build -p banger-agent --release --target x86_64-unknown-linux-gnu
//! cargo build --release -p banger-daemon -p banger-cli -p fake-firecracker
//! cargo bench -p banger-daemon --bench vm_run -- [ITERATIONS]
//! ```
//!
//! Prints `SKIP: why` and exits 0 when the machine cannot boot guests. Prints medians per phase
//! and ratios; compare the ratios, not the absolute times.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_core::{ImageRecord, KernelRecord, VmRecord};
use banger_guest::{GuestConfig, NetworkConfig, RootLayout, SshIdentity};
use banger_net::{MacAddr, TapName};
use banger_protocol::{Frame, NameParams, Request, SshInfo, VmCreateParams, VmDeleteParams, VmRef};
use banger_testkit::{TestEnv, bridge_ports, request_timed};
use banger_vmm::qemu::{QMP_SOCKET_NAME, Qemu, detect_accel, validate_spec};
use banger_vmm::{DriveSpec, LaunchSpec, NetSpec};

const RAW_NAME: &str = "rawbench";
/// As in the test environment's config (`[vm_defaults]`) and the daemon's disks.
const VCPU: u32 = 2;
const MEMORY_MIB: u32 = 1024;
const WORK_DISK_BYTES: u64 = 2 << 30;
const UPPER_DISK_BYTES: u64 = 8 << 30;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Stage names the daemon reports during `vm.create`, in order.
const STAGES: &[&str] = &[
    "allocate",
    "root_disk",
    "work_disk",
    "identity",
    "preflight",
    "runtime_dir",
    "initramfs",
    "config_disk",
    "network",
    "vmm_spawn",
    "vmm_configure",
    "vmm_boot",
    "guest_ready",
    "ssh",
    "ready",
];

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs a command to completion, panicking with its stderr when it fails.
fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Named phase timings of one side, in insertion order.
#[derive(Default)]
struct Phases {
    order: Vec<&'static str>,
    values: BTreeMap<&'static str, Vec<Duration>>,
}

impl Phases {
    fn add(&mut self, name: &'static str, d: Duration) {
        if !self.values.contains_key(name) {
            self.order.push(name);
        }
        self.values.entry(name).or_default().push(d);
    }

    fn median(&self, name: &str) -> Duration {
        median(&self.values[name])
    }
}

/// Everything a raw boot made, undone on drop (also when the bench panics).
struct RawGuest {
    dir: PathBuf,
    tap: Option<String>,
    qemu: Option<Child>,
}

impl RawGuest {
    fn teardown(&mut self) {
        if let Some(mut child) = self.qemu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(tap) = self.tap.take() {
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn check_alive(&mut self) {
        if let Some(child) = self.qemu.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("raw QEMU exited with {status}; log:\n{}", self.log_tail());
        }
    }
}

impl Drop for RawGuest {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The test environment's own bridge and network (see `TestEnv::real`) as the raw guest uses
/// them: the gateway is the bridge's address, the guest's address is far above those the
/// daemon hands out (lowest free first), the tap is named after the network number.
struct RawNet {
    bridge: String,
    prefix_len: u8,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
    tap: String,
}

impl RawNet {
    fn of(env: &TestEnv) -> RawNet {
        let (bridge, cidr) = env.network().expect("a real environment has a network");
        let (base, prefix) = cidr.split_once('/').expect("CIDR");
        let base: Ipv4Addr = base.parse().expect("CIDR address");
        let prefix_len: u8 = prefix.parse().expect("CIDR prefix");
        assert!(
            prefix_len <= 24,
            "{cidr} is too small for the raw guest's .200"
        );
        let host = |n: u32| Ipv4Addr::from(u32::from(base) + n);
        let n = base.octets()[2];
        RawNet {
            bridge,
            prefix_len,
            gateway: host(1),
            ip: host(200),
            tap: format!("bgtbench{n}"),
        }
    }
}

/// What the raw side boots: the artifacts the daemon provisioned.
struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
    image: PathBuf,
    user_key: PathBuf,
    user_pub: String,
    qemu: Qemu,
    net: RawNet,
}

fn artifacts(env: &TestEnv) -> Artifacts {
    let show = |req: Request| env.request(&req).ok();
    let kernel: KernelRecord = serde_json::from_value(show(Request::KernelShow(NameParams {
        name: banger_config::Config::DEFAULT_KERNEL.into(),
    })))
    .expect("kernel.show result");
    let image: ImageRecord = serde_json::from_value(show(Request::ImageShow(NameParams {
        name: banger_config::Config::DEFAULT_IMAGE.into(),
    })))
    .expect("image.show result");
    // The daemon boots the kernel's own initrd if it has one, else banger's initramfs, built
    // once and cached next to the kernel.
    let initrd = kernel.initrd.clone().unwrap_or_else(|| {
        let dir = kernel.vmlinux.parent().expect("kernel dir");
        std::fs::read_dir(dir)
            .expect("kernel dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with("initramfs-") && name.ends_with(".cpio")
            })
            .unwrap_or_else(|| panic!("no cached initramfs-*.cpio in {}", dir.display()))
    });
    let user_key = env.state_dir().join("ssh/id_ed25519");
    let user_pub = std::fs::read_to_string(user_key.with_extension("pub"))
        .expect("the user key exists after the warm-up")
        .trim()
        .to_string();
    let bin = Qemu::find_binary().expect("qemu-system-x86_64");
    let qemu = Qemu::new(bin, detect_accel().accel).expect("qemu backend");
    Artifacts {
        kernel: kernel.vmlinux,
        initrd,
        image: image.rootfs,
        user_key,
        user_pub,
        qemu,
        net: RawNet::of(env),
    }
}

/// A sparse file of `size` formatted as the daemon formats its disks.
fn make_disk(path: &Path, size: u64, label: &str) {
    std::fs::File::create_new(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q", "-L", label, "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0")
        .arg(path));
}

fn ext4_uuid(path: &Path) -> String {
    banger_guest::read_ext4_uuid(path)
        .expect("read ext4 uuid")
        .unwrap_or_else(|| panic!("{} is not ext4", path.display()))
}

/// The host's nameservers a guest can reach (as the daemon hands them out).
fn nameservers() -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|s| s.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    v.truncate(3);
    v
}

/// Whether sshd answers on `addr` (reads the `SSH-` banner), with the daemon's timeouts.
fn ssh_banner(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

fn ssh_true(info: &SshInfo) -> bool {
    Command::new("ssh")
        .args(info.ssh_args(false, 10, &["true".to_string()]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Reads QMP lines until the answer to the last command (events are skipped).
fn qmp_answer(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        if line.contains("\"return\"") || line.contains("\"QMP\"") {
            return line;
        }
        assert!(!line.contains("\"error\""), "QMP error: {line}");
    }
}

/// One raw boot: prep, launch, boot to the banner, ssh `true`, teardown.
fn raw_iteration(env: &TestEnv, a: &Artifacts, i: usize, ph: &mut Phases) {
    let dir = env.root().join(format!("raw{i}"));
    let mut g = RawGuest {
        dir: dir.clone(),
        tap: None,
        qemu: None,
    };
    let net = &a.net;
    let _ = Command::new("ip").args(["link", "del", &net.tap]).output();

    // Disk prep: what the daemon does between allocate and preflight.
    let t0 = Instant::now();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .expect("raw dir");
    }
    let (upper, work) = (dir.join("root.ext4"), dir.join("work.ext4"));
    make_disk(&upper, UPPER_DISK_BYTES, "banger-upper");
    make_disk(&work, WORK_DISK_BYTES, "banger-work");
    let host_key = dir.join("ssh_host_ed25519_key");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger-vm", "-f"])
        .arg(&host_key));
    let host_priv = std::fs::read_to_string(&host_key).expect("host key");
    let host_pub = std::fs::read_to_string(host_key.with_extension("pub"))
        .expect("host key pub")
        .trim()
        .to_string();
    let known_hosts = dir.join("known_hosts");
    let key_words: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    std::fs::write(
        &known_hosts,
        format!("{} {}\n", net.ip, key_words.join(" ")),
    )
    .unwrap();
    let t1 = Instant::now();

    // Start prep: the config disk and the network, as in the daemon's start steps.
    let mac = MacAddr::for_vm(RAW_NAME).to_string();
    let mut machine_id = String::new();
    while machine_id.len() < 32 {
        machine_id.push_str(banger_core::VmId::generate().as_str());
    }
    machine_id.truncate(32);
    let config = GuestConfig {
        v: banger_guest::config::CONFIG_VERSION,
        hostname: RAW_NAME.into(),
        machine_id,
        root: RootLayout::Overlay {
            lower_uuid: ext4_uuid(&a.image),
            upper_uuid: ext4_uuid(&upper),
        },
        work_uuid: Some(ext4_uuid(&work)),
        network: Some(NetworkConfig {
            mac: mac.clone(),
            address: net.ip,
            prefix_len: net.prefix_len,
            gateway: net.gateway,
            dns: nameservers(),
        }),
        ssh: Some(SshIdentity {
            host_key_ed25519: host_priv,
            host_key_ed25519_pub: host_pub.clone(),
            authorized_keys: vec![a.user_pub.clone()],
        }),
        files: Vec::new(),
        init: None,
        init_mode: Default::default(),
        ssh_server: Default::default(),
        env: Vec::new(),
        workdir: None,
        modules: None,
    };
    let config_disk = dir.join("config.img");
    banger_guest::write_config_disk(&config_disk, &config).expect("write config disk");
    let tap = TapName::parse(&net.tap).expect("tap name");
    run(Command::new("ip").args([
        "tuntap",
        "add",
        "dev",
        tap.as_str(),
        "mode",
        "tap",
        "vnet_hdr",
    ]));
    g.tap = Some(tap.as_str().to_string());
    run(Command::new("ip").args(["link", "set", tap.as_str(), "master", &net.bridge, "up"]));
    let _ = Command::new("ip")
        .args([
            "neigh",
            "flush",
            "to",
            &net.ip.to_string(),
            "dev",
            &net.bridge,
        ])
        .output();
    let spec = LaunchSpec {
        vm_id: RAW_NAME.into(),
        run_dir: dir.clone(),
        log_path: dir.join("vmm.log"),
        log_max_bytes: banger_vmm::DEFAULT_LOG_MAX_BYTES,
        vcpu: VCPU,
        memory_mib: MEMORY_MIB,
        kernel: a.kernel.clone(),
        initrd: Some(a.initrd.clone()),
        boot_args: format!(
            "console=ttyS0 reboot=k panic=1 pci=off loglevel=4 banger.name={RAW_NAME}"
        ),
        drives: vec![
            DriveSpec {
                id: "image".into(),
                path: a.image.clone(),
                read_only: true,
            },
            DriveSpec {
                id: "root".into(),
                path: upper,
                read_only: false,
            },
            DriveSpec {
                id: "work".into(),
                path: work,
                read_only: false,
            },
            DriveSpec {
                id: "config".into(),
                path: config_disk,
                read_only: true,
            },
        ],
        net: Some(NetSpec {
            tap_fd: None,
            tap: tap.as_str().to_string(),
            mac,
        }),
        vsock: None,
    };
    validate_spec(&spec).expect("valid launch spec");
    let argv = a.qemu.argv(&spec);
    let t2 = Instant::now();

    // Launch: QEMU paused (-S), its QMP socket up, `cont`.
    let log = std::fs::File::create(&spec.log_path).expect("vmm log");
    let child = Command::new(a.qemu.bin())
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn qemu");
    g.qemu = Some(child);
    let socket = dir.join(QMP_SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            break s;
        }
        g.check_alive();
        assert!(Instant::now() < deadline, "no QMP socket after 10s");
        std::thread::sleep(Duration::from_millis(10));
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    qmp_answer(&mut reader);
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    qmp_answer(&mut reader);
    writer.write_all(b"{\"execute\":\"cont\"}\n").unwrap();
    qmp_answer(&mut reader);
    let t3 = Instant::now();

    // Boot to sshd.
    let addr = SocketAddr::from((net.ip, 22));
    while !ssh_banner(addr) {
        g.check_alive();
        assert!(
            t3.elapsed() < BOOT_TIMEOUT,
            "raw guest: no ssh banner; log:\n{}",
            g.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t4 = Instant::now();

    // ssh true, strict host key checking against our known_hosts.
    let info = SshInfo {
        id: String::new(),
        name: RAW_NAME.into(),
        ip: net.ip,
        user: "root".into(),
        key: a.user_key.clone(),
        known_hosts,
    };
    while !ssh_true(&info) {
        g.check_alive();
        assert!(
            t3.elapsed() < BOOT_TIMEOUT,
            "raw guest: ssh true never succeeded; log:\n{}",
            g.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t5 = Instant::now();
    drop((writer, reader));
    g.teardown();
    let t6 = Instant::now();

    ph.add("disk prep", t1 - t0);
    ph.add("start prep (config disk, tap)", t2 - t1);
    ph.add("launch (spawn, QMP, cont)", t3 - t2);
    ph.add("boot to sshd banner", t4 - t3);
    ph.add("ssh true", t5 - t4);
    ph.add("teardown (kill, rm)", t6 - t5);
    ph.add("launch -> ssh ready", t5 - t2);
    ph.add("full (prep + boot + true)", t5 - t0);
    ph.add("full + teardown", t6 - t0);
}

/// `vm.create` with timestamped progress, ssh `true`, `vm.delete`.
fn banger_protocol_iteration(env: &TestEnv, i: usize, ph: &mut Phases, steps: &mut Phases) {
    let socket = env.socket();
    let t0 = Instant::now();
    let frames = request_timed(
        &socket,
        &Request::VmCreate(VmCreateParams {
            name: Some(format!("bench-{i}")),
            ..Default::default()
        }),
    );
    let (done, last) = frames.last().expect("frames");
    let vm: VmRecord = match last {
        Frame::Result { result, .. } => serde_json::from_value(result.clone()).expect("vm record"),
        other => panic!("vm.create failed: {other:?}\nlog:\n{}", env.daemon_log()),
    };
    let at = |stage: &str| -> Duration {
        frames
            .iter()
            .find_map(|(t, f)| match f {
                Frame::Progress { stage: s, .. } if s == stage => Some(*t),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {stage} stage in vm.create's frames"))
    };
    let done = *done;
    ph.add("request -> allocate", at("allocate"));
    ph.add("disk prep", at("preflight") - at("allocate"));
    ph.add("start prep", at("vmm_spawn") - at("preflight"));
    ph.add("launch (spawn..boot)", at("guest_ready") - at("vmm_spawn"));
    ph.add("boot to sshd banner", at("ssh") - at("guest_ready"));
    ph.add("ssh ready (-> result)", done - at("ssh"));
    ph.add("create total", done);
    ph.add("launch -> ready", done - at("vmm_spawn"));
    // Every stage on its own: from its frame to the next one.
    for (k, stage) in STAGES.iter().enumerate() {
        let next = STAGES.get(k + 1).map(|s| at(s)).unwrap_or(done);
        steps.add(stage, next - at(stage));
    }

    let t1 = Instant::now();
    let info: SshInfo = serde_json::from_value(
        env.request(&Request::VmSshInfo(VmRef {
            vm: vm.name.to_string(),
        }))
        .ok(),
    )
    .expect("ssh info");
    assert!(ssh_true(&info), "ssh true into {} failed", vm.name);
    let t2 = Instant::now();
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: vm.name.to_string(),
        force: true,
    }))
    .ok();
    let t3 = Instant::now();
    ph.add("ssh_info + ssh true", t2 - t1);
    ph.add("vm.delete", t3 - t2);
    ph.add("create + true + delete", t3 - t0);
}

fn banger_cli_iteration(env: &TestEnv, ph: &mut Phases) {
    let t = Instant::now();
    let o = env.cli(&["vm", "run", "--rm", "--", "true"]);
    let d = t.elapsed();
    assert!(
        o.status.success(),
        "banger vm run failed: {}\n{}\nlog:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        env.daemon_log()
    );
    ph.add("vm run --rm -- true", d);
}

fn print_table(title: &str, ph: &Phases) {
    println!("  {title}");
    for name in &ph.order {
        let v = &ph.values[name];
        let all: Vec<String> = v.iter().map(|d| format!("{:.2}", secs(*d))).collect();
        println!(
            "    {name:<32} {:>8.2} s   [{}]",
            secs(median(v)),
            all.join(", ")
        );
    }
}

/// Prints the ratio of the medians and the median of the per-iteration ratios: each banger run
/// is paired with the raw run next to it in time, which cancels slow drifts in machine load.
fn ratio_line(what: &str, banger: &[Duration], raw: &[Duration]) {
    let (b, r) = (median(banger), median(raw));
    let ratio = secs(b) / secs(r);
    let mut paired: Vec<f64> = banger
        .iter()
        .zip(raw)
        .map(|(b, r)| secs(*b) / secs(*r))
        .collect();
    paired.sort_by(f64::total_cmp);
    let paired = paired[paired.len() / 2];
    println!(
        "    {what:<58} {:>6.2} s / {:>6.2} s = {ratio:.2}x ({:+.0}%), paired {paired:.2}x ({:+.0}%)",
        secs(b),
        secs(r),
        (ratio - 1.0) * 100.0,
        (paired - 1.0) * 100.0
    );
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3)
        .max(1);
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    env.start_daemon();

    // Warm-up: provisions the kernel and the image, builds and caches the initramfs, makes the
    // user's ssh key.
    let t = Instant::now();
    let o = env.cli(&["vm", "run", "--rm", "--", "true"]);
    assert!(
        o.status.success(),
        "warm-up vm run failed: {}\n{}\nlog:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        env.daemon_log()
    );
    println!(
        "warm-up vm run (provisioning included): {:.1} s",
        secs(t.elapsed())
    );
    let a = artifacts(&env);
    println!(
        "raw QEMU: {} ({:?}), kernel {}, initrd {}, image {}",
        a.qemu.bin().display(),
        a.qemu.accel(),
        a.kernel.display(),
        a.initrd.display(),
        a.image.display()
    );

    let mut cli = Phases::default();
    let mut proto = Phases::default();
    let mut steps = Phases::default();
    let mut raw = Phases::default();
    for i in 0..iterations {
        // Alternate the order so neither side always runs on a cache warmed by the other.
        if i % 2 == 0 {
            banger_cli_iteration(&env, &mut cli);
            banger_protocol_iteration(&env, i, &mut proto, &mut steps);
            raw_iteration(&env, &a, i, &mut raw);
        } else {
            raw_iteration(&env, &a, i, &mut raw);
            banger_protocol_iteration(&env, i, &mut proto, &mut steps);
            banger_cli_iteration(&env, &mut cli);
        }
        println!(
            "iteration {}: vm run {:.2} s, vm.create {:.2} s, raw launch->ssh {:.2} s",
            i + 1,
            secs(*cli.values["vm run --rm -- true"].last().unwrap()),
            secs(*proto.values["create total"].last().unwrap()),
            secs(*raw.values["launch -> ssh ready"].last().unwrap()),
        );
    }

    println!();
    println!(
        "vm_run benchmark, {iterations} iterations, QEMU {:?}, {VCPU} vcpu, {MEMORY_MIB} MiB (medians, then each run)",
        a.qemu.accel()
    );
    print_table("banger CLI", &cli);
    print_table("banger via the protocol (vm.create phases)", &proto);
    print_table(
        "banger vm.create, each stage (stage frame -> next frame)",
        &steps,
    );
    print_table("raw QEMU, no daemon", &raw);
    println!("  ratios (banger / raw, medians)");
    ratio_line(
        "vm.create -> ready vs raw launch -> ssh ready",
        &proto.values["create total"],
        &raw.values["launch -> ssh ready"],
    );
    ratio_line(
        "vm.create launch -> ready vs raw launch -> ssh ready",
        &proto.values["launch -> ready"],
        &raw.values["launch -> ssh ready"],
    );
    ratio_line(
        "vm.create -> ready vs raw prep + launch -> ssh ready",
        &proto.values["create total"],
        &raw.values["full (prep + boot + true)"],
    );
    ratio_line(
        "vm run --rm -- true vs raw (prep + boot + true)",
        &cli.values["vm run --rm -- true"],
        &raw.values["full (prep + boot + true)"],
    );
    ratio_line(
        "vm run --rm -- true vs raw (prep + boot + true + teardown)",
        &cli.values["vm run --rm -- true"],
        &raw.values["full + teardown"],
    );
    // The guest's boot and its sshd are the same work on both sides and dominate under TCG,
    // where a busy machine moves them by seconds: the host-side rest is the daemon's cost.
    let host_side = |ph: &Phases, total: &str, guest: &[&str]| -> Vec<Duration> {
        (0..iterations)
            .map(|k| {
                let g: Duration = guest.iter().map(|n| ph.values[n][k]).sum();
                ph.values[total][k].saturating_sub(g)
            })
            .collect()
    };
    ratio_line(
        "host-side work only (all but boot to sshd and ssh true)",
        &host_side(
            &proto,
            "create total",
            &["boot to sshd banner", "ssh ready (-> result)"],
        ),
        &host_side(
            &raw,
            "full (prep + boot + true)",
            &["boot to sshd banner", "ssh true"],
        ),
    );
    let phase_pairs = [
        ("disk prep", "disk prep", "disk prep"),
        ("start prep", "start prep", "start prep (config disk, tap)"),
        (
            "launch",
            "launch (spawn..boot)",
            "launch (spawn, QMP, cont)",
        ),
        ("boot to sshd", "boot to sshd banner", "boot to sshd banner"),
        ("ssh ready", "ssh ready (-> result)", "ssh true"),
    ];
    println!("  per phase (banger - raw, medians)");
    for (label, b, r) in phase_pairs {
        let (b, r) = (proto.median(b), raw.median(r));
        println!(
            "    {label:<14} {:>6.2} s vs {:>6.2} s  ({:+.2} s)",
            secs(b),
            secs(r),
            secs(b) - secs(r)
        );
    }

    let strays = env.stray_processes();
    let taps = bridge_ports(&a.net.bridge);
    if !strays.is_empty() || !taps.is_empty() {
        println!("WARNING: left behind: processes {strays:?}, taps {taps:?}");
    }
    env.stop_daemon();
}
