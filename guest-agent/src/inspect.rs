//! `vmic inspect` as the agent runs it: what the disk holds (partitions, file systems, the OS,
//! its boot files and packages) and whether `vmic customize` can make a LiveOS ISO of it,
//! decided by the same checks the ISO build runs. Every list is bounded.

use std::path::Path;

use anyhow::{bail, Context};
use vmic_protocol::{
    InspectedBootLoader, InspectedDracut, InspectedFileSystem, InspectedOs, InspectedPackages,
    InspectedPartition, InspectedVerdict, InspectedVmicIso, Inspection, PackageManager,
    MAX_INSPECTION_ITEMS,
};

use crate::build::{disk_by_serial, fs_create_dir_all, strings, Build, Mounts};
use crate::context::RequestContext;
use crate::image::{image_machine, list_partitions, mount_partitions, probe_whole_disk};
use crate::iso::{
    check_dracut, collect_boot_files, has_dmsquash_live, has_dracut, read_grub_cfg, vm_arch,
};
use crate::pipeline::{self, grub_cfg, inventory, iso_record, BootFile, EfiGrubSource};
use crate::rootfs::{read_image_text, scoped_join, MAX_IMAGE_TEXT};

/// Where an ISO is mounted, and its `rootfs.img` below it.
const ISO_MOUNT: &str = "/mnt/inspect-iso";
const ISO_ROOTFS_MOUNT: &str = "/mnt/inspect-rootfs";

pub fn inspect(serial: &str, context: &RequestContext) -> anyhow::Result<Inspection> {
    let build = Build::new(context);
    let disk = disk_by_serial(serial)?.device;
    let whole = probe_whole_disk(&build, &disk)?;
    let value = |key: &str| {
        whole
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    };
    let mut report = Inspection {
        partition_table: value("PTTYPE"),
        whole_disk: value("TYPE").map(|kind| InspectedFileSystem {
            kind,
            label: value("LABEL"),
            uuid: value("UUID"),
        }),
        ..Inspection::default()
    };
    let mut mounts = Mounts::default();
    if report
        .whole_disk
        .as_ref()
        .is_some_and(|fs| fs.kind == "iso9660")
    {
        inspect_iso(&build, &mut mounts, &disk, &mut report)?;
    } else {
        inspect_disk(&build, &mut mounts, &disk, &mut report)?;
    }
    Ok(report)
}

/// A partitioned disk image: its partitions, then the OS mounted per its fstab.
fn inspect_disk(
    build: &Build<'_>,
    mounts: &mut Mounts,
    disk: &Path,
    report: &mut Inspection,
) -> anyhow::Result<()> {
    let partitions = list_partitions(build, disk)?;
    if partitions.is_empty() && report.whole_disk.is_none() {
        bail!(
            "not a disk image: no partition table, file system or ISO 9660 volume on it (vmic reads GPT/MBR disk images and its own LiveOS ISOs)"
        );
    }
    report.truncated |= partitions.len() > MAX_INSPECTION_ITEMS;
    report.partitions = partitions
        .iter()
        .take(MAX_INSPECTION_ITEMS)
        .map(|partition| InspectedPartition {
            number: partition.number,
            size_bytes: partition.size_bytes,
            type_id: partition.part_type.clone(),
            part_uuid: partition.part_uuid.clone(),
            part_label: partition.part_label.clone(),
            file_system: partition.fs_type.clone().map(|kind| InspectedFileSystem {
                kind,
                label: partition.label.clone(),
                uuid: partition.uuid.clone(),
            }),
            mount_point: None,
        })
        .collect();
    let mounted = match mount_partitions(build, mounts, &partitions) {
        Ok(mounted) => mounted,
        Err(error) => {
            // Nothing more to read, and the reason is the verdict: the build would stop here.
            report.live_os = InspectedVerdict {
                possible: false,
                reasons: vec![format!("{error:#}")],
            };
            return Ok(());
        }
    };
    for (device, mount_point) in &mounted.mount_points {
        let Some(index) = partitions.iter().position(|p| &p.device == device) else {
            continue;
        };
        if let Some(partition) = report.partitions.get_mut(index) {
            partition.mount_point = Some(mount_point.clone());
        }
    }
    let root = &mounted.root;
    let boot_files = collect_boot_files(root)?;
    describe_os(build, root, &boot_files, report)?;
    report.live_os = live_os_verdict(root, &boot_files);
    mounts.unmount_below(root);
    Ok(())
}

/// An ISO: vmic's settings record when it has one, the OS from its `rootfs.img`.
fn inspect_iso(
    build: &Build<'_>,
    mounts: &mut Mounts,
    disk: &Path,
    report: &mut Inspection,
) -> anyhow::Result<()> {
    let iso = Path::new(ISO_MOUNT);
    mounts
        .mount_iso(build, disk, iso)
        .context("the disk says ISO 9660 but does not mount as one")?;
    let record = read_image_text(iso, iso_record::ISO_SETTINGS_PATH, MAX_IMAGE_TEXT)
        .context("the ISO's settings record")?
        .map(|text| iso_record::IsoSettingsRecord::parse(&text))
        .transpose()
        .context("the ISO's settings record")?;
    report.vmic_iso = record.as_ref().map(|record| InspectedVmicIso {
        vmic_version: record.vmic_version.clone(),
        label: record.label.clone(),
        kernel_versions: bounded(&record.kernel_versions, &mut report.truncated),
        user_kernel_args: bounded(&record.kernel_args_from_user, &mut report.truncated),
        created_unix_seconds: record.created_unix_seconds,
        rootfs_sha256: record.rootfs_sha256.clone(),
    });
    let boot_files = collect_boot_files(iso)?;
    let has_rootfs = scoped_join(iso, pipeline::ISO_ROOTFS_IMG).is_ok_and(|path| path.is_file());
    if has_rootfs {
        let rootfs = Path::new(ISO_ROOTFS_MOUNT);
        fs_create_dir_all(rootfs)?;
        let mut argv = strings(["mount", "-t", "squashfs", "-o", "ro,loop"]);
        argv.push(
            iso.join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'))
                .to_string_lossy()
                .into_owned(),
        );
        argv.push(ISO_ROOTFS_MOUNT.to_string());
        mounts
            .mount(build, argv, rootfs)
            .context("mounting the ISO's rootfs.img")?;
        // The kernels and initrds are the ISO's own (/boot on the ISO), the OS is the rootfs'.
        describe_os(build, rootfs, &boot_files, report)?;
        mounts.unmount_below(rootfs);
    }
    report.live_os = match (&record, has_rootfs) {
        (Some(_), true) => InspectedVerdict {
            possible: true,
            reasons: Vec::new(),
        },
        (None, _) => verdict_no(format!(
            "the ISO was not made by vmic (it has no {}): only vmic's LiveOS ISOs can be re-customized",
            iso_record::ISO_SETTINGS_PATH
        )),
        (Some(_), false) => verdict_no(format!(
            "the ISO has no {}",
            pipeline::ISO_ROOTFS_IMG
        )),
    };
    mounts.unmount_below(iso);
    Ok(())
}

/// The OS at `root`: os-release, architecture, kernels and initrds among `boot_files`, boot
/// loader files, package database, dracut.
fn describe_os(
    build: &Build<'_>,
    root: &Path,
    boot_files: &[BootFile],
    report: &mut Inspection,
) -> anyhow::Result<()> {
    report.os = image_os(root);
    report.architecture = image_machine(root).map(|machine| match machine {
        0x3e => "x86_64".to_string(),
        0xb7 => "aarch64".to_string(),
        other => format!("ELF machine {other:#x}"),
    });
    let kernels: Vec<String> = boot_files
        .iter()
        .filter_map(|file| file.path.strip_prefix("/boot/vmlinuz-"))
        .map(str::to_string)
        .collect();
    report.kernels = bounded(&kernels, &mut report.truncated);
    let initrds: Vec<String> = boot_files
        .iter()
        .filter(|file| is_initrd(&file.path))
        .map(|file| file.path.clone())
        .collect();
    report.initrds = bounded(&initrds, &mut report.truncated);
    let efi_binaries: Vec<String> = boot_files
        .iter()
        .filter(|file| file.path.to_ascii_lowercase().ends_with(".efi"))
        .map(|file| file.path.clone())
        .collect();
    let arch = vm_arch();
    let named = |name: &str| {
        boot_files
            .iter()
            .find(|file| file.file_name().eq_ignore_ascii_case(name))
            .map(|file| file.path.clone())
    };
    report.boot_loader = InspectedBootLoader {
        efi_binaries: bounded(&efi_binaries, &mut report.truncated),
        shim: named(&arch.shim_name()),
        grub_efi: named(&arch.grub_name()).or_else(|| named(&arch.grub_noprefix_name())),
        grub_cfg: ["/boot/grub2/grub.cfg", "/boot/grub/grub.cfg"]
            .into_iter()
            .find(|path| boot_files.iter().any(|file| file.path == *path))
            .map(str::to_string),
    };
    let packages = crate::inventory::read_packages(build, root)?;
    report.packages = packages.manager.map(|manager| InspectedPackages {
        manager: match manager {
            PackageManager::Dpkg => "dpkg",
            PackageManager::Rpm => "rpm",
            PackageManager::Invalid => "unknown",
        }
        .to_string(),
        count: packages.packages.len() as u64,
    });
    report.dracut = InspectedDracut {
        installed: has_dracut(root),
        dmsquash_live: has_dmsquash_live(root),
    };
    Ok(())
}

/// Every check of the disk → ISO build that can fail before anything is written, each
/// reason in the build's own words.
fn live_os_verdict(root: &Path, boot_files: &[BootFile]) -> InspectedVerdict {
    let mut reasons = Vec::new();
    if let Err(error) = crate::image::check_arch(root, vm_arch()) {
        reasons.push(format!("{error:#}"));
    }
    match read_grub_cfg(root) {
        Ok(text) => {
            let settings = grub_cfg::IsoBootSettings {
                label: "CDROM".to_string(),
                user_args: Vec::new(),
                dropped_args: Vec::new(),
            };
            match grub_cfg::rewrite_for_iso(&text, &settings) {
                Ok(rewritten) => {
                    if let Err(error) = pipeline::plan_iso_tree(
                        vm_arch(),
                        boot_files,
                        &rewritten.initrd_file_names(),
                        EfiGrubSource::Image,
                    ) {
                        reasons.push(error.to_string());
                    }
                }
                Err(error) => reasons.push(format!("the image's grub.cfg: {error}")),
            }
        }
        Err(error) => reasons.push(format!("{error:#}")),
    }
    if let Err(error) = check_dracut(root) {
        reasons.push(format!("{error:#}"));
    }
    InspectedVerdict {
        possible: reasons.is_empty(),
        reasons,
    }
}

fn verdict_no(reason: String) -> InspectedVerdict {
    InspectedVerdict {
        possible: false,
        reasons: vec![reason],
    }
}

fn is_initrd(path: &str) -> bool {
    let Some(name) = path.strip_prefix("/boot/") else {
        return false;
    };
    !name.contains('/')
        && (name.starts_with("initrd.img-")
            || (name.starts_with("initramfs-") && name.ends_with(".img")))
}

fn bounded(items: &[String], truncated: &mut bool) -> Vec<String> {
    *truncated |= items.len() > MAX_INSPECTION_ITEMS;
    items.iter().take(MAX_INSPECTION_ITEMS).cloned().collect()
}

/// The image's os-release, from the first of [`inventory::OS_RELEASE_PATHS`] it has.
pub(crate) fn image_os(root: &Path) -> Option<InspectedOs> {
    inventory::OS_RELEASE_PATHS
        .iter()
        .find_map(|path| read_image_text(root, path, MAX_IMAGE_TEXT).ok().flatten())
        .map(|text| parse_os_release(&text))
}

/// `KEY=value` lines, values optionally quoted (os-release(5)).
fn parse_os_release(text: &str) -> InspectedOs {
    let mut os = InspectedOs::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value)
            .to_string();
        match key {
            "ID" => os.id = Some(value),
            "VERSION_ID" => os.version_id = Some(value),
            "PRETTY_NAME" => os.pretty_name = Some(value),
            _ => {}
        }
    }
    os
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted_and_unknown_keys_ignored() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=Debian\nVERSION_ID='12'\n\
             ID=debian\n# a comment\nbroken line\n",
        );
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(
            os.pretty_name.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn initrds_are_the_two_naming_schemes_directly_under_boot() {
        for (path, expected) in [
            ("/boot/initrd.img-6.1.0-18-amd64", true),
            ("/boot/initramfs-6.6.1.azl3.img", true),
            ("/boot/initramfs-6.6.1.azl3", false),
            ("/boot/grub2/initrd.img-6.1", false),
            ("/boot/vmlinuz-6.1.0-18-amd64", false),
            ("/etc/initrd.img-1", false),
        ] {
            assert_eq!(is_initrd(path), expected, "{path}");
        }
    }

    #[test]
    fn lists_are_cut_at_the_bound_and_say_so() {
        let mut truncated = false;
        let few: Vec<String> = (0..3).map(|n| n.to_string()).collect();
        assert_eq!(bounded(&few, &mut truncated), few);
        assert!(!truncated);
        let many: Vec<String> = (0..MAX_INSPECTION_ITEMS + 1)
            .map(|n| n.to_string())
            .collect();
        assert_eq!(bounded(&many, &mut truncated).len(), MAX_INSPECTION_ITEMS);
        assert!(truncated);
    }
}
