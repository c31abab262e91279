//! Input image formats, detected from content (never from the file name).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// VHD, fixed (footer only) or dynamic (footer copy at offset 0).
    Vhd,
    Vhdx,
    /// An ISO 9660 file system (a LiveOS ISO for `customize`, or any bootable ISO for `boot`).
    Iso,
}

impl ImageFormat {
    /// QEMU's block driver name: always passed explicitly, never probed by QEMU.
    pub fn qemu_format(self) -> &'static str {
        match self {
            ImageFormat::Raw | ImageFormat::Iso => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Iso => "iso",
        }
    }
}

/// Look at the magic numbers of `path`.
pub fn detect(path: &Path) -> anyhow::Result<ImageFormat> {
    let mut file = fs_err::File::open(path)?;
    let size = file.metadata()?.len();
    let mut head = vec![0u8; 0x8006];
    let read = read_up_to(&mut file, &mut head)?;
    head.truncate(read);
    if head.starts_with(b"QFI\xfb") {
        return Ok(ImageFormat::Qcow2);
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(ImageFormat::Vhdx);
    }
    if head.starts_with(b"conectix") {
        return Ok(ImageFormat::Vhd);
    }
    if head.len() >= 0x8006 && &head[0x8001..0x8006] == b"CD001" {
        return Ok(ImageFormat::Iso);
    }
    if size >= 512 {
        let mut footer = [0u8; 8];
        file.seek(SeekFrom::Start(size - 512))?;
        file.read_exact(&mut footer)
            .with_context(|| format!("reading the end of {}", path.display()))?;
        if &footer == b"conectix" {
            return Ok(ImageFormat::Vhd);
        }
    }
    Ok(ImageFormat::Raw)
}

fn read_up_to(file: &mut fs_err::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_bytes(bytes: &[u8]) -> ImageFormat {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        fs_err::write(file.path(), bytes).expect("write");
        detect(file.path()).expect("detect")
    }

    #[test]
    fn formats_are_detected_from_magic() {
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        assert_eq!(detect_bytes(b"vhdxfile"), ImageFormat::Vhdx);
        assert_eq!(detect_bytes(b"conectix"), ImageFormat::Vhd);
        let mut fixed_vhd = vec![0u8; 4096];
        fixed_vhd[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&fixed_vhd), ImageFormat::Vhd);
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(detect_bytes(&iso), ImageFormat::Iso);
        assert_eq!(detect_bytes(&[0u8; 1024]), ImageFormat::Raw);
        assert_eq!(detect_bytes(b""), ImageFormat::Raw);
    }
}
