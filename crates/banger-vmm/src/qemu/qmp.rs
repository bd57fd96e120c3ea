//! A small client for QEMU's machine protocol (QMP) over its Unix socket.
//!
//! QMP is line-delimited JSON. On connect QEMU sends a greeting (`{"QMP": {...}}`); the client
//! must send `qmp_capabilities` before anything else. Each command is answered by exactly one
//! `{"return": ...}` or `{"error": {"class", "desc"}}` object, carrying back the `id` we sent;
//! asynchronous `{"event": ...}` lines may arrive at any time in between and are set aside.
//!
//! QEMU serves one QMP client at a time on a socket, so [`QmpClient`]'s one-shot helpers open a
//! connection, run their command and close it again, like the Firecracker client does per request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::VmmError;
use crate::firecracker::Version;

/// How long connecting (greeting and capabilities negotiation included) or one command may take
/// by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest line accepted from QEMU. Replies to the commands banger sends are a few hundred
/// bytes; this only bounds what a misbehaving peer can make us buffer.
const MAX_LINE: u64 = 4 << 20;

/// What QEMU announces when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    pub version: Version,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
    pub capabilities: Vec<String>,
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// `prelaunch` (started with `-S`, never run), `running`, `paused`, `shutdown`, ...
    pub status: String,
}

/// The reply to `query-kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// Talks QMP to the socket at one path.
#[derive(Debug, Clone)]
pub struct QmpClient {
    socket: PathBuf,
    timeout: Duration,
}

impl QmpClient {
    pub fn new(socket: PathBuf) -> Self {
        QmpClient {
            socket,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The limit for connecting and for each command.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(&self) -> Result<QmpConnection, VmmError> {
        let socket = self.socket.clone();
        let timeout = self.timeout;
        let connecting = async {
            let stream = UnixStream::connect(&socket)
                .await
                .map_err(|e| transport(&socket, "connect", e.to_string()))?;
            let (read, write) = stream.into_split();
            let mut conn = QmpConnection {
                reader: BufReader::new(read),
                writer: write,
                socket: socket.clone(),
                timeout,
                next_id: 1,
                greeting: None,
                events: Vec::new(),
            };
            let line = conn.read_message("greeting").await?;
            let greeting = parse_greeting(&line).ok_or_else(|| {
                transport(
                    &socket,
                    "greeting",
                    format!("not a QMP greeting: {}", truncate(&line.to_string(), 200)),
                )
            })?;
            conn.greeting = Some(greeting);
            conn.execute_inner("qmp_capabilities", None).await?;
            Ok(conn)
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                transport(
                    &self.socket,
                    "connect",
                    format!("no greeting within {timeout:?}"),
                )
            })?
    }

    /// Runs one command on a fresh connection and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        self.connect().await?.execute(command, arguments).await
    }

    /// `query-status`: whether the guest runs, and the run state.
    pub async fn query_status(&self) -> Result<StatusInfo, VmmError> {
        self.connect().await?.query_status().await
    }

    /// `query-kvm`: whether KVM is present and in use.
    pub async fn query_kvm(&self) -> Result<KvmInfo, VmmError> {
        let value = self.execute("query-kvm", None).await?;
        decode(&self.socket, "query-kvm", value)
    }

    /// `cont`: starts (or resumes) the guest's vCPUs.
    pub async fn cont(&self) -> Result<(), VmmError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `stop`: pauses the guest's vCPUs.
    pub async fn stop(&self) -> Result<(), VmmError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `system_powerdown`: presses the guest's ACPI power button.
    pub async fn system_powerdown(&self) -> Result<(), VmmError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `quit`: ends QEMU at once, without asking the guest.
    pub async fn quit(&self) -> Result<(), VmmError> {
        self.connect().await?.quit().await
    }
}

/// An open, negotiated QMP session.
#[derive(Debug)]
pub struct QmpConnection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    socket: PathBuf,
    timeout: Duration,
    next_id: u64,
    greeting: Option<QmpGreeting>,
    events: Vec<Value>,
}

impl QmpConnection {
    pub fn greeting(&self) -> &QmpGreeting {
        self.greeting
            .as_ref()
            .expect("a connection is handed out only after its greeting was read")
    }

    /// The asynchronous events received so far (oldest first), emptying the list.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Runs `command` and returns its `return` value; a QMP error becomes [`VmmError::Qmp`]
    /// carrying QEMU's `error.desc`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.execute_inner(command, arguments))
            .await
            .map_err(|_| {
                transport(
                    &self.socket,
                    command,
                    format!("no reply within {timeout:?}"),
                )
            })?
    }

    pub async fn query_status(&mut self) -> Result<StatusInfo, VmmError> {
        let value = self.execute("query-status", None).await?;
        decode(&self.socket, "query-status", value)
    }

    /// `quit`. QEMU may close the connection before or right after its reply; both count as
    /// success.
    pub async fn quit(mut self) -> Result<(), VmmError> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(VmmError::Transport { reason, .. }) if reason.contains(CLOSED) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| transport(&self.socket, command, format!("sending: {e}")))?;
        loop {
            let message = self.read_message(command).await?;
            let Some(object) = message.as_object() else {
                return Err(transport(
                    &self.socket,
                    command,
                    format!("unexpected message {}", truncate(&message.to_string(), 200)),
                ));
            };
            if object.contains_key("event") {
                self.events.push(message);
                continue;
            }
            // A reply without an id answers a request QEMU could not even parse: ours.
            if object.get("id").is_some_and(|got| got != &json!(id)) {
                // A late reply to an earlier command that timed out.
                continue;
            }
            if let Some(value) = object.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = object.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                return Err(VmmError::Qmp {
                    command: command.to_string(),
                    socket: self.socket.clone(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(transport(
                &self.socket,
                command,
                format!("unexpected message {}", truncate(&message.to_string(), 200)),
            ));
        }
    }

    /// Reads one JSON line (blank lines are skipped).
    async fn read_message(&mut self, what: &str) -> Result<Value, VmmError> {
        loop {
            let mut line = String::new();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_line(&mut line)
                .await
                .map_err(|e| transport(&self.socket, what, format!("receiving: {e}")))?;
            if n == 0 {
                return Err(transport(&self.socket, what, CLOSED.into()));
            }
            if !line.ends_with('\n') && n as u64 >= MAX_LINE {
                return Err(transport(
                    &self.socket,
                    what,
                    format!("reply line longer than {MAX_LINE} bytes"),
                ));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line).map_err(|e| {
                transport(
                    &self.socket,
                    what,
                    format!("invalid JSON {:?}: {e}", truncate(line.trim(), 200)),
                )
            });
        }
    }
}

const CLOSED: &str = "connection closed by QEMU";

fn transport(socket: &Path, command: &str, reason: String) -> VmmError {
    VmmError::Transport {
        method: "QMP".into(),
        path: command.into(),
        socket: socket.to_path_buf(),
        reason,
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    socket: &Path,
    command: &str,
    value: Value,
) -> Result<T, VmmError> {
    serde_json::from_value(value.clone()).map_err(|e| {
        transport(
            socket,
            command,
            format!(
                "unexpected reply {}: {e}",
                truncate(&value.to_string(), 200)
            ),
        )
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"},
/// "capabilities": [...]}}`.
pub fn parse_greeting(message: &Value) -> Option<QmpGreeting> {
    let qmp = message.get("QMP")?;
    let qemu = qmp.get("version")?.get("qemu")?;
    let part = |name: &str| {
        qemu.get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    let version = Version::new(part("major")?, part("minor")?, part("micro")?);
    let package = qmp
        .get("version")?
        .get("package")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_string();
    let capabilities = qmp
        .get("capabilities")?
        .as_array()?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    Some(QmpGreeting {
        version,
        package,
        capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;

    /// What the fake answers to one request: the lines to send back (each gets a newline), with
    /// `$ID` replaced by the request's id.
    type Script = dyn Fn(&Value) -> Vec<String> + Send + Sync;

    /// A scripted QMP server on a Unix socket in a temp dir. Records every request it receives.
    struct FakeQmp {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        requests: Arc<Mutex<Vec<Value>>>,
    }

    impl FakeQmp {
        fn start(greeting: &'static str, script: Box<Script>) -> FakeQmp {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&socket).unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let seen = requests.clone();
            let script: Arc<Script> = Arc::from(script);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let script = script.clone();
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = BufReader::new(read).lines();
                        if write
                            .write_all(format!("{greeting}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        while let Ok(Some(line)) = lines.next_line().await {
                            let request: Value = serde_json::from_str(&line).unwrap();
                            seen.lock().unwrap().push(request.clone());
                            let id = request["id"].to_string();
                            for reply in script(&request) {
                                if reply == "CLOSE" {
                                    return;
                                }
                                let reply = reply.replace("$ID", &id);
                                if write
                                    .write_all(format!("{reply}\r\n").as_bytes())
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            FakeQmp {
                _dir: dir,
                socket,
                requests,
            }
        }

        fn client(&self) -> QmpClient {
            QmpClient::new(self.socket.clone()).with_timeout(Duration::from_millis(500))
        }

        fn commands(&self) -> Vec<String> {
            self.requests
                .lock()
                .unwrap()
                .iter()
                .map(|r| r["execute"].as_str().unwrap().to_string())
                .collect()
        }
    }

    /// Answers like QEMU: capabilities and status queries succeed, unknown commands fail.
    fn qemu_like(request: &Value) -> Vec<String> {
        match request["execute"].as_str().unwrap() {
            "qmp_capabilities" | "cont" | "stop" | "system_powerdown" => {
                vec![r#"{"return": {}, "id": $ID}"#.into()]
            }
            "query-status" => vec![
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#.into(),
                String::new(),
                r#"{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": $ID}"#.into(),
            ],
            "query-kvm" => vec![r#"{"return": {"enabled": false, "present": true}, "id": $ID}"#.into()],
            "quit" => vec![r#"{"return": {}, "id": $ID}"#.into(), "CLOSE".into()],
            other => vec![format!(
                r#"{{"id": $ID, "error": {{"class": "CommandNotFound", "desc": "The command {other} has not been found"}}}}"#
            )],
        }
    }

    #[tokio::test]
    async fn negotiates_and_runs_commands_skipping_events() {
        let fake = FakeQmp::start(GREETING, Box::new(qemu_like));
        let client = fake.client();
        let mut conn = client.connect().await.unwrap();
        assert_eq!(conn.greeting().version, Version::new(7, 2, 22));
        assert_eq!(conn.greeting().package, "Debian 1:7.2+dfsg-7");
        assert_eq!(conn.greeting().capabilities, vec!["oob".to_string()]);
        let status = conn.query_status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: false,
                status: "prelaunch".into()
            }
        );
        let events = conn.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "RESUME");
        assert!(conn.take_events().is_empty());
        drop(conn);

        assert_eq!(
            client.query_kvm().await.unwrap(),
            KvmInfo {
                enabled: false,
                present: true
            }
        );
        client.cont().await.unwrap();
        client.stop().await.unwrap();
        client.system_powerdown().await.unwrap();
        client.quit().await.unwrap();
        assert_eq!(
            fake.commands(),
            [
                "qmp_capabilities",
                "query-status",
                "qmp_capabilities",
                "query-kvm",
                "qmp_capabilities",
                "cont",
                "qmp_capabilities",
                "stop",
                "qmp_capabilities",
                "system_powerdown",
                "qmp_capabilities",
                "quit",
            ]
        );
    }

    #[tokio::test]
    async fn sends_arguments_and_increasing_ids() {
        let fake = FakeQmp::start(
            GREETING,
            Box::new(|r| vec![format!(r#"{{"return": {}, "id": $ID}}"#, r["arguments"])]),
        );
        let mut conn = fake.client().connect().await.unwrap();
        let got = conn
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": "info"})),
            )
            .await
            .unwrap();
        assert_eq!(got, json!({"command-line": "info"}));
        let requests = fake.requests.lock().unwrap().clone();
        assert_eq!(requests[0]["id"], 1);
        assert_eq!(requests[1]["id"], 2);
        assert!(requests[0].get("arguments").is_none());
    }

    #[tokio::test]
    async fn qmp_errors_carry_class_and_desc() {
        let fake = FakeQmp::start(GREETING, Box::new(qemu_like));
        let err = fake.client().execute("frobnicate", None).await.unwrap_err();
        match &err {
            VmmError::Qmp {
                command,
                class,
                desc,
                socket,
            } => {
                assert_eq!(command, "frobnicate");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command frobnicate has not been found");
                assert_eq!(socket, &fake.socket);
            }
            other => panic!("expected a QMP error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("frobnicate has not been found"), "{text}");
        assert!(text.contains("qmp.sock"), "{text}");
    }

    #[tokio::test]
    async fn replies_to_other_ids_are_skipped() {
        let fake = FakeQmp::start(
            GREETING,
            Box::new(|r| {
                if r["execute"] == "query-status" {
                    vec![
                        r#"{"return": {"status": "stale", "running": false}, "id": 999}"#.into(),
                        r#"{"return": {"status": "running", "running": true}, "id": $ID}"#.into(),
                    ]
                } else {
                    vec![r#"{"return": {}, "id": $ID}"#.into()]
                }
            }),
        );
        let status = fake.client().query_status().await.unwrap();
        assert_eq!(status.status, "running");
        assert!(status.running);
    }

    #[tokio::test]
    async fn a_silent_server_times_out_per_command() {
        let fake = FakeQmp::start(
            GREETING,
            Box::new(|r| {
                if r["execute"] == "qmp_capabilities" {
                    vec![r#"{"return": {}, "id": $ID}"#.into()]
                } else {
                    Vec::new()
                }
            }),
        );
        let client = fake.client().with_timeout(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = client.execute("query-status", None).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, VmmError::Transport { .. }), "{err:?}");
        assert!(err.to_string().contains("no reply within"), "{err}");
        assert!(err.to_string().contains("query-status"), "{err}");
    }

    #[tokio::test]
    async fn bad_greetings_and_closed_connections_are_errors() {
        let fake = FakeQmp::start(r#"{"hello": "world"}"#, Box::new(qemu_like));
        let err = fake.client().connect().await.unwrap_err();
        assert!(err.to_string().contains("not a QMP greeting"), "{err}");

        let fake = FakeQmp::start(GREETING, Box::new(|_| vec!["CLOSE".into()]));
        let err = fake.client().connect().await.unwrap_err();
        assert!(err.to_string().contains(CLOSED), "{err}");

        let fake = FakeQmp::start(GREETING, Box::new(|_| vec!["not json".into()]));
        let err = fake.client().connect().await.unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");
    }

    #[tokio::test]
    async fn quit_tolerates_qemu_closing_first() {
        let fake = FakeQmp::start(
            GREETING,
            Box::new(|r| {
                if r["execute"] == "qmp_capabilities" {
                    vec![r#"{"return": {}, "id": $ID}"#.into()]
                } else {
                    vec!["CLOSE".into()]
                }
            }),
        );
        fake.client().quit().await.unwrap();
        // For any other command a connection closed without a reply is an error.
        let err = fake.client().cont().await.unwrap_err();
        assert!(err.to_string().contains(CLOSED), "{err}");
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let err = QmpClient::new(socket.clone())
            .query_status()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Transport { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    #[test]
    fn greeting_parsing() {
        let v: Value = serde_json::from_str(GREETING).unwrap();
        assert_eq!(parse_greeting(&v).unwrap().version, Version::new(7, 2, 22));
        assert!(parse_greeting(&json!({"QMP": {"version": {}}})).is_none());
        assert!(parse_greeting(&json!({"return": {}})).is_none());
        let no_package = json!({"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 1}}, "capabilities": []}});
        let g = parse_greeting(&no_package).unwrap();
        assert_eq!(g.package, "");
        assert!(g.capabilities.is_empty());
    }
}
