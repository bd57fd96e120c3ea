//! Integration tests against the real Debian mirror. Each test prints `SKIP: <reason>` and passes
//! when the mirror, gpgv or the archive keyring is not available. Catalog pulls (`catalog`) run
//! against a local HTTP server and need no network.

mod catalog;

use std::path::Path;
use std::time::Instant;

use banger_kernel::{
    DebianMirror, INITRAMFS_MODULES, KernelError, PullProgress, PullStage, mirror,
    pull_debian_cloud_kernel, read_manifest,
};

fn usable_mirror() -> Option<DebianMirror> {
    let m = DebianMirror::default();
    if banger_sys::find_in_path("gpgv").is_none() {
        println!("SKIP: gpgv not installed");
        return None;
    }
    if !m.keyring.is_file() {
        println!("SKIP: {} missing", m.keyring.display());
        return None;
    }
    if !m.reachable() {
        println!("SKIP: {} not reachable", m.base_url);
        return None;
    }
    Some(m)
}

#[test]
fn pulls_the_debian_cloud_kernel() {
    let Some(m) = usable_mirror() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("debian-6.1-cloud");
    let mut stages = Vec::new();
    let mut deb_progress = (0u64, 0u64);
    let started = Instant::now();
    let k = pull_debian_cloud_kernel(&m, &dest, &mut |p| match p {
        PullProgress::Stage { stage, .. } => stages.push(stage),
        PullProgress::Download {
            stage: PullStage::Download,
            done,
            total,
            ..
        } => deb_progress = (done, total),
        PullProgress::Download { .. } => {}
    })
    .unwrap();
    let took = started.elapsed();

    // Version string: 6.1.0-<abi>-cloud-amd64 on bookworm.
    assert!(
        k.version.starts_with("6.1.0-") && k.version.ends_with("-cloud-amd64"),
        "{}",
        k.version
    );
    assert!(
        k.package.starts_with(&format!("linux-image-{}", k.version)),
        "{}",
        k.package
    );
    assert!(
        k.source_url
            .starts_with("http://deb.debian.org/debian/pool/main/l/")
    );
    assert_eq!(deb_progress.0, deb_progress.1);
    assert!(deb_progress.1 > 1 << 20);
    for s in [
        PullStage::Release,
        PullStage::Resolve,
        PullStage::Download,
        PullStage::Extract,
        PullStage::Vmlinux,
        PullStage::Modules,
        PullStage::Finish,
    ] {
        assert!(stages.contains(&s), "{s:?} not reported: {stages:?}");
    }

    // vmlinux is an x86-64 ELF executable whose bytes match the manifest.
    let elf = std::fs::read(&k.vmlinux).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    assert_eq!(u16::from_le_bytes([elf[0x12], elf[0x13]]), 62, "EM_X86_64");
    assert_eq!(u16::from_le_bytes([elf[0x10], elf[0x11]]), 2, "ET_EXEC");
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&elf)), k.vmlinux_sha256);
    // The kernel's own version banner is inside.
    let banner = format!("Linux version {}", k.version);
    assert!(
        elf.windows(banner.len()).any(|w| w == banner.as_bytes()),
        "no {banner:?}"
    );

    // Module list: every wanted module is either built in or loaded, deps first, no duplicates.
    let order = std::fs::read_to_string(dest.join("modules/load-order")).unwrap();
    let order: Vec<&str> = order.lines().collect();
    assert_eq!(order.len(), k.modules.len());
    for want in INITRAMFS_MODULES {
        let loaded = order.contains(&format!("{want}.ko").as_str());
        assert!(
            loaded ^ k.built_in.iter().any(|b| b == want),
            "{want}: {order:?} / {:?}",
            k.built_in
        );
    }
    let pos = |m: &str| order.iter().position(|x| *x == m);
    if let (Some(v), Some(m)) = (pos("virtio.ko"), pos("virtio_mmio.ko")) {
        assert!(v < m);
    }
    if let (Some(v), Some(t)) = (pos("vsock.ko"), pos("vmw_vsock_virtio_transport.ko")) {
        assert!(v < t);
    }
    let mut sorted = order.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), order.len());
    for m in &k.modules {
        let bytes = std::fs::read(m).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"), "{}", m.display());
    }
    let config = std::fs::read_to_string(dest.join("config")).unwrap();
    assert!(banger_kernel::config_option(&config, "CONFIG_VIRTIO_MMIO").is_some());
    assert_eq!(
        k.virtio_mmio_cmdline_devices,
        Some(
            banger_kernel::config_option(&config, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
                == Some("y")
        )
    );

    // The manifest reads back to the same thing; nothing else is left in the directory.
    assert_eq!(read_manifest(&dest).unwrap(), k);
    let mut entries: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    // `lib/modules/<release>`: the whole module tree, for `--nested` guests.
    assert_eq!(
        entries,
        ["config", "lib", "manifest.json", "modules", "vmlinux"]
    );
    assert!(!banger_kernel::staging_dir(&dest).exists());

    let deb_size = deb_progress.1;
    let modules_size: u64 = k
        .modules
        .iter()
        .map(|m| std::fs::metadata(m).unwrap().len())
        .sum();
    println!(
        "pulled {} ({} {}) in {:.1}s: deb {} bytes, vmlinux {} bytes ({:?}), {} modules {} bytes {:?}, built in {:?}",
        k.version,
        k.package,
        k.package_version,
        took.as_secs_f64(),
        deb_size,
        elf.len(),
        k.vmlinuz_compression,
        k.modules.len(),
        modules_size,
        order,
        k.built_in
    );

    // A second pull into the same place is refused.
    let e = pull_debian_cloud_kernel(&m, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(e, KernelError::AlreadyExists { .. }), "{e}");
}

#[test]
fn tampered_metadata_is_refused() {
    let Some(m) = usable_mirror() else { return };
    let dir = tempfile::tempdir().unwrap();
    let release = m.fetch_release(&m.suite, dir.path()).unwrap();
    let path = format!("main/binary-{}/Packages.xz", m.arch);
    let entry = release
        .entry(&path)
        .expect("Release lists Packages.xz")
        .clone();

    // The real file against a wrong (tampered) expected hash: refused, naming both hashes.
    let mut wrong = entry.sha256.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let rel = format!("dists/{}/{path}", m.suite);
    let e = m
        .fetch_verified(&rel, entry.size, &wrong, "Packages index", &mut |_, _| {})
        .unwrap_err();
    match &e {
        KernelError::HashMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &entry.sha256);
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
    // And a wrong size is refused before the hash is even looked at.
    let e = m
        .fetch_verified(
            &rel,
            entry.size - 1,
            &entry.sha256,
            "Packages index",
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(matches!(e, KernelError::SizeMismatch { .. }), "{e}");

    // A one-byte change to the signed InRelease breaks the signature.
    let signed =
        std::fs::read_to_string(dir.path().join(format!("InRelease-{}", m.suite))).unwrap();
    let tampered = signed.replacen(&entry.sha256, &wrong, 1);
    assert_ne!(tampered, signed);
    let f = dir.path().join("InRelease-tampered");
    std::fs::write(&f, tampered).unwrap();
    let out = dir.path().join("Release-tampered");
    let e = mirror::verify_inrelease(&m.keyring, &f, &out, "tampered").unwrap_err();
    assert!(matches!(e, KernelError::BadSignature { .. }), "{e}");
    assert!(!Path::new(&out).exists());
}
