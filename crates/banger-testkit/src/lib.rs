//! Test infrastructure shared by banger's integration tests and benchmarks.
//!
//! [`TestEnv`] is a throw-away banger installation in a temp dir: its own config, state and
//! runtime dirs, the fake Firecracker as VMM, a control file to inject VMM failures, and helpers
//! to run `bangerd` and `banger` against it. Dropping it stops the daemon and kills every
//! process that still references the temp dir, so a failed test leaks nothing.

pub mod http;
pub mod layers;

pub mod registry;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger_core::OpId;
use banger_protocol::{Envelope, Frame, PROTOCOL_VERSION, Request};

/// The directory holding the workspace's built binaries (`target/debug`), derived from the
/// running test executable (`target/debug/deps/it-…`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A workspace binary, failing loudly (not skipping) when it was not built: CI runs
/// `cargo test --workspace`, which builds every binary.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --workspace)",
        p.display()
    );
    p
}

/// Reserves a network number for a real-guest environment, so that environments running at
/// the same time (parallel tests, a benchmark, CI) never share a bridge or an address range:
/// an flock on `/var/tmp/banger-test-net-<N>.lock`, held for the environment's life.
fn claim_test_network() -> (std::fs::File, u8) {
    use std::os::fd::AsRawFd;
    for n in 1u8..=250 {
        let path = format!("/var/tmp/banger-test-net-{n}.lock");
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // A bridge of that number left by a killed run still has its VMs' addresses.
            if Path::new(&format!("/sys/class/net/br-banger-t{n}")).exists() {
                continue;
            }
            return (f, n);
        }
    }
    panic!("no free test network (all 250 locks in /var/tmp are held)");
}

/// A minimal static x86-64 ELF executable: one PT_LOAD segment whose code is `exit(1)`.
pub fn tiny_static_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let code: [u8; 12] = [
        0xb8, 0x3c, 0, 0, 0, // mov eax, 60 (exit)
        0xbf, 1, 0, 0, 0, // mov edi, 1
        0x0f, 0x05, // syscall
    ];
    let size = 64 + 56 + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + 120).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0u64, BASE, BASE, size, size, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

/// The static guest agent built for the real-guest tests (see `TestEnv::real`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BANGER_AGENT_BIN") {
        return PathBuf::from(p);
    }
    // target/debug -> target/x86_64-unknown-linux-gnu/release/banger-agent
    let target = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    target.join("x86_64-unknown-linux-gnu/release/banger-agent")
}

/// Whether a program is installed (PATH plus the sbin dirs).
pub fn have_program(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(name).is_file())
}

/// One answer from the daemon: every frame, the final one last.
#[derive(Debug, Clone)]
pub struct Reply {
    pub frames: Vec<Frame>,
}

impl Reply {
    pub fn last(&self) -> &Frame {
        self.frames.last().expect("at least one frame")
    }

    /// The result value, panicking with the error if the request failed.
    pub fn ok(&self) -> serde_json::Value {
        match self.last() {
            Frame::Result { result, .. } => result.clone(),
            other => panic!("expected a result, got {other:?}"),
        }
    }

    /// The error code and message, panicking if the request succeeded.
    pub fn err(&self) -> (banger_core::ErrorCode, String) {
        match self.last() {
            Frame::Error { code, message, .. } => (*code, message.clone()),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub fn stages(&self) -> Vec<String> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Progress { stage, .. } => Some(stage.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Sends raw bytes as a request and reads frames until the final one or EOF.
pub fn raw_request(socket: &Path, bytes: &[u8]) -> std::io::Result<Vec<Frame>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(bytes)?;
    let mut frames = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line?;
        let f: Frame = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("bad frame {line:?}: {e}")))?;
        let last = f.is_final();
        frames.push(f);
        if last {
            break;
        }
    }
    Ok(frames)
}

/// Sends a typed request.
pub fn request(socket: &Path, req: &Request) -> Reply {
    let op = OpId::generate();
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id: &op,
        request: req,
    }
    .to_line();
    let frames = raw_request(socket, line.as_bytes()).expect("daemon request");
    assert!(!frames.is_empty(), "no answer to {req:?}");
    Reply { frames }
}

/// Sends a typed request and returns every frame with the moment it arrived, measured from just
/// before connecting, the final frame last: a long operation's progress stages become phase
/// timings (benchmarks). Panics when the daemon cannot be reached or sends a bad frame.
pub fn request_timed(socket: &Path, req: &Request) -> Vec<(Duration, Frame)> {
    let op = OpId::generate();
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id: &op,
        request: req,
    }
    .to_line();
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).expect("connect to the daemon");
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .expect("set read timeout");
    s.write_all(line.as_bytes()).expect("send request");
    let mut frames = Vec::new();
    let mut reader = BufReader::new(s);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).expect("read frame");
        let at = started.elapsed();
        if n == 0 {
            break;
        }
        let f: Frame = serde_json::from_str(buf.trim_end())
            .unwrap_or_else(|e| panic!("bad frame {buf:?}: {e}"));
        let last = f.is_final();
        frames.push((at, f));
        if last {
            break;
        }
    }
    assert!(!frames.is_empty(), "no answer to {req:?}");
    frames
}

/// A banger installation in a temp dir.
#[derive(Debug)]
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The fake Firecracker's control file (see the fake-firecracker crate).
    pub control: PathBuf,
    /// Where the fake records every API call.
    pub record: PathBuf,
    daemon: Option<Child>,
    /// A real environment's network number and the lock that reserves it.
    net: Option<(u8, std::fs::File)>,
    /// (uid, gid) the daemon and the CLI run as, via `setpriv`; `None`: this process's.
    run_as: Option<(u32, u32)>,
}

impl TestEnv {
    /// A new environment using the fake Firecracker, with `extra` (top-level keys first, then
    /// any tables) added to its config before its `[vm_defaults]` table.
    pub fn new(extra: &str) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("bgt")
            .tempdir_in(
                std::env::var_os("BANGER_TEST_TMP")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir),
            )
            .expect("tempdir");
        let root = dir.path();
        let config = root.join("config.toml");
        let text = format!(
            "state_dir = \"{s}\"\nruntime_dir = \"{r}\"\ncache_dir = \"{c}\"\nvmm = \"firecracker\"\nnetwork = \"none\"\nfirecracker_bin = \"{fc}\"\nlog_level = \"debug\"\nstop_timeout_secs = 5\ndefault_image = \"test-image\"\ndefault_kernel = \"test-kernel\"\nagent_bin = \"{agent}\"\n{extra}\n[vm_defaults]\nvcpu = 1\nmemory_mib = 256\nwork_disk_size = \"256M\"\n",
            s = root.join("state").display(),
            r = root.join("run").display(),
            c = root.join("cache").display(),
            fc = bin("fake-firecracker").display(),
            agent = root.join("fake-agent").display(),
        );
        // The fake VMM boots nothing, so the agent banger puts in its initramfs is the
        // smallest static x86-64 ELF (it exits 1), enough for banger's static-agent check; the
        // initramfs is still really built.
        std::fs::write(root.join("fake-agent"), tiny_static_elf()).expect("write fake agent");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                root.join("fake-agent"),
                std::fs::Permissions::from_mode(0o755),
            )
            .expect("chmod fake agent");
        }
        std::fs::write(&config, text).expect("write config");
        TestEnv {
            control: root.join("fc-control.json"),
            record: root.join("fc-calls.jsonl"),
            config,
            dir,
            daemon: None,
            net: None,
            run_as: None,
        }
    }

    /// An environment that boots real guests under QEMU: real kernel and image (pulled and
    /// built on first use), a bridge and address range of its own so it never meets a user's
    /// banger, the static agent from the workspace build. `None` (after printing `SKIP: why`)
    /// when this machine cannot: not root, no QEMU, no mmdebstrap, no static agent.
    pub fn real(extra: &str) -> Option<TestEnv> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: real-guest tests need root (bridge, taps, mmdebstrap)");
            return None;
        }
        for (prog, pkg) in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("mmdebstrap", "mmdebstrap"),
            ("ssh", "openssh-client"),
            ("nft", "nftables"),
        ] {
            if !have_program(prog) {
                println!("SKIP: {prog} is not installed (apt-get install {pkg})");
                return None;
            }
        }
        let agent = agent_bin();
        if !agent.is_file() {
            println!(
                "SKIP: {} is missing; build it with: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p banger-agent --release --target x86_64-unknown-linux-gnu",
                agent.display()
            );
            return None;
        }
        let (net_lock, n) = claim_test_network();
        let dir = tempfile::Builder::new()
            .prefix("bgr")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let root = dir.path();
        let config = root.join("config.toml");
        let text = format!(
            "state_dir = \"{s}\"\nruntime_dir = \"{r}\"\ncache_dir = \"{c}\"\n{vmm}agent_bin = \"{agent}\"\nlog_level = \"debug\"\nbridge_name = \"br-banger-t{n}\"\nbridge_cidr = \"172.31.{n}.0/24\"\nstop_timeout_secs = 20\nboot_timeout_secs = 240\n{extra}\n[vm_defaults]\nvcpu = 2\nmemory_mib = 1024\nwork_disk_size = \"2G\"\n",
            // QEMU unless the caller picks the backend (top-level keys come before tables).
            vmm = if extra.contains("vmm =") {
                ""
            } else {
                "vmm = \"qemu\"\n"
            },
            s = root.join("state").display(),
            r = root.join("run").display(),
            c = root.join("cache").display(),
            agent = agent.display(),
        );
        std::fs::write(&config, text).expect("write config");
        Some(TestEnv {
            control: root.join("fc-control.json"),
            record: root.join("fc-calls.jsonl"),
            config,
            dir,
            daemon: None,
            net: Some((n, net_lock)),
            run_as: None,
        })
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A real environment's bridge (`br-banger-t<N>`) and CIDR (`172.31.<N>.0/24`).
    pub fn network(&self) -> Option<(String, String)> {
        self.net
            .as_ref()
            .map(|(n, _)| (format!("br-banger-t{n}"), format!("172.31.{n}.0/24")))
    }

    /// The `$HOME` the daemon and CLI of this environment see (for `~/` in the config).
    pub fn home(&self) -> PathBuf {
        let h = self.root().join("home");
        let _ = std::fs::create_dir_all(&h);
        h
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.root().join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("bangerd.sock")
    }

    /// Writes the fake Firecracker's control file (read at each API call).
    pub fn set_control(&self, json: serde_json::Value) {
        let mut v = json;
        if v.get("record").is_none() {
            v["record"] = serde_json::Value::String(self.record.display().to_string());
        }
        std::fs::write(&self.control, serde_json::to_vec(&v).unwrap()).expect("write control");
    }

    /// Runs the daemon and the CLI of this environment as `uid`:`gid` (no supplementary
    /// groups, no capabilities) from now on, and gives that user the environment's files.
    pub fn run_as(&mut self, uid: u32, gid: u32) {
        let st = Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(self.root())
            .status()
            .expect("chown");
        assert!(
            st.success(),
            "chown -R {uid}:{gid} {}",
            self.root().display()
        );
        self.run_as = Some((uid, gid));
    }

    /// `program` as a command, wrapped in `setpriv` when the environment runs as another user.
    fn command_for(&self, program: PathBuf) -> Command {
        match self.run_as {
            None => Command::new(program),
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &gid.to_string(),
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--",
                ])
                .arg(program);
                c
            }
        }
    }

    /// A `bangerd` command for this environment (not started).
    pub fn daemon_command(&self) -> Command {
        let mut c = self.command_for(bin("bangerd"));
        c.env("BANGER_CONFIG", &self.config)
            .env("HOME", self.home())
            .env("FAKE_FIRECRACKER_CONTROL", &self.control)
            .env("FAKE_FIRECRACKER_RECORD", &self.record)
            .env_remove("BANGER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Starts the daemon and waits until it answers `ping`.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already started");
        let child = self.daemon_command().spawn().expect("spawn bangerd");
        self.daemon = Some(child);
        self.wait_ready();
    }

    /// Starts the daemon with extra environment variables (e.g. failpoints) and waits until it
    /// answers `ping`.
    pub fn start_daemon_with_env(&mut self, vars: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "daemon already started");
        let mut cmd = self.daemon_command();
        cmd.envs(vars.iter().copied());
        self.daemon = Some(cmd.spawn().expect("spawn bangerd"));
        self.wait_ready();
    }

    /// Waits up to `timeout` for the daemon to exit on its own and reaps it: its exit status,
    /// or `None` if it is still running (it is left running) or was never started.
    pub fn wait_daemon_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.daemon.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.daemon = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(frames) = raw_request(&self.socket(), b"{\"v\":1,\"method\":\"ping\"}\n")
                && matches!(frames.last(), Some(Frame::Result { .. }))
            {
                return;
            }
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("bangerd exited with {status}; log:\n{}", self.daemon_log());
            }
            assert!(
                Instant::now() < deadline,
                "bangerd did not come up; log:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL (VMs keep running) and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the daemon to stop and waits for it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = raw_request(
                &self.socket(),
                b"{\"v\":1,\"method\":\"daemon.shutdown\"}\n",
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("bangerd.log")).unwrap_or_default()
    }

    pub fn request(&self, req: &Request) -> Reply {
        request(&self.socket(), req)
    }

    /// Runs the `banger` CLI against this environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command_for(bin("banger"))
            .args(args)
            .env("BANGER_CONFIG", &self.config)
            .env("HOME", self.home())
            .env("FAKE_FIRECRACKER_CONTROL", &self.control)
            .env("FAKE_FIRECRACKER_RECORD", &self.record)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run banger")
    }

    /// Creates a dummy kernel dir (ELF magic and a version banner: enough for the fake VMM) and
    /// a real, small ext4 root filesystem, and registers both as the config's defaults.
    pub fn seed_artifacts(&self) {
        let kdir = self.root().join("kernel-src");
        std::fs::create_dir_all(&kdir).unwrap();
        let mut vmlinux = b"\x7fELF\x02\x01\x01".to_vec();
        vmlinux.resize(4096, 0);
        vmlinux.extend_from_slice(b"Linux version 6.1.0-test (banger@test) #1 SMP\0");
        std::fs::write(kdir.join("vmlinux"), vmlinux).unwrap();
        std::fs::write(kdir.join("initrd.img"), b"070701fake-initrd").unwrap();
        let rootfs = self.root().join("rootfs.ext4");
        make_ext4(&rootfs, 32);
        self.request(&Request::KernelImport(
            banger_protocol::KernelImportParams {
                name: "test-kernel".into(),
                dir: kdir,
            },
        ))
        .ok();
        self.request(&Request::ImageRegister(
            banger_protocol::ImageRegisterParams {
                name: "test-image".into(),
                rootfs,
                kernel: None,
            },
        ))
        .ok();
    }

    /// Processes (other than the daemon) whose command line mentions this environment: after
    /// a test has deleted or stopped everything, there must be none.
    pub fn stray_processes(&self) -> Vec<(i32, String)> {
        let daemon_pid = self.daemon.as_ref().map(|c| c.id() as i32);
        processes_mentioning(self.root())
            .into_iter()
            .filter(|(pid, _)| Some(*pid) != daemon_pid)
            .collect()
    }

    /// Files left under the runtime dir's per-VM area and the state dir's VM area.
    pub fn vm_leftovers(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in [self.runtime_dir().join("vms"), self.state_dir().join("vms")] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill_daemon();
        for (pid, _) in processes_mentioning(self.root()) {
            // SAFETY: kill(2) on processes whose command line names our private temp dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Taps of VMs a failed test left behind (their names are in the handles files).
        for tap in self.recorded_taps() {
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
        }
        if let Some((bridge, _)) = self.network() {
            let _ = Command::new("ip").args(["link", "del", &bridge]).output();
            // The environment's own nftables table (named after its bridge).
            if let Some(suffix) = bridge.strip_prefix("br-banger-") {
                let _ = Command::new("nft")
                    .args(["delete", "table", "ip", &format!("banger_{suffix}")])
                    .output();
            }
        }
    }
}

impl TestEnv {
    /// Tap names recorded in this environment's handles files.
    pub fn recorded_taps(&self) -> Vec<String> {
        let mut taps = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.state_dir().join("vms")) {
            for e in rd.flatten() {
                let Ok(text) = std::fs::read_to_string(e.path().join("handles.json")) else {
                    continue;
                };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                    && let Some(t) = v["tap"].as_str()
                {
                    taps.push(t.to_string());
                }
            }
        }
        taps
    }
}

/// Host interfaces attached to `bridge` (a test environment's taps).
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", bridge])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// The text of `nft list table ip <table>` of the installation whose bridge is `bridge`
/// (`banger` for `br-banger`, `banger_<suffix>` for `br-banger-<suffix>`); empty when there is
/// no table.
pub fn nft_banger_table(bridge: &str) -> String {
    let table = match bridge.strip_prefix("br-banger-") {
        Some(suffix) => format!("banger_{suffix}"),
        None => "banger".to_string(),
    };
    Command::new("nft")
        .args(["-a", "list", "table", "ip", &table])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Every file below `dir` (recursively; an unreadable or missing dir gives nothing): leftover
/// checks look for partial downloads and scratch files with it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Makes a real ext4 image of `mib` MiB with a marker file, without root (mkfs.ext4 -d).
pub fn make_ext4(path: &Path, mib: u64) {
    let src = path.with_extension("d");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "image\n").unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.ext4");
    let out = Command::new(mkfs)
        .args(["-F", "-q", "-d"])
        .arg(&src)
        .arg(path)
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pids and command lines of processes whose argv mentions `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<(i32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) {
            // Zombies have an empty cmdline, so anything here is really running.
            out.push((pid, cmd.trim().to_string()));
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}
