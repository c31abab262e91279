//! Mounting a disk image's file systems the way the image itself would: find the partition
//! holding `/etc/fstab` (blkid, no udev) and mount the rest per that fstab.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::rootfs::MAX_IMAGE_TEXT;
use anyhow::{anyhow, bail, Context};

use crate::build::{strings, Build, Mounts};
use crate::pipeline::{fstab, Arch};
use crate::rootfs::scoped_join;

/// Where the image's partitions are mounted.
pub(crate) const IMAGE_ROOT: &str = "/mnt/root";
/// Where candidate root partitions are probed.
const PROBE: &str = "/mnt/probe";

/// Find the root partition (the one with `/etc/fstab`) and mount everything per its fstab.
pub(crate) fn mount_image(
    build: &Build<'_>,
    mounts: &mut Mounts,
    disk: &Path,
) -> anyhow::Result<PathBuf> {
    let partitions = probe_partitions(build, disk)?;
    mount_partitions(build, mounts, &partitions).map(|mounted| mounted.root)
}

/// The image mounted per its fstab: the root, and which partition went where.
pub(crate) struct MountedImage {
    pub root: PathBuf,
    /// (partition device, mount point) per mounted fstab entry.
    pub mount_points: Vec<(String, String)>,
}

/// [`mount_image`] over partitions already probed.
pub(crate) fn mount_partitions(
    build: &Build<'_>,
    mounts: &mut Mounts,
    partitions: &[Partition],
) -> anyhow::Result<MountedImage> {
    let partitions: Vec<Partition> = partitions
        .iter()
        .filter(|p| p.fs_type.is_some())
        .cloned()
        .collect();
    if partitions.is_empty() {
        bail!(
            "the input has no partitions with a file system: it is not a disk image vmic can read (expected a GPT/MBR disk with the root file system on a partition)"
        );
    }
    let root_partition = find_root_partition(build, &partitions)?;
    let root = PathBuf::from(IMAGE_ROOT);
    let mut mount_points = Vec::new();
    let fstab_text = {
        let mut probe = Mounts::default();
        let mut argv = strings(["mount", "-o", "ro"]);
        argv.push(root_partition.device.clone());
        argv.push(PROBE.to_string());
        probe.mount(build, argv, Path::new(PROBE))?;
        match crate::rootfs::read_image_text(Path::new(PROBE), "/etc/fstab", MAX_IMAGE_TEXT)
            .context("reading the image's /etc/fstab")?
        {
            Some(text) => text,
            None => bail!("{}", missing_fstab(Path::new(PROBE))),
        }
    };
    let plan = fstab::mount_plan(&fstab_text).context("the image's /etc/fstab")?;
    if !plan.iter().any(|entry| entry.mountpoint == "/") {
        bail!("the image's /etc/fstab has no entry for /");
    }
    for entry in &plan {
        let device = match entry.mountpoint.as_str() {
            // The partition we found the fstab on is the root, whatever fstab calls it.
            "/" => root_partition.device.clone(),
            _ => resolve_device(&partitions, &entry.spec).ok_or_else(|| {
                anyhow!(
                    "/etc/fstab line {}: no partition matches {:?} (mount point {})",
                    entry.line,
                    entry.spec,
                    entry.mountpoint
                )
            })?,
        };
        let target = scoped_join(&root, &entry.mountpoint)?;
        let mut argv = strings(["mount"]);
        if let Some(fstype) = &entry.fstype {
            argv.extend(strings(["-t", fstype]));
        }
        if !entry.options.is_empty() {
            argv.push("-o".into());
            argv.push(entry.options.join(","));
        }
        argv.push(device.clone());
        argv.push(target.to_string_lossy().into_owned());
        mounts.mount(build, argv, &target).with_context(|| {
            format!("mounting {} (fstab line {})", entry.mountpoint, entry.line)
        })?;
        mount_points.push((device, entry.mountpoint.clone()));
    }
    Ok(MountedImage { root, mount_points })
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Partition {
    pub device: String,
    /// 1-based, from the device name.
    pub number: u32,
    pub size_bytes: u64,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub part_uuid: Option<String>,
    pub part_label: Option<String>,
    /// GPT type GUID or MBR type (`0x83`).
    pub part_type: Option<String>,
    pub fs_type: Option<String>,
}

/// What `blkid -p` says about the whole disk: its partition table type, or the file system
/// on it when it has none (an ISO 9660 volume, say).
pub(crate) fn probe_whole_disk(
    build: &Build<'_>,
    disk: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut argv = strings(["blkid", "-p", "-o", "export"]);
    argv.push(disk.to_string_lossy().into_owned());
    let result = build.run_unchecked(&argv, None, Vec::new())?;
    Ok(String::from_utf8_lossy(&result.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect())
}

/// Partitions of `disk` that hold a file system.
fn probe_partitions(build: &Build<'_>, disk: &Path) -> anyhow::Result<Vec<Partition>> {
    let mut partitions = list_partitions(build, disk)?;
    partitions.retain(|partition| partition.fs_type.is_some());
    Ok(partitions)
}

/// Every partition of `disk` with what `blkid` says about it (there is no udev to ask).
pub(crate) fn list_partitions(build: &Build<'_>, disk: &Path) -> anyhow::Result<Vec<Partition>> {
    let name = disk
        .file_name()
        .context("disk path has no name")?
        .to_string_lossy()
        .into_owned();
    let mut devices: Vec<String> = std::fs::read_dir(Path::new("/sys/block").join(&name))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|entry| entry.starts_with(&name))
        .map(|entry| format!("/dev/{entry}"))
        .collect();
    devices.sort_by_key(|device| {
        let number: String = device
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        number
            .chars()
            .rev()
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    let mut partitions = Vec::new();
    for device in devices {
        // blkid exits 2 when it finds nothing on a partition: not an error here.
        let mut argv = strings(["blkid", "-p", "-o", "export"]);
        argv.push(device.clone());
        let result = build.run_unchecked(&argv, None, Vec::new())?;
        let kernel_name = device.trim_start_matches("/dev/");
        let sectors = std::fs::read_to_string(
            Path::new("/sys/block")
                .join(&name)
                .join(kernel_name)
                .join("size"),
        )
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0);
        let number = kernel_name
            .trim_start_matches(name.as_str())
            .trim_start_matches('p')
            .parse()
            .unwrap_or(0);
        let mut partition = Partition {
            device,
            number,
            // /sys/block sizes are in 512-byte sectors whatever the device's block size.
            size_bytes: sectors * 512,
            ..Partition::default()
        };
        for line in String::from_utf8_lossy(&result.stdout).lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = Some(value.to_string());
            match key {
                "UUID" => partition.uuid = value,
                "LABEL" => partition.label = value,
                "PART_ENTRY_UUID" | "PARTUUID" => partition.part_uuid = value,
                "PART_ENTRY_NAME" | "PARTLABEL" => partition.part_label = value,
                "PART_ENTRY_TYPE" => partition.part_type = value,
                "TYPE" => partition.fs_type = value,
                _ => {}
            }
        }
        partitions.push(partition);
    }
    Ok(partitions)
}

fn find_root_partition(build: &Build<'_>, partitions: &[Partition]) -> anyhow::Result<Partition> {
    for partition in partitions {
        let linux_fs = matches!(
            partition.fs_type.as_deref(),
            Some("ext4" | "ext3" | "ext2" | "xfs" | "btrfs")
        );
        if !linux_fs {
            continue;
        }
        let mut probe = Mounts::default();
        let mut argv = strings(["mount", "-o", "ro"]);
        argv.push(partition.device.clone());
        argv.push(PROBE.to_string());
        if probe.mount(build, argv, Path::new(PROBE)).is_err() {
            continue;
        }
        // Any entry named etc/fstab marks the root, checked without following it: a link out
        // of the image (to the builder's /proc/kmsg, say) is refused when it is read.
        if std::fs::symlink_metadata(Path::new(PROBE).join("etc/fstab")).is_ok() {
            return Ok(partition.clone());
        }
    }
    bail!(
        "no partition of the input holds a root file system with /etc/fstab (found: {})",
        partitions
            .iter()
            .map(|p| format!("{} {}", p.device, p.fs_type.as_deref().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Why the root file system has no readable /etc/fstab: absent, or a link that leads nowhere
/// once resolved inside the image (vmic never resolves the image's links in the builder VM).
fn missing_fstab(root: &Path) -> String {
    match std::fs::read_link(root.join("etc/fstab")) {
        Ok(target) => format!(
            "the image's /etc/fstab is a link to {}, which leads to no file inside the image (its links are resolved inside the image, never in the builder VM); make /etc/fstab a regular file",
            target.display()
        ),
        Err(_) => "the image has no /etc/fstab".into(),
    }
}

fn resolve_device(partitions: &[Partition], spec: &fstab::DeviceSpec) -> Option<String> {
    use fstab::DeviceSpec;
    let same =
        |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    partitions
        .iter()
        .find(|p| match spec {
            DeviceSpec::Uuid(uuid) => same(&p.uuid, uuid),
            DeviceSpec::Label(label) => p.label.as_deref() == Some(label.as_str()),
            DeviceSpec::PartUuid(uuid) => same(&p.part_uuid, uuid),
            DeviceSpec::PartLabel(label) => p.part_label.as_deref() == Some(label.as_str()),
            // Device names in the image's world mean nothing here.
            DeviceSpec::Path(_) => false,
        })
        .map(|p| p.device.clone())
}

/// The image's binaries must match the builder VM, which runs them in the chroot.
pub(crate) fn check_arch(root: &Path, arch: Arch) -> anyhow::Result<()> {
    let Some(machine) = image_machine(root) else {
        return Ok(());
    };
    let image_arch = match machine {
        0x3e => Arch::X86_64,
        0xb7 => Arch::Aarch64,
        other => bail!("the image's binaries are for an unsupported machine type {other:#x}"),
    };
    if image_arch != arch {
        bail!(
            "the image is {} but the builder VM is {}: pass --arch {}",
            image_arch.name(),
            arch.name(),
            image_arch.name()
        );
    }
    Ok(())
}

/// The ELF machine number of the image's shell (read inside the image, never followed out).
pub(crate) fn image_machine(root: &Path) -> Option<u16> {
    for candidate in ["/usr/bin/env", "/bin/sh", "/usr/bin/sh"] {
        let Ok(Some(mut file)) = crate::rootfs::open_image_file(root, candidate) else {
            continue;
        };
        let mut header = [0u8; 20];
        if file.read_exact(&mut header).is_err() || &header[..4] != b"\x7fELF" {
            continue;
        }
        return Some(u16::from_le_bytes([header[18], header[19]]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fstab_link_out_of_the_image_is_named_with_its_target() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("etc")).expect("etc");
        let fstab = root.path().join("etc/fstab");
        std::os::unix::fs::symlink("/proc/kmsg", &fstab).expect("link");
        // Resolved inside the image, the link leads nowhere: nothing of the builder is read.
        let read = crate::rootfs::read_image_text(root.path(), "/etc/fstab", MAX_IMAGE_TEXT);
        assert!(matches!(read, Ok(None)), "{read:?}");
        let message = missing_fstab(root.path());
        assert!(
            message.contains("is a link to /proc/kmsg") && message.contains("regular file"),
            "{message}"
        );
        std::fs::remove_file(&fstab).expect("remove");
        assert_eq!(missing_fstab(root.path()), "the image has no /etc/fstab");
    }
}
