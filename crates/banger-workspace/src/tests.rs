//! Against real temporary git repositories; the "guest" is a local directory the guest scripts
//! run in with `sh`, exactly as ssh would run them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = git::command(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

const BINARY: &[u8] = b"\x00\x01\x02\xff\xfe binary \x00 data\n\x00";

/// The issue's scenario: committed history, then a modified file, a deleted tracked file, a
/// staged change, an untracked file, an ignored `.env`, a symlink, binary content and an
/// executable.
fn scenario() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("myrepo");
    std::fs::create_dir(&r).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    git(&r, &["config", "user.name", "Test Dev"]);
    git(&r, &["config", "user.email", "dev@example.invalid"]);
    git(
        &r,
        &[
            "remote",
            "add",
            "origin",
            "https://example.invalid/myrepo.git",
        ],
    );
    write(&r, ".gitignore", b".env\ntarget/\n");
    write(&r, "README.md", b"hello\n");
    write(&r, "src/lib.rs", b"pub fn a() {}\n");
    write(&r, "gone.txt", b"to be deleted\n");
    write(&r, "staged.txt", b"v1\n");
    write(&r, "data.bin", BINARY);
    write(&r, "run.sh", b"#!/bin/sh\necho ran\n");
    std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("README.md", r.join("link")).unwrap();
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "first"]);
    write(&r, "README.md", b"hello\nagain\n");
    git(&r, &["commit", "-q", "-am", "second"]);
    // The dirty state.
    write(&r, "src/lib.rs", b"pub fn a() {}\npub fn b() {}\n");
    std::fs::remove_file(r.join("gone.txt")).unwrap();
    write(&r, "staged.txt", b"v2\n");
    git(&r, &["add", "staged.txt"]);
    write(&r, "notes/new.txt", b"untracked\n");
    write(&r, ".env", b"SECRET=1\n");
    write(&r, "target/out.o", b"built\n");
    (t, r)
}

/// Runs a guest script locally with `stdin` as its input.
fn guest(script: &str, stdin: &[u8]) -> std::process::Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for v in ["GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE"] {
        cmd.env_remove(v);
    }
    let mut child = cmd.stdin(std::process::Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let w = std::thread::spawn(move || {
        use std::io::Write;
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    out
}

fn ok(out: std::process::Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "script failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn prepared(r: &Path, guest_root: &Path, spec: PrepareSpec) -> Prepared {
    let mut spec = spec;
    spec.history.depth = history::DEFAULT_DEPTH;
    spec.guest_path = Some(guest_root.join("myrepo").display().to_string());
    let p = prepare(r, &spec).unwrap();
    let mut tarball = Vec::new();
    p.write_archive(&mut tarball).unwrap();
    ok(guest(&p.script(false), &tarball));
    p
}

fn status(dir: &Path) -> String {
    git(dir, &["status", "--porcelain"])
}

fn without_untracked(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with("??"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn inspect_lists_tracked_deleted_and_never_ignored() {
    let (_t, r) = scenario();
    let repo = repo::inspect(&r, &Options::default(), None).unwrap();
    let paths: Vec<&str> = repo.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            ".gitignore",
            "README.md",
            "data.bin",
            "link",
            "run.sh",
            "src/lib.rs",
            "staged.txt"
        ]
    );
    assert_eq!(repo.deleted, ["gone.txt"]);
    assert_eq!(repo.branch.as_deref(), Some("main"));
    assert_eq!(
        repo.origin_url.as_deref(),
        Some("https://example.invalid/myrepo.git")
    );
    let get = |p: &str| repo.files.iter().find(|f| f.path == p).unwrap();
    assert_eq!(get("run.sh").kind, Kind::File { exec: true });
    assert_eq!(get("README.md").kind, Kind::File { exec: false });
    assert_eq!(
        get("link").kind,
        Kind::Symlink {
            target: "README.md".into()
        }
    );
    assert_eq!(get("data.bin").hash, repo::hash_bytes(BINARY));

    let with = repo::inspect(
        &r,
        &Options {
            include_untracked: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let untracked: Vec<&str> = with
        .files
        .iter()
        .filter(|f| f.untracked)
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(untracked, ["notes/new.txt"]);
    assert!(
        !with
            .files
            .iter()
            .any(|f| f.path == ".env" || f.path.starts_with("target/"))
    );
}

#[test]
fn dry_run_listing_marks_untracked_links_and_deletions() {
    let (_t, r) = scenario();
    let repo = repo::inspect(
        &r,
        &Options {
            include_untracked: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let l = repo.listing();
    assert!(l.contains("untracked notes/new.txt\n"), "{l}");
    assert!(l.contains("link -> README.md\n"), "{l}");
    assert!(l.contains("run.sh (executable)\n"), "{l}");
    assert!(l.contains("deleted gone.txt\n"), "{l}");
    assert!(!l.contains(".env"), "{l}");
}

#[test]
fn bare_repo_and_non_repo_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join("b.git");
    git(t.path(), &["init", "-q", "--bare", b.to_str().unwrap()]);
    let e = repo::inspect(&b, &Options::default(), None).unwrap_err();
    assert!(matches!(e, WorkspaceError::Bare { .. }), "{e}");
    assert!(e.to_string().contains("b.git"), "{e}");
    let plain = t.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let e = repo::inspect(&plain, &Options::default(), None).unwrap_err();
    assert!(matches!(e, WorkspaceError::NotARepo { .. }), "{e}");
}

#[test]
fn submodule_is_refused_unless_asked() {
    let (_t, r) = scenario();
    let sub_src = r.parent().unwrap().join("lib-src");
    std::fs::create_dir(&sub_src).unwrap();
    git(&sub_src, &["init", "-q"]);
    write(&sub_src, "inner.txt", b"inner\n");
    git(&sub_src, &["add", "-A"]);
    git(
        &sub_src,
        &[
            "-c",
            "user.name=x",
            "-c",
            "user.email=x@x",
            "commit",
            "-q",
            "-m",
            "s",
        ],
    );
    git(
        &r,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            sub_src.to_str().unwrap(),
            "vendor/lib",
        ],
    );
    let e = repo::inspect(&r, &Options::default(), None).unwrap_err();
    assert!(
        matches!(&e, WorkspaceError::Submodule { submodule, .. } if submodule == "vendor/lib"),
        "{e}"
    );
    assert!(e.to_string().contains("--submodules"), "{e}");
    let repo = repo::inspect(
        &r,
        &Options {
            submodules: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert!(repo.files.iter().any(|f| f.path == "vendor/lib/inner.txt"));
    assert!(!repo.files.iter().any(|f| f.path == "vendor/lib"));
}

#[test]
fn guest_copy_has_history_identity_and_the_same_status() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let p = prepared(&r, g.path(), PrepareSpec::default());
    let gw = g.path().join("myrepo");
    let host = status(&r);
    assert!(host.contains("?? notes/"), "{host}");
    assert_eq!(status(&gw), without_untracked(&host));
    assert!(!gw.join(".env").exists() && !gw.join("target").exists());
    assert!(!gw.join("notes/new.txt").exists());
    assert_eq!(git(&gw, &["log", "--format=%s"]), "second\nfirst\n");
    assert_eq!(git(&gw, &["rev-parse", "HEAD"]).trim(), p.repo.head);
    assert_eq!(git(&gw, &["branch", "--show-current"]).trim(), "main");
    assert_eq!(
        git(&gw, &["config", "remote.origin.url"]).trim(),
        "https://example.invalid/myrepo.git"
    );
    assert_eq!(
        git(&gw, &["config", "user.email"]).trim(),
        "dev@example.invalid"
    );
    assert_eq!(git(&gw, &["diff"]), git(&r, &["diff"]));
    assert_eq!(
        git(&gw, &["diff", "--cached"]),
        git(&r, &["diff", "--cached"])
    );
    assert_eq!(std::fs::read(gw.join("data.bin")).unwrap(), BINARY);
    assert_eq!(
        std::fs::read_link(gw.join("link")).unwrap(),
        Path::new("README.md")
    );
    let mode = std::fs::metadata(gw.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);

    // A second prepare into the same place is refused without force, and replaces with it.
    let mut tarball = Vec::new();
    p.write_archive(&mut tarball).unwrap();
    let out = guest(&p.script(false), &tarball);
    assert_eq!(out.status.code(), Some(guest::EXIT_EXISTS));
    ok(guest(&p.script(true), &tarball));
    assert_eq!(status(&gw), without_untracked(&host));
}

#[test]
fn include_untracked_makes_status_equal() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let spec = PrepareSpec {
        options: Options {
            include_untracked: true,
            ..Default::default()
        },
        ..Default::default()
    };
    prepared(&r, g.path(), spec);
    let gw = g.path().join("myrepo");
    assert_eq!(status(&gw), status(&r));
    assert!(!gw.join(".env").exists());
}

#[test]
fn new_branch_from_a_ref_checks_that_commit_out() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let spec = PrepareSpec {
        history: HistorySpec {
            branch: Some("try-it".into()),
            from: Some("HEAD~1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let p = prepared(&r, g.path(), spec);
    let gw = g.path().join("myrepo");
    assert_eq!(git(&gw, &["branch", "--show-current"]).trim(), "try-it");
    assert_eq!(git(&gw, &["log", "--format=%s"]), "first\n");
    assert_eq!(status(&gw), "");
    assert_eq!(std::fs::read(gw.join("README.md")).unwrap(), b"hello\n");
    assert!(gw.join("gone.txt").exists());
    // The manifest records the checked-out blobs: a sync sends the host's tree over them.
    let m = p.manifest().unwrap();
    assert!(m.files["README.md"].hash.starts_with("git:"));

    let bad = PrepareSpec {
        history: HistorySpec {
            branch: Some("x".into()),
            from: Some("no-such-ref".into()),
            depth: 1,
        },
        ..Default::default()
    };
    let e = prepare(&r, &bad).unwrap_err();
    assert!(e.to_string().contains("no-such-ref"), "{e}");
    let bad = PrepareSpec {
        history: HistorySpec {
            branch: Some("bad..name".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        prepare(&r, &bad).unwrap_err(),
        WorkspaceError::BadBranch { .. }
    ));
}

#[test]
fn manifest_diff_sends_only_changes_and_deletions() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let p = prepared(&r, g.path(), PrepareSpec::default());
    let gw = g.path().join("myrepo");
    let m = p.manifest().unwrap();
    let mpath = g.path().join("cache/ws.json");
    m.save(&mpath).unwrap();
    let mut m2 = Manifest::load(&mpath).unwrap().unwrap();
    assert_eq!(m2, m);

    // Nothing changed: nothing to send.
    let (_, plan) = plan_sync(&m2).unwrap();
    assert!(plan.is_empty(), "{plan:?}");
    assert_eq!(staleness(&m2).unwrap(), None);

    // One file changed, one tracked file deleted, one turned into a link, exec bit flipped.
    write(&r, "src/lib.rs", b"changed\n");
    std::fs::remove_file(r.join("staged.txt")).unwrap();
    std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(r.join("data.bin")).unwrap();
    std::os::unix::fs::symlink("src/lib.rs", r.join("data.bin")).unwrap();
    let (repo, plan) = plan_sync(&m2).unwrap();
    let sent: Vec<&str> = plan.send.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(sent, ["data.bin", "run.sh", "src/lib.rs"]);
    assert_eq!(plan.delete, ["staged.txt"]);
    assert!(
        staleness(&m2)
            .unwrap()
            .unwrap()
            .contains("3 files changed and 1 deleted")
    );

    let mut tarball = Vec::new();
    write_sync_archive(&repo.root, &plan, &mut tarball).unwrap();
    for s in guest::sync_scripts(&m2.guest_path, &plan.delete) {
        ok(guest(&s, &tarball));
    }
    m2.apply(&repo, &plan);
    assert_eq!(status(&gw), without_untracked(&status(&r)));
    assert!(plan_sync(&m2).unwrap().1.is_empty());

    // Touching a file without changing it sends nothing.
    write(&r, "README.md", b"hello\nagain\n");
    assert!(plan_sync(&m2).unwrap().1.is_empty());
}

#[test]
fn sync_replaces_a_directory_with_a_file() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let p = prepared(&r, g.path(), PrepareSpec::default());
    let m = p.manifest().unwrap();
    std::fs::remove_dir_all(r.join("src")).unwrap();
    write(&r, "src", b"now a file\n");
    git(&r, &["add", "-A", "src"]);
    let (repo, plan) = plan_sync(&m).unwrap();
    assert_eq!(plan.delete, ["src/lib.rs"]);
    let mut tarball = Vec::new();
    write_sync_archive(&repo.root, &plan, &mut tarball).unwrap();
    for s in guest::sync_scripts(&m.guest_path, &plan.delete) {
        ok(guest(&s, &tarball));
    }
    let gw = g.path().join("myrepo");
    assert_eq!(std::fs::read(gw.join("src")).unwrap(), b"now a file\n");
}

#[test]
fn many_deletions_are_split_across_scripts() {
    let paths: Vec<String> = (0..5000)
        .map(|i| format!("dir/some file {i:05}.txt"))
        .collect();
    let scripts = guest::sync_scripts("/root/r", &paths);
    assert!(scripts.len() > 1);
    assert!(scripts.iter().all(|s| s.len() < 200 * 1024));
    assert!(scripts.last().unwrap().contains("tar -x"));
    assert!(!scripts[0].contains("tar -x"));
}

#[test]
fn export_applies_on_the_host_and_leaves_the_guest_index_alone() {
    let (_t, r) = scenario();
    let g = tempfile::tempdir().unwrap();
    let p = prepared(&r, g.path(), PrepareSpec::default());
    let gw = g.path().join("myrepo");
    // Work in the guest: a commit, then uncommitted changes and a new file, binary included.
    write(&gw, "guest.txt", b"from the guest\n");
    git(&gw, &["add", "guest.txt"]);
    git(&gw, &["commit", "-q", "-m", "guest work"]);
    write(&gw, "README.md", b"edited in guest\n");
    write(&gw, "new.bin", b"\x00\x01guest binary\xff");
    let index_before = std::fs::read(gw.join(".git/index")).unwrap();
    let status_before = status(&gw);
    let patch = ok(guest(
        &guest::export_script(&gw.display().to_string(), &p.repo.head),
        b"",
    ));
    assert_eq!(std::fs::read(gw.join(".git/index")).unwrap(), index_before);
    assert_eq!(status(&gw), status_before);
    let text = String::from_utf8_lossy(&patch);
    assert!(text.contains("GIT binary patch"), "{text}");
    assert!(text.contains("guest.txt"));

    // A clean checkout of the base on the host takes it, and ends up like the guest.
    let c = tempfile::tempdir().unwrap();
    let clone = c.path().join("c");
    git(
        c.path(),
        &["clone", "-q", r.to_str().unwrap(), clone.to_str().unwrap()],
    );
    git(&clone, &["checkout", "-q", &p.repo.head]);
    std::fs::write(c.path().join("p.patch"), &patch).unwrap();
    git(&clone, &["apply", "--check", "../p.patch"]);
    git(&clone, &["apply", "--index", "../p.patch"]);
    for f in [
        "README.md",
        "guest.txt",
        "new.bin",
        "src/lib.rs",
        "staged.txt",
    ] {
        assert_eq!(
            std::fs::read(clone.join(f)).unwrap(),
            std::fs::read(gw.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!clone.join("gone.txt").exists());

    let out = guest(
        &guest::export_script(&gw.display().to_string(), &"f".repeat(40)),
        b"",
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn cp_archives_round_trip_and_refuse_escapes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src dir");
    write(&src, "a/b.txt", b"b\n");
    write(&src, "x.sh", b"#!/bin/sh\n");
    std::fs::set_permissions(src.join("x.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a/b.txt", src.join("l")).unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    let mut tarball = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tarball);
        archive::append_tree(&mut b, Path::new("src dir"), &src).unwrap();
        b.finish().unwrap();
    }
    let dest = t.path().join("out/copy");
    let n = extract::extract_as(&tarball[..], &dest).unwrap();
    assert_eq!(n.files, 3);
    assert_eq!(std::fs::read(dest.join("a/b.txt")).unwrap(), b"b\n");
    assert_eq!(
        std::fs::read_link(dest.join("l")).unwrap(),
        Path::new("a/b.txt")
    );
    let mode = std::fs::metadata(dest.join("x.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    assert!(dest.join("empty").is_dir());

    // A link, then a file "through" it: refused.
    let mut evil = Vec::new();
    {
        let mut b = tar::Builder::new(&mut evil);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "top/esc", t.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "top/esc/pwned", &b"x"[..]).unwrap();
        b.finish().unwrap();
    }
    let e = extract::extract_as(&evil[..], &t.path().join("evil")).unwrap_err();
    assert!(matches!(e, WorkspaceError::UnsafeEntry { .. }), "{e}");
    assert!(!t.path().join("pwned").exists());
}

#[test]
fn guest_path_rules() {
    assert!(guest::validate_guest_path("/root/repo").is_ok());
    for bad in [
        "/",
        "/root",
        "root/x",
        "/root/../etc",
        "/root//x",
        "/root/x/",
    ] {
        assert!(guest::validate_guest_path(bad).is_err(), "{bad}");
    }
}

#[test]
fn in_dir_keeps_arguments_intact() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("it's here");
    std::fs::create_dir(&d).unwrap();
    let argv = guest::in_dir(
        &d.display().to_string(),
        &[
            "sh".into(),
            "-c".into(),
            "pwd; printf '%s|' \"$@\"".into(),
            "x".into(),
            "a b".into(),
            "$HOME".into(),
        ],
    );
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\na b|$HOME|", d.display())
    );
}

/// A hostile guest's stream: set-id and sticky bits, a device, a FIFO, a foreign owner, a link
/// pointing out and an entry through it, and a link planted at the destination beforehand.
#[test]
fn extraction_sanitises_a_hostile_stream() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"keep\n").unwrap();
    let entry = |b: &mut tar::Builder<&mut Vec<u8>>, kind, name: &str, mode, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1234);
        h.set_gid(1234);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut evil = Vec::new();
    {
        let mut b = tar::Builder::new(&mut evil);
        entry(&mut b, tar::EntryType::Directory, "box", 0o7777, b"");
        entry(
            &mut b,
            tar::EntryType::Regular,
            "box/tool",
            0o4755,
            b"#!/bin/sh\n",
        );
        entry(&mut b, tar::EntryType::Regular, "box/g", 0o2777, b"g");
        entry(&mut b, tar::EntryType::Directory, "box/d", 0o7777, b"");
        entry(&mut b, tar::EntryType::Char, "box/d/null", 0o666, b"");
        entry(&mut b, tar::EntryType::Block, "box/sda", 0o666, b"");
        entry(&mut b, tar::EntryType::Fifo, "box/fifo", 0o666, b"");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "box/out", &outside).unwrap();
        b.finish().unwrap();
    }
    let host = t.path().join("host");
    std::fs::create_dir(&host).unwrap();
    let dest = host.join("box");
    let done = extract::extract_as(&evil[..], &dest).unwrap();
    assert_eq!(done.skipped, 3, "{done:?}");
    let euid = nix::unistd::geteuid().as_raw();
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    for (name, want) in [("", 0o777), ("tool", 0o755), ("g", 0o777), ("d", 0o777)] {
        let m = std::fs::symlink_metadata(dest.join(name)).unwrap();
        assert_eq!(m.mode() & 0o7777, want & !umask, "{name}: {:o}", m.mode());
        assert_eq!(m.mode() & 0o7000, 0, "{name}: special bits kept");
        assert_eq!(
            m.uid(),
            euid,
            "{name}: not owned by the user running banger"
        );
    }
    for special in ["d/null", "sda", "fifo"] {
        assert!(!dest.join(special).exists(), "{special} was created");
    }
    assert!(
        std::fs::symlink_metadata(dest.join("out"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(!std::fs::read_dir(&dest).unwrap().any(|e| {
        let ft = e.unwrap().file_type().unwrap();
        ft.is_block_device() || ft.is_char_device() || ft.is_fifo()
    }));

    // Writing through the guest's link: refused, nothing outside touched.
    let mut through = Vec::new();
    {
        let mut b = tar::Builder::new(&mut through);
        entry(&mut b, tar::EntryType::Directory, "box", 0o755, b"");
        entry(
            &mut b,
            tar::EntryType::Regular,
            "box/out/victim",
            0o644,
            b"pwned",
        );
        b.finish().unwrap();
    }
    let e = extract::extract_as(&through[..], &dest).unwrap_err();
    assert!(matches!(e, WorkspaceError::UnsafeEntry { .. }), "{e}");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep\n");

    // A link planted where the file goes: replaced, never followed.
    let planted = host.join("tool");
    std::os::unix::fs::symlink(outside.join("victim"), &planted).unwrap();
    let mut one = Vec::new();
    {
        let mut b = tar::Builder::new(&mut one);
        entry(&mut b, tar::EntryType::Regular, "tool", 0o4755, b"new");
        b.finish().unwrap();
    }
    extract::extract_as(&one[..], &planted).unwrap();
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep\n");
    let m = std::fs::symlink_metadata(&planted).unwrap();
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7000, 0);

    // A link planted where a directory goes: refused, nothing written below it.
    let planted_dir = host.join("tree");
    std::os::unix::fs::symlink(&outside, &planted_dir).unwrap();
    let mut tree = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tree);
        entry(&mut b, tar::EntryType::Directory, "tree", 0o755, b"");
        entry(
            &mut b,
            tar::EntryType::Regular,
            "tree/victim",
            0o644,
            b"pwned",
        );
        b.finish().unwrap();
    }
    assert!(extract::extract_as(&tree[..], &planted_dir).is_err());
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep\n");
    assert!(!outside.join("tree").exists());

    // Patches: a link at the output path is replaced, not written through.
    let patch = host.join("out.patch");
    std::os::unix::fs::symlink(outside.join("victim"), &patch).unwrap();
    extract::write_file(&patch, b"diff\n").unwrap();
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep\n");
    assert_eq!(std::fs::read(&patch).unwrap(), b"diff\n");
    assert!(std::fs::symlink_metadata(&patch).unwrap().is_file());
}

/// A guest's stream cannot write more than it carries: a GNU sparse entry (a few bytes
/// declaring 64 MiB of holes) and an entry declaring more than the destination's free space
/// are refused before anything of them is written.
#[test]
fn extraction_refuses_sparse_and_oversized_entries() {
    fn oct(v: u64) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..11].copy_from_slice(format!("{v:011o}").as_bytes());
        out
    }
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("f");

    let mut h = tar::Header::new_gnu();
    h.set_path("f").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    let real = 64u64 << 20;
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.realsize = oct(real);
        gnu.sparse[0].offset = oct(real - 512);
        gnu.sparse[0].numbytes = oct(512);
    }
    h.set_cksum();
    let mut sparse = Vec::new();
    {
        let mut b = tar::Builder::new(&mut sparse);
        b.append(&h, &[b'x'; 512][..]).unwrap();
        b.finish().unwrap();
    }
    let e = extract::extract_as(&sparse[..], &dest).unwrap_err();
    assert!(e.to_string().contains("sparse"), "{e}");
    assert!(std::fs::symlink_metadata(&dest).is_err(), "a file was made");

    // A header declaring a petabyte, followed by one block: refused up front.
    let mut h = tar::Header::new_gnu();
    h.set_path("f").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(1 << 50);
    h.set_cksum();
    let mut huge = h.as_bytes().to_vec();
    huge.extend_from_slice(&[b'x'; 512]);
    let e = extract::extract_as(&huge[..], &dest).unwrap_err();
    assert!(e.to_string().contains("bytes free"), "{e}");
    assert!(std::fs::symlink_metadata(&dest).is_err(), "a file was made");
}

/// Directories that were already at the destination keep their mode whatever the stream says;
/// only directories the extraction makes take the stream's permission bits.
#[test]
fn extraction_keeps_the_mode_of_existing_directories() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("box");
    std::fs::create_dir_all(dest.join("sub")).unwrap();
    for d in [&dest, &dest.join("sub")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut tarball = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tarball);
        for (name, mode) in [("box", 0o000), ("box/sub", 0o000), ("box/new", 0o700)] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            b.append_data(&mut h, name, &[][..]).unwrap();
        }
        b.finish().unwrap();
    }
    extract::extract_as(&tarball[..], &dest).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dest), 0o755);
    assert_eq!(mode(&dest.join("sub")), 0o755);
    assert_eq!(mode(&dest.join("new")), 0o700);
}
