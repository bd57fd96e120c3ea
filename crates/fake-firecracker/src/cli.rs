//! Command line handling, shaped like Firecracker's own: the same flag names, `--version` output
//! and exit code for a bad argument, so the launcher code under test cannot tell the difference.

use std::path::PathBuf;

use crate::instance::FIRECRACKER_VERSION;

/// Overrides the version the fake reports (`--version` and the API), for version-check tests.
pub const VERSION_ENV: &str = "FAKE_FIRECRACKER_VERSION";
/// Firecracker's instance id when `--id` is not given.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Firecracker's exit code for a command line it cannot parse (`FcExitCode::ArgParsing`).
pub const ARG_PARSING_EXIT_CODE: i32 = 153;
/// Firecracker's limit on `--id`.
const MAX_ID_LEN: usize = 64;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Version,
    Help,
    Serve(ServeArgs),
}

/// Arguments of a serving fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeArgs {
    pub api_sock: PathBuf,
    pub id: String,
}

/// A command line the fake refuses, as Firecracker would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error(
        "Arguments parsing error: Found argument '{0}' which wasn't expected, or isn't valid in this context."
    )]
    Unexpected(String),
    #[error("Arguments parsing error: The argument '{0}' requires a value, but none was supplied.")]
    MissingValue(String),
    #[error("Arguments parsing error: The argument '{0}' was provided more than once.")]
    Duplicate(String),
    #[error(
        "Arguments parsing error: fake-firecracker needs --api-sock PATH (it never uses Firecracker's default /run/firecracker.socket)"
    )]
    MissingApiSock,
    #[error("Invalid instance ID: {reason}: {id:?}")]
    InvalidId { id: String, reason: &'static str },
}

/// The version string without the `v`, honouring [`VERSION_ENV`].
pub fn reported_version() -> String {
    std::env::var(VERSION_ENV)
        .ok()
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| FIRECRACKER_VERSION.to_string())
}

/// Firecracker's `--version` line.
pub fn version_line(version: &str) -> String {
    format!("Firecracker v{version}")
}

pub const USAGE: &str = "fake-firecracker: a fake Firecracker v1.16.1 for tests\n\
\n\
Usage: fake-firecracker --api-sock PATH [--id ID] [--log-path P] [--level L] [--show-level]\n\
       [--show-log-origin] [--no-seccomp] [--boot-timer] [--metrics-path P]\n\
       fake-firecracker --version\n\
\n\
Environment: FAKE_FIRECRACKER_CONTROL (control file), FAKE_FIRECRACKER_RECORD (record file),\n\
FAKE_FIRECRACKER_VERSION (reported version).";

/// Flags that take a value and are accepted but have no effect on the fake.
const IGNORED_WITH_VALUE: [&str; 7] = [
    "--log-path",
    "--level",
    "--metrics-path",
    "--module",
    // The jailer passes these when it execs Firecracker.
    "--start-time-us",
    "--start-time-cpu-us",
    "--parent-cpu-time-us",
];
const IGNORED_SWITCHES: [&str; 4] = [
    "--show-level",
    "--show-log-origin",
    "--no-seccomp",
    "--boot-timer",
];

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut args = args.into_iter();
    let mut api_sock: Option<PathBuf> = None;
    let mut id: Option<String> = None;
    let mut seen: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        if flag == "--version" {
            return Ok(Command::Version);
        }
        if flag == "--help" || flag == "-h" {
            return Ok(Command::Help);
        }
        let takes_value =
            matches!(flag, "--api-sock" | "--id") || IGNORED_WITH_VALUE.contains(&flag);
        if !takes_value && !IGNORED_SWITCHES.contains(&flag) {
            return Err(CliError::Unexpected(arg));
        }
        if seen.iter().any(|s| s == flag) {
            return Err(CliError::Duplicate(arg));
        }
        seen.push(arg.clone());
        if !takes_value {
            continue;
        }
        // Firecracker's parser takes the next word as the value unless it is another flag.
        let value = match args.next() {
            Some(v) if !v.starts_with("--") => v,
            _ => return Err(CliError::MissingValue(arg)),
        };
        match flag {
            "--api-sock" => api_sock = Some(PathBuf::from(value)),
            "--id" => id = Some(value),
            _ => {}
        }
    }
    let id = id.unwrap_or_else(|| DEFAULT_ID.to_string());
    validate_id(&id)?;
    let api_sock = api_sock.ok_or(CliError::MissingApiSock)?;
    Ok(Command::Serve(ServeArgs { api_sock, id }))
}

/// Firecracker accepts 1 to 64 characters, alphanumeric or `-`.
fn validate_id(id: &str) -> Result<(), CliError> {
    let reason = if id.is_empty() || id.chars().count() > MAX_ID_LEN {
        "invalid length, 1 to 64 characters"
    } else if !id.chars().all(|c| c == '-' || c.is_alphanumeric()) {
        "invalid character, only alphanumerics and '-'"
    } else {
        return Ok(());
    };
    Err(CliError::InvalidId {
        id: id.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, CliError> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_serving_command_line() {
        let c = parse(&[
            "--api-sock",
            "/tmp/a.sock",
            "--id",
            "abc-123",
            "--log-path",
            "/tmp/log",
            "--level",
            "Debug",
            "--show-level",
            "--show-log-origin",
            "--no-seccomp",
            "--boot-timer",
        ])
        .unwrap();
        assert_eq!(
            c,
            Command::Serve(ServeArgs {
                api_sock: "/tmp/a.sock".into(),
                id: "abc-123".into()
            })
        );
        let Command::Serve(s) = parse(&["--api-sock", "/s"]).unwrap() else {
            panic!("not serve")
        };
        assert_eq!(s.id, "anonymous-instance");
    }

    #[test]
    fn version_wins() {
        assert_eq!(parse(&["--version"]).unwrap(), Command::Version);
        assert_eq!(version_line("1.16.1"), "Firecracker v1.16.1");
    }

    #[test]
    fn rejects_bad_command_lines() {
        assert_eq!(
            parse(&["--api-sock", "/s", "--bogus"]).unwrap_err(),
            CliError::Unexpected("--bogus".into())
        );
        assert_eq!(
            parse(&["--api-sock"]).unwrap_err(),
            CliError::MissingValue("--api-sock".into())
        );
        assert_eq!(
            parse(&["--api-sock", "/a", "--api-sock", "/b"]).unwrap_err(),
            CliError::Duplicate("--api-sock".into())
        );
        assert_eq!(parse(&["--id", "x"]).unwrap_err(), CliError::MissingApiSock);
        let e = parse(&["--api-sock", "/s", "--id", "bad_id"]).unwrap_err();
        assert!(e.to_string().contains("bad_id"), "{e}");
        let e = parse(&["--api-sock", "/s", "--id", &"a".repeat(65)]).unwrap_err();
        assert!(matches!(e, CliError::InvalidId { .. }));
    }
}
