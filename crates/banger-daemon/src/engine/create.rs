//! `vm create`: validate, allocate a name and an address under the create lock, build the disks,
//! then start (unless `--no-start`). A failure before the start removes the row and every file.

use std::net::Ipv4Addr;

use banger_core::{ByteSize, ErrorCode, VmId, VmName, VmRecord, VmState};
use banger_protocol::VmCreateParams;
use tracing::info;

use super::{Engine, now, ops::validate_shape};
use crate::disks;
use crate::error::{OpError, OpResult};
use crate::failpoint::hit;
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// Smallest work disk: ext4 with a journal needs room, and a smaller /root is useless anyway.
const MIN_WORK_DISK: ByteSize = ByteSize(64 * ByteSize::MIB);

/// The failpoint phase of create (steps: [`crate::failpoint::CREATE_STEPS`]).
const PHASE: &str = "create";

impl Engine {
    pub async fn create(&self, p: VmCreateParams, ctx: &OpCtx<'_>) -> OpResult<VmRecord> {
        hit(PHASE, "validate", false);
        let explicit_name = match &p.name {
            Some(n) => Some(VmName::parse(n).map_err(|e| OpError::bad_request(e.to_string()))?),
            None => None,
        };
        validate_shape(p.vcpu, p.memory_mib)?;
        let defaults = &self.config().vm_defaults;
        let work_disk_size = p.work_disk_size.unwrap_or(defaults.work_disk_size);
        if work_disk_size < MIN_WORK_DISK {
            return Err(OpError::bad_request(format!(
                "invalid work disk size {work_disk_size}: the minimum is {MIN_WORK_DISK}"
            )));
        }
        hit(PHASE, "validate", true);
        let image_name = p
            .image
            .clone()
            .unwrap_or_else(|| self.config().default_image.clone());
        hit(PHASE, "image", false);
        let mut image = self.image_or_provision(&image_name, ctx).await?;
        hit(PHASE, "image", true);
        let kernel_name = p
            .kernel
            .clone()
            .or_else(|| image.kernel.clone())
            .unwrap_or_else(|| self.config().default_kernel.clone());
        hit(PHASE, "kernel", false);
        self.kernel_or_provision(&kernel_name, ctx).await?;
        hit(PHASE, "kernel", true);

        ctx.progress.stage("allocate", None);
        hit(PHASE, "allocate", false);
        let mut lost_races = 0;
        let vm = loop {
            let _alloc = self.inner.create_lock.lock().await;
            // `image rm` and `kernel rm` look for users under this lock too: either they see
            // this VM's row and refuse, or the artifact is already gone here. Without this check
            // a create racing a delete inserted a VM whose image was deleted (its start failed
            // at preflight). A reference is resolved (pulled) again; a named image is not_found.
            if self.store().get_image(&image.name)?.is_none() {
                drop(_alloc);
                lost_races += 1;
                if lost_races > 3 {
                    return Err(OpError::busy(format!(
                        "image {} was deleted while the VM was being created ({lost_races} times); try again",
                        image.name
                    )));
                }
                info!(image = %image.name, "the image was deleted while a VM was being created; resolving it again");
                image = self.image_or_provision(&image_name, ctx).await?;
                continue;
            }
            if self.store().get_kernel(&kernel_name)?.is_none() {
                return Err(OpError::not_found("kernel", &kernel_name));
            }
            let name = match explicit_name {
                Some(n) => {
                    if self.store().get_vm(n.as_str())?.is_some() {
                        return Err(OpError::new(
                            ErrorCode::AlreadyExists,
                            format!("a VM named {n} already exists"),
                        ));
                    }
                    n
                }
                None => self.unused_name()?,
            };
            let ip = self.allocate_ip()?;
            let t = now();
            let vm = VmRecord {
                id: VmId::generate(),
                name,
                state: VmState::Created,
                image: image.name.clone(),
                kernel: kernel_name,
                vcpu: p.vcpu.unwrap_or(defaults.vcpu),
                memory_mib: p.memory_mib.unwrap_or(defaults.memory_mib),
                work_disk_size,
                ip: Some(ip),
                nat: p.nat,
                vmm: None,
                last_error: None,
                created_at: t,
                updated_at: t,
                started_at: None,
                workspace: None,
                nested: p.nested.unwrap_or(defaults.nested),
            };
            // Crash safety: the VM's dir, marked "being created", exists before its row, and
            // the mark goes only once every file is built (`commit`). A daemon killed anywhere
            // in between leaves a marked dir (with or without a row) that the next daemon's
            // reconcile rolls back — row, files and known_hosts entry — exactly as a failed
            // create does. Before this, such a crash left a `created` VM with missing or
            // half-built disks that could never start.
            self.mark_vm_dir(&vm, super::reconcile::CREATING_MARK)?;
            if let Err(e) = self.store().insert_vm(&vm) {
                let _ = banger_sys::rmtree::remove_tree_last(
                    &self.layout().vm_dir(&vm.id),
                    &[std::ffi::OsStr::new(super::reconcile::CREATING_MARK)],
                );
                return Err(e.into());
            }
            break vm;
        };
        hit(PHASE, "allocate", true);
        info!(vm = %vm.name, id = %vm.id, "VM created");

        // The row exists; hold the VM's lock so nothing else touches it half-built.
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let built = match self.build_disks(&vm, &image.rootfs, ctx).await {
            Ok(()) => {
                hit(PHASE, "commit", false);
                let mark = self
                    .layout()
                    .vm_dir(&vm.id)
                    .join(super::reconcile::CREATING_MARK);
                let r = std::fs::remove_file(&mark).map_err(|e| {
                    OpError::failed(format!(
                        "creating VM {}: removing {}: {e}",
                        vm.name,
                        mark.display()
                    ))
                });
                hit(PHASE, "commit", true);
                r
            }
            Err(e) => Err(e),
        };
        if let Err(e) = built {
            // The row first, the marked dir last: a crash in between leaves only a marked dir,
            // which reconcile removes (the other order could leave a row without disks).
            if self.store().delete_vm(&vm.id).is_err() {
                // A full disk can leave the store no room even for a delete: free the VM's
                // disks (the dir keeps its create mark, so a crash still rolls back), retry.
                for disk in [
                    self.layout().root_disk(&vm.id),
                    self.layout().work_disk(&vm.id),
                ] {
                    let _ = std::fs::remove_file(disk);
                }
                if let Err(d) = self.store().delete_vm(&vm.id) {
                    return Err(OpError::failed(format!(
                        "{}; removing VM {} failed too ({d}): the next daemon start removes it",
                        e.message, vm.name
                    )));
                }
            }
            self.vms_changed();
            let _ = self
                .ssh()
                .remove_known_host(&super::ops::known_host_names(&vm));
            let dir = self.layout().vm_dir(&vm.id);
            let _ = banger_sys::rmtree::remove_tree_last(
                &dir,
                &[std::ffi::OsStr::new(super::reconcile::CREATING_MARK)],
            );
            return Err(e);
        }
        let mut vm = vm;
        if !p.no_start
            && let Err(e) = self.start_locked(&mut vm, ctx).await
        {
            // A start that failed at a step and recorded it leaves the VM in `error`, naming
            // the step, for `vm start` to retry. One that could not record anything (a full
            // disk leaves the store no room) leaves it `created` or `starting` with nothing
            // running: nobody asked for that VM, so it goes, as when its disks fail. A start
            // cancelled by `vm stop`/`vm kill` leaves it `stopped`, as asked: it stays, except
            // with `rm_on_failure` (`vm run --rm`), where nobody wants it in any state.
            let recorded = self.store().get_vm(vm.id.as_str()).ok().flatten();
            if let Some(r) = recorded
                && (matches!(r.state, VmState::Created | VmState::Starting) || p.rm_on_failure)
                && let Err(d) = self.delete_locked(r, true, ctx).await
            {
                return Err(OpError::failed(format!(
                    "{}; removing VM {} failed too: {}",
                    e.message, vm.name, d.message
                )));
            }
            if p.rm_on_failure {
                return Err(OpError::failed(format!(
                    "{}; VM {} deleted (--rm)",
                    e.message, vm.name
                )));
            }
            return Err(e);
        }
        if p.rm_on_failure && ctx.cancel.is_cancelled() {
            // The client left while the VM booted: nobody will ever use or delete it.
            let name = vm.name.clone();
            if let Err(d) = self.delete_locked(vm, true, ctx).await {
                return Err(OpError::failed(format!(
                    "the client went away; removing VM {name} failed: {}",
                    d.message
                )));
            }
            return Err(OpError::failed(format!(
                "the client went away; VM {name} deleted (--rm)"
            )));
        }
        Ok(vm)
    }

    async fn build_disks(
        &self,
        vm: &VmRecord,
        image: &std::path::Path,
        ctx: &OpCtx<'_>,
    ) -> OpResult<()> {
        let layout = self.layout();
        let dir = layout.vm_dir(&vm.id);
        create_private_dir(&dir)
            .map_err(|e| OpError::failed(format!("creating {}: {e}", dir.display())))?;
        if ctx.cancel.is_cancelled() {
            return Err(OpError::failed("create cancelled: the client went away"));
        }
        ctx.progress.stage(
            "root_disk",
            Some(self.config().root_disk.as_str().to_string()),
        );
        hit(PHASE, "root_disk", false);
        disks::create_root_disk(
            self.inner.runner.as_ref(),
            self.config().root_disk,
            image,
            &layout.root_disk(&vm.id),
        )
        .await
        .map_err(|e| OpError::failed(format!("creating VM {}: {e}", vm.name)))?;
        hit(PHASE, "root_disk", true);
        if ctx.cancel.is_cancelled() {
            return Err(OpError::failed("create cancelled: the client went away"));
        }
        ctx.progress
            .stage("work_disk", Some(vm.work_disk_size.to_string()));
        let fail = |e: String| OpError::failed(format!("creating VM {}: {e}", vm.name));
        hit(PHASE, "work_disk", false);
        disks::create_ext4(
            self.inner.runner.as_ref(),
            &layout.work_disk(&vm.id),
            vm.work_disk_size,
            "banger-work",
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        hit(PHASE, "work_disk", true);
        ctx.progress.stage("identity", None);
        hit(PHASE, "machine_id", false);
        let machine_id = random_hex(32);
        std::fs::write(layout.machine_id(&vm.id), format!("{machine_id}\n")).map_err(|e| {
            fail(format!(
                "writing {}: {e}",
                layout.machine_id(&vm.id).display()
            ))
        })?;
        hit(PHASE, "machine_id", true);
        hit(PHASE, "host_key", false);
        let key = crate::ssh::generate_host_key(self.inner.runner.as_ref(), &dir)
            .await
            .map_err(|e| fail(e.to_string()))?;
        hit(PHASE, "host_key", true);
        hit(PHASE, "known_host", false);
        // The host key is trusted from the first connection: it was made here, not learned.
        self.ssh()
            .add_known_host(&super::ops::known_host_names(vm), &key.public)
            .map_err(|e| fail(e.to_string()))?;
        hit(PHASE, "known_host", true);
        Ok(())
    }

    /// A generated name not yet taken. Called under the create lock.
    fn unused_name(&self) -> OpResult<VmName> {
        for _ in 0..64 {
            let n = VmName::generate();
            if self.store().get_vm(n.as_str())?.is_none() {
                return Ok(n);
            }
        }
        Err(OpError::failed(
            "could not generate an unused VM name; pass --name",
        ))
    }

    /// The lowest free address of the bridge network. Called under the create lock; an address
    /// stays held by its VM until delete.
    fn allocate_ip(&self) -> OpResult<Ipv4Addr> {
        let used: std::collections::HashSet<Ipv4Addr> =
            self.store().used_ips()?.into_iter().collect();
        let cidr = &self.config().bridge_cidr;
        cidr.hosts().find(|ip| !used.contains(ip)).ok_or_else(|| {
            OpError::failed(format!(
                "no free address left in {cidr} ({} VMs exist): delete some or widen bridge_cidr",
                used.len()
            ))
        })
    }
}

/// `n` random lowercase hex digits (a machine-id is 32).
fn random_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(banger_core::VmId::generate().as_str());
    }
    s.truncate(n);
    s
}
