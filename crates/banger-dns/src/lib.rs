//! banger's DNS responder: answers `<name>.vm` with the address of a running VM.
//!
//! A small authoritative server for the `vm.` zone over UDP, meant for loopback
//! (`127.0.0.1:<dns_port>`). The daemon owns a [`Names`] table and replaces it whole whenever
//! its VMs change; the responder reads a snapshot per query. The wire format is parsed by
//! [`wire`], by hand and with every read bounds-checked: a malformed packet is answered with
//! FORMERR or dropped, never a panic.

pub mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// The names the responder answers: lower-case VM name → address. Cheap to clone; every clone
/// sees the same table. Readers take a snapshot (an `Arc`), so a replacement never blocks a
/// query for longer than an `Arc` clone.
#[derive(Debug, Clone, Default)]
pub struct Names {
    table: Arc<RwLock<Arc<HashMap<String, Ipv4Addr>>>>,
}

impl Names {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole table. Names are lower-cased (DNS is case-insensitive).
    pub fn replace(&self, names: impl IntoIterator<Item = (String, Ipv4Addr)>) {
        let map: HashMap<String, Ipv4Addr> = names
            .into_iter()
            .map(|(n, ip)| (n.to_ascii_lowercase(), ip))
            .collect();
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(map);
    }

    pub fn snapshot(&self) -> Arc<HashMap<String, Ipv4Addr>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.snapshot().get(&name.to_ascii_lowercase()).copied()
    }
}

/// A bound responder socket, not yet serving. Binding is separate from serving so the caller
/// learns at once whether the port is free.
#[derive(Debug)]
pub struct Responder {
    socket: UdpSocket,
}

/// Largest query read; longer datagrams are truncated by the kernel and then fail to parse.
const MAX_QUERY: usize = 4096;

impl Responder {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Responder> {
        Ok(Responder {
            socket: UdpSocket::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers queries from `names` until `shutdown` completes.
    pub async fn serve(self, names: Names, shutdown: impl Future<Output = ()>) {
        let mut buf = vec![0u8; MAX_QUERY];
        tokio::pin!(shutdown);
        loop {
            let (len, peer) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Nothing a peer sends can make this fail for long; do not spin.
                        warn!(error = %e, "dns: receive failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => return,
            };
            let snapshot = names.snapshot();
            match wire::respond(&buf[..len], &snapshot) {
                Some(answer) => {
                    if let Err(e) = self.socket.send_to(&answer, peer).await {
                        debug!(error = %e, %peer, "dns: sending an answer failed");
                    }
                }
                None => debug!(%peer, len, "dns: dropped a packet that is not a query"),
            }
        }
    }
}

/// Asks `server` for the `A` record of `name` (a tiny client for tests and diagnostics); the
/// reply's rcode and addresses say what the server answered.
pub async fn query_a(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> std::io::Result<wire::Reply> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.connect(server).await?;
    let id: u16 = (std::process::id() as u16) ^ (name.len() as u16).rotate_left(8);
    socket
        .send(&wire::build_query(id, name, wire::rtype::A, true))
        .await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(timeout, socket.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no DNS answer"))??;
        match wire::parse_reply(&buf[..n]) {
            Some(r) if r.id == id => return Ok(r),
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests;
