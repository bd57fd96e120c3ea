//! Pulls against a real registry (Debian's `docker-registry`, started per test by
//! `banger_testkit::registry`). Each test prints `SKIP: …` and passes when it is not installed.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_oci::{OciError, PullEvent, PullPolicy, PulledImage, Puller, Reference};
use banger_testkit::registry::{
    LocalRegistry, TestImage, TestLayer, pseudo_random, sha256_digest, tar_with_files,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn registry() -> Option<LocalRegistry> {
    match LocalRegistry::start() {
        Ok(r) => Some(r),
        Err(why) => {
            println!("SKIP: {why}");
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn insecure() -> PullPolicy {
    PullPolicy {
        insecure: true,
        insecure_registries: vec![],
    }
}

fn reference(reg: &LocalRegistry, name: &str) -> Reference {
    format!("{}/{name}", reg.addr()).parse().expect("reference")
}

/// Collects progress events.
#[derive(Default)]
struct Events(Mutex<Vec<PullEvent>>);

impl Events {
    fn push(&self, e: PullEvent) {
        self.0.lock().unwrap().push(e);
    }
    fn all(&self) -> Vec<PullEvent> {
        self.0.lock().unwrap().clone()
    }
}

async fn pull(puller: &Puller, r: &Reference, events: &Events) -> Result<PulledImage, OciError> {
    puller
        .pull(
            r,
            &insecure(),
            &|e| events.push(e),
            &CancellationToken::new(),
        )
        .await
}

/// Partial and lock files left in the cache.
fn leftovers(cache_dir: &Path) -> Vec<String> {
    std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".partial-") || n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

fn three_layers() -> Vec<Vec<u8>> {
    vec![
        tar_with_files(&[("etc/os-release", b"ID=test\n")]),
        tar_with_files(&[("usr/bin/app", &pseudo_random(300_000, 1))]),
        tar_with_files(&[("app/data", b"hello"), ("app/more", b"world")]),
    ]
}

#[test]
fn pulls_a_three_layer_image_into_the_cache() {
    let Some(reg) = registry() else { return };
    let pushed = reg.push(
        "team/app",
        "1.0",
        &three_layers(),
        json!({
            "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Entrypoint": ["/usr/bin/app"],
            "Cmd": ["--serve"],
        }),
    );
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let events = Events::default();
    let r = reference(&reg, "team/app:1.0");
    let img = runtime().block_on(pull(&puller, &r, &events)).unwrap();

    assert_eq!(img.reference, format!("{}/team/app:1.0", reg.addr()));
    assert_eq!(img.manifest_digest, pushed);
    assert_eq!(img.index_digest, None);
    assert_eq!(img.layers.len(), 3);
    for layer in &img.layers {
        let data = std::fs::read(&layer.path).unwrap();
        assert_eq!(
            sha256_digest(&data),
            layer.digest,
            "cached bytes match the digest"
        );
        assert_eq!(data.len() as u64, layer.size);
        assert_eq!(
            layer.media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            layer.path,
            cache
                .path()
                .join("blobs/sha256")
                .join(layer.digest.strip_prefix("sha256:").unwrap())
        );
        assert!(puller.cache().contains(&layer.digest));
        assert_eq!(reg.blob_gets(&layer.digest), 1);
    }
    assert!(puller.cache().contains(&img.config_digest));
    let c = &img.config;
    assert_eq!(c.env, vec!["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(c.working_dir.as_deref(), Some("/app"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.entrypoint, Some(vec!["/usr/bin/app".to_string()]));
    assert_eq!(c.cmd, Some(vec!["--serve".to_string()]));
    assert_eq!((c.os.as_str(), c.architecture.as_str()), ("linux", "amd64"));

    let ev = events.all();
    match &ev[0] {
        PullEvent::Resolved {
            manifest_digest,
            layers,
            total_bytes,
        } => {
            assert_eq!(manifest_digest, &pushed);
            assert_eq!(*layers, 3);
            assert_eq!(*total_bytes, img.layers.iter().map(|l| l.size).sum::<u64>());
        }
        other => panic!("first event should be Resolved, got {other:?}"),
    }
    for layer in &img.layers {
        assert!(ev.contains(&PullEvent::BlobDone {
            digest: layer.digest.clone(),
            cached: false
        }));
        assert!(ev.contains(&PullEvent::Blob {
            digest: layer.digest.clone(),
            done: layer.size,
            total: layer.size
        }));
    }
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
}

#[test]
fn pulls_docker_schema2_images() {
    let Some(reg) = registry() else { return };
    let image = TestImage {
        docker_media_types: true,
        ..TestImage::new(
            vec![TestLayer::Gzip(tar_with_files(&[("a", b"a")]))],
            json!({"Cmd": ["sh"]}),
        )
    };
    let pushed = reg.push_image("dockerish", Some("v2"), &image);
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let img = runtime()
        .block_on(pull(
            &puller,
            &reference(&reg, "dockerish:v2"),
            &Events::default(),
        ))
        .unwrap();
    assert_eq!(img.manifest_digest, pushed.manifest_digest);
    assert_eq!(
        img.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(img.config.cmd, Some(vec!["sh".to_string()]));
    // By digest, too.
    let by_digest = reference(&reg, &format!("dockerish@{}", pushed.manifest_digest));
    let again = runtime()
        .block_on(pull(&puller, &by_digest, &Events::default()))
        .unwrap();
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
}

#[test]
fn pulling_again_downloads_nothing() {
    let Some(reg) = registry() else { return };
    reg.push("app", "1", &three_layers(), json!({}));
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime();
    let first = rt
        .block_on(pull(
            &Puller::new(cache.path(), None).unwrap(),
            &reference(&reg, "app:1"),
            &Events::default(),
        ))
        .unwrap();
    let gets = reg.total_blob_gets();
    assert_eq!(gets, 4, "3 layers and the config");

    // A new puller (as after a daemon restart) on the same cache.
    let puller = Puller::new(cache.path(), None).unwrap();
    let events = Events::default();
    let second = rt
        .block_on(pull(&puller, &reference(&reg, "app:1"), &events))
        .unwrap();
    assert_eq!(reg.total_blob_gets(), gets, "nothing downloaded again");
    assert_eq!(first, second);
    let done: Vec<bool> = events
        .all()
        .into_iter()
        .filter_map(|e| match e {
            PullEvent::BlobDone { cached, .. } => Some(cached),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![true, true, true]);

    // A truncated cache file (wrong size) is replaced, not trusted.
    let victim = &first.layers[1];
    std::fs::write(&victim.path, b"truncated").unwrap();
    let third = rt
        .block_on(pull(&puller, &reference(&reg, "app:1"), &Events::default()))
        .unwrap();
    assert_eq!(reg.blob_gets(&victim.digest), 2);
    assert_eq!(third, first);
    assert_eq!(
        sha256_digest(&std::fs::read(&victim.path).unwrap()),
        victim.digest
    );
}

#[test]
fn index_resolves_to_linux_amd64() {
    let Some(reg) = registry() else { return };
    let index = reg.push_index("multi", "latest", &["linux/arm64/v8", "linux/amd64"]);
    let amd64 = &index.manifests[1].1;
    let arm64 = &index.manifests[0].1;
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let img = runtime()
        .block_on(pull(&puller, &reference(&reg, "multi"), &Events::default()))
        .unwrap();
    assert_eq!(img.manifest_digest, amd64.manifest_digest);
    assert_eq!(
        img.index_digest.as_deref(),
        Some(index.index_digest.as_str())
    );
    assert_eq!(img.config_digest, amd64.config_digest);
    assert!(img.config.env.contains(&"PLATFORM=linux/amd64".to_string()));
    assert_eq!(
        reg.blob_gets(&arm64.layer_digests[0]),
        0,
        "arm64 layers untouched"
    );
}

#[test]
fn index_without_amd64_lists_platforms() {
    let Some(reg) = registry() else { return };
    reg.push_index("armonly", "1", &["linux/arm64/v8", "linux/s390x"]);
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let err = runtime()
        .block_on(pull(
            &puller,
            &reference(&reg, "armonly:1"),
            &Events::default(),
        ))
        .unwrap_err();
    assert!(
        matches!(err, OciError::NoMatchingPlatform { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("linux/amd64")
            && msg.contains("linux/arm64/v8")
            && msg.contains("linux/s390x"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}/armonly:1", reg.addr())), "{msg}");
    assert_eq!(reg.total_blob_gets(), 0);
}

/// A layer big enough (with the proxy throttled) that pulls overlap in time.
fn push_slow_image(reg: &LocalRegistry, repo: &str, mib: usize) -> (String, String) {
    let big = pseudo_random(mib << 20, 7);
    let image = TestImage::new(
        vec![
            TestLayer::Gzip(tar_with_files(&[("small", b"small")])),
            TestLayer::Tar(big),
        ],
        json!({"Cmd": ["x"]}),
    );
    let pushed = reg.push_image(repo, Some("1"), &image);
    (pushed.manifest_digest, pushed.layer_digests[1].clone())
}

#[test]
fn concurrent_pulls_download_each_blob_once() {
    let Some(reg) = registry() else { return };
    let (_, big) = push_slow_image(&reg, "shared", 4);
    reg.set_throttle(8 << 20); // ~0.5 s for the big layer
    let cache = tempfile::tempdir().unwrap();
    let puller = Arc::new(Puller::new(cache.path(), None).unwrap());
    let r = reference(&reg, "shared:1");
    let rt = runtime();
    let (a, b) = rt.block_on(async {
        let spawn = |p: Arc<Puller>, r: Reference| {
            tokio::spawn(async move {
                p.pull(&r, &insecure(), &|_| {}, &CancellationToken::new())
                    .await
            })
        };
        let a = spawn(puller.clone(), r.clone());
        let b = spawn(puller.clone(), r.clone());
        let (a, b) = tokio::join!(a, b);
        (a.unwrap().unwrap(), b.unwrap().unwrap())
    });
    assert_eq!(a, b);
    for layer in &a.layers {
        assert_eq!(reg.blob_gets(&layer.digest), 1, "{}", layer.digest);
    }
    assert_eq!(reg.blob_gets(&a.config_digest), 1);
    assert_eq!(reg.blob_gets(&big), 1);

    // Two pullers on the same cache (as two processes would be): the flock keeps them from
    // both downloading.
    let cache2 = tempfile::tempdir().unwrap();
    let p1 = Arc::new(Puller::new(cache2.path(), None).unwrap());
    let p2 = Arc::new(Puller::new(cache2.path(), None).unwrap());
    let (a, b) = rt.block_on(async {
        let r1 = r.clone();
        let r2 = r.clone();
        let a = tokio::spawn(async move {
            p1.pull(&r1, &insecure(), &|_| {}, &CancellationToken::new())
                .await
        });
        let b = tokio::spawn(async move {
            p2.pull(&r2, &insecure(), &|_| {}, &CancellationToken::new())
                .await
        });
        let (a, b) = tokio::join!(a, b);
        (a.unwrap().unwrap(), b.unwrap().unwrap())
    });
    assert_eq!(a, b);
    assert_eq!(reg.blob_gets(&big), 2, "once per cache");
}

#[test]
fn waiter_takes_over_when_the_leader_is_cancelled() {
    let Some(reg) = registry() else { return };
    let (_, big) = push_slow_image(&reg, "takeover", 4);
    reg.set_throttle(4 << 20); // ~1 s for the big layer
    let cache = tempfile::tempdir().unwrap();
    let puller = Arc::new(Puller::new(cache.path(), None).unwrap());
    let r = reference(&reg, "takeover:1");
    let rt = runtime();
    rt.block_on(async {
        let leader_cancel = CancellationToken::new();
        let started = CancellationToken::new();
        let leader = {
            let (p, r, c, s, big) = (
                puller.clone(),
                r.clone(),
                leader_cancel.clone(),
                started.clone(),
                big.clone(),
            );
            tokio::spawn(async move {
                let progress = move |e: PullEvent| {
                    if matches!(&e, PullEvent::Blob { digest, done, .. } if *digest == big && *done > 0)
                    {
                        s.cancel();
                    }
                };
                p.pull(&r, &insecure(), &progress, &c).await
            })
        };
        started.cancelled().await;
        let waiter = {
            let (p, r) = (puller.clone(), r.clone());
            tokio::spawn(async move {
                p.pull(&r, &insecure(), &|_| {}, &CancellationToken::new())
                    .await
            })
        };
        // Let the waiter queue up behind the leader, then kill the leader.
        tokio::time::sleep(Duration::from_millis(100)).await;
        leader_cancel.cancel();
        let leader = leader.await.unwrap();
        assert!(matches!(leader, Err(OciError::Cancelled)), "{leader:?}");
        reg.set_throttle(0);
        let waited = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiter must not hang when the leader is cancelled")
            .unwrap()
            .unwrap();
        assert!(puller.cache().contains(&big));
        assert_eq!(waited.layers[1].digest, big);
    });
    assert_eq!(
        reg.blob_gets(&big),
        2,
        "the leader's aborted GET and the waiter's"
    );
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
}

#[test]
fn cancel_half_way_cleans_up_and_the_next_pull_succeeds() {
    let Some(reg) = registry() else { return };
    let (_, big) = push_slow_image(&reg, "big", 64);
    reg.set_throttle(16 << 20); // ~4 s for 64 MiB
    let cache = tempfile::tempdir().unwrap();
    let puller = Arc::new(Puller::new(cache.path(), None).unwrap());
    let r = reference(&reg, "big:1");
    let cancel = CancellationToken::new();
    let rt = runtime();
    let (err, latency, done_at_cancel) = rt.block_on(async {
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = {
            let (p, r, c, d, big) = (
                puller.clone(),
                r.clone(),
                cancel.clone(),
                done.clone(),
                big.clone(),
            );
            tokio::spawn(async move {
                let progress = move |e: PullEvent| {
                    if let PullEvent::Blob { digest, done, .. } = e
                        && digest == big
                    {
                        d.store(done, std::sync::atomic::Ordering::SeqCst);
                    }
                };
                let result = p.pull(&r, &insecure(), &progress, &c).await;
                (result, Instant::now())
            })
        };
        // Cancel from outside, once the big layer is well under way.
        while done.load(std::sync::atomic::Ordering::SeqCst) < 8 << 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done_at_cancel = done.load(std::sync::atomic::Ordering::SeqCst);
        let at = Instant::now();
        cancel.cancel();
        let (result, returned) = task.await.unwrap();
        (result.unwrap_err(), returned - at, done_at_cancel)
    });
    assert!(matches!(err, OciError::Cancelled), "{err:?}");
    println!(
        "cancelled after {done_at_cancel} of {} bytes; the pull returned {latency:?} later",
        64 << 20
    );
    assert!(
        latency < Duration::from_millis(500),
        "cancellation took {latency:?}"
    );
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
    assert!(!puller.cache().contains(&big));

    reg.set_throttle(0);
    let img = rt
        .block_on(pull(&puller, &r, &Events::default()))
        .expect("the next pull succeeds");
    assert!(puller.cache().contains(&big));
    assert_eq!(img.layers[1].size, 64 << 20);
    assert!(leftovers(cache.path()).is_empty());
}

#[test]
fn progress_is_throttled() {
    let Some(reg) = registry() else { return };
    let (_, big) = push_slow_image(&reg, "progress", 8);
    reg.set_throttle(8 << 20); // ~1 s
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let events = Events::default();
    let started = Instant::now();
    runtime()
        .block_on(pull(&puller, &reference(&reg, "progress:1"), &events))
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let blob_events: Vec<u64> = events
        .all()
        .into_iter()
        .filter_map(|e| match e {
            PullEvent::Blob { digest, done, .. } if digest == big => Some(done),
            _ => None,
        })
        .collect();
    // Start and end, plus one per 200 ms at most.
    let max = (secs / 0.2).ceil() as usize + 2;
    assert!(
        blob_events.len() >= 3 && blob_events.len() <= max,
        "{} events in {secs:.2} s",
        blob_events.len()
    );
    assert!(blob_events.windows(2).all(|w| w[0] <= w[1]), "monotonic");
}

#[test]
fn corrupted_blob_is_a_digest_mismatch_and_not_cached() {
    let Some(reg) = registry() else { return };
    let layers = three_layers();
    let image = TestImage::new(layers.into_iter().map(TestLayer::Gzip).collect(), json!({}));
    let pushed = reg.push_image("bad", Some("1"), &image);
    let victim = pushed.layer_digests[1].clone();
    reg.corrupt_blob(&victim);
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let err = runtime()
        .block_on(pull(&puller, &reference(&reg, "bad:1"), &Events::default()))
        .unwrap_err();
    match &err {
        OciError::DigestMismatch { expected, got, .. } => {
            assert_eq!(expected, &victim);
            assert_ne!(got, &victim);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&victim) && msg.contains("got sha256:"),
        "{msg}"
    );
    assert!(!puller.cache().contains(&victim));
    assert!(
        leftovers(cache.path()).is_empty(),
        "{:?}",
        leftovers(cache.path())
    );
}

#[test]
fn plain_http_policy() {
    let Some(reg) = registry() else { return };
    reg.push("app", "1", &three_layers()[..1], json!({}));
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let rt = runtime();
    let never = CancellationToken::new();

    // --insecure for a remote registry: refused before any connection.
    let remote: Reference = "registry.example:5000/app:1".parse().unwrap();
    let err = rt
        .block_on(puller.pull(&remote, &insecure(), &|_| {}, &never))
        .unwrap_err();
    assert!(
        matches!(err, OciError::InsecureNotAllowed { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("insecure_registries"), "{err}");

    // Without --insecure a loopback registry is spoken to over HTTPS, which fails against a
    // plain HTTP one, with a hint.
    let r = reference(&reg, "app:1");
    let err = rt
        .block_on(puller.pull(&r, &PullPolicy::default(), &|_| {}, &never))
        .unwrap_err();
    assert!(matches!(err, OciError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&reg.addr()) && msg.contains("--insecure"),
        "{msg}"
    );
    println!("{msg}");

    // Listed in the config: plain HTTP without --insecure.
    let listed = PullPolicy {
        insecure: false,
        insecure_registries: vec![reg.addr()],
    };
    rt.block_on(puller.pull(&r, &listed, &|_| {}, &never))
        .unwrap();
    // And loopback with --insecure.
    rt.block_on(puller.pull(&r, &insecure(), &|_| {}, &never))
        .unwrap();
}

#[test]
fn missing_tag_and_repository_are_clear_errors() {
    let Some(reg) = registry() else { return };
    reg.push("app", "1", &three_layers()[..1], json!({}));
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let rt = runtime();
    for name in ["app:nope", "nothing-here:1"] {
        let err = rt
            .block_on(pull(&puller, &reference(&reg, name), &Events::default()))
            .unwrap_err();
        assert!(matches!(err, OciError::NotFound { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("pulling {}/{name}: ", reg.addr())),
            "{msg}"
        );
        println!("{msg}");
    }
    let err = rt
        .block_on(pull(
            &puller,
            &reference(&reg, "app:nope"),
            &Events::default(),
        ))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "pulling {}/app:nope: manifest unknown (does the tag exist?)",
            reg.addr()
        )
    );
}

#[test]
fn connection_refused_names_the_registry() {
    // A port nothing listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let r: Reference = format!("127.0.0.1:{port}/x:1").parse().unwrap();
    let err = runtime()
        .block_on(pull(&puller, &r, &Events::default()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("127.0.0.1:{port}: connection refused")
    );
}

#[test]
fn foreign_layers_and_oversized_configs_are_refused() {
    let Some(reg) = registry() else { return };
    let layer = tar_with_files(&[("a", b"a")]);
    let pushed = reg.push("base", "1", &[layer], json!({}));
    let _ = pushed;
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux"})).unwrap();
    let config_digest = reg.push_blob("foreign", &config);
    let foreign_digest = sha256_digest(b"windows base layer");
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": foreign_digest,
            "size": 18,
            "urls": ["https://example.invalid/layer"],
        }],
    });
    reg.push_manifest(
        "foreign",
        "1",
        "application/vnd.docker.distribution.manifest.v2+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let rt = runtime();
    let err = rt
        .block_on(pull(
            &puller,
            &reference(&reg, "foreign:1"),
            &Events::default(),
        ))
        .unwrap_err();
    assert!(matches!(err, OciError::Unsupported { .. }), "{err:?}");
    assert!(
        err.to_string().contains("foreign") && err.to_string().contains(&foreign_digest),
        "{err}"
    );

    // A config over 4 MiB is refused from its descriptor, before it is fetched.
    let big_config = {
        let mut v = serde_json::to_vec(
            &json!({"architecture": "amd64", "os": "linux", "pad": "x".repeat(5 << 20)}),
        )
        .unwrap();
        v.shrink_to_fit();
        v
    };
    let big_digest = reg.push_blob("hugeconfig", &big_config);
    let small_layer = reg.push_blob("hugeconfig", &tar_with_files(&[("a", b"a")]));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": big_digest, "size": big_config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": small_layer, "size": tar_with_files(&[("a", b"a")]).len()}],
    });
    reg.push_manifest(
        "hugeconfig",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let err = rt
        .block_on(pull(
            &puller,
            &reference(&reg, "hugeconfig:1"),
            &Events::default(),
        ))
        .unwrap_err();
    assert!(
        matches!(err, OciError::TooLarge { what: "config", .. }),
        "{err:?}"
    );
    assert_eq!(reg.blob_gets(&big_digest), 0);
}

#[test]
fn basic_auth_from_docker_config() {
    let reg = match LocalRegistry::start_with_basic_auth() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    reg.push(
        "private/app",
        "1",
        &three_layers()[..1],
        json!({"Cmd": ["ok"]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, serde_json::to_vec(&reg.docker_config()).unwrap()).unwrap();
    let rt = runtime();
    let r = reference(&reg, "private/app:1");

    let anonymous = Puller::new(&dir.path().join("cache-a"), None).unwrap();
    let err = rt
        .block_on(pull(&anonymous, &r, &Events::default()))
        .unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("docker login"), "{err}");

    let authed = Puller::new(&dir.path().join("cache-b"), Some(config)).unwrap();
    assert!(authed.credentials().get(&reg.addr()).is_some());
    let img = rt.block_on(pull(&authed, &r, &Events::default())).unwrap();
    assert_eq!(img.config.cmd, Some(vec!["ok".to_string()]));

    // Wrong password.
    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        format!(
            r#"{{"auths":{{"{}":{{"username":"banger","password":"nope"}}}}}}"#,
            reg.addr()
        ),
    )
    .unwrap();
    let bad = Puller::new(&dir.path().join("cache-c"), Some(wrong)).unwrap();
    let err = rt.block_on(pull(&bad, &r, &Events::default())).unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("credentials"), "{err}");
}

#[test]
fn prune_keeps_what_images_reference() {
    let Some(reg) = registry() else { return };
    reg.push("one", "1", &three_layers()[..2], json!({}));
    reg.push("two", "1", &three_layers()[2..], json!({"Cmd": ["two"]}));
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let rt = runtime();
    let one = rt
        .block_on(pull(&puller, &reference(&reg, "one:1"), &Events::default()))
        .unwrap();
    let two = rt
        .block_on(pull(&puller, &reference(&reg, "two:1"), &Events::default()))
        .unwrap();
    let keep: HashSet<String> = one
        .layers
        .iter()
        .map(|l| l.digest.clone())
        .chain([one.config_digest.clone()])
        .collect();
    let report = puller.cache().prune(&keep, false).unwrap();
    assert_eq!(report.blobs, 2, "two's layer and config");
    assert!(!puller.cache().contains(&two.layers[0].digest));
    assert!(keep.iter().all(|d| puller.cache().contains(d)));
}

/// Not run by default: cold and warm pull of a ~100 MiB image (4 × 25 MiB uncompressed tar
/// layers), printed. `cargo test -p banger-oci --test it -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing_100mib() {
    let Some(reg) = registry() else { return };
    let layers = (0..4)
        .map(|i| TestLayer::Tar(pseudo_random(25 << 20, 100 + i)))
        .collect();
    reg.push_image("timing", Some("1"), &TestImage::new(layers, json!({})));
    let cache = tempfile::tempdir().unwrap();
    let puller = Puller::new(cache.path(), None).unwrap();
    let rt = runtime();
    let r = reference(&reg, "timing:1");
    let t = Instant::now();
    rt.block_on(pull(&puller, &r, &Events::default())).unwrap();
    let cold = t.elapsed();
    let t = Instant::now();
    rt.block_on(pull(&puller, &r, &Events::default())).unwrap();
    let warm = t.elapsed();
    println!("100 MiB image: cold pull {cold:?}, warm pull {warm:?}");
}
