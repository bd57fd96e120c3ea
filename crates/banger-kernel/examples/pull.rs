//! Pulls Debian's cloud kernel into a directory: `cargo run -p banger-kernel --example pull -- DIR`.

use std::io::Write;

fn main() {
    let Some(dest) = std::env::args_os().nth(1) else {
        eprintln!("usage: pull DEST_DIR");
        std::process::exit(2);
    };
    let started = std::time::Instant::now();
    let mut last_pct = u64::MAX;
    let result = banger_kernel::pull_debian_cloud_kernel(
        &banger_kernel::DebianMirror::default(),
        std::path::Path::new(&dest),
        &mut |p| match p {
            banger_kernel::PullProgress::Stage { stage, detail } => {
                println!(
                    "[{:5.1}s] {}: {detail}",
                    started.elapsed().as_secs_f64(),
                    stage.as_str()
                );
            }
            banger_kernel::PullProgress::Download { done, total, .. } => {
                let pct = done * 100 / total.max(1);
                if pct != last_pct && pct % 10 == 0 {
                    print!(" {pct}%");
                    let _ = std::io::stdout().flush();
                    if pct == 100 {
                        println!();
                    }
                }
                last_pct = pct;
            }
        },
    );
    match result {
        Ok(k) => println!(
            "{} in {:.1}s\n{}",
            k.version,
            started.elapsed().as_secs_f64(),
            serde_json::to_string_pretty(&k).unwrap_or_default()
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
