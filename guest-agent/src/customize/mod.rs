//! Customizing a mounted image: `os.*` settings, then the chroot the scripts run in. Shared by
//! the ISO and the disk pipelines.

use std::path::Path;

use anyhow::{bail, Context};
use vmic_protocol::{Customization, FileCopy, FileSource, Script};

use crate::build::{fs_create_dir_all, output_tail, strings, Build, Mounts};

mod bootloader;
mod dirs;
pub(crate) mod history;
pub(crate) mod modules;
mod packages;
mod selinux;
mod services;
mod users;
use crate::pipeline;
use crate::rootfs::{self, scoped_join};

/// The config directory inside the image while scripts run.
pub(crate) const IMAGE_CONFIGS: &str = "/_imageconfigs";

pub(crate) fn write_file(root: &Path, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let target = scoped_join(root, path)?;
    rootfs::check_writable(&target, path)?;
    if let Some(parent) = target.parent() {
        fs_create_dir_all(parent)?;
    }
    std::fs::write(&target, data).with_context(|| format!("writing {path}"))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the permissions of {path}"))?;
    Ok(())
}

/// Replace the content of an existing file of the image, keeping its owner and mode.
pub(crate) fn rewrite_file(root: &Path, path: &str, data: &[u8]) -> anyhow::Result<()> {
    let target = scoped_join(root, path)?;
    rootfs::check_writable(&target, path)?;
    std::fs::write(&target, data).with_context(|| format!("writing {path}"))
}

pub(crate) fn copy_additional_files(root: &Path, files: &[FileCopy]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for file in files {
        let (data, default_mode) = match &file.source {
            FileSource::Content(content) => (content.as_bytes().to_vec(), 0o644),
            FileSource::Path(source) => {
                let data = std::fs::read(source).with_context(|| format!("reading {source}"))?;
                let mode = std::fs::metadata(source)?.permissions().mode() & 0o7777;
                (data, mode)
            }
        };
        write_file(
            root,
            &file.destination,
            &data,
            file.permissions.unwrap_or(default_mode),
        )
        .with_context(|| format!("adding {}", file.destination))?;
    }
    Ok(())
}

/// Mount the chroot, apply `os.*` in AzL-IC's order, then run the scripts. The chroot mounts
/// are returned still mounted: the ISO pipeline runs dracut in them next.
/// Apply the customization; `epoch` dates the image history entry.
pub(crate) fn customize_image(
    build: &Build<'_>,
    root: &Path,
    customization: &Customization,
    epoch: u64,
) -> anyhow::Result<Mounts> {
    let os = &customization.os;
    let mut chroot_mounts = Mounts::default();
    mount_chroot(
        build,
        &mut chroot_mounts,
        root,
        Path::new(&customization.config_dir),
    )?;
    packages::apply(build, root, &os.packages).context("os.packages")?;
    if let Some(hostname) = &os.hostname {
        write_file(
            root,
            "/etc/hostname",
            format!("{hostname}\n").as_bytes(),
            0o644,
        )?;
        build.log(format!("hostname set to {hostname}"));
    }
    dirs::copy_additional_dirs(root, &os.additional_dirs).context("os.additionalDirs")?;
    copy_additional_files(root, &os.additional_files).context("os.additionalFiles")?;
    users::apply_groups(build, root, &os.groups).context("os.groups")?;
    users::apply_users(build, root, &os.users).context("os.users")?;
    services::apply(build, root, &os.services).context("os.services")?;
    modules::apply(root, &os.modules).context("os.modules")?;
    // Before the kernel args and SELinux, which then apply to the new config.
    if let Some(vmic_protocol::BootloaderReset::HardReset) = os.bootloader_reset {
        bootloader::hard_reset(build, root).context("os.bootloader.resetType")?;
    }
    if !os.kernel_args.is_empty() {
        let text = read_grub_cfg(root).context("os.kernelCommandLine")?;
        let text = pipeline::grub_cfg::append_kernel_args(&text, &os.kernel_args)
            .context("os.kernelCommandLine")?;
        rewrite_file(root, pipeline::IMAGE_GRUB_CFG, text.as_bytes())?;
    }
    let relabel_with = match os.selinux_mode {
        Some(mode) => selinux::apply(build, root, mode).context("os.selinux")?,
        None => None,
    };
    run_scripts(build, root, &customization.post_customization)?;
    if let Some(entry) = &os.image_history {
        history::append(root, entry, epoch).context("os.imageHistory")?;
        build.log(format!(
            "image history: entry appended to {}",
            history::HISTORY_PATH
        ));
    }
    // Labels last, so that files the scripts wrote get them too.
    if let Some(policy_type) = relabel_with {
        selinux::relabel(build, root, &policy_type).context("os.selinux: relabeling")?;
    }
    run_scripts(build, root, &customization.finalize_customization)?;
    Ok(chroot_mounts)
}

/// A file of the image, or "" when it does not exist.
pub(crate) fn read_optional(root: &Path, path: &str) -> anyhow::Result<String> {
    Ok(rootfs::read_image_text(root, path, rootfs::MAX_IMAGE_TEXT)?.unwrap_or_default())
}

/// The image's grub.cfg, which must exist.
pub(crate) fn read_grub_cfg(root: &Path) -> anyhow::Result<String> {
    rootfs::read_image_text(root, pipeline::IMAGE_GRUB_CFG, rootfs::MAX_IMAGE_TEXT)?
        .with_context(|| format!("the image has no {}", pipeline::IMAGE_GRUB_CFG))
}

/// Mount what programs in the chroot need, and the config directory read-only.
pub(crate) fn mount_chroot(
    build: &Build<'_>,
    mounts: &mut Mounts,
    root: &Path,
    config_dir: &Path,
) -> anyhow::Result<()> {
    let target = |path: &str| scoped_join(root, path);
    // What programs in the chroot (scripts, dracut) need, as data: mount argv prefix, target.
    const CHROOT_MOUNTS: [(&[&str], &str); 4] = [
        (&["mount", "-t", "proc", "proc"], "/proc"),
        (&["mount", "-t", "sysfs", "sysfs"], "/sys"),
        (&["mount", "--bind", "/dev"], "/dev"),
        (&["mount", "-t", "tmpfs", "tmpfs"], "/run"),
    ];
    for (prefix, path) in CHROOT_MOUNTS {
        let mountpoint = target(path)?;
        let mut argv: Vec<String> = prefix.iter().map(|arg| arg.to_string()).collect();
        argv.push(mountpoint.to_string_lossy().into_owned());
        mounts.mount(build, argv, &mountpoint)?;
    }
    let configs = target(IMAGE_CONFIGS)?;
    let mut argv = strings(["mount", "--bind"]);
    argv.push(config_dir.to_string_lossy().into_owned());
    argv.push(configs.to_string_lossy().into_owned());
    mounts.mount(build, argv, &configs)?;
    let mut argv = strings(["mount", "-o", "remount,bind,ro"]);
    argv.push(configs.to_string_lossy().into_owned());
    build.run(&argv, None)?;
    Ok(())
}

pub(crate) fn remove_config_mountpoint(root: &Path) {
    if let Ok(path) = scoped_join(root, IMAGE_CONFIGS) {
        let _ = std::fs::remove_dir(path);
    }
}

pub(crate) fn run_scripts(
    build: &Build<'_>,
    root: &Path,
    scripts: &[Script],
) -> anyhow::Result<()> {
    for (index, script) in scripts.iter().enumerate() {
        build.context.cancel.check()?;
        build.log(format!("running script {}", script.name));
        let temp = format!("/tmp/.vmic-script-{index}");
        let path_in_image = match &script.source {
            FileSource::Path(relative) => format!("{IMAGE_CONFIGS}/{relative}"),
            FileSource::Content(content) => {
                write_file(root, &temp, content.as_bytes(), 0o700)?;
                temp.clone()
            }
        };
        let mut argv = vec![script
            .interpreter
            .clone()
            .unwrap_or_else(|| "/bin/sh".to_string())];
        argv.push(path_in_image);
        argv.extend(script.arguments.iter().cloned());
        let result = build.run_unchecked(&argv, Some(root), script.environment.clone());
        if matches!(script.source, FileSource::Content(_)) {
            if let Ok(path) = scoped_join(root, &temp) {
                let _ = std::fs::remove_file(path);
            }
        }
        let result = result.with_context(|| format!("script {}", script.name))?;
        for line in String::from_utf8_lossy(&result.stdout).lines() {
            build.log(format!("{}: {line}", script.name));
        }
        if result.code != 0 {
            bail!(
                "script {} failed with exit code {}{}",
                script.name,
                result.code,
                output_tail(&result)
            );
        }
    }
    Ok(())
}
