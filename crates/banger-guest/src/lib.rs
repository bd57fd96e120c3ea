//! banger's guest side, shared by the daemon (which writes it) and `banger-agent` (which reads it
//! as PID 1 inside the VM).
//!
//! - [`config`]: [`GuestConfig`], everything that makes one VM itself (hostname, machine id, disks,
//!   network, ssh identity, extra files, who is PID 1 and who serves ssh), with validation.
//! - [`disk`]: the config disk, a raw read-only block device carrying that config
//!   (`BNGRCFG1`, a little-endian length, JSON, zero padding to 4 KiB).
//! - [`ext4`]: reading an ext4 filesystem's UUID and label from its superblock, so disks are found
//!   by UUID rather than attach order.
//! - [`cpio`] and [`initramfs`]: a `newc` archive writer and the builder of banger's initramfs
//!   (`/init` = the agent, `/dev/console`, kernel modules with their load order).

pub mod base64;
pub mod config;
pub mod cpio;
pub mod disk;
pub mod ext4;
pub mod initramfs;

pub use config::{
    CONFIG_VERSION, ConfigError, DEFAULT_PATH, GuestConfig, GuestFile, InitMode,
    MODULES_LOAD_ORDER, ModulesDisk, NetworkConfig, RootLayout, SshIdentity, SshServer,
    parse_modules_load_order,
};
pub use disk::{CONFIG_DISK_MAGIC, ConfigDiskError, decode, encode, write_config_disk};
pub use ext4::{Ext4Error, Ext4Info, read_ext4_label, read_ext4_uuid};
pub use initramfs::{InitramfsError, InitramfsSummary, build_initramfs};
