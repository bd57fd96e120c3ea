//! Workspaces against a real guest (QEMU): `vm run PATH`, `vm workspace prepare|sync|export`,
//! `vm cp` both ways and `vm exec`'s working directory. Two boots in all. Skips (saying why)
//! where the machine cannot boot guests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use banger_testkit::TestEnv;

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(
        o.status.success(),
        "banger {args:?} failed:\n{}\nlog tail:\n{}",
        text(&o),
        tail(&env.daemon_log())
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// The repository: history, a modified file, a deleted tracked file, a staged change,
/// an untracked file, an ignored `.env`, a symlink, a binary file, an executable.
fn repo(root: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let r = root.join("demo");
    std::fs::create_dir_all(&r).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    git(&r, &["config", "user.name", "Work Space"]);
    git(&r, &["config", "user.email", "ws@example.invalid"]);
    git(
        &r,
        &[
            "remote",
            "add",
            "origin",
            "https://example.invalid/demo.git",
        ],
    );
    write(&r, ".gitignore", b".env\n");
    write(&r, "README.md", b"demo\n");
    write(&r, "src/main.c", b"int main(void) { return 0; }\n");
    write(&r, "old.txt", b"old\n");
    write(&r, "staged.txt", b"one\n");
    write(&r, "logo.bin", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe");
    write(&r, "build.sh", b"#!/bin/sh\necho built\n");
    std::fs::set_permissions(r.join("build.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("README.md", r.join("docs-link")).unwrap();
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "initial"]);
    write(&r, "src/main.c", b"int main(void) { return 1; }\n");
    std::fs::remove_file(r.join("old.txt")).unwrap();
    write(&r, "staged.txt", b"two\n");
    git(&r, &["add", "staged.txt"]);
    write(&r, "scratch.txt", b"untracked\n");
    write(&r, ".env", b"TOKEN=never-copy-me\n");
    r
}

fn without_untracked(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with("??"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn workspace_round_trip_in_a_real_guest() {
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    env.start_daemon();
    let r = repo(env.root());
    let r_s = r.to_str().unwrap();
    let host_status = git(&r, &["status", "--porcelain"]);
    assert!(host_status.contains("?? scratch.txt"), "{host_status}");

    // --dry-run lists without booting anything; .env is never listed.
    let listing = ok(&env, &["vm", "run", "--dry-run", r_s]);
    assert!(listing.contains("src/main.c\n"), "{listing}");
    assert!(listing.contains("deleted old.txt\n"), "{listing}");
    assert!(
        !listing.contains(".env") && !listing.contains("scratch"),
        "{listing}"
    );
    let vms: serde_json::Value = serde_json::from_str(&ok(&env, &["vm", "ls", "--json"])).unwrap();
    assert_eq!(vms["vms"].as_array().unwrap().len(), 0);

    // 1. vm run PATH: copied to /root/demo, the command runs there, status matches the host's
    //    minus the untracked file.
    let t = Instant::now();
    let out = ok(
        &env,
        &[
            "vm",
            "run",
            "--rm",
            r_s,
            "--",
            "sh",
            "-c",
            "pwd; git status --porcelain; test ! -e .env && echo no-env; git log --format=%s; git branch --show-current; git config remote.origin.url; git config user.email",
        ],
    );
    println!("vm run PATH --rm: {:.1}s", t.elapsed().as_secs_f64());
    let expected = format!(
        "/root/demo\n{}no-env\ninitial\nmain\nhttps://example.invalid/demo.git\nws@example.invalid\n",
        without_untracked(&host_status)
    );
    assert_eq!(out, expected);

    // 2. A VM without a workspace: vm exec runs in root's home.
    ok(&env, &["vm", "create", "--name", "ws"]);
    assert_eq!(ok(&env, &["vm", "exec", "ws", "--", "pwd"]), "/root\n");

    // 3. prepare with --include-untracked: status equal, still no .env; exec runs there.
    let t = Instant::now();
    let printed = ok(
        &env,
        &[
            "vm",
            "workspace",
            "prepare",
            "ws",
            r_s,
            "--include-untracked",
            "--guest-path",
            "/root/src/demo",
        ],
    );
    println!("workspace prepare: {:.1}s", t.elapsed().as_secs_f64());
    assert_eq!(printed, "ws:/root/src/demo\n");
    assert_eq!(
        ok(&env, &["vm", "exec", "ws", "--", "pwd"]),
        "/root/src/demo\n"
    );
    assert_eq!(
        ok(
            &env,
            &["vm", "exec", "ws", "--", "git", "status", "--porcelain"]
        ),
        host_status
    );
    ok(&env, &["vm", "exec", "ws", "--", "test", "!", "-e", ".env"]);
    ok(&env, &["vm", "exec", "ws", "--", "test", "-x", "build.sh"]);
    assert_eq!(
        ok(&env, &["vm", "exec", "ws", "--", "readlink", "docs-link"]),
        "README.md\n"
    );
    assert_eq!(
        ok(&env, &["vm", "exec", "ws", "--", "sha256sum", "logo.bin"]),
        String::from_utf8_lossy(
            &Command::new("sha256sum")
                .arg("logo.bin")
                .current_dir(&r)
                .output()
                .unwrap()
                .stdout
        )
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&env, &["vm", "show", "ws", "--json"])).unwrap();
    assert_eq!(shown["workspace"]["guest_path"], "/root/src/demo");
    assert_eq!(shown["workspace"]["include_untracked"], true);
    let base = git(&r, &["rev-parse", "HEAD"]).trim().to_string();
    assert_eq!(shown["workspace"]["head_commit"], base.as_str());

    // 4. One file changed: exec warns, sync sends exactly it, the guest sees it.
    write(&r, "README.md", b"demo, edited on the host\n");
    let o = env.cli(&["vm", "exec", "ws", "--", "true"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("banger: warning:") && err.contains("1 file changed"),
        "{err}"
    );
    let t = Instant::now();
    assert_eq!(
        ok(&env, &["vm", "workspace", "sync", "ws"]),
        "sent 1 files, deleted 0\n"
    );
    println!("workspace sync (1 file): {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(
        ok(&env, &["vm", "exec", "ws", "--", "cat", "README.md"]),
        "demo, edited on the host\n"
    );
    let o = env.cli(&["vm", "exec", "ws", "--", "true"]);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning"),
        "{}",
        text(&o)
    );
    assert_eq!(
        ok(&env, &["vm", "workspace", "sync", "ws"]),
        "sent 0 files, deleted 0\n"
    );
    // A deletion, through exec --sync.
    std::fs::remove_file(r.join("scratch.txt")).unwrap();
    let o = env.cli(&[
        "vm",
        "exec",
        "ws",
        "--sync",
        "--",
        "test",
        "!",
        "-e",
        "scratch.txt",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sent 0 files, deleted 1"),
        "{}",
        text(&o)
    );

    // 5. Guest work (a commit and uncommitted changes) comes back as a patch that applies to
    //    the host repository at the base commit.
    ok(
        &env,
        &[
            "vm",
            "exec",
            "ws",
            "--",
            "sh",
            "-c",
            "echo from-guest > guest.txt && git add guest.txt && git commit -qm 'guest commit' && echo more >> src/main.c && printf '\\000\\001' > blob.bin",
        ],
    );
    let index_before = ok(&env, &["vm", "exec", "ws", "--", "git", "ls-files", "-s"]);
    let patch = env.root().join("guest.patch");
    ok(
        &env,
        &[
            "vm",
            "workspace",
            "export",
            "ws",
            "-o",
            patch.to_str().unwrap(),
        ],
    );
    assert_eq!(
        ok(&env, &["vm", "exec", "ws", "--", "git", "ls-files", "-s"]),
        index_before
    );
    let clone = env.root().join("check");
    git(env.root(), &["clone", "-q", r_s, clone.to_str().unwrap()]);
    git(&clone, &["checkout", "-q", &base]);
    git(&clone, &["apply", "--check", patch.to_str().unwrap()]);
    git(&clone, &["apply", patch.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(clone.join("guest.txt")).unwrap(),
        b"from-guest\n"
    );
    assert_eq!(std::fs::read(clone.join("blob.bin")).unwrap(), b"\x00\x01");
    assert_eq!(
        std::fs::read(clone.join("src/main.c")).unwrap(),
        b"int main(void) { return 1; }\nmore\n"
    );
    assert_eq!(
        std::fs::read(clone.join("README.md")).unwrap(),
        b"demo, edited on the host\n"
    );

    // 6. vm cp both ways, files and directories.
    let incoming = env.root().join("incoming");
    write(&incoming, "a.txt", b"a\n");
    write(&incoming, "deep/b.txt", b"b\n");
    ok(
        &env,
        &["vm", "cp", incoming.to_str().unwrap(), "ws:/root/in"],
    );
    assert_eq!(
        ok(
            &env,
            &[
                "vm",
                "exec",
                "ws",
                "--",
                "cat",
                "/root/in/a.txt",
                "/root/in/deep/b.txt"
            ]
        ),
        "a\nb\n"
    );
    ok(
        &env,
        &[
            "vm",
            "cp",
            incoming.join("a.txt").to_str().unwrap(),
            "ws:/root/in/deep",
        ],
    );
    ok(
        &env,
        &[
            "vm",
            "exec",
            "ws",
            "--",
            "test",
            "-f",
            "/root/in/deep/a.txt",
        ],
    );
    let back = env.root().join("back");
    std::fs::create_dir(&back).unwrap();
    ok(
        &env,
        &[
            "vm",
            "cp",
            "ws:/root/src/demo/guest.txt",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(back.join("guest.txt")).unwrap(),
        b"from-guest\n"
    );
    ok(
        &env,
        &[
            "vm",
            "cp",
            "ws:/root/in",
            back.join("dir-copy").to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(back.join("dir-copy/deep/a.txt")).unwrap(),
        b"a\n"
    );
    let o = env.cli(&["vm", "cp", "ws:/root/nope", back.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));

    ok(&env, &["vm", "rm", "--force", "ws"]);
    env.stop_daemon();
}
