//! PXE artifacts (`pxe-dir`/`pxe-tar`), planned from the LiveOS ISO's tree: what a TFTP root
//! needs (shim and grub at the top, as the firmware's DHCP boot file names them, grub.cfg
//! where grub looks, the kernels and initrds grub.cfg names) plus, for a bootstrap initrd, the
//! ISO that dracut's `livenet` fetches. Laid out as the Image Customizer documents it.

use super::Arch;

/// ISO tree paths that are no use over the network: the squashfs (inside the bootstrap ISO
/// instead), the El Torito boot images and grub's BIOS modules.
pub const LEFT_OUT: [&str; 4] = [
    "liveos",
    "boot/grub2/efiboot.img",
    "boot/grub2/i386-pc",
    "boot.catalog",
];

/// Where a PXE artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PxeSource {
    /// This file of the ISO tree (relative path).
    Tree(String),
    /// The PXE grub.cfg ([`super::grub_cfg::rewrite_for_pxe`]): every grub.cfg of the ISO tree
    /// is replaced by it, so that grub finds it wherever its prefix points.
    GrubCfg,
    /// The bootstrap ISO.
    BootstrapIso,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PxePlanError {
    #[error("the ISO tree has no {0}: the PXE artifacts need the image's shim and grub")]
    MissingBootFile(String),
    #[error(
        "{0} is both a PXE boot file and a file of pxe.additionalFiles; give the additional \
         file another destination"
    )]
    Collision(String),
}

/// The artifacts, sorted by destination (relative paths), from the ISO tree's files
/// (relative paths, any order).
pub fn plan_pxe(
    tree_files: &[String],
    arch: Arch,
    bootstrap_file_name: Option<&str>,
) -> Result<Vec<(String, PxeSource)>, PxePlanError> {
    let mut plan: Vec<(String, PxeSource)> = Vec::new();
    for file in tree_files {
        let left_out = LEFT_OUT
            .iter()
            .any(|out| file == out || file.starts_with(&format!("{out}/")));
        if left_out {
            continue;
        }
        let source = match file.rsplit('/').next() == Some("grub.cfg") {
            true => PxeSource::GrubCfg,
            false => PxeSource::Tree(file.clone()),
        };
        plan.push((file.clone(), source));
    }
    // The firmware loads the DHCP boot file (shim); shim loads grub from beside itself.
    for (name, in_tree) in [
        (
            arch.shim_name(),
            format!("EFI/BOOT/{}", arch.shim_iso_name()),
        ),
        (arch.grub_name(), format!("EFI/BOOT/{}", arch.grub_name())),
    ] {
        if !tree_files.contains(&in_tree) {
            return Err(PxePlanError::MissingBootFile(format!("/{in_tree}")));
        }
        push_unique(&mut plan, name, PxeSource::Tree(in_tree))?;
    }
    if let Some(name) = bootstrap_file_name {
        push_unique(&mut plan, name.to_string(), PxeSource::BootstrapIso)?;
    }
    plan.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(plan)
}

fn push_unique(
    plan: &mut Vec<(String, PxeSource)>,
    dest: String,
    source: PxeSource,
) -> Result<(), PxePlanError> {
    if plan.iter().any(|(existing, _)| *existing == dest) {
        return Err(PxePlanError::Collision(format!("/{dest}")));
    }
    plan.push((dest, source));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Vec<String> {
        [
            "EFI/BOOT/BOOTX64.EFI",
            "EFI/BOOT/grubx64.efi",
            "EFI/BOOT/grub.cfg",
            "boot/grub2/grub.cfg",
            "boot/grub2/efiboot.img",
            "boot/grub2/i386-pc/eltorito.img",
            "boot/grub2/i386-pc/normal.mod",
            "boot/vmlinuz-6.1",
            "boot/initrd.img-6.1",
            "grub2/grub.cfg",
            "liveos/rootfs.img",
            "vmic/iso-settings.json",
            "seed/user-data",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn pxe_artifacts_are_the_iso_boot_files_with_shim_and_grub_on_top() {
        let plan = plan_pxe(&tree(), Arch::X86_64, Some("image.iso")).unwrap();
        let rendered: Vec<String> = plan
            .iter()
            .map(|(dest, source)| format!("{dest} <- {source:?}"))
            .collect();
        assert_eq!(
            rendered,
            [
                "EFI/BOOT/BOOTX64.EFI <- Tree(\"EFI/BOOT/BOOTX64.EFI\")",
                "EFI/BOOT/grub.cfg <- GrubCfg",
                "EFI/BOOT/grubx64.efi <- Tree(\"EFI/BOOT/grubx64.efi\")",
                "boot/grub2/grub.cfg <- GrubCfg",
                "boot/initrd.img-6.1 <- Tree(\"boot/initrd.img-6.1\")",
                "boot/vmlinuz-6.1 <- Tree(\"boot/vmlinuz-6.1\")",
                "bootx64.efi <- Tree(\"EFI/BOOT/BOOTX64.EFI\")",
                "grub2/grub.cfg <- GrubCfg",
                "grubx64.efi <- Tree(\"EFI/BOOT/grubx64.efi\")",
                "image.iso <- BootstrapIso",
                "seed/user-data <- Tree(\"seed/user-data\")",
                "vmic/iso-settings.json <- Tree(\"vmic/iso-settings.json\")",
            ]
        );
        // The documented layout: shim and grub at the top, grub.cfg under boot/grub2.
        for required in [
            "bootx64.efi",
            "grubx64.efi",
            "boot/grub2/grub.cfg",
            "image.iso",
        ] {
            assert!(plan.iter().any(|(dest, _)| dest == required), "{required}");
        }
        // Nothing of the El Torito images or the squashfs.
        assert!(!plan.iter().any(|(dest, _)| dest.starts_with("liveos")
            || dest.contains("i386-pc")
            || dest.ends_with("efiboot.img")));
    }

    #[test]
    fn a_full_os_plan_has_no_iso_and_aarch64_names_its_own_binaries() {
        let tree: Vec<String> = tree()
            .into_iter()
            .map(|path| path.replace("x64", "aa64").replace("X64", "AA64"))
            .collect();
        let plan = plan_pxe(&tree, Arch::Aarch64, None).unwrap();
        assert!(plan.iter().any(|(dest, _)| dest == "bootaa64.efi"));
        assert!(plan.iter().any(|(dest, _)| dest == "grubaa64.efi"));
        assert!(!plan
            .iter()
            .any(|(_, source)| *source == PxeSource::BootstrapIso));
    }

    #[test]
    fn missing_boot_files_and_collisions_are_refused() {
        let without_grub: Vec<String> = tree()
            .into_iter()
            .filter(|path| !path.ends_with("grubx64.efi"))
            .collect();
        assert_eq!(
            plan_pxe(&without_grub, Arch::X86_64, None),
            Err(PxePlanError::MissingBootFile(
                "/EFI/BOOT/grubx64.efi".into()
            ))
        );
        let mut with_iso = tree();
        with_iso.push("image.iso".into());
        assert_eq!(
            plan_pxe(&with_iso, Arch::X86_64, Some("image.iso")),
            Err(PxePlanError::Collision("/image.iso".into()))
        );
        let mut with_shim = tree();
        with_shim.push("bootx64.efi".into());
        assert_eq!(
            plan_pxe(&with_shim, Arch::X86_64, None),
            Err(PxePlanError::Collision("/bootx64.efi".into()))
        );
    }
}
