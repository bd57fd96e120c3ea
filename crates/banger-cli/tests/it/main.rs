//! Runs the built `banger` binary: help, input validation, and `daemon status` with no daemon.

mod trust;

use std::path::Path;
use std::process::{Command, Output};

fn banger(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(args)
        .env_remove("BANGER_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .expect("running banger")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A config whose directories all live under `root`, so nothing touches the real user's.
fn write_config(root: &Path) -> std::path::PathBuf {
    let path = root.join("config.toml");
    let body = format!(
        "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\ncache_dir = \"{0}/cache\"\n",
        root.display()
    );
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn help_lists_the_command_groups() {
    let out = banger(&["--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for word in ["vm", "image", "kernel", "daemon", "--config"] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
    let out = banger(&["vm", "create", "--help"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("--disk-size"));
}

#[test]
fn bad_vm_name_exits_2_with_one_line() {
    let out = banger(&["vm", "start", "Bad_Name"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("banger: "), "{err}");
    assert!(err.contains("Bad_Name"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_size_exits_2_naming_the_flag() {
    let out = banger(&["vm", "create", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--memory") && err.contains("\"lots\""),
        "{err}"
    );
}

#[test]
fn daemon_status_without_a_daemon_says_not_running() {
    let t = tempfile::tempdir().unwrap();
    let config = write_config(t.path());
    let out = banger(&["--config", config.to_str().unwrap(), "daemon", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("not running"),
        "{}",
        text(&out.stdout)
    );
    // Status never starts a daemon.
    assert!(!t.path().join("run/bangerd.sock").exists());
    assert!(!t.path().join("run/bangerd.start.log").exists());
}

#[test]
fn daemon_stop_without_a_daemon_is_harmless() {
    let t = tempfile::tempdir().unwrap();
    let config = write_config(t.path());
    let out = Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(["daemon", "stop"])
        .env("BANGER_CONFIG", &config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("not running"));
    assert!(
        !t.path().join("run").exists(),
        "stop must not start anything"
    );
}

#[test]
fn a_broken_config_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("config.toml");
    std::fs::write(&config, "bogus = 1\n").unwrap();
    let out = banger(&["--config", config.to_str().unwrap(), "vm", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("banger: invalid config file"), "{err}");
    assert!(err.contains("bogus"), "{err}");
}
