//! `os.bootloader.resetType: hard-reset` carried out on the mounted image (the pure part is
//! [`crate::pipeline::bootloader`]).

use std::path::Path;

use anyhow::Context;

use crate::build::{strings, Build};
use crate::customize::{read_optional, rewrite_file};
use crate::pipeline::{self, bootloader, fstab};

/// Write the image's grub.cfg anew from its kernels, fstab and file systems.
pub(crate) fn hard_reset(build: &Build<'_>, root: &Path) -> anyhow::Result<()> {
    let fstab_text = read_optional(root, "/etc/fstab")?;
    let plan = fstab::mount_plan(&fstab_text).context("the image's /etc/fstab")?;
    let root_entry = plan
        .iter()
        .find(|entry| entry.mountpoint == "/")
        .context("the image's /etc/fstab has no entry for /")?;
    let own_boot = plan.iter().any(|entry| entry.mountpoint == "/boot");
    // The file system grub must search for: /boot's own, or the root's that holds /boot.
    // The image's links resolve inside the image, never in the builder VM.
    let boot_dir = crate::rootfs::scoped_join(root, "/boot")?;
    let boot_mount = if own_boot {
        boot_dir.clone()
    } else {
        root.to_path_buf()
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let device = bootloader::mount_source(&mountinfo, &boot_mount.to_string_lossy())
        .with_context(|| format!("{} is not a mount point", boot_mount.display()))?;
    let mut argv = strings(["blkid", "-p", "-o", "value", "-s", "UUID"]);
    argv.push(device.clone());
    let uuid = String::from_utf8_lossy(&build.run(&argv, None)?.stdout).into_owned();
    let names: Vec<String> = std::fs::read_dir(&boot_dir)
        .context("reading the image's /boot")?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let settings = bootloader::ResetSettings {
        os_name: crate::inspect::image_os(root)
            .and_then(|os| os.pretty_name)
            .unwrap_or_else(|| "Linux".to_owned()),
        boot_fs_uuid: bootloader::check_uuid(&uuid)?.to_owned(),
        boot_prefix: if own_boot { "" } else { "/boot" },
        root_arg: bootloader::root_arg(&root_entry.spec)?,
        kernels: bootloader::boot_kernels(&names)?,
    };
    let text = bootloader::reset_grub_cfg(&settings);
    rewrite_file(root, pipeline::IMAGE_GRUB_CFG, text.as_bytes())?;
    build.log(format!(
        "boot loader reset: {} written anew ({} kernel(s), newest {}; {} found by UUID {}; {})",
        pipeline::IMAGE_GRUB_CFG,
        settings.kernels.len(),
        settings.kernels[0].version,
        if own_boot { "/boot" } else { "/" },
        settings.boot_fs_uuid,
        settings.root_arg,
    ));
    Ok(())
}
