//! RFC 1035 wire format: just enough to read one query and write its answer.
//!
//! Every read is bounds-checked through [`Reader`]; a packet that ends early, a name longer than
//! 255 bytes, a compression pointer in the question or a second OPT record is a format error,
//! never a panic. [`respond`] is a pure function from query bytes and a name table to the
//! answer bytes, so it is tested without sockets.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The zone the responder is authoritative for.
pub const ZONE: &[u8] = b"vm";
/// TTL of every answer, and the negative-caching TTL: VMs come and go within seconds.
pub const TTL: u32 = 5;
/// The UDP payload size announced in EDNS answers (the DNS flag day 2020 value).
pub const EDNS_UDP_SIZE: u16 = 1232;
/// Longest name on the wire (RFC 1035 section 2.3.4).
const MAX_NAME_WIRE: usize = 255;
const HEADER_LEN: usize = 12;

pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// Extended rcode 16 (BADVERS): upper 8 bits (1) go in the OPT record, lower 4 (0) in the
    /// header.
    pub const BADVERS_UPPER: u8 = 1;
}

pub mod rtype {
    pub const A: u16 = 1;
    pub const SOA: u16 = 6;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
}

const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_RD: u16 = 0x0100;

/// A packet ended early or broke a rule of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed;

/// A cursor over a packet; every read checks the remaining length.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.pos.checked_add(n).ok_or(Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(Malformed)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Skips a name anywhere but the question: labels, ending at a root label or a compression
    /// pointer (which ends a name on the wire whatever it points at; we never follow it).
    fn skip_name(&mut self) -> Result<(), Malformed> {
        let start = self.pos;
        loop {
            let len = self.u8()?;
            match len & 0xC0 {
                0x00 if len == 0 => return Ok(()),
                0x00 => {
                    self.take(len as usize)?;
                }
                0xC0 => {
                    self.u8()?;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
            if self.pos - start > MAX_NAME_WIRE {
                return Err(Malformed);
            }
        }
    }
}

/// The question of a query, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    /// Offset of each label's length byte in the packet (for compression pointers).
    label_offsets: Vec<usize>,
    /// The labels, lower-cased (DNS names compare case-insensitively).
    labels: Vec<Vec<u8>>,
    /// The whole question (name, type, class) as the client wrote it, echoed verbatim.
    raw: std::ops::Range<usize>,
    qtype: u16,
    qclass: u16,
}

fn read_question(r: &mut Reader<'_>) -> Result<Question, Malformed> {
    let start = r.pos;
    let mut labels = Vec::new();
    let mut label_offsets = Vec::new();
    loop {
        let at = r.pos;
        let len = r.u8()?;
        if len == 0 {
            break;
        }
        // Compression pointers (0xC0) have nothing before them to point at in a question, and
        // 0x40/0x80 are obsolete extended label types: both are format errors here.
        if len & 0xC0 != 0 {
            return Err(Malformed);
        }
        let label = r.take(len as usize)?;
        if r.pos - start > MAX_NAME_WIRE {
            return Err(Malformed);
        }
        label_offsets.push(at);
        labels.push(label.to_ascii_lowercase());
    }
    if r.pos - start > MAX_NAME_WIRE {
        return Err(Malformed);
    }
    let qtype = r.u16()?;
    let qclass = r.u16()?;
    Ok(Question {
        label_offsets,
        labels,
        raw: start..r.pos,
        qtype,
        qclass,
    })
}

/// What the query's OPT record (EDNS, RFC 6891) said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edns {
    version: u8,
}

/// Skips the answer and authority sections (empty in any sane query) and reads the additional
/// section's OPT record, if any. More than one OPT record, or an OPT not owned by the root, is
/// a format error.
fn read_records(r: &mut Reader<'_>, an: u16, ns: u16, ar: u16) -> Result<Option<Edns>, Malformed> {
    for _ in 0..(an as u32 + ns as u32) {
        r.skip_name()?;
        r.take(8)?; // type, class, ttl
        let rdlen = r.u16()?;
        r.take(rdlen as usize)?;
    }
    let mut edns = None;
    for _ in 0..ar {
        let owner_root = r.buf.get(r.pos) == Some(&0);
        r.skip_name()?;
        let rtype = r.u16()?;
        let _class = r.u16()?;
        let ttl = r.u32()?;
        let rdlen = r.u16()?;
        r.take(rdlen as usize)?;
        if rtype == rtype::OPT {
            if edns.is_some() || !owner_root {
                return Err(Malformed);
            }
            edns = Some(Edns {
                version: (ttl >> 16) as u8,
            });
        }
    }
    Ok(edns)
}

/// An answer being written.
struct Answer {
    buf: Vec<u8>,
    an: u16,
    ns: u16,
    ar: u16,
}

impl Answer {
    fn new(id: u16, flags: u16, rcode: u8) -> Self {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&(flags | (rcode as u16 & 0x000F)).to_be_bytes());
        buf.extend_from_slice(&[0; 8]);
        Answer {
            buf,
            an: 0,
            ns: 0,
            ar: 0,
        }
    }

    fn set_qdcount(&mut self, n: u16) {
        self.buf[4..6].copy_from_slice(&n.to_be_bytes());
    }

    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn pointer(&mut self, offset: usize) {
        // Offsets here point into the question, which starts at 12 and is at most 255 + 4
        // bytes long: always within a pointer's 14 bits.
        self.u16(0xC000 | (offset as u16 & 0x3FFF));
    }

    /// An `A` record owned by the name at `owner`.
    fn a(&mut self, owner: usize, ip: Ipv4Addr) {
        self.pointer(owner);
        self.u16(rtype::A);
        self.u16(CLASS_IN);
        self.u32(TTL);
        self.u16(4);
        self.buf.extend_from_slice(&ip.octets());
    }

    /// The zone's SOA record, owned by the zone name at `zone` (a pointer into the question).
    /// Its MINIMUM field is the negative-caching TTL (RFC 2308).
    fn soa(&mut self, zone: usize) {
        self.pointer(zone);
        self.u16(rtype::SOA);
        self.u16(CLASS_IN);
        self.u32(TTL);
        let rdlen_at = self.buf.len();
        self.u16(0);
        self.pointer(zone); // MNAME: vm.
        self.buf.push(10);
        self.buf.extend_from_slice(b"hostmaster");
        self.pointer(zone); // RNAME: hostmaster.vm.
        for v in [1, 3600, 600, 86400, TTL] {
            self.u32(v); // serial, refresh, retry, expire, minimum
        }
        let rdlen = (self.buf.len() - rdlen_at - 2) as u16;
        self.buf[rdlen_at..rdlen_at + 2].copy_from_slice(&rdlen.to_be_bytes());
    }

    fn opt(&mut self, ext_rcode: u8) {
        self.buf.push(0);
        self.u16(rtype::OPT);
        self.u16(EDNS_UDP_SIZE);
        self.u32((ext_rcode as u32) << 24);
        self.u16(0);
    }

    fn finish(mut self) -> Vec<u8> {
        let (an, ns, ar) = (self.an, self.ns, self.ar);
        self.buf[6..8].copy_from_slice(&an.to_be_bytes());
        self.buf[8..10].copy_from_slice(&ns.to_be_bytes());
        self.buf[10..12].copy_from_slice(&ar.to_be_bytes());
        self.buf
    }
}

/// The answer to one query packet, or `None` when the packet gets no answer at all: shorter
/// than a header, or itself a response (answering those invites loops).
///
/// `names` maps lower-case VM names to addresses. Answers: `A` for a known `<name>.vm`;
/// NXDOMAIN for other names under `vm.`; NOERROR with no data (and the SOA, for negative
/// caching) for other types of a known name; REFUSED for names outside `vm.`; FORMERR for a
/// malformed query; NOTIMP for opcodes other than QUERY. EDNS queries get an OPT record back,
/// and BADVERS for an EDNS version other than 0.
pub fn respond(packet: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let mut r = Reader::new(packet, 0);
    let id = r.u16().ok()?;
    let flags = r.u16().ok()?;
    let qd = r.u16().ok()?;
    let an = r.u16().ok()?;
    let ns = r.u16().ok()?;
    let ar = r.u16().ok()?;
    if flags & FLAG_QR != 0 {
        return None;
    }
    let opcode_bits = flags & 0x7800;
    let base = FLAG_QR | opcode_bits | (flags & FLAG_RD);
    if opcode_bits != 0 {
        return Some(Answer::new(id, base, rcode::NOTIMP).finish());
    }
    let formerr = || Some(Answer::new(id, base, rcode::FORMERR).finish());
    if qd != 1 {
        return formerr();
    }
    let Ok(q) = read_question(&mut r) else {
        return formerr();
    };
    let Ok(edns) = read_records(&mut r, an, ns, ar) else {
        return formerr();
    };
    debug_assert_eq!(q.raw.start, HEADER_LEN);

    let in_zone = q.labels.last().is_some_and(|l| l.as_slice() == ZONE);
    let flags = if in_zone { base | FLAG_AA } else { base };
    let start = |rcode: u8| {
        let mut a = Answer::new(id, flags, rcode);
        a.set_qdcount(1);
        a.buf.extend_from_slice(&packet[q.raw.clone()]);
        a
    };
    let with_opt = |mut a: Answer, ext: u8| {
        if edns.is_some() {
            a.opt(ext);
            a.ar += 1;
        }
        a.finish()
    };

    if let Some(e) = edns
        && e.version != 0
    {
        return Some(with_opt(start(rcode::NOERROR), rcode::BADVERS_UPPER));
    }
    if !in_zone
        || !matches!(q.qclass, CLASS_IN | CLASS_ANY)
        || matches!(q.qtype, rtype::AXFR | rtype::IXFR)
    {
        return Some(with_opt(start(rcode::REFUSED), 0));
    }
    let zone_at = *q
        .label_offsets
        .last()
        .expect("in_zone means one label at least");
    let wants_a = matches!(q.qtype, rtype::A | rtype::ANY);
    let a = match q.labels.len() {
        // The apex, `vm.`: it exists (SOA), with no address.
        1 => {
            let mut a = start(rcode::NOERROR);
            a.soa(zone_at);
            if matches!(q.qtype, rtype::SOA | rtype::ANY) {
                a.an += 1;
            } else {
                a.ns += 1;
            }
            a
        }
        2 => {
            let ip = std::str::from_utf8(&q.labels[0])
                .ok()
                .and_then(|n| names.get(n));
            match ip {
                Some(ip) if wants_a => {
                    let mut a = start(rcode::NOERROR);
                    a.a(HEADER_LEN, *ip);
                    a.an += 1;
                    a
                }
                Some(_) => {
                    let mut a = start(rcode::NOERROR);
                    a.soa(zone_at);
                    a.ns += 1;
                    a
                }
                None => {
                    let mut a = start(rcode::NXDOMAIN);
                    a.soa(zone_at);
                    a.ns += 1;
                    a
                }
            }
        }
        // Nothing lives below a VM's name.
        _ => {
            let mut a = start(rcode::NXDOMAIN);
            a.soa(zone_at);
            a.ns += 1;
            a
        }
    };
    Some(with_opt(a, 0))
}

/// Builds a query packet (used by tests and by clients such as the daemon's integration tests).
pub fn build_query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&FLAG_RD.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&(edns as u16).to_be_bytes());
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        p.push(bytes.len() as u8);
        p.extend_from_slice(bytes);
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    if edns {
        p.push(0);
        p.extend_from_slice(&rtype::OPT.to_be_bytes());
        p.extend_from_slice(&4096u16.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
    }
    p
}

/// The parts of an answer a client checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub rcode: u8,
    pub authoritative: bool,
    /// Addresses of the `A` records in the answer section.
    pub addrs: Vec<Ipv4Addr>,
    pub answers: u16,
    pub authority: u16,
    pub additional: u16,
}

/// Reads an answer: header, question, and the `A` records of the answer section.
pub fn parse_reply(packet: &[u8]) -> Option<Reply> {
    let mut r = Reader::new(packet, 0);
    let id = r.u16().ok()?;
    let flags = r.u16().ok()?;
    if flags & FLAG_QR == 0 {
        return None;
    }
    let qd = r.u16().ok()?;
    let an = r.u16().ok()?;
    let ns = r.u16().ok()?;
    let ar = r.u16().ok()?;
    for _ in 0..qd {
        r.skip_name().ok()?;
        r.take(4).ok()?;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        r.skip_name().ok()?;
        let t = r.u16().ok()?;
        r.take(6).ok()?;
        let len = r.u16().ok()?;
        let data = r.take(len as usize).ok()?;
        if t == rtype::A && data.len() == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
    }
    Some(Reply {
        id,
        rcode: (flags & 0x000F) as u8,
        authoritative: flags & FLAG_AA != 0,
        addrs,
        answers: an,
        authority: ns,
        additional: ar,
    })
}
