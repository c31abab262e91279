//! Listing the virtio disks the host attached, identified by their serial strings.

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use vmic_protocol::DiskInfo;

pub const SYS_BLOCK: &str = "/sys/block";

/// Every `vd*` block device under `sys_block` with its serial and size, in kernel order
/// (`vda` … `vdz`, `vdaa` …).
pub fn list(sys_block: &Path) -> anyhow::Result<Vec<DiskInfo>> {
    let entries =
        fs::read_dir(sys_block).with_context(|| format!("listing {}", sys_block.display()))?;
    let mut disks: Vec<DiskInfo> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if !name.starts_with("vd") {
                return None;
            }
            let read = |file: &str| fs::read_to_string(entry.path().join(file)).unwrap_or_default();
            let sectors: u64 = read("size").trim().parse().unwrap_or(0);
            Some(DiskInfo {
                serial: read("serial").trim().to_owned(),
                size_bytes: sectors * 512,
                name,
            })
        })
        .collect();
    disks.sort_by(|a, b| (a.name.len(), &a.name).cmp(&(b.name.len(), &b.name)));
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_virtio_disks_with_serial_and_size() {
        let sys = tempfile::tempdir().expect("temp dir");
        for (name, serial, sectors) in [
            ("vdaa", Some("extra"), "8"),
            ("vdb", Some("output\n"), "2048\n"),
            ("vda", Some("input"), "4096"),
            ("vdc", None, "1"),
            ("sr0", Some("cdrom"), "1"),
        ] {
            let dir = sys.path().join(name);
            fs::create_dir(&dir).expect("dir");
            fs::write(dir.join("size"), sectors).expect("size");
            if let Some(serial) = serial {
                fs::write(dir.join("serial"), serial).expect("serial");
            }
        }
        let disks = list(sys.path()).expect("listed");
        let summary: Vec<(&str, &str, u64)> = disks
            .iter()
            .map(|disk| (disk.name.as_str(), disk.serial.as_str(), disk.size_bytes))
            .collect();
        assert_eq!(
            summary,
            [
                ("vda", "input", 4096 * 512),
                ("vdb", "output", 2048 * 512),
                ("vdc", "", 512),
                ("vdaa", "extra", 8 * 512),
            ]
        );
    }
}
