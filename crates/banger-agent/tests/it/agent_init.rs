//! Real boots of images without an init system or sshd: the agent stays PID 1 and serves ssh
//! itself (reached through QEMU's user-mode port forwarding with the real OpenSSH client), or
//! forks its ssh server before exec'ing the image's init.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use banger_guest::{GuestConfig, InitMode, NetworkConfig, RootLayout, SshIdentity, SshServer};

use crate::sshd::{Server, keygen, run_with, text};
use crate::support::{self, Drive, mkfs, spawn_vm, which};

const LOWER: &str = "7f3d4e5f-6071-4283-9d9e-0f1a2b3c4d5e";
const UPPER: &str = "8a4e5f60-7182-4394-aeaf-1a2b3c4d5e6f";
const WORK: &str = "9b5f6071-8293-44a5-bfb0-2b3c4d5e6f70";
const MAC: &str = "52:54:00:12:34:57";
const DEADLINE: Duration = Duration::from_secs(240);

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "grep", "hostname", "ls", "poweroff", "sync", "sleep", "kill", "id",
    "tty", "stty", "wc", "pwd", "mount", "tr",
];

struct Setup {
    p: support::Prereqs,
    ssh: Server,
    initrd: PathBuf,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    identity: SshIdentity,
}

fn setup(init_script: Option<&str>) -> Option<Setup> {
    let p = match support::prereqs() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return None;
        }
    };
    if which("ssh").is_none() || which("ssh-keygen").is_none() {
        eprintln!("SKIP: the OpenSSH client is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let initrd = d.join("initrd.cpio");
    banger_guest::build_initramfs(&p.agent, Some(&p.modules), &initrd).unwrap();

    // An image like an OCI busybox/alpine: a shell, /etc/passwd, no init, no sshd.
    let root = d.join("rootfs");
    for sub in [
        "bin", "etc", "root", "proc", "sys", "dev", "run", "tmp", "srv",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(&p.busybox, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    if let Some(script) = init_script {
        std::fs::create_dir_all(root.join("sbin")).unwrap();
        std::fs::write(root.join("sbin/init"), script).unwrap();
        std::fs::set_permissions(
            root.join("sbin/init"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let lower = d.join("lower.ext4");
    mkfs(&p, &lower, 64 << 20, LOWER, Some(&root));
    let upper = d.join("upper.ext4");
    let work = d.join("work.ext4");
    mkfs(&p, &upper, 128 << 20, UPPER, None);
    mkfs(&p, &work, 64 << 20, WORK, None);

    let host = d.join("host_key");
    let key = d.join("client_key");
    keygen(&host);
    keygen(&key);
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let identity = SshIdentity {
        host_key_ed25519: read(host.clone()),
        host_key_ed25519_pub: read(host.with_extension("pub")).trim().to_string(),
        authorized_keys: vec![read(key.with_extension("pub")).trim().to_string()],
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let known_hosts = d.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}\n", identity.host_key_ed25519_pub),
    )
    .unwrap();
    Some(Setup {
        p,
        ssh: Server {
            port,
            dir,
            key,
            known_hosts,
        },
        initrd,
        lower,
        upper,
        work,
        identity,
    })
}

impl Setup {
    fn config(&self, init_mode: InitMode) -> GuestConfig {
        GuestConfig {
            v: 1,
            hostname: "agentinit".into(),
            machine_id: "b1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
            root: RootLayout::Overlay {
                lower_uuid: LOWER.into(),
                upper_uuid: UPPER.into(),
            },
            work_uuid: Some(WORK.into()),
            network: Some(NetworkConfig {
                mac: MAC.into(),
                address: "10.0.2.15".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.0.2.2".parse().unwrap(),
                dns: vec!["10.0.2.3".parse().unwrap()],
            }),
            ssh: Some(self.identity.clone()),
            files: vec![],
            init: None,
            init_mode,
            ssh_server: SshServer::Agent,
            env: vec!["PATH=/bin".into(), "GREETING=hello from oci".into()],
            workdir: Some("/srv".into()),
            modules: None,
        }
    }

    fn boot(&self, config: &GuestConfig) -> support::Vm {
        let cfg_disk = self.ssh.dir.path().join("config.img");
        let _ = std::fs::remove_file(&cfg_disk);
        banger_guest::write_config_disk(&cfg_disk, config).unwrap();
        let drives = [
            Drive {
                path: &self.lower,
                read_only: true,
            },
            Drive {
                path: &cfg_disk,
                read_only: true,
            },
            Drive {
                path: &self.upper,
                read_only: false,
            },
            Drive {
                path: &self.work,
                read_only: false,
            },
        ];
        spawn_vm(&self.p, &self.initrd, &drives, MAC, Some(self.ssh.port))
    }

    /// Retries until the guest answers ssh. Call it once the guest is up: a connection QEMU's
    /// forwarder accepts before the guest listens is retried with TCP back-off (seconds).
    fn wait_for_ssh(&self, vm: &support::Vm) {
        let start = Instant::now();
        loop {
            let out = self.ssh.run(&["-o", "ConnectTimeout=5"], "true", None);
            if out.status.success() {
                eprintln!("ssh answered after {:.1} s", start.elapsed().as_secs_f64());
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no ssh: {}\nconsole:\n{}",
                text(&out.stderr),
                vm.console()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn run_ok(&self, remote: &str) -> String {
        let out = self.ssh.run(&[], remote, None);
        assert!(
            out.status.success(),
            "{remote}: {out:?}\n{}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

#[test]
fn agent_stays_pid1_serves_ssh_reaps_and_shuts_down_cleanly() {
    let Some(s) = setup(None) else {
        return;
    };
    let config = s.config(InitMode::Agent);
    let mut vm = s.boot(&config);
    assert!(
        vm.wait_for_line("the agent stays PID 1", Duration::from_secs(120)),
        "{}",
        vm.console()
    );
    s.wait_for_ssh(&vm);

    let out = s.run_ok(
        "cat /proc/1/comm; echo \"g=$GREETING\"; pwd; hostname; id -u; \
         grep -c ' /dev/pts devpts ' /proc/mounts",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["init", "g=hello from oci", "/srv", "agentinit", "0", "1"],
        "{out}"
    );
    let out = run_with(
        {
            let mut c = s.ssh.ssh(&["-tt"]);
            c.arg("tty; stty size");
            c
        },
        None,
    );
    assert!(text(&out.stdout).starts_with("/dev/pts/"), "{out:?}");

    // Orphans are re-parented to the agent, which must reap them.
    let out = s.run_ok(
        "(sleep 0.3 &); sleep 2; cat /proc/[0-9]*/status 2>/dev/null | grep -c 'zombie'; true",
    );
    assert_eq!(out.trim(), "0", "zombies left: {out}");

    // Written without sync: the shutdown must flush and unmount.
    s.run_ok("echo persisted > /root/marker; echo on-root > /marker2");

    // The server dies (here: killed from a session it serves); PID 1 restarts it.
    let out = s.ssh.run(&[], "kill -9 $PPID", None);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        vm.wait_for_line("built-in ssh server exited", Duration::from_secs(20)),
        "{}",
        vm.console()
    );
    s.wait_for_ssh(&vm);

    // busybox poweroff signals PID 1 with SIGUSR2.
    let _ = s.ssh.run(&[], "poweroff", None);
    let log = vm.wait(DEADLINE);
    let console = log.text();
    assert!(
        log.exited,
        "QEMU should exit on the agent's power-off:\n{console}"
    );
    assert!(
        console.contains("shutdown (SIGUSR2 (poweroff))"),
        "{console}"
    );
    assert!(console.contains("/root unmounted"), "{console}");
    assert!(console.contains("/ read-only"), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
    // Clean ext4: no journal left to replay on the upper or the work disk.
    if let Some(dumpe2fs) = which("dumpe2fs") {
        for disk in [&s.upper, &s.work] {
            let out = std::process::Command::new(&dumpe2fs)
                .arg("-h")
                .arg(disk)
                .output()
                .unwrap();
            let info = text(&out.stdout);
            assert!(
                info.lines()
                    .any(|l| l.starts_with("Filesystem state:") && l.ends_with(" clean")),
                "{}: {info}",
                disk.display()
            );
            assert!(
                !info.contains("needs_recovery"),
                "{}: {info}",
                disk.display()
            );
        }
    }

    // Second boot: everything written reached the disks; SIGTERM also shuts down.
    let mut vm = s.boot(&config);
    assert!(
        vm.wait_for_line("the agent stays PID 1", Duration::from_secs(120)),
        "{}",
        vm.console()
    );
    s.wait_for_ssh(&vm);
    assert_eq!(
        s.run_ok("cat /root/marker /marker2"),
        "persisted\non-root\n"
    );
    let _ = s.ssh.run(&[], "kill -TERM 1", None);
    let log = vm.wait(DEADLINE);
    assert!(log.exited, "{}", log.text());
    assert!(log.text().contains("shutdown (SIGTERM"), "{}", log.text());
}

const IMAGE_INIT: &str = r#"#!/bin/sh
export PATH=/bin
echo "IMAGE-INIT pid=$$"
while true; do sleep 1; done
"#;

#[test]
fn image_init_with_the_agents_ssh_server() {
    let Some(s) = setup(Some(IMAGE_INIT)) else {
        return;
    };
    let config = s.config(InitMode::Image);
    let mut vm = s.boot(&config);
    assert!(
        vm.wait_for_line("IMAGE-INIT pid=1", Duration::from_secs(120)),
        "{}",
        vm.console()
    );
    s.wait_for_ssh(&vm);
    // The image's init is PID 1; the server is its child, in a session of its own.
    let out = s.run_ok(
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; \
         read -r _ _ _ ppid _ sid _ < /proc/$PPID/stat; echo \"server ppid=$ppid sid=$sid\"; \
         echo \"g=$GREETING\"; pwd",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("/sbin/init"), "{out}");
    assert!(lines[1].starts_with("server ppid=1 sid="), "{out}");
    assert!(!lines[1].ends_with("sid=1"), "{out}");
    assert_eq!(&lines[2..], ["g=hello from oci", "/srv"], "{out}");
    let out = run_with(
        {
            let mut c = s.ssh.ssh(&["-tt"]);
            c.arg("tty");
            c
        },
        None,
    );
    assert!(text(&out.stdout).starts_with("/dev/pts/"), "{out:?}");
    let _ = s.ssh.run(&[], "sync; poweroff -f", None);
    let log = vm.wait(DEADLINE);
    assert!(log.exited, "{}", log.text());
}
