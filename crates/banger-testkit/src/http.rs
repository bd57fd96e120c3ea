//! A tiny HTTP/1.1 file server on 127.0.0.1 for tests that download (catalog bundles): `GET
//! /<name>` answers the bytes registered under that name, anything else 404.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

type Files = Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>;

/// Serves until dropped (the accept thread ends with the process; the port is private).
#[derive(Debug)]
pub struct StaticServer {
    addr: String,
    files: Files,
}

impl StaticServer {
    pub fn start() -> StaticServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test http server");
        let addr = listener.local_addr().expect("local addr").to_string();
        let files: Files = Arc::default();
        let served = files.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let files = served.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    // Skip the headers.
                    let mut h = String::new();
                    while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                        h.clear();
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/");
                    let body = files
                        .lock()
                        .expect("files")
                        .get(path.trim_start_matches('/'))
                        .cloned();
                    let mut w = &conn;
                    let _ = match body {
                        Some(b) => w
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                    b.len()
                                )
                                .as_bytes(),
                            )
                            .and_then(|_| w.write_all(&b)),
                        None => w.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        ),
                    };
                });
            }
        });
        StaticServer { addr, files }
    }

    /// Registers `bytes` as `/<name>` and returns its URL.
    pub fn serve(&self, name: &str, bytes: Vec<u8>) -> String {
        self.files
            .lock()
            .expect("files")
            .insert(name.to_string(), Arc::new(bytes));
        format!("http://{}/{name}", self.addr)
    }
}
