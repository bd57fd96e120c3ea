//! The account sessions run as: the agent's own user (root in the guest), looked up in the
//! image's `/etc/passwd` without NSS (the agent is a static binary; glibc's NSS would try to
//! load shared modules).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The shell used when the passwd entry names none, or one that is not an executable file.
pub const FALLBACK_SHELL: &str = "/bin/sh";

/// The fields of a passwd entry a session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// The entry for `uid` in passwd-format `text`, if any. Malformed lines are skipped.
pub fn lookup(text: &str, uid: u32) -> Option<User> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[2].parse::<u32>().ok()? != uid || f[0].is_empty() {
            return None;
        }
        Some(User {
            name: f[0].to_string(),
            home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
            shell: PathBuf::from(f[6]),
        })
    })
}

/// The user this process runs as (in the guest: root), read from `passwd`. Without an entry:
/// `root`/`/root` for uid 0, else the uid and `/`, with [`FALLBACK_SHELL`]. The shell is
/// replaced by [`FALLBACK_SHELL`] unless it is an executable file, like a container runtime
/// (OpenSSH would refuse the login; banger would rather get a shell).
pub fn current(passwd: &Path) -> User {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let text = std::fs::read_to_string(passwd).unwrap_or_default();
    let mut user = lookup(&text, uid).unwrap_or_else(|| User {
        name: if uid == 0 {
            "root".into()
        } else {
            uid.to_string()
        },
        home: PathBuf::from(if uid == 0 { "/root" } else { "/" }),
        shell: PathBuf::from(FALLBACK_SHELL),
    });
    if !is_executable(&user.shell) {
        user.shell = PathBuf::from(FALLBACK_SHELL);
    }
    user
}

fn is_executable(p: &Path) -> bool {
    p.is_absolute()
        && std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# comment
root:x:0:0:root:/root:/bin/bash
broken line
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nohome:x:7:7:::/bin/ash
";

    #[test]
    fn finds_entries_by_uid() {
        assert_eq!(
            lookup(PASSWD, 0),
            Some(User {
                name: "root".into(),
                home: "/root".into(),
                shell: "/bin/bash".into()
            })
        );
        assert_eq!(lookup(PASSWD, 1).unwrap().name, "daemon");
        assert_eq!(lookup(PASSWD, 7).unwrap().home, Path::new("/"));
        assert_eq!(lookup(PASSWD, 42), None);
        assert_eq!(lookup("", 0), None);
    }

    #[test]
    fn current_user_falls_back_to_bin_sh() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let passwd = d.path().join("passwd");
        std::fs::write(
            &passwd,
            format!("me:x:{uid}:0::/home/me:/nonexistent/shell\n"),
        )
        .unwrap();
        let u = current(&passwd);
        assert_eq!(u.name, "me");
        assert_eq!(u.home, Path::new("/home/me"));
        assert_eq!(u.shell, Path::new(FALLBACK_SHELL));
        let u = current(&d.path().join("missing"));
        assert_eq!(u.shell, Path::new(FALLBACK_SHELL));
        if uid == 0 {
            assert_eq!(
                (u.name.as_str(), u.home.as_path()),
                ("root", Path::new("/root"))
            );
        }
    }
}
