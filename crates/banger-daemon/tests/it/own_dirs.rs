//! Issue 10 item 6: bangerd makes `state_dir`, `runtime_dir` and `cache_dir` owner-only, so it
//! must never take over (and re-mode) a directory that is not banger's: one with other content,
//! or one owned by someone else. It refuses with one error naming the key and the path, and the
//! directory keeps its mode, owner and content. (`/` and the system directories are refused when
//! the config is read: banger-config's `own_dirs_refuse_root_system_dirs_and_home` and
//! `dirs::tests`; not tried here, where a regression would re-mode `/` of the test machine.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_testkit::TestEnv;

/// Points `key` of the environment's config at `dir`.
fn set_dir(env: &TestEnv, key: &str, dir: &Path) {
    let path = env.root().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let prefix = format!("{key} = ");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{key} = \"{}\"\n", dir.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(text.contains(&format!("{key} = \"{}\"", dir.display())));
    std::fs::write(&path, text).unwrap();
}

/// Runs bangerd, which must exit on its own with an error; its stderr.
fn refused(env: &TestEnv) -> String {
    let mut child = env
        .daemon_command()
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bangerd");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bangerd started instead of refusing its directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "bangerd exited 0: {err}");
    err
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

/// A 0755 directory holding someone's file.
fn occupied(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("notes.txt"), b"not banger's").unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn daemon_refuses_dirs_that_are_not_its_own() {
    let env = TestEnv::new("");
    for key in ["state_dir", "runtime_dir", "cache_dir"] {
        let fresh = TestEnv::new("");
        let dir = occupied(fresh.root(), &format!("occupied-{key}"));
        set_dir(&fresh, key, &dir);
        let err = refused(&fresh);
        assert!(
            err.contains(&format!("{key} = {}", dir.display())),
            "the error names neither key nor path: {err}"
        );
        assert!(err.contains("is not banger's"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(mode(&dir), 0o755, "{key}: the directory was re-moded");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "{key}: the directory's content changed"
        );
    }

    // Someone else's (empty) directory: root could re-mode it, and must not.
    if nix::unistd::geteuid().is_root() {
        let theirs = env.root().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        set_dir(&env, "state_dir", &theirs);
        let err = refused(&env);
        assert!(
            err.contains(&format!("state_dir = {}", theirs.display())),
            "{err}"
        );
        assert!(err.contains("owned by uid 65534"), "{err}");
        let md = std::fs::metadata(&theirs).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o7777), (65534, 0o755));
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    } else {
        println!("SKIP: the foreign-owner case needs root (chown)");
    }
}

/// An empty directory, or one that already holds banger's files, is taken over and made
/// owner-only; the daemon then runs.
#[test]
fn daemon_takes_over_an_empty_state_dir() {
    let mut env = TestEnv::new("");
    let dir = env.root().join("empty-state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    set_dir(&env, "state_dir", &dir);
    env.start_daemon();
    assert_eq!(mode(&dir), 0o700);
    assert!(dir.join("banger.db").exists());
    env.stop_daemon();
    // Restarting over its own (now non-empty) directory works.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    env.start_daemon();
    assert_eq!(mode(&dir), 0o700);
    env.stop_daemon();
}

/// Probe finding 1: another user links `/tmp/banger-<uid>` (here a sticky shared dir of the
/// test) to the victim's state dir. bangerd must refuse the link, naming it and its owner,
/// before touching anything: no VM dir of the state dir is deleted, nothing is written there.
#[test]
fn daemon_refuses_a_runtime_dir_linked_by_another_user() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root to make a link owned by another user");
        return;
    }
    let env = TestEnv::new("");
    let state = env.root().join("victim-state");
    let vm = state.join("vms/0123456789ab");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::write(vm.join("root.ext4"), b"the disk").unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let shared = env.root().join("shared-tmp");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = shared.join("banger-0");
    std::os::unix::fs::symlink(&state, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    set_dir(&env, "state_dir", &state);
    set_dir(&env, "runtime_dir", &link);
    let err = refused(&env);
    assert!(err.contains(&link.display().to_string()), "{err}");
    assert!(err.contains("symbolic link owned by uid 65534"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(std::fs::read(vm.join("root.ext4")).unwrap(), b"the disk");
    let names: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("vms")],
        "state dir changed"
    );
}

/// Probe finding 2: a project folder with a `build/` dir (a banger name) holding a link out of
/// it is not banger's state dir: refused, and nothing in it or behind the link changes.
#[test]
fn daemon_refuses_a_project_with_a_build_dir() {
    let env = TestEnv::new("");
    let proj = env.root().join("proj");
    std::fs::create_dir_all(proj.join("build/obj")).unwrap();
    std::fs::write(proj.join("main.c"), b"int main;").unwrap();
    std::fs::write(proj.join("build/obj/a.o"), b"obj").unwrap();
    let precious = env.root().join("precious");
    std::fs::create_dir_all(precious.join("sub")).unwrap();
    std::fs::write(precious.join("sub/data.txt"), b"keep").unwrap();
    std::os::unix::fs::symlink(&precious, proj.join("build/deps")).unwrap();
    std::fs::set_permissions(&proj, std::fs::Permissions::from_mode(0o755)).unwrap();
    set_dir(&env, "state_dir", &proj);
    let err = refused(&env);
    assert!(
        err.contains(&format!("state_dir = {}", proj.display())),
        "{err}"
    );
    assert_eq!(mode(&proj), 0o755);
    assert_eq!(std::fs::read(proj.join("build/obj/a.o")).unwrap(), b"obj");
    assert_eq!(
        std::fs::read(precious.join("sub/data.txt")).unwrap(),
        b"keep"
    );
}
