//! Whether a file is a static x86-64 ELF executable: what the guest agent must be, since the
//! kernel runs it as `/init` from banger's initramfs, where no dynamic loader or library
//! exists. A dynamically linked agent (what `cargo build --workspace` leaves beside `bangerd`)
//! makes every guest panic at boot with only "Rebooting in 1 seconds" to show for it.
//!
//! Hand-written because it reads three header fields and the program header types; an ELF
//! crate would be a new dependency for that.

use std::io::Read;
use std::path::Path;

/// Program header type of the ELF interpreter (the dynamic loader) a dynamic binary names.
const PT_INTERP: u32 = 3;

/// Why `path` cannot be the guest's `/init`, in words; `None` if it is a static x86-64 ELF
/// executable.
pub fn static_elf_problem(path: &Path) -> Option<String> {
    let mut head = Vec::new();
    // The program headers of any sane binary sit within its first 64 KiB.
    match std::fs::File::open(path).and_then(|f| f.take(64 << 10).read_to_end(&mut head)) {
        Ok(_) => {}
        Err(e) => return Some(format!("reading it: {e}")),
    }
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if head.get(..4) != Some(b"\x7fELF") {
        return Some("it is not an ELF executable".into());
    }
    // 64-bit, little-endian, executable or position-independent executable, x86-64.
    if head.get(4) != Some(&2)
        || head.get(5) != Some(&1)
        || !matches!(u16_at(16), Some(2 | 3))
        || u16_at(18) != Some(62)
    {
        return Some("it is not an x86-64 ELF executable".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Some("its ELF header is truncated".into());
    };
    for i in 0..phnum as u64 {
        let at = phoff.saturating_add(i.saturating_mul(phentsize as u64));
        let Some(p_type) = usize::try_from(at).ok().and_then(u32_at) else {
            return Some("its program headers are truncated".into());
        };
        if p_type == PT_INTERP {
            return Some("it is dynamically linked (it names an ELF interpreter)".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_binaries() {
        // /bin/busybox from busybox-static is static; /bin/sh (dash) is dynamic.
        if Path::new("/bin/busybox").exists() {
            assert_eq!(static_elf_problem(Path::new("/bin/busybox")), None);
        }
        let p = static_elf_problem(Path::new("/bin/sh")).unwrap();
        assert!(p.contains("dynamically linked"), "{p}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        assert!(static_elf_problem(&f).unwrap().contains("not an ELF"));
        std::fs::write(&f, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(static_elf_problem(&f).is_some());
        assert!(static_elf_problem(&dir.path().join("missing")).is_some());
    }
}
