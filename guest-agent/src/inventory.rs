//! The image's package inventory (for the host's SBOM) and the build's `SOURCE_DATE_EPOCH`,
//! read from the mounted image: files opened inside the root only, sizes bounded.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use vmic_protocol::{PackageInventory, PackageManager};

use crate::build::Build;
use crate::pipeline::inventory::{self as parse, COPYRIGHT_MAX_BYTES, DPKG_STATUS_MAX_BYTES};
use crate::rootfs::scoped_join;

/// At most `limit` bytes of the regular file `path` inside `root`; `None` when absent or not
/// a regular file (a FIFO or device would block or never end).
fn read_bounded(root: &Path, path: &str, limit: u64) -> Option<String> {
    let full = scoped_join(root, path).ok()?;
    if !std::fs::metadata(&full).ok()?.is_file() {
        return None;
    }
    let mut text = Vec::new();
    std::fs::File::open(&full)
        .ok()?
        .take(limit)
        .read_to_end(&mut text)
        .ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// The installed packages of the image at `root`, from dpkg's status file (licences from the
/// machine-readable copyright files) or, on rpm images, from the image's own `rpm -qa`.
pub fn read_packages(build: &Build<'_>, root: &Path) -> anyhow::Result<PackageInventory> {
    if let Some(status) = read_bounded(root, parse::DPKG_STATUS_PATH, DPKG_STATUS_MAX_BYTES) {
        let mut packages = parse::parse_dpkg_status(&status);
        for package in &mut packages {
            // Multi-Arch packages share one doc directory; names never hold `/` (dpkg refuses).
            if package.name.contains('/') || package.name.starts_with('.') {
                continue;
            }
            let copyright = format!("/usr/share/doc/{}/copyright", package.name);
            package.license = read_bounded(root, &copyright, COPYRIGHT_MAX_BYTES)
                .and_then(|text| parse::copyright_licenses(&text));
        }
        build.log(format!("{} packages in the dpkg database", packages.len()));
        return Ok(PackageInventory {
            manager: Some(PackageManager::Dpkg),
            packages,
        });
    }
    let has_rpm_db = parse::RPM_DB_DIRS
        .iter()
        .any(|dir| scoped_join(root, dir).is_ok_and(|path| path.is_dir()));
    if has_rpm_db {
        let result = build
            .run(&parse::rpm_query_argv(), Some(root))
            .context("listing the image's packages with its rpm")?;
        let packages = parse::parse_rpm_query(&String::from_utf8_lossy(&result.stdout));
        build.log(format!("{} packages in the rpm database", packages.len()));
        return Ok(PackageInventory {
            manager: Some(PackageManager::Rpm),
            packages,
        });
    }
    build.log("the image has no dpkg or rpm database: the SBOM lists no packages");
    Ok(PackageInventory::default())
}

/// The epoch of the image at `root` when the user gave none: its `os-release`'s mtime (see
/// [`parse::OS_RELEASE_PATHS`]); 0 without one.
pub fn epoch_from_image(build: &Build<'_>, root: &Path) -> u64 {
    for path in parse::OS_RELEASE_PATHS {
        let mtime = scoped_join(root, path)
            .ok()
            .and_then(|full| std::fs::metadata(full).ok())
            .and_then(|meta| meta.modified().ok())
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok());
        if let Some(mtime) = mtime {
            build.log(format!(
                "SOURCE_DATE_EPOCH={} (mtime of the image's {path})",
                mtime.as_secs()
            ));
            return mtime.as_secs();
        }
    }
    build.log("SOURCE_DATE_EPOCH=0: the image has no os-release");
    0
}
