//! Benchmark: `image pull` (registry → ext4) through the daemon against the usual tool chain
//! doing the same job in the same run: `skopeo copy` (registry → OCI layout), `umoci unpack`
//! (layers → directory, whiteouts applied) and `mkfs.ext4 -d` (directory → ext4), all from the
//! same local registry. Both sides start with an empty blob cache each iteration (cold), and
//! banger is also measured warm (blobs cached, ext4 rebuilt).
//!
//! `cargo bench -p banger-daemon --bench image_pull [-- ITERATIONS]`. Needs root (umoci keeps
//! owners only as root), docker-registry, skopeo and umoci; the image is Debian's minbase
//! (`/var/tmp/banger-test-debian-minbase.tar`, made by the real-guest tests or here with
//! mmdebstrap) plus a layer of 20,000 small files, or the small-files layer alone without
//! mmdebstrap. Prints medians and ratios; compare ratios, these machines are noisy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_protocol::{ImagePullParams, NameForceParams, Request};
use banger_testkit::layers::LayerBuilder;
use banger_testkit::registry::LocalRegistry;
use banger_testkit::{TestEnv, have_program};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn small_files_layer() -> Vec<u8> {
    let mut b = LayerBuilder::new().dir("srv", 0o755);
    for d in 0..200 {
        b = b.dir(&format!("srv/d{d:03}"), 0o755);
        for f in 0..100 {
            let body = format!("file {d} {f}\n").repeat(1 + (f % 7) * 20);
            b = b.file_owned(
                &format!("srv/d{d:03}/f{f:03}.txt"),
                if f % 10 == 0 { 0o755 } else { 0o644 },
                (f % 3) as u64 * 1000,
                (f % 3) as u64 * 1000,
                body.as_bytes(),
            );
        }
    }
    b.build()
}

fn debian_minbase() -> Option<Vec<u8>> {
    let cached = Path::new("/var/tmp/banger-test-debian-minbase.tar");
    if !cached.is_file() && have_program("mmdebstrap") {
        let tmp = cached.with_extension("tar.part");
        let ok = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "--format=tar", "bookworm"])
            .arg(&tmp)
            .arg("http://deb.debian.org/debian")
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            std::fs::rename(&tmp, cached).ok()?;
        }
    }
    std::fs::read(cached).ok()
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: the baseline's umoci keeps file owners only as root");
        return;
    }
    for (p, pkg) in [
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        if !have_program(p) {
            println!("SKIP: {p} is missing (apt-get install {pkg})");
            return;
        }
    }
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let mut layers = Vec::new();
    let what = match debian_minbase() {
        Some(l) => {
            layers.push(l);
            "Debian minbase + 20,000 small files"
        }
        None => "20,000 small files",
    };
    layers.push(small_files_layer());
    let config = serde_json::json!({"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]});
    reg.push("bench/image", "1", &layers, config);
    let reference = format!("{}/bench/image:1", reg.addr());
    let raw: usize = layers.iter().map(Vec::len).sum();
    println!(
        "image: {what}, {} layers, {:.0} MiB uncompressed",
        layers.len(),
        raw as f64 / (1 << 20) as f64
    );

    let mut env = TestEnv::new("");
    env.start_daemon();
    let work = env.root().join("baseline");
    let cache = env.root().join("cache/oci");
    let pull = |env: &TestEnv| {
        let t = Instant::now();
        env.request(&Request::ImagePull(ImagePullParams {
            reference: reference.clone(),
            insecure: true,
            ..Default::default()
        }))
        .ok();
        let d = t.elapsed();
        env.request(&Request::ImageDelete(NameForceParams {
            name: "image-1".into(),
            force: false,
        }))
        .ok();
        d
    };
    let (mut banger_cold, mut banger_warm, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    let (mut skopeo_t, mut umoci_t, mut mkfs_t) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        // Alternate which side goes first so neither always gets the warmer page cache.
        let banger_first = i % 2 == 0;
        let mut base = || {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
            let layout = work.join("oci");
            let t0 = Instant::now();
            run(Command::new("skopeo").args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &format!("docker://{reference}"),
                &format!("oci:{}:bench", layout.display()),
            ]));
            let t1 = Instant::now();
            run(Command::new("umoci").args([
                "unpack",
                "--image",
                &format!("{}:bench", layout.display()),
                &work.join("bundle").display().to_string(),
            ]));
            let t2 = Instant::now();
            let img = work.join("rootfs.ext4");
            let content = raw as u64;
            let size = (content * 3 / 2 + (256 << 20)).max(512 << 20);
            std::fs::File::create(&img).unwrap().set_len(size).unwrap();
            run(Command::new("mkfs.ext4").args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                "-d",
                &work.join("bundle/rootfs").display().to_string(),
                &img.display().to_string(),
            ]));
            let t3 = Instant::now();
            skopeo_t.push(t1 - t0);
            umoci_t.push(t2 - t1);
            mkfs_t.push(t3 - t2);
            baseline.push(t3 - t0);
        };
        let mut ours = || {
            let _ = std::fs::remove_dir_all(&cache);
            banger_cold.push(pull(&env));
            banger_warm.push(pull(&env));
        };
        if banger_first {
            ours();
            base();
        } else {
            base();
            ours();
        }
        println!(
            "iteration {i}: banger cold {:.2}s warm {:.2}s, baseline {:.2}s",
            secs(*banger_cold.last().unwrap()),
            secs(*banger_warm.last().unwrap()),
            secs(*baseline.last().unwrap())
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    let (bc, bw, b) = (median(banger_cold), median(banger_warm), median(baseline));
    println!(
        "baseline (median of {iterations}): skopeo copy {:.2}s + umoci unpack {:.2}s + mkfs.ext4 -d {:.2}s = {:.2}s",
        secs(median(skopeo_t)),
        secs(median(umoci_t)),
        secs(median(mkfs_t)),
        secs(b)
    );
    println!(
        "banger image pull: cold {:.2}s ({:.2}x the baseline), warm cache {:.2}s ({:.2}x)",
        secs(bc),
        secs(bc) / secs(b),
        secs(bw),
        secs(bw) / secs(b)
    );
}
