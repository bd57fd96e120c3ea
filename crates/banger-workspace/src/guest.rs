//! The shell scripts the guest runs (through `ssh … -- sh -c SCRIPT`). Every value from
//! outside is single-quoted with [`shell_quote`]; the scripts use only sh, coreutils, GNU tar
//! and git.

use banger_protocol::shell_quote;

/// Longest run of quoted deletion paths put in one script (a single argument may not exceed
/// 128 KiB on Linux).
const MAX_DELETIONS_BYTES: usize = 64 * 1024;

/// Exit status of the prepare script when the guest directory exists and `force` is off.
pub const EXIT_EXISTS: i32 = 17;

/// Checks a guest path given by the user: absolute, normalised, at least two levels deep
/// (a workspace may be replaced wholesale, so `/` or `/root` itself is refused).
pub fn validate_guest_path(p: &str) -> Result<(), String> {
    let parts: Vec<&str> = p.split('/').skip(1).collect();
    if !p.starts_with('/')
        || p.contains('\0')
        || parts
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
        || parts.len() < 2
    {
        return Err(format!(
            "invalid guest path {p:?}: expected an absolute path at least two levels deep, like /root/repo"
        ));
    }
    Ok(())
}

/// Unpacks the prepare archive (the `.git` of the shallow history, then the working tree)
/// into `guest_path`. An existing non-empty directory is refused unless `force`, which
/// replaces it. With `checkout`, the tree comes from the index rather than the archive.
///
/// The index's stat data (from the host) does not match the unpacked files, and no refresh is
/// run here: git re-checks them lazily at the first `git status`, and a copy that is only used
/// to build or test never pays it (under TCG a refresh of 10,000 files costs ~4 s).
pub fn prepare_script(guest_path: &str, force: bool, checkout: bool) -> String {
    let p = shell_quote(guest_path);
    let existing = if force {
        "rm -rf -- \"$P\"".to_string()
    } else {
        format!(
            "if [ ! -d \"$P\" ] || [ -n \"$(ls -A -- \"$P\")\" ]; then echo \"banger: $P already exists in the guest; pass --force to replace it\" >&2; exit {EXIT_EXISTS}; fi"
        )
    };
    let checkout = if checkout {
        "git checkout-index -a -f\n"
    } else {
        ""
    };
    format!(
        "set -e\nP={p}\nif [ -e \"$P\" ] || [ -L \"$P\" ]; then {existing}; fi\nmkdir -p -- \"$P\"\ncd -- \"$P\"\ntar -x -f -\n{checkout}"
    )
}

/// The scripts that apply a sync: zero or more deletion-only scripts (when the deletions are
/// too many for one command line) and a last one that also unpacks the archive of changed
/// files from stdin.
pub fn sync_scripts(guest_path: &str, delete: &[String]) -> Vec<String> {
    let p = shell_quote(guest_path);
    let head = format!("set -e\ncd -- {p}\n");
    let mut chunks: Vec<String> = vec![String::new()];
    for d in delete {
        let q = shell_quote(&format!("./{d}"));
        let cur = chunks.last_mut().expect("never empty");
        if cur.len() + q.len() > MAX_DELETIONS_BYTES && !cur.is_empty() {
            chunks.push(String::new());
        }
        let cur = chunks.last_mut().expect("never empty");
        cur.push(' ');
        cur.push_str(&q);
    }
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut s = head.clone();
            if !c.is_empty() {
                // Parent directories left empty go too (git does not keep empty directories),
                // so a directory replaced by a file can be unpacked.
                s.push_str(&format!(
                    "rm -rf --{c}\nfor f in{c}; do d=$(dirname -- \"$f\"); [ \"$d\" = . ] || rmdir -p --ignore-fail-on-non-empty -- \"$d\" 2>/dev/null || true; done\n"
                ));
            }
            if i + 1 == n {
                s.push_str("tar -x -f -\n");
            }
            s
        })
        .collect()
}

/// Prints a binary patch of everything in the guest's working tree (commits, staged and
/// unstaged changes, untracked non-ignored files) relative to `base`, without touching the
/// guest's index: `git add -A` runs against a copy of it.
pub fn export_script(guest_path: &str, base: &str) -> String {
    format!(
        "set -e\ncd -- {p}\nbase={b}\n\
         git rev-parse -q --verify \"$base^{{commit}}\" >/dev/null || {{ echo \"banger: base commit $base is not in the guest's history\" >&2; exit 3; }}\n\
         tmp=$(mktemp)\ntrap 'rm -f \"$tmp\" \"$tmp.lock\"' EXIT\n\
         idx=$(git rev-parse --git-path index)\n\
         if [ -f \"$idx\" ]; then cp -- \"$idx\" \"$tmp\"; else rm -f \"$tmp\"; GIT_INDEX_FILE=\"$tmp\" git read-tree HEAD; fi\n\
         GIT_INDEX_FILE=\"$tmp\" git add -A\n\
         GIT_INDEX_FILE=\"$tmp\" git diff --cached --binary --full-index \"$base\" --\n",
        p = shell_quote(guest_path),
        b = shell_quote(base),
    )
}

/// `vm cp` into the guest: unpacks the archive into the directory `dir`.
pub fn unpack_into_script(dir: &str) -> String {
    format!(
        "set -e\nmkdir -p -- {d}\ncd -- {d}\ntar -x -f -\n",
        d = shell_quote(dir)
    )
}

/// `vm cp` into the guest, first step: prints `dir` when `path` is an existing directory.
pub fn probe_dir_script(path: &str) -> String {
    format!(
        "if [ -d {p} ]; then echo dir; else echo other; fi",
        p = shell_quote(path)
    )
}

/// `vm cp` out of the guest: archives `path` (file or directory) under its own name.
pub fn pack_script(path: &str) -> String {
    format!(
        "set -e\np={p}\ncase \"$p\" in /) echo 'banger: cannot copy / out of the guest' >&2; exit 2;; esac\np=${{p%/}}\n[ -e \"$p\" ] || [ -L \"$p\" ] || {{ echo \"banger: $p: no such file or directory in the guest\" >&2; exit 2; }}\ncd -- \"$(dirname -- \"$p\")\"\ntar -c -f - -- \"$(basename -- \"$p\")\"\n",
        p = shell_quote(path)
    )
}

/// Runs `command` (argv) in `dir`: `vm exec` in a workspace.
pub fn in_dir(dir: &str, command: &[String]) -> Vec<String> {
    let mut v = vec![
        "sh".to_string(),
        "-c".to_string(),
        "cd -- \"$0\" || exit 1; exec \"$@\"".to_string(),
        dir.to_string(),
    ];
    v.extend(command.iter().cloned());
    v
}

/// An interactive login shell in `dir`: `vm run PATH` without a command.
pub fn shell_in_dir(dir: &str) -> Vec<String> {
    vec![
        "sh".to_string(),
        "-c".to_string(),
        "cd -- \"$0\" || exit 1; exec \"${SHELL:-/bin/sh}\" -l".to_string(),
        dir.to_string(),
    ]
}
