//! The per-build secret: the host hands it to the VM through fw_cfg (out of band, readable only
//! inside this VM) and must present it in its Hello, so that no other local process that
//! reaches the agent's channel can drive it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmic_protocol::TOKEN_FW_CFG_NAME;

use crate::channel::ChannelSpec;

/// Where the `qemu_fw_cfg` module exposes fw_cfg items by name.
const FW_CFG_BY_NAME: &str = "/sys/firmware/qemu_fw_cfg/by_name";
/// The module's device probe may still be running when the agent starts.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest token accepted: the host sends 64 hex digits (256 bits).
const MIN_LEN: usize = 32;

/// What the host's Hello must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// `--stdio`: the channel is the caller's own pipes, nobody else can reach it.
    Nothing,
    Token(String),
}

impl Expected {
    /// The token for `spec`: none on stdio, else fw_cfg's, and no token means no session.
    pub fn for_channel(spec: ChannelSpec) -> anyhow::Result<Expected> {
        match spec {
            ChannelSpec::Stdio => Ok(Expected::Nothing),
            ChannelSpec::Serial | ChannelSpec::Vsock { .. } => {
                let path = Path::new(FW_CFG_BY_NAME)
                    .join(TOKEN_FW_CFG_NAME)
                    .join("raw");
                read_token(&path, APPEAR_TIMEOUT).map(Expected::Token)
            }
        }
    }

    /// Whether `presented` is the token (in time independent of where they differ).
    pub fn accepts(&self, presented: &str) -> bool {
        match self {
            Expected::Nothing => true,
            Expected::Token(token) => {
                token.len() == presented.len()
                    && token
                        .bytes()
                        .zip(presented.bytes())
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            }
        }
    }
}

fn read_token(path: &Path, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let raw = std::fs::read(path).with_context(|| {
        format!(
            "reading the host's token from {} (is the qemu_fw_cfg module in the guest image?)",
            path.display()
        )
    })?;
    let token = String::from_utf8_lossy(&raw).trim().to_string();
    if token.len() < MIN_LEN || !token.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        bail!("the fw_cfg token at {} is not a vmic token", path.display());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_accepted() {
        let expected = Expected::Token("ab".repeat(32));
        assert!(expected.accepts(&"ab".repeat(32)));
        for wrong in [
            String::new(),
            "ab".repeat(31),
            format!("{}ac", "ab".repeat(31)),
            "ab".repeat(33),
        ] {
            assert!(!expected.accepts(&wrong), "{wrong}");
        }
        assert!(Expected::Nothing.accepts(""));
    }

    #[test]
    fn a_token_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raw");
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).expect("write");
        assert_eq!(
            read_token(&path, Duration::ZERO).expect("read"),
            "0f".repeat(32)
        );
        std::fs::write(&path, "short").expect("write");
        assert!(read_token(&path, Duration::ZERO).is_err());
        let missing = read_token(&dir.path().join("none"), Duration::ZERO).unwrap_err();
        assert!(
            format!("{missing:#}").contains("qemu_fw_cfg"),
            "{missing:#}"
        );
    }
}
