//! Which kernel modules banger's initramfs must load, and in what order.
//!
//! Debian's kernel packages do not ship `modules.dep` (depmod writes it at install time), so the
//! dependency graph is read from each module's own `.modinfo` section (`depends=`), the same data
//! depmod uses. When a `modules.dep` is present it is used instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::KernelError;
use crate::compress::{self, Compression};

/// Modules the initramfs needs to mount its disks, reach the network and talk vsock to the host.
/// Those built into the kernel are skipped; the rest are loaded with their dependencies.
pub const INITRAMFS_MODULES: [&str; 8] = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "ext4",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// Modules put into the initramfs when the kernel has them, and skipped otherwise: the ACPI
/// power button and its input events. When banger's agent is PID 1 (images without an init
/// system) it watches them, so QEMU's `system_powerdown` stops the VM cleanly instead of
/// timing out; a kernel without them only loses that.
pub const OPTIONAL_INITRAMFS_MODULES: [&str; 2] = ["button", "evdev"];

/// A single module file is never this large; guards decompression.
const MAX_MODULE: u64 = 256 << 20;

/// The kernel's module name for a file: basename without `.ko[.xz|.zst|.gz]`, `-` as `_`.
pub fn module_name_from_path(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base
        .strip_suffix(".xz")
        .or_else(|| base.strip_suffix(".zst"))
        .or_else(|| base.strip_suffix(".gz"))
        .unwrap_or(base);
    let stem = stem.strip_suffix(".ko").unwrap_or(stem);
    normalize(stem)
}

fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// Whether an archive path is a (possibly compressed) kernel module.
pub fn is_module_file(path: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|s| path.ends_with(s))
}

/// The module names listed in `modules.builtin` (one path per line).
pub fn parse_modules_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name_from_path)
        .collect()
}

/// A loadable module: its path below `lib/modules/<version>/` and its direct dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: String,
    pub depends: Vec<String>,
}

/// Parses `modules.dep`: `kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko`.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, ModuleEntry>, KernelError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (path, deps) = line.split_once(':').ok_or_else(|| KernelError::Module {
            module: "modules.dep".into(),
            message: format!("line {}: no ':' in {line:?}", i + 1),
        })?;
        let path = path.trim().to_string();
        out.insert(
            module_name_from_path(&path),
            ModuleEntry {
                depends: deps.split_whitespace().map(module_name_from_path).collect(),
                path,
            },
        );
    }
    Ok(out)
}

/// The `key=value` strings of an ELF module's `.modinfo` section.
pub fn parse_modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, String> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?))
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF object".into());
    }
    let malformed = || "malformed ELF section table".to_string();
    let shoff = usize::try_from(u64_at(0x28).ok_or_else(malformed)?).map_err(|_| malformed())?;
    let shentsize = usize::from(u16_at(0x3a).ok_or_else(malformed)?);
    let shnum = usize::from(u16_at(0x3c).ok_or_else(malformed)?);
    let shstrndx = usize::from(u16_at(0x3e).ok_or_else(malformed)?);
    if shentsize < 64 || shstrndx >= shnum {
        return Err(malformed());
    }
    let section = |idx: usize| -> Option<(u32, &[u8])> {
        let h = shoff.checked_add(idx.checked_mul(shentsize)?)?;
        let name = u32_at(h)?;
        let off = usize::try_from(u64_at(h + 24)?).ok()?;
        let size = usize::try_from(u64_at(h + 32)?).ok()?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx).ok_or_else(malformed)?;
    for idx in 0..shnum {
        let (name_off, data) = section(idx).ok_or_else(malformed)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(data
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = std::str::from_utf8(kv).ok()?;
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err("no .modinfo section".into())
}

/// Module name, dependencies and vermagic from `.modinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    pub vermagic: Option<String>,
}

impl ModInfo {
    pub fn from_elf(elf: &[u8], what: &str) -> Result<ModInfo, KernelError> {
        let fields = parse_modinfo(elf).map_err(|message| KernelError::Module {
            module: what.to_string(),
            message,
        })?;
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        Ok(ModInfo {
            name: get("name").map(|n| normalize(&n)),
            depends: get("depends")
                .unwrap_or_default()
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(normalize)
                .collect(),
            vermagic: get("vermagic"),
        })
    }
}

/// Turns a module file's bytes into a plain `.ko`: the initramfs loads modules with
/// `finit_module` and no decompression flags, so `.ko.xz`/`.ko.zst`/`.ko.gz` are unpacked here.
pub fn decompress_module(path: &str, data: Vec<u8>) -> Result<Vec<u8>, KernelError> {
    let format = path
        .rsplit_once(".ko.")
        .map(|(_, ext)| {
            Compression::from_extension(ext).ok_or_else(|| KernelError::UnsupportedCompression {
                what: path.to_string(),
                format: ext.to_string(),
            })
        })
        .transpose()?;
    let elf = match format {
        Some(f) => compress::decompress(f, &data, MAX_MODULE, path)?,
        None => data,
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err(KernelError::Module {
            module: path.to_string(),
            message: "not an ELF object after decompression".into(),
        });
    }
    Ok(elf)
}

/// All loadable modules of one kernel plus the names built into it.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    pub modules: BTreeMap<String, ModuleEntry>,
    pub builtin: BTreeSet<String>,
}

/// The outcome of [`ModuleIndex::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Modules to load, every one after its dependencies, each once.
    pub load_order: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub built_in: Vec<String>,
}

impl ModuleIndex {
    /// Resolves `wanted` transitively into a load order.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Resolution, KernelError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        let mut marks: HashMap<String, Mark> = HashMap::new();
        let mut res = Resolution {
            load_order: Vec::new(),
            built_in: Vec::new(),
        };
        // Iterative DFS would be longer; dependency chains are a handful deep.
        fn visit(
            idx: &ModuleIndex,
            name: &str,
            stack: &mut Vec<String>,
            marks: &mut HashMap<String, Mark>,
            out: &mut Vec<String>,
        ) -> Result<(), KernelError> {
            match marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    let start = stack.iter().position(|s| s == name).unwrap_or(0);
                    let mut chain = stack[start..].to_vec();
                    chain.push(name.to_string());
                    return Err(KernelError::ModuleCycle { chain });
                }
                None => {}
            }
            if idx.builtin.contains(name) {
                marks.insert(name.to_string(), Mark::Done);
                return Ok(());
            }
            let entry = idx.modules.get(name).ok_or_else(|| KernelError::Module {
                module: name.to_string(),
                message: match stack.last() {
                    Some(parent) => {
                        format!("needed by {parent} but neither built in nor shipped as a module")
                    }
                    None => "neither built in (modules.builtin) nor shipped as a module".into(),
                },
            })?;
            marks.insert(name.to_string(), Mark::Visiting);
            stack.push(name.to_string());
            for dep in &entry.depends {
                visit(idx, dep, stack, marks, out)?;
            }
            stack.pop();
            marks.insert(name.to_string(), Mark::Done);
            out.push(name.to_string());
            Ok(())
        }
        for w in wanted {
            let w = normalize(w);
            if self.builtin.contains(&w) {
                if !res.built_in.contains(&w) {
                    res.built_in.push(w);
                }
                continue;
            }
            visit(self, &w, &mut Vec::new(), &mut marks, &mut res.load_order)?;
        }
        Ok(res)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable object with a `.modinfo` section holding `info`.
    pub(crate) fn fake_module(info: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for kv in info {
            modinfo.extend_from_slice(kv.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[0x12] = 62;
        let modinfo_off = elf.len();
        elf.extend_from_slice(&modinfo);
        let strtab_off = elf.len();
        elf.extend_from_slice(&shstrtab);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, modinfo_off, modinfo.len());
        sh(10, strtab_off, shstrtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            module_name_from_path("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name_from_path("kernel/fs/ext4/ext4.ko.zst"), "ext4");
        assert_eq!(module_name_from_path("overlay.ko.xz"), "overlay");
        assert!(is_module_file("a/b.ko.zst"));
        assert!(!is_module_file("modules.dep"));
    }

    #[test]
    fn builtin_list_is_parsed() {
        let b = parse_modules_builtin(
            "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n\nkernel/lib/crc16.ko\n",
        );
        assert!(b.contains("ext4") && b.contains("jbd2") && b.contains("crc16"));
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn modinfo_is_read_from_elf() {
        let ko = fake_module(&[
            "license=GPL",
            "depends=virtio,virtio_ring",
            "name=virtio_mmio",
            "vermagic=6.1.0-50-cloud-amd64 SMP preempt mod_unload modversions ",
        ]);
        let info = ModInfo::from_elf(&ko, "virtio_mmio.ko").unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_mmio"));
        assert_eq!(info.depends, ["virtio", "virtio_ring"]);
        assert!(info.vermagic.unwrap().starts_with("6.1.0-50-cloud-amd64 "));
        let none = ModInfo::from_elf(&fake_module(&["depends="]), "x.ko").unwrap();
        assert!(none.depends.is_empty());
        assert!(parse_modinfo(b"not elf").is_err());
        let mut truncated = ko.clone();
        truncated.truncate(100);
        assert!(parse_modinfo(&truncated).is_err());
    }

    #[test]
    fn compressed_modules_become_plain_ko() {
        let ko = fake_module(&["name=vsock"]);
        for (ext, format) in [
            ("xz", Compression::Xz),
            ("zst", Compression::Zstd),
            ("gz", Compression::Gzip),
        ] {
            let packed = crate::compress::tests::compress(format, &ko);
            let out = decompress_module(&format!("vsock.ko.{ext}"), packed).unwrap();
            assert_eq!(out, ko, "{ext}");
        }
        assert_eq!(decompress_module("vsock.ko", ko.clone()).unwrap(), ko);
        assert!(decompress_module("vsock.ko", b"garbage".to_vec()).is_err());
        assert!(decompress_module("vsock.ko.lz4", ko).is_err());
    }

    const MODULES_DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/net/vmw_vsock/vsock.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko
";

    fn index(builtin: &[&str]) -> ModuleIndex {
        ModuleIndex {
            modules: parse_modules_dep(MODULES_DEP).unwrap(),
            builtin: builtin.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let r = index(&[])
            .resolve(&[
                "virtio_mmio",
                "virtio_blk",
                "vmw_vsock_virtio_transport",
                "ext4",
                "virtio-rng",
            ])
            .unwrap();
        let pos = |m: &str| {
            r.load_order
                .iter()
                .position(|x| x == m)
                .unwrap_or_else(|| panic!("{m}"))
        };
        assert!(pos("virtio_ring") < pos("virtio_mmio"));
        assert!(pos("virtio") < pos("virtio_mmio"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        assert!(pos("jbd2") < pos("ext4") && pos("crc16") < pos("ext4"));
        assert!(pos("virtio") < pos("virtio_rng"));
        let unique: BTreeSet<_> = r.load_order.iter().collect();
        assert_eq!(unique.len(), r.load_order.len(), "{:?}", r.load_order);
        assert_eq!(r.load_order.len(), 12);
        assert!(r.built_in.is_empty());
    }

    #[test]
    fn builtin_modules_are_skipped_and_reported() {
        let r = index(&["ext4", "jbd2", "mbcache", "crc16", "virtio", "virtio_ring"])
            .resolve(&["ext4", "virtio_blk", "ext4"])
            .unwrap();
        assert_eq!(r.load_order, ["virtio_blk"]);
        assert_eq!(r.built_in, ["ext4"]);
    }

    #[test]
    fn missing_modules_and_cycles_are_errors() {
        let e = index(&[]).resolve(&["overlay"]).unwrap_err();
        assert!(e.to_string().contains("module overlay"), "{e}");
        let mut idx = index(&[]);
        idx.modules
            .get_mut("virtio")
            .unwrap()
            .depends
            .push("nonexistent".into());
        let e = idx.resolve(&["virtio_blk"]).unwrap_err();
        assert!(e.to_string().contains("needed by virtio"), "{e}");
        let mut idx = index(&[]);
        idx.modules
            .get_mut("virtio")
            .unwrap()
            .depends
            .push("virtio_blk".into());
        let e = idx.resolve(&["virtio_blk"]).unwrap_err();
        assert!(matches!(e, KernelError::ModuleCycle { .. }), "{e}");
        assert!(
            e.to_string().contains("virtio_blk -> virtio -> virtio_blk"),
            "{e}"
        );
    }

    #[test]
    fn malformed_modules_dep_is_refused() {
        assert!(parse_modules_dep("kernel/a.ko kernel/b.ko\n").is_err());
    }
}
