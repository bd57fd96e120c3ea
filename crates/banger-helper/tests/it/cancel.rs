//! A `Debootstrap` whose caller goes away (the daemon's image build was cancelled) is
//! abandoned: mmdebstrap's whole process group is killed, its scratch dir (mmdebstrap's own
//! temporary tree included, through TMPDIR) removed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_helper::ServeOptions;
use banger_sys::{Cmd, CommandRunner, RealRunner, RunError};

use crate::common::Env;

/// Runs `mmdebstrap` as a stand-in script: it leaves a child in the background (as apt and
/// dpkg are), records both pids and its TMPDIR in `record`, and runs for a long time.
#[derive(Debug)]
struct SlowMmdebstrap {
    script: std::path::PathBuf,
}

#[async_trait::async_trait]
impl CommandRunner for SlowMmdebstrap {
    async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
        let mut swapped = cmd.clone();
        if cmd.program == std::path::Path::new("mmdebstrap") {
            swapped.program = self.script.clone();
        }
        RealRunner.run(&swapped).await
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_debootstrap_kills_its_group_and_cleans_its_scratch() {
    let work = tempfile::tempdir().unwrap();
    let record = work.path().join("record");
    let script = work.path().join("mmdebstrap");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep 1000 &\necho \"$$ $! $TMPDIR\" > {}.tmp\nmv {r}.tmp {r}\nexec sleep 1000\n",
            record.display(),
            r = record.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner: Arc<dyn CommandRunner> = Arc::new(SlowMmdebstrap { script });
    let env = Env::start_with(false, Some(runner), ServeOptions::default()).await;
    let client = env.client();
    let out = env.state.join("build/debian-bookworm.tar");
    let call = tokio::spawn(async move {
        client
            .debootstrap("bookworm", "http://deb.debian.org/debian", &[], &out)
            .await
    });
    let t = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&record) {
            break t;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "mmdebstrap never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut parts = text.split_whitespace();
    let leader: i32 = parts.next().unwrap().parse().unwrap();
    let child: i32 = parts.next().unwrap().parse().unwrap();
    let tmpdir = std::path::PathBuf::from(parts.next().expect("TMPDIR is set"));
    let scratch = env.dir.path().join("scratch");
    assert!(
        tmpdir.starts_with(&scratch),
        "mmdebstrap's TMPDIR {} is not the helper's scratch dir",
        tmpdir.display()
    );
    // The caller goes away.
    call.abort();
    let _ = call.await;
    let t = Instant::now();
    while alive(leader) || alive(child) || std::fs::read_dir(&scratch).unwrap().next().is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "after the caller left: mmdebstrap alive {}, its child alive {}, scratch {:?}",
            alive(leader),
            alive(child),
            std::fs::read_dir(&scratch)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.stop().await;
}
