//! The host's TSC frequency, for TCG guests' `tsc_early_khz`.
//!
//! Under TCG, QEMU's guest TSC reads the host's TSC, so it ticks at the host's frequency. The
//! guest kernel is told that frequency (`tsc_early_khz`) instead of calibrating against emulated
//! timers (unreliable under TCG); a wrong value makes every guest clock run fast or slow by the
//! ratio (a fixed 2 GHz on a 2.6 GHz host: 1.3x fast).
//!
//! Where the frequency comes from, first found and confirmed wins:
//! 1. `/sys/devices/system/cpu/cpu0/tsc_freq_khz` (some kernels export it);
//! 2. the hypervisor's timing leaf, CPUID `0x40000010` EAX (kHz; KVM and VMware, when the host
//!    is itself a guest, as CI machines are);
//! 3. CPUID leaf `0x15` (TSC / crystal ratio times the crystal frequency; Intel);
//! 4. `/proc/cpuinfo`'s `cpu MHz`, which is the TSC frequency only on a host without frequency
//!    scaling (a VM) — hence the check below.
//!
//! Every candidate is checked against a measurement (TSC ticks over ~100 ms of
//! `CLOCK_MONOTONIC_RAW`, the best of several tries so a preemption does not spoil it) and used
//! only when within 2 % of it; otherwise the measurement itself is used, rounded to 1 MHz. The
//! kernel log's "tsc: Refined TSC clocksource calibration" would be best but is not readable
//! unprivileged. The result is computed once per process.

use std::sync::OnceLock;
use std::time::Duration;

/// The fallback when nothing can be found or measured (a non-x86 build).
pub const FALLBACK_KHZ: u32 = 2_000_000;

/// How far a reported frequency may be from the measured one and still be trusted.
const TOLERANCE: f64 = 0.02;

/// A TSC frequency and where it came from (for logs and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TscFreq {
    pub khz: u32,
    pub source: String,
}

/// This host's TSC frequency, found once (see the module docs).
pub fn host_tsc() -> &'static TscFreq {
    static FREQ: OnceLock<TscFreq> = OnceLock::new();
    FREQ.get_or_init(|| {
        let candidates = [
            ("sysfs tsc_freq_khz", sysfs_khz()),
            ("CPUID 0x40000010", hypervisor_leaf_khz()),
            ("CPUID 0x15", crystal_leaf_khz()),
            (
                "/proc/cpuinfo cpu MHz",
                std::fs::read_to_string("/proc/cpuinfo")
                    .ok()
                    .and_then(|t| cpuinfo_khz(&t)),
            ),
        ];
        let freq = choose(&candidates, measure_khz());
        tracing::info!(khz = freq.khz, source = %freq.source, "host TSC frequency");
        freq
    })
}

/// The first candidate within [`TOLERANCE`] of `measured`, else `measured` (to 1 MHz), else the
/// first candidate, else [`FALLBACK_KHZ`].
pub fn choose(candidates: &[(&str, Option<u32>)], measured: Option<u32>) -> TscFreq {
    let found = candidates
        .iter()
        .filter_map(|(name, khz)| khz.filter(|k| *k > 0).map(|k| (*name, k)));
    match measured {
        Some(m) => {
            for (name, khz) in found {
                if (f64::from(khz) - f64::from(m)).abs() <= f64::from(m) * TOLERANCE {
                    return TscFreq {
                        khz,
                        source: format!("{name}, confirmed by measurement ({m} kHz)"),
                    };
                }
            }
            TscFreq {
                khz: m.saturating_add(500) / 1000 * 1000,
                source: format!("measured ({m} kHz); no reported frequency agreed"),
            }
        }
        None => match found.into_iter().next() {
            Some((name, khz)) => TscFreq {
                khz,
                source: format!("{name} (not confirmed: the TSC could not be measured)"),
            },
            None => TscFreq {
                khz: FALLBACK_KHZ,
                source: "fallback: nothing reported or measured".into(),
            },
        },
    }
}

fn sysfs_khz() -> Option<u32> {
    std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `cpu MHz` of the first processor, in kHz.
pub fn cpuinfo_khz(cpuinfo: &str) -> Option<u32> {
    let line = cpuinfo
        .lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == "cpu MHz"))?;
    let mhz: f64 = line.split_once(':')?.1.trim().parse().ok()?;
    (mhz > 0.0 && mhz < 100_000.0).then(|| (mhz * 1000.0).round() as u32)
}

#[cfg(target_arch = "x86_64")]
fn cpuid(leaf: u32) -> std::arch::x86_64::CpuidResult {
    std::arch::x86_64::__cpuid(leaf)
}

#[cfg(target_arch = "x86_64")]
fn hypervisor_leaf_khz() -> Option<u32> {
    // CPUID.1:ECX bit 31: running under a hypervisor.
    if cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    if cpuid(0x4000_0000).eax < 0x4000_0010 {
        return None;
    }
    Some(cpuid(0x4000_0010).eax).filter(|k| *k > 0)
}

#[cfg(target_arch = "x86_64")]
fn crystal_leaf_khz() -> Option<u32> {
    if cpuid(0).eax < 0x15 {
        return None;
    }
    let r = cpuid(0x15);
    let (denominator, numerator, crystal_hz) = (r.eax, r.ebx, r.ecx);
    if denominator == 0 || numerator == 0 || crystal_hz == 0 {
        return None;
    }
    u32::try_from(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000).ok()
}

#[cfg(target_arch = "x86_64")]
fn measure_khz() -> Option<u32> {
    fn raw_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }
    /// A (tsc, ns) pair read close together: the tightest of a few tries.
    fn pair() -> (u64, u64) {
        (0..5)
            .map(|_| {
                // SAFETY: RDTSC only reads the time-stamp counter.
                let a = unsafe { std::arch::x86_64::_rdtsc() };
                let ns = raw_ns();
                // SAFETY: as above.
                let b = unsafe { std::arch::x86_64::_rdtsc() };
                (b.saturating_sub(a), a / 2 + b / 2, ns)
            })
            .min_by_key(|(gap, _, _)| *gap)
            .map(|(_, tsc, ns)| (tsc, ns))
            .unwrap_or((0, 0))
    }
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (t0, n0) = pair();
        std::thread::sleep(Duration::from_millis(40));
        let (t1, n1) = pair();
        if n1 > n0 && t1 > t0 {
            rates.push((t1 - t0) as f64 * 1e6 / (n1 - n0) as f64);
        }
    }
    // The median of three ignores one disturbed interval.
    rates.sort_by(f64::total_cmp);
    let khz = *rates.get(rates.len() / 2)?;
    (khz > 1.0 && khz < 1e8).then(|| khz.round() as u32)
}

#[cfg(not(target_arch = "x86_64"))]
fn hypervisor_leaf_khz() -> Option<u32> {
    None
}
#[cfg(not(target_arch = "x86_64"))]
fn crystal_leaf_khz() -> Option<u32> {
    None
}
#[cfg(not(target_arch = "x86_64"))]
fn measure_khz() -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_frequency_is_used_only_when_the_measurement_agrees() {
        let f = choose(
            &[("a", None), ("b", Some(2_596_146)), ("c", Some(2_000_000))],
            Some(2_597_000),
        );
        assert_eq!(f.khz, 2_596_146);
        assert!(f.source.starts_with("b"), "{}", f.source);
        // A frequency-scaled `cpu MHz` far from the TSC's is ignored for the measurement.
        let f = choose(&[("cpuinfo", Some(1_200_000))], Some(2_599_700));
        assert_eq!(f.khz, 2_600_000);
        assert!(f.source.contains("measured"), "{}", f.source);
        let f = choose(&[("cpuinfo", Some(1_800_000))], None);
        assert_eq!(f.khz, 1_800_000);
        assert_eq!(choose(&[], None).khz, FALLBACK_KHZ);
    }

    #[test]
    fn cpuinfo_mhz_is_read_in_khz() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.146\nflags\t: tsc\n\
                    processor\t: 1\ncpu MHz\t\t: 1000.000\n";
        assert_eq!(cpuinfo_khz(text), Some(2_596_146));
        assert_eq!(cpuinfo_khz("flags: tsc\n"), None);
        assert_eq!(cpuinfo_khz("cpu MHz : fast\n"), None);
    }

    /// On this host: a plausible frequency that agrees with the kernel's own timekeeping.
    #[test]
    fn the_host_frequency_is_plausible() {
        let f = host_tsc();
        assert!((100_000..20_000_000).contains(&f.khz), "{f:?}");
        if let Some(m) = measure_khz() {
            let diff = (f64::from(f.khz) - f64::from(m)).abs() / f64::from(m);
            assert!(diff < 0.03, "{f:?} vs measured {m} kHz");
        }
        println!("host TSC: {f:?}");
    }
}
