//! Concurrency: rounds of 20 VMs created and deleted in parallel (half of them from a registry
//! image), while other clients keep pulling that image and deleting it. The only errors allowed
//! are the ones that describe the race truthfully (`busy`: the image has VMs; `not_found`: the
//! image was already deleted), and after each round nothing is left: no VM, no leak, no process,
//! no VM dir, no staging or scratch dir.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use banger_core::ErrorCode;
use banger_protocol::{
    Frame, ImagePullParams, KernelImportParams, NameForceParams, Request, VmCreateParams,
    VmDeleteParams,
};
use banger_testkit::TestEnv;
use banger_testkit::layers::LayerBuilder;
use banger_testkit::registry::LocalRegistry;

const ROUNDS: usize = 5;
const VMS: usize = 20;
const PULLERS: usize = 3;

/// (operation, outcome) → count.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<(String, String), usize>>);

impl Tally {
    fn add(&self, op: &str, outcome: &str) {
        *self
            .0
            .lock()
            .unwrap()
            .entry((op.to_string(), outcome.to_string()))
            .or_default() += 1;
    }
}

/// `Ok(result)` or `Err((code, message))`.
fn outcome(r: &banger_testkit::Reply) -> Result<serde_json::Value, (ErrorCode, String)> {
    match r.last() {
        Frame::Result { result, .. } => Ok(result.clone()),
        Frame::Error { code, message, .. } => Err((*code, message.clone())),
        other => panic!("unexpected final frame {other:?}"),
    }
}

fn code_name(c: ErrorCode) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{c:?}"))
}

#[test]
fn parallel_creates_deletes_and_racing_pulls_leave_nothing() {
    let reg = match LocalRegistry::start() {
        Ok(r) => Some(r),
        Err(why) => {
            println!("SKIP (image races): {why}");
            None
        }
    };
    // The registry is plain HTTP on loopback; `vm create --image REF` has no --insecure, so
    // the config lists it.
    let mut env = TestEnv::new("insecure_registries = [\"127.0.0.1\"]\n");
    // An agent as big as the real one (tens of MiB), so building the initramfs takes as long as
    // in production and the first starts overlap while it is built.
    {
        let agent = env.root().join("fake-agent");
        let mut bytes = banger_testkit::tiny_static_elf();
        bytes.resize(48 << 20, 0);
        std::fs::write(&agent, bytes).unwrap();
    }
    env.start_daemon();
    env.seed_artifacts();
    // A kernel without an initrd: its starts build banger's initramfs (agent + modules) on
    // first use, which round 0's simultaneous starts race for.
    let bare = env.root().join("bare-kernel");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(env.root().join("kernel-src/vmlinux"), bare.join("vmlinux")).unwrap();
    env.request(&Request::KernelImport(KernelImportParams {
        name: "bare-kernel".into(),
        dir: bare,
    }))
    .ok();
    let reference = reg.as_ref().map(|reg| {
        let layer = LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/os-release", 0o644, b"ID=race\n")
            .dir("usr", 0o755)
            .dir("usr/bin", 0o755)
            .file("usr/bin/tool", 0o755, &[7u8; 64 << 10])
            .build();
        reg.push(
            "race/img",
            "1",
            &[layer],
            serde_json::json!({"Cmd": ["/bin/sh"]}),
        );
        format!("{}/race/img:1", reg.addr())
    });
    let image_name = "img-1";
    let socket = env.socket();
    let tally = Tally::default();
    let unexpected: Mutex<Vec<String>> = Mutex::default();
    let total = Instant::now();

    for round in 0..ROUNDS {
        let t = Instant::now();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            // The racers: pull the reference, delete the image, again and again.
            for _ in 0..PULLERS {
                let Some(reference) = reference.as_deref() else {
                    break;
                };
                let (socket, tally, unexpected, stop) = (&socket, &tally, &unexpected, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let r = banger_testkit::request(
                            socket,
                            &Request::ImagePull(ImagePullParams {
                                reference: reference.into(),
                                insecure: true,
                                ..Default::default()
                            }),
                        );
                        match outcome(&r) {
                            Ok(_) => tally.add("image.pull", "ok"),
                            Err((code, msg)) => {
                                tally.add("image.pull", &code_name(code));
                                unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("image.pull: {msg}"));
                            }
                        }
                        let r = banger_testkit::request(
                            socket,
                            &Request::ImageDelete(NameForceParams {
                                name: image_name.into(),
                                force: false,
                            }),
                        );
                        match outcome(&r) {
                            Ok(_) => tally.add("image.delete", "ok"),
                            // Refused: VMs use it.
                            Err((ErrorCode::Busy, msg)) => {
                                assert!(
                                    msg.contains("used by") || msg.contains("running"),
                                    "{msg}"
                                );
                                tally.add("image.delete", "busy");
                            }
                            // Another racer deleted it first.
                            Err((ErrorCode::NotFound, _)) => tally.add("image.delete", "not_found"),
                            Err((code, msg)) => {
                                tally.add("image.delete", &code_name(code));
                                unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("image.delete: {code:?}: {msg}"));
                            }
                        }
                    }
                });
            }
            // The VMs: each created (and started) and deleted by its own client.
            let vm_threads: Vec<_> = (0..VMS)
                .map(|i| {
                    let (socket, tally, unexpected) = (&socket, &tally, &unexpected);
                    // Even VMs use the registry image, odd ones the seeded image and the
                    // kernel without an initrd.
                    let (image, kernel) = if i % 2 == 0 {
                        (reference.clone(), None)
                    } else {
                        (None, Some("bare-kernel".to_string()))
                    };
                    s.spawn(move || {
                        // Odd rounds spread the creates over two seconds, so the image is
                        // sometimes unused (and deletable) while creates resolve it; even
                        // rounds start all at once (round 0 with no initramfs built yet).
                        if round % 2 == 1 {
                            std::thread::sleep(Duration::from_millis((i * 7 % VMS) as u64 * 100));
                        }
                        let name = format!("r{round}-{i}");
                        let r = banger_testkit::request(
                            socket,
                            &Request::VmCreate(VmCreateParams {
                                name: Some(name.clone()),
                                image: image.clone(),
                                kernel,
                                ..Default::default()
                            }),
                        );
                        match outcome(&r) {
                            Ok(vm) => {
                                tally.add("vm.create", "ok");
                                assert_eq!(vm["state"], "running", "{name}: {vm}");
                                if image.is_some() {
                                    assert_eq!(vm["image"], image_name, "{name}: {vm}");
                                }
                            }
                            Err((code, msg)) => {
                                tally.add("vm.create", &code_name(code));
                                unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("vm.create {name}: {code:?}: {msg}"));
                            }
                        }
                        let r = banger_testkit::request(
                            socket,
                            &Request::VmDelete(VmDeleteParams {
                                vm: name.clone(),
                                force: true,
                            }),
                        );
                        match outcome(&r) {
                            Ok(_) => tally.add("vm.delete", "ok"),
                            Err((code, msg)) => {
                                tally.add("vm.delete", &code_name(code));
                                // A create that failed has nothing to delete.
                                if code != ErrorCode::NotFound {
                                    unexpected
                                        .lock()
                                        .unwrap()
                                        .push(format!("vm.delete {name}: {code:?}: {msg}"));
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in vm_threads {
                h.join().expect("a VM thread panicked");
            }
            stop.store(true, Ordering::Relaxed);
        });
        let elapsed = t.elapsed();

        let list = env.request(&Request::VmList).ok();
        assert_eq!(list["vms"], serde_json::json!([]), "round {round}: {list}");
        let leaks = env.request(&Request::DaemonLeaks).ok();
        assert_eq!(
            leaks["leaks"],
            serde_json::json!([]),
            "round {round}: {leaks}"
        );
        assert!(
            env.stray_processes().is_empty(),
            "round {round}: {:?}",
            env.stray_processes()
        );
        assert!(
            env.vm_leftovers().is_empty(),
            "round {round}: {:?}",
            env.vm_leftovers()
        );
        assert_no_scratch(&env, round);
        println!("round {round}: {elapsed:.2?}");
    }

    let counts = tally.0.lock().unwrap().clone();
    println!("total {:.2?}", total.elapsed());
    // Creates that resolved the image, lost it to a delete before their row was in, and
    // resolved it again (see `Engine::create`).
    let lost = env
        .daemon_log()
        .matches("the image was deleted while a VM was being created")
        .count();
    println!("  creates that lost their image to a delete and pulled it again: {lost}");
    for ((op, outcome), n) in &counts {
        println!("  {op:<13} {outcome:<10} {n}");
    }
    let unexpected = unexpected.into_inner().unwrap();
    assert!(
        unexpected.is_empty(),
        "unexpected errors:\n{}",
        unexpected.join("\n")
    );
    assert_eq!(
        counts.get(&("vm.create".into(), "ok".into())),
        Some(&(ROUNDS * VMS))
    );
}

fn assert_no_scratch(env: &TestEnv, round: usize) {
    // Staging dirs are dot-named in images/; anything in build/ is scratch.
    type Stray = fn(&str) -> bool;
    let dirs: [(&str, Stray); 2] = [("images", |n| n.starts_with('.')), ("build", |_| true)];
    for (dir, stray) in dirs {
        let names: Vec<String> = std::fs::read_dir(env.state_dir().join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| stray(n))
                    .collect()
            })
            .unwrap_or_default();
        assert!(names.is_empty(), "round {round}: left in {dir}: {names:?}");
    }
    let partials: Vec<_> = banger_testkit::files_under(&env.root().join("cache"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(partials.is_empty(), "round {round}: {partials:?}");
}
