//! Human output: tables, `key: value` blocks, relative and absolute times.
//!
//! Everything here is pure (the current time is a parameter) so tests can pin the output.

use banger_core::{ByteSize, ImageRecord, KernelRecord, VmRecord};
use banger_protocol::{DaemonStatus, VmDetails};

/// Left-aligned columns separated by two spaces; no trailing whitespace.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `5s ago`, `3m ago`, `2h ago`, `4d ago`; a time in the future (clock skew) counts as now.
pub fn ago(now: i64, then: i64) -> String {
    let d = now.saturating_sub(then).max(0);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// `2025-03-01 12:00:05 UTC` for Unix seconds.
pub fn utc(ts: i64) -> String {
    let days = ts.div_euclid(86400);
    let secs = ts.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`): avoids a date crate for one line of output.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn when(now: i64, ts: i64) -> String {
    format!("{} ({})", utc(ts), ago(now, ts))
}

fn or_dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

/// `vm ls`.
pub fn vm_table(vms: &[VmRecord], now: i64) -> String {
    if vms.is_empty() {
        return "no VMs (create one with `banger vm create`)\n".into();
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.to_string(),
                vm.state.to_string(),
                vm.image.clone(),
                or_dash(vm.ip.map(|ip| ip.to_string())),
                vm.vcpu.to_string(),
                format!("{}M", vm.memory_mib),
                vm.work_disk_size.to_string(),
                or_dash(vm.vmm.clone()),
                ago(now, vm.created_at),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATE", "IMAGE", "IP", "VCPU", "MEM", "DISK", "VMM", "CREATED",
        ],
        &rows,
    )
}

/// `image ls`.
pub fn image_table(images: &[ImageRecord], now: i64) -> String {
    if images.is_empty() {
        return "no images (register one with `banger image register NAME --rootfs PATH`)\n".into();
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                or_dash(i.kernel.clone()),
                ByteSize(i.size_bytes).to_string(),
                i.source.clone(),
                ago(now, i.created_at),
            ]
        })
        .collect();
    table(&["NAME", "KERNEL", "SIZE", "SOURCE", "CREATED"], &rows)
}

/// `kernel ls`.
pub fn kernel_table(kernels: &[KernelRecord], now: i64) -> String {
    if kernels.is_empty() {
        return "no kernels (import one with `banger kernel import NAME --from DIR`)\n".into();
    }
    let rows: Vec<Vec<String>> = kernels
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.version.clone(),
                if k.initrd.is_some() { "yes" } else { "no" }.to_string(),
                k.source.clone(),
                ago(now, k.created_at),
            ]
        })
        .collect();
    table(&["NAME", "VERSION", "INITRD", "SOURCE", "CREATED"], &rows)
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let pad = width - k.len();
        // Values can quote the guest (last_error): no escapes reach the terminal.
        let v = crate::sanitize::terminal_safe(v);
        out.push_str(&format!("{k}:{} {v}\n", " ".repeat(pad)));
    }
    out
}

/// `vm show`.
pub fn vm_details(d: &VmDetails, now: i64) -> String {
    let vm = &d.vm;
    let mut pairs = vec![
        ("name", vm.name.to_string()),
        ("id", vm.id.to_string()),
        (
            "state",
            match &d.paused {
                Some(why) => format!("{} (paused: {why})", vm.state),
                None => vm.state.to_string(),
            },
        ),
    ];
    if let Some(e) = &vm.last_error {
        pairs.push(("last_error", e.clone()));
    }
    pairs.extend([
        ("image", vm.image.clone()),
        ("kernel", vm.kernel.clone()),
        ("vcpu", vm.vcpu.to_string()),
        ("memory", format!("{} MiB", vm.memory_mib)),
        ("disk", vm.work_disk_size.to_string()),
        ("ip", or_dash(vm.ip.map(|ip| ip.to_string()))),
        ("nat", if vm.nat { "yes" } else { "no" }.to_string()),
        ("nested", if vm.nested { "yes" } else { "no" }.to_string()),
        ("vmm", or_dash(vm.vmm.clone())),
        ("pid", or_dash(d.pid.map(|p| p.to_string()))),
        ("created", when(now, vm.created_at)),
        (
            "started",
            vm.started_at
                .map(|t| when(now, t))
                .unwrap_or_else(|| "-".into()),
        ),
        ("access", or_dash(d.access.clone())),
        ("dir", d.dir.display().to_string()),
        ("log_file", d.log_file.display().to_string()),
    ]);
    key_values(&pairs)
}

/// `image show`.
pub fn image_details(i: &ImageRecord, now: i64) -> String {
    key_values(&[
        ("name", i.name.clone()),
        ("rootfs", i.rootfs.display().to_string()),
        ("kernel", or_dash(i.kernel.clone())),
        ("size", ByteSize(i.size_bytes).to_string()),
        ("source", i.source.clone()),
        ("digest", or_dash(i.meta.digest.clone())),
        ("access", i.meta.access_summary()),
        ("package manager", or_dash(i.meta.package_manager.clone())),
        ("workdir", or_dash(i.meta.workdir.clone())),
        ("env", i.meta.env.join(" ")),
        ("managed", if i.managed { "yes" } else { "no" }.to_string()),
        ("created", when(now, i.created_at)),
    ])
}

/// One line on how an image's VMs are reached.
pub fn image_access(meta: &banger_core::ImageMeta) -> String {
    meta.access_summary()
}

/// `kernel show`.
pub fn kernel_details(k: &KernelRecord, now: i64) -> String {
    key_values(&[
        ("name", k.name.clone()),
        ("version", k.version.clone()),
        ("vmlinux", k.vmlinux.display().to_string()),
        (
            "initrd",
            or_dash(k.initrd.as_ref().map(|p| p.display().to_string())),
        ),
        ("sha256", k.sha256.clone()),
        ("source", k.source.clone()),
        ("created", when(now, k.created_at)),
    ])
}

/// `daemon status`.
pub fn daemon_status(s: &DaemonStatus) -> String {
    let mut pairs = vec![
        ("status", format!("running (pid {})", s.pid)),
        (
            "version",
            format!("{} (protocol {})", s.version, s.protocol),
        ),
        ("uptime", duration(s.uptime_secs)),
        (
            "vms",
            format!("{} ({} running)", s.vms_total, s.vms_running),
        ),
        ("vmm", s.vmm.clone()),
        ("socket", s.socket.display().to_string()),
        ("state_dir", s.state_dir.display().to_string()),
        ("log_file", s.log_file.display().to_string()),
    ];
    if let Some(p) = &s.ssh_config {
        pairs.push(("ssh_config", p.display().to_string()));
    }
    if let Some(dns) = &s.dns {
        let state = match (&dns.listen, &dns.error) {
            (Some(addr), _) => format!("<name>.vm answered on {addr}"),
            (None, Some(e)) => format!("off: {e}"),
            (None, None) => "off".to_string(),
        };
        pairs.push(("dns", state));
        // Only useful while the responder runs.
        if dns.listen.is_some() {
            pairs.push(("dns_setup", dns.recipe.clone()));
        }
    }
    key_values(&pairs)
}

/// `1h 2m 3s`, dropping leading zero units.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// The one-line outcome of create/start/restart:
/// `vm box running (ip 172.30.0.2, 2 vcpu, 1024 MiB) in 0.4s`.
pub fn vm_summary(vm: &VmRecord, elapsed_secs: f64) -> String {
    let ip = vm.ip.map(|ip| format!("ip {ip}, ")).unwrap_or_default();
    format!(
        "vm {} {} ({ip}{} vcpu, {} MiB) in {elapsed_secs:.1}s",
        vm.name, vm.state, vm.vcpu, vm.memory_mib
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::{VmId, VmName, VmState};
    use std::path::PathBuf;

    const NOW: i64 = 1_700_000_000;

    fn vm(name: &str, state: VmState, ip: Option<&str>, created: i64) -> VmRecord {
        VmRecord {
            id: VmId::parse("0123456789ab").unwrap(),
            name: VmName::parse(name).unwrap(),
            state,
            image: "debian-bookworm".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpu: 2,
            memory_mib: 1024,
            work_disk_size: ByteSize::gib(8),
            ip: ip.map(|s| s.parse().unwrap()),
            nat: false,
            vmm: ip.map(|_| "firecracker".into()),
            last_error: None,
            created_at: created,
            updated_at: created,
            started_at: None,
            workspace: None,
            nested: false,
        }
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago(NOW, NOW - 5), "5s ago");
        assert_eq!(ago(NOW, NOW - 59), "59s ago");
        assert_eq!(ago(NOW, NOW - 180), "3m ago");
        assert_eq!(ago(NOW, NOW - 2 * 3600 - 5), "2h ago");
        assert_eq!(ago(NOW, NOW - 4 * 86400), "4d ago");
        assert_eq!(ago(NOW, NOW + 30), "0s ago");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(NOW), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn vm_table_is_aligned_and_stable() {
        let vms = [
            vm("box", VmState::Running, Some("172.30.0.2"), NOW - 5),
            vm(
                "a-much-longer-name",
                VmState::Stopped,
                None,
                NOW - 3 * 86400,
            ),
        ];
        let text = vm_table(&vms, NOW);
        let expected = "\
NAME                STATE    IMAGE            IP          VCPU  MEM    DISK  VMM          CREATED
box                 running  debian-bookworm  172.30.0.2  2     1024M  8G    firecracker  5s ago
a-much-longer-name  stopped  debian-bookworm  -           2     1024M  8G    -            3d ago
";
        assert_eq!(text, expected);
        // Every column starts at the same offset on every line.
        let lines: Vec<&str> = text.lines().collect();
        let col = lines[0].find("CREATED").unwrap();
        assert!(
            lines
                .iter()
                .all(|l| l.len() > col && &l[col - 2..col] == "  ")
        );
    }

    #[test]
    fn empty_lists_give_a_hint() {
        assert!(vm_table(&[], NOW).contains("banger vm create"));
        assert!(image_table(&[], NOW).contains("banger image register"));
        assert!(kernel_table(&[], NOW).contains("banger kernel import"));
    }

    /// A last_error quoting a guest's console (through the VMM's log tail) shows no escapes.
    #[test]
    fn vm_show_strips_escape_sequences_from_guest_text() {
        let mut rec = vm("box", VmState::Error, None, NOW - 60);
        rec.last_error = Some(
            "start: guest_ready: last log lines: \x1b]0;pwned\x07\x1b[2Jpanic\r\n\x1b[31mdone"
                .into(),
        );
        let d = VmDetails {
            vm: rec,
            pid: None,
            dir: PathBuf::from("/state/vms/0123456789ab"),
            log_file: PathBuf::from("/state/vms/0123456789ab/vmm.log"),
            access: None,
            paused: None,
        };
        let text = vm_details(&d, NOW);
        assert!(
            !text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'),
            "{text:?}"
        );
        assert!(text.contains("last log lines: panic\ndone\n"), "{text:?}");
    }

    #[test]
    fn vm_show_includes_error_pid_dir_and_log() {
        let mut rec = vm("box", VmState::Error, Some("172.30.0.9"), NOW - 60);
        rec.last_error = Some("start: vmm_spawn: firecracker exited".into());
        let d = VmDetails {
            vm: rec,
            pid: Some(4242),
            dir: PathBuf::from("/state/vms/0123456789ab"),
            log_file: PathBuf::from("/state/vms/0123456789ab/vmm.log"),
            access: Some("banger's agent serves ssh (no sshd in the image)".into()),
            paused: None,
        };
        let text = vm_details(&d, NOW);
        assert!(
            text.lines()
                .any(|l| l.starts_with("access:") && l.contains("banger's agent serves ssh")),
            "{text}"
        );
        assert!(
            text.contains("last_error: start: vmm_spawn: firecracker exited\n"),
            "{text}"
        );
        assert!(text.contains("pid:        4242\n"), "{text}");
        assert!(
            text.contains("dir:        /state/vms/0123456789ab\n"),
            "{text}"
        );
        assert!(
            text.contains("log_file:   /state/vms/0123456789ab/vmm.log\n"),
            "{text}"
        );
        assert!(
            text.contains("created:    2023-11-14 22:12:20 UTC (1m ago)\n"),
            "{text}"
        );
        // Without an error the key is absent.
        let mut d2 = d.clone();
        d2.vm.last_error = None;
        assert!(!vm_details(&d2, NOW).contains("last_error"));
    }

    #[test]
    fn summary_line() {
        let rec = vm("box", VmState::Running, Some("172.30.0.2"), NOW);
        assert_eq!(
            vm_summary(&rec, 0.42),
            "vm box running (ip 172.30.0.2, 2 vcpu, 1024 MiB) in 0.4s"
        );
        let rec = vm("box", VmState::Created, None, NOW);
        assert_eq!(
            vm_summary(&rec, 0.05),
            "vm box created (2 vcpu, 1024 MiB) in 0.1s"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3725), "1h 2m 5s");
        assert_eq!(duration(90000), "1d 1h 0m");
    }
}
