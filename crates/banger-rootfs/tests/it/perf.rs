//! Timing of a generated 30k-file image (ignored by default: run with
//! `cargo test -p banger-rootfs --release --test it perf -- --ignored --nocapture`).

use std::time::{Duration, Instant};

use banger_rootfs::{BuildOptions, LayerCompression, Progress, build_rootfs};

use crate::support::*;

fn layer_30k() -> Vec<u8> {
    let mut t = Tar::new();
    // 300 directories of 100 files, plus one directory of 2000 (mkfs -d inserts directory
    // entries linearly, so large directories are the slow case).
    for d in 0..300 {
        t.add(E::dir(format!("usr/share/d{d}/"), 0o755));
        for f in 0..100 {
            let mode = if f % 10 == 0 { 0o4755 } else { 0o644 };
            let mut e = E::file(
                format!("usr/share/d{d}/file-{f}"),
                vec![b'x'; 100 + f],
                mode,
            );
            if f % 7 == 0 {
                e = e.owner(1000, 1000);
            }
            t.add(e);
        }
    }
    for f in 0..2000 {
        t.add(E::file(format!("usr/lib/big/f{f}"), "y", 0o644));
    }
    t.finish()
}

fn timed(force_fixups: bool) -> (Duration, Duration, Duration, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [layer(
        tmp.path(),
        "l",
        &gzip(&layer_30k()),
        LayerCompression::Auto,
    )];
    let out = tmp.path().join("img");
    let start = Instant::now();
    let mut mkfs = None;
    let mut fixups = None;
    let mut count = 0;
    let report = build_rootfs(
        &layers,
        &tmp.path().join("s"),
        &out,
        &BuildOptions {
            force_fixups,
            ..Default::default()
        },
        &mut |p| match p {
            Progress::Mkfs { .. } => mkfs = Some(Instant::now()),
            Progress::Fixups { count: c } => {
                fixups = Some(Instant::now());
                count = c;
            }
            _ => {}
        },
    )
    .unwrap();
    let end = Instant::now();
    assert_eq!(report.files, 30_000 + 2000 + 300 + 4);
    let (mkfs, fixups) = (mkfs.unwrap(), fixups.unwrap());
    Image::new(&out).fsck();
    (mkfs - start, fixups - mkfs, end - fixups, count)
}

#[test]
#[ignore = "timing; run explicitly"]
fn perf_30k() {
    require_tools!();
    for force in [false, true] {
        let (flatten, mkfs_and_list, fix, count) = timed(force);
        println!(
            "30k files, force_fixups={force}, euid={}: flatten {flatten:.2?}, \
             mkfs+inventory {mkfs_and_list:.2?}, {count} fixups+cleanup {fix:.2?}, total {:.2?}",
            nix::unistd::geteuid(),
            flatten + mkfs_and_list + fix
        );
    }
}

/// Builds real layer blobs: `BANGER_ROOTFS_LAYERS=a.tar:b.tar.gz cargo test -p banger-rootfs
/// --release --test it from_env -- --ignored --nocapture`.
#[test]
#[ignore = "needs BANGER_ROOTFS_LAYERS"]
fn from_env() {
    require_tools!();
    let Ok(spec) = std::env::var("BANGER_ROOTFS_LAYERS") else {
        println!("SKIP: BANGER_ROOTFS_LAYERS not set");
        return;
    };
    let layers: Vec<_> = spec
        .split(':')
        .map(|p| banger_rootfs::Layer {
            path: p.into(),
            compression: LayerCompression::Auto,
            label: p.to_string(),
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img");
    let start = Instant::now();
    let mut last = start;
    let report = build_rootfs(
        &layers,
        &tmp.path().join("s"),
        &out,
        &BuildOptions::default(),
        &mut |p| {
            if !matches!(p, Progress::Entries { .. }) {
                println!("{:>8.2?} {p:?}", last.elapsed());
                last = Instant::now();
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{:>8.2?} done, total {:.2?}",
        last.elapsed(),
        start.elapsed()
    );
    println!("{report:#?}");
    Image::new(&out).fsck();
}
