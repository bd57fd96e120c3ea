//! `banger ssh-config`: show banger's generated ssh config, and include it from
//! `~/.ssh/config` (`--install`) or stop including it (`--uninstall`).
//!
//! The daemon writes `<state_dir>/ssh/ssh_config` (one `Host <name>.vm` block per VM). Install
//! adds exactly one marker-fenced block at the top of `~/.ssh/config`, because an `Include`
//! applies to every host only before the first `Host`/`Match` line:
//!
//! ```text
//! # >>> banger >>>
//! # Added by `banger ssh-config --install`; `banger ssh-config --uninstall` removes it.
//! Include /home/me/.local/state/banger/ssh/ssh_config
//! # <<< banger <<<
//! ```
//!
//! Rules: installing twice changes nothing; uninstall removes exactly the block, so the file is
//! byte-identical to before the install. When install had to create `~/.ssh/config`, the block
//! says so, and uninstall deletes the file if nothing else was added to it since; `~/.ssh`
//! itself is never removed. Nothing but `~/.ssh/config` is ever written or deleted (a symlinked
//! config is edited at its target), and a block missing its end marker is left for the user
//! to fix rather than guessed at.

use std::io::Write;
use std::path::{Path, PathBuf};

use banger_protocol::{DaemonStatus, Request};

use crate::Ctx;
use crate::error::CliError;

pub const BEGIN: &str = "# >>> banger >>>";
pub const END: &str = "# <<< banger <<<";
const ABOUT: &str =
    "# Added by `banger ssh-config --install`; `banger ssh-config --uninstall` removes it.";
const CREATED: &str =
    "# banger created this file; --uninstall deletes it if nothing else is in it.";

/// The block install adds.
pub fn block(include: &Path, created_file: bool) -> String {
    let path = include.display().to_string();
    let arg = if path.chars().any(|c| c.is_whitespace() || c == '"') {
        format!("\"{}\"", path.replace('"', "\\\""))
    } else {
        path
    };
    let created = if created_file {
        format!("{CREATED}\n")
    } else {
        String::new()
    };
    format!("{BEGIN}\n{ABOUT}\n{created}Include {arg}\n{END}\n")
}

/// A banger block found in a file: its byte range (end marker line and its newline included).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    range: std::ops::Range<usize>,
    created_file: bool,
}

fn find_blocks(text: &str, file: &Path) -> Result<Vec<Found>, String> {
    let mut found = Vec::new();
    let mut open: Option<(usize, bool)> = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n').trim_end_matches('\r');
        let start = pos;
        pos += line.len();
        match (bare, &mut open) {
            (BEGIN, None) => open = Some((start, false)),
            (CREATED, Some((_, created))) => *created = true,
            (END, Some((begin, created))) => {
                found.push(Found {
                    range: *begin..pos,
                    created_file: *created,
                });
                open = None;
            }
            (BEGIN, Some(_)) | (END, None) => {
                return Err(format!(
                    "{} has a banger block with a missing \"{}\" line; fix it by hand, then run the command again",
                    file.display(),
                    if bare == BEGIN { END } else { BEGIN },
                ));
            }
            _ => {}
        }
    }
    if open.is_some() {
        return Err(format!(
            "{} has a banger block with no \"{END}\" line; fix it by hand, then run the command again",
            file.display()
        ));
    }
    Ok(found)
}

/// What install makes of the file's current text (`None`: no file). `Ok(None)`: already
/// installed, nothing to write.
pub fn install_text(
    current: Option<&str>,
    include: &Path,
    file: &Path,
) -> Result<Option<String>, String> {
    let Some(text) = current else {
        return Ok(Some(block(include, true)));
    };
    let found = find_blocks(text, file)?;
    let created = found.iter().any(|f| f.created_file);
    let wanted = block(include, created);
    if let [only] = found.as_slice()
        && only.range.start == 0
        && text[only.range.clone()] == wanted
    {
        return Ok(None);
    }
    // An older block (another path, or not at the top) is replaced by one at the top.
    let mut rest = text.to_string();
    for f in found.iter().rev() {
        rest.replace_range(f.range.clone(), "");
    }
    Ok(Some(format!("{wanted}{rest}")))
}

/// What uninstall does to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// No banger block: nothing to do.
    NotInstalled,
    /// Write this text back.
    Write(String),
    /// Install created the file and nothing else is in it: delete it.
    Delete,
}

pub fn uninstall_text(text: &str, file: &Path) -> Result<Removal, String> {
    let found = find_blocks(text, file)?;
    if found.is_empty() {
        return Ok(Removal::NotInstalled);
    }
    let mut rest = text.to_string();
    for f in found.iter().rev() {
        rest.replace_range(f.range.clone(), "");
    }
    if rest.is_empty() && found.iter().any(|f| f.created_file) {
        Ok(Removal::Delete)
    } else {
        Ok(Removal::Write(rest))
    }
}

/// `~/.ssh/config` of the user running banger (`$HOME`).
pub fn user_config_path() -> Result<PathBuf, CliError> {
    match std::env::var_os("HOME") {
        Some(h) if Path::new(&h).is_absolute() => Ok(Path::new(&h).join(".ssh").join("config")),
        _ => Err(CliError::local(
            "HOME is not set to an absolute path; cannot find ~/.ssh/config",
        )),
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::local(format!("{what} {}: {e}", path.display()))
}

/// Reads the config; `None` when there is none.
fn read_config(path: &Path) -> Result<Option<String>, CliError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
            CliError::local(format!(
                "{} is not UTF-8 text; not editing it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path, e)),
    }
}

/// Replaces the file's content through a temp file and a rename in its directory, keeping its
/// mode (0600 for a new file). A symlink is followed: its target is what gets replaced.
fn write_config(path: &Path, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).map_err(|e| io_err("resolving", path, e))?
        }
        _ => path.to_path_buf(),
    };
    let mode = std::fs::metadata(&target)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(".{name}.banger-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("writing", &target, e));
    }
    Ok(())
}

/// `~/.ssh`, created 0700 when missing (an existing one is left as it is).
fn ensure_ssh_dir(config: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = config.parent() else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("creating", dir, e))
}

/// Adds the block; returns whether the file changed.
pub fn install(config: &Path, include: &Path) -> Result<bool, CliError> {
    let current = read_config(config)?;
    let Some(text) = install_text(current.as_deref(), include, config).map_err(CliError::local)?
    else {
        return Ok(false);
    };
    ensure_ssh_dir(config)?;
    write_config(config, &text)?;
    Ok(true)
}

/// Removes the block; returns whether there was one.
pub fn uninstall(config: &Path) -> Result<bool, CliError> {
    let Some(current) = read_config(config)? else {
        return Ok(false);
    };
    match uninstall_text(&current, config).map_err(CliError::local)? {
        Removal::NotInstalled => Ok(false),
        Removal::Write(text) => write_config(config, &text).map(|()| true),
        Removal::Delete => std::fs::remove_file(config)
            .map(|()| true)
            .map_err(|e| io_err("removing", config, e)),
    }
}

/// The generated config's path, from the daemon.
fn generated_path(ctx: &mut Ctx<'_>) -> Result<PathBuf, CliError> {
    let status: DaemonStatus = ctx
        .request(&Request::DaemonStatus)?
        .decode("daemon.status")?;
    let path = status
        .ssh_config
        .unwrap_or_else(|| status.state_dir.join("ssh").join("ssh_config"));
    // The path becomes a line of ~/.ssh/config: a newline or control character in it would
    // add lines (a ProxyCommand) of the daemon's choosing.
    let text = path.to_string_lossy();
    if !path.is_absolute() || text.chars().any(|c| c.is_control()) {
        return Err(CliError::local(format!(
            "the daemon named an unusable ssh config path {text:?}; not including it"
        )));
    }
    Ok(path)
}

pub fn run(ctx: &mut Ctx<'_>, do_install: bool, do_uninstall: bool) -> Result<(), CliError> {
    if do_uninstall {
        let config = user_config_path()?;
        return if uninstall(&config)? {
            ctx.print(&format!(
                "removed banger's Include from {}\n",
                config.display()
            ))
        } else {
            ctx.print(&format!(
                "no banger block in {}; nothing to remove\n",
                config.display()
            ))
        };
    }
    let generated = generated_path(ctx)?;
    if do_install {
        let config = user_config_path()?;
        return if install(&config, &generated)? {
            ctx.print(&format!(
                "added `Include {}` to {}: ssh NAME.vm now reaches banger's VMs\n",
                generated.display(),
                config.display()
            ))
        } else {
            ctx.print(&format!(
                "{} already includes {}\n",
                config.display(),
                generated.display()
            ))
        };
    }
    let text = match std::fs::read_to_string(&generated) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# (not written yet: bangerd writes it at start-up and whenever a VM changes)\n".into()
        }
        Err(e) => return Err(io_err("reading", &generated, e)),
    };
    ctx.print(&format!("# {}\n{text}", generated.display()))?;
    let installed = user_config_path()
        .ok()
        .and_then(|c| read_config(&c).ok().flatten())
        .is_some_and(|t| t.lines().any(|l| l == BEGIN));
    if !installed {
        ctx.note("use it from plain ssh with: banger ssh-config --install");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/home/me/.ssh/config";

    fn inst(current: Option<&str>) -> Option<String> {
        install_text(current, Path::new("/s/ssh/ssh_config"), Path::new(FILE)).unwrap()
    }

    fn uninst(text: &str) -> Removal {
        uninstall_text(text, Path::new(FILE)).unwrap()
    }

    const USER: &str = "Host work\n    User me\n\nHost *\n    ServerAliveInterval 30\n";

    #[test]
    fn install_puts_one_block_at_the_top_and_uninstall_restores_the_bytes() {
        for original in [USER, "", "\n", "Host x", "# only a comment\r\nUser me\r\n"] {
            let installed = inst(Some(original)).unwrap();
            assert!(installed.starts_with(&format!("{BEGIN}\n")), "{installed}");
            assert!(installed.ends_with(original));
            assert!(installed.contains("\nInclude /s/ssh/ssh_config\n"));
            assert_eq!(installed.matches(BEGIN).count(), 1);
            assert_eq!(
                inst(Some(&installed)),
                None,
                "installing twice changes nothing"
            );
            assert_eq!(
                uninst(&installed),
                Removal::Write(original.to_string()),
                "{original:?}"
            );
        }
    }

    #[test]
    fn a_file_install_created_is_deleted_only_while_empty() {
        let created = inst(None).unwrap();
        assert!(created.contains(CREATED));
        assert_eq!(inst(Some(&created)), None);
        assert_eq!(uninst(&created), Removal::Delete);
        // The user added a host since: the file stays, with their text only.
        let edited = format!("{created}Host mine\n    User me\n");
        assert_eq!(inst(Some(&edited)), None);
        assert_eq!(
            uninst(&edited),
            Removal::Write("Host mine\n    User me\n".into())
        );
    }

    #[test]
    fn a_moved_or_stale_block_is_replaced_at_the_top() {
        let old = block(Path::new("/old/ssh_config"), false);
        let text = format!("{USER}{old}");
        let new = inst(Some(&text)).unwrap();
        assert!(new.starts_with(&block(Path::new("/s/ssh/ssh_config"), false)));
        assert!(!new.contains("/old/"));
        assert_eq!(uninst(&new), Removal::Write(USER.to_string()));
    }

    #[test]
    fn uninstall_without_a_block_does_nothing() {
        assert_eq!(uninst(USER), Removal::NotInstalled);
        assert_eq!(uninst(""), Removal::NotInstalled);
    }

    #[test]
    fn a_broken_block_is_left_alone() {
        for text in [
            format!("{BEGIN}\nInclude /x\n{USER}"),
            format!("{USER}{END}\n"),
            format!("{BEGIN}\n{BEGIN}\n{END}\n"),
        ] {
            let e = uninstall_text(&text, Path::new(FILE)).unwrap_err();
            assert!(e.contains(FILE) && e.contains("by hand"), "{e}");
            assert!(install_text(Some(&text), Path::new("/s"), Path::new(FILE)).is_err());
        }
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        let b = block(Path::new("/home/me/My State/ssh_config"), false);
        assert!(
            b.contains("\nInclude \"/home/me/My State/ssh_config\"\n"),
            "{b}"
        );
    }

    #[test]
    fn files_on_disk_install_and_uninstall_byte_identically() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        let config = ssh.join("config");
        let include = Path::new("/s/ssh/ssh_config");

        // No ~/.ssh at all: created 0700, file 0600; uninstall deletes the file only.
        assert!(install(&config, include).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ssh), 0o700);
        assert_eq!(mode(&config), 0o600);
        assert!(!install(&config, include).unwrap());
        assert!(uninstall(&config).unwrap());
        assert!(!config.exists());
        assert!(ssh.is_dir());
        assert!(!uninstall(&config).unwrap());

        // An existing config with its own mode, next to files that must survive (bug 15).
        std::fs::write(&config, USER).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
        for f in ["id_ed25519", "id_ed25519.pub", "known_hosts"] {
            std::fs::write(ssh.join(f), f).unwrap();
        }
        assert!(install(&config, include).unwrap());
        assert_eq!(mode(&config), 0o640);
        assert!(uninstall(&config).unwrap());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), USER);
        let mut names: Vec<_> = std::fs::read_dir(&ssh)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["config", "id_ed25519", "id_ed25519.pub", "known_hosts"]
        );
        for f in ["id_ed25519", "id_ed25519.pub", "known_hosts"] {
            assert_eq!(std::fs::read_to_string(ssh.join(f)).unwrap(), f);
        }

        // A symlinked config (dotfiles): the link stays a link, its target is edited.
        let real = home.path().join("dotfiles-ssh-config");
        std::fs::write(&real, USER).unwrap();
        std::fs::remove_file(&config).unwrap();
        std::os::unix::fs::symlink(&real, &config).unwrap();
        assert!(install(&config, include).unwrap());
        assert!(
            std::fs::symlink_metadata(&config)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(std::fs::read_to_string(&real).unwrap().starts_with(BEGIN));
        assert!(uninstall(&config).unwrap());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), USER);
    }
}
