//! `vmlinuz` (an x86 bzImage) to the ELF `vmlinux` that Firecracker and QEMU microvm load.
//!
//! A bzImage is real-mode setup code followed by a small self-decompressing stub that carries the
//! real kernel as a compressed payload. Since boot protocol 2.08 the setup header says where the
//! payload is; older or odd images are handled like the kernel's `scripts/extract-vmlinux`: by
//! trying every offset where a known compression magic occurs.

use serde::{Deserialize, Serialize};

use crate::KernelError;
use crate::compress::{self, Compression};

/// Refuse to inflate a kernel beyond this; real ones are a few tens of MiB.
const MAX_VMLINUX: u64 = 512 << 20;
/// Per format, how many magic occurrences the fallback scan tries before giving up.
const MAX_SCAN_CANDIDATES: usize = 64;

const HDRS_OFFSET: usize = 0x202;
const SETUP_SECTS_OFFSET: usize = 0x1f1;
const VERSION_OFFSET: usize = 0x206;
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;

/// Where the compressed kernel sits inside a bzImage, per its setup header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageHeader {
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    pub setup_sects: u8,
    /// Absolute offset of the payload in the file.
    pub payload_start: usize,
    pub payload_len: usize,
}

/// How the payload was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Located {
    SetupHeader,
    MagicScan { offset: usize },
}

/// The result of [`extract_vmlinux`].
#[derive(Debug, Clone)]
pub struct Vmlinux {
    pub elf: Vec<u8>,
    pub compression: Compression,
    pub located: Located,
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

/// Parses the setup header. `Ok(None)` when `data` has no `HdrS` header or one older than boot
/// protocol 2.08 (no payload fields); an error when the header points outside the file.
pub fn parse_header(data: &[u8], what: &str) -> Result<Option<BzImageHeader>, KernelError> {
    if data.len() < PAYLOAD_LENGTH_OFFSET + 4 || &data[HDRS_OFFSET..HDRS_OFFSET + 4] != b"HdrS" {
        return Ok(None);
    }
    let protocol = le16(data, VERSION_OFFSET);
    if protocol < 0x0208 {
        return Ok(None);
    }
    // 0 means 4 for compatibility with ancient boot loaders.
    let setup_sects = match data[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => n,
    };
    let pm_start = (usize::from(setup_sects) + 1) * 512;
    let payload_start = pm_start + le32(data, PAYLOAD_OFFSET_OFFSET) as usize;
    let payload_len = le32(data, PAYLOAD_LENGTH_OFFSET) as usize;
    if payload_len == 0 || payload_start.saturating_add(payload_len) > data.len() {
        return Err(KernelError::Kernel {
            what: what.to_string(),
            message: format!(
                "setup header puts the payload at {payload_start}+{payload_len}, past the end ({} bytes)",
                data.len()
            ),
        });
    }
    Ok(Some(BzImageHeader {
        protocol,
        setup_sects,
        payload_start,
        payload_len,
    }))
}

/// Decodes a payload laid out as the kernel build writes it: the compressed stream, then (for
/// every format but gzip, whose own trailer already is one) the uncompressed size as u32le.
pub fn decompress_payload(
    payload: &[u8],
    what: &str,
) -> Result<(Compression, Vec<u8>), KernelError> {
    let format = Compression::detect(payload).ok_or_else(|| KernelError::Kernel {
        what: what.to_string(),
        message: format!(
            "payload starts with {:02x?}, no known compression magic",
            &payload[..payload.len().min(8)]
        ),
    })?;
    if payload.len() < 8 {
        return Err(KernelError::Kernel {
            what: what.to_string(),
            message: format!("{format} payload of {} bytes is truncated", payload.len()),
        });
    }
    let size_word = le32(payload, payload.len() - 4) as usize;
    let stream = match format {
        Compression::Gzip => payload,
        _ => &payload[..payload.len() - 4],
    };
    let elf = match format {
        Compression::Lz4Legacy => compress::lz4_legacy_decompress(stream, MAX_VMLINUX, true, what)?,
        _ => compress::decompress(format, stream, MAX_VMLINUX, what)?,
    };
    if elf.len() != size_word {
        return Err(KernelError::Kernel {
            what: what.to_string(),
            message: format!(
                "{format} payload decoded to {} bytes but its size word says {size_word}",
                elf.len()
            ),
        });
    }
    check_elf(&elf, what)?;
    Ok((format, elf))
}

/// Turns a bzImage into its ELF kernel: via the setup header when there is one, else (or when
/// that fails) by scanning for compression magics.
pub fn extract_vmlinux(data: &[u8], what: &str) -> Result<Vmlinux, KernelError> {
    let header_err = match parse_header(data, what) {
        Ok(Some(h)) => {
            let payload = &data[h.payload_start..h.payload_start + h.payload_len];
            match decompress_payload(payload, what) {
                Ok((compression, elf)) => {
                    return Ok(Vmlinux {
                        elf,
                        compression,
                        located: Located::SetupHeader,
                    });
                }
                Err(e) => Some(e),
            }
        }
        Ok(None) => None,
        Err(e) => Some(e),
    };
    if let Some(v) = scan(data, what) {
        return Ok(v);
    }
    Err(header_err.unwrap_or_else(|| KernelError::Kernel {
        what: what.to_string(),
        message: "no bzImage setup header and no compressed ELF kernel found by magic scan".into(),
    }))
}

fn scan(data: &[u8], what: &str) -> Option<Vmlinux> {
    for format in Compression::ALL {
        let magic = format.magic();
        let offsets = data
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i)
            .take(MAX_SCAN_CANDIDATES);
        for offset in offsets {
            let rest = &data[offset..];
            let out = match format {
                Compression::Lz4Legacy => {
                    compress::lz4_legacy_decompress(rest, MAX_VMLINUX, false, what).ok()
                }
                Compression::Lzo => None,
                _ => lenient_decode(format, rest, what),
            };
            if let Some(elf) = out.filter(|e| check_elf(e, what).is_ok()) {
                return Some(Vmlinux {
                    elf,
                    compression: format,
                    located: Located::MagicScan { offset },
                });
            }
        }
    }
    None
}

/// Decodes what it can from the start of `data`, ignoring whatever follows the stream (trailing
/// image bytes make most decoders fail at the very end, after the kernel is complete).
fn lenient_decode(format: Compression, data: &[u8], what: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut reader = compress::decoder(format, data, what)
        .ok()?
        .take(MAX_VMLINUX);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Checks that `elf` is a 64-bit little-endian x86-64 ELF file.
pub fn check_elf(elf: &[u8], what: &str) -> Result<(), KernelError> {
    let err = |message: &str| KernelError::Kernel {
        what: what.to_string(),
        message: message.to_string(),
    };
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") {
        return Err(err("decompressed kernel is not an ELF file"));
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(err("decompressed kernel is not a 64-bit little-endian ELF"));
    }
    const EM_X86_64: u16 = 62;
    if le16(elf, 0x12) != EM_X86_64 {
        return Err(err("decompressed kernel is not an x86-64 ELF"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::tests::compress;

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut e = vec![0u8; len];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[0x12] = 62;
        for (i, b) in e.iter_mut().enumerate().skip(64) {
            *b = ((i / 3) % 97) as u8;
        }
        e
    }

    /// A bzImage-shaped file: boot sector + setup, then the protected-mode part holding some
    /// decompressor "code", the payload (+ size word), and trailing bytes.
    fn fake_bzimage(format: Compression, elf: &[u8], with_header: bool) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let mut img = vec![0u8; pm_start];
        let stub = vec![0x90u8; 300];
        let mut payload = compress(format, elf);
        if format != Compression::Gzip {
            payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        }
        if with_header {
            img[SETUP_SECTS_OFFSET] = setup_sects;
            img[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
            img[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x020fu16.to_le_bytes());
            img[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4]
                .copy_from_slice(&(stub.len() as u32).to_le_bytes());
            img[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
                .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        img.extend_from_slice(&stub);
        img.extend_from_slice(&payload);
        img.extend_from_slice(&[0xAB; 777]);
        img
    }

    const FORMATS: [Compression; 6] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Lz4Legacy,
        Compression::Lzma,
        Compression::Bzip2,
    ];

    #[test]
    fn header_fields_are_read() {
        let img = fake_bzimage(Compression::Gzip, &fake_elf(4096), true);
        let h = parse_header(&img, "vmlinuz").unwrap().unwrap();
        assert_eq!(h.protocol, 0x020f);
        assert_eq!(h.setup_sects, 3);
        assert_eq!(h.payload_start, 4 * 512 + 300);
        assert_eq!(&img[h.payload_start..h.payload_start + 2], &[0x1f, 0x8b]);
    }

    #[test]
    fn no_header_and_old_protocol_are_none() {
        assert_eq!(parse_header(&[0u8; 4096], "x").unwrap(), None);
        let mut img = fake_bzimage(Compression::Gzip, &fake_elf(4096), true);
        img[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(parse_header(&img, "x").unwrap(), None);
    }

    #[test]
    fn header_pointing_past_the_end_is_an_error() {
        let mut img = fake_bzimage(Compression::Gzip, &fake_elf(4096), true);
        img[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&img, "vmlinuz-x").is_err());
    }

    #[test]
    fn each_format_extracts_via_the_header() {
        let elf = fake_elf(300_000);
        for format in FORMATS {
            let img = fake_bzimage(format, &elf, true);
            let v = extract_vmlinux(&img, "vmlinuz").unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(v.compression, format);
            assert_eq!(v.located, Located::SetupHeader, "{format}");
            assert_eq!(v.elf, elf, "{format}");
        }
    }

    #[test]
    fn each_format_extracts_via_the_magic_scan() {
        let elf = fake_elf(300_000);
        for format in FORMATS {
            let img = fake_bzimage(format, &elf, false);
            let v = extract_vmlinux(&img, "vmlinuz").unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(v.compression, format);
            assert_eq!(
                v.located,
                Located::MagicScan {
                    offset: 4 * 512 + 300
                }
            );
            assert_eq!(v.elf, elf, "{format}");
        }
    }

    #[test]
    fn size_word_mismatch_is_refused() {
        let elf = fake_elf(10_000);
        let mut payload = compress(Compression::Zstd, &elf);
        payload.extend_from_slice(&9999u32.to_le_bytes());
        let e = decompress_payload(&payload, "vmlinuz-6.1").unwrap_err();
        assert!(e.to_string().contains("size word"), "{e}");
    }

    #[test]
    fn non_elf_payload_is_refused() {
        let data = vec![7u8; 10_000];
        let payload = compress(Compression::Gzip, &data);
        let e = decompress_payload(&payload, "vmlinuz").unwrap_err();
        assert!(e.to_string().contains("not an ELF"), "{e}");
        let img = vec![0x42u8; 8192];
        assert!(extract_vmlinux(&img, "junk").is_err());
    }

    #[test]
    fn elf_check_wants_x86_64() {
        let mut elf = fake_elf(128);
        assert!(check_elf(&elf, "k").is_ok());
        elf[0x12] = 183; // aarch64
        assert!(check_elf(&elf, "k").is_err());
        elf[0x12] = 62;
        elf[4] = 1; // 32-bit
        assert!(check_elf(&elf, "k").is_err());
    }
}
