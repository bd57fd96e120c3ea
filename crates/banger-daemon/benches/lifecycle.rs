//! Benchmark: one VM's full lifecycle (create + start, stop, delete) through the daemon with the
//! fake Firecracker, against a baseline measured in the same run: the bare backend doing the
//! VMM part alone (spawn, configure, boot, shutdown) with no daemon, store or disks.
//!
//! `cargo bench -p banger-daemon --bench lifecycle [-- ITERATIONS]`. Prints medians and the
//! ratio; these machines are noisy, so compare ratios, not absolute times.

use std::time::{Duration, Instant};

use banger_protocol::{Request, VmCreateParams, VmDeleteParams, VmStopParams};
use banger_testkit::{TestEnv, bin};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::{DriveSpec, LaunchSpec, Vmm};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let fc = Firecracker::new(bin("fake-firecracker")).unwrap();
    let kernel = env.state_dir().join("kernels/test-kernel/vmlinux");
    let disk = env.root().join("rootfs.ext4");
    let mut baseline = Vec::new();
    let mut create = Vec::new();
    let mut stop = Vec::new();
    let mut delete = Vec::new();
    let mut total = Vec::new();
    for i in 0..iterations {
        // Baseline: the VMM work alone.
        let spec = LaunchSpec {
            vm_id: format!("base{i}"),
            run_dir: env.root().join(format!("b{i}")),
            log_path: env.root().join(format!("b{i}.log")),
            log_max_bytes: banger_vmm::DEFAULT_LOG_MAX_BYTES,
            vcpu: 1,
            memory_mib: 256,
            kernel: kernel.clone(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            drives: vec![DriveSpec {
                id: "root".into(),
                path: disk.clone(),
                read_only: true,
            }],
            net: None,
            vsock: None,
        };
        let t = Instant::now();
        rt.block_on(async {
            let h = fc.spawn(&spec).await.unwrap();
            fc.configure(&h, &spec).await.unwrap();
            fc.boot(&h).await.unwrap();
            assert!(fc.shutdown(&h, Duration::from_secs(5)).await.unwrap());
        });
        baseline.push(t.elapsed());

        // Through the daemon.
        let name = format!("bench-{i}");
        let t0 = Instant::now();
        env.request(&Request::VmCreate(VmCreateParams {
            name: Some(name.clone()),
            ..Default::default()
        }))
        .ok();
        let t1 = Instant::now();
        env.request(&Request::VmStop(VmStopParams {
            vm: name.clone(),
            timeout_secs: Some(5),
        }))
        .ok();
        let t2 = Instant::now();
        env.request(&Request::VmDelete(VmDeleteParams {
            vm: name,
            force: false,
        }))
        .ok();
        let t3 = Instant::now();
        create.push(t1 - t0);
        stop.push(t2 - t1);
        delete.push(t3 - t2);
        total.push(t3 - t0);
    }
    let base = median(baseline);
    let tot = median(total);
    println!("lifecycle benchmark, {iterations} iterations, fake Firecracker (medians)");
    println!(
        "  baseline (backend alone: spawn+configure+boot+shutdown): {:8.1} ms",
        ms(base)
    );
    println!(
        "  banger create+start:                                     {:8.1} ms",
        ms(median(create))
    );
    println!(
        "  banger stop:                                             {:8.1} ms",
        ms(median(stop))
    );
    println!(
        "  banger delete:                                           {:8.1} ms",
        ms(median(delete))
    );
    println!(
        "  banger create+start+stop+delete:                         {:8.1} ms",
        ms(tot)
    );
    println!(
        "  ratio banger/baseline:                                   {:8.2}x",
        ms(tot) / ms(base)
    );
    env.stop_daemon();
}
