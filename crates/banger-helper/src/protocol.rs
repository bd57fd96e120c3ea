//! The wire format between the daemon (or any root/owner process) and the helper.
//!
//! Newline-delimited JSON over a Unix stream socket. A request line is
//! `{"v":1,"op_id":"op-…","request":{"op":"CreateTap",…}}`; its reply line is `{"ok":<value>}`
//! or `{"error":{"code":"bad_request|forbidden|failed","message":"…"}}`. A connection may carry
//! several requests one after another; the helper answers each before reading the next.
//! `OpenTap`'s reply carries the tap's file descriptor as `SCM_RIGHTS` ancillary data.
//!
//! [`HelperRequest`] is the whole boundary: one closed enum, unknown ops and unknown fields
//! rejected by serde. Names, addresses and paths travel as strings and are parsed by
//! [`crate::validate`], so every refusal can name the field and the value it refused.

use banger_core::OpId;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, HelperError};

/// The protocol version; a request with another `v` is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line (without its newline) the helper reads. The biggest legitimate
/// request (`Debootstrap` with 64 packages of 64 bytes) is about 5 KiB.
pub const MAX_LINE: usize = 64 * 1024;

/// The longest reply line a client accepts (`ListTaps` on a host with thousands of taps).
pub const MAX_REPLY_LINE: usize = 4 * 1024 * 1024;

/// Every operation the helper performs. Nothing else runs as root on the daemon's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum HelperRequest {
    /// Liveness check; answers `{"version":1}`. (Ops without arguments are empty struct
    /// variants: serde would let a unit variant carry unknown fields.)
    Ping {},
    /// `NetOps::ensure_bridge` on the configured bridge with the configured gateway/prefix.
    EnsureBridge {
        bridge: String,
        gateway: String,
        prefix: u8,
    },
    /// `NetOps::create_tap`; the tap is owned by `owner_uid`, which must be the owner.
    CreateTap {
        tap: String,
        bridge: String,
        owner_uid: Option<u32>,
    },
    DeleteTap {
        tap: String,
    },
    /// Answers the banger taps as a list of names.
    ListTaps {},
    EnsureNat {
        bridge: String,
        cidr: String,
    },
    AddVmNat {
        vm_id: String,
        ip: String,
        tap: String,
    },
    RemoveVmNat {
        vm_id: String,
    },
    /// Answers the VM ids with NAT rules.
    ListNatVms {},
    ForgetNeighbor {
        bridge: String,
        ip: String,
    },
    /// Uninstall: banger's nft table, the taps on its bridge and (when given) the bridge.
    RemoveAll {
        bridge: Option<String>,
    },
    /// Opens an existing banger tap and passes its fd back (`SCM_RIGHTS`), so an unprivileged
    /// VMM can use it (`-netdev tap,fd=N`) even where `/dev/net/tun` is 0600.
    OpenTap {
        tap: String,
    },
    /// `losetup --find --show [--read-only] <path>`; answers `"/dev/loopN"`.
    LoopAttach {
        path: String,
        read_only: bool,
    },
    /// `losetup --detach /dev/loopN` for a loop device backed by a file of banger's.
    LoopDetach {
        device: String,
    },
    /// `dmsetup create banger-<vm_id>` as a persistent snapshot of `origin_loop` with
    /// `cow_loop`; answers `"/dev/mapper/banger-<vm_id>"`.
    DmSnapshotCreate {
        vm_id: String,
        origin_loop: String,
        cow_loop: String,
    },
    /// `dmsetup remove banger-<vm_id>`.
    DmRemove {
        vm_id: String,
    },
    /// `mmdebstrap --format=tar` with a fixed argv into `output`, a new file directly in
    /// `<state_dir>/build`, then owned by the owner; answers `{"output":…, "bytes":…}`.
    Debootstrap {
        suite: String,
        mirror: String,
        packages: Vec<String>,
        output: String,
    },
}

impl HelperRequest {
    /// The op's name as it appears on the wire and in logs.
    pub fn op(&self) -> &'static str {
        match self {
            HelperRequest::Ping {} => "Ping",
            HelperRequest::EnsureBridge { .. } => "EnsureBridge",
            HelperRequest::CreateTap { .. } => "CreateTap",
            HelperRequest::DeleteTap { .. } => "DeleteTap",
            HelperRequest::ListTaps {} => "ListTaps",
            HelperRequest::EnsureNat { .. } => "EnsureNat",
            HelperRequest::AddVmNat { .. } => "AddVmNat",
            HelperRequest::RemoveVmNat { .. } => "RemoveVmNat",
            HelperRequest::ListNatVms {} => "ListNatVms",
            HelperRequest::ForgetNeighbor { .. } => "ForgetNeighbor",
            HelperRequest::RemoveAll { .. } => "RemoveAll",
            HelperRequest::OpenTap { .. } => "OpenTap",
            HelperRequest::LoopAttach { .. } => "LoopAttach",
            HelperRequest::LoopDetach { .. } => "LoopDetach",
            HelperRequest::DmSnapshotCreate { .. } => "DmSnapshotCreate",
            HelperRequest::DmRemove { .. } => "DmRemove",
            HelperRequest::Debootstrap { .. } => "Debootstrap",
        }
    }

    /// Every op name, in declaration order (docs and tests check against it).
    pub const OPS: &'static [&'static str] = &[
        "Ping",
        "EnsureBridge",
        "CreateTap",
        "DeleteTap",
        "ListTaps",
        "EnsureNat",
        "AddVmNat",
        "RemoveVmNat",
        "ListNatVms",
        "ForgetNeighbor",
        "RemoveAll",
        "OpenTap",
        "LoopAttach",
        "LoopDetach",
        "DmSnapshotCreate",
        "DmRemove",
        "Debootstrap",
    ];

    /// The request's arguments for a log line: `key=value` pairs, every string shown with
    /// `{:?}` (so a newline in a hostile value cannot start a fake log line) and cut short.
    pub fn log_args(&self) -> String {
        let kv = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", show(v)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            HelperRequest::Ping {} | HelperRequest::ListTaps {} | HelperRequest::ListNatVms {} => {
                String::new()
            }
            HelperRequest::EnsureBridge {
                bridge,
                gateway,
                prefix,
            } => format!(
                "{} prefix={prefix}",
                kv(&[("bridge", bridge), ("gateway", gateway)])
            ),
            HelperRequest::CreateTap {
                tap,
                bridge,
                owner_uid,
            } => format!(
                "{} owner_uid={}",
                kv(&[("tap", tap), ("bridge", bridge)]),
                owner_uid.map_or_else(|| "none".to_string(), |u| u.to_string())
            ),
            HelperRequest::DeleteTap { tap } | HelperRequest::OpenTap { tap } => {
                kv(&[("tap", tap)])
            }
            HelperRequest::EnsureNat { bridge, cidr } => kv(&[("bridge", bridge), ("cidr", cidr)]),
            HelperRequest::AddVmNat { vm_id, ip, tap } => {
                kv(&[("vm_id", vm_id), ("ip", ip), ("tap", tap)])
            }
            HelperRequest::RemoveVmNat { vm_id } | HelperRequest::DmRemove { vm_id } => {
                kv(&[("vm_id", vm_id)])
            }
            HelperRequest::ForgetNeighbor { bridge, ip } => kv(&[("bridge", bridge), ("ip", ip)]),
            HelperRequest::RemoveAll { bridge } => match bridge {
                Some(b) => kv(&[("bridge", b)]),
                None => "bridge=none".into(),
            },
            HelperRequest::LoopAttach { path, read_only } => {
                format!("{} read_only={read_only}", kv(&[("path", path)]))
            }
            HelperRequest::LoopDetach { device } => kv(&[("device", device)]),
            HelperRequest::DmSnapshotCreate {
                vm_id,
                origin_loop,
                cow_loop,
            } => kv(&[
                ("vm_id", vm_id),
                ("origin_loop", origin_loop),
                ("cow_loop", cow_loop),
            ]),
            HelperRequest::Debootstrap {
                suite,
                mirror,
                packages,
                output,
            } => format!(
                "{} packages={}",
                kv(&[("suite", suite), ("mirror", mirror), ("output", output)]),
                packages.len()
            ),
        }
    }
}

/// A caller-supplied value for a message or log line: quoted and escaped by `{:?}`, at most
/// 120 characters of it.
pub fn show(s: &str) -> String {
    const MAX: usize = 120;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}…({} bytes)", s.len())
    }
}

/// A request line as the client writes it.
#[derive(Debug, Serialize)]
pub struct RequestEnvelope<'a> {
    pub v: u32,
    pub op_id: &'a str,
    pub request: &'a HelperRequest,
}

impl RequestEnvelope<'_> {
    /// The line to send, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|e| unreachable!("a request always serializes: {e}"));
        s.push('\n');
        s
    }
}

/// The body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Ok(serde_json::Value),
    Error(ErrorBody),
}

impl Reply {
    pub fn error(e: &HelperError) -> Reply {
        Reply::Error(ErrorBody {
            code: e.code(),
            message: e.message(),
        })
    }

    /// The line to send, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|e| unreachable!("a reply always serializes: {e}"));
        s.push('\n');
        s
    }
}

/// A request line the helper could not accept, with whatever of it could be read, for the log.
#[derive(Debug)]
pub struct Rejection {
    pub op_id: Option<OpId>,
    pub op: Option<String>,
    pub error: HelperError,
}

/// Decodes one request line (without its newline). The op_id is read first, so even a request
/// refused for its version or its op is logged under the caller's id.
pub fn decode_request(line: &[u8]) -> Result<(OpId, HelperRequest), Rejection> {
    let reject = |op_id: Option<OpId>, op: Option<String>, msg: String| Rejection {
        op_id,
        op,
        error: HelperError::BadRequest(msg),
    };
    if let Err(e) = std::str::from_utf8(line) {
        return Err(reject(
            None,
            None,
            format!(
                "the request is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| reject(None, None, format!("malformed JSON: {e}")))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(reject(
            None,
            None,
            "the request must be a JSON object {\"v\":1,\"op_id\":…,\"request\":{…}}".into(),
        ));
    };
    let op_id = match obj.get("op_id") {
        Some(serde_json::Value::String(s)) => OpId::from_client(s).ok_or_else(|| {
            reject(
                None,
                None,
                format!("op_id: {} is not 1 to 64 of A-Za-z0-9_-", show(s)),
            )
        })?,
        Some(other) => {
            return Err(reject(
                None,
                None,
                format!("op_id: expected a string, got {}", kind(other)),
            ));
        }
        None => return Err(reject(None, None, "op_id: missing".into())),
    };
    let id = Some(op_id.clone());
    let op = obj
        .get("request")
        .and_then(|r| r.get("op"))
        .and_then(|o| o.as_str())
        .map(show);
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "v" | "op_id" | "request"))
    {
        return Err(reject(
            id,
            op,
            format!(
                "unknown envelope field {}; expected v, op_id, request",
                show(k)
            ),
        ));
    }
    match obj.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => {
            return Err(reject(
                id,
                op,
                format!(
                    "unsupported protocol version {}; this helper speaks {PROTOCOL_VERSION}",
                    show(&v.to_string())
                ),
            ));
        }
        None => return Err(reject(id, op, "v: missing".into())),
    }
    let Some(request) = obj.remove("request") else {
        return Err(reject(id, op, "request: missing".into()));
    };
    let request: HelperRequest = serde_json::from_value(request)
        .map_err(|e| reject(id.clone(), op.clone(), format!("request: {e}")))?;
    Ok((op_id, request))
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn rejected(l: &[u8]) -> String {
        match decode_request(l) {
            Ok(x) => panic!("accepted {x:?}"),
            Err(r) => {
                assert!(matches!(r.error, HelperError::BadRequest(_)), "{r:?}");
                r.error.to_string()
            }
        }
    }

    #[test]
    fn round_trips_every_op() {
        let reqs = vec![
            HelperRequest::Ping {},
            HelperRequest::EnsureBridge {
                bridge: "br-banger".into(),
                gateway: "172.30.0.1".into(),
                prefix: 24,
            },
            HelperRequest::CreateTap {
                tap: "bgt1".into(),
                bridge: "br-banger".into(),
                owner_uid: Some(1000),
            },
            HelperRequest::DeleteTap { tap: "bgt1".into() },
            HelperRequest::ListTaps {},
            HelperRequest::EnsureNat {
                bridge: "br-banger".into(),
                cidr: "172.30.0.0/24".into(),
            },
            HelperRequest::AddVmNat {
                vm_id: "a".into(),
                ip: "172.30.0.2".into(),
                tap: "bgt1".into(),
            },
            HelperRequest::RemoveVmNat { vm_id: "a".into() },
            HelperRequest::ListNatVms {},
            HelperRequest::ForgetNeighbor {
                bridge: "br-banger".into(),
                ip: "172.30.0.2".into(),
            },
            HelperRequest::RemoveAll { bridge: None },
            HelperRequest::OpenTap { tap: "bgt1".into() },
            HelperRequest::LoopAttach {
                path: "/x".into(),
                read_only: true,
            },
            HelperRequest::LoopDetach {
                device: "/dev/loop0".into(),
            },
            HelperRequest::DmSnapshotCreate {
                vm_id: "0123456789ab".into(),
                origin_loop: "/dev/loop0".into(),
                cow_loop: "/dev/loop1".into(),
            },
            HelperRequest::DmRemove {
                vm_id: "0123456789ab".into(),
            },
            HelperRequest::Debootstrap {
                suite: "bookworm".into(),
                mirror: "http://deb.debian.org/debian".into(),
                packages: vec!["openssh-server".into()],
                output: "/x".into(),
            },
        ];
        assert_eq!(
            reqs.iter().map(HelperRequest::op).collect::<Vec<_>>(),
            HelperRequest::OPS
        );
        for r in reqs {
            let l = RequestEnvelope {
                v: 1,
                op_id: "op-1",
                request: &r,
            }
            .to_line();
            assert!(l.ends_with('\n') && l.matches('\n').count() == 1);
            let wire: serde_json::Value = serde_json::from_str(&l).unwrap();
            assert_eq!(wire["request"]["op"], r.op());
            let (id, back) = decode_request(l.trim_end().as_bytes()).unwrap();
            assert_eq!(id.as_str(), "op-1");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn rejections_name_the_problem() {
        let ok = json!({"v":1,"op_id":"op-1","request":{"op":"Ping"}});
        decode_request(&line(ok)).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{".to_vec(), "malformed JSON"),
            (b"[]".to_vec(), "JSON object"),
            (vec![b'"', 0xff, b'"'], "UTF-8"),
            (
                line(json!({"v":1,"request":{"op":"Ping"}})),
                "op_id: missing",
            ),
            (
                line(json!({"v":1,"op_id":"a b","request":{"op":"Ping"}})),
                "op_id",
            ),
            (
                line(json!({"v":1,"op_id":7,"request":{"op":"Ping"}})),
                "a number",
            ),
            (
                line(json!({"v":2,"op_id":"op-1","request":{"op":"Ping"}})),
                "unsupported protocol version \"2\"",
            ),
            (
                line(json!({"v":"1","op_id":"op-1","request":{"op":"Ping"}})),
                "unsupported protocol version",
            ),
            (
                line(json!({"op_id":"op-1","request":{"op":"Ping"}})),
                "v: missing",
            ),
            (line(json!({"v":1,"op_id":"op-1"})), "request: missing"),
            (
                line(json!({"v":1,"op_id":"op-1","x":1,"request":{"op":"Ping"}})),
                "unknown envelope field \"x\"",
            ),
            (
                line(json!({"v":1,"op_id":"op-1","request":{"op":"Mount"}})),
                "unknown variant `Mount`",
            ),
            (
                line(json!({"v":1,"op_id":"op-1","request":{"op":"DeleteTap","tap":"bgt1","x":1}})),
                "unknown field `x`",
            ),
            (
                line(json!({"v":1,"op_id":"op-1","request":{"op":"Ping","x":1}})),
                "unknown field `x`",
            ),
            (
                line(json!({"v":1,"op_id":"op-1","request":{"op":"DeleteTap"}})),
                "missing field `tap`",
            ),
            (
                line(
                    json!({"v":1,"op_id":"op-1","request":{"op":"EnsureBridge","bridge":"b","gateway":"g","prefix":300}}),
                ),
                "300",
            ),
            (
                line(json!({"v":1,"op_id":"op-1","request":{"tap":"bgt1"}})),
                "missing field `op`",
            ),
        ];
        for (l, want) in cases {
            let msg = rejected(&l);
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn rejections_keep_the_op_id_once_known() {
        let l = line(json!({"v":9,"op_id":"op-7","request":{"op":"Ping"}}));
        let r = decode_request(&l).unwrap_err();
        assert_eq!(r.op_id.unwrap().as_str(), "op-7");
        assert_eq!(r.op.as_deref(), Some("\"Ping\""));
    }

    #[test]
    fn decoder_survives_garbage() {
        // Deterministic pseudo-random mutations of a valid line: never a panic.
        let base = line(
            json!({"v":1,"op_id":"op-1","request":{"op":"CreateTap","tap":"bgt1","bridge":"br-banger","owner_uid":5}}),
        );
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut l = base.clone();
            let i = (x as usize) % l.len();
            l[i] = (x >> 32) as u8;
            if x & 1 == 0 {
                l.truncate(((x >> 8) as usize) % (l.len() + 1));
            }
            let _ = decode_request(&l);
        }
        // Deep nesting is cut off by serde_json's recursion limit, not the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        rejected(deep.as_bytes());
    }

    #[test]
    fn replies_have_the_documented_shape() {
        assert_eq!(Reply::Ok(json!(null)).to_line(), "{\"ok\":null}\n");
        let e = Reply::error(&HelperError::forbidden("uid 5 is not the owner"));
        assert_eq!(
            e.to_line(),
            "{\"error\":{\"code\":\"forbidden\",\"message\":\"uid 5 is not the owner\"}}\n"
        );
        let back: Reply = serde_json::from_str(e.to_line().trim_end()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn log_args_escape_and_cut() {
        let r = HelperRequest::DeleteTap {
            tap: "x\nop_id=forged".into(),
        };
        assert_eq!(r.log_args(), "tap=\"x\\nop_id=forged\"");
        let long = HelperRequest::LoopDetach {
            device: "a".repeat(1000),
        };
        assert!(long.log_args().len() < 200, "{}", long.log_args());
    }
}
