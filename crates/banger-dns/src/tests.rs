use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::wire::{self, Reply, build_query, parse_reply, rcode, respond, rtype};
use crate::{Names, Responder};

fn table() -> HashMap<String, Ipv4Addr> {
    let names = Names::new();
    names.replace([
        ("alpha".to_string(), Ipv4Addr::new(172, 30, 0, 2)),
        ("Beta".to_string(), Ipv4Addr::new(172, 30, 0, 3)),
    ]);
    (*names.snapshot()).clone()
}

fn ask(name: &str, qtype: u16, edns: bool) -> (Vec<u8>, Reply) {
    let q = build_query(0xBEEF, name, qtype, edns);
    let a = respond(&q, &table()).expect("an answer");
    let r = parse_reply(&a).expect("a parsable answer");
    assert_eq!(r.id, 0xBEEF);
    (a, r)
}

#[test]
fn a_record_for_a_known_name() {
    let (bytes, r) = ask("alpha.vm", rtype::A, false);
    assert_eq!(r.rcode, rcode::NOERROR);
    assert!(r.authoritative);
    assert_eq!(r.addrs, vec![Ipv4Addr::new(172, 30, 0, 2)]);
    assert_eq!((r.answers, r.authority, r.additional), (1, 0, 0));
    // The TTL is the short one: the answer's TTL sits 6 bytes after its pointer/type/class.
    let q_end = 12 + "alpha.vm".len() + 2 + 4;
    let ttl = u32::from_be_bytes(bytes[q_end + 6..q_end + 10].try_into().unwrap());
    assert_eq!(ttl, wire::TTL);
    // The question is echoed verbatim.
    assert_eq!(
        &bytes[12..q_end],
        &build_query(0xBEEF, "alpha.vm", 1, false)[12..]
    );
}

#[test]
fn names_are_case_insensitive_and_the_question_case_is_kept() {
    let (bytes, r) = ask("ALPHA.Vm.", rtype::A, false);
    assert_eq!(r.addrs, vec![Ipv4Addr::new(172, 30, 0, 2)]);
    assert_eq!(&bytes[13..18], b"ALPHA");
    // A table entry given in upper case is found in lower case.
    let (_, r) = ask("beta.vm", rtype::A, false);
    assert_eq!(r.addrs, vec![Ipv4Addr::new(172, 30, 0, 3)]);
    assert_eq!(
        Names::new().lookup("x"),
        None,
        "an empty table knows nothing"
    );
}

#[test]
fn unknown_vm_names_are_nxdomain_with_the_soa() {
    for name in ["gamma.vm", "a.alpha.vm", "x.y.z.vm"] {
        let (_, r) = ask(name, rtype::A, false);
        assert_eq!(r.rcode, rcode::NXDOMAIN, "{name}");
        assert!(r.authoritative);
        assert!(r.addrs.is_empty());
        assert_eq!((r.answers, r.authority), (0, 1), "SOA for negative caching");
    }
}

#[test]
fn other_types_of_a_known_name_are_nodata() {
    for qtype in [
        28, /* AAAA */
        16, /* TXT */
        15, /* MX */
        rtype::SOA,
    ] {
        let (_, r) = ask("alpha.vm", qtype, false);
        assert_eq!(r.rcode, rcode::NOERROR, "type {qtype}");
        assert_eq!((r.answers, r.authority), (0, 1), "type {qtype}");
    }
    let (_, r) = ask("alpha.vm", rtype::ANY, false);
    assert_eq!(r.addrs, vec![Ipv4Addr::new(172, 30, 0, 2)]);
}

#[test]
fn the_apex_exists() {
    let (_, r) = ask("vm", rtype::SOA, false);
    assert_eq!((r.rcode, r.answers), (rcode::NOERROR, 1));
    let (_, r) = ask("vm", rtype::A, false);
    assert_eq!((r.rcode, r.answers, r.authority), (rcode::NOERROR, 0, 1));
}

#[test]
fn names_outside_the_zone_are_refused() {
    for name in ["example.com", "alpha.vm.example.com", "vmx", "alphavm", ""] {
        let (_, r) = ask(name, rtype::A, false);
        assert_eq!(r.rcode, rcode::REFUSED, "{name:?}");
        assert!(!r.authoritative, "{name:?}");
        assert_eq!(r.answers + r.authority, 0);
    }
    let (_, r) = ask("alpha.vm", rtype::AXFR, false);
    assert_eq!(r.rcode, rcode::REFUSED, "no zone transfers");
    // Class CH (version.bind style) is refused too.
    let mut q = build_query(7, "alpha.vm", rtype::A, false);
    let n = q.len();
    q[n - 1] = 3;
    let r = parse_reply(&respond(&q, &table()).unwrap()).unwrap();
    assert_eq!(r.rcode, rcode::REFUSED);
}

#[test]
fn edns_is_tolerated_and_echoed() {
    let (bytes, r) = ask("alpha.vm", rtype::A, true);
    assert_eq!(r.addrs, vec![Ipv4Addr::new(172, 30, 0, 2)]);
    assert_eq!(r.additional, 1);
    // The OPT record closes the packet: root name, type 41, our payload size, ttl 0, rdlen 0.
    let opt = &bytes[bytes.len() - 11..];
    assert_eq!(opt[0], 0);
    assert_eq!(u16::from_be_bytes([opt[1], opt[2]]), rtype::OPT);
    assert_eq!(u16::from_be_bytes([opt[3], opt[4]]), wire::EDNS_UDP_SIZE);
    let (_, r) = ask("nope.vm", rtype::A, true);
    assert_eq!((r.rcode, r.additional), (rcode::NXDOMAIN, 1));

    // EDNS version 1: BADVERS (extended rcode 1 in the OPT ttl, 0 in the header).
    let mut q = build_query(9, "alpha.vm", rtype::A, true);
    let n = q.len();
    q[n - 5] = 1; // the version byte of the OPT ttl
    let a = respond(&q, &table()).unwrap();
    let r = parse_reply(&a).unwrap();
    assert_eq!((r.rcode, r.answers, r.additional), (0, 0, 1));
    assert_eq!(a[a.len() - 6], rcode::BADVERS_UPPER);

    // Two OPT records: format error.
    let mut q = build_query(9, "alpha.vm", rtype::A, true);
    let opt = q[q.len() - 11..].to_vec();
    q.extend_from_slice(&opt);
    q[11] = 2;
    let r = parse_reply(&respond(&q, &table()).unwrap()).unwrap();
    assert_eq!(r.rcode, rcode::FORMERR);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let t = table();
    // Shorter than a header: dropped.
    for len in 0..12 {
        assert_eq!(respond(&vec![0u8; len], &t), None, "len {len}");
    }
    // A response (QR set): dropped, never answered.
    let mut q = build_query(1, "alpha.vm", rtype::A, false);
    q[2] |= 0x80;
    assert_eq!(respond(&q, &t), None);

    let formerr = |q: &[u8]| {
        let r = parse_reply(&respond(q, &t).expect("an answer")).expect("parsable");
        assert_eq!(r.rcode, rcode::FORMERR, "{q:?}");
        assert_eq!(r.answers + r.authority + r.additional, 0);
    };
    // Every truncation of a good query past the header.
    let good = build_query(2, "alpha.vm", rtype::A, true);
    for cut in 12..good.len() {
        formerr(&good[..cut]);
    }
    // No question, two questions.
    let mut q = build_query(3, "alpha.vm", rtype::A, false);
    q[5] = 0;
    formerr(&q);
    q[5] = 2;
    formerr(&q);
    // A compression pointer in the question (pointing at itself).
    let mut q = build_query(4, "", rtype::A, false);
    q.truncate(12);
    q.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    formerr(&q);
    // An extended label type.
    let mut q = build_query(4, "", rtype::A, false);
    q.truncate(12);
    q.extend_from_slice(&[0x41, b'a', 0, 0, 1, 0, 1]);
    formerr(&q);
    // A name longer than 255 bytes (five 63-byte labels).
    let long = vec!["x".repeat(63); 5].join(".");
    formerr(&build_query(5, &long, rtype::A, false));
    // A name of exactly 255 bytes is fine (and refused: it is not under vm.).
    let ok = format!(
        "{}.{}.{}.{}.vm",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(58)
    );
    let q = build_query(5, &ok, rtype::A, false);
    assert_eq!(q.len() - 12 - 4, 255);
    let r = parse_reply(&respond(&q, &t).unwrap()).unwrap();
    assert_eq!(r.rcode, rcode::NXDOMAIN);
    // An additional record claiming more rdata than there is.
    let mut q = build_query(6, "alpha.vm", rtype::A, true);
    let n = q.len();
    q[n - 1] = 40;
    formerr(&q);
    // An answer-section count with nothing behind it.
    let mut q = build_query(6, "alpha.vm", rtype::A, false);
    q[7] = 1;
    formerr(&q);
}

#[test]
fn other_opcodes_are_not_implemented() {
    let mut q = build_query(8, "alpha.vm", rtype::A, false);
    q[2] |= 5 << 3; // UPDATE
    let r = parse_reply(&respond(&q, &table()).unwrap()).unwrap();
    assert_eq!(r.rcode, rcode::NOTIMP);
}

/// Random bytes, random mutations of good queries, and random truncations: never a panic, and
/// every answer is a well-formed response with the query's id.
#[test]
fn random_packets_never_panic() {
    let t = table();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED_D115);
    let seeds = [
        build_query(1, "alpha.vm", rtype::A, true),
        build_query(2, "nope.vm", 28, false),
        build_query(3, "example.com", rtype::ANY, true),
    ];
    for i in 0..100_000u32 {
        let packet: Vec<u8> = match i % 3 {
            0 => {
                let len = rng.random_range(0..600);
                (0..len).map(|_| rng.random()).collect()
            }
            1 => {
                let mut p = seeds[i as usize % seeds.len()].clone();
                for _ in 0..rng.random_range(1..6) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                p
            }
            _ => {
                let p = &seeds[i as usize % seeds.len()];
                let mut p = p[..rng.random_range(0..=p.len())].to_vec();
                let extra = rng.random_range(0..20);
                p.extend((0..extra).map(|_| rng.random::<u8>()));
                p
            }
        };
        if let Some(answer) = respond(&packet, &t) {
            assert!(answer.len() >= 12 && answer.len() <= 512, "{packet:?}");
            assert_eq!(answer[..2], packet[..2], "the id is echoed");
            assert!(answer[2] & 0x80 != 0, "QR is set");
            assert!(parse_reply(&answer).is_some(), "{packet:?} -> {answer:?}");
        }
    }
}

#[tokio::test]
async fn serves_over_udp_and_follows_table_updates() {
    let responder = Responder::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = responder.local_addr().unwrap();
    let names = Names::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(responder.serve(names.clone(), async {
        let _ = stop_rx.await;
    }));
    let timeout = Duration::from_secs(2);

    let r = crate::query_a(addr, "box.vm", timeout).await.unwrap();
    assert_eq!(r.rcode, rcode::NXDOMAIN);
    names.replace([("box".to_string(), Ipv4Addr::new(10, 0, 0, 9))]);
    let r = crate::query_a(addr, "BOX.vm", timeout).await.unwrap();
    assert_eq!(r.addrs, vec![Ipv4Addr::new(10, 0, 0, 9)]);

    // Garbage does not stop the server.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0xFF; 3], addr).await.unwrap();
    sock.send_to(&[0x00; 40], addr).await.unwrap();
    let r = crate::query_a(addr, "box.vm", timeout).await.unwrap();
    assert_eq!(r.addrs, vec![Ipv4Addr::new(10, 0, 0, 9)]);

    names.replace([]);
    let r = crate::query_a(addr, "box.vm", timeout).await.unwrap();
    assert_eq!(r.rcode, rcode::NXDOMAIN);

    stop_tx.send(()).unwrap();
    server.await.unwrap();
    // The port is free again once the server is gone.
    Responder::bind(addr).await.unwrap();
}
