//! The settings record a vmic ISO carries (spec step 7), so that it can be re-customized.
//!
//! `/vmic/iso-settings.json` on the ISO. Its presence is also how an input ISO is recognized
//! as made by vmic. The record keeps what the ISO's files alone do not say unambiguously:
//! which kernel args came from the user (so that ISO → ISO keeps them, first, and adds the
//! new ones without repeating anything), the label, and the rootfs checksum (so that an
//! `iso.*`-only re-master can prove `rootfs.img` untouched).

use serde::{Deserialize, Serialize};

use super::Arch;

/// Where the record lives on the ISO.
pub const ISO_SETTINGS_PATH: &str = "/vmic/iso-settings.json";

/// The record's format; bumped on incompatible changes. Readers accept only this one.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoSettingsRecord {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// `vmic <version>` that wrote the ISO.
    pub vmic_version: String,
    pub arch: Arch,
    /// The ISO volume label (`root=live:LABEL=`).
    pub label: String,
    /// `iso.kernelCommandLine.extraCommandLine` of every build of this ISO, in order, without
    /// repeats: appended last to every `linux` line.
    pub kernel_args_from_user: Vec<String>,
    /// The LiveOS args vmic added ([`super::grub_cfg::LIVE_ARGS`] and `selinux=0`), so that a
    /// later vmic with other defaults can still remove them.
    pub live_args: Vec<String>,
    /// Kernel versions on the ISO, each with its regenerated initrd.
    pub kernel_versions: Vec<String>,
    /// The build's `SOURCE_DATE_EPOCH` (seconds since the Unix epoch, UTC), not the wall
    /// clock: a rebuild gives the same record. An ISO input keeps it unless the user gives one.
    pub created_unix_seconds: u64,
    /// sha256 (hex) of `/liveos/rootfs.img`.
    pub rootfs_sha256: String,
    /// The image's grub was a `-noprefix` build.
    pub grub_noprefix: bool,
    /// ISO paths that `iso.additionalFiles` put on the ISO (all builds), so that vmic's build
    /// cache can take them off again when it re-masters the ISO with another `iso` section.
    /// Absent in records written before it existed.
    #[serde(default)]
    pub iso_additional_files: Vec<String>,
    /// The initrd is the whole OS (`initramfsType: full-os`): no `rootfs.img`. Written only
    /// when true, so that every other record reads as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_os: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IsoRecordError {
    #[error(
        "{ISO_SETTINGS_PATH} is not a vmic settings record; only ISOs made by vmic can be \
         re-customized"
    )]
    Parse(#[source] serde_json::Error),
    #[error(
        "{ISO_SETTINGS_PATH} has format {found}, this vmic reads format {FORMAT_VERSION}; use \
         the vmic version that made the ISO ({vmic_version})"
    )]
    UnsupportedFormat { found: u32, vmic_version: String },
    #[error("cannot write the settings record")]
    Render(#[source] serde_json::Error),
    #[error(
        "{} on the input ISO does not match its settings record (sha256 {actual}, the record \
         says {recorded}): the ISO was changed after vmic made it; build a new ISO from the \
         source disk image instead",
        super::ISO_ROOTFS_IMG
    )]
    RootfsMismatch { recorded: String, actual: String },
    #[error("reading {} on the input ISO", super::ISO_ROOTFS_IMG)]
    ReadRootfs(#[source] std::io::Error),
}

impl IsoSettingsRecord {
    /// The record as written on the ISO (pretty JSON, newline-terminated).
    pub fn render(&self) -> Result<String, IsoRecordError> {
        let mut text = serde_json::to_string_pretty(self).map_err(IsoRecordError::Render)?;
        text.push('\n');
        Ok(text)
    }

    /// Checks that `rootfs` (the ISO's `rootfs.img`) is the one this record was written for.
    pub fn check_rootfs(&self, rootfs: impl std::io::Read) -> Result<(), IsoRecordError> {
        let actual =
            hex::encode(vmic_protocol::sha256_reader(rootfs).map_err(IsoRecordError::ReadRootfs)?);
        if !actual.eq_ignore_ascii_case(self.rootfs_sha256.trim()) {
            return Err(IsoRecordError::RootfsMismatch {
                recorded: self.rootfs_sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Reads a record; unknown fields are ignored (a newer vmic of the same format may add
    /// some), a different format is an error.
    pub fn parse(text: &str) -> Result<IsoSettingsRecord, IsoRecordError> {
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
            #[serde(default)]
            vmic_version: String,
        }
        let probe: Probe = serde_json::from_str(text).map_err(IsoRecordError::Parse)?;
        if probe.format != FORMAT_VERSION {
            return Err(IsoRecordError::UnsupportedFormat {
                found: probe.format,
                vmic_version: probe.vmic_version,
            });
        }
        serde_json::from_str(text).map_err(IsoRecordError::Parse)
    }
}

/// The ISO kernel args of an ISO → ISO build: the recorded ones, then the new ones that are
/// not already there (spec: "Kernel args recorded in the input ISO stay, and new ones follow
/// them — without duplicating"). Repeats within `new` are kept out too.
pub fn merge_user_args(recorded: &[String], new: &[String]) -> Vec<String> {
    let mut merged: Vec<String> = Vec::with_capacity(recorded.len() + new.len());
    for arg in recorded.iter().chain(new) {
        if !merged.contains(arg) {
            merged.push(arg.clone());
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> IsoSettingsRecord {
        IsoSettingsRecord {
            format: FORMAT_VERSION,
            vmic_version: "0.1.0".into(),
            arch: Arch::X86_64,
            label: "CDROM".into(),
            kernel_args_from_user: vec!["ds=nocloud".into()],
            live_args: super::super::grub_cfg::LIVE_ARGS
                .iter()
                .map(|a| (*a).to_owned())
                .chain(["selinux=0".to_owned()])
                .collect(),
            kernel_versions: vec!["6.1.0-28-cloud-amd64".into()],
            created_unix_seconds: 1_735_689_600,
            rootfs_sha256: "ab".repeat(32),
            grub_noprefix: false,
            iso_additional_files: vec!["/cloud-init-data/user-data".into()],
            full_os: false,
        }
    }

    #[test]
    fn the_full_os_flag_is_written_only_when_set() {
        let text = record().render().expect("render");
        assert!(
            !text.contains("full_os"),
            "a bootstrap record reads as before"
        );
        assert!(!IsoSettingsRecord::parse(&text).expect("parse").full_os);
        let full = IsoSettingsRecord {
            full_os: true,
            ..record()
        };
        let text = full.render().expect("render");
        assert!(text.contains("\"full_os\": true"));
        assert!(IsoSettingsRecord::parse(&text).expect("parse").full_os);
    }

    #[test]
    fn round_trip_and_shape() {
        let text = record().render().expect("render");
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!("iso_settings_record", text);
        });
        assert_eq!(IsoSettingsRecord::parse(&text).expect("parse"), record());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut value = serde_json::to_value(record()).expect("to value");
        value["added_later"] = serde_json::json!({"x": 1});
        let parsed = IsoSettingsRecord::parse(&value.to_string()).expect("parse");
        assert_eq!(parsed, record());
    }

    #[test]
    fn other_formats_and_garbage_are_errors() {
        let mut value = serde_json::to_value(record()).expect("to value");
        value["format"] = serde_json::json!(2);
        let message = IsoSettingsRecord::parse(&value.to_string())
            .expect_err("format 2")
            .to_string();
        assert!(message.contains("format 2"), "{message}");
        for text in ["", "{}", "not json", "{\"format\": 1}"] {
            let error = IsoSettingsRecord::parse(text).expect_err(text);
            assert!(
                error.to_string().contains("only ISOs made by vmic"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn rootfs_must_match_the_recorded_sha256() {
        let rootfs = b"squashfs bytes".as_slice();
        let mut recorded = record();
        recorded.rootfs_sha256 =
            vmic_protocol::hex_digest(&vmic_protocol::sha256_reader(rootfs).expect("hash"));
        recorded.check_rootfs(rootfs).expect("the recorded rootfs");
        recorded.rootfs_sha256 = recorded.rootfs_sha256.to_uppercase();
        recorded
            .check_rootfs(rootfs)
            .expect("hex case does not matter");
        let error = recorded
            .check_rootfs(b"squashfs bytez".as_slice())
            .expect_err("one byte changed");
        let message = error.to_string();
        assert!(
            matches!(error, IsoRecordError::RootfsMismatch { .. })
                && message.starts_with("/liveos/rootfs.img on the input ISO does not match")
                && message.contains(&recorded.rootfs_sha256),
            "{message}"
        );
        recorded.rootfs_sha256 = String::new();
        assert!(
            recorded.check_rootfs(rootfs).is_err(),
            "an empty digest matches nothing"
        );
    }

    #[test]
    fn merging_keeps_recorded_first_without_repeats() {
        let strings =
            |items: &[&str]| -> Vec<String> { items.iter().map(|s| (*s).to_owned()).collect() };
        let cases = [
            (&[][..], &["a=1", "b"][..], &["a=1", "b"][..]),
            (&["ds=nocloud"], &[], &["ds=nocloud"]),
            (
                &["ds=nocloud", "quiet"],
                &["quiet", "loglevel=3", "ds=nocloud", "loglevel=3"],
                &["ds=nocloud", "quiet", "loglevel=3"],
            ),
            // Different values of one key are different args: both stay, in order.
            (
                &["console=tty0"],
                &["console=ttyS0"],
                &["console=tty0", "console=ttyS0"],
            ),
        ];
        for (recorded, new, expected) in cases {
            assert_eq!(
                merge_user_args(&strings(recorded), &strings(new)),
                strings(expected),
                "{recorded:?} + {new:?}"
            );
        }
    }
}
