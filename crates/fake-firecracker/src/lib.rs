//! A fake Firecracker VMM for banger's tests.
//!
//! The `fake-firecracker` binary stands in for Firecracker v1.16.1 wherever banger launches one:
//! same command line, same HTTP API on a Unix socket, same answers. Every request is checked
//! against Firecracker's published API spec ([`spec`]), the instance enforces the real ordering
//! rules ([`instance`]: pre-boot only resources, start once, snapshot only when paused, ...), and
//! host files named in requests must exist, as the real VMM opens them. Tests steer it through a
//! control file ([`control`]) re-read at every request: inject API failures, crash the guest
//! after boot, ignore Ctrl+Alt+Del, delay the socket, and record every call.

pub mod cli;
pub mod control;
pub mod instance;
pub mod server;
pub mod spec;

use cli::{ARG_PARSING_EXIT_CODE, Command};

/// The whole program: parses `args` (without the program name) and returns the exit code.
pub fn run<I: IntoIterator<Item = String>>(args: I) -> i32 {
    match cli::parse_args(args) {
        Err(e) => {
            eprintln!("{e}");
            ARG_PARSING_EXIT_CODE
        }
        Ok(Command::Version) => {
            println!("{}", cli::version_line(&cli::reported_version()));
            0
        }
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            0
        }
        Ok(Command::Serve(args)) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fake-firecracker: starting the async runtime: {e}");
                    return 1;
                }
            };
            runtime.block_on(server::serve(server::ServerConfig::from_env(args)))
        }
    }
}
