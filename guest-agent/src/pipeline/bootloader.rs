//! `os.bootloader.resetType: hard-reset`: the image's grub.cfg written anew, as the Image
//! Customizer's hard reset does ("removing any customized kernel command-line arguments that
//! were added to base image"): one entry per kernel in `/boot`, newest first, each with only
//! the root argument (`root=` as the image's fstab names `/`, and `ro`). `os.kernelCommandLine`
//! and `os.selinux` are applied to the new file afterwards, as to any grub.cfg.
//!
//! Everything read here comes from the image (file names in `/boot`, fstab, os-release, the
//! file system UUID): each is quoted for grub or refused, never pasted in as grub script.

use std::cmp::Ordering;

use super::fstab::DeviceSpec;
use super::grub_cfg::{grub_quote, kernel_version_of};

/// One bootable kernel of the image: file names inside `/boot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootKernel {
    pub version: String,
    pub kernel: String,
    pub initrd: String,
}

/// What the new grub.cfg is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetSettings {
    /// The menu title's stem (os-release `PRETTY_NAME`).
    pub os_name: String,
    /// The UUID of the file system holding the kernels, which grub searches for.
    pub boot_fs_uuid: String,
    /// `/boot` when the kernels are on the root file system, "" when `/boot` is its own.
    pub boot_prefix: &'static str,
    /// `root=...` for the kernel.
    pub root_arg: String,
    /// Newest first; the first is the default entry.
    pub kernels: Vec<BootKernel>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResetError {
    #[error(
        "os.bootloader.resetType: /boot has no kernel with an initrd beside it (looked for \
         vmlinuz-<version> with initrd.img-<version>, initramfs-<version>.img or \
         initrd-<version>; found: {found}); install a kernel with os.packages, or drop resetType"
    )]
    NoKernel { found: String },
    #[error(
        "os.bootloader.resetType: the image's /etc/fstab names / as {spec:?}, which cannot be a \
         kernel root= argument (spaces, quotes or control characters); name it by UUID= or \
         PARTUUID= in the image's fstab"
    )]
    BadRootSpec { spec: String },
    #[error(
        "os.bootloader.resetType: the file system holding /boot has no usable UUID ({uuid:?}); \
         grub finds its files by that UUID"
    )]
    BadUuid { uuid: String },
}

/// The kernel's `root=` argument for the fstab entry of `/`.
pub fn root_arg(spec: &DeviceSpec) -> Result<String, ResetError> {
    let text = match spec {
        DeviceSpec::Uuid(value) => format!("UUID={value}"),
        DeviceSpec::Label(value) => format!("LABEL={value}"),
        DeviceSpec::PartUuid(value) => format!("PARTUUID={value}"),
        DeviceSpec::PartLabel(value) => format!("PARTLABEL={value}"),
        DeviceSpec::Path(value) => value.clone(),
    };
    // The kernel splits its command line at spaces and grub at quotes: such a name cannot
    // reach dracut intact.
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "'\"\\$;".contains(c))
    {
        return Err(ResetError::BadRootSpec { spec: text });
    }
    Ok(format!("root={text}"))
}

/// The kernels of `/boot` (its file names) that have an initrd, newest version first.
pub fn boot_kernels(names: &[String]) -> Result<Vec<BootKernel>, ResetError> {
    let mut kernels: Vec<BootKernel> = names
        .iter()
        .filter(|name| name.starts_with("vmlinuz-"))
        .filter_map(|kernel| {
            let version = kernel_version_of(kernel)?;
            let initrd = [
                format!("initrd.img-{version}"),
                format!("initramfs-{version}.img"),
                format!("initrd-{version}"),
            ]
            .into_iter()
            .find(|candidate| names.contains(candidate))?;
            Some(BootKernel {
                version,
                kernel: kernel.clone(),
                initrd,
            })
        })
        .collect();
    if kernels.is_empty() {
        let mut found: Vec<&str> = names.iter().map(String::as_str).collect();
        found.sort_unstable();
        return Err(ResetError::NoKernel {
            found: if found.is_empty() {
                "nothing".to_owned()
            } else {
                found.join(", ")
            },
        });
    }
    kernels.sort_by(|a, b| compare_versions(&b.version, &a.version));
    Ok(kernels)
}

/// Orders kernel versions as `sort -V` does: digit runs by value, the rest by bytes.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(text: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = text.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &text[start..i]));
                start = i;
            }
        }
        out
    }
    let (left, right) = (chunks(a), chunks(b));
    for (x, y) in left.iter().zip(&right) {
        let order = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    left.len().cmp(&right.len())
}

/// A file system UUID as blkid prints it: hex digits and dashes only (an ext4 UUID, a FAT
/// serial `ABCD-1234`), so that it can stand unquoted in a `search` command.
pub fn check_uuid(uuid: &str) -> Result<&str, ResetError> {
    let uuid = uuid.trim();
    if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(ResetError::BadUuid {
            uuid: uuid.to_owned(),
        });
    }
    Ok(uuid)
}

/// The source device of the file system mounted at `mount_point`, from
/// `/proc/self/mountinfo`; the last mount there wins, as it hides the earlier ones.
pub fn mount_source(mountinfo: &str, mount_point: &str) -> Option<String> {
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        let source = right.split(' ').nth(1)?;
        (unescape_mountinfo(point) == mount_point).then(|| unescape_mountinfo(source))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal.and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The new grub.cfg.
pub fn reset_grub_cfg(settings: &ResetSettings) -> String {
    let search = format!(
        "search --no-floppy --fs-uuid --set=root {}",
        settings.boot_fs_uuid
    );
    let mut text = format!(
        "# Written by vmic for os.bootloader.resetType: hard-reset; the base image's boot \
         loader configuration is gone.\nset timeout=0\nset default=0\n{search}\n"
    );
    for kernel in &settings.kernels {
        let title = format!("{}, {}", settings.os_name, kernel.version);
        text.push_str(&format!(
            "menuentry {} {{\n\t{search}\n\tlinux {} {} ro\n\tinitrd {}\n}}\n",
            grub_quote(&title),
            grub_quote(&format!("{}/{}", settings.boot_prefix, kernel.kernel)),
            grub_quote(&settings.root_arg),
            grub_quote(&format!("{}/{}", settings.boot_prefix, kernel.initrd)),
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::grub_cfg;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn kernels_pair_with_their_initrds_newest_first() {
        let kernels = boot_kernels(&names(&[
            "config-6.1.0-9-amd64",
            "vmlinuz-6.1.0-9-amd64",
            "initrd.img-6.1.0-9-amd64",
            "vmlinuz-6.1.0-28-amd64",
            "initramfs-6.1.0-28-amd64.img",
            "vmlinuz-6.1.0-30-amd64",
            "grub2",
        ]))
        .unwrap();
        assert_eq!(
            kernels,
            vec![
                BootKernel {
                    version: "6.1.0-28-amd64".into(),
                    kernel: "vmlinuz-6.1.0-28-amd64".into(),
                    initrd: "initramfs-6.1.0-28-amd64.img".into(),
                },
                BootKernel {
                    version: "6.1.0-9-amd64".into(),
                    kernel: "vmlinuz-6.1.0-9-amd64".into(),
                    initrd: "initrd.img-6.1.0-9-amd64".into(),
                },
            ],
            "-30 has no initrd; 28 sorts above 9 by value"
        );
        let azl = boot_kernels(&names(&[
            "vmlinuz-6.6.47.1-1.azl3",
            "initrd-6.6.47.1-1.azl3",
        ]));
        assert_eq!(azl.unwrap()[0].initrd, "initrd-6.6.47.1-1.azl3");
    }

    #[test]
    fn no_kernel_with_an_initrd_is_an_error_listing_what_is_there() {
        let error = boot_kernels(&names(&["vmlinuz-6.1", "grub2"])).unwrap_err();
        assert_eq!(
            error,
            ResetError::NoKernel {
                found: "grub2, vmlinuz-6.1".into()
            }
        );
        assert!(matches!(
            boot_kernels(&[]).unwrap_err(),
            ResetError::NoKernel { found } if found == "nothing"
        ));
    }

    #[test]
    fn versions_compare_like_sort_v() {
        use Ordering::*;
        for (a, b, order) in [
            ("6.1.0-28", "6.1.0-9", Greater),
            ("6.1.0-9", "6.1.0-28", Less),
            ("6.1", "6.1", Equal),
            ("6.1", "6.1.1", Less),
            ("6.1.1", "6.1", Greater),
            ("6.01", "6.1", Equal),
            ("6.1-rc", "6.1-rt", Less),
            ("10", "9", Greater),
            ("a", "1", Greater),
        ] {
            assert_eq!(compare_versions(a, b), order, "{a} vs {b}");
        }
    }

    #[test]
    fn root_args_follow_the_fstab_entry_and_refuse_what_cannot_be_an_arg() {
        assert_eq!(
            root_arg(&DeviceSpec::Uuid("abcd-1".into())).unwrap(),
            "root=UUID=abcd-1"
        );
        assert_eq!(
            root_arg(&DeviceSpec::PartUuid("p-1".into())).unwrap(),
            "root=PARTUUID=p-1"
        );
        assert_eq!(
            root_arg(&DeviceSpec::Label("rootfs".into())).unwrap(),
            "root=LABEL=rootfs"
        );
        assert_eq!(
            root_arg(&DeviceSpec::PartLabel("root".into())).unwrap(),
            "root=PARTLABEL=root"
        );
        assert_eq!(
            root_arg(&DeviceSpec::Path("/dev/sda2".into())).unwrap(),
            "root=/dev/sda2"
        );
        for bad in ["my root", "a'b", "x$y", "a\"b", "a;b", "a\\b", "a\tb"] {
            assert_eq!(
                root_arg(&DeviceSpec::Label(bad.into())),
                Err(ResetError::BadRootSpec {
                    spec: format!("LABEL={bad}")
                })
            );
        }
    }

    #[test]
    fn uuids_are_hex_and_dashes() {
        assert_eq!(check_uuid(" 0b1c-DEAD\n"), Ok("0b1c-DEAD"));
        for bad in ["", "x", "ab cd", "ab;reboot", "$root"] {
            assert!(check_uuid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_sources_come_from_the_last_mount_at_the_point() {
        let mountinfo = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
40 22 8:2 / /mnt/root rw,relatime - ext4 /dev/vdb2 rw
41 40 8:3 / /mnt/root/boot rw - ext4 /dev/vdb3 rw
42 40 8:9 / /mnt/root/my\\040dir rw - ext4 /dev/odd\\134name rw
43 40 8:4 / /mnt/root/boot rw - ext4 /dev/vdb4 rw
";
        assert_eq!(
            mount_source(mountinfo, "/mnt/root").as_deref(),
            Some("/dev/vdb2")
        );
        assert_eq!(
            mount_source(mountinfo, "/mnt/root/boot").as_deref(),
            Some("/dev/vdb4")
        );
        assert_eq!(
            mount_source(mountinfo, "/mnt/root/my dir").as_deref(),
            Some("/dev/odd\\name")
        );
        assert_eq!(mount_source(mountinfo, "/mnt"), None);
        assert_eq!(unescape_mountinfo("a\\01"), "a\\01", "a cut escape stays");
        assert_eq!(
            unescape_mountinfo("/dev/sda123"),
            "/dev/sda123",
            "digits without a backslash are digits"
        );
    }

    fn settings(prefix: &'static str) -> ResetSettings {
        ResetSettings {
            os_name: "Debian GNU/Linux 12 (bookworm)".into(),
            boot_fs_uuid: "1234-abcd".into(),
            boot_prefix: prefix,
            root_arg: "root=UUID=5678".into(),
            kernels: vec![
                BootKernel {
                    version: "6.2".into(),
                    kernel: "vmlinuz-6.2".into(),
                    initrd: "initrd.img-6.2".into(),
                },
                BootKernel {
                    version: "6.1".into(),
                    kernel: "vmlinuz-6.1".into(),
                    initrd: "initrd.img-6.1".into(),
                },
            ],
        }
    }

    #[test]
    fn the_new_config_boots_each_kernel_with_only_the_root_argument() {
        let text = reset_grub_cfg(&settings("/boot"));
        insta::assert_snapshot!(text);
        // The rules, beside the snapshot: one entry per kernel, the first the default, each
        // finding /boot's file system by UUID and passing nothing but root= and ro.
        assert_eq!(text.matches("menuentry ").count(), 2);
        assert!(text.contains("set default=0\n"));
        let linux: Vec<&str> = text
            .lines()
            .filter(|line| line.trim_start().starts_with("linux "))
            .collect();
        assert_eq!(
            linux,
            [
                "\tlinux /boot/vmlinuz-6.2 root=UUID=5678 ro",
                "\tlinux /boot/vmlinuz-6.1 root=UUID=5678 ro"
            ]
        );
        assert_eq!(text.matches("--fs-uuid --set=root 1234-abcd").count(), 3);
        // A separate /boot: paths at its top.
        let own = reset_grub_cfg(&settings(""));
        assert!(own.contains("\tlinux /vmlinuz-6.2 root=UUID=5678 ro\n\tinitrd /initrd.img-6.2\n"));
    }

    #[test]
    fn the_new_config_is_one_the_iso_and_kernel_arg_rewrites_read() {
        let text = reset_grub_cfg(&settings("/boot"));
        let appended = grub_cfg::append_kernel_args(&text, &["console=ttyS0".into()]).unwrap();
        assert!(appended.contains("\tlinux /boot/vmlinuz-6.1 root=UUID=5678 ro console=ttyS0\n"));
        let iso = grub_cfg::rewrite_for_iso(
            &appended,
            &grub_cfg::IsoBootSettings {
                label: "CDROM".into(),
                user_args: Vec::new(),
                dropped_args: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(iso.linux_commands, 2);
        assert_eq!(
            iso.initrd_file_names(),
            ["initrd.img-6.2", "initrd.img-6.1"]
        );
    }

    #[test]
    fn names_from_the_image_are_quoted_not_run() {
        let mut hostile = settings("/boot");
        hostile.os_name = "x' ; reboot ; echo '".into();
        hostile.kernels[0].kernel = "vmlinuz-6.2 $(reboot)".into();
        let text = reset_grub_cfg(&hostile);
        assert!(text.contains("menuentry 'x'\\'' ; reboot ; echo '\\'', 6.2' {"));
        assert!(text.contains("\tlinux '/boot/vmlinuz-6.2 $(reboot)' root=UUID=5678 ro\n"));
    }
}
