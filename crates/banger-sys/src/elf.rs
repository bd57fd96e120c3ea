//! How an x86-64 executable is linked, read from its ELF headers before banger runs it
//! somewhere without a dynamic loader: the guest agent becomes the guest's `/init` (nothing
//! else is in the initramfs), and a jailed Firecracker runs in a chroot holding only itself.
//!
//! Hand-written: it reads a few header fields and the program header types, and no crate in
//! the workspace parses ELF.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Program header type of the interpreter (the dynamic loader) a dynamic executable names.
const PT_INTERP: u32 = 3;
/// Longer interpreter paths are not plausible; refusing them bounds the read.
const MAX_INTERP: u64 = 4096;
/// Size of one 64-bit program header.
const PHDR_SIZE: u16 = 56;

/// How an executable is linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// Needs nothing but the kernel (static, or static-pie).
    Static,
    /// Needs the named dynamic loader and, through it, libraries.
    Dynamic { interpreter: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an x86-64 ELF executable ({why})")]
    NotElf { path: PathBuf, why: &'static str },
}

/// How the x86-64 ELF executable at `path` is linked; an error for anything else (a script,
/// another architecture, a shared library, a truncated file).
pub fn x86_64_linkage(path: &Path) -> Result<Linkage, ElfError> {
    let not_elf = |why| ElfError::NotElf {
        path: path.to_path_buf(),
        why,
    };
    let mut f = std::fs::File::open(path).map_err(|source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = Vec::with_capacity(64);
    (&mut f)
        .take(64)
        .read_to_end(&mut head)
        .map_err(|source| ElfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if !head.starts_with(b"\x7fELF") {
        return Err(not_elf("no ELF magic; a script needs an interpreter too"));
    }
    let ehdr: [u8; 64] = head
        .try_into()
        .map_err(|_| not_elf("shorter than an ELF header"))?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    // ELFCLASS64, ELFDATA2LSB, ET_EXEC or ET_DYN, EM_X86_64.
    if ehdr[4] != 2
        || ehdr[5] != 1
        || !matches!(u16_at(&ehdr, 16), 2 | 3)
        || u16_at(&ehdr, 18) != 62
    {
        return Err(not_elf("not a 64-bit little-endian x86-64 executable"));
    }
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 0x20),
        u16_at(&ehdr, 0x36),
        u16_at(&ehdr, 0x38),
    );
    if phentsize < PHDR_SIZE {
        return Err(not_elf("program header entries too small"));
    }
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; PHDR_SIZE as usize];
        let at = i
            .checked_mul(u64::from(phentsize))
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| not_elf("program headers out of range"))?;
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut ph))
            .map_err(|_| not_elf("truncated program headers"))?;
        if u32_at(&ph, 0) != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 0x08), u64_at(&ph, 0x20));
        if size == 0 || size > MAX_INTERP {
            return Err(not_elf("implausible interpreter size"));
        }
        let mut name = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut name))
            .map_err(|_| not_elf("truncated interpreter name"))?;
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        return Ok(Linkage::Dynamic {
            interpreter: String::from_utf8_lossy(&name[..end]).into_owned(),
        });
    }
    Ok(Linkage::Static)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_dynamic_and_other_files() {
        // Debian's /bin/dash is dynamically linked; busybox-static is static.
        match x86_64_linkage(Path::new("/bin/dash")).unwrap() {
            Linkage::Dynamic { interpreter } => {
                assert!(interpreter.contains("ld-"), "{interpreter}")
            }
            other => panic!("dash: {other:?}"),
        }
        if Path::new("/bin/busybox").is_file() {
            assert_eq!(
                x86_64_linkage(Path::new("/bin/busybox")).unwrap(),
                Linkage::Static
            );
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        for (bytes, why) in [
            (&b"#!/bin/sh\nexit 0\n"[..], "no ELF magic"),
            (&b"\x7fELF\x02\x01\x01"[..], "shorter than"),
        ] {
            std::fs::write(&f, bytes).unwrap();
            let e = x86_64_linkage(&f).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&*f.to_string_lossy()), "{e}");
        }
        // A 32-bit header is refused by its class.
        let mut ehdr = [0u8; 64];
        ehdr[..4].copy_from_slice(b"\x7fELF");
        ehdr[4] = 1;
        std::fs::write(&f, ehdr).unwrap();
        assert!(
            x86_64_linkage(&f)
                .unwrap_err()
                .to_string()
                .contains("x86-64")
        );
        let e = x86_64_linkage(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, ElfError::Io { .. }), "{e}");
    }
}
