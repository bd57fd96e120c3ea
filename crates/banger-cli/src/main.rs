//! The `banger` binary: everything is in the library so it can be tested.

fn main() -> std::process::ExitCode {
    let code = banger_cli::main_with_args(std::env::args_os());
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
