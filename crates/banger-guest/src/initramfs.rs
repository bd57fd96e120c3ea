//! banger's initramfs: the agent as `/init`, the directories it mounts on, `/dev/console`, and
//! optionally the kernel modules the agent must load before it can see its disks and network.
//!
//! The archive is uncompressed newc, which every kernel unpacks whatever its `CONFIG_RD_*`
//! options; it is a few MiB and is read from the host page cache, so compression would only cost
//! boot time. It is built without root and is byte-for-byte reproducible.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::cpio::{CpioError, NewcWriter};

/// Where the modules live inside the initramfs.
pub const MODULES_DIR: &str = "/lib/modules";
/// The file listing the modules to load, one `.ko` file name per line, dependencies first.
pub const LOAD_ORDER_FILE: &str = "/lib/modules/load-order";
/// Directories the agent needs before it can do anything.
pub const DIRS: [&str; 5] = ["dev", "proc", "sys", "run", "newroot"];

/// Building the initramfs failed; each variant names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent binary {path} is not an executable file")]
    Agent { path: PathBuf },
    #[error("modules dir {dir}: load-order line {line}: {reason}")]
    LoadOrder {
        dir: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("writing initramfs {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: CpioError,
    },
}

/// What went into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSummary {
    pub path: PathBuf,
    pub bytes: u64,
    /// Module file names in load order.
    pub load_order: Vec<String>,
    /// Every `.ko` included, sorted (a superset of `load_order`).
    pub modules: Vec<String>,
}

/// Parses a load-order file: one module file name per line; blank lines and `#` comments are
/// skipped. Returns `(line number, name)` pairs, or the first bad line and why.
pub fn parse_load_order(text: &str) -> Result<Vec<(usize, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('/') || !line.ends_with(".ko") || line == ".ko" {
            return Err((i + 1, format!("{line:?} is not a bare .ko file name")));
        }
        out.push((i + 1, line.to_string()));
    }
    Ok(out)
}

/// Writes banger's initramfs to `out` (via a temporary file renamed into place): `/init` is
/// `agent` (mode 0755); `/dev/console` is char device 5:1; `/dev`, `/proc`, `/sys`, `/run` and
/// `/newroot` exist; and when `modules_dir` is given, its `*.ko` files and its `load-order` file
/// go to `/lib/modules/`. Every module named in `load-order` must be present.
pub fn build_initramfs(
    agent: &Path,
    modules_dir: Option<&Path>,
    out: &Path,
) -> Result<InitramfsSummary, InitramfsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| InitramfsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(agent).map_err(|source| InitramfsError::Read {
            path: agent.to_path_buf(),
            source,
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(InitramfsError::Agent {
                path: agent.to_path_buf(),
            });
        }
    }
    let agent_bytes = read(agent)?;

    let mut load_order = Vec::new();
    let mut modules: Vec<(String, Vec<u8>)> = Vec::new();
    let mut load_order_text = String::new();
    if let Some(dir) = modules_dir {
        let lo_path = dir.join("load-order");
        load_order_text = String::from_utf8_lossy(&read(&lo_path)?).into_owned();
        let entries = std::fs::read_dir(dir).map_err(|source| InitramfsError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(|source| InitramfsError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".ko") && e.path().is_file() {
                names.push(name);
            }
        }
        names.sort();
        for (line, name) in parse_load_order(&load_order_text).map_err(|(line, reason)| {
            InitramfsError::LoadOrder {
                dir: dir.to_path_buf(),
                line,
                reason,
            }
        })? {
            if !names.contains(&name) {
                return Err(InitramfsError::LoadOrder {
                    dir: dir.to_path_buf(),
                    line,
                    reason: format!("{name} is not in the directory"),
                });
            }
            load_order.push(name);
        }
        for name in names {
            let bytes = read(&dir.join(&name))?;
            modules.push((name, bytes));
        }
    }

    let tmp = temp_path(out);
    let result = write_archive(
        &tmp,
        &agent_bytes,
        modules_dir.map(|_| (&modules, load_order_text.as_str())),
    )
    .and_then(|bytes| {
        std::fs::rename(&tmp, out).map_err(CpioError::Io)?;
        Ok(bytes)
    });
    match result {
        Ok(bytes) => Ok(InitramfsSummary {
            path: out.to_path_buf(),
            bytes,
            load_order,
            modules: modules.into_iter().map(|(n, _)| n).collect(),
        }),
        Err(source) => {
            let _ = std::fs::remove_file(&tmp);
            Err(InitramfsError::Write {
                path: out.to_path_buf(),
                source,
            })
        }
    }
}

fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "initramfs".into());
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

type Modules<'a> = (&'a Vec<(String, Vec<u8>)>, &'a str);

fn write_archive(tmp: &Path, agent: &[u8], modules: Option<Modules<'_>>) -> Result<u64, CpioError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)?;
    let mut w = NewcWriter::new(BufWriter::new(file));
    for d in DIRS {
        w.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for init's stdio before the agent mounts devtmpfs, so the
    // node must be in the archive itself.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, agent)?;
    if let Some((mods, load_order)) = modules {
        w.dir("lib", 0o755)?;
        w.dir("lib/modules", 0o755)?;
        for (name, bytes) in mods {
            w.file(&format!("lib/modules/{name}"), 0o644, bytes)?;
        }
        w.file("lib/modules/load-order", 0o644, load_order.as_bytes())?;
    }
    let (buf, bytes) = w.finish()?;
    let file = buf.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{S_IFCHR, S_IFDIR, S_IFREG, parse};
    use std::os::unix::fs::PermissionsExt;

    fn fake_agent(dir: &Path) -> PathBuf {
        let p = dir.join("banger-agent");
        std::fs::write(&p, b"\x7fELF fake agent").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn minimal_initramfs_has_init_console_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(dir.path());
        let out = dir.path().join("initrd.cpio");
        let s = build_initramfs(&agent, None, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(s.bytes, bytes.len() as u64);
        let entries = parse(&bytes).unwrap();
        let find = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        for d in DIRS {
            assert_eq!(find(d).file_type(), S_IFDIR);
        }
        let init = find("init");
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, b"\x7fELF fake agent");
        let console = find("dev/console");
        assert_eq!(
            (console.file_type(), console.rdev_major, console.rdev_minor),
            (S_IFCHR, 5, 1)
        );
        assert!(!entries.iter().any(|e| e.name.starts_with("lib")));
        // No temp file left behind, and rebuilding gives identical bytes.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let out2 = dir.path().join("again.cpio");
        build_initramfs(&agent, None, &out2).unwrap();
        assert_eq!(std::fs::read(&out2).unwrap(), bytes);
    }

    #[test]
    fn modules_and_load_order_are_included() {
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(dir.path());
        let m = dir.path().join("modules");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("virtio.ko"), b"v").unwrap();
        std::fs::write(m.join("virtio_blk.ko"), b"vb").unwrap();
        std::fs::write(m.join("unlisted.ko"), b"u").unwrap();
        std::fs::write(m.join("README"), b"not a module").unwrap();
        std::fs::write(
            m.join("load-order"),
            "# deps first\nvirtio.ko\n\nvirtio_blk.ko\n",
        )
        .unwrap();
        let out = dir.path().join("initrd");
        let s = build_initramfs(&agent, Some(&m), &out).unwrap();
        assert_eq!(s.load_order, ["virtio.ko", "virtio_blk.ko"]);
        assert_eq!(s.modules, ["unlisted.ko", "virtio.ko", "virtio_blk.ko"]);
        let entries = parse(&std::fs::read(&out).unwrap()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"lib/modules/virtio_blk.ko"));
        assert!(!names.contains(&"lib/modules/README"));
        let lo = entries
            .iter()
            .find(|e| e.name == "lib/modules/load-order")
            .unwrap();
        assert_eq!(lo.data, b"# deps first\nvirtio.ko\n\nvirtio_blk.ko\n");
        assert!(
            names.iter().position(|n| *n == "lib")
                < names.iter().position(|n| *n == "lib/modules/virtio.ko")
        );
    }

    #[test]
    fn errors_name_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(dir.path());
        let out = dir.path().join("initrd");
        let m = dir.path().join("mods");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("load-order"), "virtio.ko\nmissing.ko\n").unwrap();
        std::fs::write(m.join("virtio.ko"), b"v").unwrap();
        let e = build_initramfs(&agent, Some(&m), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("missing.ko"), "{e}");
        std::fs::write(m.join("load-order"), "../evil.ko\n").unwrap();
        let e = build_initramfs(&agent, Some(&m), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("evil"), "{e}");
        std::fs::remove_file(m.join("load-order")).unwrap();
        let e = build_initramfs(&agent, Some(&m), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("load-order"), "{e}");
        let e = build_initramfs(&dir.path().join("nope"), None, &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = build_initramfs(&agent, None, &out).unwrap_err().to_string();
        assert!(e.contains("not an executable"), "{e}");
        assert!(!out.exists());
    }

    #[test]
    fn load_order_parser() {
        assert_eq!(
            parse_load_order("a.ko\n  b.ko  \n#c.ko\n").unwrap(),
            [(1, "a.ko".to_string()), (2, "b.ko".to_string())]
        );
        assert_eq!(parse_load_order("a.ko\nb.ko.xz\n").unwrap_err().0, 2);
        assert_eq!(parse_load_order("dir/a.ko").unwrap_err().0, 1);
    }
}
