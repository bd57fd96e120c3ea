//! Real boots: the agent assembles an overlay root from a read-only image, seeds and mounts the
//! work disk, writes the identity, configures the NIC and hands over to the image's init.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use banger_guest::{GuestConfig, GuestFile, NetworkConfig, RootLayout, SshIdentity};

use crate::support::{self, Drive, boot, mkfs, sha256};

const LOWER: &str = "4c0a1b2c-3d4e-4f50-8a6b-7c8d9e0f1a2b";
const UPPER: &str = "5d1b2c3d-4e5f-4061-9b7c-8d9e0f1a2b3c";
const WORK: &str = "6e2c3d4e-5f60-4172-ac8d-9e0f1a2b3c4d";
const MAC: &str = "52:54:00:12:34:56";
const DEADLINE: Duration = Duration::from_secs(240);

const INIT_SCRIPT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
echo "BANGER-TEST-MARKER pid=$$"
echo "HOSTNAME-FILE: $(cat /etc/hostname)"
echo "KERNEL-HOSTNAME: $(hostname)"
echo "ROOT-MOUNT: $(grep ' /root ' /proc/mounts)"
echo "ROOTFS-MOUNT: $(grep ' / ' /proc/mounts)"
ip addr show
echo "ROUTE: $(ip route show | grep default)"
echo "ADDR: $(ip -4 addr show | grep 'inet 10.0.2.15')"
echo "SEEDED: $(cat /root/hello.txt)"
echo "SSH-KEYS: $(ls /etc/ssh | tr '\n' ' ')"
echo "AUTHKEYS: $(cat /root/.ssh/authorized_keys)"
echo "CONFIG-FILE: $(cat /etc/banger-test)"
echo "RESOLV: $(cat /etc/resolv.conf)"
echo "MACHINE-ID: $(cat /etc/machine-id)"
if [ -f /persist ]; then echo "PERSIST: found $(cat /persist)"; else echo first-boot > /persist; echo "PERSIST: new"; fi
if [ -f /root/user-file ]; then echo "WORK-PERSIST: found"; else echo mine > /root/user-file; echo "WORK-PERSIST: new"; fi
sync
echo BANGER-TEST-DONE
poweroff -f
"#;

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "grep", "hostname", "ip", "ls", "poweroff", "sync", "tr",
];

fn config() -> GuestConfig {
    GuestConfig {
        v: 1,
        hostname: "bangertest".into(),
        machine_id: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
        root: RootLayout::Overlay {
            lower_uuid: LOWER.into(),
            upper_uuid: UPPER.into(),
        },
        work_uuid: Some(WORK.into()),
        network: Some(NetworkConfig {
            mac: MAC.into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.2.2".parse().unwrap(),
            dns: vec!["10.0.2.3".parse().unwrap()],
        }),
        ssh: Some(SshIdentity {
            host_key_ed25519:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
            host_key_ed25519_pub: "ssh-ed25519 AAAAC3NzaTEST bangertest".into(),
            authorized_keys: vec!["ssh-ed25519 AAAAC3NzaUSER user@host".into()],
        }),
        files: vec![GuestFile::new(
            "/etc/banger-test",
            0o644,
            b"file-from-config\n",
        )],
        init: None,
        init_mode: Default::default(),
        ssh_server: Default::default(),
        env: vec![],
        workdir: None,
        modules: None,
    }
}

/// A tiny image: static busybox, an /sbin/init script, a /root to seed from, and a shared host
/// key and a resolv.conf symlink the agent must replace.
fn make_image(p: &support::Prereqs, dir: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin", "sbin", "etc/ssh", "root", "proc", "sys", "dev", "run", "tmp",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&p.busybox, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("sbin/init"), INIT_SCRIPT).unwrap();
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("root/hello.txt"), "hello-from-image\n").unwrap();
    std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(root.join("etc/ssh/ssh_host_rsa_key"), "shared image key\n").unwrap();
    std::fs::write(root.join("etc/hostname"), "image\n").unwrap();
    std::os::unix::fs::symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
    let img = dir.join("lower.ext4");
    mkfs(p, &img, 64 << 20, LOWER, Some(&root));
    img
}

#[test]
fn boots_overlay_root_with_identity_network_and_work_disk() {
    let p = match support::prereqs() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let initrd = d.join("initrd.cpio");
    let summary = banger_guest::build_initramfs(&p.agent, Some(&p.modules), &initrd).unwrap();
    eprintln!(
        "initramfs: {} bytes, modules {:?}",
        summary.bytes, summary.load_order
    );

    let lower = make_image(&p, d);
    let upper = d.join("upper.ext4");
    let work = d.join("work.ext4");
    mkfs(&p, &upper, 256 << 20, UPPER, None);
    mkfs(&p, &work, 256 << 20, WORK, None);
    let cfg_disk = d.join("config.img");
    banger_guest::write_config_disk(&cfg_disk, &config()).unwrap();
    let lower_sha = sha256(&lower);

    // The config disk is not first: the agent must find every disk by content.
    let drives = [
        Drive {
            path: &lower,
            read_only: true,
        },
        Drive {
            path: &cfg_disk,
            read_only: true,
        },
        Drive {
            path: &upper,
            read_only: false,
        },
        Drive {
            path: &work,
            read_only: false,
        },
    ];

    let first = boot(&p, &initrd, &drives, MAC, DEADLINE);
    let text = first.text();
    assert!(!text.contains("FATAL"), "agent failed:\n{text}");
    let (t_marker, marker) = first
        .find("BANGER-TEST-MARKER")
        .unwrap_or_else(|| panic!("no marker:\n{text}"));
    eprintln!(
        "BOOT TIME: QEMU start to init marker {:.2} s",
        t_marker.as_secs_f64()
    );
    assert_eq!(
        marker.trim(),
        "BANGER-TEST-MARKER pid=1",
        "the image's init must run as PID 1"
    );
    assert!(first.find("BANGER-TEST-DONE").is_some(), "{text}");
    assert!(first.exited, "QEMU should exit on the guest's poweroff");
    assert_eq!(first.value("HOSTNAME-FILE:"), Some("bangertest"));
    assert_eq!(first.value("KERNEL-HOSTNAME:"), Some("bangertest"));
    let root_mount = first.value("ROOT-MOUNT:").unwrap();
    assert!(
        root_mount.starts_with("/dev/vd") && root_mount.contains(" /root ext4 rw"),
        "{root_mount}"
    );
    assert!(
        first
            .value("ROOTFS-MOUNT:")
            .unwrap()
            .starts_with("overlay / overlay"),
        "{text}"
    );
    assert!(
        first.value("ADDR:").unwrap().contains("10.0.2.15/24"),
        "{text}"
    );
    assert!(
        first
            .value("ROUTE:")
            .unwrap()
            .contains("default via 10.0.2.2"),
        "{text}"
    );
    assert_eq!(first.value("SEEDED:"), Some("hello-from-image"));
    assert_eq!(
        first
            .value("SSH-KEYS:")
            .map(|s| s.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"])
    );
    assert_eq!(
        first.value("AUTHKEYS:"),
        Some("ssh-ed25519 AAAAC3NzaUSER user@host")
    );
    assert_eq!(first.value("CONFIG-FILE:"), Some("file-from-config"));
    assert_eq!(first.value("RESOLV:"), Some("nameserver 10.0.2.3"));
    assert_eq!(
        first.value("MACHINE-ID:"),
        Some("a1b2c3d4e5f60718293a4b5c6d7e8f90")
    );
    assert_eq!(first.value("PERSIST:"), Some("new"));
    assert_eq!(first.value("WORK-PERSIST:"), Some("new"));
    assert!(
        first.find("seeded from the image's /root").is_some(),
        "{text}"
    );

    // Second boot from the same disks: root changes and the work disk persist, and the work disk
    // is not seeded again.
    let second = boot(&p, &initrd, &drives, MAC, DEADLINE);
    let text2 = second.text();
    assert!(
        !text2.contains("FATAL"),
        "agent failed on second boot:\n{text2}"
    );
    assert_eq!(
        second.value("PERSIST:"),
        Some("found first-boot"),
        "{text2}"
    );
    assert_eq!(second.value("WORK-PERSIST:"), Some("found"), "{text2}");
    assert!(
        second.find("seeded from the image's /root").is_none(),
        "{text2}"
    );
    assert!(second.find("mount work disk").is_some(), "{text2}");

    assert_eq!(
        sha256(&lower),
        lower_sha,
        "the shared image must never be written"
    );
}

#[test]
fn missing_disk_is_fatal_and_powers_off() {
    let p = match support::prereqs() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let initrd = d.join("initrd.cpio");
    banger_guest::build_initramfs(&p.agent, Some(&p.modules), &initrd).unwrap();
    // The config names a work disk that is not attached.
    let mut cfg = config();
    cfg.root = RootLayout::Direct { uuid: UPPER.into() };
    let root = d.join("root.ext4");
    mkfs(&p, &root, 64 << 20, UPPER, None);
    let cfg_disk = d.join("config.img");
    banger_guest::write_config_disk(&cfg_disk, &cfg).unwrap();
    let drives = [
        Drive {
            path: &cfg_disk,
            read_only: true,
        },
        Drive {
            path: &root,
            read_only: false,
        },
    ];
    let log = boot(&p, &initrd, &drives, MAC, DEADLINE);
    let text = log.text();
    let (_, fatal) = log
        .find("banger-agent: FATAL:")
        .unwrap_or_else(|| panic!("no FATAL line:\n{text}"));
    assert!(
        fatal.contains("find disks") && fatal.contains("work disk") && fatal.contains(WORK),
        "{fatal}"
    );
    assert!(
        log.exited,
        "the agent must power the VM off after a fatal error"
    );
}
