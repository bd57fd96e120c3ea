//! The `images` and `kernels` tables.

use std::path::PathBuf;

use banger_core::{ImageRecord, KernelRecord};
use rusqlite::{OptionalExtension, Row, params};

use crate::error::unique_violation;
use crate::{Store, StoreError, path_text, to_i64};

const IMAGE_COLUMNS: &str =
    "name, rootfs, kernel, size_bytes, source, managed, created_at, meta_json";
const KERNEL_COLUMNS: &str = "name, vmlinux, initrd, version, sha256, source, created_at";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<(ImageRecord, i64, Option<String>)> {
    let size: i64 = r.get(3)?;
    let meta: Option<String> = r.get(7)?;
    Ok((
        ImageRecord {
            name: r.get(0)?,
            rootfs: PathBuf::from(r.get::<_, String>(1)?),
            kernel: r.get(2)?,
            size_bytes: 0,
            source: r.get(4)?,
            managed: r.get(5)?,
            created_at: r.get(6)?,
            meta: Default::default(),
        },
        size,
        meta,
    ))
}

/// Fills in the size, which SQLite holds signed (a negative one is corruption), and the
/// metadata JSON (NULL for images made before it was recorded).
fn decode_image(
    (mut img, size, meta): (ImageRecord, i64, Option<String>),
) -> Result<ImageRecord, StoreError> {
    img.size_bytes = u64::try_from(size).map_err(|_| StoreError::Corrupt {
        table: "images",
        key: img.name.clone(),
        reason: format!("bad size_bytes {size}"),
    })?;
    if let Some(m) = meta {
        img.meta = serde_json::from_str(&m).map_err(|e| StoreError::Corrupt {
            table: "images",
            key: img.name.clone(),
            reason: format!("bad meta_json: {e}"),
        })?;
    }
    Ok(img)
}

fn kernel_from_row(r: &Row<'_>) -> rusqlite::Result<KernelRecord> {
    Ok(KernelRecord {
        name: r.get(0)?,
        vmlinux: PathBuf::from(r.get::<_, String>(1)?),
        initrd: r.get::<_, Option<String>>(2)?.map(PathBuf::from),
        version: r.get(3)?,
        sha256: r.get(4)?,
        source: r.get(5)?,
        created_at: r.get(6)?,
    })
}

fn name_conflict(what: &'static str, name: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let name = name.to_string();
    move |e| {
        if unique_violation(&e).is_some() {
            StoreError::AlreadyExists { what, value: name }
        } else {
            StoreError::Sqlite {
                op: format!("inserting {what} {name:?}"),
                source: e,
            }
        }
    }
}

impl Store {
    /// Registers an image. A taken name is [`StoreError::AlreadyExists`].
    pub fn insert_image(&self, img: &ImageRecord) -> Result<(), StoreError> {
        let rootfs = path_text("rootfs", &img.rootfs)?;
        let size = to_i64("size_bytes", img.size_bytes)?;
        let meta = (img.meta != banger_core::ImageMeta::default())
            .then(|| serde_json::to_string(&img.meta))
            .transpose()
            .map_err(|e| StoreError::Corrupt {
                table: "images",
                key: img.name.clone(),
                reason: format!("encoding meta_json: {e}"),
            })?;
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    img.name,
                    rootfs,
                    img.kernel,
                    size,
                    img.source,
                    img.managed,
                    img.created_at,
                    meta
                ],
            )
            .map_err(name_conflict("image", &img.name))?;
        Ok(())
    }

    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
                [name],
                image_from_row,
            )
            .optional()
            .map_err(StoreError::sqlite(format!("reading image {name:?}")))?
            .map(decode_image)
            .transpose()
    }

    /// Every image, by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let rows = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))
                .map_err(StoreError::sqlite("listing images"))?;
            stmt.query_map([], image_from_row)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(StoreError::sqlite("listing images"))?
        };
        rows.into_iter().map(decode_image).collect()
    }

    /// Removes an image row; `false` if there was none. Callers check
    /// [`Store::vms_using_image`] first.
    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute("DELETE FROM images WHERE name = ?1", [name])
            .map_err(StoreError::sqlite(format!("deleting image {name:?}")))?;
        Ok(n > 0)
    }

    /// Registers a kernel. A taken name is [`StoreError::AlreadyExists`].
    pub fn insert_kernel(&self, k: &KernelRecord) -> Result<(), StoreError> {
        let vmlinux = path_text("vmlinux", &k.vmlinux)?;
        let initrd = k
            .initrd
            .as_deref()
            .map(|p| path_text("initrd", p))
            .transpose()?;
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO kernels ({KERNEL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    k.name,
                    vmlinux,
                    initrd,
                    k.version,
                    k.sha256,
                    k.source,
                    k.created_at
                ],
            )
            .map_err(name_conflict("kernel", &k.name))?;
        Ok(())
    }

    pub fn get_kernel(&self, name: &str) -> Result<Option<KernelRecord>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {KERNEL_COLUMNS} FROM kernels WHERE name = ?1"),
                [name],
                kernel_from_row,
            )
            .optional()
            .map_err(StoreError::sqlite(format!("reading kernel {name:?}")))
    }

    /// Every kernel, by name.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {KERNEL_COLUMNS} FROM kernels ORDER BY name"
            ))
            .map_err(StoreError::sqlite("listing kernels"))?;
        stmt.query_map([], kernel_from_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(StoreError::sqlite("listing kernels"))
    }

    /// Removes a kernel row; `false` if there was none. Callers check
    /// [`Store::vms_using_kernel`] first.
    pub fn delete_kernel(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute("DELETE FROM kernels WHERE name = ?1", [name])
            .map_err(StoreError::sqlite(format!("deleting kernel {name:?}")))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            rootfs: PathBuf::from(format!("/var/lib/banger/images/{name}/rootfs.ext4")),
            kernel: None,
            size_bytes: 2 * 1024 * 1024 * 1024,
            source: "build:debian".into(),
            managed: true,
            created_at: 1_700_000_000,
            meta: Default::default(),
        }
    }

    fn kernel(name: &str) -> KernelRecord {
        KernelRecord {
            name: name.into(),
            vmlinux: PathBuf::from(format!("/var/lib/banger/kernels/{name}/vmlinux")),
            initrd: None,
            version: "6.1.0-28-cloud-amd64".into(),
            sha256: "ab".repeat(32),
            source: "pull:debian".into(),
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn image_round_trip_none_and_some() {
        let (_d, s) = store();
        let a = image("bookworm");
        let mut b = image("alpine");
        b.kernel = Some("debian-6.1-cloud".into());
        b.managed = false;
        b.source = "oci:docker.io/library/alpine:latest".into();
        b.meta = banger_core::ImageMeta {
            digest: Some(format!("sha256:{}", "c".repeat(64))),
            env: vec!["PATH=/bin".into()],
            workdir: Some("/app".into()),
            has_init: Some(false),
            has_sshd: Some(false),
            package_manager: Some("apk".into()),
            ..Default::default()
        };
        s.insert_image(&a).unwrap();
        s.insert_image(&b).unwrap();
        assert_eq!(s.get_image("bookworm").unwrap(), Some(a.clone()));
        assert_eq!(s.get_image("alpine").unwrap(), Some(b.clone()));
        assert_eq!(s.get_image("missing").unwrap(), None);
        assert_eq!(s.list_images().unwrap(), [b, a]);
        assert!(s.delete_image("alpine").unwrap());
        assert!(!s.delete_image("alpine").unwrap());
        assert_eq!(s.list_images().unwrap().len(), 1);
    }

    #[test]
    fn kernel_round_trip_none_and_some() {
        let (_d, s) = store();
        let a = kernel("debian-6.1-cloud");
        let mut b = kernel("custom");
        b.initrd = Some(PathBuf::from("/var/lib/banger/kernels/custom/initrd.img"));
        s.insert_kernel(&a).unwrap();
        s.insert_kernel(&b).unwrap();
        assert_eq!(s.get_kernel("debian-6.1-cloud").unwrap(), Some(a.clone()));
        assert_eq!(s.get_kernel("custom").unwrap(), Some(b.clone()));
        assert_eq!(s.list_kernels().unwrap(), [b, a]);
        assert!(s.delete_kernel("custom").unwrap());
        assert_eq!(s.get_kernel("custom").unwrap(), None);
    }

    #[test]
    fn duplicate_names_are_already_exists() {
        let (_d, s) = store();
        s.insert_image(&image("x")).unwrap();
        let err = s.insert_image(&image("x")).unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists { what: "image", value } if value == "x"),
            "{err}"
        );
        s.insert_kernel(&kernel("x")).unwrap();
        let err = s.insert_kernel(&kernel("x")).unwrap_err();
        assert!(
            matches!(err, StoreError::AlreadyExists { what: "kernel", .. }),
            "{err}"
        );
    }

    #[test]
    fn non_utf8_path_is_refused() {
        let (_d, s) = store();
        let mut img = image("weird");
        img.rootfs = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff.ext4"));
        assert!(matches!(
            s.insert_image(&img),
            Err(StoreError::Unstorable {
                field: "rootfs",
                ..
            })
        ));
    }

    #[test]
    fn negative_size_is_corrupt() {
        let (_d, s) = store();
        s.insert_image(&image("neg")).unwrap();
        {
            let conn = s.lock();
            conn.execute_batch("PRAGMA ignore_check_constraints = ON")
                .unwrap();
            conn.execute("UPDATE images SET size_bytes = -1", [])
                .unwrap();
        }
        match s.get_image("neg") {
            Err(StoreError::Corrupt { table, key, .. }) => {
                assert_eq!((table, key.as_str()), ("images", "neg"));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
