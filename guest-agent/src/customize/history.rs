//! `os.imageHistory`: each customization appends an entry to the image's
//! `/usr/share/image-customizer/history.json`, as the Image Customizer does, so that an image
//! carries its lineage. vmic's entries are reproducible: the timestamp is the build's
//! `SOURCE_DATE_EPOCH` and the image UUID is derived from the entry itself.

use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use vmic_protocol::ImageHistoryEntry;

use crate::customize::write_file;
use crate::rootfs::{read_image_text, MAX_IMAGE_TEXT};

pub(crate) const HISTORY_PATH: &str = "/usr/share/image-customizer/history.json";

/// Append `entry` to the image's history (created when absent).
pub(crate) fn append(root: &Path, entry: &ImageHistoryEntry, epoch: u64) -> anyhow::Result<()> {
    let existing = read_image_text(root, HISTORY_PATH, MAX_IMAGE_TEXT)
        .with_context(|| format!("reading the image's {HISTORY_PATH}"))?;
    let text = with_entry(existing.as_deref(), entry, epoch)?;
    write_file(root, HISTORY_PATH, text.as_bytes(), 0o644)
}

/// The history file's text with `entry` appended.
fn with_entry(
    existing: Option<&str>,
    entry: &ImageHistoryEntry,
    epoch: u64,
) -> anyhow::Result<String> {
    let mut history: Vec<serde_json::Value> = match existing {
        None => Vec::new(),
        Some(text) => serde_json::from_str(text).with_context(|| {
            format!(
                "the image's {HISTORY_PATH} is not a JSON array of entries: repair or remove it, or set os.imageHistory: none"
            )
        })?,
    };
    let config: serde_json::Value =
        serde_json::from_str(&entry.config_json).context("the history entry's config")?;
    if !config.is_object() {
        bail!("the history entry's config is not a JSON object");
    }
    let mut digest = Sha256::new();
    for part in [
        entry.tool_version.as_bytes(),
        entry.config_json.as_bytes(),
        &epoch.to_le_bytes(),
        &(history.len() as u64).to_le_bytes(),
    ] {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    history.push(serde_json::json!({
        "timestamp": rfc3339(epoch),
        "toolVersion": entry.tool_version,
        "imageUuid": uuid_from(&digest.finalize()),
        "config": config,
    }));
    let mut text = serde_json::to_string_pretty(&history)?;
    text.push('\n');
    Ok(text)
}

/// `2024-12-09T17:20:54Z`.
fn rfc3339(epoch: u64) -> String {
    let (year, month, day, hour, minute, second) = vmic_protocol::utc_civil(epoch);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// A version-5-shaped UUID from the first 16 bytes of a digest.
fn uuid_from(digest: &[u8]) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(config: &str) -> ImageHistoryEntry {
        ImageHistoryEntry {
            tool_version: "0.1.0".into(),
            config_json: config.into(),
        }
    }

    #[test]
    fn entries_append_in_order_dated_by_the_epoch_with_a_stable_uuid() {
        let first =
            with_entry(None, &entry(r#"{"os":{"hostname":"a"}}"#), 1_733_764_854).expect("first");
        let again =
            with_entry(None, &entry(r#"{"os":{"hostname":"a"}}"#), 1_733_764_854).expect("again");
        assert_eq!(first, again, "the same build writes the same entry");
        let second = with_entry(
            Some(&first),
            &entry(r#"{"os":{"hostname":"b"}}"#),
            1_733_851_294,
        )
        .expect("second");
        let history: Vec<serde_json::Value> = serde_json::from_str(&second).expect("json");
        assert_eq!(history.len(), 2);
        assert_eq!(history[0]["timestamp"], "2024-12-09T17:20:54Z");
        assert_eq!(history[1]["timestamp"], "2024-12-10T17:21:34Z");
        assert_eq!(history[1]["config"]["os"]["hostname"], "b");
        assert_eq!(history[1]["toolVersion"], "0.1.0");
        let uuids: Vec<&str> = history
            .iter()
            .map(|entry| entry["imageUuid"].as_str().expect("a uuid"))
            .collect();
        assert_ne!(uuids[0], uuids[1]);
        for uuid in uuids {
            assert_eq!(uuid.len(), 36, "{uuid}");
            assert_eq!(&uuid[14..15], "5", "version 5 shape: {uuid}");
        }
    }

    #[test]
    fn a_history_that_is_not_an_array_is_refused_naming_the_way_out() {
        let error =
            with_entry(Some("{\"not\": \"a list\"}"), &entry("{}"), 0).expect_err("not an array");
        assert!(
            format!("{error:#}").contains("os.imageHistory: none"),
            "{error:#}"
        );
    }
}
