//! What an image file is: its format, from its content (never its extension), and its
//! architecture, from the names of the UEFI boot loaders it carries. Shared by `customize`
//! and `boot`.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;

pub use crate::format::{ImageFormat, OutputFormat};
use crate::machine::Arch;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot read image file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
}

/// Where the ISO 9660 primary volume descriptor's "CD001" lies (sector 16, after the type byte).
const ISO_MAGIC_OFFSET: usize = 0x8001;
const VHD_FOOTER: usize = 512;

/// Detect the format of the image at `path` from its first bytes and its footer.
pub fn detect_format(path: &Path) -> Result<ImageFormat, DetectError> {
    let read_error = |source| DetectError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(DetectError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut head = Vec::with_capacity(ISO_MAGIC_OFFSET + 5);
    (&mut file)
        .take((ISO_MAGIC_OFFSET + 5) as u64)
        .read_to_end(&mut head)
        .map_err(read_error)?;
    let mut footer = vec![0; VHD_FOOTER];
    if metadata.len() >= VHD_FOOTER as u64 {
        file.seek(SeekFrom::End(-(VHD_FOOTER as i64)))
            .map_err(read_error)?;
        file.read_exact(&mut footer).map_err(read_error)?;
    }
    Ok(format_from_bytes(&head, &footer))
}

/// The format, given the image's first bytes (at least 0x8006 to recognise an ISO) and its
/// last 512 bytes.
pub fn format_from_bytes(head: &[u8], footer: &[u8]) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if head.starts_with(b"vhdxfile") {
        ImageFormat::Vhdx
    } else if head.starts_with(b"conectix") || footer.starts_with(b"conectix") {
        // Dynamic VHDs start with a copy of the footer; fixed ones only end with it.
        ImageFormat::Vpc
    } else if head.get(ISO_MAGIC_OFFSET..ISO_MAGIC_OFFSET + 5) == Some(b"CD001") {
        ImageFormat::Iso
    } else {
        ImageFormat::Raw
    }
}

/// How much of an image is searched for boot loader names when there is no ESP to look in.
const SCAN_WITHOUT_ESP: u64 = 64 << 20;
/// At most this much of an ESP is searched.
const SCAN_ESP_MAX: u64 = 256 << 20;

/// The architecture of the UEFI boot loaders the image carries (`EFI/BOOT/BOOTX64.EFI` or
/// `BOOTAA64.EFI`), searched in the ESP of a GPT disk or in the start of an ISO.
/// Best effort: `None` when unreadable, absent or ambiguous.
pub fn detect_arch(path: &Path, format: ImageFormat) -> Option<Arch> {
    let reader = RangeReader { path, format };
    let start = match reader.read(0, 1 << 20) {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::debug!(%error, "cannot read the image to detect its architecture");
            return None;
        }
    };
    let (offset, length) = match esp_range(&start) {
        Some((offset, length)) => (offset, length.min(SCAN_ESP_MAX)),
        None => (0, SCAN_WITHOUT_ESP),
    };
    match reader.read(offset, length) {
        Ok(bytes) => arch_from_bytes(&bytes),
        Err(error) => {
            tracing::debug!(%error, "cannot read the image to detect its architecture");
            None
        }
    }
}

/// The byte range of the EFI System Partition, from the GPT at the start of a disk
/// (512-byte sectors).
pub fn esp_range(start: &[u8]) -> Option<(u64, u64)> {
    const SECTOR: u64 = 512;
    // C12A7328-F81F-11D2-BA4B-00A0C93EC93B as stored on disk (mixed endian).
    const ESP_TYPE: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    let header = start.get(512..512 + 92)?;
    if &header[..8] != b"EFI PART" {
        return None;
    }
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().ok()?);
    let count = u32::from_le_bytes(header[80..84].try_into().ok()?) as usize;
    let entry_size = u32::from_le_bytes(header[84..88].try_into().ok()?) as usize;
    if entry_size < 128 {
        return None;
    }
    let base = usize::try_from(entries_lba.checked_mul(SECTOR)?).ok()?;
    (0..count.min(256)).find_map(|index| {
        let entry = start.get(base + index * entry_size..base + index * entry_size + 128)?;
        if entry[..16] != ESP_TYPE {
            return None;
        }
        let first = u64::from_le_bytes(entry[32..40].try_into().ok()?);
        let last = u64::from_le_bytes(entry[40..48].try_into().ok()?);
        (last >= first).then(|| (first * SECTOR, (last - first + 1) * SECTOR))
    })
}

/// The architecture whose default boot loader name appears in `bytes`: FAT 8.3 directory
/// entries (`BOOTX64 EFI`) or ISO 9660 names (`BOOTX64.EFI`), in any case.
pub fn arch_from_bytes(bytes: &[u8]) -> Option<Arch> {
    let pattern = regex::bytes::Regex::new(r"(?i-u)BOOT(X64|AA64)[ .]?EFI")
        .expect("the boot loader name pattern is valid");
    let (mut x86_64, mut aarch64) = (false, false);
    for captures in pattern.captures_iter(bytes) {
        match captures[1].to_ascii_uppercase().as_slice() {
            b"X64" => x86_64 = true,
            _ => aarch64 = true,
        }
    }
    match (x86_64, aarch64) {
        (true, false) => Some(Arch::X86_64),
        (false, true) => Some(Arch::Aarch64),
        _ => None,
    }
}

/// The architecture to run `path` with: `requested` (`--arch`) when given, else the one its
/// boot loaders name, else the host's. One resolution for `customize` and `boot`.
pub fn resolve_arch(requested: Option<Arch>, path: &Path, format: ImageFormat) -> Option<Arch> {
    requested
        .or_else(|| detect_arch(path, format))
        .or_else(Arch::host)
}

/// Reads byte ranges of an image's guest-visible content: directly for raw images and ISOs
/// (and fixed VHDs), through `qemu-img dd` for the others.
struct RangeReader<'a> {
    path: &'a Path,
    format: ImageFormat,
}

impl RangeReader<'_> {
    fn read(&self, offset: u64, length: u64) -> anyhow::Result<Vec<u8>> {
        match self.format {
            ImageFormat::Raw | ImageFormat::Iso => {
                let mut file = fs_err::File::open(self.path)?;
                file.seek(SeekFrom::Start(offset))?;
                let mut bytes = Vec::new();
                file.take(length).read_to_end(&mut bytes)?;
                Ok(bytes)
            }
            _ => self.read_through_qemu_img(offset, length),
        }
    }

    fn read_through_qemu_img(&self, offset: u64, length: u64) -> anyhow::Result<Vec<u8>> {
        const BLOCK: u64 = 64 << 10;
        let first_block = offset / BLOCK;
        let blocks = (offset + length).div_ceil(BLOCK) - first_block;
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("range.raw");
        let argv = qemu_img_dd_argv(self.path, self.format, &out, BLOCK, first_block, blocks);
        qemu_img_stdout(&argv)?;
        let bytes = fs_err::read(&out)?;
        let skip = usize::try_from(offset - first_block * BLOCK)?;
        let end = usize::try_from(length)?
            .saturating_add(skip)
            .min(bytes.len());
        Ok(bytes.get(skip..end).unwrap_or_default().to_vec())
    }
}

/// `qemu-img`: the one next to the emulator on `PATH`.
pub fn qemu_img_binary() -> PathBuf {
    crate::qemu::find_in_path("qemu-img").unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Virtual size of an image as QEMU reads it; also proves the file is a readable image of
/// that format (a truncated qcow2 fails here, before any VM starts).
pub fn virtual_size(path: &Path, format: ImageFormat) -> anyhow::Result<u64> {
    let json = qemu_img_stdout(&[
        "info".into(),
        "--output=json".into(),
        "-f".into(),
        format.qemu_name().into(),
        path.into(),
    ])
    .with_context(|| {
        format!(
            "{} is not a readable {} image",
            path.display(),
            format.name()
        )
    })?;
    let info: serde_json::Value = serde_json::from_str(&json)?;
    info["virtual-size"]
        .as_u64()
        .context("qemu-img info reported no virtual size")
}

/// Runs qemu-img; its stdout, or an error with the argv and its stderr.
pub fn qemu_img_stdout(argv: &[OsString]) -> anyhow::Result<String> {
    let output = run_qemu_img(argv)?;
    if !output.status.success() {
        anyhow::bail!(
            "qemu-img {} failed: {}",
            argv.iter()
                .map(|arg| arg.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A throwaway qcow2 overlay over `image`: the VM writes there, the image stays byte-identical.
pub fn create_overlay(
    image: &Path,
    format: ImageFormat,
    overlay: &Path,
    size: u64,
) -> anyhow::Result<()> {
    let output = run_qemu_img(&overlay_argv(image, format.qemu_name(), overlay, size))?;
    if !output.status.success() {
        anyhow::bail!(
            "creating the overlay over {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Run `qemu-img` with `argv` for a short query (info, measure); a missing binary is an error
/// naming the package.
pub fn run_qemu_img<S: AsRef<std::ffi::OsStr>>(argv: &[S]) -> anyhow::Result<std::process::Output> {
    std::process::Command::new(qemu_img_binary())
        .args(argv)
        .output()
        .map_err(qemu_img_missing)
}

/// Run `qemu-img` for long work (converting a whole disk) as a child of the async runtime:
/// Ctrl-C, SIGTERM or `--timeout` drop the future and qemu-img is killed with it (kill on
/// drop), as it is when vmic dies (PDEATHSIG). Its stdout is discarded, stderr kept.
pub async fn run_qemu_img_async(argv: Vec<OsString>) -> anyhow::Result<std::process::Output> {
    let mut command = tokio::process::Command::new(qemu_img_binary());
    command
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    crate::qemu::set_parent_death_signal(&mut command);
    command.output().await.map_err(qemu_img_missing)
}

fn qemu_img_missing(error: std::io::Error) -> anyhow::Error {
    crate::report::hinted(
        format!("cannot run qemu-img: {error}"),
        "install qemu-utils (`scripts/setup` does it)",
    )
}

/// Argv (without the binary) copying `blocks` blocks of `block` bytes from `first_block` of the
/// guest-visible content of `input` to the raw file `out`.
pub fn qemu_img_dd_argv(
    input: &Path,
    format: ImageFormat,
    out: &Path,
    block: u64,
    first_block: u64,
    blocks: u64,
) -> Vec<OsString> {
    let mut input_arg = OsString::from("if=");
    input_arg.push(input);
    let mut out_arg = OsString::from("of=");
    out_arg.push(out);
    vec![
        "dd".into(),
        "-f".into(),
        format.qemu_name().into(),
        "-O".into(),
        "raw".into(),
        format!("bs={block}").into(),
        format!("skip={first_block}").into(),
        format!("count={blocks}").into(),
        input_arg,
        out_arg,
    ]
}

/// Refuse an input QEMU would read wrongly: a qcow2/vhdx whose metadata points past the end
/// of the file (truncated) or is corrupt, or a raw image shorter than a sector. Checked on the
/// host before any VM starts, so the error names the file and nothing is left behind.
pub fn check_integrity(path: &Path, format: ImageFormat) -> anyhow::Result<()> {
    match format {
        ImageFormat::Qcow2 | ImageFormat::Vhdx => {
            let output = run_qemu_img(&[
                std::ffi::OsStr::new("check"),
                "--output=json".as_ref(),
                "-f".as_ref(),
                format.qemu_name().as_ref(),
                path.as_os_str(),
            ])?;
            let report: serde_json::Value =
                serde_json::from_slice(&output.stdout).unwrap_or_default();
            let count = |key: &str| report[key].as_u64().unwrap_or(0);
            let (corruptions, errors) = (count("corruptions"), count("check-errors"));
            if report.is_null() || corruptions > 0 || errors > 0 {
                let first = String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                anyhow::bail!(
                    "{} is a damaged {} image ({corruptions} corruptions, {errors} check errors; e.g. {first}): it may be truncated or partly copied",
                    path.display(),
                    format.name()
                );
            }
            Ok(())
        }
        ImageFormat::Raw | ImageFormat::Iso | ImageFormat::Vpc => {
            let size = fs_err::metadata(path)?.len();
            if size < 512 * 34 {
                anyhow::bail!(
                    "{} is {size} bytes: too small to be a partitioned disk image",
                    path.display()
                );
            }
            Ok(())
        }
    }
}

/// Argv (without the binary) for `qemu-img create`: a qcow2 overlay at `overlay` whose backing
/// file is `image` in `format`, of `size` bytes. `-u` with an explicit size: qemu-img does not
/// open `image` (nor anything its header might name). QEMU opens it read-only later; every
/// guest write lands in the overlay.
pub fn overlay_argv(image: &Path, format: &str, overlay: &Path, size: u64) -> Vec<OsString> {
    vec![
        OsString::from("create"),
        OsString::from("-q"),
        OsString::from("-f"),
        OsString::from("qcow2"),
        OsString::from("-u"),
        OsString::from("-b"),
        image.into(),
        OsString::from("-F"),
        format.into(),
        overlay.into(),
        size.to_string().into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; ISO_MAGIC_OFFSET + 5];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn formats_are_recognised_by_content() {
        let empty_footer = vec![0u8; 512];
        let mut vhd_footer = vec![0u8; 512];
        vhd_footer[..8].copy_from_slice(b"conectix");
        let cases: &[(&str, Vec<u8>, &[u8], ImageFormat)] = &[
            (
                "qcow2",
                head_with(0, b"QFI\xfb"),
                &empty_footer,
                ImageFormat::Qcow2,
            ),
            (
                "vhdx",
                head_with(0, b"vhdxfile"),
                &empty_footer,
                ImageFormat::Vhdx,
            ),
            (
                "dynamic vhd",
                head_with(0, b"conectix"),
                &empty_footer,
                ImageFormat::Vpc,
            ),
            (
                "fixed vhd",
                head_with(0, b"\xeb\x63\x90"),
                &vhd_footer,
                ImageFormat::Vpc,
            ),
            (
                "iso",
                head_with(0x8001, b"CD001"),
                &empty_footer,
                ImageFormat::Iso,
            ),
            (
                "isohybrid",
                {
                    let mut head = head_with(0x8001, b"CD001");
                    head[510..512].copy_from_slice(b"\x55\xaa");
                    head
                },
                &empty_footer,
                ImageFormat::Iso,
            ),
            (
                "raw",
                head_with(510, b"\x55\xaa"),
                &empty_footer,
                ImageFormat::Raw,
            ),
            ("short raw", vec![0u8; 100], &[], ImageFormat::Raw),
        ];
        for (name, head, footer, expected) in cases {
            assert_eq!(format_from_bytes(head, footer), *expected, "{name}");
        }
    }

    #[test]
    fn qemu_names_are_explicit() {
        assert_eq!(ImageFormat::Vpc.qemu_name(), "vpc");
        assert_eq!(ImageFormat::Iso.qemu_name(), "raw");
    }

    #[test]
    fn arch_comes_from_the_boot_loader_name() {
        let cases: &[(&[u8], Option<Arch>)] = &[
            (b"....BOOTX64 EFI ....", Some(Arch::X86_64)),
            (b"....bootx64.efi;1...", Some(Arch::X86_64)),
            (b"....BOOTAA64EFI ....", Some(Arch::Aarch64)),
            (b"..EFI/BOOT/BOOTAA64.EFI", Some(Arch::Aarch64)),
            (b"BOOTX64 EFI BOOTAA64EFI", None),
            (b"nothing here", None),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                arch_from_bytes(bytes),
                *expected,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn esp_is_found_in_a_gpt() {
        let mut disk = vec![0u8; 1 << 20];
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // Entry 0: a Linux file system; entry 1: the ESP from sector 2048, 64 MiB.
        let linux: [u8; 16] = [
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ];
        let esp: [u8; 16] = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        let entry = |index: usize| 1024 + index * 128;
        disk[entry(0)..entry(0) + 16].copy_from_slice(&linux);
        disk[entry(1)..entry(1) + 16].copy_from_slice(&esp);
        disk[entry(1) + 32..entry(1) + 40].copy_from_slice(&2048u64.to_le_bytes());
        disk[entry(1) + 40..entry(1) + 48].copy_from_slice(&(2048u64 + 131071).to_le_bytes());
        assert_eq!(esp_range(&disk), Some((2048 * 512, 64 << 20)));
        assert_eq!(esp_range(&vec![0u8; 4096]), None);
    }

    #[test]
    fn qemu_img_dd_reads_guest_content() {
        let argv = qemu_img_dd_argv(
            Path::new("/in/disk.vhdx"),
            ImageFormat::Vhdx,
            Path::new("/tmp/out.raw"),
            65536,
            16,
            1024,
        );
        let argv: Vec<_> = argv.iter().map(|arg| arg.to_string_lossy()).collect();
        assert_eq!(
            argv.join(" "),
            "dd -f vhdx -O raw bs=65536 skip=16 count=1024 if=/in/disk.vhdx of=/tmp/out.raw"
        );
    }

    #[test]
    fn overlay_names_the_backing_format() {
        let argv = overlay_argv(
            Path::new("/images/disk.vhd"),
            "vpc",
            Path::new("/tmp/boot/overlay.qcow2"),
            1 << 30,
        );
        assert_eq!(
            argv.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            "create -q -f qcow2 -u -b /images/disk.vhd -F vpc /tmp/boot/overlay.qcow2 1073741824"
        );
    }
}
