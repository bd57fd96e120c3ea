//! A failure injected at each start step (before and after the step's own work) leaves the VM
//! in `error` naming that step, and no file, process or socket of the attempt behind.

use std::sync::Arc;

use banger_config::{Config, HostInfo};
use banger_core::{VmRecord, VmState};
use banger_daemon::engine::{Deps, Engine, START_STEPS, StepHook};
use banger_daemon::layout::Layout;
use banger_daemon::progress::{NoProgress, OpCtx};
use banger_daemon::vmms::ConfigVmmProvider;
use banger_net::RecordingNetOps;
use banger_protocol::{Request, VmCreateParams, VmRef};
use banger_store::Store;
use banger_sys::RealRunner;
use banger_testkit::{TestEnv, make_ext4};

#[derive(Debug)]
struct FailAt {
    step: &'static str,
    after: bool,
}

impl StepHook for FailAt {
    fn check(&self, _vm: &VmRecord, step: &'static str, after: bool) -> Result<(), String> {
        if step == self.step && after == self.after {
            Err(format!(
                "injected failure ({})",
                if after { "after" } else { "before" }
            ))
        } else {
            Ok(())
        }
    }
}

async fn engine_for(env: &TestEnv, hook: Arc<dyn StepHook>) -> Engine {
    let host = HostInfo::detect().unwrap();
    let config = Arc::new(Config::load(&env.config, &host).unwrap());
    let layout = Layout::new(config.state_dir.clone(), config.runtime_dir.clone());
    layout.ensure().unwrap();
    let store = Store::open(layout.db()).unwrap();
    Engine::new(
        store,
        config.clone(),
        layout,
        Deps {
            vmms: Arc::new(ConfigVmmProvider::new(&config)),
            runner: Arc::new(RealRunner),
            hook,
            net: Arc::new(RecordingNetOps::new()),
        },
    )
}

async fn seed(engine: &Engine, env: &TestEnv) {
    let kdir = env.root().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    let mut vmlinux = b"\x7fELF".to_vec();
    vmlinux.resize(1024, 0);
    std::fs::write(kdir.join("vmlinux"), vmlinux).unwrap();
    engine.kernel_import("test-kernel", &kdir).await.unwrap();
    let rootfs = env.root().join("rootfs.ext4");
    make_ext4(&rootfs, 16);
    engine
        .image_register("test-image", &rootfs, None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_at_each_start_step_rolls_back_everything() {
    let mut cases = 0;
    for &step in START_STEPS {
        for after in [false, true] {
            let env = TestEnv::new("");
            let engine = engine_for(&env, Arc::new(FailAt { step, after })).await;
            seed(&engine, &env).await;
            let progress = NoProgress;
            let ctx = OpCtx::new(banger_core::OpId::generate(), &progress);
            let err = engine
                .create(
                    VmCreateParams {
                        name: Some("victim".into()),
                        ..Default::default()
                    },
                    &ctx,
                )
                .await
                .unwrap_err();
            let label = format!("{step} ({})", if after { "after" } else { "before" });
            assert!(
                err.message.contains(&format!("at step {step}")),
                "{label}: {}",
                err.message
            );
            let vm = engine.store().get_vm("victim").unwrap().unwrap();
            assert_eq!(vm.state, VmState::Error, "{label}");
            assert!(
                vm.last_error
                    .as_deref()
                    .unwrap()
                    .contains(&format!("step {step}")),
                "{label}: {:?}",
                vm.last_error
            );
            assert!(
                !engine.layout().vm_run_dir(&vm.id).exists(),
                "{label}: run dir left"
            );
            assert!(
                !engine.layout().handles_file(&vm.id).exists(),
                "{label}: handles file left"
            );
            assert!(
                env.stray_processes().is_empty(),
                "{label}: {:?}",
                env.stray_processes()
            );
            assert!(engine.vmm_pid(&vm.id).is_none(), "{label}");
            // The VM's own disks stay: it is in `error`, not deleted, and can be started again.
            assert!(engine.layout().work_disk(&vm.id).exists(), "{label}");
            cases += 1;
        }
    }
    assert_eq!(cases, START_STEPS.len() * 2);
}

#[test]
fn vmm_api_failures_name_the_step_through_the_daemon() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    for (name, rule, step) in [
        (
            "cfg",
            serde_json::json!({"method": "PUT", "path": "/machine-config", "message": "no memory for you"}),
            "vmm_configure",
        ),
        (
            "drv",
            serde_json::json!({"method": "PUT", "path": "/drives/{drive_id}", "message": "disk says no"}),
            "vmm_configure",
        ),
        (
            "boot",
            serde_json::json!({"method": "PUT", "path": "/actions", "action_type": "InstanceStart", "message": "cannot boot"}),
            "vmm_boot",
        ),
    ] {
        env.set_control(serde_json::json!({"fail": [rule]}));
        let (_, msg) = env
            .request(&Request::VmCreate(VmCreateParams {
                name: Some(name.into()),
                ..Default::default()
            }))
            .err();
        assert!(msg.contains(&format!("at step {step}")), "{name}: {msg}");
        let v = env
            .request(&Request::VmShow(VmRef { vm: name.into() }))
            .ok();
        assert_eq!(v["state"], "error");
        assert!(
            env.stray_processes().is_empty(),
            "{name}: {:?}",
            env.stray_processes()
        );
        assert!(
            !env.runtime_dir()
                .join("vms")
                .join(v["id"].as_str().unwrap())
                .exists()
        );
    }
    // A VM in error starts once the fault is gone.
    env.set_control(serde_json::json!({}));
    env.request(&Request::VmStart(VmRef { vm: "boot".into() }))
        .ok();
}

#[test]
fn dm_snapshot_without_device_mapper_fails_at_root_device_and_leaves_nothing() {
    if std::path::Path::new("/dev/mapper/control").exists() {
        println!(
            "SKIP: this host has device-mapper; the recording-runner tests in dm.rs cover the commands"
        );
        return;
    }
    let mut env = TestEnv::new("root_disk = \"dm-snapshot\"\n");
    env.start_daemon();
    env.seed_artifacts();
    let (_, msg) = env
        .request(&Request::VmCreate(VmCreateParams {
            name: Some("dm".into()),
            ..Default::default()
        }))
        .err();
    assert!(msg.contains("at step root_device"), "{msg}");
    assert!(msg.contains("device-mapper"), "{msg}");
    let v = env
        .request(&Request::VmShow(VmRef { vm: "dm".into() }))
        .ok();
    assert_eq!(v["state"], "error");
    assert!(
        !env.runtime_dir()
            .join("vms")
            .join(v["id"].as_str().unwrap())
            .exists()
    );
    assert!(env.stray_processes().is_empty());
}
