//! `os.selinux.mode` (disk outputs): `/etc/selinux/config`, the kernel arguments, and file
//! labels.
//!
//! As AzL-IC: the mode goes into `SELINUX=` of the config file and the kernel command line
//! enables or disables SELinux (`force-enforcing` also pins `enforcing=1` there); when SELinux
//! is on, every file system of the image that can hold labels is relabeled with the image's
//! own `setfiles`, since an unlabeled image does not boot with SELinux enforcing.

use std::path::Path;

use anyhow::{bail, Context};
use vmic_protocol::SelinuxMode;

use crate::build::{strings, Build};
use crate::pipeline::grub_cfg::{self, GrubCfgError};
use crate::pipeline::IMAGE_GRUB_CFG;
use crate::rootfs::{read_image_text, scoped_join, MAX_IMAGE_TEXT};

const CONFIG: &str = "/etc/selinux/config";
/// The policy when the config names none (also what a created config names).
const DEFAULT_TYPE: &str = "targeted";
/// File systems `setfiles` can label; every other mount below the image root is skipped.
const LABELED_FS_TYPES: [&str; 5] = ["ext2", "ext3", "ext4", "xfs", "btrfs"];

/// Configure the mode; returns the policy type whose labels the image needs once everything
/// (scripts included) has written its files, or `None` when SELinux is off.
pub(crate) fn apply(
    build: &Build<'_>,
    root: &Path,
    mode: SelinuxMode,
) -> anyhow::Result<Option<String>> {
    let config = read_image_text(root, CONFIG, MAX_IMAGE_TEXT)?;
    let policy_type = config
        .as_deref()
        .map_or(DEFAULT_TYPE.to_owned(), policy_type);
    let policy_dir = format!("/etc/selinux/{policy_type}/policy");
    if mode != SelinuxMode::Disabled && !scoped_join(root, &policy_dir)?.is_dir() {
        bail!(
            "os.selinux.mode: the image has no SELinux policy installed ({policy_dir} is \
             missing; install selinux-policy-{policy_type} (Azure Linux, Fedora) or \
             selinux-policy-default (Debian, Ubuntu) with os.packages)"
        );
    }

    let grub_cfg = set_kernel_args(&super::read_grub_cfg(root)?, mode)?;

    super::write_file(
        root,
        CONFIG,
        config_text(config.as_deref(), mode).as_bytes(),
        0o644,
    )?;
    super::rewrite_file(root, IMAGE_GRUB_CFG, grub_cfg.as_bytes())?;
    build.log(format!("SELinux set to {}", config_mode(mode)));

    Ok((mode != SelinuxMode::Disabled).then_some(policy_type))
}

/// Label every file with the policy's file contexts, as AzL-IC does with `setfiles`.
pub(crate) fn relabel(build: &Build<'_>, root: &Path, policy_type: &str) -> anyhow::Result<()> {
    let contexts = format!("/etc/selinux/{policy_type}/contexts/files/file_contexts");
    if !scoped_join(root, &contexts)?.is_file() {
        bail!("the image's SELinux policy has no {contexts}: cannot label its files");
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading the mounts")?;
    let mut excludes = unlabeled_mounts(&mounts, root);
    // Bind-mounted read-only by the chroot setup; never part of the image.
    excludes.push(super::IMAGE_CONFIGS.to_owned());
    excludes.sort();
    excludes.dedup();
    build.log("labeling the image's files for SELinux");
    build
        .run(&setfiles_argv(&contexts, &excludes), Some(root))
        .context("labeling the image's files (setfiles, from policycoreutils in the image)")?;
    Ok(())
}

/// `setfiles` over the whole image, run in its chroot. `-m`: do not skip mounts that lack the
/// `seclabel` option, which none has while the builder's kernel runs without SELinux.
fn setfiles_argv(contexts: &str, excludes: &[String]) -> Vec<String> {
    let mut argv = strings(["setfiles", "-m"]);
    for exclude in excludes {
        argv.push("-e".to_owned());
        argv.push(exclude.clone());
    }
    argv.push(contexts.to_owned());
    argv.push("/".to_owned());
    argv
}

/// The image paths of mounts below `root` that `setfiles` must skip: read-only ones and
/// those of file systems without labels (proc, sysfs, devtmpfs, tmpfs, vfat, ...).
fn unlabeled_mounts(proc_mounts: &str, root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for line in proc_mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, mountpoint, fs_type, options, ..] = fields[..] else {
            continue;
        };
        let mountpoint = unescape_mount_path(mountpoint);
        let Ok(relative) = Path::new(&mountpoint).strip_prefix(root) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let read_only = options.split(',').any(|option| option == "ro");
        if read_only || !LABELED_FS_TYPES.contains(&fs_type) {
            out.push(format!("/{}", relative.display()));
        }
    }
    out
}

/// `/proc/mounts` writes space, tab, newline and backslash in paths as octal escapes.
fn unescape_mount_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(index) = rest.find('\\') {
        out.push_str(&rest[..index]);
        let escape = rest.get(index + 1..index + 4);
        match escape.and_then(|digits| u8::from_str_radix(digits, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[index + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[index + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn config_mode(mode: SelinuxMode) -> &'static str {
    match mode {
        SelinuxMode::Disabled => "disabled",
        SelinuxMode::Permissive => "permissive",
        SelinuxMode::Enforcing | SelinuxMode::ForceEnforcing => "enforcing",
    }
}

/// The SELinux args the kernel command line gets; existing ones are replaced.
fn kernel_args(mode: SelinuxMode) -> Vec<&'static str> {
    match mode {
        SelinuxMode::Disabled => vec!["selinux=0"],
        SelinuxMode::Permissive | SelinuxMode::Enforcing => vec!["security=selinux", "selinux=1"],
        SelinuxMode::ForceEnforcing => vec!["security=selinux", "selinux=1", "enforcing=1"],
    }
}

/// `SELINUXTYPE=` of a config file (the policy name), or [`DEFAULT_TYPE`].
fn policy_type(config: &str) -> String {
    config
        .lines()
        .filter_map(|line| line.trim().strip_prefix("SELINUXTYPE="))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .rfind(|value| !value.is_empty())
        .unwrap_or_else(|| DEFAULT_TYPE.to_owned())
}

/// The config with `SELINUX=<mode>`: the first `SELINUX=` line is replaced, later ones are
/// dropped, every other line is kept; a missing config is created with the default policy.
fn config_text(config: Option<&str>, mode: SelinuxMode) -> String {
    let setting = format!("SELINUX={}", config_mode(mode));
    let Some(config) = config else {
        return format!("{setting}\nSELINUXTYPE={DEFAULT_TYPE}\n");
    };
    let mut out = String::with_capacity(config.len() + setting.len());
    let mut written = false;
    for line in config.lines() {
        if line.trim_start().starts_with("SELINUX=") {
            if !written {
                out.push_str(&setting);
                out.push('\n');
                written = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !written {
        out.push_str(&setting);
        out.push('\n');
    }
    out
}

/// Drop `security=`, `selinux=` and `enforcing=` from every `linux` command and append the
/// mode's args.
fn set_kernel_args(grub_cfg: &str, mode: SelinuxMode) -> Result<String, GrubCfgError> {
    grub_cfg::replace_kernel_args(
        grub_cfg,
        &["security", "selinux", "enforcing"],
        &kernel_args(mode),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const AZL_GRUB: &str = "set timeout=0\nmenuentry \"AzL\" {\n\tlinux $bootprefix/$mariner_linux security=selinux selinux=1 rd.auto=1 root=$rootdevice $mariner_cmdline\n\tinitrd $bootprefix/$mariner_initrd\n}\n";

    #[test]
    fn kernel_args_replace_earlier_selinux_args_idempotently() {
        let disabled = set_kernel_args(AZL_GRUB, SelinuxMode::Disabled).expect("disabled");
        assert_eq!(
            disabled,
            "set timeout=0\nmenuentry \"AzL\" {\n\tlinux $bootprefix/$mariner_linux rd.auto=1 root=$rootdevice $mariner_cmdline selinux=0\n\tinitrd $bootprefix/$mariner_initrd\n}\n"
        );
        let forced =
            set_kernel_args(&disabled, SelinuxMode::ForceEnforcing).expect("force-enforcing");
        assert!(forced.contains(
            "\tlinux $bootprefix/$mariner_linux rd.auto=1 root=$rootdevice $mariner_cmdline security=selinux selinux=1 enforcing=1\n"
        ));
        assert_eq!(
            set_kernel_args(&forced, SelinuxMode::ForceEnforcing).expect("again"),
            forced
        );
        let enforcing = set_kernel_args(&forced, SelinuxMode::Enforcing).expect("enforcing");
        assert!(!enforcing.contains("enforcing=1"));
    }

    #[test]
    fn a_grub_cfg_without_linux_commands_is_an_error() {
        assert_eq!(
            set_kernel_args("configfile /boot/grub2/other.cfg\n", SelinuxMode::Disabled),
            Err(GrubCfgError::NoLinuxCommand)
        );
    }

    #[test]
    fn the_config_keeps_other_lines_and_is_created_when_missing() {
        let config = "# comment\nSELINUX=disabled\nSELINUXTYPE=mls\nSELINUX=permissive\n";
        let enforcing = config_text(Some(config), SelinuxMode::ForceEnforcing);
        assert_eq!(enforcing, "# comment\nSELINUX=enforcing\nSELINUXTYPE=mls\n");
        assert_eq!(
            config_text(Some(&enforcing), SelinuxMode::ForceEnforcing),
            enforcing
        );
        assert_eq!(
            config_text(Some("SELINUXTYPE=targeted"), SelinuxMode::Permissive),
            "SELINUXTYPE=targeted\nSELINUX=permissive\n"
        );
        assert_eq!(
            config_text(None, SelinuxMode::Disabled),
            "SELINUX=disabled\nSELINUXTYPE=targeted\n"
        );
        assert_eq!(policy_type(config), "mls");
        assert_eq!(policy_type("SELINUX=enforcing\n"), "targeted");
        assert_eq!(policy_type("SELINUXTYPE=\"default\"\n"), "default");
    }

    #[test]
    fn setfiles_skips_mounts_without_labels() {
        let mounts = "\
/dev/vda2 /mnt/root ext4 rw,relatime 0 0
/dev/vda1 /mnt/root/boot/efi vfat rw,relatime 0 0
/dev/vda3 /mnt/root/var xfs rw,relatime 0 0
proc /mnt/root/proc proc rw 0 0
tmpfs /mnt/root/run tmpfs rw 0 0
/dev/vdb /mnt/root/_imageconfigs ext4 ro,relatime 0 0
tmpfs /mnt/root\\040x/run tmpfs rw 0 0
/dev/vdc /mnt/rootfs ext4 rw 0 0
";
        let excludes = unlabeled_mounts(mounts, Path::new("/mnt/root"));
        assert_eq!(excludes, ["/boot/efi", "/proc", "/run", "/_imageconfigs"]);
        assert_eq!(unlabeled_mounts(mounts, Path::new("/mnt/root x")), ["/run"]);
        assert_eq!(
            setfiles_argv(
                "/etc/selinux/targeted/contexts/files/file_contexts",
                &excludes[..1]
            ),
            [
                "setfiles",
                "-m",
                "-e",
                "/boot/efi",
                "/etc/selinux/targeted/contexts/files/file_contexts",
                "/"
            ]
        );
    }
}
