//! Static IPv4 network configuration with ioctls, before the image's init runs, plus a
//! systemd-networkd unit with the same settings so a networkd guest keeps them.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use banger_guest::NetworkConfig;

use crate::error::AgentError;

pub const NETWORKD_UNIT: &str = "/etc/systemd/network/10-banger.network";

/// The systemd-networkd unit matching the interface by MAC.
pub fn networkd_unit(net: &NetworkConfig) -> String {
    let mut s = format!(
        "# Written by banger-agent at every boot.\n[Match]\nMACAddress={}\n\n[Network]\nAddress={}/{}\nGateway={}\n",
        net.mac.to_ascii_lowercase(),
        net.address,
        net.prefix_len,
        net.gateway
    );
    for d in &net.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    // Keep what the agent set up if networkd restarts.
    s.push_str("KeepConfiguration=static\n");
    s
}

/// The interface (under `sys_class_net`) whose MAC is `mac`, else `eth0` if present.
pub fn find_interface(sys_class_net: &Path, mac: &str) -> Option<String> {
    let want = mac.to_ascii_lowercase();
    let mut fallback = None;
    for e in std::fs::read_dir(sys_class_net).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().to_ascii_lowercase() == want {
            return Some(name);
        }
        if name == "eth0" {
            fallback = Some(name);
        }
    }
    fallback
}

fn ifreq(name: &str) -> Result<libc::ifreq, AgentError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(AgentError::Network(format!("bad interface name {name:?}")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in
    // because sa_family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `struct rtentry` from <linux/route.h>, which the libc crate does not define for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

struct Sock(OwnedFd);

impl Sock {
    fn new() -> Result<Self, AgentError> {
        // SAFETY: plain socket(2) call; the fd is checked and then owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(AgentError::Network(format!(
                "opening an AF_INET socket: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        Ok(Sock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), AgentError> {
        // SAFETY: `arg` is the structure type this request expects, valid for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req, arg as *mut T) };
        if rc < 0 {
            return Err(AgentError::Network(format!(
                "{what}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn up(&self, ifname: &str) -> Result<(), AgentError> {
        let mut req = ifreq(ifname)?;
        self.ioctl(
            libc::SIOCGIFFLAGS,
            &mut req,
            &format!("reading flags of {ifname}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(
            libc::SIOCSIFFLAGS,
            &mut req,
            &format!("bringing {ifname} up"),
        )
    }
}

/// Brings `lo` up: with the agent as PID 1 nothing else would (and without a network config,
/// [`configure`] does not run).
pub fn loopback_up() -> Result<(), AgentError> {
    Sock::new()?.up("lo")
}

/// Waits for the interface, assigns the address, brings it and `lo` up and adds the default
/// route. Returns a one-line summary.
pub fn configure(
    net: &NetworkConfig,
    sys_class_net: &Path,
    timeout: Duration,
) -> Result<String, AgentError> {
    let start = Instant::now();
    let ifname = loop {
        // Prefer the MAC match; settle for eth0 only once the wait is over.
        let expired = start.elapsed() >= timeout;
        match find_interface(sys_class_net, &net.mac) {
            Some(n) if expired || is_mac(sys_class_net, &n, &net.mac) => break n,
            None if expired => {
                return Err(AgentError::Network(format!(
                    "no interface with MAC {} and no eth0 after {} s",
                    net.mac,
                    timeout.as_secs()
                )));
            }
            _ => std::thread::sleep(Duration::from_millis(25)),
        }
    };
    let sock = Sock::new()?;
    sock.up("lo")?;
    let mut req = ifreq(&ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    sock.ioctl(
        libc::SIOCSIFADDR,
        &mut req,
        &format!("setting address {} on {ifname}", net.address),
    )?;
    let mut req = ifreq(&ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr(net.netmask());
    sock.ioctl(
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("setting netmask {} on {ifname}", net.netmask()),
    )?;
    sock.up(&ifname)?;

    let dev =
        CString::new(ifname.clone()).map_err(|_| AgentError::Network("interface name".into()))?;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(net.gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr().cast_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    match sock.ioctl(
        libc::SIOCADDRT,
        &mut rt,
        &format!("adding default route via {}", net.gateway),
    ) {
        // A route left from an earlier configuration is the one we want.
        Err(AgentError::Network(m)) if m.ends_with("File exists (os error 17)") => {}
        other => other?,
    }
    Ok(format!(
        "{ifname} {}/{} via {}",
        net.address, net.prefix_len, net.gateway
    ))
}

fn is_mac(sys_class_net: &Path, ifname: &str, mac: &str) -> bool {
    std::fs::read_to_string(sys_class_net.join(ifname).join("address"))
        .is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_net(ifaces: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, mac) in ifaces {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        d
    }

    #[test]
    fn finds_interface_by_mac_then_eth0() {
        let d = fake_net(&[
            ("lo", "00:00:00:00:00:00"),
            ("eth0", "52:54:00:12:34:56"),
            ("eth1", "06:00:0a:00:02:0f"),
        ]);
        assert_eq!(
            find_interface(d.path(), "06:00:0A:00:02:0F").as_deref(),
            Some("eth1")
        );
        assert_eq!(
            find_interface(d.path(), "06:00:00:00:00:01").as_deref(),
            Some("eth0")
        );
        let d = fake_net(&[("lo", "00:00:00:00:00:00")]);
        assert_eq!(find_interface(d.path(), "06:00:00:00:00:01"), None);
    }

    #[test]
    fn missing_interface_is_an_error_after_the_timeout() {
        let d = fake_net(&[("lo", "00:00:00:00:00:00")]);
        let net = crate::disks::tests::config().network.unwrap();
        let e = configure(&net, d.path(), Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(e.contains("06:00:0a:00:02:0f"), "{e}");
    }

    #[test]
    fn networkd_unit_matches_config() {
        let net = crate::disks::tests::config().network.unwrap();
        let unit = networkd_unit(&net);
        assert!(
            unit.contains("[Match]\nMACAddress=06:00:0a:00:02:0f\n"),
            "{unit}"
        );
        assert!(
            unit.contains("Address=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n"),
            "{unit}"
        );
    }

    #[test]
    fn rtentry_layout_matches_the_kernel() {
        // struct rtentry is 120 bytes on x86_64 (with rt_mtu as the kernel names rt_pad).
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family as i32, libc::AF_INET);
        assert_eq!(
            &sa.sa_data[2..6],
            &[10, 0, 2, 15].map(|b: u8| b as libc::c_char)
        );
    }

    #[test]
    fn ifreq_rejects_bad_names() {
        assert!(ifreq("").is_err());
        assert!(ifreq("averyveryverylongname").is_err());
        let r = ifreq("eth0").unwrap();
        assert_eq!(
            r.ifr_name[..5],
            [b'e', b't', b'h', b'0', 0].map(|b| b as libc::c_char)
        );
    }
}
