//! The same facts [`crate::RootfsReport`] gives for a pulled image (sshd, init, package
//! manager), for a root filesystem that is a directory on the host (`image import DIR`,
//! `image build`).
//!
//! Symlinks are resolved as the guest would see them: an absolute target starts again at the
//! tree's root and `..` never climbs above it, so a link such as `sbin -> /usr/sbin` counts and
//! nothing outside the tree is ever looked at.

use std::path::{Path, PathBuf};

/// What a root filesystem directory holds that decides how its VMs boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirFacts {
    /// `/usr/sbin/sshd`, `/sbin/sshd` or `/usr/bin/sshd` resolves to a regular file.
    pub has_sshd: bool,
    /// First of `/sbin/init`, `/lib/systemd/systemd`, `/usr/lib/systemd/systemd` that resolves
    /// to a regular file.
    pub init: Option<String>,
    /// `"apt" | "apk" | "dnf" | "yum" | "zypper" | "pacman"`, by presence of its binary.
    pub package_manager: Option<String>,
}

/// Inspects the root filesystem tree at `root`.
pub fn inspect_dir(root: &Path) -> DirFacts {
    let is_file = |p: &str| resolve_in(root, p).is_some_and(|real| real.is_file());
    DirFacts {
        has_sshd: crate::tree::SSHD_PATHS.iter().any(|p| is_file(p)),
        init: crate::tree::INIT_PATHS
            .iter()
            .find(|p| is_file(p))
            .map(|p| p.to_string()),
        package_manager: crate::tree::PACKAGE_MANAGERS
            .iter()
            .find(|(_, bins)| {
                bins.iter().any(|b| {
                    crate::tree::BIN_DIRS
                        .iter()
                        .any(|d| is_file(&format!("{d}/{b}")))
                })
            })
            .map(|(name, _)| name.to_string()),
    }
}

/// The host path `guest_path` (absolute, inside the guest) names in the tree at `root`, with
/// every symlink resolved inside the tree; `None` if a component is missing or the links loop.
fn resolve_in(root: &Path, guest_path: &str) -> Option<PathBuf> {
    /// As the kernel's MAXSYMLINKS.
    const MAX_LINKS: usize = 40;
    let mut links = 0;
    // Components still to walk, in reverse so the next one is popped from the end.
    let mut todo: Vec<String> = components(guest_path).rev().collect();
    let mut done: Vec<String> = Vec::new();
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let host = done
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&c);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                done.clear();
            }
            todo.extend(components(&target).rev());
        } else {
            done.push(c);
        }
    }
    Some(done.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn facts_follow_links_inside_the_tree_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        assert_eq!(
            inspect_dir(&root),
            DirFacts {
                has_sshd: false,
                init: None,
                package_manager: None
            }
        );
        std::fs::write(root.join("usr/sbin/sshd"), "").unwrap();
        std::fs::write(root.join("usr/bin/apk"), "").unwrap();
        symlink("usr/sbin", root.join("sbin")).unwrap();
        // An absolute link is the guest's /, not the host's.
        std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        symlink("/usr/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
        let f = inspect_dir(&root);
        assert!(f.has_sshd);
        assert_eq!(f.init.as_deref(), Some("/sbin/init"));
        assert_eq!(f.package_manager.as_deref(), Some("apk"));

        // Links pointing out of the tree (to the host's real files) do not count.
        let other = tempfile::tempdir().unwrap();
        let root2 = other.path().join("r");
        std::fs::create_dir_all(root2.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(root2.join("usr/bin")).unwrap();
        std::fs::write(other.path().join("sshd"), "").unwrap();
        symlink("../../../sshd", root2.join("usr/sbin/sshd")).unwrap();
        symlink(other.path().join("sshd"), root2.join("usr/bin/sshd")).unwrap();
        // A loop ends.
        symlink("init", root2.join("usr/sbin/init")).unwrap();
        symlink("usr/sbin", root2.join("sbin")).unwrap();
        let f = inspect_dir(&root2);
        assert!(!f.has_sshd, "{f:?}");
        assert_eq!(f.init, None);
    }
}
