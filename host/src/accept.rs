//! Accepting the ISO the builder VM wrote: what the guest claims about it is checked against
//! bounds it cannot move before the host trusts, hashes or renames anything.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vmic_protocol::Sha256;

/// Where an ISO 9660 file system says so: the standard identifier of the first volume
/// descriptor (sector 16, byte 1).
pub const ISO9660_MAGIC_OFFSET: u64 = 16 * 2048 + 1;
pub const ISO9660_MAGIC: &[u8; 5] = b"CD001";

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(
        "the builder VM reported a {claimed}-byte ISO, more than the {limit}-byte output disk \
         it was given: refusing it"
    )]
    TooLarge { claimed: u64, limit: u64 },
    #[error(
        "the builder VM reported a {claimed}-byte ISO, too small to hold an ISO 9660 file system"
    )]
    TooSmall { claimed: u64 },
    #[error(
        "{path} is not an ISO 9660 image (no `CD001` at byte {ISO9660_MAGIC_OFFSET}): the \
         builder VM did not write an ISO"
    )]
    NoSignature { path: PathBuf },
    #[error(
        "the ISO copied out of the builder VM is corrupted: sha256 {found} but the agent wrote \
         {claimed}"
    )]
    Digest { found: String, claimed: String },
    #[error("checking the ISO at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks the ISO the guest wrote at the start of `path` (the output disk, `limit` bytes)
/// against its claimed size and sha256: the size within the disk, an ISO 9660 signature, the
/// digest. On success the file is cut to the ISO's size and its digest returned; on failure
/// the file is left for the caller to remove.
pub fn accept_iso(
    path: &Path,
    limit: u64,
    claimed_size: u64,
    claimed_sha256: &Sha256,
) -> Result<Sha256, AcceptError> {
    within(claimed_size, limit)?;
    if claimed_size < ISO9660_MAGIC_OFFSET + ISO9660_MAGIC.len() as u64 {
        return Err(AcceptError::TooSmall {
            claimed: claimed_size,
        });
    }
    let io = |source| AcceptError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut magic = [0u8; 5];
    file.seek(SeekFrom::Start(ISO9660_MAGIC_OFFSET))
        .map_err(io)?;
    file.read_exact(&mut magic).map_err(io)?;
    if &magic != ISO9660_MAGIC {
        return Err(AcceptError::NoSignature {
            path: path.to_owned(),
        });
    }
    cut_and_hash(file, path, claimed_size, claimed_sha256)
}

/// [`accept_iso`] for the PXE artifacts' tar stream: bounds and digest, no ISO signature (the
/// stream's entries are checked one by one by [`crate::pxe::read_artifacts`]).
pub fn accept_pxe_stream(
    path: &Path,
    limit: u64,
    claimed_size: u64,
    claimed_sha256: &Sha256,
) -> Result<Sha256, AcceptError> {
    within(claimed_size, limit)?;
    let file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| AcceptError::Io {
            path: path.to_owned(),
            source,
        })?;
    cut_and_hash(file, path, claimed_size, claimed_sha256)
}

/// The guest's claimed size fits the disk it was given.
fn within(claimed: u64, limit: u64) -> Result<(), AcceptError> {
    match claimed > limit {
        true => Err(AcceptError::TooLarge { claimed, limit }),
        false => Ok(()),
    }
}

/// Cuts the disk to what the guest wrote and checks its digest; the disk may only shrink:
/// growing it would hash bytes the guest never wrote.
fn cut_and_hash(
    mut file: fs_err::File,
    path: &Path,
    claimed_size: u64,
    claimed_sha256: &Sha256,
) -> Result<Sha256, AcceptError> {
    let io = |source| AcceptError::Io {
        path: path.to_owned(),
        source,
    };
    let disk_len = file.metadata().map_err(io)?.len();
    if claimed_size > disk_len {
        return Err(AcceptError::TooLarge {
            claimed: claimed_size,
            limit: disk_len,
        });
    }
    file.set_len(claimed_size).map_err(io)?;
    file.sync_all().map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let digest = vmic_protocol::sha256_reader(&mut file).map_err(io)?;
    if &digest != claimed_sha256 {
        return Err(AcceptError::Digest {
            found: hex::encode(digest),
            claimed: hex::encode(claimed_sha256),
        });
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 * 1024;

    /// A fake output disk: `iso` bytes of "ISO" (with or without the signature) and then
    /// zeros up to `disk` bytes, as the guest leaves it.
    fn disk(iso: u64, disk: u64, signed: bool) -> (tempfile::TempDir, PathBuf, Sha256) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.iso");
        let mut data: Vec<u8> = (0..iso).map(|i| (i % 251) as u8).collect();
        if signed {
            let at = ISO9660_MAGIC_OFFSET as usize;
            data[at..at + 5].copy_from_slice(ISO9660_MAGIC);
        }
        let digest = vmic_protocol::sha256(&data);
        data.resize(disk as usize, 0);
        fs_err::write(&path, &data).expect("write");
        (dir, path, digest)
    }

    #[test]
    fn accepts_a_signed_iso_and_cuts_the_disk_to_it() {
        let (_dir, path, digest) = disk(SIZE, 4 * SIZE, true);
        assert_eq!(
            accept_iso(&path, 4 * SIZE, SIZE, &digest).expect("ok"),
            digest
        );
        assert_eq!(fs_err::metadata(&path).expect("meta").len(), SIZE);
    }

    #[test]
    fn refuses_what_the_guest_cannot_prove() {
        let (_dir, path, digest) = disk(SIZE, 4 * SIZE, true);
        let cases: Vec<(u64, u64, Sha256, &str)> = vec![
            (
                4 * SIZE,
                1 << 50,
                digest,
                "more than the 262144-byte output disk",
            ),
            (
                1 << 50,
                1 << 50,
                digest,
                "more than the 262144-byte output disk",
            ),
            (4 * SIZE, 1000, digest, "too small"),
            (4 * SIZE, SIZE, [7; 32], "corrupted"),
        ];
        for (limit, claimed, sha, expected) in cases {
            let error = accept_iso(&path, limit, claimed, &sha).expect_err("refused");
            assert!(error.to_string().contains(expected), "{error}");
            // Nothing grew: a huge claimed size never became a huge sparse file.
            assert!(fs_err::metadata(&path).expect("meta").len() <= 4 * SIZE);
        }
        let (_dir, unsigned, digest) = disk(SIZE, 4 * SIZE, false);
        let error = accept_iso(&unsigned, 4 * SIZE, SIZE, &digest).expect_err("no CD001");
        assert!(
            error.to_string().contains("not an ISO 9660 image"),
            "{error}"
        );
    }
}
