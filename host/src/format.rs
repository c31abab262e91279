//! The image formats vmic reads and writes, with QEMU's name for each: a leaf module (it
//! imports nothing of vmic) so that the CLI, the config and the builders can all name them.

/// Image formats `vmic boot` attaches, with QEMU's name for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// VHD, fixed or dynamic (QEMU's `vpc` driver).
    Vpc,
    Vhdx,
    /// ISO 9660, booted as a CD-ROM.
    Iso,
}

impl ImageFormat {
    /// The QEMU block driver (always given explicitly: QEMU never probes).
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw | ImageFormat::Iso => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Vhdx => "vhdx",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vpc => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Iso => "iso",
        }
    }
}

/// What `customize` writes: the LiveOS ISO or the customized disk in a disk format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum OutputFormat {
    Iso,
    Raw,
    Qcow2,
    Vhd,
    #[value(name = "vhd-fixed")]
    VhdFixed,
    Vhdx,
    /// PXE boot artifacts in a directory (`pxe.*` settings).
    #[value(name = "pxe-dir")]
    #[serde(rename = "pxe-dir")]
    PxeDir,
    /// The same artifacts as one `.tar.gz`.
    #[value(name = "pxe-tar")]
    #[serde(rename = "pxe-tar")]
    PxeTar,
}

impl OutputFormat {
    /// A LiveOS output the builder VM masters (ISO or PXE), not a converted disk.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            OutputFormat::Iso | OutputFormat::PxeDir | OutputFormat::PxeTar
        )
    }

    pub fn is_pxe(self) -> bool {
        matches!(self, OutputFormat::PxeDir | OutputFormat::PxeTar)
    }

    /// What `qemu-img convert -O` writes this format with, and its `-o` options; `None` for
    /// the ISO, which the builder VM masters instead.
    pub fn qemu_target(self) -> Option<(&'static str, Option<&'static str>)> {
        match self {
            OutputFormat::Raw => Some(("raw", None)),
            OutputFormat::Qcow2 => Some(("qcow2", None)),
            // force_size keeps the virtual size exact instead of rounding to VHD geometry,
            // which Azure requires for fixed VHDs and which keeps partition tables valid.
            OutputFormat::Vhd => Some(("vpc", Some("subformat=dynamic,force_size=on"))),
            OutputFormat::VhdFixed => Some(("vpc", Some("subformat=fixed,force_size=on"))),
            OutputFormat::Vhdx => Some(("vhdx", None)),
            OutputFormat::Iso | OutputFormat::PxeDir | OutputFormat::PxeTar => None,
        }
    }

    /// The spelling on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Iso => "iso",
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Vhd => "vhd",
            OutputFormat::VhdFixed => "vhd-fixed",
            OutputFormat::Vhdx => "vhdx",
            OutputFormat::PxeDir => "pxe-dir",
            OutputFormat::PxeTar => "pxe-tar",
        }
    }
}
