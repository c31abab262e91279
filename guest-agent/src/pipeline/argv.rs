//! Argv builders for the external commands of the ISO pipeline, and the small files they
//! read (dracut config, grub early configs). Pure: running them is the executor's job.

use vmic_protocol::Compression;

/// `SOURCE_DATE_EPOCH` for the tools that read it (dracut, xorriso): reproducible outputs.
pub fn source_date_epoch_env(epoch: u64) -> Vec<(String, String)> {
    vec![("SOURCE_DATE_EPOCH".to_string(), epoch.to_string())]
}

// --- dracut (step 4) ----------------------------------------------------------------------

/// The temporary dracut config written into the image for the LiveOS initrd, removed after.
pub const DRACUT_LIVE_CONF_PATH: &str = "/etc/dracut.conf.d/99-vmic-liveos.conf";

/// Where the image's dracut keeps `dmsquash-live`; absent: fail with [`DMSQUASH_LIVE_HINT`].
pub const DMSQUASH_LIVE_MODULE_DIRS: [&str; 1] = ["/usr/lib/dracut/modules.d/90dmsquash-live"];

pub const DMSQUASH_LIVE_HINT: &str =
    "the image's dracut has no dmsquash-live module: add the package `dracut-live` to \
     os.packages.install (Debian, Fedora-like and Azure Linux images)";

/// File systems the LiveOS initrd needs. In non-host-only mode dracut installs *only* these
/// file system modules when the list is set (90kernel-modules), so the ISO's own file system
/// is named too: older dmsquash-live versions install just `squashfs` and `loop`.
const LIVE_FILESYSTEMS: &str = "squashfs iso9660";

/// The temporary dracut config (spec step 4): dmsquash-live, the overlay driver, no
/// host-only, squashfs. Given on the command line as well ([`dracut_argv`]); the file is what
/// the spec asks for and what an image's own dracut hooks see. `install_items` are image
/// files the initrd must carry: a generic (not host-only) initrd leaves `/etc/modprobe.d`
/// out, yet the LiveOS initrd loads modules (loop, squashfs, overlay) whose `os.modules`
/// options and blacklist must apply there too.
pub fn dracut_live_conf(install_items: &[String]) -> String {
    let mut conf = format!(
        "# Written by vmic for the LiveOS initrd; removed once the initrd is made.\n\
         add_dracutmodules+=\" dmsquash-live \"\n\
         add_drivers+=\" overlay \"\n\
         hostonly=\"no\"\n\
         filesystems+=\" {LIVE_FILESYSTEMS} \"\n"
    );
    if !install_items.is_empty() {
        conf.push_str(&format!(
            "install_items+=\" {} \"\n",
            install_items.join(" ")
        ));
    }
    conf
}

/// `dracut` run chrooted in the image, regenerating `initrd_path` (path inside the image,
/// the image's own initrd name) for `kernel_version`. `--reproducible` (with
/// `SOURCE_DATE_EPOCH` in the environment) clamps the cpio's mtimes and orders its entries.
/// `compress`: see [`initrd_compressor`].
/// `network` adds PXE's modules ([`NetworkModules`]).
pub fn dracut_argv(
    kernel_version: &str,
    initrd_path: &str,
    compress: Option<&str>,
    network: Option<NetworkModules>,
) -> Vec<String> {
    let mut modules = String::from("dmsquash-live");
    if let Some(network) = network {
        modules.push_str(" livenet");
        if network == NetworkModules::Dhclient {
            modules.push_str(" network-legacy");
        }
    }
    let mut argv = strings([
        "dracut",
        "--force",
        "--no-hostonly",
        "--reproducible",
        "--add",
        &modules,
        "--add-drivers",
        "overlay",
        "--filesystems",
        LIVE_FILESYSTEMS,
    ]);
    if let Some(compress) = compress {
        argv.extend(strings(["--compress", compress]));
    }
    argv.extend(strings(["--kver", kernel_version, initrd_path]));
    argv
}

/// The modules a PXE bootstrap initrd adds: dracut's `livenet` fetches the ISO named by
/// `root=live:<url>` once the network is up. The network handler: dracut picks one from what
/// the image has, but dracut 059's systemd-networkd handler never runs livenet's "online"
/// hook; an image with `dhclient` gets `network-legacy`, which does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkModules {
    /// `livenet` and the handler dracut chooses.
    DracutsChoice,
    /// `livenet network-legacy`.
    Dhclient,
}

/// What `network-legacy` needs beyond the basics, each as the paths an image keeps it at
/// (for [`NetworkModules::Dhclient`]): dhclient, and pgrep to watch it.
pub const DHCLIENT_NEEDS: [[&str; 2]; 2] = [
    ["/usr/sbin/dhclient", "/sbin/dhclient"],
    ["/usr/bin/pgrep", "/bin/pgrep"],
];

/// Where dracut's `livenet` module lives in an image.
pub const LIVENET_MODULE_DIRS: [&str; 1] = ["/usr/lib/dracut/modules.d/90livenet"];

pub const LIVENET_HINT: &str =
    "a bootstrap PXE initrd needs dracut's livenet module and curl in the image: add the \
     packages `dracut-network` and `curl` (and on Debian `isc-dhcp-client` and `procps` for \
     dracut's network-legacy) to os.packages.install, or use pxe.initramfsType full-os";

/// The initrd compressor vmic asks dracut for when the image's dracut config names none.
/// dracut's own zstd default is level 15: under TCG that was 22 of the initrd's 117 s on the
/// x86_64 test image. Level 3, single-threaded (deterministic output, and mksquashfs has the
/// other vCPUs), as for the squashfs.
pub const FAST_INITRD_COMPRESSOR: &str = "zstd -3 -q";

/// `Some(FAST_INITRD_COMPRESSOR)` when the image leaves the choice to dracut (no `compress=`
/// in any of its dracut configs), has `zstd`, and every kernel config says the kernel unpacks
/// a zstd initrd (`CONFIG_RD_ZSTD=y`); otherwise `None`: dracut decides as configured.
pub fn initrd_compressor(
    dracut_configs: &[String],
    kernel_configs: &[String],
    has_zstd: bool,
) -> Option<&'static str> {
    let configured = dracut_configs.iter().any(|config| {
        config.lines().any(|line| {
            let line = line.trim_start();
            line.strip_prefix("compress")
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    });
    (!configured && has_zstd && kernels_read_zstd(kernel_configs)).then_some(FAST_INITRD_COMPRESSOR)
}

/// Every one of the image's kernels unpacks a zstd initrd (`CONFIG_RD_ZSTD=y` in each kernel
/// config); `false` when there is no config to tell.
pub fn kernels_read_zstd(kernel_configs: &[String]) -> bool {
    !kernel_configs.is_empty()
        && kernel_configs
            .iter()
            .all(|config| config.lines().any(|line| line == "CONFIG_RD_ZSTD=y"))
}

/// Where dracut reads its configuration inside an image: files, then `*.conf` of directories.
pub const DRACUT_CONFIG_FILES: [&str; 1] = ["/etc/dracut.conf"];
pub const DRACUT_CONFIG_DIRS: [&str; 2] = ["/etc/dracut.conf.d", "/usr/lib/dracut/dracut.conf.d"];

// --- mksquashfs (step 5) ------------------------------------------------------------------

/// Compression of the squashfs root (all supported by Debian 12 and Azure Linux 3 kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SquashfsCompression {
    /// zstd; `level` 1–22 (mksquashfs default 15).
    Zstd {
        level: Option<u8>,
    },
    /// Smallest, slowest.
    Xz,
    /// mksquashfs' default; `level` 1–9 (default 9).
    #[default]
    Gzip,
    GzipLevel(u8),
    /// Fastest to make and to read, biggest.
    Lz4,
}

/// zstd level vmic picks when the user does not. Measured on the x86_64 test image under TCG:
/// squashing 85.9 s at mksquashfs' default level 15, 10.2 s at level 3, for an ISO of
/// 124.5 MB vs 137.6 MB (+10.5%).
pub const DEFAULT_ZSTD_LEVEL: u8 = 3;

impl SquashfsCompression {
    /// What mksquashfs gets for the requested compression. `Auto` picks zstd when the image's
    /// kernel configs (`/boot/config-*`) say it reads zstd squashfs, else xz (every distro
    /// kernel with squashfs reads xz); without a kernel config zstd is assumed.
    pub fn resolve(requested: Compression, kernel_configs: &[String]) -> SquashfsCompression {
        match requested {
            Compression::Auto => {
                let zstd_readable = kernel_configs.is_empty()
                    || kernel_configs
                        .iter()
                        .all(|config| config.lines().any(|line| line == "CONFIG_SQUASHFS_ZSTD=y"));
                if zstd_readable {
                    SquashfsCompression::Zstd {
                        level: Some(DEFAULT_ZSTD_LEVEL),
                    }
                } else {
                    SquashfsCompression::Xz
                }
            }
            Compression::Zstd { level } => SquashfsCompression::Zstd { level },
            Compression::Gzip { level: None } => SquashfsCompression::Gzip,
            Compression::Gzip { level: Some(level) } => SquashfsCompression::GzipLevel(level),
            Compression::Xz => SquashfsCompression::Xz,
            Compression::Lz4 => SquashfsCompression::Lz4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SquashfsOptions {
    pub compression: SquashfsCompression,
    /// `-processors`; `None`: all CPUs.
    pub processors: Option<u32>,
    /// `-mem` in MiB (its queues and caches); `None`: mksquashfs' default, a quarter of RAM.
    pub memory_mib: Option<u64>,
    /// Patterns relative to the source (mksquashfs `-wildcards`), e.g. [`ROOTFS_EXCLUDES`].
    pub excludes: Vec<String>,
    /// Show mksquashfs' progress bar (`\r`-updated) instead of `-no-progress`.
    pub progress: bool,
    /// Clamp the file system's and every inode's time to it (`-mkfs-time`, `-all-time`).
    /// mksquashfs 4.5 already sorts directories and writes fragments in a fixed order.
    pub source_date_epoch: Option<u64>,
}

/// What the LiveOS root file system leaves out (spec step 5): `/etc/fstab`, and the content
/// of `/boot` (the empty directory stays as a mount point). `boot/.*` is needed because with
/// `-wildcards` `*` does not match dot files (e.g. `.vmlinuz-<v>.hmac`), checked with
/// squashfs-tools 4.5.1.
///
/// mksquashfs runs while dracut works in the same tree, so it also leaves out what only
/// exists for the build: the chroot's API mounts (their mount points stay; the booted system
/// mounts proc, sysfs, devtmpfs and tmpfs there), the config directory, dracut's temporary
/// config and its work directories.
pub const ROOTFS_EXCLUDES: [&str; 12] = [
    "boot/*",
    "boot/.*",
    "etc/fstab",
    "proc/*",
    "sys/*",
    "dev/*",
    "dev/.*",
    "run/*",
    "run/.*",
    "_imageconfigs",
    "etc/dracut.conf.d/99-vmic-liveos.conf",
    "var/tmp/dracut.*",
];

/// [`ROOTFS_EXCLUDES`] with `/boot`'s entries excluded one by one except `kept` (names in
/// `boot_names`): `kdumpBootFiles: keep`. Wildcard characters in names are escaped.
pub fn rootfs_excludes_keeping(boot_names: &[String], kept: &[String]) -> Vec<String> {
    let mut excludes: Vec<String> = ROOTFS_EXCLUDES
        .iter()
        .filter(|e| **e != "boot/*" && **e != "boot/.*")
        .map(|e| e.to_string())
        .collect();
    let mut names: Vec<&String> = boot_names.iter().filter(|n| !kept.contains(n)).collect();
    names.sort();
    for name in names {
        let mut escaped = String::from("boot/");
        for c in name.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        excludes.push(escaped);
    }
    excludes
}

/// `mksquashfs SOURCE DEST -noappend -xattrs -comp ... -wildcards -e EXCLUDES...`
/// (squashfs-tools 4.5.1 as in Debian 12; every flag used exists there). The exclude list
/// must come last.
pub fn mksquashfs_argv(source: &str, dest: &str, options: &SquashfsOptions) -> Vec<String> {
    let mut argv = strings(["mksquashfs", source, dest, "-noappend", "-xattrs", "-comp"]);
    match options.compression {
        SquashfsCompression::Zstd { level } => {
            argv.push("zstd".into());
            if let Some(level) = level {
                argv.extend(strings(["-Xcompression-level", &level.to_string()]));
            }
        }
        SquashfsCompression::Xz => argv.push("xz".into()),
        SquashfsCompression::Gzip => argv.push("gzip".into()),
        SquashfsCompression::GzipLevel(level) => {
            argv.push("gzip".into());
            argv.extend(strings(["-Xcompression-level", &level.to_string()]));
        }
        SquashfsCompression::Lz4 => argv.push("lz4".into()),
    }
    if let Some(processors) = options.processors {
        argv.extend(strings(["-processors", &processors.to_string()]));
    }
    if let Some(memory) = options.memory_mib {
        argv.extend(strings(["-mem", &format!("{memory}M")]));
    }
    if let Some(epoch) = options.source_date_epoch {
        argv.extend(strings([
            "-mkfs-time",
            &epoch.to_string(),
            "-all-time",
            &epoch.to_string(),
        ]));
    }
    if !options.progress {
        argv.push("-no-progress".into());
    }
    if !options.excludes.is_empty() {
        argv.extend(strings(["-wildcards", "-e"]));
        argv.extend(options.excludes.iter().cloned());
    }
    argv
}

/// `unsquashfs -no-progress -f [-da N -fr N] -d DEST IMAGE`: unpack over DEST, which may
/// exist. `queue_mib` bounds its data and fragment queues (MiB each; `None`: its default).
pub fn unsquashfs_argv(image: &str, dest: &str, queue_mib: Option<u64>) -> Vec<String> {
    let mut argv = strings(["unsquashfs", "-no-progress", "-f"]);
    if let Some(queue) = queue_mib {
        let queue = queue.to_string();
        argv.extend(strings(["-da", &queue, "-fr", &queue]));
    }
    argv.extend(strings(["-d", dest, image]));
    argv
}

// --- grub images and configs (step 7) -----------------------------------------------------

/// Label of the El Torito EFI FAT image. It must differ from the ISO label, or `search
/// --label` could pick the FAT partition of a `dd`-written disk.
pub const EFIBOOT_FAT_LABEL: &str = "VMIC_EFI";

/// Embedded in grub images vmic builds: find the ISO 9660 file system by label and take
/// grub's modules and config from its `/boot/grub2` (grub's `normal` then reads
/// `$prefix/grub.cfg`). Like grub-mkrescue's `load.cfg`, but by label rather than by a
/// timestamp UUID, so the result does not depend on the build time.
pub fn grub_early_config(label: &str) -> String {
    format!(
        "search --no-floppy --label {label} --set=root\n\
         set prefix=($root)/boot/grub2\n"
    )
}

/// The config put at `/EFI/BOOT/grub.cfg` and `/boot/grub2/grub.cfg` inside the El Torito
/// FAT image: a grub that starts with its root on that FAT (USB boot, `-noprefix` builds,
/// Debian's signed grub) is sent to the real config on the ISO 9660 file system.
pub fn grub_redirect_cfg(label: &str) -> String {
    format!(
        "# vmic: grub started from the EFI boot partition; the config is on the ISO.\n\
         search --no-floppy --label {label} --set=root\n\
         set prefix=($root)/boot/grub2\n\
         configfile ($root)/boot/grub2/grub.cfg\n"
    )
}

/// Modules of the BIOS El Torito core image: enough to find the ISO; the rest (`normal`,
/// `linux`, ...) is loaded from `/boot/grub2/i386-pc` on the ISO, as grub-mkrescue does.
pub const BIOS_GRUB_MODULES: [&str; 5] =
    ["biosdisk", "iso9660", "part_msdos", "part_gpt", "search"];

/// `grub-mkimage` for the BIOS El Torito image (`cdboot.img` + core), with the modules of
/// the builder VM's `grub-pc-bin` and `early_config` (a file with [`grub_early_config`]).
pub fn bios_grub_mkimage_argv(output: &str, early_config: &str) -> Vec<String> {
    let mut argv = strings([
        "grub-mkimage",
        "-O",
        "i386-pc-eltorito",
        "-d",
        super::BUILDER_BIOS_MODULES_DIR,
        "-p",
        "/boot/grub2",
        "-c",
        early_config,
        "-o",
        output,
    ]);
    argv.extend(strings(BIOS_GRUB_MODULES));
    argv
}

// --- the El Torito EFI image (FAT) ---------------------------------------------------------

/// mtools refuses some valid images without this.
pub const MTOOLS_ENV: [(&str, &str); 1] = [("MTOOLS_SKIP_CHECK", "1")];

/// Size in KiB of a FAT image holding files of these sizes: each file rounded up to 4 KiB
/// clusters, 16 directory clusters, 1/8 for the FATs and slack, 512 KiB reserve, rounded up
/// to whole MiB, at least 2 MiB.
pub fn efiboot_image_size_kib(file_sizes: &[u64]) -> u64 {
    const CLUSTER: u64 = 4096;
    let data: u64 = file_sizes
        .iter()
        .map(|size| size.div_ceil(CLUSTER) * CLUSTER)
        .sum::<u64>()
        + 16 * CLUSTER;
    let total = data + data / 8 + (512 << 10);
    (total.div_ceil(1 << 20) * 1024).max(2048)
}

/// `mkfs.vfat -C` makes the image file (it must not exist) of `size_kib` KiB. `--invariant`
/// and a fixed volume id (`volume_id`, 8 hex digits) replace the creation time and the random
/// serial: the same content gives the same image.
pub fn mkfs_vfat_argv(image: &str, size_kib: u64, volume_id: &str) -> Vec<String> {
    strings([
        "mkfs.vfat",
        "--invariant",
        "-i",
        volume_id,
        "-C",
        "-n",
        EFIBOOT_FAT_LABEL,
        image,
        &size_kib.to_string(),
    ])
}

/// `mcopy -s -m` of one staged file, or of one empty staged directory into the directory
/// `dest` ends in (`/EFI/`), keeping the staged mtime (`-m`) where `mmd` and a plain `mcopy`
/// would stamp the build time (mtools 4.0.32 ignores `SOURCE_DATE_EPOCH`). One entry per
/// call, in the plan's order: a recursive copy would follow the staging directory's hashed
/// `readdir` order, and FAT directory entries keep the order they were made in.
pub fn mcopy_preserving_argv(image: &str, source: &str, dest: &str) -> Vec<String> {
    strings([
        "mcopy",
        "-s",
        "-m",
        "-D",
        "o",
        "-i",
        image,
        source,
        &format!("::{dest}"),
    ])
}

// --- xorriso (step 8) ---------------------------------------------------------------------

/// BIOS boot (x86_64): grub's El Torito core image and the hybrid MBR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BiosBoot {
    /// Path of the `i386-pc-eltorito` image inside the ISO tree (no leading `/`).
    pub eltorito_image: String,
    /// grub's `boot_hybrid.img` in the builder VM.
    pub boot_hybrid_mbr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XorrisoOptions {
    /// The staged ISO tree (a directory).
    pub iso_tree: String,
    pub output: String,
    pub label: String,
    /// Path of the El Torito EFI FAT image inside the ISO tree (no leading `/`).
    pub efi_boot_image: String,
    pub bios: Option<BiosBoot>,
    /// `YYYYMMDDhhmmsscc`: fixes the volume timestamps (reproducible ISOs).
    pub modification_date: Option<String>,
}

/// `xorriso -as mkisofs` for the LiveOS ISO.
///
/// The recipe is grub-mkrescue's (GRUB `util/grub-mkrescue.c`: `-b
/// boot/grub/i386-pc/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table
/// --grub2-boot-info --grub2-mbr boot_hybrid.img`, `--efi-boot efi.img -efi-boot-part
/// --efi-boot-image`, `--protective-msdos-label`), the one reference that makes a single
/// grub-booted file start as a CD and as a `dd`-written disk under both BIOS and UEFI:
/// - CD, BIOS: El Torito no-emulation entry → grub's `i386-pc-eltorito` core;
///   `-boot-info-table` tells it where it was loaded from.
/// - disk, BIOS: `--grub2-mbr boot_hybrid.img` is the MBR boot code; `--grub2-boot-info`
///   patches into it the address of the same core image on the ISO.
/// - CD, UEFI: the alternative El Torito entry (`-e`) is the FAT image with shim + grub.
/// - disk, UEFI: `-efi-boot-part --efi-boot-image` exposes that FAT image as the EFI System
///   Partition of a GPT, and `--protective-msdos-label` writes the MBR partition table that
///   firmware expects next to it.
///
/// Debian's live ISOs use `-isohybrid-mbr` with ISOLINUX instead (no ISOLINUX here), Ubuntu's
/// an appended ESP partition (`-append_partition 2 ... -appended_part_as_gpt`); both need a
/// separate partition image or ISOLINUX, the grub-mkrescue recipe needs neither. AzL-IC
/// (`isogenerator.go`) builds UEFI-only ISOs with just `-e`. `-iso-level 3` allows files of
/// 4 GiB and more (multi-extent), as AzL-IC does.
pub fn xorriso_argv(options: &XorrisoOptions) -> Vec<String> {
    let mut argv = strings([
        "xorriso",
        "-as",
        "mkisofs",
        "-iso-level",
        "3",
        "-R",
        "-J",
        "-joliet-long",
        "-V",
        &options.label,
        "-o",
        &options.output,
    ]);
    // The volume dates, the GPT disk GUID (`--gpt_disk_guid` follows the modification
    // date) and every file's mtime/atime/ctime: nothing of the build time is left.
    if let Some(date) = &options.modification_date {
        argv.push(format!("--modification-date={date}"));
        argv.extend(strings(["--set_all_file_dates", date]));
    }
    if let Some(bios) = &options.bios {
        argv.extend(strings([
            "-b",
            &bios.eltorito_image,
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "--grub2-boot-info",
            "--grub2-mbr",
            &bios.boot_hybrid_mbr,
            "-eltorito-alt-boot",
        ]));
    }
    argv.extend(strings([
        "-e",
        &options.efi_boot_image,
        "-no-emul-boot",
        "-efi-boot-part",
        "--efi-boot-image",
        "--protective-msdos-label",
        &options.iso_tree,
    ]));
    argv
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    items.into_iter().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(name: &str, argv: &[String]) {
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!(name, argv.join("\n"));
        });
    }

    #[test]
    fn unsquashfs_bounds_its_queues_before_the_destination_and_the_image_last() {
        assert_eq!(
            unsquashfs_argv("/in/rootfs.img", "/w/root", Some(64)),
            strings([
                "unsquashfs",
                "-no-progress",
                "-f",
                "-da",
                "64",
                "-fr",
                "64",
                "-d",
                "/w/root",
                "/in/rootfs.img"
            ])
        );
        assert_eq!(
            unsquashfs_argv("/in/rootfs.img", "/w/root", None),
            strings([
                "unsquashfs",
                "-no-progress",
                "-f",
                "-d",
                "/w/root",
                "/in/rootfs.img"
            ])
        );
    }

    #[test]
    fn dracut() {
        snapshot(
            "argv_dracut",
            &dracut_argv(
                "6.1.0-28-cloud-amd64",
                "/boot/initrd.img-6.1.0-28-cloud-amd64",
                None,
                None,
            ),
        );
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!("dracut_live_conf", dracut_live_conf(&[]));
        });
        let with_items = dracut_live_conf(&["/etc/modprobe.d/module-options-vmic.conf".into()]);
        assert!(
            with_items.ends_with("install_items+=\" /etc/modprobe.d/module-options-vmic.conf \"\n")
        );
        insta::with_settings!({prepend_module_to_snapshot => false}, {
        });
    }

    #[test]
    fn dracut_with_a_compressor() {
        let argv = dracut_argv(
            "6.1",
            "/boot/initrd.img-6.1",
            Some(FAST_INITRD_COMPRESSOR),
            None,
        );
        let at = argv
            .iter()
            .position(|a| a == "--compress")
            .expect("--compress");
        assert_eq!(argv[at + 1], "zstd -3 -q");
        // Options before the kernel version and the target, which dracut takes positionally.
        assert_eq!(
            &argv[argv.len() - 3..],
            ["--kver", "6.1", "/boot/initrd.img-6.1"]
        );
    }

    #[test]
    fn kept_kdump_files_are_the_only_boot_entries_the_squashfs_keeps() {
        let names: Vec<String> = ["vmlinuz-6.1", "initramfs-6.1kdump.img", "grub2", "a*b"]
            .map(String::from)
            .to_vec();
        let kept = [
            "initramfs-6.1kdump.img".to_string(),
            "vmlinuz-6.1".to_string(),
        ];
        let excludes = rootfs_excludes_keeping(&names, &kept);
        assert!(!excludes.iter().any(|e| e == "boot/*" || e == "boot/.*"));
        assert!(excludes.contains(&"boot/grub2".to_string()));
        assert!(excludes.contains(&"boot/a\\*b".to_string()));
        assert!(!excludes
            .iter()
            .any(|e| e.contains("kdump") || e.contains("vmlinuz")));
        // Everything else of the usual list stays.
        assert!(excludes.contains(&"etc/fstab".to_string()));
        assert_eq!(excludes.len(), ROOTFS_EXCLUDES.len() - 2 + 2);
    }

    #[test]
    fn a_pxe_bootstrap_initrd_adds_livenet_and_the_dhclient_handler_when_asked() {
        let modules = |network| {
            let argv = dracut_argv("6.1", "/boot/initrd.img-6.1", None, network);
            let at = argv.iter().position(|a| a == "--add").expect("--add");
            argv[at + 1].clone()
        };
        assert_eq!(modules(None), "dmsquash-live");
        assert_eq!(
            modules(Some(NetworkModules::DracutsChoice)),
            "dmsquash-live livenet"
        );
        assert_eq!(
            modules(Some(NetworkModules::Dhclient)),
            "dmsquash-live livenet network-legacy"
        );
    }

    #[test]
    fn the_fast_initrd_compressor_only_where_the_image_leaves_the_choice() {
        let rd_zstd = ["CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n".to_string()];
        let no_rd_zstd = ["CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n".to_string()];
        let plain = ["hostonly=\"yes\"\n# compress=\"xz\" is a comment\n".to_string()];
        assert_eq!(
            initrd_compressor(&plain, &rd_zstd, true),
            Some(FAST_INITRD_COMPRESSOR)
        );
        for configured in [
            "compress=\"xz\"",
            "  compress = gzip",
            "compress=\"zstd -19\"",
        ] {
            let configs = [plain[0].clone(), format!("{configured}\n")];
            assert_eq!(
                initrd_compressor(&configs, &rd_zstd, true),
                None,
                "{configured}"
            );
        }
        assert_eq!(initrd_compressor(&plain, &no_rd_zstd, true), None);
        // One kernel without zstd initrd support is enough to keep dracut's choice.
        let mixed = [rd_zstd[0].clone(), no_rd_zstd[0].clone()];
        assert_eq!(initrd_compressor(&plain, &mixed, true), None);
        assert_eq!(
            initrd_compressor(&plain, &[], true),
            None,
            "unknown kernels"
        );
        assert_eq!(initrd_compressor(&plain, &rd_zstd, false), None, "no zstd");
        // `compressor=` is not `compress=`.
        let other = ["compressor_options=\"-9\"\n".to_string()];
        assert_eq!(
            initrd_compressor(&other, &rd_zstd, true),
            Some(FAST_INITRD_COMPRESSOR)
        );
    }

    #[test]
    fn the_squashfs_leaves_out_dracuts_temporary_config() {
        assert!(ROOTFS_EXCLUDES.contains(&DRACUT_LIVE_CONF_PATH.trim_start_matches('/')));
    }

    #[test]
    fn squashfs_compression_values() {
        use SquashfsCompression::*;
        let zstd_kernel = ["CONFIG_SQUASHFS=y\nCONFIG_SQUASHFS_ZSTD=y\n".to_string()];
        let xz_kernel = ["CONFIG_SQUASHFS=y\n# CONFIG_SQUASHFS_ZSTD is not set\n".to_string()];
        assert_eq!(
            SquashfsCompression::resolve(Compression::Auto, &zstd_kernel),
            Zstd {
                level: Some(DEFAULT_ZSTD_LEVEL)
            }
        );
        assert_eq!(
            SquashfsCompression::resolve(Compression::Auto, &xz_kernel),
            Xz
        );
        assert_eq!(
            SquashfsCompression::resolve(Compression::Zstd { level: Some(19) }, &xz_kernel),
            Zstd { level: Some(19) }
        );
        assert_eq!(
            SquashfsCompression::resolve(Compression::Gzip { level: Some(1) }, &[]),
            GzipLevel(1)
        );
        assert_eq!(SquashfsCompression::resolve(Compression::Lz4, &[]), Lz4);
    }

    #[test]
    fn mksquashfs() {
        let rootfs = SquashfsOptions {
            compression: SquashfsCompression::Zstd { level: Some(19) },
            processors: Some(4),
            memory_mib: None,
            excludes: ROOTFS_EXCLUDES.iter().map(|e| (*e).to_owned()).collect(),
            progress: false,
            source_date_epoch: Some(1_700_000_000),
        };
        snapshot(
            "argv_mksquashfs_rootfs",
            &mksquashfs_argv("/mnt/image", "/build/iso/liveos/rootfs.img", &rootfs),
        );
        let plain = mksquashfs_argv("/src", "/out.img", &SquashfsOptions::default());
        assert_eq!(
            plain,
            strings([
                "mksquashfs",
                "/src",
                "/out.img",
                "-noappend",
                "-xattrs",
                "-comp",
                "gzip",
                "-no-progress"
            ])
        );
        let xz = mksquashfs_argv(
            "/src",
            "/out.img",
            &SquashfsOptions {
                compression: SquashfsCompression::Xz,
                progress: true,
                ..SquashfsOptions::default()
            },
        );
        assert!(xz.ends_with(&strings(["-comp", "xz"])), "{xz:?}");
        let bounded = mksquashfs_argv(
            "/src",
            "/out.img",
            &SquashfsOptions {
                memory_mib: Some(128),
                excludes: vec!["boot/*".into()],
                ..SquashfsOptions::default()
            },
        );
        // Before the exclude list, which must come last.
        assert!(
            bounded.ends_with(&strings([
                "-mem",
                "128M",
                "-no-progress",
                "-wildcards",
                "-e",
                "boot/*"
            ])),
            "{bounded:?}"
        );
    }

    #[test]
    fn xorriso_x86_64() {
        snapshot(
            "argv_xorriso_x86_64",
            &xorriso_argv(&XorrisoOptions {
                iso_tree: "/build/iso".into(),
                output: "/out/live.iso".into(),
                label: "CDROM".into(),
                efi_boot_image: "boot/grub2/efiboot.img".into(),
                bios: Some(BiosBoot {
                    eltorito_image: "boot/grub2/i386-pc/eltorito.img".into(),
                    boot_hybrid_mbr: super::super::BUILDER_BOOT_HYBRID_IMG.into(),
                }),
                modification_date: Some("2025010100000000".into()),
            }),
        );
    }

    #[test]
    fn xorriso_aarch64() {
        snapshot(
            "argv_xorriso_aarch64",
            &xorriso_argv(&XorrisoOptions {
                iso_tree: "/build/iso".into(),
                output: "/out/live.iso".into(),
                label: "CDROM".into(),
                efi_boot_image: "boot/grub2/efiboot.img".into(),
                bios: None,
                modification_date: None,
            }),
        );
    }

    #[test]
    fn grub_images() {
        snapshot(
            "argv_grub_mkimage_bios",
            &bios_grub_mkimage_argv(
                "/build/iso/boot/grub2/i386-pc/eltorito.img",
                "/build/early.cfg",
            ),
        );
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!("grub_early_config", grub_early_config("CDROM"));
            insta::assert_snapshot!("grub_redirect_cfg", grub_redirect_cfg("CDROM"));
        });
    }

    #[test]
    fn the_epoch_reaches_the_tools_as_source_date_epoch() {
        assert_eq!(
            source_date_epoch_env(1_700_000_000),
            [("SOURCE_DATE_EPOCH".to_string(), "1700000000".to_string())]
        );
    }

    #[test]
    fn efiboot_image() {
        let cases = [
            (&[][..], 2048),
            (&[950_000, 2_600_000, 4096, 4096][..], 5120),
            (&[1, 1, 1][..], 2048),
            (&[4 << 20, 8 << 20][..], 15360),
            // Just over 3 MiB only because of the 16 directory clusters (64 KiB).
            (&[2_265_088][..], 4096),
        ];
        for (sizes, expected) in cases {
            assert_eq!(efiboot_image_size_kib(sizes), expected, "{sizes:?}");
        }
        // The rule behind those numbers: whole MiB, at least 2 MiB, room for every file in
        // 4 KiB clusters plus 16 directory clusters, 1/8 for the FATs and a 512 KiB reserve,
        // and less than 1 MiB more than that.
        for sizes in [
            vec![],
            vec![0],
            vec![4095, 4096, 4097],
            vec![1 << 20; 3],
            vec![950_000, 2_600_000, 4096, 4096],
            vec![7_340_031, 123, 33_554_432],
        ] {
            let kib = efiboot_image_size_kib(&sizes);
            let clusters: u64 = sizes.iter().map(|size| size.div_ceil(4096)).sum::<u64>() + 16;
            let needed = clusters * 4096 + clusters * 4096 / 8 + (512 << 10);
            assert_eq!(kib % 1024, 0, "{sizes:?}: whole MiB");
            assert!(kib >= 2048, "{sizes:?}: at least 2 MiB");
            assert!(
                kib * 1024 >= needed,
                "{sizes:?}: {kib} KiB holds {needed} bytes"
            );
            assert!(
                kib == 2048 || kib * 1024 - needed < 1 << 20,
                "{sizes:?}: {kib} KiB is no more than needed rounded up to a MiB"
            );
        }
        snapshot(
            "argv_efiboot_image",
            &[
                mkfs_vfat_argv("/build/iso/boot/grub2/efiboot.img", 5120, "6553f100"),
                mcopy_preserving_argv(
                    "/build/iso/boot/grub2/efiboot.img",
                    "/build/efiboot-dirs/0/EFI",
                    "/",
                ),
                mcopy_preserving_argv(
                    "/build/iso/boot/grub2/efiboot.img",
                    "/build/efiboot/EFI/BOOT/BOOTX64.EFI",
                    "/EFI/BOOT/BOOTX64.EFI",
                ),
            ]
            .iter()
            .map(|argv| argv.join(" "))
            .collect::<Vec<_>>(),
        );
    }
}
