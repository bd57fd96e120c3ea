//! Command-level tests against a scripted fake daemon, and argument parsing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use banger_core::{ByteSize, ErrorCode, VmId, VmName, VmRecord, VmState};
use clap::Parser;

use super::*;
use crate::cli::{Command as Cmd, VmCmd};

const NOW: i64 = 1_700_000_000;

/// A daemon that answers connection `i` with `scripts[i]`, replacing `OP` in each line with the
/// request's op id, then closes. The join handle yields the request lines received.
struct FakeDaemon {
    dir: tempfile::TempDir,
    handle: JoinHandle<Vec<serde_json::Value>>,
}

impl FakeDaemon {
    fn new(scripts: Vec<Vec<String>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        let listener = UnixListener::bind(runtime.join("bangerd.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for script in scripts {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                let op = req["op_id"].as_str().unwrap().to_string();
                requests.push(req);
                let mut w = &stream;
                for frame in script {
                    w.write_all(frame.replace("OP", &op).as_bytes()).unwrap();
                    w.write_all(b"\n").unwrap();
                }
            }
            requests
        });
        FakeDaemon { dir, handle }
    }

    fn target(&self) -> DaemonTarget {
        target_in(self.dir.path())
    }

    fn requests(self) -> Vec<serde_json::Value> {
        self.handle.join().unwrap()
    }
}

fn target_in(root: &Path) -> DaemonTarget {
    let mut t = DaemonTarget::for_dirs(&root.join("state"), &root.join("run"), None);
    // Tests must never spawn a real daemon.
    t.autostart = false;
    t
}

#[derive(Debug)]
struct Outcome {
    code: i32,
    out: String,
    err: String,
}

fn run_with(target: DaemonTarget, term: Term, input: &str, args: &[&str]) -> Outcome {
    let cli = Cli::try_parse_from(std::iter::once("banger").chain(args.iter().copied())).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = input.as_bytes();
    let mut ctx = Ctx::new(target, &mut out, &mut err, &mut input, term, NOW);
    let code = run(cli.command, &mut ctx);
    Outcome {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn run_cmd(target: DaemonTarget, args: &[&str]) -> Outcome {
    run_with(target, Term::plain(), "", args)
}

fn record(name: &str, state: VmState) -> VmRecord {
    VmRecord {
        id: VmId::parse("0123456789ab").unwrap(),
        name: VmName::parse(name).unwrap(),
        state,
        image: "debian-bookworm".into(),
        kernel: "debian-6.1-cloud".into(),
        vcpu: 2,
        memory_mib: 1024,
        work_disk_size: ByteSize::gib(8),
        ip: Some("172.30.0.2".parse().unwrap()),
        nat: false,
        vmm: Some("firecracker".into()),
        last_error: None,
        created_at: NOW - 10,
        updated_at: NOW - 10,
        started_at: Some(NOW - 5),
        workspace: None,
        nested: false,
    }
}

/// Built as text rather than through `serde_json::Value`, which would sort the keys.
fn result(v: impl serde::Serialize) -> String {
    let v = serde_json::to_string(&v).unwrap();
    format!(r#"{{"type":"result","op_id":"OP","result":{v}}}"#)
}

fn error(code: ErrorCode, message: &str) -> String {
    serde_json::json!({"type": "error", "op_id": "OP", "code": code, "message": message})
        .to_string()
}

fn progress(stage: &str) -> String {
    serde_json::json!({"type": "progress", "op_id": "OP", "stage": stage}).to_string()
}

#[test]
fn every_error_code_maps_to_its_exit_code_with_the_op_id() {
    for code in ErrorCode::ALL {
        let fake = FakeDaemon::new(vec![vec![
            progress("allocate"),
            error(code, "no VM named box"),
        ]]);
        let o = run_cmd(fake.target(), &["vm", "start", "box"]);
        let reqs = fake.requests();
        let op = reqs[0]["op_id"].as_str().unwrap();
        assert_eq!(o.code, code.exit_code(), "{code}");
        assert_eq!(
            o.err,
            format!("banger: no VM named box (op {op})\n"),
            "{code}"
        );
        assert!(o.out.is_empty());
        assert_eq!(reqs[0]["method"], "vm.start");
        assert_eq!(reqs[0]["params"]["vm"], "box");
        assert_eq!(reqs[0]["v"], 1);
    }
}

#[test]
fn progress_is_consumed_and_warnings_shown() {
    let fake = FakeDaemon::new(vec![vec![
        progress("allocate"),
        progress("vmm_spawn"),
        serde_json::json!({"type": "warning", "op_id": "OP", "message": "NAT is off"}).to_string(),
        progress("ready"),
        result(record("box", VmState::Running)),
    ]]);
    let o = run_cmd(fake.target(), &["vm", "start", "box"]);
    fake.requests();
    assert_eq!(o.code, 0, "{o:?}");
    // Off a terminal: no progress, but the warning.
    assert_eq!(o.err, "banger: warning: NAT is off\n");
    assert!(
        o.out
            .starts_with("vm box running (ip 172.30.0.2, 2 vcpu, 1024 MiB) in "),
        "{}",
        o.out
    );
}

#[test]
fn progress_renders_stages_on_a_terminal() {
    let fake = FakeDaemon::new(vec![vec![
        progress("allocate"),
        progress("vmm_spawn"),
        result(record("box", VmState::Running)),
    ]]);
    let term = Term {
        stderr_tty: true,
        stdin_tty: false,
        style: Style { color: false },
    };
    let o = run_with(fake.target(), term, "", &["vm", "start", "box"]);
    fake.requests();
    assert_eq!(o.code, 0);
    assert!(o.err.contains("  ✓ allocate  "), "{:?}", o.err);
    assert!(o.err.contains("  ✓ vmm_spawn  "), "{:?}", o.err);
    assert!(
        !o.err.contains("\x1b[3"),
        "no colour without a colour style: {:?}",
        o.err
    );
}

#[test]
fn a_connection_closed_early_is_reported() {
    let fake = FakeDaemon::new(vec![vec![progress("allocate")]]);
    let target = fake.target();
    let log = target.log_file.clone();
    let o = run_cmd(target, &["vm", "start", "box"]);
    let op = fake.requests()[0]["op_id"].as_str().unwrap().to_string();
    assert_eq!(o.code, 1);
    assert_eq!(
        o.err,
        format!(
            "banger: the daemon closed the connection before answering (op {op}); see {}\n",
            log.display()
        )
    );
}

#[test]
fn an_unreadable_frame_is_an_error() {
    let fake = FakeDaemon::new(vec![vec!["{\"type\":\"mystery\"}".into()]]);
    let o = run_cmd(fake.target(), &["vm", "ls"]);
    fake.requests();
    assert_eq!(o.code, 1);
    assert!(o.err.contains("unreadable line"), "{}", o.err);
    assert_eq!(o.err.lines().count(), 1);
}

#[test]
fn create_sends_only_the_flags_given() {
    let fake = FakeDaemon::new(vec![vec![result(record("box", VmState::Created))]]);
    let o = run_cmd(
        fake.target(),
        &[
            "vm",
            "create",
            "--name",
            "box",
            "--memory",
            "2G",
            "--no-start",
        ],
    );
    let params = fake.requests()[0]["params"].clone();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(params["name"], "box");
    assert_eq!(params["memory_mib"], 2048);
    assert_eq!(params["no_start"], true);
    for absent in ["vcpu", "image", "kernel", "work_disk_size"] {
        assert!(params[absent].is_null(), "{absent} sent: {params}");
    }
    assert!(o.out.starts_with("vm box created ("), "{}", o.out);
}

#[test]
fn rm_reports_each_failure_and_exits_with_the_first() {
    let fake = FakeDaemon::new(vec![
        vec![result(record("a", VmState::Stopped))],
        vec![error(ErrorCode::NotFound, "no VM named b")],
        vec![error(ErrorCode::Busy, "VM c is running")],
        vec![result(record("d", VmState::Stopped))],
    ]);
    let o = run_cmd(fake.target(), &["vm", "rm", "a", "b", "c", "d", "--force"]);
    let reqs = fake.requests();
    assert_eq!(o.code, ErrorCode::NotFound.exit_code());
    assert_eq!(o.out, "vm a removed\nvm d removed\n");
    let lines: Vec<&str> = o.err.lines().collect();
    assert_eq!(lines.len(), 2, "{}", o.err);
    assert!(lines[0].starts_with("banger: no VM named b (op op-"));
    assert!(lines[1].starts_with("banger: VM c is running (op op-"));
    assert!(reqs.iter().all(|r| r["params"]["force"] == true));
}

#[test]
fn ls_json_is_verbatim_and_ordered() {
    let vms = banger_protocol::VmList {
        vms: vec![record("box", VmState::Running)],
    };
    let fake = FakeDaemon::new(vec![vec![result(&vms)], vec![result(&vms)]]);
    let json = run_cmd(fake.target(), &["vm", "ps", "--json"]);
    let table = run_cmd(fake.target(), &["vm", "list"]);
    fake.requests();
    let expected = json::pretty(&serde_json::to_string(&vms).unwrap());
    assert_eq!(json.out, format!("{expected}\n"));
    // `id` comes before `name`, as the record declares them (a sorted map would differ).
    assert!(json.out.find("\"id\"").unwrap() < json.out.find("\"name\"").unwrap());
    assert!(table.out.starts_with("NAME  STATE"), "{}", table.out);
    assert!(table.out.contains("10s ago"), "{}", table.out);
}

fn prune_scripts(prune: bool) -> Vec<Vec<String>> {
    let list = banger_protocol::VmList {
        vms: vec![
            record("old", VmState::Stopped),
            record("live", VmState::Running),
            record("bad", VmState::Error),
        ],
    };
    let mut s = vec![vec![result(&list)]];
    if prune {
        s.push(vec![result(banger_protocol::Removed {
            removed: vec!["old".into(), "bad".into()],
        })]);
    }
    s
}

#[test]
fn prune_without_a_terminal_needs_force() {
    let fake = FakeDaemon::new(prune_scripts(false));
    let o = run_cmd(fake.target(), &["vm", "prune"]);
    assert_eq!(fake.requests().len(), 1, "only the list was asked for");
    assert_eq!(o.code, 2);
    assert_eq!(o.err.lines().count(), 1);
    assert!(
        o.err.contains("2 stopped VMs (old, bad)") && o.err.contains("--force"),
        "{}",
        o.err
    );

    let fake = FakeDaemon::new(prune_scripts(true));
    let o = run_cmd(fake.target(), &["vm", "prune", "-f"]);
    let reqs = fake.requests();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(reqs[1]["method"], "vm.prune");
    assert_eq!(o.out, "vm old removed\nvm bad removed\n");
}

#[test]
fn prune_asks_on_a_terminal() {
    let term = Term {
        stderr_tty: false,
        stdin_tty: true,
        style: Style { color: false },
    };
    let fake = FakeDaemon::new(prune_scripts(true));
    let o = run_with(fake.target(), term, "y\n", &["vm", "prune"]);
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.err.starts_with("Delete 2 stopped VMs (old, bad)? [y/N] "),
        "{}",
        o.err
    );

    let fake = FakeDaemon::new(prune_scripts(false));
    let o = run_with(fake.target(), term, "\n", &["vm", "prune"]);
    assert_eq!(fake.requests().len(), 1, "declined: nothing deleted");
    assert_eq!(o.code, 1);
    assert!(o.err.contains("nothing deleted"));
}

#[test]
fn status_and_stop_do_not_start_a_daemon() {
    let t = tempfile::tempdir().unwrap();
    let mut target = target_in(t.path());
    target.autostart = true;
    let o = run_cmd(target.clone(), &["daemon", "status"]);
    assert_eq!(o.code, 1);
    assert!(o.out.starts_with("bangerd is not running"), "{}", o.out);
    let o = run_cmd(target, &["daemon", "stop"]);
    assert_eq!(o.code, 0);
    assert_eq!(o.out, "bangerd is not running\n");
    assert!(!t.path().join("run").exists());
}

#[test]
fn not_running_without_autostart_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    let o = run_cmd(target_in(t.path()), &["vm", "ls"]);
    assert_eq!(o.code, 1);
    assert!(
        o.err
            .starts_with("banger: bangerd is not running (no answer on "),
        "{}",
        o.err
    );
    assert_eq!(o.err.lines().count(), 1);
}

#[test]
fn daemon_stop_waits_for_the_socket_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let sock = runtime.join("bangerd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let status = banger_protocol::DaemonStatus {
        version: "0.1.0".into(),
        protocol: 1,
        pid: 4242,
        socket: sock.clone(),
        state_dir: dir.path().join("state"),
        log_file: dir.path().join("state/bangerd.log"),
        vmm: "auto".into(),
        vms_total: 0,
        vms_running: 0,
        uptime_secs: 3,
        ssh_config: None,
        dns: None,
    };
    let sock2 = sock.clone();
    let server = std::thread::spawn(move || {
        // The liveness probe, then status, then shutdown, after which the socket goes away.
        let mut methods = Vec::new();
        while methods.last().map(String::as_str) != Some("daemon.shutdown") {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).unwrap() == 0 {
                continue;
            }
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            let op = req["op_id"].as_str().unwrap();
            let reply = match req["method"].as_str().unwrap() {
                "daemon.status" => result(&status),
                _ => result(serde_json::json!({"stopping": true})),
            };
            (&stream)
                .write_all(format!("{}\n", reply.replace("OP", op)).as_bytes())
                .unwrap();
            methods.push(req["method"].as_str().unwrap().to_string());
        }
        drop(listener);
        std::fs::remove_file(&sock2).unwrap();
        methods
    });
    let o = run_cmd(target_in(dir.path()), &["daemon", "stop"]);
    let methods = server.join().unwrap();
    assert_eq!(methods, ["daemon.status", "daemon.shutdown"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.out, "bangerd stopped (pid 4242); VMs keep running\n");
}

// ---- argument parsing ----

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("banger").chain(args.iter().copied()))
}

fn parse_err(args: &[&str]) -> (String, i32) {
    let e = parse(args).unwrap_err();
    let (text, code, _) = cli::clap_failure(&e);
    (text, code)
}

#[test]
fn sizes_parse_with_units() {
    let cli = parse(&[
        "vm",
        "create",
        "--memory",
        "2G",
        "--disk-size",
        "512M",
        "--vcpu",
        "4",
    ])
    .unwrap();
    let Cmd::Vm(VmCmd::Create(a)) = cli.command else {
        panic!()
    };
    assert_eq!(a.spec.memory, Some(2048));
    assert_eq!(a.spec.disk_size, Some(ByteSize::mib(512)));
    assert_eq!(a.spec.vcpu, Some(4));
    assert!(a.spec.name.is_none() && a.spec.image.is_none() && !a.spec.nat && !a.no_start);
    let cli = parse(&["vm", "set", "box", "--memory", "1024"]).unwrap();
    let Cmd::Vm(VmCmd::Set { memory, vcpu, .. }) = cli.command else {
        panic!()
    };
    assert_eq!((memory, vcpu), (Some(1024), None));
}

#[test]
fn non_positive_values_are_rejected() {
    for (args, needle) in [
        (&["vm", "set", "box", "--vcpu", "0"][..], "at least 1"),
        (&["vm", "set", "box", "--vcpu", "-2"][..], "at least 1"),
        (&["vm", "set", "box", "--memory", "0"][..], "greater than 0"),
        (
            &["vm", "set", "box", "--memory", "-1G"][..],
            "greater than 0",
        ),
        (&["vm", "create", "--disk-size", "0"][..], "greater than 0"),
        (
            &["vm", "create", "--memory", "1500K"][..],
            "whole number of MiB",
        ),
        (
            &["vm", "create", "--memory", "4X"][..],
            "invalid size \"4X\"",
        ),
    ] {
        let (text, code) = parse_err(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("banger: --"), "flag named: {text}");
    }
}

#[test]
fn bad_vm_names_are_one_line_exit_2() {
    for args in [
        &["vm", "start", "Bad_Name"][..],
        &["vm", "rm", "ok", "Bad_Name"][..],
        &["vm", "create", "--name", "Bad_Name"][..],
    ] {
        let (text, code) = parse_err(args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("banger: "), "{text}");
        assert!(
            text.contains("invalid VM name") || text.contains("unexpected"),
            "{text}"
        );
    }
    let (text, _) = parse_err(&["vm", "start", "Bad_Name"]);
    assert!(text.contains("Bad_Name"));
    assert!(parse(&["vm", "image", "UPPER"]).is_err());
    assert!(parse(&["image", "show", "UPPER"]).is_err());
}

#[test]
fn rm_takes_several_names() {
    let cli = parse(&["vm", "rm", "a", "b", "-f"]).unwrap();
    let Cmd::Vm(VmCmd::Rm { names, force }) = cli.command else {
        panic!()
    };
    assert_eq!(
        names.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(force);
    assert!(parse(&["vm", "rm"]).is_err());
}

#[test]
fn prune_flags() {
    for (args, want) in [
        (&["vm", "prune"][..], false),
        (&["vm", "prune", "-f"][..], true),
        (&["vm", "prune", "--force"][..], true),
    ] {
        let Cmd::Vm(VmCmd::Prune { force }) = parse(args).unwrap().command else {
            panic!()
        };
        assert_eq!(force, want, "{args:?}");
    }
}

#[test]
fn list_aliases() {
    for alias in ["ls", "list", "ps"] {
        assert!(matches!(
            parse(&["vm", alias, "--json"]).unwrap().command,
            Cmd::Vm(VmCmd::Ls { json: true })
        ));
    }
}

#[test]
fn paths_are_made_absolute_and_must_exist() {
    let t = tempfile::tempdir().unwrap();
    let k = t.path().join("k");
    std::fs::create_dir(&k).unwrap();
    std::fs::write(k.join("vmlinux"), b"x").unwrap();
    let roundabout = t.path().join("k/../k");
    let cli = parse(&[
        "kernel",
        "import",
        "k1",
        "--from",
        roundabout.to_str().unwrap(),
    ])
    .unwrap();
    let Cmd::Kernel(crate::cli::KernelCmd::Import { from, name }) = cli.command else {
        panic!()
    };
    assert_eq!(name, "k1");
    assert_eq!(from, std::fs::canonicalize(&k).unwrap());
    assert!(from.is_absolute());

    let missing = t.path().join("nope");
    let (text, code) = parse_err(&[
        "kernel",
        "import",
        "k1",
        "--from",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        text.contains("no such file or directory") && text.contains("nope"),
        "{text}"
    );
    let file = k.join("vmlinux");
    let (text, _) = parse_err(&["kernel", "import", "k1", "--from", file.to_str().unwrap()]);
    assert!(text.contains("not a directory"), "{text}");

    let (text, code) = parse_err(&[
        "image",
        "register",
        "img",
        "--rootfs",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(text.starts_with("banger: --rootfs: cannot use"), "{text}");
    let cli = parse(&[
        "image",
        "register",
        "img",
        "--rootfs",
        file.to_str().unwrap(),
    ])
    .unwrap();
    let Cmd::Image(crate::cli::ImageCmd::Register { rootfs, .. }) = cli.command else {
        panic!()
    };
    assert_eq!(rootfs, std::fs::canonicalize(&file).unwrap());
}

#[test]
fn help_and_version_exit_0() {
    let (text, code) = parse_err(&["--help"]);
    assert_eq!(code, 0);
    assert!(text.contains("vm"));
    let (_, code) = parse_err(&["--version"]);
    assert_eq!(code, 0);
    let (_, code) = parse_err(&["vm", "fly"]);
    assert_eq!(code, 2);
}

#[test]
fn config_flag_is_global() {
    let cli = parse(&["vm", "ls", "--config", "/etc/x.toml"]).unwrap();
    assert_eq!(cli.config, Some(PathBuf::from("/etc/x.toml")));
}

#[test]
fn kernel_pull_sends_the_name_and_prints_the_record() {
    let rec = banger_core::KernelRecord {
        name: "generic-6.12".into(),
        vmlinux: "/var/lib/banger/kernels/generic-6.12/vmlinux".into(),
        initrd: None,
        version: "6.12.8".into(),
        sha256: "a".repeat(64),
        source: "catalog:https://example.org/k.tar.zst".into(),
        created_at: NOW,
    };
    let fake = FakeDaemon::new(vec![vec![progress("kernel_download"), result(&rec)]]);
    let o = run_cmd(fake.target(), &["kernel", "pull", "generic-6.12"]);
    let reqs = fake.requests();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(reqs[0]["method"], "kernel.pull");
    assert_eq!(reqs[0]["params"]["name"], "generic-6.12");
    assert_eq!(
        o.out,
        "kernel generic-6.12 ready (6.12.8, catalog:https://example.org/k.tar.zst)\n"
    );
    let (text, code) = parse_err(&["kernel", "pull", "Bad/Name"]);
    assert_eq!(code, 2);
    assert!(text.contains("Bad/Name"), "{text}");
}

#[test]
fn image_pull_export_import_and_oci_image_flags() {
    use crate::cli::ImageCmd;
    let cli = parse(&["image", "pull", "localhost:5000/team/app:1", "--insecure"]).unwrap();
    let Cmd::Image(ImageCmd::Pull {
        reference,
        name,
        insecure,
        ..
    }) = cli.command
    else {
        panic!()
    };
    assert_eq!(reference, "localhost:5000/team/app:1");
    assert!(insecure && name.is_none());
    // --name is an image name; a reference is not.
    let (text, code) = parse_err(&["image", "pull", "alpine", "--name", "Bad/Name"]);
    assert_eq!(code, 2);
    assert!(text.contains("Bad/Name"), "{text}");
    for bad in ["-x", "a b", ""] {
        let (text, code) = parse_err(&["image", "pull", "--", bad]);
        assert_eq!(code, 2, "{bad:?}: {text}");
    }
    // vm create/run take references as images.
    let cli = parse(&["vm", "create", "--image", "docker.io/library/python:3.12"]).unwrap();
    let Cmd::Vm(crate::cli::VmCmd::Create(args)) = cli.command else {
        panic!()
    };
    assert_eq!(
        args.spec.image.as_deref(),
        Some("docker.io/library/python:3.12")
    );

    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("b.tar.zst");
    let cli = parse(&["image", "export", "img", "-o", out.to_str().unwrap()]).unwrap();
    let Cmd::Image(ImageCmd::Export { output, .. }) = cli.command else {
        panic!()
    };
    assert!(output.is_absolute() && output.ends_with("b.tar.zst"));
    std::fs::write(&out, b"x").unwrap();
    let (text, code) = parse_err(&["image", "export", "img", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(text.contains("already exists"), "{text}");
    let missing_dir = t.path().join("no/such/b.tar.zst");
    let (text, _) = parse_err(&[
        "image",
        "export",
        "img",
        "-o",
        missing_dir.to_str().unwrap(),
    ]);
    assert!(text.contains("does not exist"), "{text}");

    let cli = parse(&["image", "import", out.to_str().unwrap()]).unwrap();
    let Cmd::Image(ImageCmd::Import { from, name, .. }) = cli.command else {
        panic!()
    };
    assert!(from.is_absolute() && name.is_none());
    let cli = parse(&["image", "cache", "prune", "--dry-run"]).unwrap();
    assert!(matches!(
        cli.command,
        Cmd::Image(ImageCmd::Cache {
            cmd: crate::cli::ImageCacheCmd::Prune { dry_run: true }
        })
    ));
}
