//! Finding the test prerequisites and running QEMU with a deadline.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const AGENT_BUILD: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p banger-agent --release --target x86_64-unknown-linux-gnu";

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Whether the ELF at `path` needs no dynamic loader.
pub fn is_static_elf(path: &Path) -> bool {
    matches!(
        banger_sys::elf::x86_64_linkage(path),
        Ok(banger_sys::elf::Linkage::Static)
    )
}

#[derive(Debug)]
pub struct Prereqs {
    pub qemu: PathBuf,
    pub mkfs: PathBuf,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
    pub agent: PathBuf,
}

/// Everything a boot test needs, or the reason to skip.
pub fn prereqs() -> Result<Prereqs, String> {
    let qemu = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not installed")?;
    let mkfs = which("mkfs.ext4").ok_or("mkfs.ext4 not installed")?;
    let kdir = std::env::var_os("BANGER_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .ok_or(
            "BANGER_TEST_KERNEL_DIR not set (a dir with vmlinux or vmlinuz and modules/load-order)",
        )?;
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|n| kdir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no vmlinux or vmlinuz in {}", kdir.display()))?;
    let modules = kdir.join("modules");
    if !modules.join("load-order").is_file() {
        return Err(format!("{} has no load-order file", modules.display()));
    }
    let busybox = std::env::var_os("BANGER_TEST_BUSYBOX")
        .map(PathBuf::from)
        .or_else(|| Some(kdir.join("busybox")).filter(|p| p.is_file()))
        .or_else(|| which("busybox"))
        .filter(|p| is_static_elf(p))
        .ok_or("no static busybox (set BANGER_TEST_BUSYBOX; `apt-get download busybox-static`)")?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let agent = std::env::var_os("BANGER_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("x86_64-unknown-linux-gnu/release/banger-agent"));
    if !agent.is_file() {
        return Err(format!(
            "no static agent at {}; build it with: {AGENT_BUILD}",
            agent.display()
        ));
    }
    if !is_static_elf(&agent) {
        return Err(format!(
            "{} is not statically linked; build it with: {AGENT_BUILD}",
            agent.display()
        ));
    }
    Ok(Prereqs {
        qemu,
        mkfs,
        kernel,
        modules,
        busybox,
        agent,
    })
}

/// A drive for QEMU, in attach order.
pub struct Drive<'a> {
    pub path: &'a Path,
    pub read_only: bool,
}

#[derive(Debug)]
pub struct BootLog {
    /// Console lines with the time since QEMU was started.
    pub lines: Vec<(Duration, String)>,
    /// Whether QEMU exited on its own (guest power-off) before the deadline.
    pub exited: bool,
}

impl BootLog {
    pub fn text(&self) -> String {
        self.lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }
    /// The first line containing `needle`, with its time.
    pub fn find(&self, needle: &str) -> Option<(Duration, &str)> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, l)| (*t, l.as_str()))
    }
    /// The rest of the first line after `prefix`.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|(_, l)| l.find(prefix).map(|i| l[i + prefix.len()..].trim()))
    }
}

/// Boots QEMU microvm/TCG with `initrd`, the drives and a user-mode NIC with `mac`, and collects
/// the serial console until QEMU exits or `deadline` passes (then it is killed).
pub fn boot(
    p: &Prereqs,
    initrd: &Path,
    drives: &[Drive<'_>],
    mac: &str,
    deadline: Duration,
) -> BootLog {
    spawn_vm(p, initrd, drives, mac, None).wait(deadline)
}

/// A QEMU process whose console is being collected.
pub struct Vm {
    child: std::process::Child,
    start: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// Whether a console line containing `needle` appears within `timeout`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|(_, l)| l.contains(needle))
            {
                return true;
            }
            if self.child.try_wait().ok().flatten().is_some() {
                // Exited: the readers drain what is left.
                std::thread::sleep(Duration::from_millis(200));
                return self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(_, l)| l.contains(needle));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn console(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }

    /// Waits for QEMU to exit (killing it after `deadline` from its start) and returns the
    /// console.
    pub fn wait(mut self, deadline: Duration) -> BootLog {
        let mut exited = false;
        while self.start.elapsed() < deadline {
            if self.child.try_wait().expect("waiting for qemu").is_some() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        for (t, l) in &lines {
            eprintln!("[{:>7.3}] {l}", t.as_secs_f64());
        }
        BootLog { lines, exited }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts QEMU like [`boot`]; with `ssh_port`, host 127.0.0.1:`ssh_port` is forwarded to the
/// guest's port 22.
pub fn spawn_vm(
    p: &Prereqs,
    initrd: &Path,
    drives: &[Drive<'_>],
    mac: &str,
    ssh_port: Option<u16>,
) -> Vm {
    let mut cmd = Command::new(&p.qemu);
    cmd.args([
        "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&p.kernel)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 panic=-1 tsc_early_khz=2000000 tsc=reliable",
    ]);
    for (i, d) in drives.iter().enumerate() {
        let ro = if d.read_only { ",readonly=on" } else { "" };
        cmd.arg("-drive")
            .arg(format!(
                "id=d{i},file={},format=raw,if=none{ro}",
                d.path.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive=d{i}"));
    }
    let fwd = ssh_port.map_or(String::new(), |port| {
        format!(",hostfwd=tcp:127.0.0.1:{port}-:22")
    });
    cmd.arg("-netdev")
        .arg(format!("user,id=n0{fwd}"))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=n0,mac={mac}"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawning qemu");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream)
                .split(b'\n')
                .map_while(Result::ok)
            {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                lines.lock().unwrap().push((start.elapsed(), line));
            }
        }));
    }
    Vm {
        child,
        start,
        lines,
        readers,
    }
}

pub fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

pub fn mkfs(p: &Prereqs, path: &Path, size: u64, uuid: &str, content: Option<&Path>) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let mut cmd = Command::new(&p.mkfs);
    cmd.args([
        "-F",
        "-q",
        "-U",
        uuid,
        "-E",
        "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
    ]);
    if let Some(dir) = content {
        cmd.arg("-d").arg(dir);
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
