//! `fake-firecracker`: see the library docs.

fn main() {
    let code = fake_firecracker::run(std::env::args().skip(1));
    std::process::exit(code);
}
