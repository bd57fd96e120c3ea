//! The command line, as clap derive types, and the value parsers that check input before any
//! daemon contact.

use std::path::PathBuf;

use banger_core::{ByteSize, VmName, validate_artifact_name};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version,
    about = "One-command dev sandboxes on Firecracker microVMs",
    propagate_version = true
)]
pub struct Cli {
    /// Config file; passed on to bangerd when banger starts it.
    #[arg(long, env = "BANGER_CONFIG", global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, run and inspect sandbox VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Root filesystem images VMs are built on.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Kernels VMs boot.
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// The bangerd background daemon.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Check this host and banger's state, read-only: one PASS, WARN or FAIL line per check;
    /// exits 1 if any check fails. Does not start bangerd.
    Doctor,
    /// banger as system services: a root helper and an unprivileged daemon (systemd units).
    #[command(subcommand)]
    System(SystemCmd),
    /// Print banger's ssh config (a `Host <name>.vm` block per VM), or include it from
    /// ~/.ssh/config so plain `ssh NAME.vm` works.
    SshConfig {
        /// Add a marked `Include` block at the top of ~/.ssh/config (once).
        #[arg(long, conflicts_with = "uninstall")]
        install: bool,
        /// Remove exactly that block again; nothing else in the file changes.
        #[arg(long)]
        uninstall: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SystemCmd {
    /// Install the units (banger-helper as root, bangerd as OWNER with no capabilities), the
    /// config in /etc/banger and the state in /var/lib/banger; start them where systemd runs.
    Install {
        /// The user bangerd runs as and who may use it.
        #[arg(long, value_name = "USER")]
        owner: String,
        /// Install under this directory instead of / (packaging and tests).
        #[arg(long, hide = true, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Stop and remove the units, and banger's bridge, nftables table and taps.
    Uninstall {
        /// Also delete the config, state (images, kernels, VMs) and cache.
        #[arg(long)]
        purge: bool,
        #[arg(long, hide = true, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Whether banger is installed, its units' states, and whether the sockets answer.
    Status {
        #[arg(long, hide = true, value_name = "DIR")]
        root: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Boot a fresh sandbox and open a shell in it, or run a command there and exit with its
    /// status: `banger vm run -- make test`.
    Run(RunArgs),
    /// Open a shell in a running VM, or run a command: `banger vm ssh box -- uname -a`.
    Ssh {
        name: VmName,
        /// Allocate a terminal even when running a command.
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Run a command in a running VM and exit with its status. It runs in the VM's workspace
    /// (see `vm workspace`) when there is one, in root's home otherwise.
    Exec {
        name: VmName,
        /// Allocate a terminal (for interactive programs).
        #[arg(short = 't', long)]
        tty: bool,
        /// Sync the workspace from the host repository first.
        #[arg(long)]
        sync: bool,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Copy a git repository into a VM, keep it in sync, get the guest's work back.
    #[command(subcommand)]
    Workspace(WorkspaceCmd),
    /// Copy files or directories between the host and a VM: `vm cp box:/root/out ./out`,
    /// `vm cp ./data box:/root/`.
    Cp {
        /// `NAME:PATH` in the guest, or a host path.
        #[arg(value_name = "SRC")]
        src: String,
        /// `NAME:PATH` in the guest, or a host path (exactly one side is a guest).
        #[arg(value_name = "DEST")]
        dest: String,
    },
    /// Create a VM and (unless --no-start) boot it.
    Create(CreateArgs),
    /// Boot a stopped VM.
    Start { name: VmName },
    /// Shut a VM down gracefully, killing it after the timeout.
    Stop(StopArgs),
    /// Stop then start a VM.
    Restart(StopArgs),
    /// Send a signal to a VM's VMM process (KILL by default).
    Kill {
        name: VmName,
        /// KILL, TERM, INT, HUP or QUIT.
        #[arg(long, short = 's')]
        signal: Option<String>,
    },
    /// Delete VMs and their disks.
    #[command(visible_alias = "delete")]
    Rm {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<VmName>,
        /// Delete running VMs too (they are stopped first).
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Delete every VM that is not running.
    Prune {
        /// Do not ask for confirmation.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// List VMs.
    #[command(visible_aliases = ["list", "ps"])]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM in detail.
    Show {
        name: VmName,
        #[arg(long)]
        json: bool,
    },
    /// Change a stopped VM's vcpu count or memory.
    Set {
        name: VmName,
        #[arg(long, value_parser = parse_vcpu, allow_negative_numbers = true, value_name = "N")]
        vcpu: Option<u32>,
        /// Memory: 2G, 512M, or a bare number of MiB.
        #[arg(long, value_parser = parse_memory_mib, allow_hyphen_values = true, value_name = "SIZE")]
        memory: Option<u32>,
    },
    /// Print a VM's VMM log.
    Logs {
        name: VmName,
        /// Only the last LINES lines.
        #[arg(short = 'n', long = "lines", value_name = "LINES")]
        lines: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCmd {
    /// Copy the repository at PATH into a running VM (shallow history, then the working tree).
    Prepare {
        name: VmName,
        #[arg(value_parser = parse_existing_dir, value_name = "PATH")]
        path: PathBuf,
        #[command(flatten)]
        flags: WorkspaceFlags,
        /// Replace the guest directory if it already exists.
        #[arg(long)]
        force: bool,
    },
    /// Send the files changed on the host since the last prepare or sync.
    Sync { name: VmName },
    /// Print a binary patch (for `git apply`) of everything changed in the guest since the
    /// base commit: its commits and its uncommitted work.
    Export {
        name: VmName,
        /// The commit to diff against (default: the one the workspace was prepared at).
        #[arg(long, value_name = "SHA")]
        base_commit: Option<String>,
        /// Write the patch to FILE instead of stdout.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// What a workspace copies and where.
#[derive(Debug, Clone, Args)]
pub struct WorkspaceFlags {
    /// Also copy untracked files that git does not ignore (ignored files are never copied).
    #[arg(long)]
    pub include_untracked: bool,
    /// Copy submodules' files (as plain files) instead of refusing the repository.
    #[arg(long)]
    pub submodules: bool,
    /// Where the repository goes in the guest (default: /root/<repo-name>).
    #[arg(long, value_name = "P")]
    pub guest_path: Option<String>,
    /// Start a new branch in the guest.
    #[arg(long, value_name = "B")]
    pub branch: Option<String>,
    /// Where the new branch starts (a host commit or ref); the guest checks it out.
    #[arg(long, value_name = "REF", requires = "branch")]
    pub from: Option<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub spec: VmSpecArgs,
    /// Create the VM without booting it.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: VmSpecArgs,
    /// Delete the VM when the shell or command ends.
    #[arg(long, conflicts_with = "detach")]
    pub rm: bool,
    /// Boot the VM and return without connecting to it.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// A git repository to copy into the VM (to /root/<repo-name>); the shell or command
    /// then starts there.
    #[arg(value_parser = parse_existing_dir, value_name = "PATH")]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub workspace: WorkspaceFlags,
    /// List the files PATH would copy, and exit without creating a VM.
    #[arg(long, requires = "path")]
    pub dry_run: bool,
    /// The command to run in the VM (after `--`); an interactive shell when absent.
    #[arg(last = true, value_name = "CMD", conflicts_with = "detach")]
    pub command: Vec<String>,
}

/// What a new VM looks like: the flags `vm create` and `vm run` share.
#[derive(Debug, Args)]
pub struct VmSpecArgs {
    /// A DNS label; generated when absent.
    #[arg(long)]
    pub name: Option<VmName>,
    /// Image to build the root disk on: a name, or an OCI reference / catalog name pulled
    /// when missing (daemon default when absent).
    #[arg(long, value_parser = parse_image_ref)]
    pub image: Option<String>,
    /// Kernel to boot (the image's or the daemon default when absent).
    #[arg(long, value_parser = parse_kernel_name)]
    pub kernel: Option<String>,
    #[arg(long, value_parser = parse_vcpu, allow_negative_numbers = true, value_name = "N")]
    pub vcpu: Option<u32>,
    /// Memory: 2G, 512M, or a bare number of MiB.
    #[arg(long, value_parser = parse_memory_mib, allow_hyphen_values = true, value_name = "SIZE")]
    pub memory: Option<u32>,
    /// Size of the writable work disk: 8G, 512M, or a bare number of MiB.
    #[arg(long, value_parser = parse_disk_size, allow_hyphen_values = true, value_name = "SIZE")]
    pub disk_size: Option<ByteSize>,
    /// Give the VM outbound network access through NAT.
    #[arg(long)]
    pub nat: bool,
    /// Give the VM hardware virtualisation (/dev/kvm) and the kernel's modules, to run VMs
    /// (banger itself, QEMU, emulators) inside it. Needs QEMU: TCG, or KVM with nested
    /// virtualisation enabled on the host.
    #[arg(long)]
    pub nested: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub name: VmName,
    /// Seconds to wait for a graceful shutdown (config default when absent).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the default Debian image with mmdebstrap (needs root; a minute or two).
    Build {
        /// Image name (default: debian-<suite>).
        #[arg(long, value_parser = parse_image_name)]
        name: Option<String>,
        /// Debian suite (default: bookworm).
        #[arg(long)]
        suite: Option<String>,
    },
    /// Pull an image from an OCI/Docker registry (`alpine`, `docker.io/library/python:3.12`,
    /// `localhost:5000/app@sha256:…`) or a bundle named in the image catalog.
    Pull {
        /// An image reference or a catalog name.
        #[arg(value_parser = parse_image_ref)]
        reference: String,
        /// Image name (default: derived from the reference, e.g. python-3.12).
        #[arg(long, value_parser = parse_image_name)]
        name: Option<String>,
        /// Kernel VMs of this image boot by default.
        #[arg(long, value_parser = parse_kernel_name)]
        kernel: Option<String>,
        /// Plain HTTP: only for loopback registries or ones listed in `insecure_registries`.
        #[arg(long)]
        insecure: bool,
    },
    /// Write an image bundle (`.tar.zst` of manifest.json and rootfs.ext4) for `image import`.
    Export {
        #[arg(value_parser = parse_image_name)]
        name: String,
        /// The bundle to write; it must not exist.
        #[arg(short = 'o', long = "output", value_parser = parse_new_file, value_name = "FILE")]
        output: PathBuf,
    },
    /// Manage the registry blob cache.
    Cache {
        #[command(subcommand)]
        cmd: ImageCacheCmd,
    },
    /// Import an image bundle (`image export`), an ext4 image, a root filesystem directory, or
    /// a tarball of one.
    Import {
        /// A bundle .tar.zst, an ext4 file, a directory, or a .tar/.tar.gz/.tar.zst/.tar.xz.
        #[arg(value_parser = parse_existing_path, value_name = "PATH")]
        from: PathBuf,
        /// Image name (default for a bundle: the name in its manifest; required otherwise).
        #[arg(long, value_parser = parse_image_name)]
        name: Option<String>,
        /// Kernel VMs of this image boot by default.
        #[arg(long, value_parser = parse_kernel_name)]
        kernel: Option<String>,
    },
    /// Register an existing ext4 root filesystem as an image (it is never written).
    Register {
        #[arg(value_parser = parse_image_name)]
        name: String,
        #[arg(long, value_parser = parse_existing_file, value_name = "PATH")]
        rootfs: PathBuf,
        /// Kernel VMs of this image boot by default.
        #[arg(long, value_parser = parse_kernel_name)]
        kernel: Option<String>,
    },
    /// List images.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one image.
    Show {
        #[arg(value_parser = parse_image_name)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an image.
    #[command(visible_alias = "delete")]
    Rm {
        #[arg(value_parser = parse_image_name)]
        name: String,
        /// Delete even if stopped VMs use it (they will not start again); running ones never.
        #[arg(long, short = 'f')]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCacheCmd {
    /// Delete every cached registry blob (images already pulled keep working).
    Prune {
        /// Only say what would be freed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KernelCmd {
    /// Import a kernel from a directory holding `vmlinux` (and optionally `initrd.img`).
    Import {
        #[arg(value_parser = parse_kernel_name)]
        name: String,
        #[arg(long = "from", value_parser = parse_existing_dir, value_name = "DIR")]
        from: PathBuf,
    },
    /// Fetch a kernel the daemon knows by name: the built-in Debian cloud kernel
    /// (debian-6.1-cloud) or a `[[kernel_catalog]]` entry of the config. Checked against its
    /// signature or SHA256; pulling one that is already there does nothing.
    Pull {
        #[arg(value_parser = parse_kernel_name)]
        name: String,
    },
    /// Compile banger's guest kernel from Debian's linux-source-6.1 (~10-20 minutes; needs
    /// gcc make flex bison bc libelf-dev libssl-dev on the daemon's host). Everything is built
    /// in. Building again with an unchanged config and source does nothing.
    Build {
        /// Kernel name (default banger-6.1).
        #[arg(long, value_parser = parse_kernel_name)]
        name: Option<String>,
    },
    /// List kernels.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one kernel.
    Show {
        #[arg(value_parser = parse_kernel_name)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a kernel.
    #[command(visible_alias = "delete")]
    Rm {
        #[arg(value_parser = parse_kernel_name)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Start bangerd if it is not running.
    Start,
    /// Stop bangerd (VMs keep running).
    Stop,
    /// Show whether bangerd runs, and its details.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// A vcpu count: a positive integer.
pub fn parse_vcpu(s: &str) -> Result<u32, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid vcpu count {s:?}: expected a whole number"))?;
    if n <= 0 {
        return Err(format!("invalid vcpu count {s:?}: must be at least 1"));
    }
    u32::try_from(n).map_err(|_| format!("invalid vcpu count {s:?}: too large"))
}

/// A memory size, as whole MiB (what the daemon takes).
pub fn parse_memory_mib(s: &str) -> Result<u32, String> {
    let size = parse_positive_size("memory", s)?;
    if !size.bytes().is_multiple_of(ByteSize::MIB) {
        return Err(format!(
            "invalid memory size {s:?}: must be a whole number of MiB"
        ));
    }
    u32::try_from(size.as_mib()).map_err(|_| format!("invalid memory size {s:?}: too large"))
}

/// A work-disk size.
pub fn parse_disk_size(s: &str) -> Result<ByteSize, String> {
    parse_positive_size("disk", s)
}

fn parse_positive_size(what: &str, s: &str) -> Result<ByteSize, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("invalid {what} size {s:?}: must be greater than 0"));
    }
    let size = ByteSize::parse(s).map_err(|e| e.to_string())?;
    if size.bytes() == 0 {
        return Err(format!("invalid {what} size {s:?}: must be greater than 0"));
    }
    Ok(size)
}

pub fn parse_image_name(s: &str) -> Result<String, String> {
    validate_artifact_name("image", s).map(|()| s.to_string())
}

/// An image name, an OCI reference (`alpine`, `ghcr.io/a/b:1`, `x@sha256:…`) or a catalog name;
/// the daemon resolves which. Checked here only for what none of them may hold.
pub fn parse_image_ref(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 512 {
        return Err(format!("invalid image {s:?}: it needs 1 to 512 characters"));
    }
    if s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid image {s:?}: expected an image name or a reference like docker.io/library/alpine:3.20"
        ));
    }
    Ok(s.to_string())
}

/// A file to create: absolute (resolved against the current dir), its directory existing, the
/// file itself not.
pub fn parse_new_file(s: &str) -> Result<PathBuf, String> {
    let p = std::path::absolute(s).map_err(|e| format!("cannot use {s:?}: {e}"))?;
    if std::fs::symlink_metadata(&p).is_ok() {
        return Err(format!("{} already exists", p.display()));
    }
    let dir = p
        .parent()
        .filter(|d| d.is_dir())
        .ok_or_else(|| format!("cannot write {}: its directory does not exist", p.display()))?;
    let dir =
        std::fs::canonicalize(dir).map_err(|e| format!("cannot use {}: {e}", dir.display()))?;
    Ok(dir.join(
        p.file_name()
            .ok_or_else(|| format!("{s:?} is not a file name"))?,
    ))
}

pub fn parse_kernel_name(s: &str) -> Result<String, String> {
    validate_artifact_name("kernel", s).map(|()| s.to_string())
}

/// The daemon runs elsewhere (another cwd, maybe another mount view of relative paths), so
/// paths are sent absolute and resolved; a missing one fails here, with the path named.
fn canonical(s: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(s).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
            _ => e.to_string(),
        };
        format!("cannot use {s:?}: {reason}")
    })
}

pub fn parse_existing_file(s: &str) -> Result<PathBuf, String> {
    let p = canonical(s)?;
    if p.is_dir() {
        return Err(format!(
            "cannot use {s:?}: it is a directory, expected a file"
        ));
    }
    Ok(p)
}

pub fn parse_existing_dir(s: &str) -> Result<PathBuf, String> {
    let p = canonical(s)?;
    if !p.is_dir() {
        return Err(format!("cannot use {s:?}: not a directory"));
    }
    Ok(p)
}

/// Turns a clap failure into what to print and the exit code. Help and version go to stdout
/// with 0; a value rejected by a parser becomes one `banger: …` line with 2, since the parser's
/// message already names the bad value; other usage errors keep clap's rendering.
pub fn clap_failure(e: &clap::Error) -> (String, i32, bool) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => (e.render().to_string(), 0, true),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => (e.render().to_string(), 2, false),
        ErrorKind::ValueValidation => {
            let reason = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.kind().to_string());
            // Name the flag for options (`--memory: invalid size "4X": …`); positional names
            // are already named by the message itself.
            let flag = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) if a.starts_with('-') => {
                    format!("{}: ", a.split_whitespace().next().unwrap_or(a))
                }
                _ => String::new(),
            };
            (format!("banger: {flag}{reason}\n"), 2, false)
        }
        _ => (e.render().to_string(), 2, false),
    }
}

impl VmSpecArgs {
    /// The `vm.create` parameters; only the flags the user gave are set, so the daemon's
    /// defaults apply to the rest.
    pub fn into_params(self, no_start: bool) -> banger_protocol::VmCreateParams {
        banger_protocol::VmCreateParams {
            name: self.name.map(|n| n.to_string()),
            image: self.image,
            kernel: self.kernel,
            vcpu: self.vcpu,
            memory_mib: self.memory,
            work_disk_size: self.disk_size,
            nat: self.nat,
            // Only a given flag is sent, so `vm_defaults.nested` applies otherwise.
            nested: self.nested.then_some(true),
            no_start,
            rm_on_failure: false,
        }
    }
}

/// An existing file or directory, made absolute (the daemon's working directory is not ours).
fn parse_existing_path(s: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(s).map_err(|e| format!("{s}: {e}"))
}
