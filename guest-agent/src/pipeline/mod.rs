//! The disk image → LiveOS ISO pipeline: its steps in order, and the pure pieces they use.
//!
//! Everything in this module tree is pure: parsing, planning and argv building, testable on
//! the host. Running a command, mounting or copying is the executor's job (one thin layer
//! per step, outside this module), which takes the argvs and plans made here.
//!
//! # Disk image → LiveOS ISO, step by step (spec `liveos-iso.md`, steps 1–8)
//!
//! 1. `mount_image` — attach the input read-only (writes go to a throwaway overlay), find the
//!    root partition, read its `/etc/fstab` and mount the rest with [`fstab::mount_plan`]
//!    (parents before children; `/boot` and `/boot/efi` included even when `noauto`).
//! 2. `apply_os_customizations` — the `os.*` settings; then `run_post_customization_scripts`
//!    and `run_finalize_customization_scripts` (chrooted, config dir at `/_imageconfigs`).
//! 3. `collect_boot_files` — list every file under `/boot` with its size, then
//!    [`plan_iso_tree`] picks the shim, grub, grub.cfg and kernels, or fails naming the
//!    missing file and its package.
//! 4. `make_initrds` — for each kernel version: check that the image's dracut has
//!    `dmsquash-live` ([`argv::DMSQUASH_LIVE_MODULE_DIRS`]), write
//!    [`argv::dracut_live_conf`] to [`argv::DRACUT_LIVE_CONF_PATH`], run
//!    [`argv::dracut_argv`] chrooted in the image, remove the temporary config.
//! 5. `make_rootfs_squashfs` — [`argv::mksquashfs_argv`] with [`argv::ROOTFS_EXCLUDES`]
//!    (no `/etc/fstab`, an empty `/boot`), xattrs kept, to `/liveos/rootfs.img`.
//! 6. `make_grub_cfg` — [`grub_cfg::rewrite_for_iso`] on `/boot/grub2/grub.cfg`: live root by
//!    volume label, dracut LiveOS args, `selinux=0`, the user's ISO args last; `search` by
//!    label; kernel and initrd paths into the ISO's `/boot`.
//! 7. `make_iso_tree` — copy the [`IsoTree`] entries: `/boot` (kernels, new initrds,
//!    grub.cfg, other boot files), `/EFI/BOOT` (shim as `BOOTX64.EFI`/`BOOTAA64.EFI`, grub as
//!    `grubx64.efi`/`grubaa64.efi`, grub.cfg), the El Torito EFI image
//!    ([`argv::efiboot_image_size_kib`], [`argv::mkfs_vfat_argv`],
//!    [`argv::mcopy_preserving_argv`]), on x86_64 the BIOS El Torito image
//!    ([`argv::bios_grub_mkimage_argv`]) and grub's `i386-pc` modules, `/liveos/rootfs.img`,
//!    `iso.additionalFiles`, and the settings record [`iso_record::IsoSettingsRecord`] at
//!    [`iso_record::ISO_SETTINGS_PATH`].
//! 8. `make_iso` — [`argv::xorriso_argv`]: Rock Ridge + Joliet, ISO level 3, El Torito UEFI,
//!    on x86_64 El Torito BIOS and a hybrid MBR/GPT so the same file boots as a CD and as a
//!    `dd`-written disk under both OVMF and SeaBIOS.
//! 9. `write_to_disk` — xorriso's stdout goes straight onto the output disk, hashed on the
//!    way; the size and sha256 go back to the host, which checks its copy against them.
//!
//! # LiveOS ISO → LiveOS ISO
//! `mount_iso` reads [`iso_record::IsoSettingsRecord`] (no record: not made by vmic). If only
//! `iso.*` changed, steps 6–8 rerun on the ISO's own files (`rootfs.img` untouched; the
//! grub.cfg rewrite is idempotent and [`iso_record::merge_user_args`] keeps the recorded
//! ISO args before the new ones). Otherwise `rootfs.img` is unpacked, the ISO's `/boot` put
//! back, and steps 2–8 run as for a disk image.
//!
//! # How grub finds its config on the ISO
//! The image's own shim and grub are reused (Secure Boot keeps working). Where grub looks
//! first depends on how it was built, so the ISO serves every case:
//! - grub with prefix `/boot/grub2` booted from CD: its root is the whole CD (ISO 9660), so
//!   `/boot/grub2/grub.cfg` (the rewritten config) is found directly.
//! - `-noprefix` grub (AzL) and Debian's signed grub fall back to the directory they were
//!   loaded from: `/EFI/BOOT/grub.cfg` holds a copy of the rewritten config on the ISO 9660
//!   tree, and the El Torito FAT image holds a small redirect
//!   ([`argv::grub_redirect_cfg`]: `search --label`, `configfile`).
//! - booted from a `dd`-written USB disk, firmware loads shim + grub from the FAT partition,
//!   so grub's root is that FAT file system: the redirect is also at `/boot/grub2/grub.cfg`
//!   inside the FAT image and sends grub to the ISO 9660 file system by its label.
//! - an image with a separate `/boot` partition has a grub whose embedded config looks for
//!   `grub2/grub.cfg` at the top of that partition (it searches the partition's UUID, finds
//!   nothing on the CD, and keeps the prefix relative to the boot file system). So the redirect
//!   is also at [`BOOT_PARTITION_GRUB_CFGS`] (`/grub2/grub.cfg`, `/grub/grub.cfg`), on the ISO
//!   9660 tree and in the FAT image: wherever such a grub ended up, it reaches the ISO's config.
//! - an image whose grub cannot read ISO 9660 or lacks `search` is not supported yet (a
//!   vmic-built, unsigned grub would be the fallback).

pub mod argv;
pub mod bootloader;
pub mod elf;
pub mod fstab;
pub mod grub_cfg;
pub mod inventory;
pub mod iso_record;
pub mod media_check;
pub mod pxe;

use std::collections::BTreeMap;

/// CPU architecture of the image (and so of the ISO's boot files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The EFI file name suffix: `x64` or `aa64`.
    pub fn efi_suffix(self) -> &'static str {
        match self {
            Arch::X86_64 => "x64",
            Arch::Aarch64 => "aa64",
        }
    }

    /// Shim, as the image ships it and as it sits on the ISO (removable-media name).
    pub fn shim_name(self) -> String {
        format!("boot{}.efi", self.efi_suffix())
    }

    pub fn shim_iso_name(self) -> String {
        format!("BOOT{}.EFI", self.efi_suffix().to_ascii_uppercase())
    }

    /// The grub that shim loads: `grubx64.efi` / `grubaa64.efi`.
    pub fn grub_name(self) -> String {
        format!("grub{}.efi", self.efi_suffix())
    }

    pub fn grub_noprefix_name(self) -> String {
        format!("grub{}-noprefix.efi", self.efi_suffix())
    }

    /// BIOS boot exists only on x86_64.
    pub fn has_bios(self) -> bool {
        matches!(self, Arch::X86_64)
    }
}

/// The main grub config inside the image; the seed requires it.
pub const IMAGE_GRUB_CFG: &str = "/boot/grub2/grub.cfg";
/// Where the rewritten config lives on the ISO (same place as in the image).
pub const ISO_GRUB_CFG: &str = "/boot/grub2/grub.cfg";
/// Where the grub of an image with a separate `/boot` file system looks for its config when
/// that file system is the ISO or the El Torito FAT image: the redirect goes there too.
pub const BOOT_PARTITION_GRUB_CFGS: [&str; 2] = ["/grub2/grub.cfg", "/grub/grub.cfg"];
/// The El Torito EFI boot image (FAT) on the ISO.
pub const ISO_EFIBOOT_IMG: &str = "/boot/grub2/efiboot.img";
/// The El Torito BIOS boot image (grub `i386-pc-eltorito` core) on the ISO.
pub const ISO_BIOS_ELTORITO_IMG: &str = "/boot/grub2/i386-pc/eltorito.img";
/// grub's BIOS modules on the ISO (loaded by the core image through its prefix).
pub const ISO_BIOS_MODULES_DIR: &str = "/boot/grub2/i386-pc";
/// grub's BIOS modules in the builder VM (Debian `grub-pc-bin`).
pub const BUILDER_BIOS_MODULES_DIR: &str = "/usr/lib/grub/i386-pc";
/// The MBR used for BIOS boot from a `dd`-written disk (Debian `grub-pc-bin`).
pub const BUILDER_BOOT_HYBRID_IMG: &str = "/usr/lib/grub/i386-pc/boot_hybrid.img";
/// The squashfs root file system on the ISO (`rd.live.dir=liveos rd.live.squashimg=rootfs.img`).
pub const ISO_ROOTFS_IMG: &str = "/liveos/rootfs.img";

/// A regular file found under the image's `/boot` (absolute path inside the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFile {
    pub path: String,
    pub size: u64,
}

impl BootFile {
    pub fn new(path: impl Into<String>, size: u64) -> BootFile {
        BootFile {
            path: path.into(),
            size,
        }
    }

    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn dir(&self) -> &str {
        self.path.rsplit_once('/').map_or("", |(dir, _)| dir)
    }
}

/// Which grub EFI binary goes onto the ISO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EfiGrubSource {
    /// The image's own (signed) grub, loaded by the image's shim. The default.
    #[default]
    Image,
}

/// What goes into one place of the ISO tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IsoSource {
    /// A file of the (customized) image, by its absolute path inside the image.
    Image(String),
    /// A file or directory of the builder VM itself.
    Builder(String),
    /// A file the pipeline makes.
    Generated(Generated),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    /// The rewritten grub.cfg ([`grub_cfg::rewrite_for_iso`]).
    GrubCfg,
    /// The redirect config of the El Torito FAT image ([`argv::grub_redirect_cfg`]).
    GrubRedirectCfg,
    /// The initrd regenerated with dmsquash-live for this kernel version.
    Initrd { kernel_version: String },
    /// The squashfs root file system.
    Rootfs,
    /// The settings record ([`iso_record::IsoSettingsRecord`]).
    SettingsRecord,
    /// The El Torito EFI FAT image (shim, grub, redirect config).
    EfiBootImage,
    /// grub's BIOS El Torito core image.
    BiosEltorito,
}

/// One kernel of the ISO and the initrd the pipeline makes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPlan {
    pub version: String,
    /// Path of the kernel in the image (and, identically, on the ISO).
    pub kernel: String,
    /// Path of the initrd in the image's `/boot` and on the ISO: the image's own name
    /// (`initrd.img-<version>` on Debian, `initramfs-<version>.img` on Azure Linux/Fedora).
    pub initrd: String,
}

/// The files of the El Torito EFI FAT image: (source, path inside the FAT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiBootImagePlan {
    pub files: Vec<(IsoSource, String)>,
    /// Directories to create in the FAT image, parents first.
    pub dirs: Vec<String>,
    /// Bytes of the files, for [`argv::efiboot_image_size_kib`] (the redirect config is tiny
    /// and counted as one cluster).
    pub content_sizes: Vec<u64>,
}

/// The ISO's file tree: each destination (absolute, on the ISO) and what goes there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoTree {
    pub entries: BTreeMap<String, IsoSource>,
    pub kernels: Vec<KernelPlan>,
    /// The image's shim (path inside the image).
    pub shim: String,
    /// The image's grub EFI binary (path inside the image).
    pub grub: String,
    /// The image's grub is a `-noprefix` build.
    pub grub_noprefix: bool,
    pub efi_boot_image: EfiBootImagePlan,
    /// BIOS boot is set up (x86_64).
    pub bios: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
/// A file the ISO needs is missing from the image (each variant names the file).
pub enum IsoTreeError {
    #[error(
        "the image has no {IMAGE_GRUB_CFG}: it must be the main grub configuration \
         (usually made by the `grub2`/`grub-common` package tooling, e.g. grub2-mkconfig)"
    )]
    GrubCfg,
    #[error(
        "the image has no shim ({file}) under /boot; it is usually provided by the package \
         {package}"
    )]
    Shim { file: String, package: &'static str },
    #[error(
        "the image has no grub EFI binary ({file} or {noprefix}) under /boot; it is usually \
         provided by the package {package}"
    )]
    Grub {
        file: String,
        noprefix: String,
        package: &'static str,
    },
    #[error(
        "the image has no kernel (/boot/vmlinuz-<version>); it is usually provided by the \
         package `kernel` (Azure Linux) or `linux-image-*` (Debian)"
    )]
    Kernel,
}

fn shim_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "`shim` (Azure Linux) or `shim-signed` (Debian)",
        Arch::Aarch64 => "`shim` (Azure Linux) or `shim-signed` (Debian, arm64)",
    }
}

fn grub_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => {
            "`grub2-efi-binary` or `grub2-efi-binary-noprefix` (Azure Linux) or \
             `grub-efi-amd64-signed` (Debian)"
        }
        Arch::Aarch64 => {
            "`grub2-efi-binary` or `grub2-efi-binary-noprefix` (Azure Linux) or \
             `grub-efi-arm64-signed` (Debian)"
        }
    }
}

/// The ISO tree for an image whose `/boot` holds `boot_files` (every regular file under
/// `/boot`, ESP included). `referenced_initrds` are the initrd file names grub.cfg names
/// ([`grub_cfg::RewrittenGrubCfg::initrds`]), used to keep the image's initrd naming.
pub fn plan_iso_tree(
    arch: Arch,
    boot_files: &[BootFile],
    referenced_initrds: &[String],
    efi_grub: EfiGrubSource,
) -> Result<IsoTree, IsoTreeError> {
    if !boot_files.iter().any(|f| f.path == IMAGE_GRUB_CFG) {
        return Err(IsoTreeError::GrubCfg);
    }
    let shim =
        pick_efi_binary(boot_files, &[arch.shim_name()]).ok_or_else(|| IsoTreeError::Shim {
            file: arch.shim_name(),
            package: shim_package(arch),
        })?;
    // Shim loads `grub<arch>.efi` from its own directory: prefer that file there, then the
    // -noprefix build there, then either anywhere under /boot.
    let grub_names = [arch.grub_name(), arch.grub_noprefix_name()];
    let grub = grub_names
        .iter()
        .find_map(|name| {
            boot_files
                .iter()
                .find(|f| f.dir() == shim.dir() && f.file_name().eq_ignore_ascii_case(name))
        })
        .or_else(|| pick_efi_binary(boot_files, &grub_names))
        .ok_or_else(|| IsoTreeError::Grub {
            file: arch.grub_name(),
            noprefix: arch.grub_noprefix_name(),
            package: grub_package(arch),
        })?;
    let grub_noprefix = grub
        .file_name()
        .eq_ignore_ascii_case(&arch.grub_noprefix_name());

    let kernels = plan_kernels(boot_files, referenced_initrds);
    if kernels.is_empty() {
        return Err(IsoTreeError::Kernel);
    }

    let mut entries = BTreeMap::new();
    let regenerated: Vec<&str> = kernels.iter().map(|k| k.initrd.as_str()).collect();
    for file in boot_files {
        let path = file.path.as_str();
        // The ESP's content is not needed on the ISO (shim and grub are placed below), nor
        // its redirect grub.cfg; grub.cfg and the initrds are replaced by generated ones; an
        // image's own BIOS grub modules would not match the builder's BIOS core image.
        if path.starts_with("/boot/efi/")
            || (arch.has_bios() && path.starts_with("/boot/grub2/i386-pc/"))
            || path == IMAGE_GRUB_CFG
            || regenerated.contains(&path)
            || !path.starts_with("/boot/")
        {
            continue;
        }
        entries.insert(path.to_owned(), IsoSource::Image(path.to_owned()));
    }
    for kernel in &kernels {
        entries.insert(
            kernel.initrd.clone(),
            IsoSource::Generated(Generated::Initrd {
                kernel_version: kernel.version.clone(),
            }),
        );
    }
    entries.insert(
        ISO_GRUB_CFG.to_owned(),
        IsoSource::Generated(Generated::GrubCfg),
    );
    let efi_dir = "/EFI/BOOT";
    let shim_dest = format!("{efi_dir}/{}", arch.shim_iso_name());
    let grub_dest = format!("{efi_dir}/{}", arch.grub_name());
    let grub_source = match efi_grub {
        EfiGrubSource::Image => IsoSource::Image(grub.path.clone()),
    };
    entries.insert(shim_dest.clone(), IsoSource::Image(shim.path.clone()));
    entries.insert(grub_dest, grub_source.clone());
    // Spec step 7 asks for this copy with -noprefix grub; with other builds it is harmless
    // and serves grubs that fall back to `$cmdpath/grub.cfg` (Debian's signed grub).
    entries.insert(
        format!("{efi_dir}/grub.cfg"),
        IsoSource::Generated(Generated::GrubCfg),
    );
    for path in BOOT_PARTITION_GRUB_CFGS {
        entries.insert(
            path.to_owned(),
            IsoSource::Generated(Generated::GrubRedirectCfg),
        );
    }
    entries.insert(
        ISO_EFIBOOT_IMG.to_owned(),
        IsoSource::Generated(Generated::EfiBootImage),
    );
    entries.insert(
        ISO_ROOTFS_IMG.to_owned(),
        IsoSource::Generated(Generated::Rootfs),
    );
    entries.insert(
        iso_record::ISO_SETTINGS_PATH.to_owned(),
        IsoSource::Generated(Generated::SettingsRecord),
    );
    let bios = arch.has_bios();
    if bios {
        entries.insert(
            ISO_BIOS_MODULES_DIR.to_owned(),
            IsoSource::Builder(BUILDER_BIOS_MODULES_DIR.to_owned()),
        );
        entries.insert(
            ISO_BIOS_ELTORITO_IMG.to_owned(),
            IsoSource::Generated(Generated::BiosEltorito),
        );
    }

    let grub_size = grub.size;
    let mut efi_boot_image = EfiBootImagePlan {
        dirs: vec![
            "/EFI".to_owned(),
            efi_dir.to_owned(),
            "/boot".to_owned(),
            "/boot/grub2".to_owned(),
            "/grub2".to_owned(),
            "/grub".to_owned(),
        ],
        files: vec![
            (IsoSource::Image(shim.path.clone()), shim_dest),
            (grub_source, format!("{efi_dir}/{}", arch.grub_name())),
            (
                IsoSource::Generated(Generated::GrubRedirectCfg),
                format!("{efi_dir}/grub.cfg"),
            ),
            (
                IsoSource::Generated(Generated::GrubRedirectCfg),
                "/boot/grub2/grub.cfg".to_owned(),
            ),
        ],
        content_sizes: vec![shim.size, grub_size, 4096, 4096],
    };
    for path in BOOT_PARTITION_GRUB_CFGS {
        efi_boot_image.files.push((
            IsoSource::Generated(Generated::GrubRedirectCfg),
            path.to_owned(),
        ));
        efi_boot_image.content_sizes.push(4096);
    }

    Ok(IsoTree {
        entries,
        kernels,
        shim: shim.path.clone(),
        grub: grub.path.clone(),
        grub_noprefix,
        efi_boot_image,
        bios,
    })
}

/// The file named like one of `names` (case-insensitive), preferring, in order:
/// `/boot/efi/EFI/BOOT/`, anywhere in the ESP, anywhere under `/boot`; then the order of
/// `names`; then the path (for a stable choice).
fn pick_efi_binary<'a>(boot_files: &'a [BootFile], names: &[String]) -> Option<&'a BootFile> {
    boot_files
        .iter()
        .filter_map(|file| {
            let name_rank = names
                .iter()
                .position(|name| file.file_name().eq_ignore_ascii_case(name))?;
            let dir = file.dir().to_ascii_lowercase();
            let place_rank = if dir == "/boot/efi/efi/boot" {
                0
            } else if dir.starts_with("/boot/efi/") {
                1
            } else {
                2
            };
            Some(((place_rank, name_rank, file.path.as_str()), file))
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, file)| file)
}

/// Initrd naming conventions, tried in order when neither grub.cfg nor `/boot` tells.
fn initrd_candidates(version: &str) -> [String; 3] {
    [
        format!("initramfs-{version}.img"),
        format!("initrd.img-{version}"),
        format!("initrd-{version}"),
    ]
}

fn plan_kernels(boot_files: &[BootFile], referenced_initrds: &[String]) -> Vec<KernelPlan> {
    let mut kernels: Vec<KernelPlan> = boot_files
        .iter()
        .filter(|f| f.dir() == "/boot")
        .filter_map(|f| {
            let version = f.file_name().strip_prefix("vmlinuz-")?;
            // Fedora-style rescue kernels have no modules of their own version.
            if version.is_empty() || version.contains("-rescue-") || version.ends_with(".hmac") {
                return None;
            }
            let candidates = initrd_candidates(version);
            let named_by_grub = candidates
                .iter()
                .find(|c| referenced_initrds.iter().any(|r| r == *c));
            let present = candidates
                .iter()
                .find(|c| boot_files.iter().any(|b| b.path == format!("/boot/{c}")));
            let uses_initramfs_names = boot_files
                .iter()
                .any(|b| b.dir() == "/boot" && b.file_name().starts_with("initramfs-"));
            let name = named_by_grub.or(present).cloned().unwrap_or_else(|| {
                if uses_initramfs_names {
                    candidates[0].clone()
                } else {
                    candidates[1].clone()
                }
            });
            Some(KernelPlan {
                version: version.to_owned(),
                kernel: f.path.clone(),
                initrd: format!("/boot/{name}"),
            })
        })
        .collect();
    kernels.sort_by(|a, b| a.version.cmp(&b.version));
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debian_boot() -> Vec<BootFile> {
        vec![
            BootFile::new("/boot/vmlinuz-6.1.0-28-cloud-amd64", 8_000_000),
            BootFile::new("/boot/initrd.img-6.1.0-28-cloud-amd64", 30_000_000),
            BootFile::new("/boot/config-6.1.0-28-cloud-amd64", 250_000),
            BootFile::new("/boot/System.map-6.1.0-28-cloud-amd64", 80),
            BootFile::new("/boot/grub2/grub.cfg", 700),
            BootFile::new("/boot/grub2/early.cfg", 200),
            BootFile::new("/boot/efi/EFI/BOOT/bootx64.efi", 950_000),
            BootFile::new("/boot/efi/EFI/BOOT/grubx64.efi", 2_600_000),
        ]
    }

    fn azure_linux_boot() -> Vec<BootFile> {
        vec![
            BootFile::new("/boot/vmlinuz-6.6.57.1-2.azl3", 14_000_000),
            BootFile::new("/boot/.vmlinuz-6.6.57.1-2.azl3.hmac", 100),
            BootFile::new("/boot/initramfs-6.6.57.1-2.azl3.img", 40_000_000),
            BootFile::new("/boot/config-6.6.57.1-2.azl3", 200_000),
            BootFile::new("/boot/mariner.cfg", 300),
            BootFile::new("/boot/grub2/grub.cfg", 1200),
            BootFile::new("/boot/grub2/grubenv", 1024),
            BootFile::new("/boot/efi/boot/grub2/grub.cfg", 150),
            BootFile::new("/boot/efi/EFI/BOOT/bootx64.efi", 950_000),
            BootFile::new("/boot/efi/EFI/BOOT/grubx64-noprefix.efi", 2_700_000),
        ]
    }

    #[test]
    fn debian_layout() {
        let tree =
            plan_iso_tree(Arch::X86_64, &debian_boot(), &[], EfiGrubSource::Image).expect("plan");
        assert_eq!(tree.shim, "/boot/efi/EFI/BOOT/bootx64.efi");
        assert_eq!(tree.grub, "/boot/efi/EFI/BOOT/grubx64.efi");
        assert!(!tree.grub_noprefix);
        assert!(tree.bios);
        assert_eq!(
            tree.kernels,
            vec![KernelPlan {
                version: "6.1.0-28-cloud-amd64".into(),
                kernel: "/boot/vmlinuz-6.1.0-28-cloud-amd64".into(),
                initrd: "/boot/initrd.img-6.1.0-28-cloud-amd64".into(),
            }]
        );
        let listing: Vec<String> = tree
            .entries
            .iter()
            .map(|(dest, source)| format!("{dest} <- {source:?}"))
            .collect();
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!("iso_tree_debian_x86_64", listing.join("\n"));
        });
        // The rule behind the snapshot: a grub whose prefix is relative to a separate /boot
        // file system finds the redirect at the top of the ISO and of the FAT image.
        for path in BOOT_PARTITION_GRUB_CFGS {
            assert_eq!(
                tree.entries.get(path),
                Some(&IsoSource::Generated(Generated::GrubRedirectCfg)),
                "{path} on the ISO"
            );
            assert!(
                tree.efi_boot_image
                    .files
                    .iter()
                    .any(|(source, dest)| dest == path
                        && *source == IsoSource::Generated(Generated::GrubRedirectCfg)),
                "{path} in the FAT image"
            );
        }
        let fat = &tree.efi_boot_image;
        assert_eq!(
            fat.files.len(),
            fat.content_sizes.len(),
            "a size for every file"
        );
    }

    #[test]
    fn azure_linux_layout_noprefix_and_initramfs_names() {
        let tree = plan_iso_tree(Arch::X86_64, &azure_linux_boot(), &[], EfiGrubSource::Image)
            .expect("plan");
        assert!(tree.grub_noprefix);
        assert_eq!(tree.grub, "/boot/efi/EFI/BOOT/grubx64-noprefix.efi");
        assert_eq!(
            tree.entries.get("/EFI/BOOT/grubx64.efi"),
            Some(&IsoSource::Image(
                "/boot/efi/EFI/BOOT/grubx64-noprefix.efi".into()
            ))
        );
        assert_eq!(
            tree.entries.get("/EFI/BOOT/grub.cfg"),
            Some(&IsoSource::Generated(Generated::GrubCfg))
        );
        assert_eq!(
            tree.kernels[0].initrd,
            "/boot/initramfs-6.6.57.1-2.azl3.img"
        );
        // The hmac file and mariner.cfg are boot files grub (or FIPS) needs; the ESP's
        // redirect grub.cfg is not copied.
        assert!(tree
            .entries
            .contains_key("/boot/.vmlinuz-6.6.57.1-2.azl3.hmac"));
        assert!(tree.entries.contains_key("/boot/mariner.cfg"));
        assert!(!tree.entries.keys().any(|k| k.starts_with("/boot/efi")));
        assert_eq!(
            tree.entries.get("/boot/initramfs-6.6.57.1-2.azl3.img"),
            Some(&IsoSource::Generated(Generated::Initrd {
                kernel_version: "6.6.57.1-2.azl3".into()
            }))
        );
    }

    #[test]
    fn aarch64_has_no_bios_and_uses_aa64_names() {
        let files = vec![
            BootFile::new("/boot/vmlinuz-6.1.0-28-cloud-arm64", 1),
            BootFile::new("/boot/grub2/grub.cfg", 1),
            BootFile::new("/boot/efi/EFI/BOOT/BOOTAA64.EFI", 1),
            BootFile::new("/boot/efi/EFI/BOOT/grubaa64.efi", 1),
        ];
        let tree = plan_iso_tree(Arch::Aarch64, &files, &[], EfiGrubSource::Image).expect("plan");
        assert!(!tree.bios);
        assert!(tree.entries.contains_key("/EFI/BOOT/BOOTAA64.EFI"));
        assert!(tree.entries.contains_key("/EFI/BOOT/grubaa64.efi"));
        assert!(!tree.entries.contains_key(ISO_BIOS_ELTORITO_IMG));
        // No initrd in /boot, no initramfs-* files: Debian naming.
        assert_eq!(
            tree.kernels[0].initrd,
            "/boot/initrd.img-6.1.0-28-cloud-arm64"
        );
    }

    #[test]
    fn grub_cfg_names_the_initrd() {
        let files = vec![
            BootFile::new("/boot/vmlinuz-5.10", 1),
            BootFile::new("/boot/grub2/grub.cfg", 1),
            BootFile::new("/boot/efi/EFI/BOOT/bootx64.efi", 1),
            BootFile::new("/boot/efi/EFI/BOOT/grubx64.efi", 1),
        ];
        let tree = plan_iso_tree(
            Arch::X86_64,
            &files,
            &["initrd-5.10".to_owned()],
            EfiGrubSource::Image,
        )
        .expect("plan");
        assert_eq!(tree.kernels[0].initrd, "/boot/initrd-5.10");
    }

    #[test]
    fn prefers_grub_next_to_shim() {
        let files = vec![
            BootFile::new("/boot/vmlinuz-1", 1),
            BootFile::new("/boot/grub2/grub.cfg", 1),
            BootFile::new("/boot/efi/EFI/debian/grubx64.efi", 1),
            BootFile::new("/boot/efi/EFI/BOOT/BOOTX64.EFI", 1),
            BootFile::new("/boot/efi/EFI/BOOT/grubx64.efi", 2),
            BootFile::new("/boot/efi/EFI/BOOT/grubx64-noprefix.efi", 3),
        ];
        let tree = plan_iso_tree(Arch::X86_64, &files, &[], EfiGrubSource::Image).expect("plan");
        assert_eq!(tree.shim, "/boot/efi/EFI/BOOT/BOOTX64.EFI");
        assert_eq!(tree.grub, "/boot/efi/EFI/BOOT/grubx64.efi");
    }

    #[test]
    fn missing_files_name_the_package() {
        let cases: Vec<(Vec<BootFile>, &str)> = vec![
            (
                debian_boot()
                    .into_iter()
                    .filter(|f| f.path != "/boot/grub2/grub.cfg")
                    .collect(),
                "/boot/grub2/grub.cfg",
            ),
            (
                debian_boot()
                    .into_iter()
                    .filter(|f| !f.path.ends_with("bootx64.efi"))
                    .collect(),
                "no shim (bootx64.efi) under /boot; it is usually provided by the package \
                 `shim` (Azure Linux) or `shim-signed` (Debian)",
            ),
            (
                debian_boot()
                    .into_iter()
                    .filter(|f| !f.path.ends_with("grubx64.efi"))
                    .collect(),
                "grubx64.efi or grubx64-noprefix.efi",
            ),
            (
                debian_boot()
                    .into_iter()
                    .filter(|f| !f.path.contains("vmlinuz"))
                    .collect(),
                "linux-image-*",
            ),
        ];
        for (files, expected) in cases {
            let error = plan_iso_tree(Arch::X86_64, &files, &[], EfiGrubSource::Image)
                .expect_err("must fail");
            let message = error.to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let error = plan_iso_tree(Arch::X86_64, &debian_boot(), &[], EfiGrubSource::Image)
            .map(|_| ())
            .and_then(|()| {
                plan_iso_tree(
                    Arch::X86_64,
                    &debian_boot()
                        .into_iter()
                        .filter(|f| !f.path.ends_with("grubx64.efi"))
                        .collect::<Vec<_>>(),
                    &[],
                    EfiGrubSource::Image,
                )
                .map(|_| ())
            })
            .expect_err("no grub");
        assert!(error.to_string().contains("grub-efi-amd64-signed"));
    }
}
