//! Input images name no other files: a qcow2 backing file or external data file (a host
//! path, a `json:` spec or a network URL) would let a hostile image make QEMU attach host
//! files to the builder VM. Refused before anything else opens the image.
//!
//! Two checks, in this order: our own parse of the qcow2 header (reads only the image's own
//! bytes, so a reference is never opened), then `qemu-img info --backing-chain -U` as a second
//! opinion (run only once the header is known to name nothing, so it cannot follow anything).
//! Raw, ISO and VHD (`vpc`) inputs cannot name other files; QEMU's vhdx driver refuses
//! differencing (parent) images itself.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::image::ImageFormat;

/// How to make a self-contained copy of an image that names other files.
pub const FLATTEN_HINT: &str =
    "flatten it into one self-contained file first: qemu-img convert -O qcow2 in.qcow2 flat.qcow2";

/// qcow2 incompatible feature bit: the guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// qcow2 header extension: the external data file's name.
const QCOW2_EXT_DATA_FILE_NAME: u32 = 0x4441_5441;
/// qcow2 names are at most this long (QEMU's own limit is 1023 bytes).
const NAME_MAX: usize = 1023;
/// All of the header and its extensions lie in the first cluster; 2 MiB is the largest one.
const HEADER_READ_MAX: u64 = 2 << 20;

/// What an image's header refers to outside itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    BackingFile(String),
    DataFile(String),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::BackingFile(name) => write!(f, "the backing file {name:?}"),
            Reference::DataFile(name) => write!(f, "the external data file {name:?}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("cannot read the header of {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} names {reference}: vmic only takes images that are one self-contained file (a reference could attach any host file or network resource to the builder VM)", path.display())]
    Refers { path: PathBuf, reference: Reference },
    #[error("{} has a damaged qcow2 header: {why}", path.display())]
    BadHeader { path: PathBuf, why: &'static str },
    #[error("qemu-img reports that {} depends on other files ({detail})", path.display())]
    Chain { path: PathBuf, detail: String },
}

/// Refuse an image whose header refers to another file or a network resource. Opens nothing
/// but `path` itself (for qcow2, then asks qemu-img, which then has nothing to follow).
pub fn check(path: &Path, format: ImageFormat) -> anyhow::Result<()> {
    if format != ImageFormat::Qcow2 {
        return Ok(());
    }
    let head = read_head(path).map_err(|source| ReferenceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let references = qcow2_references(&head).map_err(|why| {
        with_hint(ReferenceError::BadHeader {
            path: path.to_path_buf(),
            why,
        })
    })?;
    if let Some(reference) = references.into_iter().next() {
        return Err(with_hint(ReferenceError::Refers {
            path: path.to_path_buf(),
            reference,
        }));
    }
    check_chain(path, format)
}

fn with_hint(error: ReferenceError) -> anyhow::Error {
    crate::report::hinted(format!("{:#}", anyhow::Error::new(error)), FLATTEN_HINT)
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    std::fs::File::open(path)?
        .take(HEADER_READ_MAX)
        .read_to_end(&mut head)?;
    Ok(head)
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The files a qcow2 header names: its backing file and its external data file.
pub fn qcow2_references(head: &[u8]) -> Result<Vec<Reference>, &'static str> {
    const SHORT: &str = "the header is cut short";
    if !head.starts_with(b"QFI\xfb") {
        return Err("no qcow2 magic");
    }
    let version = be32(head, 4).ok_or(SHORT)?;
    let name_at = |offset: u64, length: usize| -> Result<String, &'static str> {
        let start = usize::try_from(offset).map_err(|_| SHORT)?;
        let bytes = head
            .get(start..start.saturating_add(length.min(NAME_MAX)))
            .ok_or("a file name lies outside the header cluster")?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    };
    let mut references = Vec::new();
    let backing_offset = be64(head, 8).ok_or(SHORT)?;
    let backing_size = be32(head, 16).ok_or(SHORT)? as usize;
    if backing_offset != 0 || backing_size != 0 {
        references.push(Reference::BackingFile(name_at(
            backing_offset,
            backing_size,
        )?));
    }
    if version < 3 {
        return Ok(references);
    }
    let incompatible = be64(head, 72).ok_or(SHORT)?;
    let header_length = be32(head, 100).ok_or(SHORT)? as usize;
    let mut data_file = None;
    // Header extensions: (type, length, data padded to 8 bytes) until type 0.
    let mut at = header_length.max(104);
    while let (Some(kind), Some(length)) = (be32(head, at), be32(head, at + 4)) {
        if kind == 0 {
            break;
        }
        let length = length as usize;
        if kind == QCOW2_EXT_DATA_FILE_NAME {
            data_file = Some(name_at(at as u64 + 8, length)?);
        }
        at = at
            .checked_add(8 + length.div_ceil(8) * 8)
            .ok_or("a header extension overflows")?;
    }
    if incompatible & QCOW2_EXTERNAL_DATA_FILE != 0 || data_file.is_some() {
        references.push(Reference::DataFile(
            data_file.unwrap_or_else(|| "(named when the image is opened)".to_string()),
        ));
    }
    Ok(references)
}

/// Second opinion from QEMU's own reader: exactly one image in the chain, no backing or data
/// file. `-U` takes no lock, `--image-opts` with `file.driver=file` keeps the path a plain file
/// name (never a `json:` spec or a protocol URL).
fn check_chain(path: &Path, format: ImageFormat) -> anyhow::Result<()> {
    let argv = info_argv(path, format);
    let output = crate::image::run_qemu_img(&argv)?;
    let chain_error = |detail: String| {
        with_hint(ReferenceError::Chain {
            path: path.to_path_buf(),
            detail,
        })
    };
    if !output.status.success() {
        // Damage is reported (with more detail) by the integrity check that follows.
        return Ok(());
    }
    let chain: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| chain_error(format!("unreadable qemu-img output: {error}")))?;
    let images = chain.as_array().cloned().unwrap_or_default();
    if images.len() != 1 {
        return Err(chain_error(format!("{} images in its chain", images.len())));
    }
    let image = &images[0];
    if let Some(name) = image["backing-filename"].as_str() {
        return Err(chain_error(format!("backing file {name:?}")));
    }
    if let Some(name) = image["format-specific"]["data"]["data-file"].as_str() {
        return Err(chain_error(format!("data file {name:?}")));
    }
    Ok(())
}

/// `qemu-img info` argv (without the binary) that reads `path` as a plain file of `format`.
pub fn info_argv(path: &Path, format: ImageFormat) -> Vec<std::ffi::OsString> {
    let mut options = std::ffi::OsString::from(format!(
        "driver={},file.driver=file,file.filename=",
        format.qemu_name()
    ));
    options.push(crate::qemu::escape_comma(path));
    vec![
        "info".into(),
        "--output=json".into(),
        "--backing-chain".into(),
        "-U".into(),
        "--image-opts".into(),
        options,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A qcow2 v3 header of 112 bytes, as `qemu-img create` writes it.
    fn header(version: u32) -> Vec<u8> {
        let mut head = vec![0u8; 4096];
        head[..4].copy_from_slice(b"QFI\xfb");
        head[4..8].copy_from_slice(&version.to_be_bytes());
        head[100..104].copy_from_slice(&112u32.to_be_bytes());
        head
    }

    fn with_backing(mut head: Vec<u8>, name: &str) -> Vec<u8> {
        head[8..16].copy_from_slice(&512u64.to_be_bytes());
        head[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        head[512..512 + name.len()].copy_from_slice(name.as_bytes());
        head
    }

    fn with_data_file(mut head: Vec<u8>, name: &str) -> Vec<u8> {
        head[72..80].copy_from_slice(&QCOW2_EXTERNAL_DATA_FILE.to_be_bytes());
        head[112..116].copy_from_slice(&QCOW2_EXT_DATA_FILE_NAME.to_be_bytes());
        head[116..120].copy_from_slice(&(name.len() as u32).to_be_bytes());
        head[120..120 + name.len()].copy_from_slice(name.as_bytes());
        head
    }

    #[test]
    fn qcow2_headers_name_their_references() {
        let json = r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#;
        let cases: Vec<(&str, Vec<u8>, Vec<Reference>)> = vec![
            ("self-contained v3", header(3), vec![]),
            ("self-contained v2", header(2), vec![]),
            (
                "backing file",
                with_backing(header(3), "/srv/secret"),
                vec![Reference::BackingFile("/srv/secret".into())],
            ),
            (
                "json: backing",
                with_backing(header(2), json),
                vec![Reference::BackingFile(json.into())],
            ),
            (
                "data file",
                with_data_file(header(3), "/srv/secret.raw"),
                vec![Reference::DataFile("/srv/secret.raw".into())],
            ),
            (
                "data-file bit without a name",
                {
                    let mut head = header(3);
                    head[72..80].copy_from_slice(&QCOW2_EXTERNAL_DATA_FILE.to_be_bytes());
                    head
                },
                vec![Reference::DataFile(
                    "(named when the image is opened)".into(),
                )],
            ),
        ];
        for (name, head, expected) in cases {
            assert_eq!(qcow2_references(&head), Ok(expected), "{name}");
        }
    }

    #[test]
    fn damaged_qcow2_headers_are_errors_not_panics() {
        assert!(qcow2_references(b"QFI\xfb\0\0").is_err());
        let mut outside = header(3);
        outside[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        outside[16..20].copy_from_slice(&8u32.to_be_bytes());
        assert!(qcow2_references(&outside).is_err());
        let mut huge_extension = header(3);
        huge_extension[112..116].copy_from_slice(&1u32.to_be_bytes());
        huge_extension[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        // An extension running past the buffer ends the walk; it cannot loop or overflow.
        assert_eq!(qcow2_references(&huge_extension), Ok(vec![]));
    }

    #[test]
    fn qemu_img_reads_the_input_as_a_plain_file() {
        let argv = info_argv(Path::new("/in/a,b.qcow2"), ImageFormat::Qcow2);
        let argv: Vec<_> = argv.iter().map(|arg| arg.to_string_lossy()).collect();
        assert_eq!(
            argv.join(" "),
            "info --output=json --backing-chain -U --image-opts \
             driver=qcow2,file.driver=file,file.filename=/in/a,,b.qcow2"
        );
    }
}
