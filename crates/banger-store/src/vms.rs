//! The `vms` table.

use std::net::Ipv4Addr;

use banger_core::{ByteSize, VmId, VmName, VmRecord, VmState};
use rusqlite::{OptionalExtension, Row, params};

use crate::error::unique_violation;
use crate::{Store, StoreError, to_i64};

const COLUMNS: &str = "id, name, state, image, kernel, vcpu, memory_mib, work_disk_size, ip, nat, \
                       vmm, last_error, created_at, updated_at, started_at, workspace_json, nested";

/// A row as SQLite returns it, before banger's types validate it.
struct RawVm {
    id: String,
    name: String,
    state: String,
    image: String,
    kernel: String,
    vcpu: i64,
    memory_mib: i64,
    work_disk_size: i64,
    ip: Option<String>,
    nat: bool,
    vmm: Option<String>,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
    started_at: Option<i64>,
    workspace_json: Option<String>,
    nested: bool,
}

impl RawVm {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            id: r.get(0)?,
            name: r.get(1)?,
            state: r.get(2)?,
            image: r.get(3)?,
            kernel: r.get(4)?,
            vcpu: r.get(5)?,
            memory_mib: r.get(6)?,
            work_disk_size: r.get(7)?,
            ip: r.get(8)?,
            nat: r.get(9)?,
            vmm: r.get(10)?,
            last_error: r.get(11)?,
            created_at: r.get(12)?,
            updated_at: r.get(13)?,
            started_at: r.get(14)?,
            workspace_json: r.get(15)?,
            nested: r.get(16)?,
        })
    }

    fn decode(self) -> Result<VmRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "vms",
            key: self.id.clone(),
            reason,
        };
        let id = VmId::parse(&self.id).ok_or_else(|| corrupt(format!("bad id {:?}", self.id)))?;
        let name = VmName::parse(&self.name).map_err(|e| corrupt(e.to_string()))?;
        let state = VmState::parse(&self.state)
            .ok_or_else(|| corrupt(format!("bad state {:?}", self.state)))?;
        let vcpu =
            u32::try_from(self.vcpu).map_err(|_| corrupt(format!("bad vcpu {}", self.vcpu)))?;
        let memory_mib = u32::try_from(self.memory_mib)
            .map_err(|_| corrupt(format!("bad memory_mib {}", self.memory_mib)))?;
        let work_disk_size = u64::try_from(self.work_disk_size)
            .map_err(|_| corrupt(format!("bad work_disk_size {}", self.work_disk_size)))?;
        let ip = match &self.ip {
            None => None,
            Some(s) => Some(decode_ip(s).map_err(&corrupt)?),
        };
        let workspace = match &self.workspace_json {
            None => None,
            Some(j) => Some(
                serde_json::from_str(j).map_err(|e| corrupt(format!("bad workspace_json: {e}")))?,
            ),
        };
        Ok(VmRecord {
            id,
            name,
            state,
            image: self.image,
            kernel: self.kernel,
            vcpu,
            memory_mib,
            work_disk_size: ByteSize(work_disk_size),
            ip,
            nat: self.nat,
            vmm: self.vmm,
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            workspace,
            nested: self.nested,
        })
    }
}

fn encode_workspace(vm: &VmRecord) -> Option<String> {
    vm.workspace
        .as_ref()
        .map(|w| serde_json::to_string(w).expect("a workspace summary always serializes"))
}

fn decode_ip(s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|_| format!("bad ip {s:?}"))
}

/// Maps a constraint failure on `vms` to the conflict the user caused.
fn conflict(vm: &VmRecord, op: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let op = format!("{op} VM {}", vm.name);
    let name = vm.name.to_string();
    let id = vm.id.to_string();
    let ip = vm.ip.map(|ip| ip.to_string()).unwrap_or_default();
    move |e| match unique_violation(&e).as_deref() {
        Some("vms.name") => StoreError::AlreadyExists {
            what: "VM name",
            value: name,
        },
        Some("vms.ip") => StoreError::AlreadyExists {
            what: "VM IP address",
            value: ip,
        },
        Some("vms.id") => StoreError::AlreadyExists {
            what: "VM id",
            value: id,
        },
        _ => StoreError::Sqlite { op, source: e },
    }
}

impl Store {
    /// Adds a VM. A taken name, id or IP address is [`StoreError::AlreadyExists`], detected by
    /// the table's constraints so two concurrent inserts cannot both win.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO vms ({COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        );
        self.write_vm(&sql, vm, "inserting").map(drop)
    }

    /// Runs `sql` with every field of `vm` bound as ?1..?17 in [`COLUMNS`] order; name, id and
    /// address conflicts become [`StoreError::AlreadyExists`].
    fn write_vm(&self, sql: &str, vm: &VmRecord, op: &'static str) -> Result<usize, StoreError> {
        let size = to_i64("work_disk_size", vm.work_disk_size.bytes())?;
        let workspace_json = encode_workspace(vm);
        self.lock()
            .execute(
                sql,
                params![
                    vm.id.as_str(),
                    vm.name.as_str(),
                    vm.state.as_str(),
                    vm.image,
                    vm.kernel,
                    vm.vcpu,
                    vm.memory_mib,
                    size,
                    vm.ip.map(|ip| ip.to_string()),
                    vm.nat,
                    vm.vmm,
                    vm.last_error,
                    vm.created_at,
                    vm.updated_at,
                    vm.started_at,
                    workspace_json,
                    vm.nested,
                ],
            )
            .map_err(conflict(vm, op))
    }

    /// Rewrites every field of the VM with `vm.id`. [`StoreError::NotFound`] if there is none.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let changed = self.write_vm(
            "UPDATE vms SET name = ?2, state = ?3, image = ?4, kernel = ?5, vcpu = ?6, \
             memory_mib = ?7, work_disk_size = ?8, ip = ?9, nat = ?10, vmm = ?11, \
             last_error = ?12, created_at = ?13, updated_at = ?14, started_at = ?15, \
             workspace_json = ?16, nested = ?17 \
             WHERE id = ?1",
            vm,
            "updating",
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: "VM",
                value: vm.id.to_string(),
            });
        }
        Ok(())
    }

    /// The VM whose id or name is exactly `id_or_name`. An id match wins over a name match
    /// (a 12-hex-digit string is also a valid name).
    pub fn get_vm(&self, id_or_name: &str) -> Result<Option<VmRecord>, StoreError> {
        let raw = self
            .lock()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM vms WHERE id = ?1 OR name = ?1 \
                     ORDER BY id = ?1 DESC LIMIT 1"
                ),
                [id_or_name],
                RawVm::from_row,
            )
            .optional()
            .map_err(StoreError::sqlite(format!("reading VM {id_or_name:?}")))?;
        raw.map(RawVm::decode).transpose()
    }

    /// Every VM, oldest first (ties by name).
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let raws = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM vms ORDER BY created_at, name"
                ))
                .map_err(StoreError::sqlite("listing VMs"))?;
            stmt.query_map([], RawVm::from_row)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(StoreError::sqlite("listing VMs"))?
        };
        raws.into_iter().map(RawVm::decode).collect()
    }

    /// Removes a VM; `false` if there was none with this id.
    pub fn delete_vm(&self, id: &VmId) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute("DELETE FROM vms WHERE id = ?1", [id.as_str()])
            .map_err(StoreError::sqlite(format!("deleting VM {id}")))?;
        Ok(n > 0)
    }

    /// Every address held by a VM, in ascending order.
    pub fn used_ips(&self) -> Result<Vec<Ipv4Addr>, StoreError> {
        let rows: Vec<(String, String)> = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare_cached("SELECT id, ip FROM vms WHERE ip IS NOT NULL")
                .map_err(StoreError::sqlite("listing used IP addresses"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(StoreError::sqlite("listing used IP addresses"))?
        };
        let mut ips = rows
            .into_iter()
            .map(|(id, ip)| {
                decode_ip(&ip).map_err(|reason| StoreError::Corrupt {
                    table: "vms",
                    key: id,
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        ips.sort();
        Ok(ips)
    }

    /// Names of the VMs built on image `name`, sorted.
    pub fn vms_using_image(&self, name: &str) -> Result<Vec<VmName>, StoreError> {
        self.vm_names_where("image", name)
    }

    /// Names of the VMs booting kernel `name`, sorted.
    pub fn vms_using_kernel(&self, name: &str) -> Result<Vec<VmName>, StoreError> {
        self.vm_names_where("kernel", name)
    }

    fn vm_names_where(&self, column: &'static str, value: &str) -> Result<Vec<VmName>, StoreError> {
        let op = || format!("listing VMs using {column} {value:?}");
        let rows: Vec<(String, String)> = {
            let conn = self.lock();
            // `column` is one of two literals above, never user input.
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT id, name FROM vms WHERE {column} = ?1 ORDER BY name"
                ))
                .map_err(StoreError::sqlite(op()))?;
            stmt.query_map([value], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(StoreError::sqlite(op()))?
        };
        rows.into_iter()
            .map(|(id, name)| {
                VmName::parse(&name).map_err(|e| StoreError::Corrupt {
                    table: "vms",
                    key: id,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            id: VmId::generate(),
            name: VmName::parse(name).unwrap(),
            state: VmState::Created,
            image: "debian-bookworm".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpu: 2,
            memory_mib: 1024,
            work_disk_size: ByteSize::gib(8),
            ip: None,
            nat: false,
            vmm: None,
            last_error: None,
            created_at: 1_700_000_000,
            updated_at: 1_700_000_000,
            started_at: None,
            workspace: None,
            nested: false,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn round_trip_with_none_fields() {
        let (_d, s) = store();
        let v = vm("plain");
        s.insert_vm(&v).unwrap();
        assert_eq!(s.get_vm("plain").unwrap(), Some(v.clone()));
        assert_eq!(s.get_vm(v.id.as_str()).unwrap(), Some(v));
        assert_eq!(s.get_vm("nope").unwrap(), None);
    }

    #[test]
    fn workspace_round_trips_and_is_cleared() {
        let (_d, s) = store();
        let mut v = vm("ws");
        s.insert_vm(&v).unwrap();
        v.workspace = Some(banger_core::records::WorkspaceInfo {
            guest_path: "/root/my repo".into(),
            host_path: "/home/dev/my repo".into(),
            head_commit: "a".repeat(40),
            prepared_at: 1_700_000_500,
            include_untracked: true,
        });
        s.update_vm(&v).unwrap();
        assert_eq!(s.get_vm("ws").unwrap(), Some(v.clone()));
        v.workspace = None;
        s.update_vm(&v).unwrap();
        assert_eq!(s.get_vm("ws").unwrap().unwrap().workspace, None);
    }

    #[test]
    fn bad_workspace_json_is_corrupt() {
        let (_d, s) = store();
        let v = vm("wsbad");
        s.insert_vm(&v).unwrap();
        s.lock()
            .execute(
                "UPDATE vms SET workspace_json = '{\"guest_path\": 1}' WHERE name = 'wsbad'",
                [],
            )
            .unwrap();
        let e = s.get_vm("wsbad").unwrap_err();
        assert!(
            e.to_string().contains("workspace_json"),
            "error names the column: {e}"
        );
    }

    #[test]
    fn round_trip_with_some_fields_and_every_state() {
        let (_d, s) = store();
        let mut v = vm("full");
        v.ip = Some(Ipv4Addr::new(172, 30, 0, 2));
        v.nat = true;
        v.vmm = Some("qemu-tcg".into());
        v.last_error = Some("boot: kernel panic".into());
        v.started_at = Some(1_700_000_123);
        v.work_disk_size = ByteSize(i64::MAX as u64);
        s.insert_vm(&v).unwrap();
        assert_eq!(s.get_vm("full").unwrap(), Some(v.clone()));
        for state in [
            VmState::Starting,
            VmState::Running,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Error,
        ] {
            v.state = state;
            s.update_vm(&v).unwrap();
            assert_eq!(s.get_vm(v.id.as_str()).unwrap().unwrap().state, state);
        }
    }

    #[test]
    fn size_beyond_sqlite_integer_is_refused() {
        let (_d, s) = store();
        let mut v = vm("huge");
        v.work_disk_size = ByteSize(u64::MAX);
        let err = s.insert_vm(&v).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Unstorable {
                    field: "work_disk_size",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn name_conflict_is_already_exists() {
        let (_d, s) = store();
        s.insert_vm(&vm("dup")).unwrap();
        match s.insert_vm(&vm("dup")) {
            Err(StoreError::AlreadyExists { what, value }) => {
                assert_eq!(what, "VM name");
                assert_eq!(value, "dup");
            }
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        assert_eq!(s.list_vms().unwrap().len(), 1);
    }

    #[test]
    fn ip_conflict_is_already_exists() {
        let (_d, s) = store();
        let ip = Some(Ipv4Addr::new(172, 30, 0, 9));
        let mut a = vm("a");
        a.ip = ip;
        s.insert_vm(&a).unwrap();
        let mut b = vm("b");
        b.ip = ip;
        let err = s.insert_vm(&b).unwrap_err();
        assert_eq!(err.code(), banger_core::ErrorCode::AlreadyExists);
        assert!(err.to_string().contains("172.30.0.9"), "{err}");
        // Many VMs without an address are fine.
        s.insert_vm(&vm("c")).unwrap();
        s.insert_vm(&vm("d")).unwrap();
        // An update that steals an address is refused too.
        let mut c = s.get_vm("c").unwrap().unwrap();
        c.ip = ip;
        assert!(matches!(
            s.update_vm(&c),
            Err(StoreError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn update_of_missing_row_is_not_found() {
        let (_d, s) = store();
        let v = vm("ghost");
        match s.update_vm(&v) {
            Err(StoreError::NotFound { what, value }) => {
                assert_eq!(what, "VM");
                assert_eq!(value, v.id.to_string());
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn id_match_wins_over_name_match() {
        let (_d, s) = store();
        let a = vm("first");
        // A second VM whose *name* is the first VM's id.
        let b = vm(a.id.as_str());
        s.insert_vm(&b).unwrap();
        s.insert_vm(&a).unwrap();
        assert_eq!(
            s.get_vm(a.id.as_str()).unwrap().unwrap().name.as_str(),
            "first"
        );
    }

    #[test]
    fn list_orders_by_creation_then_name_and_delete() {
        let (_d, s) = store();
        let mut late = vm("aaa");
        late.created_at += 10;
        s.insert_vm(&late).unwrap();
        s.insert_vm(&vm("zzz")).unwrap();
        s.insert_vm(&vm("mmm")).unwrap();
        let names: Vec<String> = s
            .list_vms()
            .unwrap()
            .iter()
            .map(|v| v.name.to_string())
            .collect();
        assert_eq!(names, ["mmm", "zzz", "aaa"]);
        assert!(s.delete_vm(&late.id).unwrap());
        assert!(!s.delete_vm(&late.id).unwrap());
        assert_eq!(s.list_vms().unwrap().len(), 2);
        // The name is free again after delete.
        s.insert_vm(&vm("aaa")).unwrap();
    }

    #[test]
    fn used_ips_and_users_of_images_and_kernels() {
        let (_d, s) = store();
        let mut a = vm("a");
        a.ip = Some(Ipv4Addr::new(172, 30, 0, 10));
        let mut b = vm("b");
        b.ip = Some(Ipv4Addr::new(172, 30, 0, 3));
        b.image = "alpine".into();
        b.kernel = "custom".into();
        let c = vm("c");
        for v in [&a, &b, &c] {
            s.insert_vm(v).unwrap();
        }
        assert_eq!(
            s.used_ips().unwrap(),
            [Ipv4Addr::new(172, 30, 0, 3), Ipv4Addr::new(172, 30, 0, 10)]
        );
        let names = |v: Vec<VmName>| v.into_iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(s.vms_using_image("debian-bookworm").unwrap()),
            ["a", "c"]
        );
        assert_eq!(names(s.vms_using_image("alpine").unwrap()), ["b"]);
        assert_eq!(names(s.vms_using_kernel("custom").unwrap()), ["b"]);
        assert!(s.vms_using_kernel("none").unwrap().is_empty());
    }

    #[test]
    fn undecodable_rows_are_corrupt_not_panics() {
        let (_d, s) = store();
        let v = vm("victim");
        s.insert_vm(&v).unwrap();
        // The CHECK constraint stops a bad state; a bad id or ip text can still be written by
        // hand, so those are what decoding has to catch.
        s.lock()
            .execute(
                "UPDATE vms SET ip = 'not-an-ip' WHERE id = ?1",
                [v.id.as_str()],
            )
            .unwrap();
        match s.get_vm("victim") {
            Err(StoreError::Corrupt { table, key, reason }) => {
                assert_eq!(table, "vms");
                assert_eq!(key, v.id.to_string());
                assert!(reason.contains("not-an-ip"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(s.used_ips(), Err(StoreError::Corrupt { .. })));
        s.lock()
            .execute(
                "UPDATE vms SET ip = NULL, id = 'XYZ' WHERE id = ?1",
                [v.id.as_str()],
            )
            .unwrap();
        match s.list_vms() {
            Err(StoreError::Corrupt { key, reason, .. }) => {
                assert_eq!(key, "XYZ");
                assert!(reason.contains("bad id"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn bad_state_is_rejected_by_the_schema() {
        let (_d, s) = store();
        let v = vm("x");
        s.insert_vm(&v).unwrap();
        let r = s.lock().execute(
            "UPDATE vms SET state = 'exploded' WHERE id = ?1",
            [v.id.as_str()],
        );
        assert!(r.is_err());
    }

    #[test]
    fn bad_state_in_a_row_is_corrupt() {
        let (_d, s) = store();
        let v = vm("x");
        s.insert_vm(&v).unwrap();
        {
            // Bypass the CHECK the way an old or hand-edited database could.
            let conn = s.lock();
            conn.execute_batch("PRAGMA ignore_check_constraints = ON")
                .unwrap();
            conn.execute(
                "UPDATE vms SET state = 'exploded' WHERE id = ?1",
                [v.id.as_str()],
            )
            .unwrap();
            conn.execute_batch("PRAGMA ignore_check_constraints = OFF")
                .unwrap();
        }
        let err = s.get_vm("x").unwrap_err().to_string();
        assert!(err.contains("exploded") && err.contains("vms"), "{err}");
    }

    #[test]
    fn twenty_threads_insert_concurrently() {
        let (_d, s) = store();
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut v = vm(&format!("vm-{i}"));
                    v.ip = Some(Ipv4Addr::new(172, 30, 0, 2 + i as u8));
                    s.insert_vm(&v)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(s.list_vms().unwrap().len(), 20);
        assert_eq!(s.used_ips().unwrap().len(), 20);
    }

    #[test]
    fn twenty_threads_with_their_own_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let s = Store::open(&path)?;
                    s.insert_vm(&vm(&format!("own-{i}")))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(Store::open(&path).unwrap().list_vms().unwrap().len(), 20);
    }

    #[test]
    fn store_is_clone_send_sync() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Store>();
    }
}
