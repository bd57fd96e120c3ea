//! Benchmark: copying a 10,000-file git repository into a real guest with
//! `banger vm workspace prepare`, against the issue's baseline
//! `git ls-files -z | tar --null -T - -c | ssh … -- 'mkdir -p DIR && tar -x -C DIR'` over the
//! same ssh arguments banger uses, alternated in one run so a busy machine slows both alike;
//! then `banger vm workspace sync` after one host file changed, as a share of the full copy.
//!
//! One VM (`banger vm create --name bench`) serves every run; each copy goes to a fresh guest
//! directory. Besides the wall times it prints where banger's time goes: the host-side work
//! measured with this crate directly (inspection, the shallow history, the archive), the
//! transfer banger itself reports, and the cost of one ssh connection.
//!
//! Needs what the real-guest tests need (root, QEMU, mmdebstrap, the static agent, release
//! builds):
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build -p banger-agent --release --target x86_64-unknown-linux-gnu
//! cargo build --release -p banger-cli -p banger-daemon -p fake-firecracker
//! cargo bench -p banger-workspace --bench copy -- [ITERATIONS]
//! ```
//!
//! Prints `SKIP: why` and exits 0 when the machine cannot boot guests. Compare the ratios, not
//! the absolute times.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::{Request, SshInfo, VmRef, shell_quote};
use banger_testkit::TestEnv;
use banger_workspace::{HistorySpec, Options, PrepareSpec, history, repo};

const VM: &str = "bench";
const FILES: usize = 10_000;

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// xorshift64*: a fixed repository for every run, no extra dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Log-uniform in `[lo, hi]`: many small files, few large ones.
    fn log_uniform(&mut self, lo: usize, hi: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        ((l + u * (h - l)).exp() as usize).clamp(lo, hi)
    }
}

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_WORK_TREE")
        .output()
        .expect("run git");
    assert!(o.status.success(), "git {args:?}: {}", text(&o));
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, data).expect("write file");
}

/// Source-like text of about `size` bytes.
fn source_text(rng: &mut Rng, size: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "let", "value", "return", "self", "config", "buffer", "index", "match", "error", "result",
        "parse", "write", "read", "state", "handle", "=", "+", "(", ")", "{", "}", ";", "//", "fn",
        "if", "else", "for", "in", "0", "1", "42", "name", "path", "len",
    ];
    let mut out = Vec::with_capacity(size + 64);
    while out.len() < size {
        let indent = rng.below(4) * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..3 + rng.below(9) {
            out.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(size.max(1));
    if let Some(last) = out.last_mut() {
        *last = b'\n';
    }
    out
}

/// The benchmark repository: `FILES` committed files in nested directories — source-like
/// text from a few bytes to ~100 KiB (mostly small), a few binary files, some executables, a
/// few symbolic links — and a short history. Returns the repository, its working-tree bytes and
/// text files the re-sync runs may change.
fn make_repo(parent: &Path) -> (PathBuf, u64, Vec<String>) {
    let r = parent.join("bigrepo");
    std::fs::create_dir_all(&r).expect("mkdir repo");
    git(&r, &["init", "-q", "-b", "main"]);
    let mut rng = Rng(0x5eed_ba9e_2024_0001);

    // Directories: a few top-level ones, then each new one under a random existing one, at
    // most five levels deep.
    let mut dirs: Vec<String> = [
        "src", "lib", "tests", "docs", "tools", "vendor", "web", "api",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    while dirs.len() < 600 {
        let parent = dirs[rng.below(dirs.len())].clone();
        if parent.matches('/').count() >= 4 {
            continue;
        }
        let names = [
            "core", "util", "net", "io", "model", "view", "cmd", "impl", "gen",
        ];
        dirs.push(format!(
            "{parent}/{}{}",
            names[rng.below(names.len())],
            dirs.len()
        ));
    }

    let mut total = 0u64;
    let mut text_files = Vec::new();
    let mut count = 0usize;
    let add = |rel: String, data: Vec<u8>, total: &mut u64| {
        *total += data.len() as u64;
        write(&r, &rel, &data);
    };
    add(
        ".gitignore".into(),
        b"target/\n*.o\n.env\n".to_vec(),
        &mut total,
    );
    add(
        "README.md".into(),
        b"# bigrepo\n\nA generated repository for banger's copy benchmark.\n".to_vec(),
        &mut total,
    );
    count += 2;

    // Binary files: random bytes, 4 KiB to 100 KiB.
    for k in 0..16 {
        let size = rng.log_uniform(4 << 10, 100 << 10);
        let data: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        let ext = ["png", "bin", "woff2", "jpg"][k % 4];
        add(format!("assets/blob{k}.{ext}"), data, &mut total);
        count += 1;
    }
    // Executable scripts.
    for k in 0..24 {
        let dir = &dirs[rng.below(dirs.len())];
        let rel = format!("{dir}/run{k}.sh");
        let mut data = b"#!/bin/sh\nset -e\n".to_vec();
        let size = 200 + rng.below(2000);
        data.extend(source_text(&mut rng, size));
        add(rel.clone(), data, &mut total);
        std::fs::set_permissions(r.join(&rel), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        count += 1;
    }
    // Symbolic links (relative, to files that exist).
    for k in 0..4 {
        std::os::unix::fs::symlink("../README.md", r.join(format!("docs/link{k}.md")))
            .expect("symlink");
        count += 1;
    }
    // Text: 90% between 8 B and 8 KiB, 10% between 8 KiB and 100 KiB.
    let exts = ["rs", "c", "h", "py", "js", "ts", "go", "md", "toml", "json"];
    let mut k = 0;
    while count < FILES {
        let dir = &dirs[rng.below(dirs.len())];
        let size = if rng.below(10) == 0 {
            rng.log_uniform(8 << 10, 100 << 10)
        } else {
            rng.log_uniform(8, 8 << 10)
        };
        let rel = format!("{dir}/file{k}.{}", exts[rng.below(exts.len())]);
        k += 1;
        let data = source_text(&mut rng, size);
        add(rel.clone(), data, &mut total);
        if text_files.len() < 64 && size < (16 << 10) {
            text_files.push(rel);
        }
        count += 1;
    }
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "initial import"]);
    // A little history, so the shallow fetch has more than one commit to carry.
    for c in 0..3 {
        let rel = &text_files[text_files.len() - 1 - c];
        let mut data = std::fs::read(r.join(rel)).expect("read");
        data.extend_from_slice(format!("// change {c}\n").as_bytes());
        total += format!("// change {c}\n").len() as u64;
        std::fs::write(r.join(rel), data).expect("write");
        git(&r, &["commit", "-q", "-a", "-m", &format!("change {c}")]);
    }
    let tracked = Command::new("git")
        .arg("-C")
        .arg(&r)
        .args(["ls-files", "-z"])
        .output()
        .expect("git ls-files");
    let n = tracked
        .stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .count();
    assert_eq!(n, FILES, "generated repository has {n} tracked files");
    (r, total, text_files)
}

/// Deletes the VM even when the benchmark fails half-way.
#[derive(Debug)]
struct VmGuard<'a> {
    env: &'a TestEnv,
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let o = self.env.cli(&["vm", "rm", "--force", VM]);
        if !o.status.success() && std::thread::panicking() {
            eprintln!("cleanup: banger vm rm --force {VM}: {}", text(&o));
        }
    }
}

/// `banger vm workspace prepare`: wall time and the transfer time banger reports in its note
/// (`… (N files, B bytes, X.Ys)`).
fn banger_prepare(env: &TestEnv, repo: &Path, i: usize) -> (Duration, Option<f64>) {
    let guest = format!("/root/w{i}");
    let repo_s = repo.to_str().expect("utf-8 path");
    let t = Instant::now();
    let o = env.cli(&[
        "vm",
        "workspace",
        "prepare",
        VM,
        repo_s,
        "--guest-path",
        &guest,
    ]);
    let d = t.elapsed();
    assert!(
        o.status.success(),
        "banger vm workspace prepare failed:\n{}\nlog tail:\n{}",
        text(&o),
        tail(&env.daemon_log())
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let transfer = err
        .lines()
        .find(|l| l.contains("copied to"))
        .and_then(|l| l.trim_end().strip_suffix("s)"))
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|s| s.parse::<f64>().ok());
    (d, transfer)
}

/// The issue's pipeline, through `sh -c` in the repository.
fn baseline_pipeline(info: &SshInfo, i: usize) -> String {
    let mut ssh: Vec<String> = vec!["ssh".into()];
    // ssh_args ends with `-- HOST`: the remote command follows directly.
    ssh.extend(info.ssh_args(false, 10, &[]));
    ssh.push(format!("mkdir -p /root/b{i} && tar -x -C /root/b{i}"));
    let ssh: Vec<String> = ssh.iter().map(|a| shell_quote(a)).collect();
    format!("git ls-files -z | tar --null -T - -c | {}", ssh.join(" "))
}

fn baseline(repo: &Path, pipeline: &str) -> Duration {
    let t = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("set -e; {pipeline}"))
        .current_dir(repo)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let d = t.elapsed();
    assert!(o.status.success(), "baseline failed:\n{}", text(&o));
    d
}

/// Changes one tracked file on the host and syncs; wall time of the sync.
fn banger_sync(env: &TestEnv, repo: &Path, file: &str, i: usize) -> Duration {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(repo.join(file))
        .expect("open file to change");
    writeln!(f, "// edited on the host, run {i}").expect("edit file");
    drop(f);
    let t = Instant::now();
    let o = env.cli(&["vm", "workspace", "sync", VM]);
    let d = t.elapsed();
    assert!(
        o.status.success(),
        "banger vm workspace sync failed:\n{}\nlog tail:\n{}",
        text(&o),
        tail(&env.daemon_log())
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("sent 1 files, deleted 0"),
        "sync after one change: {}",
        text(&o)
    );
    d
}

fn ssh_true(info: &SshInfo) -> Duration {
    let t = Instant::now();
    let o = Command::new("ssh")
        .args(info.ssh_args(false, 10, &["true".to_string()]))
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    let d = t.elapsed();
    assert!(o.status.success(), "ssh true: {}", text(&o));
    d
}

/// Counts bytes written.
#[derive(Debug, Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// banger's host-side work alone, with this crate: inspection, the shallow history, the
/// archive (to a byte counter). Returns the times and the archive's size.
fn host_side(repo_dir: &Path) -> ([Duration; 3], u64) {
    let spec = PrepareSpec {
        options: Options::default(),
        history: HistorySpec {
            depth: history::DEFAULT_DEPTH,
            branch: None,
            from: None,
        },
        guest_path: Some("/root/host-side".into()),
    };
    let t0 = Instant::now();
    let r = repo::inspect(repo_dir, &spec.options, None).expect("inspect");
    let t1 = Instant::now();
    let h = history::build(&r, &spec.history).expect("history");
    let t2 = Instant::now();
    drop((r, h));
    let p = banger_workspace::prepare(repo_dir, &spec).expect("prepare");
    let t3 = Instant::now();
    let mut c = Counter::default();
    p.write_archive(&mut c).expect("archive");
    let t4 = Instant::now();
    ([t1 - t0, t2 - t1, t4 - t3], c.0)
}

/// The baseline's stream alone: `git ls-files -z | tar --null -T - -c | wc -c`.
fn baseline_stream(repo: &Path) -> (Duration, u64) {
    let t = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg("git ls-files -z | tar --null -T - -c | wc -c")
        .current_dir(repo)
        .output()
        .expect("run sh");
    let d = t.elapsed();
    assert!(o.status.success(), "baseline stream: {}", text(&o));
    let n = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("wc -c");
    (d, n)
}

fn row(label: &str, v: &[Duration]) {
    let all: Vec<String> = v.iter().map(|d| format!("{:.2}", secs(*d))).collect();
    println!(
        "  {label:<50} {:>8.2} s   [{}]",
        secs(median(v)),
        all.join(", ")
    );
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3)
        .max(1);
    let Some(mut env) = TestEnv::real("") else {
        println!("SKIP: this machine cannot boot real guests (see the line above)");
        return;
    };
    env.start_daemon();
    let tmp = tempfile::Builder::new()
        .prefix("banger-copy-bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir");

    let t = Instant::now();
    let (repo_dir, bytes, text_files) = make_repo(tmp.path());
    println!(
        "repository: {FILES} files, {:.1} MiB, generated and committed in {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        secs(t.elapsed())
    );

    let guard = VmGuard { env: &env };
    let t = Instant::now();
    let o = env.cli(&["vm", "create", "--name", VM]);
    assert!(
        o.status.success(),
        "banger vm create failed:\n{}\nlog tail:\n{}",
        text(&o),
        tail(&env.daemon_log())
    );
    println!(
        "vm create (provisioning included on a fresh state dir): {:.1} s",
        secs(t.elapsed())
    );
    let info: SshInfo = serde_json::from_value(
        env.request(&Request::VmSshInfo(VmRef { vm: VM.into() }))
            .ok(),
    )
    .expect("vm.ssh_info");

    let mut prep = Vec::new();
    let mut transfer = Vec::new();
    let mut base = Vec::new();
    let mut sync = Vec::new();
    let mut conn = Vec::new();
    for i in 0..iterations {
        let pipeline = baseline_pipeline(&info, i);
        if i == 0 {
            println!("baseline: sh -c {}", shell_quote(&pipeline));
        }
        let file = &text_files[i * 7 % text_files.len()];
        // Alternate the order so neither side always runs first.
        let mut run_banger = |prep: &mut Vec<Duration>, sync: &mut Vec<Duration>| {
            let (d, tr) = banger_prepare(&env, &repo_dir, i);
            prep.push(d);
            if let Some(tr) = tr {
                transfer.push(Duration::from_secs_f64(tr));
            }
            sync.push(banger_sync(&env, &repo_dir, file, i));
        };
        if i % 2 == 0 {
            run_banger(&mut prep, &mut sync);
            base.push(baseline(&repo_dir, &pipeline));
        } else {
            base.push(baseline(&repo_dir, &pipeline));
            run_banger(&mut prep, &mut sync);
        }
        conn.push(ssh_true(&info));
        println!(
            "run {}: banger prepare {:.2} s, baseline {:.2} s, sync {:.2} s",
            i + 1,
            secs(prep[i]),
            secs(base[i]),
            secs(sync[i])
        );
    }

    // Both copies are complete: the files in the guest, and git agrees in banger's copy.
    let o = env.cli(&[
        "vm",
        "exec",
        VM,
        "--",
        "sh",
        "-c",
        "cd /root/w0 && echo $(git ls-files | wc -l) $(git status --porcelain | wc -l) $(cd /root/b0 && find . -type f -o -type l | wc -l)",
    ]);
    assert!(o.status.success(), "checking the guest: {}", text(&o));
    let counts = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let nums: Vec<usize> = counts
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    assert_eq!(
        nums,
        vec![FILES, 1, FILES],
        "guest: tracked files in /root/w0, `git status` lines there (the one synced edit), files in /root/b0"
    );

    // What banger's guest script does after `tar -x` that the baseline does not:
    // `git update-index --refresh`, which re-reads every file whose stat data differs from the
    // host's index (all of them, after an unpack). Timed inside the guest, on the last copy
    // with every file touched, so no ssh connection is counted.
    let refresh_script = format!(
        "cd /root/w{} && find . -path ./.git -prune -o -type f -exec touch -c {{}} + && s=$(date +%s%N) && (git update-index -q --refresh >/dev/null 2>&1 || true) && e=$(date +%s%N) && echo $(( (e - s) / 1000000 ))",
        iterations - 1
    );
    let o = env.cli(&["vm", "exec", VM, "--", "sh", "-c", &refresh_script]);
    assert!(o.status.success(), "guest refresh timing: {}", text(&o));
    let refresh_ms: f64 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);

    // Host-side breakdown (no VM involved).
    let mut inspect = Vec::new();
    let mut hist = Vec::new();
    let mut archive = Vec::new();
    let mut stream = Vec::new();
    let mut archive_bytes = 0;
    let mut stream_bytes = 0;
    for _ in 0..iterations {
        let ([a, b, c], n) = host_side(&repo_dir);
        inspect.push(a);
        hist.push(b);
        archive.push(c);
        archive_bytes = n;
        let (d, m) = baseline_stream(&repo_dir);
        stream.push(d);
        stream_bytes = m;
    }

    let (p, b, s) = (median(&prep), median(&base), median(&sync));
    let ratio = secs(p) / secs(b);
    let pct = secs(s) / secs(p) * 100.0;
    println!();
    println!(
        "workspace copy benchmark: {FILES} files, {:.1} MiB, {iterations} runs each, QEMU guest (medians, then each run)",
        bytes as f64 / (1 << 20) as f64
    );
    row("banger vm workspace prepare (wall)", &prep);
    row("baseline git ls-files | tar | ssh tar -x (wall)", &base);
    row("banger vm workspace sync, 1 file changed (wall)", &sync);
    println!(
        "  ratio banger/baseline:                             {ratio:>8.2}x   (target <= 1.00x: {})",
        if ratio <= 1.0 { "met" } else { "NOT met" }
    );
    println!(
        "  re-sync as a share of banger's full copy:          {pct:>8.1} %   (target < 5 %: {})",
        if pct < 5.0 { "met" } else { "NOT met" }
    );
    println!("  where the time goes");
    if !transfer.is_empty() {
        row("banger: ssh + stream + guest unpack (its note)", &transfer);
    }
    row("banger host side: inspect (ls-files, stat, hash)", &inspect);
    row("banger host side: shallow history (depth 10)", &hist);
    row("banger host side: archive to a counter", &archive);
    row("baseline host side: ls-files | tar | wc -c", &stream);
    row("one ssh connection (ssh true)", &conn);
    println!(
        "  banger guest: git update-index --refresh, all stale {:>8.2} s   (inside the guest, once)",
        refresh_ms / 1000.0
    );
    println!(
        "  stream bytes: banger {:.1} MiB (.git + tree), baseline {:.1} MiB (tree); guest check {counts:?}",
        archive_bytes as f64 / (1 << 20) as f64,
        stream_bytes as f64 / (1 << 20) as f64
    );

    drop(guard);
    env.stop_daemon();
    drop(tmp);
}
