use super::*;

const GIB: u64 = 1024 * 1024 * 1024;
const ORIGIN: &str = "/home/dev/.config/banger/config.toml";

fn host(cpus: u32, mem_gib: u64) -> HostInfo {
    HostInfo::new(cpus, mem_gib * GIB, "/home/dev", 1000)
}

fn dev() -> HostInfo {
    host(2, 24)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, &dev(), Path::new(ORIGIN))
}

/// Asserts `text` is rejected and the message names the file and every one of `needles`.
fn rejected(text: &str, needles: &[&str]) -> ConfigError {
    let err = parse(text).expect_err(text);
    let msg = err.to_string();
    assert!(msg.contains(ORIGIN), "file not named in {msg:?}");
    for n in needles {
        assert!(msg.contains(n), "{n:?} not named in {msg:?}");
    }
    err
}

/// `c` as a written file would make it: an effective config written out names its
/// `bridge_cidr`, so reading it back marks that key as set.
fn written(mut c: Config) -> Config {
    c.bridge_cidr_explicit = true;
    c
}

#[test]
fn host_derived_vm_defaults() {
    let d = Config::defaults(&host(2, 24)).vm_defaults;
    assert_eq!((d.vcpu, d.memory_mib), (1, 3072));
    let d = Config::defaults(&host(64, 512)).vm_defaults;
    assert_eq!((d.vcpu, d.memory_mib), (4, 8192));
    let d = Config::defaults(&host(1, 1)).vm_defaults;
    assert_eq!((d.vcpu, d.memory_mib), (1, 512));
    let d = Config::defaults(&host(8, 16)).vm_defaults;
    assert_eq!((d.vcpu, d.memory_mib), (2, 2048));
    assert_eq!(d.work_disk_size, ByteSize::gib(8));
}

#[test]
fn defaults_for_a_user() {
    let c = Config::defaults(&dev());
    assert_eq!(c.state_dir, Path::new("/home/dev/.local/state/banger"));
    assert_eq!(c.runtime_dir, Path::new("/tmp/banger-1000"));
    assert_eq!(c.cache_dir, Path::new("/home/dev/.cache/banger"));
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.vmm, VmmChoice::Auto);
    assert_eq!(c.root_disk, RootDiskStrategy::Overlay);
    assert_eq!(c.bridge_name, "br-banger");
    assert_eq!(c.bridge_cidr.to_string(), "172.30.0.0/24");
    assert_eq!(c.tap_pool_size, 4);
    assert_eq!(c.dns_port, 42069);
    assert_eq!(c.default_image, "debian-bookworm");
    assert_eq!(c.default_kernel, "debian-6.1-cloud");
    assert_eq!(c.stop_timeout(), Duration::from_secs(10));
    assert_eq!(c.firecracker_bin, None);
    assert!(c.file_sync.is_empty());
    // An empty file is all defaults too.
    assert_eq!(parse("").unwrap(), c);
}

#[test]
fn defaults_follow_xdg_and_root() {
    let mut h = dev();
    h.xdg = XdgDirs {
        config_home: Some("/x/config".into()),
        state_home: Some("/x/state".into()),
        cache_home: Some("/x/cache".into()),
        runtime_dir: Some("/run/user/1000".into()),
    };
    let c = Config::defaults(&h);
    assert_eq!(c.state_dir, Path::new("/x/state/banger"));
    assert_eq!(c.cache_dir, Path::new("/x/cache/banger"));
    assert_eq!(c.runtime_dir, Path::new("/run/user/1000/banger"));
    assert_eq!(
        Config::default_path_for(&h),
        Path::new("/x/config/banger/config.toml")
    );
    assert_eq!(
        Config::default_path_for(&dev()),
        Path::new("/home/dev/.config/banger/config.toml")
    );

    let root = HostInfo::new(4, 8 * GIB, "/root", 0);
    let c = Config::defaults(&root);
    assert_eq!(c.state_dir, Path::new("/var/lib/banger"));
    assert_eq!(c.runtime_dir, Path::new("/run/banger"));
    assert_eq!(c.cache_dir, Path::new("/var/cache/banger"));
    let expected = if Path::new(SYSTEM_CONFIG_PATH).is_file() {
        PathBuf::from(SYSTEM_CONFIG_PATH)
    } else {
        PathBuf::from("/root/.config/banger/config.toml")
    };
    assert_eq!(Config::default_path_for(&root), expected);
}

#[test]
fn every_key_is_read() {
    let c = parse(
        r#"
        state_dir = "~/state"
        runtime_dir = "/run/b"
        cache_dir = "/var/tmp/bc"
        log_level = "debug"
        vmm = "qemu"
        firecracker_bin = "/opt/fc/firecracker"
        qemu_bin = "/usr/bin/qemu-system-x86_64"
        jailer_bin = "~/bin/jailer"
        root_disk = "dm-snapshot"
        bridge_name = "br-banger-t1"
        bridge_cidr = "10.20.0.0/16"
        tap_pool_size = 0
        dns_port = 5353
        default_image = "alpine-3.20"
        default_kernel = "custom"
        stop_timeout_secs = 600

        [vm_defaults]
        vcpu = 32
        memory_mib = 128
        work_disk_size = "64M"

        [[file_sync]]
        host = "~/.gitconfig"
        guest = "/root/.gitconfig"

        [[file_sync]]
        host = "/home/dev/.ssh/config"
        guest = "~/.ssh/config"
        mode = "0644"
        "#,
    )
    .unwrap();
    assert_eq!(c.state_dir, Path::new("/home/dev/state"));
    assert_eq!(c.runtime_dir, Path::new("/run/b"));
    assert_eq!(c.cache_dir, Path::new("/var/tmp/bc"));
    assert_eq!(c.log_level, LogLevel::Debug);
    assert_eq!(c.vmm, VmmChoice::Qemu);
    assert_eq!(
        c.firecracker_bin.as_deref(),
        Some(Path::new("/opt/fc/firecracker"))
    );
    assert_eq!(
        c.qemu_bin.as_deref(),
        Some(Path::new("/usr/bin/qemu-system-x86_64"))
    );
    assert_eq!(
        c.jailer_bin.as_deref(),
        Some(Path::new("/home/dev/bin/jailer"))
    );
    assert_eq!(c.root_disk, RootDiskStrategy::DmSnapshot);
    assert_eq!(c.bridge_name, "br-banger-t1");
    assert_eq!(c.bridge_cidr.prefix(), 16);
    assert_eq!(c.tap_pool_size, 0);
    assert_eq!(c.dns_port, 5353);
    assert_eq!(c.default_image, "alpine-3.20");
    assert_eq!(c.default_kernel, "custom");
    assert_eq!(c.stop_timeout_secs, 600);
    assert_eq!(
        c.vm_defaults,
        VmDefaults {
            vcpu: 32,
            memory_mib: 128,
            work_disk_size: ByteSize::mib(64),
            nested: false,
        }
    );
    assert_eq!(
        c.file_sync,
        [
            FileSync {
                host: "/home/dev/.gitconfig".into(),
                guest: "/root/.gitconfig".into(),
                mode: 0o600
            },
            FileSync {
                host: "/home/dev/.ssh/config".into(),
                guest: "~/.ssh/config".into(),
                mode: 0o644
            },
        ]
    );
}

#[test]
fn partial_vm_defaults_keep_host_derived_values() {
    let c = parse("[vm_defaults]\nvcpu = 3\n").unwrap();
    assert_eq!(c.vm_defaults.vcpu, 3);
    assert_eq!(c.vm_defaults.memory_mib, 3072);
    assert!(!c.vm_defaults.nested);
    assert!(
        parse("[vm_defaults]\nnested = true\n")
            .unwrap()
            .vm_defaults
            .nested
    );
}

#[test]
fn unknown_keys_are_named() {
    rejected("bogus_key = 1\n", &["bogus_key"]);
    rejected("[vm_defaults]\nvcpu = 2\ncpus = 4\n", &["cpus"]);
    rejected(
        "[[file_sync]]\nhost = \"~/.x\"\nguest = \"~/.x\"\nowner = \"me\"\n",
        &["owner"],
    );
    rejected("[surprise]\nx = 1\n", &["surprise"]);
}

#[test]
fn syntax_errors_name_the_line() {
    rejected("vmm = \n", &["line 1"]);
}

#[test]
fn bad_values_are_named_with_key_and_value() {
    rejected("vmm = \"kvm\"", &["vmm", "kvm", "auto, firecracker, qemu"]);
    rejected("log_level = \"loud\"", &["log_level", "loud"]);
    rejected("root_disk = \"zfs\"", &["root_disk", "zfs"]);
    rejected(
        "bridge_cidr = \"172.30.0/24\"",
        &["bridge_cidr", "172.30.0/24"],
    );
    rejected("bridge_cidr = \"172.30.0.0/31\"", &["bridge_cidr", "/31"]);
    rejected(
        "bridge_cidr = \"172.30.0.9/24\"",
        &["bridge_cidr", "172.30.0.0/24"],
    );
    rejected("bridge_name = \"eth0\"", &["bridge_name", "eth0"]);
    rejected("bridge_name = \"br-banger-\"", &["bridge_name"]);
    rejected("bridge_name = \"br-banger-Ab\"", &["bridge_name"]);
    // 16 bytes: one past the kernel's interface-name limit.
    rejected(
        "bridge_name = \"br-banger-abcdef\"",
        &["bridge_name", "br-banger-abcdef"],
    );
    assert!(parse("bridge_name = \"br-banger-abcde\"").is_ok());
    rejected("tap_pool_size = 65", &["tap_pool_size", "65"]);
    rejected("tap_pool_size = -1", &["tap_pool_size", "-1"]);
    rejected("dns_port = 0", &["dns_port", "0"]);
    rejected("dns_port = 70000", &["dns_port", "70000"]);
    rejected("stop_timeout_secs = 0", &["stop_timeout_secs"]);
    rejected("stop_timeout_secs = 601", &["stop_timeout_secs", "601"]);
    rejected(
        "state_dir = \"relative/dir\"",
        &["state_dir", "relative/dir"],
    );
    rejected("firecracker_bin = \"firecracker\"", &["firecracker_bin"]);
    rejected("default_image = \"../etc\"", &["default_image", "../etc"]);
    rejected("default_kernel = \"\"", &["default_kernel"]);
    rejected("[vm_defaults]\nvcpu = 0", &["vm_defaults.vcpu", "0"]);
    rejected(
        "[vm_defaults]\nnested = \"yes\"",
        &["vm_defaults.nested", "yes"],
    );
    rejected("[vm_defaults]\nvcpu = 33", &["vm_defaults.vcpu", "33"]);
    rejected(
        "[vm_defaults]\nmemory_mib = 127",
        &["vm_defaults.memory_mib", "127"],
    );
    rejected(
        "[vm_defaults]\nwork_disk_size = \"8X\"",
        &["vm_defaults.work_disk_size", "8X"],
    );
    rejected(
        "[vm_defaults]\nwork_disk_size = \"63M\"",
        &["vm_defaults.work_disk_size", "63M"],
    );
    rejected(
        "[vm_defaults]\nwork_disk_size = 8",
        &["vm_defaults.work_disk_size"],
    );
}

#[test]
fn wrong_types_are_named_with_key_and_value() {
    rejected("vmm = 3", &["vmm", "3", "expected a string"]);
    rejected(
        "[vm_defaults]\nvcpu = \"two\"",
        &["vm_defaults.vcpu", "two", "integer"],
    );
    rejected("dns_port = 53.5", &["dns_port", "53.5"]);
    rejected("log_level = true", &["log_level", "true"]);
}

#[test]
fn bad_values_yield_invalid_with_fields() {
    match parse("vmm = \"kvm\"") {
        Err(ConfigError::Invalid {
            path, key, value, ..
        }) => {
            assert_eq!(path, Path::new(ORIGIN));
            assert_eq!(key, "vmm");
            assert_eq!(value, "\"kvm\"");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn sync_entry(host: &str, guest: &str) -> String {
    format!("[[file_sync]]\nhost = \"{host}\"\nguest = \"{guest}\"\n")
}

#[test]
fn file_sync_paths_are_confined() {
    rejected(
        &sync_entry("/etc/passwd", "/root/passwd"),
        &["file_sync[0].host", "/etc/passwd"],
    );
    rejected(
        &sync_entry("~/../other/.bashrc", "/root/.bashrc"),
        &["file_sync[0].host", ".."],
    );
    rejected(&sync_entry("~", "/root/home"), &["file_sync[0].host"]);
    rejected(
        &sync_entry("/home/devil/x", "/root/x"),
        &["file_sync[0].host", "/home/devil/x"],
    );
    rejected(&sync_entry("relative", "/root/x"), &["file_sync[0].host"]);
    rejected(
        &sync_entry("~/.gitconfig", "/etc/x"),
        &["file_sync[0].guest", "/etc/x"],
    );
    rejected(
        &sync_entry("~/.gitconfig", "/root/../etc/x"),
        &["file_sync[0].guest", ".."],
    );
    rejected(
        &sync_entry("~/.gitconfig", "~/a/../../etc/x"),
        &["file_sync[0].guest"],
    );
    rejected(
        &sync_entry("~/.gitconfig", "/root/"),
        &["file_sync[0].guest"],
    );
    rejected(
        &sync_entry("~/.gitconfig", "/rootkit/x"),
        &["file_sync[0].guest"],
    );
    let two = format!(
        "{}{}",
        sync_entry("~/a", "/root/a"),
        sync_entry("~/b", "../x")
    );
    rejected(&two, &["file_sync[1].guest"]);
    let dup = format!(
        "{}{}",
        sync_entry("~/a", "/root/a"),
        sync_entry("~/b", "~/a")
    );
    rejected(&dup, &["file_sync[1].guest", "already"]);
}

#[test]
fn file_sync_modes() {
    let with_mode = |m: &str| format!("{}mode = \"{m}\"\n", sync_entry("~/a", "~/a"));
    for (m, want) in [
        ("0600", 0o600),
        ("644", 0o644),
        ("0o755", 0o755),
        ("0000", 0),
    ] {
        assert_eq!(parse(&with_mode(m)).unwrap().file_sync[0].mode, want, "{m}");
    }
    for bad in ["4755", "0800", "rw", "", "06000"] {
        rejected(&with_mode(bad), &["file_sync[0].mode"]);
    }
    rejected(
        &format!("{}mode = 384\n", sync_entry("~/a", "~/a")),
        &["file_sync[0].mode", "expected a string"],
    );
}

#[test]
fn load_missing_file_gives_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    assert_eq!(
        Config::load(&path, &dev()).unwrap(),
        Config::defaults(&dev())
    );
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "tap_pool_size = 8\n").unwrap();
    assert_eq!(Config::load(&path, &dev()).unwrap().tap_pool_size, 8);
    std::fs::write(&path, "tap_pool_sise = 8\n").unwrap();
    let msg = Config::load(&path, &dev()).unwrap_err().to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("tap_pool_sise"),
        "{msg}"
    );
    // A directory where the file should be is a read error, not defaults.
    let err = Config::load(dir.path(), &dev()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn effective_config_serializes_back_to_the_same_config() {
    let text = r#"
        vmm = "firecracker"
        firecracker_bin = "/usr/local/bin/firecracker"
        bridge_cidr = "10.9.8.0/28"
        [vm_defaults]
        work_disk_size = "1536M"
        [[file_sync]]
        host = "~/.gitconfig"
        guest = "~/.gitconfig"
        mode = "0640"
    "#;
    let c = parse(text).unwrap();
    let out = toml::to_string(&c).unwrap();
    assert!(out.contains("work_disk_size = \"1536M\""), "{out}");
    assert!(out.contains("mode = \"0640\""), "{out}");
    assert_eq!(parse(&out).unwrap(), c, "{out}");
    // Non-MiB sizes survive too.
    let mut odd = c.clone();
    odd.vm_defaults.work_disk_size = ByteSize(100 * ByteSize::MIB + 1);
    assert_eq!(parse(&toml::to_string(&odd).unwrap()).unwrap(), odd);
    // And JSON for `daemon status`.
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["vmm"], "firecracker");
    assert_eq!(json["bridge_cidr"], "10.9.8.0/28");
    assert_eq!(json["vm_defaults"]["vcpu"], 1);
}

#[test]
fn word_enums_round_trip() {
    for v in VmmChoice::ALL {
        assert_eq!(v.as_str().parse::<VmmChoice>(), Ok(*v));
    }
    for v in RootDiskStrategy::ALL {
        assert_eq!(v.to_string().parse::<RootDiskStrategy>(), Ok(*v));
    }
    for v in LogLevel::ALL {
        assert_eq!(v.as_str().parse::<LogLevel>(), Ok(*v));
    }
    assert_eq!(RootDiskStrategy::DmSnapshot.as_str(), "dm-snapshot");
}

fn catalog_entry(name: &str, url: &str, sha: &str) -> String {
    format!("\n[[kernel_catalog]]\nname = \"{name}\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\n")
}

#[test]
fn kernel_catalog_entries() {
    let sha = "AB".repeat(32);
    let text = format!(
        "{}size = 1234\nversion = \"6.12.8\"\n{}",
        catalog_entry("generic-6.12", "https://example.org/k.tar.zst", &sha),
        catalog_entry("mine", "http://10.0.0.1:8080/k.tar", &"0".repeat(64)),
    );
    let c = parse(&text).unwrap();
    assert_eq!(
        c.kernel_catalog,
        [
            KernelCatalogEntry {
                name: "generic-6.12".into(),
                url: "https://example.org/k.tar.zst".into(),
                sha256: "ab".repeat(32),
                size: Some(1234),
                version: Some("6.12.8".into()),
            },
            KernelCatalogEntry {
                name: "mine".into(),
                url: "http://10.0.0.1:8080/k.tar".into(),
                sha256: "0".repeat(64),
                size: None,
                version: None,
            },
        ]
    );
    assert!(Config::defaults(&dev()).kernel_catalog.is_empty());
    // Serialized config reads back the same, with and without entries.
    let out = toml::to_string(&c).unwrap();
    assert!(out.contains("[[kernel_catalog]]"), "{out}");
    assert_eq!(written(parse(&out).unwrap()), written(c), "{out}");
    let d = Config::defaults(&dev());
    assert_eq!(
        written(parse(&toml::to_string(&d).unwrap()).unwrap()),
        written(d)
    );
}

#[test]
fn kernel_catalog_rejections() {
    let sha = "a".repeat(64);
    let url = "https://example.org/k.tar.gz";
    rejected(
        &catalog_entry("Bad_Name", url, &sha),
        &["kernel_catalog[0].name", "Bad_Name"],
    );
    rejected(
        &catalog_entry("../k", url, &sha),
        &["kernel_catalog[0].name"],
    );
    rejected(
        &catalog_entry("debian-6.1-cloud", url, &sha),
        &["kernel_catalog[0].name", "built-in"],
    );
    rejected(
        &format!(
            "{}{}",
            catalog_entry("k", url, &sha),
            catalog_entry("k", url, &sha)
        ),
        &["kernel_catalog[1].name", "another"],
    );
    for bad in [
        "ftp://example.org/k",
        "file:///k.tar",
        "https://",
        "k.tar",
        "http://a b",
    ] {
        rejected(
            &catalog_entry("k", bad, &sha),
            &["kernel_catalog[0].url", bad],
        );
    }
    for bad in ["abc", &"g".repeat(64), &"a".repeat(65)] {
        rejected(
            &catalog_entry("k", url, bad),
            &["kernel_catalog[0].sha256", "64 hex"],
        );
    }
    rejected(
        &format!("{}size = 0\n", catalog_entry("k", url, &sha)),
        &["kernel_catalog[0].size"],
    );
    rejected(
        &format!("{}size = \"1G\"\n", catalog_entry("k", url, &sha)),
        &["kernel_catalog[0].size", "expected an integer"],
    );
    rejected(
        &format!("{}version = \"6 1\"\n", catalog_entry("k", url, &sha)),
        &["kernel_catalog[0].version"],
    );
    rejected(
        &format!("{}arch = \"arm64\"\n", catalog_entry("k", url, &sha)),
        &["arch"],
    );
    rejected(
        "[[kernel_catalog]]\nname = \"k\"\nurl = \"http://h/k\"\n",
        &["sha256"],
    );
}

#[test]
fn image_catalog_and_registries() {
    let sha = "b".repeat(64);
    let c = parse(&format!(
        "insecure_registries = [\"Registry.lan:5000\", \"10.0.0.2\"]\n\
         image_catalog_url = \"https://example.org/images.json\"\n\
         [[image_catalog]]\nname = \"alpine-dev\"\nurl = \"http://h/a.tar.zst\"\nsha256 = \"{sha}\"\nkernel = \"k1\"\n"
    ))
    .unwrap();
    assert_eq!(c.insecure_registries, ["registry.lan:5000", "10.0.0.2"]);
    assert_eq!(
        c.image_catalog_url.as_deref(),
        Some("https://example.org/images.json")
    );
    assert_eq!(c.image_catalog.len(), 1);
    assert_eq!(c.image_catalog[0].kernel.as_deref(), Some("k1"));
    assert_eq!(
        written(parse(&toml::to_string(&c).unwrap()).unwrap()),
        written(c)
    );

    let entry = |name: &str, url: &str, sha: &str| {
        format!("[[image_catalog]]\nname = \"{name}\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\n")
    };
    rejected(
        &entry("Bad", "http://h/x", &sha),
        &["image_catalog[0]", "Bad"],
    );
    rejected(&entry("x", "ftp://h/x", &sha), &["image_catalog[0]", "url"]);
    rejected(
        &entry("x", "http://h/x", "abc"),
        &["image_catalog[0]", "sha256"],
    );
    rejected(
        &format!("{}size = 3\nextra = 1\n", entry("x", "http://h/x", &sha)),
        &["image_catalog[0]", "extra"],
    );
    rejected(
        &format!(
            "{}{}",
            entry("x", "http://h/x", &sha),
            entry("x", "http://h/y", &sha)
        ),
        &["image_catalog[1]", "another"],
    );
    rejected("image_catalog_url = \"x\"\n", &["image_catalog_url"]);
    rejected(
        "insecure_registries = [\"a b\"]\n",
        &["insecure_registries[0]"],
    );
}

#[test]
fn jailer_identity_keys() {
    let c = parse("jailer_uid = 65534\njailer_gid = 65533\n").unwrap();
    assert_eq!((c.jailer_uid, c.jailer_gid), (Some(65534), Some(65533)));
    let d = parse("").unwrap();
    assert_eq!((d.jailer_uid, d.jailer_gid), (None, None));
    rejected(
        "jailer_uid = 0\njailer_gid = 1\n",
        &["jailer_uid = 0", "between 1"],
    );
    rejected("jailer_uid = 1\njailer_gid = 0\n", &["jailer_gid = 0"]);
    rejected("jailer_uid = 4294967295\njailer_gid = 1\n", &["jailer_uid"]);
    rejected(
        "jailer_uid = \"nobody\"\njailer_gid = 1\n",
        &["jailer_uid", "integer"],
    );
    rejected(
        "jailer_uid = 1000\n",
        &["jailer_uid = 1000", "jailer_gid too"],
    );
    rejected(
        "jailer_gid = 1000\n",
        &["jailer_gid = 1000", "jailer_uid too"],
    );
}

#[test]
fn vmm_timeout_follows_the_boot_timeout_unless_set() {
    let c = parse("").unwrap();
    assert_eq!(c.vmm_timeout_secs, None);
    assert_eq!(c.vmm_timeout(), Duration::from_secs(60));
    let c = parse("boot_timeout_secs = 600").unwrap();
    assert_eq!(c.vmm_timeout(), Duration::from_secs(200));
    // Never below the floor, however short the boot timeout.
    let c = parse("boot_timeout_secs = 6").unwrap();
    assert_eq!(c.vmm_timeout(), Duration::from_secs(10));
    let c = parse("boot_timeout_secs = 6\nvmm_timeout_secs = 2").unwrap();
    assert_eq!(c.vmm_timeout(), Duration::from_secs(2));
    rejected("vmm_timeout_secs = 0", &["vmm_timeout_secs"]);
    rejected("vmm_timeout_secs = 3601", &["vmm_timeout_secs", "3601"]);
    // It survives the effective-config round trip.
    let c = parse("vmm_timeout_secs = 42").unwrap();
    let back = parse(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back.vmm_timeout_secs, Some(42));
}

#[test]
fn an_explicit_bridge_cidr_is_marked() {
    assert!(!parse("").unwrap().bridge_cidr_explicit);
    // Even when it names the default: the user chose it.
    assert!(
        parse("bridge_cidr = \"172.30.0.0/24\"")
            .unwrap()
            .bridge_cidr_explicit
    );
}

#[test]
fn vmm_log_max_size_has_a_default_and_a_floor() {
    assert_eq!(
        parse("").unwrap().vmm_log_max_size,
        Config::DEFAULT_VMM_LOG_MAX
    );
    let c = parse("vmm_log_max_size = \"1M\"\n").unwrap();
    assert_eq!(c.vmm_log_max_size.bytes(), 1024 * 1024);
    assert_eq!(
        parse("vmm_log_max_size = \"64K\"\n")
            .unwrap()
            .vmm_log_max_size,
        Config::MIN_VMM_LOG_MAX
    );
    for bad in ["\"32K\"", "\"lots\"", "4096"] {
        let e = parse(&format!("vmm_log_max_size = {bad}\n")).unwrap_err();
        assert!(e.to_string().contains("vmm_log_max_size"), "{e}");
    }
}

#[test]
fn own_dirs_refuse_root_system_dirs_and_home() {
    for (key, value) in [
        ("state_dir", "/"),
        ("runtime_dir", "/tmp"),
        ("cache_dir", "/var/cache"),
        ("state_dir", "/etc/"),
        ("state_dir", "~"),
        ("runtime_dir", "/usr/local/.."),
    ] {
        let text = format!("{key} = \"{value}\"\n");
        let e = rejected(&text, &[key, value, "banger needs a directory of its own"]);
        assert!(e.to_string().contains(ORIGIN), "{e}");
    }
    let c = parse("state_dir = \"/etc/banger\"\n").unwrap();
    assert_eq!(c.state_dir, Path::new("/etc/banger"));
}
