//! Opening a layer blob: compression sniffing, streaming decompression, and a meter that
//! bounds how much the tar parser may buffer for one entry's metadata.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use crate::{Layer, LayerCompression, RootfsError};

/// The largest amount of tar metadata (headers, GNU long names, PAX records) accepted for
/// one entry. The `tar` crate reads long-name and PAX entries into memory whole; without a
/// cap a few compressed megabytes could claim gigabytes of memory.
pub const METADATA_LIMIT: u64 = 16 << 20;

fn sniff(head: &[u8]) -> Result<LayerCompression, &'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(LayerCompression::Gzip);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Ok(LayerCompression::Zstd);
    }
    // A zstd stream may open with a skippable frame (magic 0x184D2A50..=0x184D2A5F).
    if head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18] {
        return Ok(LayerCompression::Zstd);
    }
    if head.starts_with(b"BZh") {
        return Err("bzip2-compressed layers are not supported");
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err("xz-compressed layers are not supported");
    }
    Ok(LayerCompression::None)
}

/// Opens `layer` as a stream of uncompressed tar bytes.
pub fn open(layer: &Layer) -> Result<Box<dyn Read>, RootfsError> {
    let err = |context, source| RootfsError::Layer {
        layer: layer.label.clone(),
        context,
        source,
    };
    let file = File::open(&layer.path).map_err(|e| err("opening the layer blob", e))?;
    let mut r = BufReader::with_capacity(256 << 10, file);
    let kind = match layer.compression {
        LayerCompression::Auto => {
            let head = r.fill_buf().map_err(|e| err("reading the layer blob", e))?;
            sniff(head).map_err(|m| err("detecting compression", io::Error::other(m)))?
        }
        other => other,
    };
    Ok(match kind {
        LayerCompression::None | LayerCompression::Auto => Box::new(r),
        LayerCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        LayerCompression::Zstd => Box::new(ZstdReader::new(r)),
    })
}

/// Streaming zstd decoder over every frame of the input (a stream may hold several frames,
/// e.g. from parallel compressors, and skippable frames).
pub struct ZstdReader<R: BufRead> {
    src: R,
    dec: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    pub fn new(src: R) -> Self {
        ZstdReader {
            src,
            dec: FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                if self.dec.can_collect() > 0 {
                    let n = self.dec.read(buf)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                if self.dec.is_finished() {
                    if let (Some(want), Some(got)) = (
                        self.dec.get_checksum_from_data(),
                        self.dec.get_calculated_checksum(),
                    ) && want != got
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "zstd frame checksum mismatch",
                        ));
                    }
                    self.in_frame = false;
                    continue;
                }
                self.dec
                    .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBytes(1 << 20))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            } else {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.dec.reset(&mut self.src) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let want = u64::from(length);
                        let got = io::copy(&mut (&mut self.src).take(want), &mut io::sink())?;
                        if got != want {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
            }
        }
    }
}

/// Shared switch between the tar parser's reader and the code driving it.
#[derive(Debug, Default)]
pub struct Meter {
    armed: Cell<bool>,
    remaining: Cell<u64>,
}

impl Meter {
    /// From now on at most `limit` bytes may be read (until [`Meter::disarm`]).
    pub fn arm(&self, limit: u64) {
        self.remaining.set(limit);
        self.armed.set(true);
    }

    pub fn disarm(&self) {
        self.armed.set(false);
    }
}

/// Reader that fails once an armed [`Meter`] runs out. The flattener arms it around each
/// `Entries::next()` call, after having read the previous entry's content itself, so what
/// is metered is exactly the header and extension data of the next entry.
pub struct Metered<R> {
    pub inner: R,
    pub meter: Rc<Meter>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.meter.armed.get() {
            return self.inner.read(buf);
        }
        let remaining = self.meter.remaining.get();
        if remaining == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tar metadata of one entry exceeds {METADATA_LIMIT} bytes"),
            ));
        }
        let cap = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..cap])?;
        self.meter.remaining.set(remaining - n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]).unwrap(), LayerCompression::Gzip);
        assert_eq!(
            sniff(&[0x28, 0xb5, 0x2f, 0xfd]).unwrap(),
            LayerCompression::Zstd
        );
        assert_eq!(
            sniff(&[0x5e, 0x2a, 0x4d, 0x18]).unwrap(),
            LayerCompression::Zstd
        );
        assert_eq!(sniff(b"etc/passwd\0\0").unwrap(), LayerCompression::None);
        assert_eq!(sniff(b"").unwrap(), LayerCompression::None);
        assert!(sniff(b"BZh91AY").is_err());
    }

    #[test]
    fn zstd_multi_frame_and_skippable() {
        let mut data = Vec::new();
        // Skippable frame with 3 bytes of payload.
        data.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        data.extend(ruzstd::encoding::compress_to_vec(
            &b"hello "[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        data.extend(ruzstd::encoding::compress_to_vec(
            &vec![b'x'; 300_000][..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        let mut out = Vec::new();
        ZstdReader::new(&data[..]).read_to_end(&mut out).unwrap();
        assert_eq!(&out[..6], b"hello ");
        assert_eq!(out.len(), 6 + 300_000);
        // Truncated input is an error, not a silent short read.
        let mut out = Vec::new();
        assert!(
            ZstdReader::new(&data[..data.len() - 5])
                .read_to_end(&mut out)
                .is_err()
        );
    }

    #[test]
    fn meter_caps_armed_reads() {
        let meter = Rc::new(Meter::default());
        let mut r = Metered {
            inner: &[7u8; 100][..],
            meter: meter.clone(),
        };
        meter.arm(10);
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), 10);
        assert!(r.read(&mut buf).is_err());
        meter.disarm();
        assert_eq!(r.read(&mut buf).unwrap(), 64);
    }
}
