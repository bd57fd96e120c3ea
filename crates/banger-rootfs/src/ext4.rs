//! Tree → ext4: `mkfs.ext4 -d` for structure and content, one read-only `debugfs` run to
//! learn the inode number of every path, one `debugfs -w` run for owner/mode/xattr fixups.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use crate::error::{RootfsError, show};
use crate::name;
use crate::table::{Node, NodeKind};
use crate::{BuildOptions, Progress, RootfsReport, Tree, cancelled};

const MIB: u64 = 1 << 20;
/// ext4's root directory inode.
const ROOT_INO: u32 = 2;
/// Longest line debugfs reads from a command file (its `BUFSIZ` buffer), with margin.
const MAX_LINE: usize = 8000;

/// Looks for an e2fsprogs tool in `$PATH`, then in the sbin directories an unprivileged
/// user's `$PATH` usually lacks.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn tool(name: &'static str) -> Result<PathBuf, RootfsError> {
    find_tool(name).ok_or(RootfsError::ToolMissing(name))
}

/// Removes the image unless disarmed: a failed or cancelled build leaves no half image.
struct OutGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for OutGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(self.path);
        }
    }
}

pub fn write_ext4(
    tree: &Tree,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RootfsReport, RootfsError> {
    let label = &opts.fs_label;
    if label.len() > 16 || label.contains(['\0', '\n']) {
        return Err(RootfsError::Invalid(format!(
            "file system label {label:?} is longer than 16 bytes or has control characters"
        )));
    }
    if let Some(n) = tree.table.get(b"lost+found")
        && !n.kind.is_dir()
    {
        return Err(RootfsError::Invalid(
            "/lost+found in the image is not a directory; ext4 needs it to be one".into(),
        ));
    }
    let mkfs = tool("mkfs.ext4")?;
    let debugfs = tool("debugfs")?;
    if cancelled(opts) {
        return Err(RootfsError::Cancelled);
    }

    prepare_host(tree, opts.force_fixups)?;

    let stats = tree.stats();
    let inodes = stats.entries * 13 / 10 + 8192;
    let size = (stats.alloc_bytes * 3 / 2 + 256 * MIB + inodes * 256).max(512 * MIB);
    let size = (size + opts.extra_bytes).div_ceil(4096) * 4096;
    progress(Progress::Mkfs {
        size_bytes: size,
        files: stats.entries,
    });

    let mut guard = OutGuard {
        path: out,
        armed: true,
    };
    {
        // Sparse: only what mkfs writes takes space.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .map_err(|e| RootfsError::io(format!("creating {}", out.display()), e))?;
        f.set_len(size)
            .map_err(|e| RootfsError::io(format!("sizing {}", out.display()), e))?;
    }
    let root = tree.root_node();
    let args: Vec<OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        "4096".into(),
        "-I".into(),
        "256".into(),
        "-N".into(),
        inodes.to_string().into(),
        "-L".into(),
        label.into(),
        "-E".into(),
        format!(
            "lazy_itable_init=1,lazy_journal_init=1,root_owner={}:{}",
            root.meta.uid, root.meta.gid
        )
        .into(),
        "-d".into(),
        tree.root.clone().into(),
        out.into(),
    ];
    let o = run(&mkfs, &args, opts)?;
    if !o.status.success() {
        return Err(RootfsError::Tool {
            tool: "mkfs.ext4",
            status: o.status.to_string(),
            stderr: show(&o.stderr).trim().to_string(),
        });
    }
    if cancelled(opts) {
        return Err(RootfsError::Cancelled);
    }

    let work = tempfile::Builder::new()
        .prefix(".banger-ext4-")
        .tempdir_in(tree.root.parent().unwrap_or(Path::new("/tmp")))
        .map_err(|e| RootfsError::io("creating the debugfs work directory", e))?;
    let listed = list_image(tree, &debugfs, out, work.path(), opts)?;
    if cancelled(opts) {
        return Err(RootfsError::Cancelled);
    }
    let fixups = plan_fixups(tree, &listed, work.path(), opts.force_fixups)?;
    progress(Progress::Fixups {
        count: fixups.commands,
    });
    if fixups.commands > 0 {
        apply_fixups(&debugfs, out, work.path(), &fixups, opts)?;
    }

    guard.armed = false;
    Ok(RootfsReport {
        files: stats.entries,
        content_bytes: stats.content_bytes,
        image_bytes: size,
        skipped: tree.skipped.clone(),
        has_sshd: tree.has_sshd(),
        init: tree.init(),
        package_manager: tree.package_manager(),
        root_home_entries: tree.root_home_entries(),
    })
}

fn host(tree: &Tree, rel: &[u8]) -> PathBuf {
    tree.root.join(OsStr::from_bytes(rel))
}

/// Brings the scratch copy as close to the wanted metadata as this process may, because
/// `mkfs -d` copies mode, owner and times from it and every value it gets right is a fixup
/// saved: times always (writing children changed the directories' mtimes, so this runs at
/// the end); mode bits with the owner's `rw`/`rwx` kept (the scratch tree must stay readable
/// for mkfs and removable); owners only as root. Symlinks are never followed. Correctness
/// does not depend on any of this — the fixups compare against what the image holds — so
/// `force` skips everything but the times and leaves all the work to debugfs.
fn prepare_host(tree: &Tree, force: bool) -> Result<(), RootfsError> {
    let chown = !force && nix::unistd::geteuid().is_root();
    let prep = |path: &Path, node: &Node| -> Result<(), RootfsError> {
        let fail = |what: &str, e: nix::Error| {
            RootfsError::io(format!("{what} {}", path.display()), e.into())
        };
        let symlink = matches!(node.kind, NodeKind::Symlink { .. });
        if chown {
            // Before chmod: chown clears setuid/setgid. A failure (unmapped id in a user
            // namespace) just leaves the owner to the fixups.
            let _ = nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(nix::unistd::Uid::from_raw(node.meta.uid)),
                Some(nix::unistd::Gid::from_raw(node.meta.gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        if !force && !symlink {
            let keep = if node.kind.is_dir() { 0o700 } else { 0o600 };
            let mode = nix::sys::stat::Mode::from_bits_truncate(node.meta.mode | keep);
            // The kernel silently drops setgid for a group the caller is not in; the
            // inventory notices and a fixup restores it.
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                path,
                mode,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| fail("chmod", e))?;
        }
        let t = TimeSpec::new(node.meta.mtime, 0);
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| fail("setting times of", e))
    };
    for (rel, node) in tree.table.nodes() {
        prep(&host(tree, rel), node)?;
    }
    prep(&tree.root, tree.root_node())
}

/// debugfs (libss) argument quoting: inside double quotes everything is literal except `""`,
/// which stands for one `"`. Lines cannot carry `\n`/`\r` (rejected at flatten time).
fn quote(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'"');
    for &b in arg {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs a tool (argv, never a shell), collecting its output, killing it on cancel.
fn run(program: &Path, args: &[OsString], opts: &BuildOptions) -> Result<Output, RootfsError> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RootfsError::io(format!("starting {name}"), e))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let mut delay = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| RootfsError::io(format!("waiting for {name}"), e))?
        {
            break status;
        }
        if cancelled(opts) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RootfsError::Cancelled);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// What the image says about one path right after mkfs.
#[derive(Debug, Clone, Copy)]
struct Listed {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn parse_ls_line(line: &[u8]) -> Option<(&[u8], Listed)> {
    // `ls -p`: /ino/mode(octal)/uid/gid/name/size/ — names cannot contain '/'.
    let parts: Vec<&[u8]> = line.split(|&b| b == b'/').collect();
    if parts.len() != 8 || !parts[0].is_empty() {
        return None;
    }
    let num = |b: &[u8], radix| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| i64::from_str_radix(s, radix).ok())
    };
    // uid/gid are printed with %d: above 2^31 they come out negative.
    let id = |b: &[u8]| num(b, 10).map(|v| v as u32);
    Some((
        parts[5],
        Listed {
            ino: u32::try_from(num(parts[1], 10)?).ok()?,
            mode: u32::try_from(num(parts[2], 8)?).ok()?,
            uid: id(parts[3])?,
            gid: id(parts[4])?,
        },
    ))
}

fn debugfs_errors(stderr: &[u8]) -> impl Iterator<Item = &[u8]> {
    stderr
        .split(|&b| b == b'\n')
        .map(|l| l.trim_ascii())
        // The version banner goes to stderr too.
        .filter(|l| !l.is_empty() && !l.starts_with(b"debugfs "))
}

/// Lists every directory of the image with `ls -p`, walking it with relative `cd`s so that no
/// command line ever holds more than one path component (debugfs lines are at most 8 KiB;
/// paths may be 4 KiB of characters that double when quoted). Every listing is checked
/// against the inode its parent's listing announced, so a failed `cd` cannot shift the
/// listings onto the wrong paths.
fn list_image(
    tree: &Tree,
    debugfs: &Path,
    out: &Path,
    work: &Path,
    opts: &BuildOptions,
) -> Result<HashMap<Vec<u8>, Listed>, RootfsError> {
    let mut subdirs: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
    for (path, node) in tree.table.nodes() {
        if node.kind.is_dir() {
            let (parent, last) = name::split_last(path);
            subdirs.entry(parent).or_default().push(last);
        }
    }
    let mut cmds = Vec::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    // Depth-first with an explicit stack: paths can be ~2000 components deep.
    let mut stack: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0)];
    cmds.extend_from_slice(b"ls -p\n");
    order.push(Vec::new());
    while let Some((dir, next)) = stack.last_mut() {
        let children = subdirs
            .get(dir.as_slice())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if let Some(child) = children.get(*next) {
            *next += 1;
            let path = name::join(dir, child);
            cmds.extend_from_slice(b"cd ");
            let mut rel = b"./".to_vec();
            rel.extend_from_slice(child);
            quote(&mut cmds, &rel);
            cmds.extend_from_slice(b"\nls -p\n");
            order.push(path.clone());
            stack.push((path, 0));
        } else {
            stack.pop();
            if !stack.is_empty() {
                cmds.extend_from_slice(b"cd ..\n");
            }
        }
    }
    let file = work.join("list.cmds");
    fs::write(&file, &cmds)
        .map_err(|e| RootfsError::io(format!("writing {}", file.display()), e))?;
    let args: Vec<OsString> = vec!["-f".into(), file.into(), out.into()];
    let o = run(debugfs, &args, opts)?;
    let errors: Vec<String> = debugfs_errors(&o.stderr).map(show).collect();
    if !o.status.success() || !errors.is_empty() {
        return Err(RootfsError::Tool {
            tool: "debugfs",
            status: o.status.to_string(),
            stderr: errors.join("; "),
        });
    }

    let mismatch = |m: String| RootfsError::Mismatch(m);
    let mut sections: Vec<Vec<(&[u8], Listed)>> = Vec::new();
    for line in o.stdout.split(|&b| b == b'\n') {
        if line.starts_with(b"debugfs: ls") {
            sections.push(Vec::new());
        } else if line.starts_with(b"debugfs: ") || line.is_empty() {
            // echo of a `cd`
        } else {
            let parsed = parse_ls_line(line)
                .ok_or_else(|| mismatch(format!("unexpected debugfs output {:?}", show(line))))?;
            if parsed.1.ino == 0 {
                continue; // `ls` includes unused directory slots
            }
            sections
                .last_mut()
                .ok_or_else(|| mismatch("debugfs output before any listing".into()))?
                .push(parsed);
        }
    }
    if sections.len() != order.len() {
        return Err(mismatch(format!(
            "{} directory listings for {} directories",
            sections.len(),
            order.len()
        )));
    }
    let mut listed: HashMap<Vec<u8>, Listed> = HashMap::with_capacity(tree.len() + 1);
    for (dir, section) in order.iter().zip(&sections) {
        let want = if dir.is_empty() {
            Some(ROOT_INO)
        } else {
            listed.get(dir).map(|l| l.ino)
        };
        let me = section.iter().find(|(n, _)| *n == b".").map(|(_, l)| *l);
        match (want, me) {
            (Some(w), Some(me)) if w == me.ino => {
                if dir.is_empty() {
                    listed.insert(Vec::new(), me);
                }
            }
            _ => {
                return Err(mismatch(format!(
                    "listing of /{} is not the expected directory",
                    show(dir)
                )));
            }
        }
        for (entry, l) in section {
            if *entry == b"." || *entry == b".." {
                continue;
            }
            let path = name::join(dir, entry);
            if tree.table.get(&path).is_none() {
                if path == b"lost+found" {
                    continue; // created by mkfs
                }
                return Err(mismatch(format!("unexpected path /{}", show(&path))));
            }
            listed.insert(path, *l);
        }
    }
    for (path, node) in tree.table.nodes() {
        match listed.get(path) {
            Some(l) if l.mode & 0o170000 == node.kind.type_bits() => {}
            Some(l) => {
                return Err(mismatch(format!(
                    "/{} has mode {:o} in the image, expected a {:?}",
                    show(path),
                    l.mode,
                    node.kind
                )));
            }
            None => return Err(mismatch(format!("/{} is missing", show(path)))),
        }
    }
    Ok(listed)
}

struct Fixups {
    /// One group of commands per inode, with the path it is reported under.
    groups: Vec<(Vec<u8>, Vec<u8>)>,
    commands: u64,
    marker: Vec<u8>,
}

impl Fixups {
    /// The script; with `markers`, each group is followed by a command that always fails
    /// with a known message (`testi` of an absent root entry).
    fn script(&self, markers: bool) -> Vec<u8> {
        let mut s = Vec::new();
        for (_, cmds) in &self.groups {
            s.extend_from_slice(cmds);
            if markers {
                s.extend_from_slice(b"testi ");
                let mut m = b"/".to_vec();
                m.extend_from_slice(&self.marker);
                quote(&mut s, &m);
                s.push(b'\n');
            }
        }
        s
    }
}

/// Plans the `debugfs -w` commands: per inode, the mode (full `i_mode`), uid and gid that
/// differ from what mkfs wrote (all of them with `force`), and every xattr. Inodes are
/// addressed as `<N>` — no path lookups (linear directory scans in debugfs) and no quoting
/// of names; xattr values go through files.
fn plan_fixups(
    tree: &Tree,
    listed: &HashMap<Vec<u8>, Listed>,
    work: &Path,
    force: bool,
) -> Result<Fixups, RootfsError> {
    let mut marker = b".banger-fixup-mark".to_vec();
    while tree.table.get(&marker).is_some() {
        marker.push(b'_');
    }
    let mut f = Fixups {
        groups: Vec::new(),
        commands: 0,
        marker,
    };
    let mut done_inodes = std::collections::HashSet::new();
    let mut value_files = 0usize;
    let work = std::path::absolute(work)
        .map_err(|e| RootfsError::io("resolving the work directory", e))?;
    let root_key: &[u8] = b"";
    let nodes = std::iter::once((root_key, tree.root_node()))
        .chain(tree.table.nodes().iter().map(|(k, v)| (k.as_slice(), v)));
    for (path, node) in nodes {
        if !path.is_empty() && !done_inodes.insert(node.inode) {
            continue; // hardlink: same inode, same metadata
        }
        let Some(l) = listed.get(path) else {
            return Err(RootfsError::Mismatch(format!("/{} is missing", show(path))));
        };
        let Node { kind, meta, .. } = node;
        let mode = kind.type_bits() | meta.mode;
        let mut cmds = Vec::new();
        let mut sif = |field: &str, value: String| {
            cmds.extend_from_slice(format!("sif <{}> {field} {value}\n", l.ino).as_bytes());
        };
        if force || l.mode != mode {
            sif("mode", format!("0{mode:o}"));
        }
        if force || l.uid != meta.uid {
            sif("uid", meta.uid.to_string());
        }
        if force || l.gid != meta.gid {
            sif("gid", meta.gid.to_string());
        }
        for x in &meta.xattrs {
            let vf = work.join(format!("x{value_files}"));
            value_files += 1;
            fs::write(&vf, &x.value)
                .map_err(|e| RootfsError::io(format!("writing {}", vf.display()), e))?;
            let mut line = b"ea_set -f ".to_vec();
            quote(&mut line, vf.as_os_str().as_bytes());
            line.extend_from_slice(format!(" <{}> ", l.ino).as_bytes());
            quote(&mut line, x.name.as_bytes());
            line.push(b'\n');
            if line.len() > MAX_LINE || vf.as_os_str().as_bytes().contains(&b'\n') {
                return Err(RootfsError::Invalid(format!(
                    "work directory {} cannot be named in a debugfs command",
                    work.display()
                )));
            }
            cmds.extend_from_slice(&line);
        }
        if !cmds.is_empty() {
            f.commands += cmds.iter().filter(|&&b| b == b'\n').count() as u64;
            f.groups.push((path.to_vec(), cmds));
        }
    }
    Ok(f)
}

/// Runs the fixups. debugfs exits 0 even when commands fail, and it buffers the stdout where
/// it echoes commands while stderr is unbuffered, so errors cannot be matched to commands by
/// position. The script therefore runs without markers first (markers cost a lookup and an
/// error message per inode); should anything land on stderr, it runs again with a marker
/// after each inode's group — every command sets an absolute value, so repeating them is
/// harmless — and the error is reported under the path whose group precedes it.
fn apply_fixups(
    debugfs: &Path,
    out: &Path,
    work: &Path,
    f: &Fixups,
    opts: &BuildOptions,
) -> Result<(), RootfsError> {
    let run_script = |markers: bool| -> Result<Output, RootfsError> {
        let file = work.join(if markers {
            "fixups-marked.cmds"
        } else {
            "fixups.cmds"
        });
        fs::File::create(&file)
            .and_then(|mut w| w.write_all(&f.script(markers)))
            .map_err(|e| RootfsError::io(format!("writing {}", file.display()), e))?;
        let args: Vec<OsString> = vec!["-w".into(), "-f".into(), file.into(), out.into()];
        run(debugfs, &args, opts)
    };
    let first = run_script(false)?;
    let errors: Vec<String> = debugfs_errors(&first.stderr).map(show).collect();
    if errors.is_empty() {
        if !first.status.success() {
            return Err(RootfsError::Tool {
                tool: "debugfs",
                status: first.status.to_string(),
                stderr: show(&first.stderr).trim().to_string(),
            });
        }
        return Ok(());
    }

    let marked = run_script(true)?;
    let mut marker_line = b"/".to_vec();
    marker_line.extend_from_slice(&f.marker);
    marker_line.push(b':');
    let mut group = 0usize;
    for line in debugfs_errors(&marked.stderr) {
        if line.starts_with(&marker_line) {
            group += 1;
            continue;
        }
        let path = f
            .groups
            .get(group)
            .map(|(p, _)| format!("/{}", show(p)))
            .unwrap_or_else(|| "?".into());
        return Err(RootfsError::Fixup {
            path,
            message: show(line),
        });
    }
    // The second run did not reproduce the failure: report what the first one said.
    Err(RootfsError::Fixup {
        path: "?".into(),
        message: errors.join("; "),
    })
}

/// Runs `e2fsck -fn` on an image; Ok when it reports a clean file system.
pub fn check_image(image: &Path) -> Result<(), RootfsError> {
    let e2fsck = tool("e2fsck")?;
    let o = Command::new(&e2fsck)
        .arg("-fn")
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RootfsError::io("running e2fsck", e))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(RootfsError::Tool {
            tool: "e2fsck",
            status: o.status.to_string(),
            stderr: format!("{}{}", show(&o.stdout), show(&o.stderr)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        let mut v = Vec::new();
        quote(&mut v, br#"a "b" c"#);
        assert_eq!(v, br#""a ""b"" c""#);
    }

    #[test]
    fn ls_lines() {
        let (n, l) = parse_ls_line(b"/12/100644/0/-2/a b \"q\"/5/").unwrap();
        assert_eq!(n, b"a b \"q\"");
        assert_eq!(
            (l.ino, l.mode, l.uid, l.gid),
            (12, 0o100644, 0, u32::MAX - 1)
        );
        let (n, l) = parse_ls_line(b"/2/040755/0/0/.//").unwrap();
        assert_eq!((n, l.mode), (&b"."[..], 0o40755));
        assert!(parse_ls_line(b"garbage").is_none());
    }
}
