//! vmic's build cache. A disk → ISO build is mostly customization, dracut and mksquashfs, and
//! none of those depend on the `iso` section: when a build's root file system and initrd would
//! come out as an earlier build's did, the host hands the earlier ISO to the agent as the input
//! and asks for a re-master that *replaces* its `iso.*` settings (kernel args, additional files)
//! with this build's. `rootfs.img` and the initrds are then the cached ones, byte for byte.
//!
//! The key is a digest of everything that goes into them, kept part by part ([`KeyParts`]) so
//! that a miss can say what changed: the input's sha256, the `os` and `scripts` parts of the
//! agent's request (package sources included), the content and mode of every uploaded file
//! except the config files themselves (their effect is in the request) and files named only by
//! `iso.additionalFiles`, the squashfs settings, the epoch, the label, vmic's version and the
//! builder VM image. Builds that install packages over the network are not cached: their
//! result depends on what the repositories serve that day.
//!
//! Entries are `<key>.iso` + `<key>.json` under the cache directory, written under temporary
//! names and renamed; the least recently used go first once the total passes the size cap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmic_protocol::IsoBuild;

use crate::upload::Upload;

/// Bumped when an entry's meaning changes: older entries then never match.
pub const CACHE_FORMAT: u32 = 2;

/// Where and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// Everything a cached ISO's root file system and initrds depend on, digested part by part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyParts {
    pub cache_format: u32,
    /// vmic's version and wire protocol.
    pub vmic: String,
    /// sha256 of the builder VM image's manifest (its id, kernel, tools and agent).
    pub builder: String,
    pub arch: String,
    /// sha256 of the input image file.
    pub input: String,
    /// sha256 of the request's `os` customization (packages and their sources included).
    pub os: String,
    /// sha256 of the request's postCustomization and finalizeCustomization scripts.
    pub scripts: String,
    /// Guest path → `mode:sha256` of every uploaded file that can reach the root file system.
    pub files: BTreeMap<String, String>,
    pub squashfs: String,
    pub source_date_epoch: Option<u64>,
    pub label: String,
}

/// What the cache needs to know about one build, besides its request.
pub struct KeyInputs<'a> {
    pub builder_manifest: &'a [u8],
    pub arch: &'a str,
    pub input_sha256: &'a str,
    pub uploads: &'a [Upload],
    /// The config file and its `baseConfigs` chain (canonical paths).
    pub config_files: &'a [PathBuf],
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

fn json_digest(value: &impl Serialize) -> anyhow::Result<String> {
    Ok(sha256_hex(&serde_json::to_vec(value)?))
}

impl KeyParts {
    /// The parts of `request`'s build, or `Err(reason)` when the build cannot be cached.
    pub fn of(request: &IsoBuild, inputs: &KeyInputs<'_>) -> anyhow::Result<Result<Self, String>> {
        if request.input_is_iso {
            return Ok(Err("the input is an ISO (re-customized, not cached)".into()));
        }
        if request.customization.os.packages.network {
            return Ok(Err(
                "packages come from the network: the result depends on what the repositories serve"
                    .into(),
            ));
        }
        // What can reach the root file system: the files the `os` section and the package
        // sources name, and, when there are scripts (they see the config directory as
        // /_imageconfigs), every file of the config directory. Not: files only
        // `iso.additionalFiles` names from outside the config directory, the config files
        // themselves (their effect is the request), and without scripts the config directory's
        // unnamed files.
        let named = |files: &[vmic_protocol::FileCopy]| -> Vec<String> {
            files
                .iter()
                .filter_map(|file| match &file.source {
                    vmic_protocol::FileSource::Path(path) => Some(path.clone()),
                    vmic_protocol::FileSource::Content(_) => None,
                })
                .collect()
        };
        let iso_named = named(&request.iso.additional_files);
        let os_named = named(&request.customization.os.additional_files);
        let scripts = !request.customization.post_customization.is_empty()
            || !request.customization.finalize_customization.is_empty();
        let config_dir = format!("{}/", crate::plan::GUEST_CONFIG_DIR);
        let mut files = BTreeMap::new();
        for upload in inputs.uploads {
            let keyed = match upload.guest.starts_with(&config_dir) {
                true => scripts || os_named.contains(&upload.guest),
                false => !iso_named.contains(&upload.guest) || os_named.contains(&upload.guest),
            };
            let local = fs_err::canonicalize(&upload.local)?;
            if !keyed || inputs.config_files.contains(&local) {
                continue;
            }
            let digest = crate::provenance::sha256_hex(&local)?;
            files.insert(upload.guest.clone(), format!("{:o}:{digest}", upload.mode));
        }
        Ok(Ok(KeyParts {
            cache_format: CACHE_FORMAT,
            vmic: format!(
                "{} protocol {}",
                env!("CARGO_PKG_VERSION"),
                vmic_protocol::PROTOCOL_VERSION
            ),
            builder: sha256_hex(inputs.builder_manifest),
            arch: inputs.arch.to_string(),
            input: inputs.input_sha256.to_string(),
            os: json_digest(&without_history_text(&request.customization.os))?,
            scripts: json_digest(&(
                &request.customization.post_customization,
                &request.customization.finalize_customization,
            ))?,
            files,
            squashfs: json_digest(&request.squashfs)?,
            source_date_epoch: request.source_date_epoch,
            label: request.iso.label.clone(),
        }))
    }

    /// The entry's name: sha256 of all parts.
    pub fn key(&self) -> String {
        sha256_hex(&serde_json::to_vec(self).expect("key parts serialize"))
    }

    /// What differs from `earlier`, as a person would say it (empty: nothing).
    pub fn changes_since(&self, earlier: &KeyParts) -> Vec<String> {
        let mut changes: Vec<String> = [
            (
                self.cache_format != earlier.cache_format,
                "the cache format",
            ),
            (self.vmic != earlier.vmic, "vmic"),
            (self.builder != earlier.builder, "the builder VM image"),
            (self.os != earlier.os, "the os settings"),
            (self.scripts != earlier.scripts, "the scripts"),
            (self.squashfs != earlier.squashfs, "the squashfs settings"),
            (
                self.source_date_epoch != earlier.source_date_epoch,
                "SOURCE_DATE_EPOCH",
            ),
            (self.label != earlier.label, "the ISO label"),
        ]
        .into_iter()
        .filter(|(changed, _)| *changed)
        .map(|(_, what)| format!("{what} changed"))
        .collect();
        for (path, digest) in &self.files {
            match earlier.files.get(path) {
                None => changes.push(format!("{} was added", file_kind(path))),
                Some(before) if before != digest => {
                    changes.push(format!("{} changed", file_kind(path)))
                }
                Some(_) => {}
            }
        }
        for path in earlier.files.keys() {
            if !self.files.contains_key(path) {
                changes.push(format!("{} was removed", file_kind(path)));
            }
        }
        changes
    }
}

/// An uploaded file named by what it is to the user.
fn file_kind(guest: &str) -> String {
    let kinds = [
        (crate::plan::GUEST_PACKAGES_DIR, "package source file"),
        (crate::plan::GUEST_DIRS_DIR, "os.additionalDirs file"),
        (crate::plan::GUEST_FILES_DIR, "file"),
        (crate::plan::GUEST_CONFIG_DIR, "config directory file"),
    ];
    for (prefix, kind) in kinds {
        if let Some(rest) = guest.strip_prefix(prefix) {
            return format!("{kind} {}", rest.trim_start_matches('/'));
        }
    }
    format!("file {guest}")
}

/// The entry's ISO is the one its record describes, byte for byte.
fn check_entry(iso: &Path, record: &Path) -> Result<(), String> {
    let record = read_record(record)
        .map_err(|error| format!("the cached entry's record is unreadable ({error:#})"))?;
    let actual = crate::provenance::sha256_hex(iso)
        .map_err(|error| format!("the cached ISO is unreadable ({error:#})"))?;
    if record.iso_sha256 != actual {
        return Err(format!(
            "the cached ISO no longer matches its record (sha256 {actual}, recorded {:?})",
            record.iso_sha256
        ));
    }
    Ok(())
}

fn read_record(path: &Path) -> anyhow::Result<EntryRecord> {
    Ok(serde_json::from_str(&fs_err::read_to_string(path)?)?)
}

/// One entry's record beside its ISO.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryRecord {
    pub parts: KeyParts,
    pub iso_size: u64,
    /// The stored ISO's sha256 (hex): a hit is checked against it here, natively, so that the
    /// builder VM need not check the `rootfs.img` it keeps (seconds of hashing under TCG).
    /// Empty in records of cache format 1, which never hit (the format is in the key) but are
    /// still listed for eviction.
    #[serde(default)]
    pub iso_sha256: String,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct BuildCache {
    settings: CacheSettings,
}

/// The answer of [`BuildCache::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// The cached ISO to re-master, its bytes checked against the entry's record.
    Hit(PathBuf),
    /// Why not: no entry for this input, or what changed since the newest one for it.
    Miss(String),
}

/// What [`BuildCache::store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Stored; these entries (key, bytes) were evicted to make room.
    Entry { evicted: Vec<(String, u64)> },
    /// Not stored: the ISO alone is larger than the cache.
    TooLarge { size: u64, max_bytes: u64 },
}

impl BuildCache {
    pub fn new(settings: CacheSettings) -> Self {
        BuildCache { settings }
    }

    fn iso_path(&self, key: &str) -> PathBuf {
        self.settings.dir.join(format!("{key}.iso"))
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.settings.dir.join(format!("{key}.json"))
    }

    /// The entry for `parts`, checked against its record's sha256 and marked as used; or why
    /// there is none. An entry whose ISO no longer matches is removed. Reads the whole ISO:
    /// call it off the async runtime.
    pub fn lookup(&self, parts: &KeyParts) -> Lookup {
        let key = parts.key();
        let iso = self.iso_path(&key);
        let record = self.record_path(&key);
        if iso.is_file() && record.is_file() {
            if let Err(why) = check_entry(&iso, &record) {
                // The record first: without it the ISO is no entry, whatever happens next.
                let _ = fs_err::remove_file(&record);
                let _ = fs_err::remove_file(&iso);
                return Lookup::Miss(format!("{why}; the entry was removed"));
            }
            // Used now: eviction goes by the record's mtime.
            let _ = fs_err::File::options()
                .append(true)
                .open(&record)
                .and_then(|file| file.set_modified(std::time::SystemTime::now()));
            return Lookup::Hit(iso);
        }
        let newest_same_input = self
            .entries()
            .into_iter()
            .filter(|(_, entry, _)| {
                entry.parts.input == parts.input && entry.parts.arch == parts.arch
            })
            .max_by_key(|(_, _, used)| *used);
        Lookup::Miss(match newest_same_input {
            None => "no cached build of this input".into(),
            Some((_, entry, _)) => {
                let changes = parts.changes_since(&entry.parts);
                if changes.is_empty() {
                    "the cached entry is incomplete".into()
                } else {
                    format!(
                        "since the last cached build of this input: {}",
                        changes.join(", ")
                    )
                }
            }
        })
    }

    /// Every complete entry: key, record, last use.
    fn entries(&self) -> Vec<(String, EntryRecord, std::time::SystemTime)> {
        let Ok(listing) = fs_err::read_dir(&self.settings.dir) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(record) = read_record(&entry.path()) else {
                continue;
            };
            let used = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if self.iso_path(key).is_file() {
                entries.push((key.to_string(), record, used));
            }
        }
        entries
    }

    /// Store `iso` (a finished output, `sha256` its hex digest) as the entry for `parts`, then
    /// evict down to the cap. The copy goes under a temporary name first: a reader never sees
    /// half an entry.
    pub fn store(&self, parts: &KeyParts, iso: &Path, sha256: &str) -> anyhow::Result<Stored> {
        fs_err::create_dir_all(&self.settings.dir)?;
        let key = parts.key();
        let size = fs_err::metadata(iso)?.len();
        if size > self.settings.max_bytes {
            return Ok(Stored::TooLarge {
                size,
                max_bytes: self.settings.max_bytes,
            });
        }
        let temp = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.settings.dir)?;
        fs_err::copy(iso, temp.path())?;
        let record = EntryRecord {
            parts: parts.clone(),
            iso_size: size,
            iso_sha256: sha256.to_string(),
        };
        let record_temp = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.settings.dir)?;
        fs_err::write(record_temp.path(), serde_json::to_vec_pretty(&record)?)?;
        // The ISO first: a record is only ever beside a complete ISO.
        temp.persist(self.iso_path(&key))?;
        record_temp.persist(self.record_path(&key))?;
        Ok(Stored::Entry {
            evicted: self.evict()?,
        })
    }

    /// Remove the least recently used entries until the total fits the cap; returns their
    /// keys and sizes.
    pub fn evict(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut evicted = Vec::new();
        let mut entries = self.entries();
        let mut total: u64 = entries
            .iter()
            .map(|(key, _, _)| fs_err::metadata(self.iso_path(key)).map_or(0, |m| m.len()))
            .sum();
        entries.sort_by_key(|(_, _, used)| *used);
        for (key, _, _) in entries {
            if total <= self.settings.max_bytes {
                break;
            }
            let size = fs_err::metadata(self.iso_path(&key)).map_or(0, |m| m.len());
            // The record first: without it the ISO is no entry, whatever happens next.
            fs_err::remove_file(self.record_path(&key))?;
            fs_err::remove_file(self.iso_path(&key))?;
            total = total.saturating_sub(size);
            evicted.push((key, size));
        }
        Ok(evicted)
    }
}

/// The os settings as the key sees them: the image history entry is made from the `os` and
/// `scripts` sections and the files they name, which the key holds already (and whose changes
/// it names better); only whether history is written counts.
fn without_history_text(os: &vmic_protocol::OsCustomization) -> vmic_protocol::OsCustomization {
    let mut os = os.clone();
    if let Some(entry) = &mut os.image_history {
        entry.config_json.clear();
    }
    os
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_and_validate, ValidationContext};
    use crate::plan::{iso_plan, HostFacts};

    /// A config directory (`project/`): the config, a file `os.additionalFiles` names, a
    /// script file, an ISO-only file; and a package source directory beside it (`debs/`).
    fn project(dir: &Path) {
        let write = |path: &str, text: &str| {
            let path = match path.starts_with("debs/") {
                true => dir.join(path),
                false => dir.join("project").join(path),
            };
            fs_err::create_dir_all(path.parent().unwrap()).unwrap();
            fs_err::write(path, text).unwrap();
        };
        write(
            "config.yaml",
            "os:\n  hostname: one\n  additionalFiles:\n    files/motd: /etc/motd\n  \
             packages:\n    install: [hello]\nscripts:\n  postCustomization:\n  - path: \
             scripts/setup.sh\niso:\n  additionalFiles:\n    files/iso-only.txt: /iso-only.txt\n  \
             kernelCommandLine:\n    extraCommandLine: [a=1]\n",
        );
        write("files/motd", "hello\n");
        write("files/iso-only.txt", "on the ISO only\n");
        write("files/iso-other.txt", "another file for the ISO\n");
        write("scripts/setup.sh", "echo setup\n");
        write("debs/hello.deb", "not really a deb\n");
    }

    fn parts(dir: &Path) -> KeyParts {
        let config = dir.join("project/config.yaml");
        let loaded = load_and_validate(&config, &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{errors}"));
        let config_dir = fs_err::canonicalize(&loaded.dir).unwrap();
        let plan = iso_plan(
            &loaded.config,
            &HostFacts {
                disable_base_repos: true,
                ..HostFacts::for_tests(&config_dir)
            },
            &crate::plan::tests::gathered(&loaded.config, &config_dir, &[dir.join("debs")]),
        )
        .expect("plan");
        let config_files = [fs_err::canonicalize(&config).unwrap()];
        KeyParts::of(
            &plan.request,
            &KeyInputs {
                builder_manifest: b"{\"id\": \"x86_64-test\"}",
                arch: "x86_64",
                input_sha256: "ab",
                uploads: &plan.uploads,
                config_files: &config_files,
            },
        )
        .expect("key parts")
        .expect("cacheable")
    }

    /// The parts of the project before and after `change`, and what the cache says changed.
    fn changed(change: impl Fn(&Path)) -> (KeyParts, KeyParts, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        project(dir.path());
        let before = parts(dir.path());
        change(dir.path());
        let after = parts(dir.path());
        let changes = after.changes_since(&before);
        (before, after, changes)
    }

    fn edit(dir: &Path, path: &str, from: &str, to: &str) {
        let path = dir.join("project").join(path);
        let text = fs_err::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from:?} in {}", path.display());
        fs_err::write(path, text.replace(from, to)).unwrap();
    }

    #[test]
    fn iso_only_changes_keep_the_key() {
        let (before, after, changes) = changed(|dir| {
            edit(dir, "config.yaml", "[a=1]", "[a=2, b=3]");
            edit(
                dir,
                "config.yaml",
                "files/iso-only.txt",
                "files/iso-other.txt",
            );
        });
        assert_eq!(changes, Vec::<String>::new());
        assert_eq!(before.key(), after.key());
    }

    #[test]
    fn with_scripts_every_config_directory_file_keys_the_cache() {
        // A script can read any of them through /_imageconfigs.
        let (before, after, changes) = changed(|dir| {
            fs_err::write(dir.join("project/files/iso-only.txt"), "other\n").unwrap();
        });
        assert_ne!(before.key(), after.key());
        assert_eq!(
            changes,
            ["config directory file files/iso-only.txt changed"]
        );
    }

    #[test]
    fn without_scripts_only_the_files_the_os_section_names_key_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        project(dir.path());
        let config = dir.path().join("project/config.yaml");
        let text = fs_err::read_to_string(&config).unwrap();
        let start = text.find("scripts:").unwrap();
        let end = text.find("iso:").unwrap();
        fs_err::write(&config, format!("{}{}", &text[..start], &text[end..])).unwrap();
        let first = parts(dir.path());
        fs_err::write(dir.path().join("project/files/iso-only.txt"), "other\n").unwrap();
        fs_err::write(dir.path().join("project/scripts/setup.sh"), "unused now\n").unwrap();
        assert_eq!(
            parts(dir.path()).key(),
            first.key(),
            "unnamed files do not count"
        );
        fs_err::write(dir.path().join("project/files/motd"), "named\n").unwrap();
        assert_eq!(
            parts(dir.path()).changes_since(&first),
            ["config directory file files/motd changed"]
        );
    }

    #[test]
    fn an_os_change_misses_naming_the_os_settings() {
        let (before, after, changes) = changed(|dir| edit(dir, "config.yaml", "one", "two"));
        assert_ne!(before.key(), after.key());
        assert_eq!(changes, ["the os settings changed"]);
    }

    #[test]
    fn a_script_change_misses_naming_the_script() {
        let (before, after, changes) = changed(|dir| {
            fs_err::write(dir.join("project/scripts/setup.sh"), "echo other\n").unwrap()
        });
        assert_ne!(before.key(), after.key());
        assert_eq!(changes, ["config directory file scripts/setup.sh changed"]);
    }

    #[test]
    fn a_named_file_change_misses_naming_the_file() {
        let (before, after, changes) =
            changed(|dir| fs_err::write(dir.join("project/files/motd"), "changed\n").unwrap());
        assert_ne!(before.key(), after.key());
        assert_eq!(changes, ["config directory file files/motd changed"]);
    }

    #[test]
    fn a_package_source_change_misses_naming_the_source() {
        let (before, after, changes) = changed(|dir| {
            fs_err::write(dir.join("debs/hello.deb"), "another build\n").unwrap();
        });
        assert_ne!(before.key(), after.key());
        assert_eq!(changes, ["package source file 0/hello.deb changed"]);
        let (_, _, changes) =
            changed(|dir| fs_err::write(dir.join("debs/extra.deb"), "more\n").unwrap());
        assert_eq!(changes, ["package source file 0/extra.deb was added"]);
    }

    #[test]
    fn a_mode_change_misses_too() {
        use std::os::unix::fs::PermissionsExt;
        let (before, after, _) = changed(|dir| {
            fs_err::set_permissions(
                dir.join("project/scripts/setup.sh"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        });
        assert_ne!(before.key(), after.key());
    }

    #[test]
    fn network_package_installs_and_iso_inputs_are_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let mut request = iso_plan(
            &Default::default(),
            &HostFacts::for_tests(dir.path()),
            &Default::default(),
        )
        .map(|plan| plan.request)
        .unwrap_or_else(|error| panic!("{error:#}"));
        let inputs = KeyInputs {
            builder_manifest: b"{}",
            arch: "x86_64",
            input_sha256: "ab",
            uploads: &[],
            config_files: &[],
        };
        assert!(KeyParts::of(&request, &inputs).unwrap().is_ok());
        request.customization.os.packages.network = true;
        let why = KeyParts::of(&request, &inputs).unwrap().unwrap_err();
        assert!(why.contains("network"), "{why}");
        request.customization.os.packages.network = false;
        request.input_is_iso = true;
        assert!(KeyParts::of(&request, &inputs).unwrap().is_err());
    }

    fn entry_parts(input: &str, hostname_digest: &str) -> KeyParts {
        KeyParts {
            cache_format: CACHE_FORMAT,
            vmic: "v".into(),
            builder: "b".into(),
            arch: "x86_64".into(),
            input: input.into(),
            os: hostname_digest.into(),
            scripts: "s".into(),
            files: BTreeMap::new(),
            squashfs: "q".into(),
            source_date_epoch: None,
            label: "CDROM".into(),
        }
    }

    /// The test ISO (1000 bytes of 7) and its sha256.
    fn sevens(path: &Path) -> String {
        let bytes = vec![7u8; 1000];
        fs_err::write(path, &bytes).unwrap();
        hex::encode(vmic_protocol::sha256(&bytes))
    }

    #[test]
    fn an_entry_whose_iso_changed_since_it_was_stored_misses_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BuildCache::new(CacheSettings {
            dir: dir.path().join("builds"),
            max_bytes: 1 << 20,
        });
        let iso = dir.path().join("out.iso");
        let sha256 = sevens(&iso);
        let parts = entry_parts("in-1", "os-a");
        cache.store(&parts, &iso, &sha256).unwrap();
        assert!(matches!(cache.lookup(&parts), Lookup::Hit(_)));
        // One byte of the stored ISO changes (size unchanged).
        let stored = cache.iso_path(&parts.key());
        let mut bytes = fs_err::read(&stored).unwrap();
        bytes[500] = 8;
        fs_err::write(&stored, bytes).unwrap();
        match cache.lookup(&parts) {
            Lookup::Miss(why) => assert!(
                why.starts_with("the cached ISO no longer matches its record")
                    && why.ends_with("the entry was removed"),
                "{why}"
            ),
            Lookup::Hit(path) => panic!("a changed entry hit: {}", path.display()),
        }
        assert!(!stored.exists());
        assert!(!cache.record_path(&parts.key()).exists());
        // A record without a digest (cache format 1) never hits either.
        cache.store(&parts, &iso, "").unwrap();
        assert!(matches!(cache.lookup(&parts), Lookup::Miss(_)));
    }

    #[test]
    fn lookup_hits_stored_entries_says_why_it_misses_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BuildCache::new(CacheSettings {
            dir: dir.path().join("builds"),
            max_bytes: 2500,
        });
        let iso = dir.path().join("out.iso");
        let sha256 = sevens(&iso);
        let first = entry_parts("in-1", "os-a");
        match cache.lookup(&first) {
            Lookup::Miss(why) => assert_eq!(why, "no cached build of this input"),
            Lookup::Hit(path) => panic!("hit {}", path.display()),
        }
        cache.store(&first, &iso, &sha256).unwrap();
        let Lookup::Hit(path) = cache.lookup(&first) else {
            panic!("a stored entry hits");
        };
        assert_eq!(fs_err::read(path).unwrap(), vec![7u8; 1000]);
        match cache.lookup(&entry_parts("in-1", "os-b")) {
            Lookup::Miss(why) => assert!(why.ends_with("the os settings changed"), "{why}"),
            Lookup::Hit(_) => panic!("another os must miss"),
        }
        // Two more entries: the cap (2500 bytes) holds two; the least recently used goes.
        let age = |parts: &KeyParts, seconds: u64| {
            let record = cache.record_path(&parts.key());
            let file = fs_err::File::options().append(true).open(record).unwrap();
            file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
                .unwrap();
        };
        let second = entry_parts("in-2", "os-a");
        cache.store(&second, &iso, &sha256).unwrap();
        age(&first, 1_000);
        age(&second, 2_000);
        let third = entry_parts("in-3", "os-a");
        assert_eq!(
            cache.store(&third, &iso, &sha256).unwrap(),
            Stored::Entry {
                evicted: vec![(first.key(), 1000)]
            }
        );
        assert!(matches!(cache.lookup(&first), Lookup::Miss(_)), "evicted");
        assert!(matches!(cache.lookup(&second), Lookup::Hit(_)));
        assert!(matches!(cache.lookup(&third), Lookup::Hit(_)));
        // Nothing half-written is left behind.
        let names: Vec<String> = fs_err::read_dir(dir.path().join("builds"))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(
            names.iter().all(|name| !name.starts_with(".incoming")),
            "{names:?}"
        );
    }
}
