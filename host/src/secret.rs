//! Per-build secrets: the token that proves to the agent that this host started its VM, and a
//! random vsock CID. Both come from the OS's random source, never from guessable state.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use fs_err::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fs_err::File::open("/dev/urandom")?
        .read_exact(&mut bytes)
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

/// 256 random bits as 64 hex digits; handed to the VM through fw_cfg and sent in the Hello.
#[derive(Clone, PartialEq, Eq)]
pub struct BuildToken(String);

impl std::fmt::Debug for BuildToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildToken(..)")
    }
}

impl BuildToken {
    pub fn generate() -> anyhow::Result<BuildToken> {
        Ok(BuildToken(hex::encode(random_bytes::<32>()?)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Write it as `dir/token` (0600), for QEMU's `-fw_cfg …,file=`. `dir` is made 0700 first:
    /// the token and the sockets beside it are this user's alone.
    pub fn write_into(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        private_dir(dir)?;
        let path = dir.join("token");
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(self.0.as_bytes())?;
        Ok(path)
    }
}

/// Make `dir` readable, writable and searchable by its owner only.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// A random vsock CID: CIDs are host-wide, and a predictable one lets another process guess it.
pub fn random_cid() -> anyhow::Result<u32> {
    // 0-2 are reserved, u32::MAX is VMADDR_CID_ANY: stay in 3..2^31.
    Ok(3 + u32::from_le_bytes(random_bytes::<4>()?) % 0x7fff_fff0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_private_on_disk() {
        let first = BuildToken::generate().expect("token");
        let second = BuildToken::generate().expect("token");
        assert_ne!(first, second);
        assert_eq!(first.as_str().len(), 64);
        assert!(first.as_str().bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_eq!(format!("{first:?}"), "BuildToken(..)", "never logged");

        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = first.write_into(dir.path()).expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            first.as_str()
        );
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
        assert!(
            second.write_into(dir.path()).is_err(),
            "an existing file is never reused"
        );
    }

    #[test]
    fn cids_are_valid_and_differ() {
        let cids: Vec<u32> = (0..8).map(|_| random_cid().expect("cid")).collect();
        assert!(cids.iter().all(|&cid| (3..0x8000_0000).contains(&cid)));
        assert!(cids.windows(2).any(|pair| pair[0] != pair[1]));
    }
}
