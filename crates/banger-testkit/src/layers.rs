//! Building OCI layer tarballs in tests: ordinary entries, whiteouts, and hostile ones (names
//! the `tar` crate's own builder would refuse are written into the header directly).

/// One uncompressed layer (a tar stream) under construction.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerBuilder")
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    pub fn file_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.tar
            .append_data(&mut h, path, data)
            .expect("append file");
        self
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, 0, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("append dir");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("append symlink");
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("append hardlink");
        self
    }

    /// `dir/.wh.name`: deletes `dir/name` from lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), 0o644, b"")
    }

    /// `dir/.wh..wh..opq`: hides everything lower layers put in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// A character device node (banger skips these).
    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("append device");
        self
    }

    /// An entry whose name (or link target) goes into the header unchecked: `..`, absolute
    /// paths, anything a hostile layer may hold. Names up to 100 bytes.
    pub fn raw(
        mut self,
        kind: tar::EntryType,
        name: &str,
        link: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut h = Self::header(kind, 0o644, 0, 0, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname = [0; 100];
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.tar.append(&h, data).expect("append raw");
        self
    }

    /// The finished, uncompressed tar stream.
    pub fn build(self) -> Vec<u8> {
        self.tar.into_inner().expect("finish layer")
    }
}
