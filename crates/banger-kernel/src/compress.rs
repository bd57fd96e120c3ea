//! Compression formats met on the way from a `.deb` to a bootable kernel: the `data.tar.*` member,
//! compressed modules, and the payload inside a bzImage. All decoders are pure Rust.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::KernelError;

/// A compression format, recognised by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    /// The LZ4 "legacy" frame (`lz4 -l`), the one the kernel build uses.
    Lz4Legacy,
    /// The `.lzma` ("LZMA alone") format.
    Lzma,
    Bzip2,
    Lzo,
}

impl Compression {
    pub const ALL: [Compression; 7] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Lz4Legacy,
        Compression::Lzma,
        Compression::Bzip2,
        Compression::Lzo,
    ];

    /// The bytes a stream of this format starts with.
    pub fn magic(self) -> &'static [u8] {
        match self {
            Compression::Gzip => &[0x1f, 0x8b],
            Compression::Xz => &[0xfd, b'7', b'z', b'X', b'Z', 0x00],
            Compression::Zstd => &[0x28, 0xb5, 0x2f, 0xfd],
            Compression::Lz4Legacy => &[0x02, 0x21, 0x4c, 0x18],
            // Properties byte 0x5d (lc=3 lp=0 pb=2) followed by a dictionary size below 16 MiB,
            // what `lzma -9` and the kernel's build produce; the same pattern extract-vmlinux uses.
            Compression::Lzma => &[0x5d, 0x00, 0x00],
            Compression::Bzip2 => b"BZh",
            Compression::Lzo => &[0x89, b'L', b'Z', b'O', 0x00, b'\r', b'\n', 0x1a, b'\n'],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4-legacy",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lzo => "lzo",
        }
    }

    /// The format whose magic `data` starts with.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        Compression::ALL
            .into_iter()
            .find(|c| data.starts_with(c.magic()))
    }

    /// The format named by a file-name suffix such as `.xz` in `data.tar.xz` or `ext4.ko.zst`.
    pub fn from_extension(ext: &str) -> Option<Compression> {
        match ext {
            "gz" => Some(Compression::Gzip),
            "xz" => Some(Compression::Xz),
            "zst" => Some(Compression::Zstd),
            "bz2" => Some(Compression::Bzip2),
            "lzma" => Some(Compression::Lzma),
            _ => None,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A streaming decoder for `format` over `input`. LZ4-legacy and LZO have no streaming decoder
/// here (they only occur inside kernel images, which are decoded whole).
pub fn decoder<'a, R: Read + 'a>(
    format: Compression,
    input: R,
    what: &str,
) -> Result<Box<dyn Read + 'a>, KernelError> {
    let err = |message: String| KernelError::Decompress {
        what: what.to_string(),
        message,
    };
    Ok(match format {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(input)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(input, true)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| err(format!("zstd: {e}")))?,
        ),
        Compression::Lzma => Box::new(
            lzma_rust2::LzmaReader::new_mem_limit(input, u32::MAX, None)
                .map_err(|e| err(format!("lzma: {e}")))?,
        ),
        Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(input)),
        Compression::Lz4Legacy | Compression::Lzo => {
            return Err(KernelError::UnsupportedCompression {
                what: what.to_string(),
                format: format.name().to_string(),
            });
        }
    })
}

/// Decodes all of `data` as `format`. `limit` bounds the output, so a corrupt or hostile stream
/// cannot fill memory.
pub fn decompress(
    format: Compression,
    data: &[u8],
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, KernelError> {
    if format == Compression::Lz4Legacy {
        return lz4_legacy_decompress(data, limit, true, what);
    }
    let mut out = Vec::new();
    decoder(format, data, what)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| KernelError::Decompress {
            what: what.to_string(),
            message: format!("{format}: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(KernelError::Decompress {
            what: what.to_string(),
            message: format!("{format}: output exceeds {limit} bytes"),
        });
    }
    Ok(out)
}

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Every block of the legacy frame decodes to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decodes an LZ4 legacy frame: the magic, then blocks of `u32le compressed size` + LZ4 block,
/// possibly followed by more magics (concatenated frames).
///
/// `strict`: every byte must belong to the frame, except for a final 4-byte remainder (the size
/// word the kernel build appends). Otherwise decoding stops quietly at the first block that does
/// not fit, which is what a magic scan over a whole image needs.
pub fn lz4_legacy_decompress(
    data: &[u8],
    limit: u64,
    strict: bool,
    what: &str,
) -> Result<Vec<u8>, KernelError> {
    let err = |message: String| KernelError::Decompress {
        what: what.to_string(),
        message: format!("lz4-legacy: {message}"),
    };
    let read_u32 = |at: usize| -> u32 {
        u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
    };
    if data.len() < 4 || read_u32(0) != LZ4_LEGACY_MAGIC {
        return Err(err("missing legacy frame magic".into()));
    }
    let mut pos = 4;
    let mut out: Vec<u8> = Vec::new();
    let mut blocks = 0usize;
    loop {
        let rest = data.len() - pos;
        if rest == 0 || (rest == 4 && blocks > 0) {
            break;
        }
        if rest < 4 {
            if strict {
                return Err(err(format!("{rest} stray bytes after the last block")));
            }
            break;
        }
        let size = read_u32(pos);
        if size == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        if size == 0 || size > rest - 4 {
            if strict || blocks == 0 {
                return Err(err(format!(
                    "block at offset {pos} claims {size} bytes, {} remain",
                    rest - 4
                )));
            }
            break;
        }
        let block = &data[pos + 4..pos + 4 + size];
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(e) => {
                out.truncate(start);
                if strict || blocks == 0 {
                    return Err(err(format!("block at offset {pos}: {e}")));
                }
                break;
            }
        }
        if out.len() as u64 > limit {
            return Err(err(format!("output exceeds {limit} bytes")));
        }
        blocks += 1;
        pos += 4 + size;
    }
    Ok(out)
}

/// Encodes `data` as an LZ4 legacy frame (what `lz4 -l` writes); used to build test inputs.
pub fn lz4_legacy_compress(data: &[u8]) -> Vec<u8> {
    let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
        let block = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&block);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Compresses `data` the way the kernel build would for `format`, without the size trailer.
    pub(crate) fn compress(format: Compression, data: &[u8]) -> Vec<u8> {
        match format {
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                // Like scripts/xz_wrap.sh: CRC32 check and the x86 BCJ filter before LZMA2.
                let mut opts = lzma_rust2::XzOptions::with_preset(1);
                opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
                let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Zstd => {
                ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
            }
            Compression::Lz4Legacy => lz4_legacy_compress(data),
            Compression::Lzma => {
                let opts = lzma_rust2::LzmaOptions::with_preset(1);
                let mut w =
                    lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, None).unwrap();
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Lzo => panic!("no LZO encoder"),
        }
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7) % 251) as u8 ^ (i >> 10) as u8)
            .collect()
    }

    #[test]
    fn every_streaming_format_round_trips_and_is_detected() {
        let data = sample(200_000);
        for format in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Lz4Legacy,
            Compression::Lzma,
            Compression::Bzip2,
        ] {
            let packed = compress(format, &data);
            assert_eq!(Compression::detect(&packed), Some(format), "{format}");
            let out = decompress(format, &packed, 1 << 30, "sample").unwrap();
            assert_eq!(out, data, "{format}");
        }
    }

    #[test]
    fn output_limit_is_enforced() {
        let data = vec![0u8; 100_000];
        for format in [Compression::Gzip, Compression::Zstd, Compression::Lz4Legacy] {
            let packed = compress(format, &data);
            let e = decompress(format, &packed, 1000, "bomb").unwrap_err();
            assert!(e.to_string().contains("exceeds"), "{format}: {e}");
        }
    }

    #[test]
    fn corrupt_input_is_an_error_naming_the_input() {
        let mut packed = compress(Compression::Xz, &sample(10_000));
        let mid = packed.len() / 2;
        packed[mid] ^= 0xff;
        let e = decompress(Compression::Xz, &packed, 1 << 20, "data.tar.xz").unwrap_err();
        assert!(e.to_string().starts_with("data.tar.xz:"), "{e}");
    }

    #[test]
    fn lz4_legacy_multi_block_trailer_and_strictness() {
        // More than one 8 MiB block, as a real kernel has.
        let data = sample(LZ4_LEGACY_BLOCK + 12_345);
        let mut packed = lz4_legacy_compress(&data);
        assert_eq!(
            decompress(Compression::Lz4Legacy, &packed, 1 << 30, "k").unwrap(),
            data
        );
        // The kernel's size trailer is accepted.
        packed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(
            lz4_legacy_decompress(&packed, 1 << 30, true, "k").unwrap(),
            data
        );
        // Garbage after the frame: strict refuses, lenient keeps what decoded.
        packed.extend_from_slice(&[0xff; 9]);
        assert!(lz4_legacy_decompress(&packed, 1 << 30, true, "k").is_err());
        assert_eq!(
            lz4_legacy_decompress(&packed, 1 << 30, false, "k").unwrap(),
            data
        );
        // Without the magic it is not a frame at all.
        assert!(lz4_legacy_decompress(&packed[4..], 1 << 30, false, "k").is_err());
    }

    #[test]
    fn lzo_is_reported_as_unsupported() {
        let e = decompress(Compression::Lzo, b"x", 10, "vmlinuz").unwrap_err();
        assert!(
            matches!(e, KernelError::UnsupportedCompression { .. }),
            "{e}"
        );
    }

    #[test]
    fn extensions_map_to_formats() {
        assert_eq!(Compression::from_extension("zst"), Some(Compression::Zstd));
        assert_eq!(Compression::from_extension("xz"), Some(Compression::Xz));
        assert_eq!(Compression::from_extension("gz"), Some(Compression::Gzip));
        assert_eq!(Compression::from_extension("tar"), None);
    }
}
