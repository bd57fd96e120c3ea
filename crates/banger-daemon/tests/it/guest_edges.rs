//! What a hostile guest writes, seen from the host (issue 10): files copied out of a real
//! guest come back without set-id/sticky bits, devices, FIFOs or foreign owners, and never
//! through a link. Skips (saying why) where the machine cannot boot guests.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use banger_testkit::TestEnv;

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(
        o.status.success(),
        "banger {args:?} failed:\n{}\ndaemon log tail:\n{}",
        text(&o),
        env.daemon_log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap()
}

/// The guest (root in it) makes a set-uid tool, a 7777 directory, a device node, a FIFO and
/// links pointing out of the tree; `vm cp` brings them back sanitised.
#[test]
fn copy_out_of_a_hostile_guest_is_sanitised() {
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    env.start_daemon();
    ok(&env, &["vm", "create", "--name", "evil"]);
    ok(
        &env,
        &[
            "vm",
            "exec",
            "evil",
            "--",
            "sh",
            "-ec",
            "mkdir /root/evil; cd /root/evil; printf '#!/bin/sh\\nid\\n' > tool; chmod 4755 tool; \
             printf g > g; chmod 2777 g; mkdir d; chmod 7777 d; printf x > d/f; chown 1234:1234 d/f; \
             mknod d/null c 1 3; mknod sda b 8 0; mkfifo fifo; ln -s /etc out; ln -s ../../.. d/up",
        ],
    );
    let back = env.root().join("back");
    std::fs::create_dir(&back).unwrap();
    let victim = env.root().join("victim");
    std::fs::write(&victim, b"keep\n").unwrap();

    let o = env.cli(&["vm", "cp", "evil:/root/evil", back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("left out 3 special files"),
        "{}",
        text(&o)
    );
    let tree = back.join("evil");
    let me = nix::unistd::geteuid().as_raw();
    let mask = umask();
    for (name, want) in [
        ("", 0o755),
        ("tool", 0o755),
        ("g", 0o777),
        ("d", 0o777),
        ("d/f", 0o644),
    ] {
        let m = std::fs::symlink_metadata(tree.join(name)).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            want & !mask,
            "{name}: mode {:o}",
            m.mode()
        );
        assert_eq!(m.uid(), me, "{name}: owner {}", m.uid());
        assert_eq!(m.gid(), nix::unistd::getegid().as_raw(), "{name}: group");
    }
    for special in ["d/null", "sda", "fifo"] {
        assert!(
            std::fs::symlink_metadata(tree.join(special)).is_err(),
            "{special} was created on the host"
        );
    }
    for (link, target) in [("out", "/etc"), ("d/up", "../../..")] {
        let p = tree.join(link);
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_link(&p).unwrap().to_str().unwrap(), target);
    }
    let walk = std::fs::read_dir(&tree)
        .unwrap()
        .chain(std::fs::read_dir(tree.join("d")).unwrap());
    for e in walk {
        let ft = e.unwrap().file_type().unwrap();
        assert!(!(ft.is_block_device() || ft.is_char_device() || ft.is_fifo()));
    }

    // A link planted at the destination beforehand is replaced, never written through.
    let planted = back.join("tool");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    ok(
        &env,
        &[
            "vm",
            "cp",
            "evil:/root/evil/tool",
            planted.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep\n");
    let m = std::fs::symlink_metadata(&planted).unwrap();
    assert!(m.is_file() && m.mode() & 0o7000 == 0, "{:o}", m.mode());

    // Copying the tree again over itself: the guest's links are not followed either.
    ok(
        &env,
        &["vm", "cp", "evil:/root/evil", back.to_str().unwrap()],
    );
    assert!(
        std::fs::symlink_metadata(tree.join("out"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // What the guest prints on stderr during a copy (here its error naming a path full of
    // escapes) reaches the terminal without them.
    let o = env.cli(&[
        "vm",
        "cp",
        "evil:/root/\x1b]0;pwned\x07\x1b[2Jnope",
        back.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope"), "{err:?}");
    assert!(
        !err.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{err:?}"
    );

    ok(&env, &["vm", "rm", "--force", "evil"]);
    env.stop_daemon();
}

/// A guest flooding its serial console keeps `vmm.log` and its one rotated file under the
/// configured cap, and what it writes there reaches the user's terminal without escapes.
#[test]
fn a_flooding_guest_console_stays_capped_and_escape_free() {
    let Some(mut env) = TestEnv::real("vmm_log_max_size = \"64K\"") else {
        return;
    };
    env.start_daemon();
    ok(&env, &["vm", "create", "--name", "loud"]);
    let id: serde_json::Value =
        serde_json::from_str(&ok(&env, &["vm", "show", "loud", "--json"])).unwrap();
    let log = std::path::PathBuf::from(id["log_file"].as_str().unwrap());
    // 1 MiB of console output, then escape sequences (clear screen, a window title, an OSC 52
    // clipboard write), then a marker.
    ok(
        &env,
        &[
            "vm",
            "exec",
            "loud",
            "--",
            "sh",
            "-c",
            "head -c 786432 /dev/zero | tr '\\0' x | fold -w 100 > /dev/ttyS0; \
             printf '\\033[2J\\033]0;pwned\\007\\033]52;c;ZXZpbA==\\007\\033[31mred\\033[0m\\r\\nEND-OF-FLOOD\\n' > /dev/ttyS0",
        ],
    );
    let rotated = {
        let mut s = log.clone().into_os_string();
        s.push(".1");
        std::path::PathBuf::from(s)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("END-OF-FLOOD") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the marker never reached {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let cap = 64 * 1024;
    let cur = std::fs::metadata(&log).unwrap().len();
    let old = std::fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
    println!("vmm.log {cur} bytes, vmm.log.1 {old} bytes, cap {cap}");
    assert!(
        cur <= cap && old <= cap,
        "vmm.log {cur} / .1 {old} over the cap {cap}"
    );
    assert!(old > 0, "never rotated");

    let o = env.cli(&["vm", "logs", "loud"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("END-OF-FLOOD"), "{shown}");
    assert!(shown.contains("red"), "{shown}");
    assert!(
        !shown
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "control characters in vm logs: {:?}",
        shown
            .chars()
            .filter(|c| c.is_control() && *c != '\n')
            .take(10)
            .collect::<String>()
    );

    ok(&env, &["vm", "rm", "--force", "loud"]);
    env.stop_daemon();
}
