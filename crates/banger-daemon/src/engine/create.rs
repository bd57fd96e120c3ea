//! `vm create`: validate, allocate a name and an address under the create lock, build the disks,
//! then start (unless `--no-start`). A failure before the start removes the row and every file.

use std::net::Ipv4Addr;

use banger_core::{ByteSize, ErrorCode, VmId, VmName, VmRecord, VmState};
use banger_protocol::VmCreateParams;
use tracing::info;

use super::{Engine, now, ops::validate_shape};
use crate::disks;
use crate::error::{OpError, OpResult};
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// Smallest work disk: ext4 with a journal needs room, and a smaller /root is useless anyway.
const MIN_WORK_DISK: ByteSize = ByteSize(64 * ByteSize::MIB);

impl Engine {
    pub async fn create(&self, p: VmCreateParams, ctx: &OpCtx<'_>) -> OpResult<VmRecord> {
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
        let image_name = p
            .image
            .clone()
            .unwrap_or_else(|| self.config().default_image.clone());
        let image = self.image_or_provision(&image_name, ctx).await?;
        let kernel_name = p
            .kernel
            .clone()
            .or_else(|| image.kernel.clone())
            .unwrap_or_else(|| self.config().default_kernel.clone());
        self.kernel_or_provision(&kernel_name, ctx).await?;

        ctx.progress.stage("allocate", None);
        let vm = {
            let _alloc = self.inner.create_lock.lock().await;
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
            };
            self.store().insert_vm(&vm)?;
            vm
        };
        info!(vm = %vm.name, id = %vm.id, "VM created");

        // The row exists; hold the VM's lock so nothing else touches it half-built.
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        if let Err(e) = self.build_disks(&vm, &image.rootfs, ctx).await {
            let dir = self.layout().vm_dir(&vm.id);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self
                .ssh()
                .remove_known_host(&super::ops::known_host_names(&vm));
            self.store().delete_vm(&vm.id)?;
            return Err(e);
        }
        let mut vm = vm;
        if !p.no_start {
            self.start_locked(&mut vm, ctx).await?;
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
        disks::create_root_disk(
            self.inner.runner.as_ref(),
            self.config().root_disk,
            image,
            &layout.root_disk(&vm.id),
        )
        .await
        .map_err(|e| OpError::failed(format!("creating VM {}: {e}", vm.name)))?;
        if ctx.cancel.is_cancelled() {
            return Err(OpError::failed("create cancelled: the client went away"));
        }
        ctx.progress
            .stage("work_disk", Some(vm.work_disk_size.to_string()));
        let fail = |e: String| OpError::failed(format!("creating VM {}: {e}", vm.name));
        disks::create_ext4(
            self.inner.runner.as_ref(),
            &layout.work_disk(&vm.id),
            vm.work_disk_size,
            "banger-work",
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        ctx.progress.stage("identity", None);
        let machine_id = random_hex(32);
        std::fs::write(layout.machine_id(&vm.id), format!("{machine_id}\n")).map_err(|e| {
            fail(format!(
                "writing {}: {e}",
                layout.machine_id(&vm.id).display()
            ))
        })?;
        let key = crate::ssh::generate_host_key(self.inner.runner.as_ref(), &dir)
            .await
            .map_err(|e| fail(e.to_string()))?;
        // The host key is trusted from the first connection: it was made here, not learned.
        self.ssh()
            .add_known_host(&super::ops::known_host_names(vm), &key.public)
            .map_err(|e| fail(e.to_string()))
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
