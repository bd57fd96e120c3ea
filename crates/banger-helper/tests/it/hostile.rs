//! The table the "least privilege" issue asks for: hostile requests through the real server
//! over a real socket, each refused with a reason, none reaching anything that acts.

use std::path::Path;

use banger_helper::ServeOptions;
use serde_json::{Value, json};

use crate::common::{Env, VM_ID, exchange_as_uid, is_root, raw_exchange, s};

/// One hostile request.
struct Case {
    name: String,
    line: Vec<u8>,
    code: &'static str,
    /// A piece of the message that shows the reason.
    reason: String,
    /// Protocol errors close the connection; refusals of a well-formed op do not.
    closes: bool,
}

fn req(request: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "op_id": "op-hostile", "request": request})).unwrap()
}

fn refused(name: &str, request: Value, code: &'static str, reason: &str) -> Case {
    Case {
        name: name.to_string(),
        line: req(request),
        code,
        reason: reason.to_string(),
        closes: false,
    }
}

fn protocol(name: &str, line: Vec<u8>, reason: &str) -> Case {
    Case {
        name: name.to_string(),
        line,
        code: "bad_request",
        reason: reason.to_string(),
        closes: true,
    }
}

fn loop_attach(path: &str) -> Value {
    json!({"op": "LoopAttach", "path": path, "read_only": true})
}

fn debootstrap(suite: &str, mirror: &str, packages: Vec<String>, output: &str) -> Value {
    json!({"op": "Debootstrap", "suite": suite, "mirror": mirror, "packages": packages, "output": output})
}

fn check(env: &Env, c: &Case) {
    let (reply, closed) = raw_exchange(&env.socket, &c.line);
    let v: Value = serde_json::from_str(&reply)
        .unwrap_or_else(|e| panic!("{}: reply {reply:?} is not JSON: {e}", c.name));
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(code, c.code, "{}: {reply}", c.name);
    assert!(
        msg.contains(&c.reason),
        "{}: message {msg:?} lacks the reason {:?}",
        c.name,
        c.reason
    );
    assert_eq!(closed, c.closes, "{}: connection closed = {closed}", c.name);
    println!("refused  {:<48} {code}: {msg}", c.name);
}

/// Temporarily replaces directory `dir` by a symlink to its renamed self, as an owner who can
/// write the parent could, runs `f`, and puts things back.
fn with_dir_swapped_for_symlink(dir: &Path, f: impl FnOnce()) {
    let real = dir.with_extension("real");
    std::fs::rename(dir, &real).unwrap();
    std::os::unix::fs::symlink(&real, dir).unwrap();
    f();
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(&real, dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_all_refused_and_nothing_runs() {
    let env = Env::start(false, ServeOptions::default()).await;
    let st = &env.state;
    let p = |rel: &str| s(&st.join(rel));
    let img = p("images/base/rootfs.ext4");

    // Hostile furniture in the state dir.
    let base = st.join("images/base");
    std::os::unix::fs::symlink("/etc/shadow", base.join("shadow.ext4")).unwrap();
    std::os::unix::fs::symlink(base.join("rootfs.ext4"), base.join("alias.ext4")).unwrap();
    let vms = st.join("vms");
    std::os::unix::fs::symlink("/etc", vms.join("etc")).unwrap();
    std::os::unix::fs::symlink(&base, vms.join("alias")).unwrap();
    std::os::unix::fs::symlink(st, env.dir.path().join("statelink")).unwrap();
    nix::unistd::mkfifo(
        &base.join("fifo.ext4"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::write(st.join("build/exists.tar"), b"").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", st.join("build/dangling.tar")).unwrap();
    std::fs::create_dir(st.join("build/sub")).unwrap();
    // Loop devices the fake host reports: loop5 backs a system file, loop6 an image.
    env.host.set_loop(5, "/etc/passwd");
    env.host.set_loop(6, base.join("rootfs.ext4"));
    // Mappings named like banger's: one on another installation's loop (loop5 backs a file
    // outside this state dir), one on a disk, one on a free loop.
    env.host.set_dm("banger-aaaaaaaaaaaa", &["loop5", "loop6"]);
    env.host.set_dm("banger-bbbbbbbbbbbb", &["sda"]);
    env.host.set_dm("banger-cccccccccccc", &["loop9"]);

    let run_file = s(&env.run.join("bangerd.sock"));
    let sixty_five: Vec<String> = (0..65).map(|i| format!("pkg{i}")).collect();
    let mirror = "http://deb.debian.org/debian";
    let ok_pkgs = || vec!["openssh-server".to_string()];
    let other = if env.cfg.owner_uid == 65534 {
        65533
    } else {
        65534
    };

    let mut cases = vec![
        // --- paths ---
        refused(
            "path with .. out of images",
            loop_attach(&format!("{}/images/../../../etc/shadow", s(st))),
            "forbidden",
            "contains `..`",
        ),
        refused(
            "path with .. back into images",
            loop_attach(&format!(
                "{}/vms/{VM_ID}/../../images/base/rootfs.ext4",
                s(st)
            )),
            "forbidden",
            "contains `..`",
        ),
        refused(
            "state dir reached via a symlink",
            loop_attach(&s(&env
                .dir
                .path()
                .join("statelink/images/base/rootfs.ext4"))),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "file is a symlink to /etc/shadow",
            loop_attach(&p("images/base/shadow.ext4")),
            "forbidden",
            "is a symlink",
        ),
        refused(
            "file is a symlink to an image",
            loop_attach(&p("images/base/alias.ext4")),
            "forbidden",
            "is a symlink",
        ),
        refused(
            "intermediate dir is a symlink to /etc",
            loop_attach(&p("vms/etc/shadow")),
            "forbidden",
            "is a symlink",
        ),
        refused(
            "intermediate dir is a symlink into state",
            loop_attach(&p("vms/alias/rootfs.ext4")),
            "forbidden",
            "is a symlink",
        ),
        refused(
            "path /etc/shadow",
            loop_attach("/etc/shadow"),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "path /dev/sda",
            loop_attach("/dev/sda"),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "path /proc/self/mem",
            loop_attach("/proc/self/mem"),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "path in the runtime dir",
            loop_attach(&run_file),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "path in build/, not images/ or vms/",
            loop_attach(&p("build/exists.tar")),
            "forbidden",
            "is not a file under",
        ),
        refused(
            "a directory instead of a file",
            loop_attach(&p("images/base")),
            "forbidden",
            "directory, not a regular file",
        ),
        refused(
            "a FIFO instead of a file",
            loop_attach(&p("images/base/fifo.ext4")),
            "forbidden",
            "FIFO, not a regular file",
        ),
        refused(
            "a missing file",
            loop_attach(&p("images/base/nope.ext4")),
            "forbidden",
            "does not exist",
        ),
        refused(
            "a relative path",
            loop_attach("images/base/rootfs.ext4"),
            "bad_request",
            "not an absolute path",
        ),
        refused(
            "a NUL in the path",
            loop_attach(&format!("{img}\u{0}x")),
            "bad_request",
            "NUL",
        ),
        refused(
            "a path with //",
            loop_attach(&format!("{}//images/base/rootfs.ext4", s(st))),
            "bad_request",
            "not normalized",
        ),
        // --- interface names ---
        refused(
            "tap eth0",
            json!({"op": "CreateTap", "tap": "eth0", "bridge": "br-banger", "owner_uid": env.cfg.owner_uid}),
            "forbidden",
            "\"eth0\"",
        ),
        refused(
            "tap lo",
            json!({"op": "DeleteTap", "tap": "lo"}),
            "forbidden",
            "\"lo\"",
        ),
        refused(
            "tap docker0",
            json!({"op": "OpenTap", "tap": "docker0"}),
            "forbidden",
            "\"docker0\"",
        ),
        refused(
            "tap bgt with a bad id",
            json!({"op": "DeleteTap", "tap": "bgt-1"}),
            "forbidden",
            "\"bgt-1\"",
        ),
        refused(
            "tap of 16 characters",
            json!({"op": "DeleteTap", "tap": "bgt0123456789abc"}),
            "forbidden",
            "longer than 15",
        ),
        refused(
            "tap with a slash",
            json!({"op": "OpenTap", "tap": "bgt/../eth0"}),
            "forbidden",
            "\"bgt/../eth0\"",
        ),
        refused(
            "tap with a space",
            json!({"op": "DeleteTap", "tap": "bgt a"}),
            "forbidden",
            "\"bgt a\"",
        ),
        refused(
            "bridge br-other",
            json!({"op": "EnsureBridge", "bridge": "br-other", "gateway": "172.30.0.1", "prefix": 24}),
            "forbidden",
            "\"br-other\"",
        ),
        refused(
            "bridge docker0 for NAT",
            json!({"op": "EnsureNat", "bridge": "docker0", "cidr": "172.30.0.0/24"}),
            "forbidden",
            "\"docker0\"",
        ),
        refused(
            "bridge eth0 for neighbours",
            json!({"op": "ForgetNeighbor", "bridge": "eth0", "ip": "172.30.0.2"}),
            "forbidden",
            "\"eth0\"",
        ),
        refused(
            "a banger bridge that is not configured",
            json!({"op": "CreateTap", "tap": "bgt1", "bridge": "br-banger-x", "owner_uid": env.cfg.owner_uid}),
            "forbidden",
            "not the configured bridge",
        ),
        refused(
            "remove_all on br0",
            json!({"op": "RemoveAll", "bridge": "br0"}),
            "forbidden",
            "\"br0\"",
        ),
        refused(
            "tap owned by root",
            json!({"op": "CreateTap", "tap": "bgt1", "bridge": "br-banger", "owner_uid": 0}),
            "forbidden",
            "uid 0 is not the owner",
        ),
        refused(
            "tap owned by another uid",
            json!({"op": "CreateTap", "tap": "bgt1", "bridge": "br-banger", "owner_uid": other}),
            "forbidden",
            &format!("uid {other} is not the owner"),
        ),
        refused(
            "tap without an owner",
            json!({"op": "CreateTap", "tap": "bgt1", "bridge": "br-banger"}),
            "forbidden",
            "owner_uid: missing",
        ),
        // --- addresses ---
        refused(
            "VM ip outside the CIDR",
            json!({"op": "AddVmNat", "vm_id": VM_ID, "ip": "10.0.0.5", "tap": "bgt1"}),
            "forbidden",
            "outside the configured network",
        ),
        refused(
            "VM ip = gateway",
            json!({"op": "AddVmNat", "vm_id": VM_ID, "ip": "172.30.0.1", "tap": "bgt1"}),
            "forbidden",
            "gateway address",
        ),
        refused(
            "VM ip = network address",
            json!({"op": "ForgetNeighbor", "bridge": "br-banger", "ip": "172.30.0.0"}),
            "forbidden",
            "network address",
        ),
        refused(
            "VM ip = broadcast address",
            json!({"op": "AddVmNat", "vm_id": VM_ID, "ip": "172.30.0.255", "tap": "bgt1"}),
            "forbidden",
            "broadcast address",
        ),
        refused(
            "VM ip that is no address",
            json!({"op": "AddVmNat", "vm_id": VM_ID, "ip": "172.30.0.2; flush ruleset", "tap": "bgt1"}),
            "bad_request",
            "not an IPv4 address",
        ),
        refused(
            "prefix 31",
            json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.1", "prefix": 31}),
            "bad_request",
            "prefix: 31",
        ),
        refused(
            "prefix 0",
            json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.1", "prefix": 0}),
            "bad_request",
            "prefix: 0",
        ),
        refused(
            "prefix 33",
            json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.1", "prefix": 33}),
            "bad_request",
            "prefix: 33",
        ),
        refused(
            "prefix other than configured",
            json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.1", "prefix": 16}),
            "forbidden",
            "prefix: 16",
        ),
        refused(
            "gateway other than configured",
            json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.7", "prefix": 24}),
            "forbidden",
            "is not the gateway",
        ),
        refused(
            "NAT for 0.0.0.0/0",
            json!({"op": "EnsureNat", "bridge": "br-banger", "cidr": "0.0.0.0/0"}),
            "bad_request",
            "cidr",
        ),
        refused(
            "NAT for another network",
            json!({"op": "EnsureNat", "bridge": "br-banger", "cidr": "10.0.0.0/8"}),
            "forbidden",
            "not the configured network",
        ),
        refused(
            "NAT vm id with a semicolon",
            json!({"op": "AddVmNat", "vm_id": "a;b", "ip": "172.30.0.2", "tap": "bgt1"}),
            "forbidden",
            "\"a;b\"",
        ),
        refused(
            "NAT vm id with a newline",
            json!({"op": "RemoveVmNat", "vm_id": "x\n}"}),
            "forbidden",
            "\"x\\n}\"",
        ),
        // --- loop devices ---
        refused(
            "loop /dev/sda",
            json!({"op": "LoopDetach", "device": "/dev/sda"}),
            "forbidden",
            "\"/dev/sda\"",
        ),
        refused(
            "loop /dev/loop",
            json!({"op": "LoopDetach", "device": "/dev/loop"}),
            "forbidden",
            "\"/dev/loop\"",
        ),
        refused(
            "loop /dev/loop1x",
            json!({"op": "LoopDetach", "device": "/dev/loop1x"}),
            "forbidden",
            "\"/dev/loop1x\"",
        ),
        refused(
            "loop ../loop0",
            json!({"op": "LoopDetach", "device": "../loop0"}),
            "forbidden",
            "\"../loop0\"",
        ),
        refused(
            "loop backed by /etc/passwd",
            json!({"op": "LoopDetach", "device": "/dev/loop5"}),
            "forbidden",
            "/dev/loop5 is backed by \"/etc/passwd\"",
        ),
        refused(
            "snapshot of a foreign loop",
            json!({"op": "DmSnapshotCreate", "vm_id": VM_ID, "origin_loop": "/dev/loop5", "cow_loop": "/dev/loop6"}),
            "forbidden",
            "/dev/loop5 is backed by",
        ),
        refused(
            "snapshot onto a free loop",
            json!({"op": "DmSnapshotCreate", "vm_id": VM_ID, "origin_loop": "/dev/loop6", "cow_loop": "/dev/loop9"}),
            "forbidden",
            "is not attached",
        ),
        refused(
            "snapshot with origin = cow",
            json!({"op": "DmSnapshotCreate", "vm_id": VM_ID, "origin_loop": "/dev/loop6", "cow_loop": "/dev/loop6"}),
            "forbidden",
            "two devices",
        ),
        // --- device-mapper names ---
        refused(
            "dm name vg0-root",
            json!({"op": "DmRemove", "vm_id": "vg0-root"}),
            "forbidden",
            "\"vg0-root\"",
        ),
        refused(
            "dm name banger-XYZ",
            json!({"op": "DmRemove", "vm_id": "banger-XYZ"}),
            "forbidden",
            "\"banger-XYZ\"",
        ),
        refused(
            "dm remove of another installation's mapping",
            json!({"op": "DmRemove", "vm_id": "aaaaaaaaaaaa"}),
            "forbidden",
            "mapping banger-aaaaaaaaaaaa is not this installation's",
        ),
        refused(
            "dm remove of a mapping on a disk",
            json!({"op": "DmRemove", "vm_id": "bbbbbbbbbbbb"}),
            "forbidden",
            "built on sda",
        ),
        refused(
            "dm remove of a mapping on a free loop",
            json!({"op": "DmRemove", "vm_id": "cccccccccccc"}),
            "forbidden",
            "attached to no file",
        ),
        refused(
            "dm snapshot named ../../x",
            json!({"op": "DmSnapshotCreate", "vm_id": "../../x", "origin_loop": "/dev/loop6", "cow_loop": "/dev/loop7"}),
            "forbidden",
            "\"../../x\"",
        ),
        // --- debootstrap ---
        refused(
            "package --foo",
            debootstrap("bookworm", mirror, vec!["--foo".into()], &p("build/a.tar")),
            "bad_request",
            "\"--foo\"",
        ),
        refused(
            "package a;b",
            debootstrap("bookworm", mirror, vec!["a;b".into()], &p("build/a.tar")),
            "bad_request",
            "\"a;b\"",
        ),
        refused(
            "package a,b",
            debootstrap("bookworm", mirror, vec!["a,b".into()], &p("build/a.tar")),
            "bad_request",
            "\"a,b\"",
        ),
        refused(
            "suite ../x",
            debootstrap("../x", mirror, ok_pkgs(), &p("build/a.tar")),
            "bad_request",
            "suite: \"../x\"",
        ),
        refused(
            "mirror file:///",
            debootstrap("bookworm", "file:///", ok_pkgs(), &p("build/a.tar")),
            "forbidden",
            "mirror: \"file:///\"",
        ),
        refused(
            "mirror as a sources line",
            debootstrap(
                "bookworm",
                "http://x/debian [trusted=yes]",
                ok_pkgs(),
                &p("build/a.tar"),
            ),
            "bad_request",
            "whitespace",
        ),
        refused(
            "65 packages",
            debootstrap("bookworm", mirror, sixty_five, &p("build/a.tar")),
            "bad_request",
            "65 given",
        ),
        refused(
            "output outside build/",
            debootstrap("bookworm", mirror, ok_pkgs(), &p("images/a.tar")),
            "forbidden",
            "directly in",
        ),
        refused(
            "output /etc/cron.d/x",
            debootstrap("bookworm", mirror, ok_pkgs(), "/etc/cron.d/x"),
            "forbidden",
            "directly in",
        ),
        refused(
            "output in a subdir of build/",
            debootstrap("bookworm", mirror, ok_pkgs(), &p("build/sub/a.tar")),
            "forbidden",
            "directly in",
        ),
        refused(
            "output that exists",
            debootstrap("bookworm", mirror, ok_pkgs(), &p("build/exists.tar")),
            "forbidden",
            "already exists",
        ),
        refused(
            "output that is a dangling symlink",
            debootstrap("bookworm", mirror, ok_pkgs(), &p("build/dangling.tar")),
            "forbidden",
            "already exists",
        ),
        refused(
            "output hidden file",
            debootstrap("bookworm", mirror, ok_pkgs(), &p("build/.a.tar")),
            "bad_request",
            "output",
        ),
        // --- the protocol ---
        protocol(
            "unknown op Mount",
            req(json!({"op": "Mount", "source": "/dev/sda", "target": "/"})),
            "unknown variant `Mount`",
        ),
        protocol(
            "unknown op RunCommand",
            req(json!({"op": "RunCommand", "argv": ["sh", "-c", "id"]})),
            "unknown variant `RunCommand`",
        ),
        protocol(
            "unknown field on an op",
            req(json!({"op": "DeleteTap", "tap": "bgt1", "force": true})),
            "unknown field `force`",
        ),
        protocol(
            "unknown field on Ping",
            req(json!({"op": "Ping", "argv": ["id"]})),
            "unknown field `argv`",
        ),
        protocol(
            "unknown envelope field",
            serde_json::to_vec(
                &json!({"v": 1, "op_id": "op-x", "uid": 0, "request": {"op": "Ping"}}),
            )
            .unwrap(),
            "unknown envelope field \"uid\"",
        ),
        protocol(
            "wrong protocol version",
            serde_json::to_vec(&json!({"v": 2, "op_id": "op-x", "request": {"op": "Ping"}}))
                .unwrap(),
            "unsupported protocol version",
        ),
        protocol(
            "missing protocol version",
            serde_json::to_vec(&json!({"op_id": "op-x", "request": {"op": "Ping"}})).unwrap(),
            "v: missing",
        ),
        protocol(
            "a value of the wrong type",
            req(
                json!({"op": "EnsureBridge", "bridge": "br-banger", "gateway": "172.30.0.1", "prefix": "24"}),
            ),
            "invalid type",
        ),
        protocol(
            "an op_id that could forge logs",
            serde_json::to_vec(
                &json!({"v": 1, "op_id": "x\nop_id=forged", "request": {"op": "Ping"}}),
            )
            .unwrap(),
            "op_id",
        ),
        protocol("malformed JSON", b"{\"v\":1,".to_vec(), "malformed JSON"),
        protocol("not an object", b"[1,2,3]".to_vec(), "JSON object"),
        protocol(
            "invalid UTF-8",
            [
                b"{\"v\":1,\"op_id\":\"op-x\",\"request\":{\"op\":\"DeleteTap\",\"tap\":\"bgt"
                    .as_slice(),
                &[0xff, 0xfe],
                b"\"}}",
            ]
            .concat(),
            "not valid UTF-8",
        ),
        protocol(
            "a 1 MiB line",
            vec![b'x'; 1 << 20],
            "longer than 65536 bytes",
        ),
    ];

    // Root-only furniture: another user's file, and a hard link of a root file.
    if is_root() {
        let foreign = base.join("foreign.ext4");
        std::fs::write(&foreign, b"x").unwrap();
        std::os::unix::fs::chown(&foreign, Some(54321), None).unwrap();
        cases.push(refused(
            "a file owned by another user",
            loop_attach(&s(&foreign)),
            "forbidden",
            "owned by uid 54321",
        ));
        let linked = base.join("linked.ext4");
        std::fs::write(&linked, b"x").unwrap();
        std::fs::hard_link(&linked, env.dir.path().join("elsewhere")).unwrap();
        cases.push(refused(
            "a root file with another hard link",
            loop_attach(&s(&linked)),
            "forbidden",
            "2 links",
        ));
    }

    let mut count = 0;
    for c in &cases {
        check(&env, c);
        count += 1;
    }

    // Symlinks swapped in at run time, after the config was checked: the state dir itself,
    // then the images dir.
    let swapped = [
        (st.clone(), "the state dir swapped for a symlink"),
        (st.join("images"), "the images dir swapped for a symlink"),
    ];
    for (dir, name) in swapped {
        with_dir_swapped_for_symlink(&dir, || {
            check(
                &env,
                &refused(name, loop_attach(&img), "forbidden", "is a symlink"),
            );
        });
        count += 1;
    }

    // The wrong caller: a process running as uid 65534 (needs root to become it).
    if is_root() {
        let line = req(json!({"op": "Ping"}));
        let reply = exchange_as_uid(65534, &env.socket, &line);
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["error"]["code"], "forbidden", "{reply}");
        assert_eq!(
            v["error"]["message"], "uid 65534 is not the owner",
            "{reply}"
        );
        println!(
            "refused  {:<48} forbidden: {}",
            "caller uid 65534", v["error"]["message"]
        );
        count += 1;
        // And a valid, otherwise-accepted op from that uid is refused just the same.
        let line = req(json!({"op": "DeleteTap", "tap": "bgt1"}));
        let reply = exchange_as_uid(65534, &env.socket, &line);
        assert!(reply.contains("uid 65534 is not the owner"), "{reply}");
        count += 1;
    } else {
        println!("SKIP: the wrong-uid cases need root to become uid 65534");
    }

    // Nothing that acts was reached.
    assert_eq!(env.net.calls(), [], "NetOps calls");
    assert!(
        env.recording.calls.lock().unwrap().is_empty(),
        "commands: {:?}",
        env.recording.calls.lock().unwrap()
    );
    assert_eq!(env.host.calls(), [], "host actions");
    // The helper is still serving.
    let v = env.client().ping().await.unwrap();
    assert_eq!(v, 1);
    println!(
        "{count} hostile cases, all refused with a reason; no NetOps call, no command, no host action"
    );
    assert!(count >= 40, "only {count} cases");
    env.stop().await;
}
