//! 100,000 random and mutated requests through the running daemon's decoder and dispatcher (the
//! fake Firecracker, no network): every one gets exactly one well-formed final frame, the
//! daemon never panics or hangs and still answers afterwards, and whatever the accepted
//! requests created can be cleaned up without a leak.
//!
//! Methods that reach the network (`image.pull`, `image.build`, `kernel.pull`, `kernel.build`)
//! and `daemon.shutdown` are decoded by the test first and not sent: they would only measure
//! the mirror's timeouts, or end the run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use banger_core::OpId;
use banger_protocol::{
    Envelope, Frame, ImageCachePruneParams, NameForceParams, NameParams, PROTOCOL_VERSION, Request,
    VmCreateParams, VmDeleteParams, VmKillParams, VmLogsParams, VmRef, VmSetParams, VmStopParams,
    decode_request,
};
use banger_testkit::TestEnv;

const SKIPPED: &[&str] = &[
    "image.pull",
    "image.build",
    "kernel.pull",
    "kernel.build",
    "daemon.shutdown",
];

fn seeds() -> Vec<Vec<u8>> {
    let op = OpId::generate();
    let vm = |n: &str| VmRef { vm: n.into() };
    [
        Request::Ping,
        Request::DaemonStatus,
        Request::VmList,
        Request::VmPrune,
        Request::ImageList,
        Request::KernelList,
        Request::VmShow(vm("fz")),
        Request::VmStart(vm("fz")),
        Request::VmLogs(VmLogsParams {
            vm: "fz".into(),
            lines: Some(5),
        }),
        Request::VmSshInfo(vm("fz")),
        Request::VmStop(VmStopParams {
            vm: "fz".into(),
            timeout_secs: Some(1),
        }),
        Request::VmKill(VmKillParams {
            vm: "fz".into(),
            signal: Some("TERM".into()),
        }),
        Request::VmSet(VmSetParams {
            vm: "fz".into(),
            vcpu: Some(2),
            memory_mib: None,
        }),
        Request::VmCreate(VmCreateParams {
            name: Some("fz".into()),
            no_start: true,
            ..Default::default()
        }),
        Request::VmDelete(VmDeleteParams {
            vm: "fz".into(),
            force: true,
        }),
        Request::ImageShow(NameParams {
            name: "test-image".into(),
        }),
        Request::ImageDelete(NameForceParams {
            name: "nope".into(),
            force: false,
        }),
        Request::KernelShow(NameParams {
            name: "test-kernel".into(),
        }),
        Request::ImageCachePrune(ImageCachePruneParams { dry_run: true }),
    ]
    .iter()
    .map(|r| {
        Envelope {
            v: PROTOCOL_VERSION,
            op_id: &op,
            request: r,
        }
        .to_line()
        .into_bytes()
    })
    .collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], i: usize) -> Vec<u8> {
    let mut input = if i.is_multiple_of(5) {
        let n = (rng.next() % 160) as usize;
        (0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>()
    } else {
        seeds[(rng.next() as usize) % seeds.len()].clone()
    };
    // Keep the newline: one request per connection either way.
    if input.last() == Some(&b'\n') {
        input.pop();
    }
    for _ in 0..(rng.next() % 5) {
        if input.is_empty() {
            break;
        }
        let at = (rng.next() as usize) % input.len();
        match rng.next() % 6 {
            0 => input[at] = rng.next() as u8,
            1 => {
                input.remove(at);
            }
            2 => input.insert(at, b"{}[]\",:0-e\\9"[(rng.next() % 12) as usize]),
            3 => input.truncate(at),
            // Values the validators must refuse: huge numbers, odd names, nesting.
            4 => {
                let junk: &[u8] = match rng.next() % 5 {
                    0 => b"99999999999999999999",
                    1 => b"\"../../etc/passwd\"",
                    2 => b"[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]",
                    3 => b"\"\\u0000\"",
                    _ => b"-1",
                };
                for (k, b) in junk.iter().enumerate() {
                    input.insert((at + k).min(input.len()), *b);
                }
            }
            _ => {
                // A name change keeps most requests valid, so they reach the dispatcher.
                let name = format!("fz{}", rng.next() % 7);
                if let Some(p) = input.windows(4).position(|w| w == b"\"fz\"") {
                    input.splice(p + 1..p + 3, name.bytes());
                }
            }
        }
    }
    input.push(b'\n');
    input
}

/// Sends one line; returns the final frame's code (`None` for a result).
fn send(socket: &std::path::Path, line: &[u8]) -> Result<Option<String>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(line).map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::new(s);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = r.read_line(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed without a final frame".into());
        }
        let f: Frame =
            serde_json::from_str(buf.trim_end()).map_err(|e| format!("bad frame {buf:?}: {e}"))?;
        match f {
            Frame::Result { .. } => return Ok(None),
            Frame::Error { code, message, .. } => {
                if message.is_empty() {
                    return Err("an error without a message".into());
                }
                return Ok(Some(code.to_string()));
            }
            _ => continue,
        }
    }
}

#[test]
fn a_hundred_thousand_hostile_requests_through_decoder_and_dispatcher() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let seeds = seeds();
    let total = 100_000usize;
    let threads = 4;
    let started = Instant::now();
    let results: Vec<(
        usize,
        usize,
        usize,
        std::collections::BTreeMap<String, usize>,
    )> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (seeds, socket) = (&seeds, env.socket());
                s.spawn(move || {
                    let seed =
                        0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc);
                    let mut rng = Rng(seed);
                    let (mut sent, mut ok, mut skipped) = (0, 0, 0);
                    let mut codes = std::collections::BTreeMap::new();
                    for i in (t..total).step_by(threads) {
                        let line = mutate(&mut rng, seeds, i);
                        if let Ok((_, req)) = decode_request(&line)
                            && SKIPPED.contains(&req.method())
                        {
                            skipped += 1;
                            continue;
                        }
                        match send(&socket, &line) {
                            Ok(None) => ok += 1,
                            Ok(Some(code)) => *codes.entry(code).or_insert(0) += 1,
                            Err(e) => panic!(
                                "request {i} (seed {seed:#x}) {:?}: {e}",
                                String::from_utf8_lossy(&line)
                            ),
                        }
                        sent += 1;
                    }
                    (sent, ok, skipped, codes)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut sent, mut ok, mut skipped) = (0, 0, 0);
    let mut codes = std::collections::BTreeMap::new();
    for (s, o, k, c) in results {
        sent += s;
        ok += o;
        skipped += k;
        for (code, n) in c {
            *codes.entry(code).or_insert(0) += n;
        }
    }
    println!(
        "fuzz: {} requests generated, {sent} sent in {:.1}s, {ok} succeeded, {skipped} not sent (network/shutdown methods), errors by code: {codes:?}",
        sent + skipped,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(sent + skipped, total);
    // The daemon survived, never logged a panic, and what the fuzz created cleans up.
    env.request(&Request::Ping).ok();
    let log = env.daemon_log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    let list = env.request(&Request::VmList).ok();
    for vm in list["vms"].as_array().unwrap() {
        env.request(&Request::VmDelete(VmDeleteParams {
            vm: vm["name"].as_str().unwrap().to_string(),
            force: true,
        }))
        .ok();
    }
    let leaks = env.request(&Request::DaemonLeaks).ok();
    assert_eq!(leaks["leaks"].as_array().map(Vec::len), Some(0), "{leaks}");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}
