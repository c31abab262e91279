//! The build plan: what to upload into the builder VM and the `IsoBuild` request, decided from
//! the config, the host's facts and what [`crate::gather`] found on the host's disk: no I/O.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use vmic_protocol::{
    Compression, Customization, DirCopy, DiskBuild, FileCopy, FileSource, GroupSpec,
    ImageHistoryEntry, IsoBuild, IsoSettings, ModuleLoadMode, ModuleSpec, OsCustomization,
    PackageChanges, PackageSource, PasswordSpec, Script, SelinuxMode, ServiceChanges,
    SquashfsSettings, UserSpec,
};

use crate::config::model::{
    self, AdditionalFiles, Config, KernelCommandLine, PasswordType, Script as ScriptConfig,
};
use crate::gather::{HostFiles, Listed, SourceFiles};
use crate::upload::Upload;

/// Guest directory of the scratch disk.
pub const WORK_DIR: &str = "/work";
/// Guest directory the config directory is uploaded to.
pub const GUEST_CONFIG_DIR: &str = "/work/config";
/// Guest directory `os.additionalDirs` sources are uploaded to (one numbered subdirectory each).
pub const GUEST_DIRS_DIR: &str = "/work/dirs";
/// Guest directory for the files the config names outside its directory (`../x`, absolute
/// paths), each below its host path.
pub const GUEST_FILES_DIR: &str = "/work/files";
/// Guest directory `--package-source` paths are uploaded to.
pub const GUEST_PACKAGES_DIR: &str = "/work/packages";
/// Default ISO volume label (as AzL-IC's `mkisofs -V CDROM`).
pub const DEFAULT_ISO_LABEL: &str = "CDROM";

/// Files of the config directory not referenced by the config are uploaded only while small:
/// a config often sits beside multi-GiB images that scripts never read.
pub const UNREFERENCED_FILE_LIMIT: u64 = 16 << 20;
pub const UNREFERENCED_TOTAL_LIMIT: u64 = 256 << 20;

/// What the host does before sending the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<R> {
    pub uploads: Vec<Upload>,
    /// Config-directory files left out of `/_imageconfigs`, with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// What the user should hear about the config (plain-text passwords).
    pub warnings: Vec<String>,
    pub request: R,
}

pub type IsoPlan = Plan<IsoBuild>;
pub type DiskPlan = Plan<DiskBuild>;

/// Parameters that come from the host, not the config.
#[derive(Debug, Clone)]
pub struct HostFacts<'a> {
    pub config_dir: &'a Path,
    pub input_is_iso: bool,
    pub input_serial: &'a str,
    pub output_serial: &'a str,
    pub cpus: u32,
    pub disable_base_repos: bool,
    /// `--squashfs-compression`; `Auto` lets the agent choose what the image's kernel reads.
    pub squashfs_compression: Compression,
    /// `--source-date-epoch`; `None`: the agent takes the input's.
    pub source_date_epoch: Option<u64>,
    /// PXE artifacts (`pxe-dir`/`pxe-tar`) instead of an ISO: the `pxe` section applies.
    pub pxe_output: bool,
}

#[cfg(test)]
impl<'a> HostFacts<'a> {
    /// A disk input on 2 CPUs, nothing excluded, automatic compression, no epoch.
    pub fn for_tests(config_dir: &'a Path) -> Self {
        HostFacts {
            config_dir,
            input_is_iso: false,
            input_serial: "vmic-input",
            output_serial: "vmic-output",
            cpus: 2,
            disable_base_repos: false,
            squashfs_compression: Compression::Auto,
            source_date_epoch: None,
            pxe_output: false,
        }
    }
}

fn guest_path(relative: &Path) -> String {
    let mut path = String::from(GUEST_CONFIG_DIR);
    for component in relative.components() {
        if let Component::Normal(part) = component {
            path.push('/');
            path.push_str(&part.to_string_lossy());
        }
    }
    path
}

/// The config directory with `..` and `.` cleaned out, as [`crate::config::resolve_source`]
/// cleans the paths it resolves.
fn clean_dir(config_dir: &Path) -> PathBuf {
    crate::config::resolve_source(config_dir, ".")
}

/// Where the file the config names as `source` is in the guest: in the config directory's
/// upload when it lies inside that directory, else in its own upload below `GUEST_FILES_DIR`.
fn source_guest_path(config_dir: &Path, source: &str) -> String {
    let local = crate::config::resolve_source(config_dir, source);
    match local.strip_prefix(clean_dir(config_dir)) {
        Ok(relative) => guest_path(relative),
        Err(_) => outside_guest_path(&local),
    }
}

fn outside_guest_path(local: &Path) -> String {
    let mut path = String::from(GUEST_FILES_DIR);
    for component in local.components() {
        if let Component::Normal(part) = component {
            path.push('/');
            path.push_str(&part.to_string_lossy());
        }
    }
    path
}

fn file_copies(files: Option<&AdditionalFiles>, config_dir: &Path) -> Vec<FileCopy> {
    let Some(files) = files else {
        return Vec::new();
    };
    files
        .0
        .iter()
        .filter_map(|file| {
            let source = match (&file.source, &file.content) {
                (Some(source), _) => FileSource::Path(source_guest_path(config_dir, source)),
                (None, Some(content)) => FileSource::Content(content.clone()),
                (None, None) => return None,
            };
            Some(FileCopy {
                source,
                destination: file.destination.clone()?,
                permissions: file
                    .permissions
                    .as_deref()
                    .and_then(|text| u32::from_str_radix(text, 8).ok()),
            })
        })
        .collect()
}

fn kernel_args(line: Option<&KernelCommandLine>) -> Vec<String> {
    line.and_then(|line| line.extra_command_line.as_ref())
        .map(|args| args.0.clone())
        .unwrap_or_default()
}

fn scripts(list: Option<&Vec<ScriptConfig>>, phase: &str) -> Vec<Script> {
    list.map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(index, script)| {
                let source = match (&script.path, &script.content) {
                    (Some(path), _) => FileSource::Path(
                        crate::preflight::lexical(Path::new(path))
                            .to_string_lossy()
                            .into_owned(),
                    ),
                    (None, Some(content)) => FileSource::Content(content.clone()),
                    (None, None) => return None,
                };
                let name = script.name.clone().unwrap_or_else(|| match &script.path {
                    Some(path) => path.clone(),
                    None => format!("{phase}[{index}]"),
                });
                Some(Script {
                    name,
                    source,
                    interpreter: script.interpreter.clone(),
                    arguments: script.arguments.clone().unwrap_or_default(),
                    environment: script
                        .environment_variables
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                })
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Whether the config changes the root file system (else an ISO input is only re-mastered).
pub fn changes_rootfs(config: &Config) -> bool {
    let os_changes = config.os.as_ref().is_some_and(|os| {
        os.hostname.is_some()
            || os
                .additional_files
                .as_ref()
                .is_some_and(|f| !f.0.is_empty())
            || !kernel_args(os.kernel_command_line.as_ref()).is_empty()
            || os.packages.is_some()
            || os.additional_dirs.as_ref().is_some_and(|d| !d.is_empty())
            || os.users.as_ref().is_some_and(|u| !u.is_empty())
            || os.groups.as_ref().is_some_and(|g| !g.is_empty())
            || os.services.is_some()
            || os.modules.as_ref().is_some_and(|m| !m.is_empty())
            || os.selinux.is_some()
            || bootloader_reset(config).is_some()
    });
    let scripts = config.scripts.as_ref().is_some_and(|scripts| {
        scripts
            .post_customization
            .as_ref()
            .is_some_and(|s| !s.is_empty())
            || scripts
                .finalize_customization
                .as_ref()
                .is_some_and(|s| !s.is_empty())
    });
    os_changes || scripts
}

/// `os.bootloader.resetType` for the agent.
fn bootloader_reset(config: &Config) -> Option<vmic_protocol::BootloaderReset> {
    let reset = config.os.as_ref()?.bootloader.as_ref()?.reset_type?;
    Some(match reset {
        model::BootloaderResetType::HardReset => vmic_protocol::BootloaderReset::HardReset,
    })
}

/// Build the plan for a disk/ISO → ISO conversion.
pub fn iso_plan(
    config: &Config,
    facts: &HostFacts<'_>,
    files: &HostFiles,
) -> anyhow::Result<IsoPlan> {
    if facts.input_is_iso && bootloader_reset(config).is_some() {
        // The ISO's root file system has no fstab and its grub.cfg is vmic's own.
        anyhow::bail!(
            "os.bootloader.resetType: the input is a LiveOS ISO, whose boot loader \
             configuration vmic writes itself; reset the boot loader in the build from the \
             disk image instead"
        );
    }
    let common = common_plan(config, facts, files)?;
    let live = live_settings(config, facts.pxe_output)?;
    let request = IsoBuild {
        input_serial: facts.input_serial.to_string(),
        input_is_iso: facts.input_is_iso,
        output_serial: facts.output_serial.to_string(),
        work_dir: WORK_DIR.to_string(),
        customization: common.customization,
        iso: IsoSettings {
            label: DEFAULT_ISO_LABEL.to_string(),
            additional_files: file_copies(live.additional_files, facts.config_dir),
            extra_args: kernel_args(live.kernel_command_line),
            vmic_version: env!("CARGO_PKG_VERSION").to_string(),
            initramfs: live.initramfs,
            keep_kdump_boot_files: live.kdump == Some(crate::config::model::KdumpBootFiles::Keep),
        },
        squashfs: SquashfsSettings {
            compression: facts.squashfs_compression,
            threads: facts.cpus.max(1),
        },
        remaster_only: facts.input_is_iso && !changes_rootfs(config),
        replace_iso_settings: false,
        input_checked_by_host: false,
        source_date_epoch: facts.source_date_epoch,
        pxe: live.pxe,
    };
    Ok(Plan {
        uploads: common.uploads,
        skipped: common.skipped,
        warnings: common.warnings,
        request,
    })
}

/// The file name of the bootstrap ISO in PXE artifacts when the config names none (as the
/// Image Customizer's `bootstrapBaseUrl` documents it).
pub const DEFAULT_BOOTSTRAP_FILE_NAME: &str = "image.iso";

/// The LiveOS settings of one output: `iso.*` for an ISO, `pxe.*` for PXE artifacts (whose
/// default initramfs is the full OS, as in the Image Customizer).
struct LiveSettings<'c> {
    additional_files: Option<&'c crate::config::model::AdditionalFiles>,
    kernel_command_line: Option<&'c crate::config::model::KernelCommandLine>,
    initramfs: vmic_protocol::InitramfsType,
    kdump: Option<crate::config::model::KdumpBootFiles>,
    pxe: Option<vmic_protocol::PxeSettings>,
}

fn live_settings(config: &Config, pxe_output: bool) -> anyhow::Result<LiveSettings<'_>> {
    use crate::config::model::InitramfsType;
    let initramfs = |kind: Option<InitramfsType>, default| match kind.unwrap_or(default) {
        InitramfsType::Bootstrap => vmic_protocol::InitramfsType::Bootstrap,
        InitramfsType::FullOs => vmic_protocol::InitramfsType::FullOs,
    };
    if !pxe_output {
        let iso = config.iso.as_ref();
        return Ok(LiveSettings {
            additional_files: iso.and_then(|iso| iso.additional_files.as_ref()),
            kernel_command_line: iso.and_then(|iso| iso.kernel_command_line.as_ref()),
            initramfs: initramfs(
                iso.and_then(|iso| iso.initramfs_type),
                InitramfsType::Bootstrap,
            ),
            kdump: iso.and_then(|iso| iso.kdump_boot_files),
            pxe: None,
        });
    }
    let pxe = config.pxe.as_ref();
    let initramfs = initramfs(
        pxe.and_then(|pxe| pxe.initramfs_type),
        InitramfsType::FullOs,
    );
    let settings = match initramfs {
        vmic_protocol::InitramfsType::Bootstrap => {
            let (url, file_name) = bootstrap_location(
                pxe.and_then(|pxe| pxe.bootstrap_base_url.as_deref()),
                pxe.and_then(|pxe| pxe.bootstrap_file_url.as_deref()),
            )?;
            vmic_protocol::PxeSettings {
                bootstrap_url: Some(url),
                bootstrap_file_name: file_name,
            }
        }
        _ => vmic_protocol::PxeSettings {
            bootstrap_url: None,
            bootstrap_file_name: String::new(),
        },
    };
    Ok(LiveSettings {
        additional_files: pxe.and_then(|pxe| pxe.additional_files.as_ref()),
        kernel_command_line: pxe.and_then(|pxe| pxe.kernel_command_line.as_ref()),
        initramfs,
        kdump: pxe.and_then(|pxe| pxe.kdump_boot_files),
        pxe: Some(settings),
    })
}

/// Where the bootstrap initrd fetches the ISO from, and the ISO's file name in the artifacts:
/// `bootstrapBaseUrl` + `/image.iso`, or `bootstrapFileUrl` and its last path segment.
pub fn bootstrap_location(
    base_url: Option<&str>,
    file_url: Option<&str>,
) -> anyhow::Result<(String, String)> {
    match (base_url, file_url) {
        (Some(base), None) => Ok((
            format!(
                "{}/{DEFAULT_BOOTSTRAP_FILE_NAME}",
                base.trim_end_matches('/')
            ),
            DEFAULT_BOOTSTRAP_FILE_NAME.to_string(),
        )),
        (None, Some(url)) => {
            let path = url.split(['?', '#']).next().unwrap_or(url);
            let name = path
                .split_once("://")
                .map_or(path, |(_, rest)| rest)
                .split_once('/')
                .map(|(_, path)| path.rsplit('/').next().unwrap_or(""))
                .unwrap_or("");
            if name.is_empty() || name == "." || name == ".." {
                anyhow::bail!(
                    "pxe.bootstrapFileUrl: {url:?} names no file; end it with the ISO's file name (e.g. http://server/path/image.iso)"
                );
            }
            Ok((url.to_string(), name.to_string()))
        }
        _ => anyhow::bail!(
            "pxe.initramfsType: a bootstrap PXE initrd fetches the ISO over the network: set pxe.bootstrapBaseUrl or pxe.bootstrapFileUrl"
        ),
    }
}

/// Build the plan for customizing a disk image in place.
pub fn disk_plan(
    config: &Config,
    facts: &HostFacts<'_>,
    files: &HostFiles,
) -> anyhow::Result<DiskPlan> {
    let common = common_plan(config, facts, files)?;
    Ok(Plan {
        uploads: common.uploads,
        skipped: common.skipped,
        warnings: common.warnings,
        request: DiskBuild {
            input_serial: facts.input_serial.to_string(),
            work_dir: WORK_DIR.to_string(),
            customization: common.customization,
        },
    })
}

/// What both outputs share: the os customization, the scripts and the uploads.
struct CommonPlan {
    customization: Customization,
    uploads: Vec<Upload>,
    skipped: Vec<(PathBuf, String)>,
    warnings: Vec<String>,
}

fn common_plan(
    config: &Config,
    facts: &HostFacts<'_>,
    files: &HostFiles,
) -> anyhow::Result<CommonPlan> {
    let os = config.os.as_ref();
    let script_config = config.scripts.as_ref();
    let mut uploads = Vec::new();
    let skipped = config_dir_uploads(files, &mut uploads);
    let additional_dirs = additional_dirs(os, files, &mut uploads);
    let packages = packages(os, facts, files, &mut uploads)?;
    let mut budget = crate::upload::UploadBudget::default();
    for upload in &uploads {
        budget.take(&upload.local, upload.size)?;
    }
    let mut warnings = Vec::new();
    let os_customization = OsCustomization {
        hostname: os.and_then(|os| os.hostname.clone()),
        additional_files: file_copies(
            os.and_then(|os| os.additional_files.as_ref()),
            facts.config_dir,
        ),
        kernel_args: kernel_args(os.and_then(|os| os.kernel_command_line.as_ref())),
        packages,
        additional_dirs,
        groups: os
            .and_then(|os| os.groups.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|group| {
                Some(GroupSpec {
                    name: group.name.clone()?,
                    gid: group.gid,
                })
            })
            .collect(),
        users: users(os, facts.config_dir, files, &mut warnings)?,
        services: os
            .and_then(|os| os.services.as_ref())
            .map(|services| ServiceChanges {
                enable: services.enable.clone().unwrap_or_default(),
                disable: services.disable.clone().unwrap_or_default(),
            })
            .unwrap_or_default(),
        modules: os
            .and_then(|os| os.modules.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|module| {
                Some(ModuleSpec {
                    name: module.name.clone()?,
                    load_mode: match module.load_mode {
                        Some(model::ModuleLoadMode::Always) => ModuleLoadMode::Always,
                        Some(model::ModuleLoadMode::Auto) => ModuleLoadMode::Auto,
                        Some(model::ModuleLoadMode::Disable) => ModuleLoadMode::Disable,
                        Some(model::ModuleLoadMode::Inherit) | None => ModuleLoadMode::Inherit,
                    },
                    options: module
                        .options
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                })
            })
            .collect(),
        image_history: image_history(config, facts.config_dir, files)?,
        bootloader_reset: bootloader_reset(config),
        selinux_mode: os
            .and_then(|os| os.selinux.as_ref())
            .and_then(|selinux| selinux.mode)
            .map(|mode| match mode {
                model::SelinuxMode::Disabled => SelinuxMode::Disabled,
                model::SelinuxMode::Permissive => SelinuxMode::Permissive,
                model::SelinuxMode::Enforcing => SelinuxMode::Enforcing,
                model::SelinuxMode::ForceEnforcing => SelinuxMode::ForceEnforcing,
            }),
    };
    Ok(CommonPlan {
        customization: Customization {
            config_dir: GUEST_CONFIG_DIR.to_string(),
            os: os_customization,
            post_customization: scripts(
                script_config.and_then(|s| s.post_customization.as_ref()),
                "scripts.postCustomization",
            ),
            finalize_customization: scripts(
                script_config.and_then(|s| s.finalize_customization.as_ref()),
                "scripts.finalizeCustomization",
            ),
        },
        uploads,
        skipped,
        warnings,
    })
}

/// What `redacted` values read in the image history, as the Image Customizer writes them.
pub const REDACTED: &str = "[redacted]";

/// The image history entry (`os.imageHistory`), as the Image Customizer makes it: the config
/// as JSON with secrets redacted (SSH keys, password values) and the sha256 of every file it
/// names (`sha256hash` beside a source or script path, `sha256hashmap` for `additionalDirs`).
/// Only the sections that shaped the image (`os`, `scripts`): the ISO's own settings live in
/// the ISO record, and a rebuild with other `iso.*` settings reuses the customized image.
/// `None` with `imageHistory: none`.
fn image_history(
    config: &Config,
    config_dir: &Path,
    files: &HostFiles,
) -> anyhow::Result<Option<ImageHistoryEntry>> {
    if config.os.as_ref().and_then(|os| os.image_history) == Some(model::ImageHistory::None) {
        return Ok(None);
    }
    let mut value = serde_json::json!({
        "os": serde_json::to_value(&config.os)?,
        "scripts": serde_json::to_value(&config.scripts)?,
    });
    strip_nulls(&mut value);
    let hash_of = |path: &str| {
        files
            .sha256
            .get(&crate::config::resolve_source(config_dir, path))
            .cloned()
    };
    let add_hash = |list: Option<&mut Value>, key: &str| {
        for item in list
            .and_then(Value::as_array_mut)
            .map(|list| list.iter_mut())
            .into_iter()
            .flatten()
        {
            let hash = item.get(key).and_then(Value::as_str).and_then(hash_of);
            if let (Some(hash), Some(item)) = (hash, item.as_object_mut()) {
                item.insert("sha256hash".into(), hash.into());
            }
        }
    };
    add_hash(value.pointer_mut("/os/additionalFiles"), "source");
    add_hash(value.pointer_mut("/iso/additionalFiles"), "source");
    add_hash(value.pointer_mut("/scripts/postCustomization"), "path");
    add_hash(value.pointer_mut("/scripts/finalizeCustomization"), "path");
    if let Some(dirs) = value
        .pointer_mut("/os/additionalDirs")
        .and_then(Value::as_array_mut)
    {
        for (dir, listed) in dirs.iter_mut().zip(&files.additional_dirs) {
            let map: serde_json::Map<String, Value> = listed
                .iter()
                .filter_map(|file| {
                    let hash = files.sha256.get(&file.local)?;
                    Some((
                        file.relative.to_string_lossy().into_owned(),
                        hash.clone().into(),
                    ))
                })
                .collect();
            if let Some(dir) = dir.as_object_mut() {
                dir.insert("sha256hashmap".into(), Value::Object(map));
            }
        }
    }
    if let Some(users) = value.pointer_mut("/os/users").and_then(Value::as_array_mut) {
        for user in users.iter_mut().filter_map(Value::as_object_mut) {
            if user.contains_key("sshPublicKeys") {
                user.insert("sshPublicKeys".into(), REDACTED.into());
            }
            if let Some(password) = user.get_mut("password").and_then(Value::as_object_mut) {
                if password.contains_key("value") {
                    password.insert("value".into(), REDACTED.into());
                }
            }
        }
    }
    Ok(Some(ImageHistoryEntry {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        config_json: value.to_string(),
    }))
}

/// Remove `null` members, recursively: absent settings are absent, as in the file.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, member| !member.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The text of a file the config reads, as gathered.
fn text<'f>(files: &'f HostFiles, config_dir: &Path, relative: &str) -> anyhow::Result<&'f str> {
    files
        .texts
        .get(relative)
        .map(String::as_str)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} was not read before planning (a vmic bug: gather and plan disagree)",
                config_dir.join(relative).display()
            )
        })
}

fn users(
    os: Option<&model::Os>,
    config_dir: &Path,
    files: &HostFiles,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Vec<UserSpec>> {
    let mut out = Vec::new();
    for user in os.and_then(|os| os.users.as_ref()).into_iter().flatten() {
        let Some(name) = user.name.clone() else {
            continue;
        };
        let mut ssh_public_keys = user.ssh_public_keys.clone().unwrap_or_default();
        for path in user.ssh_public_key_paths.iter().flatten() {
            let text = text(files, config_dir, path)?;
            ssh_public_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(str::to_string),
            );
        }
        let password = match &user.password {
            None => None,
            Some(password) => {
                let value = password.value.clone().unwrap_or_default();
                let from_file = |value: &str| -> anyhow::Result<String> {
                    Ok(text(files, config_dir, value)?.trim_end().to_string())
                };
                match password.password_type {
                    Some(PasswordType::Locked) | None => Some(PasswordSpec::Locked),
                    Some(PasswordType::Hashed) => Some(PasswordSpec::Hashed(value)),
                    Some(PasswordType::HashedFile) => {
                        Some(PasswordSpec::Hashed(from_file(&value)?))
                    }
                    Some(PasswordType::PlainText) => {
                        warnings.push(format!(
                            "os.users: the password of {name} is plain text in the config; \
                             anyone who reads the config or the build logs can log in as \
                             {name} (use type: hashed with a crypt(3) hash instead)"
                        ));
                        Some(PasswordSpec::PlainText(value))
                    }
                    Some(PasswordType::PlainTextFile) => {
                        warnings.push(format!(
                            "os.users: the password of {name} is a plain-text file; prefer \
                             type: hashed-file"
                        ));
                        Some(PasswordSpec::PlainText(from_file(&value)?))
                    }
                }
            }
        };
        out.push(UserSpec {
            name,
            uid: user.uid,
            password,
            password_expires_days: user.password_expires_days,
            ssh_public_keys,
            primary_group: user.primary_group.clone(),
            secondary_groups: user.secondary_groups.clone().unwrap_or_default(),
            startup_command: user.startup_command.clone(),
            home_directory: user.home_directory.clone(),
        });
    }
    Ok(out)
}

fn octal(value: Option<&String>) -> Option<u32> {
    value.and_then(|text| u32::from_str_radix(text, 8).ok())
}

/// `os.additionalDirs`: each source tree is uploaded whole to its own guest directory.
fn additional_dirs(
    os: Option<&model::Os>,
    files: &HostFiles,
    uploads: &mut Vec<Upload>,
) -> Vec<DirCopy> {
    let mut out = Vec::new();
    for (index, dir) in os
        .and_then(|os| os.additional_dirs.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (Some(_), Some(destination)) = (&dir.source, &dir.destination) else {
            continue;
        };
        let guest = format!("{GUEST_DIRS_DIR}/{index}");
        upload_tree(
            files
                .additional_dirs
                .get(index)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            &guest,
            uploads,
        );
        out.push(DirCopy {
            source: guest,
            destination: destination.clone(),
            new_dir_permissions: octal(dir.new_dir_permissions.as_ref()),
            merged_dir_permissions: octal(dir.merged_dir_permissions.as_ref()),
            child_file_permissions: octal(dir.child_file_permissions.as_ref()),
        });
    }
    out
}

/// Upload every listed file to the same relative path below `guest`.
fn upload_tree(listed: &[Listed], guest: &str, uploads: &mut Vec<Upload>) {
    for file in listed {
        let mut target = guest.to_string();
        for component in file.relative.components() {
            target.push('/');
            target.push_str(&component.as_os_str().to_string_lossy());
        }
        uploads.push(upload(file, target));
    }
}

fn upload(file: &Listed, guest: String) -> Upload {
    Upload {
        local: file.local.clone(),
        guest,
        mode: file.mode,
        size: file.size,
    }
}

/// The builder VM gets a (user-mode) network only to reach the image's own repositories.
fn needs_network(packages_changed: bool, disable_base_repos: bool) -> bool {
    packages_changed && !disable_base_repos
}

fn package_lists(
    config_dir: &Path,
    files: &HostFiles,
    lists: Option<&Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for list in lists.into_iter().flatten() {
        let parsed = model::parse_package_list(text(files, config_dir, list)?)
            .map_err(|error| anyhow::anyhow!("{}: {error}", config_dir.join(list).display()))?;
        names.extend(parsed);
    }
    Ok(names)
}

fn packages(
    os: Option<&model::Os>,
    facts: &HostFacts<'_>,
    files: &HostFiles,
    uploads: &mut Vec<Upload>,
) -> anyhow::Result<PackageChanges> {
    let Some(packages) = os.and_then(|os| os.packages.as_ref()) else {
        return Ok(PackageChanges::default());
    };
    // AzL-IC order: the lists' packages first, then the inline ones.
    let merged = |lists: Option<&Vec<String>>, inline: Option<&Vec<String>>| {
        let mut names = package_lists(facts.config_dir, files, lists)?;
        names.extend(inline.cloned().unwrap_or_default());
        anyhow::Ok(names)
    };
    let mut changes = PackageChanges {
        update_existing: packages.update_existing_packages.unwrap_or(false),
        remove: merged(packages.remove_lists.as_ref(), packages.remove.as_ref())?,
        install: merged(packages.install_lists.as_ref(), packages.install.as_ref())?,
        update: merged(packages.update_lists.as_ref(), packages.update.as_ref())?,
        sources: Vec::new(),
        disable_base_repos: facts.disable_base_repos,
        network: needs_network(packages.asks_for_anything(), facts.disable_base_repos),
    };
    if changes.is_empty() {
        return Ok(changes);
    }
    for (index, source) in files.package_sources.iter().enumerate() {
        match source {
            SourceFiles::Directory(listed) => {
                let guest = format!("{GUEST_PACKAGES_DIR}/{index}");
                upload_tree(listed, &guest, uploads);
                changes.sources.push(PackageSource::Directory(guest));
            }
            SourceFiles::File(file) => {
                let guest = format!(
                    "{GUEST_PACKAGES_DIR}/{index}-{}",
                    file.relative.to_string_lossy()
                );
                uploads.push(Upload {
                    mode: 0o644,
                    ..upload(file, guest.clone())
                });
                changes.sources.push(PackageSource::RepoFile(guest));
            }
        }
    }
    Ok(changes)
}

/// The config directory's files, uploaded so that scripts find them under `/_imageconfigs`,
/// and the files the config names outside it. Returns the files left out, with why.
fn config_dir_uploads(files: &HostFiles, uploads: &mut Vec<Upload>) -> Vec<(PathBuf, String)> {
    let mut skipped = Vec::new();
    // Files named outside the config directory: the user's choice, uploaded one by one.
    for file in &files.outside {
        uploads.push(upload(file, outside_guest_path(&file.local)));
    }
    let mut unreferenced_total = 0u64;
    for file in &files.config_dir {
        if !files.referenced.contains(&file.relative) {
            if file.size > UNREFERENCED_FILE_LIMIT {
                skipped.push((
                    file.local.clone(),
                    format!(
                        "larger than {} MiB and not named by the config",
                        UNREFERENCED_FILE_LIMIT >> 20
                    ),
                ));
                continue;
            }
            if unreferenced_total + file.size > UNREFERENCED_TOTAL_LIMIT {
                skipped.push((
                    file.local.clone(),
                    format!(
                        "the config directory's unnamed files exceed {} MiB",
                        UNREFERENCED_TOTAL_LIMIT >> 20
                    ),
                ));
                continue;
            }
            unreferenced_total += file.size;
        }
        uploads.push(upload(file, guest_path(&file.relative)));
    }
    skipped
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{load_and_validate, ValidationContext};
    use crate::gather::{gather, Where};

    /// Write `text` to `dir/name`, making its parent directories.
    pub(crate) fn write_below(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        fs_err::create_dir_all(path.parent().expect("parent")).expect("dir");
        fs_err::write(path, text).expect("write");
    }

    /// What `gather` finds for `config` in `dir`, with these package sources.
    pub(crate) fn gathered(config: &Config, dir: &Path, sources: &[PathBuf]) -> HostFiles {
        gather(
            config,
            Where {
                config_dir: dir,
                exclude: &[],
                package_sources: sources,
            },
        )
        .expect("gather")
    }

    fn plan_for(fixture: &str, input_is_iso: bool) -> IsoPlan {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/config/cloud-init")
            .join(fixture);
        let loaded = load_and_validate(&path, &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{errors}"));
        iso_plan(
            &loaded.config,
            &HostFacts {
                input_is_iso,
                ..HostFacts::for_tests(&loaded.dir)
            },
            &gathered(&loaded.config, &loaded.dir, &[]),
        )
        .expect("plan")
    }

    #[test]
    fn seed_example_1_puts_cloud_init_files_on_the_iso() {
        let plan = plan_for("iso-map.yaml", false);
        let request = &plan.request;
        assert_eq!(request.iso.extra_args, ["ds=nocloud"]);
        assert_eq!(request.iso.label, "CDROM");
        let destinations: Vec<_> = request
            .iso
            .additional_files
            .iter()
            .map(|file| file.destination.as_str())
            .collect();
        assert!(destinations.contains(&"/cloud-init-data/user-data"));
        assert!(matches!(
            &request.iso.additional_files[0].source,
            FileSource::Path(path) if path.starts_with("/work/config/cloud-init-data/")
        ));
        assert_eq!(request.customization.post_customization.len(), 1);
        assert!(matches!(
            request.customization.post_customization[0].source,
            FileSource::Content(_)
        ));
        assert!(plan
            .uploads
            .iter()
            .any(|upload| upload.guest == "/work/config/cloud-init-data/user-data"));
        assert!(!request.remaster_only);
    }

    #[test]
    fn map_and_list_syntax_plan_the_same_build() {
        assert_eq!(
            plan_for("iso-map.yaml", false).request,
            plan_for("iso-list.yaml", false).request
        );
        assert_eq!(
            plan_for("rootfs-map.yaml", false).request,
            plan_for("rootfs-list.yaml", false).request
        );
    }

    #[test]
    fn iso_input_is_remastered_only_without_rootfs_changes() {
        // Example 1 has a postCustomization script: the rootfs changes.
        assert!(!plan_for("iso-map.yaml", true).request.remaster_only);
        let config = Config::default();
        assert!(!changes_rootfs(&config));
    }

    /// The config of `yaml`, validated, from a file in `dir`.
    fn config_of(dir: &Path, yaml: &str) -> crate::config::LoadedConfig {
        let path = dir.join("cfg.yaml");
        fs_err::write(&path, yaml).expect("write");
        load_and_validate(&path, &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{yaml}: {errors}"))
    }

    #[test]
    fn every_os_section_and_script_changes_the_rootfs_and_nothing_else_does() {
        let root = tempfile::tempdir().expect("temp dir");
        write_below(root.path(), "motd", "hi");
        write_below(root.path(), "tree/f", "f");
        write_below(root.path(), "s.sh", "true");
        // One case per setting that reaches the root file system (a cached rootfs.img is
        // reused only when none of them is set).
        for yaml in [
            "os:\n  hostname: h\n",
            "os:\n  additionalFiles:\n  - source: motd\n    destination: /etc/motd\n",
            "os:\n  kernelCommandLine:\n    extraCommandLine: [quiet]\n",
            "os:\n  packages:\n    install: [jq]\n",
            "os:\n  additionalDirs:\n  - source: tree\n    destination: /opt/t\n",
            "os:\n  users:\n  - name: alice\n",
            "os:\n  groups:\n  - name: staff\n",
            "os:\n  services:\n    enable: [ssh]\n",
            "os:\n  modules:\n  - name: loop\n    loadMode: always\n",
            "os:\n  selinux:\n    mode: disabled\n",
            "os:\n  bootloader:\n    resetType: hard-reset\n",
            "scripts:\n  postCustomization:\n  - path: s.sh\n",
            "scripts:\n  finalizeCustomization:\n  - path: s.sh\n",
        ] {
            let loaded = config_of(root.path(), yaml);
            assert!(changes_rootfs(&loaded.config), "{yaml}");
        }
        for yaml in [
            "",
            "os:\n  additionalFiles: []\n",
            "os:\n  kernelCommandLine:\n    extraCommandLine: []\n",
            "os:\n  additionalDirs: []\n  users: []\n  groups: []\n  modules: []\n",
            "os:\n  bootloader: {}\n",
            "scripts:\n  postCustomization: []\n  finalizeCustomization: []\n",
            "iso:\n  kernelCommandLine:\n    extraCommandLine: [quiet]\n",
        ] {
            let loaded = config_of(root.path(), yaml);
            assert!(!changes_rootfs(&loaded.config), "{yaml}");
        }
    }

    #[test]
    fn a_hard_reset_reaches_the_agent_and_is_refused_for_an_iso_input() {
        let root = tempfile::tempdir().expect("temp dir");
        let loaded = config_of(
            root.path(),
            "os:\n  bootloader:\n    resetType: hard-reset\n",
        );
        let files = gathered(&loaded.config, &loaded.dir, &[]);
        let facts = HostFacts::for_tests(&loaded.dir);
        let plan = iso_plan(&loaded.config, &facts, &files).expect("disk input");
        assert_eq!(
            plan.request.customization.os.bootloader_reset,
            Some(vmic_protocol::BootloaderReset::HardReset)
        );
        let iso_input = HostFacts {
            input_is_iso: true,
            ..HostFacts::for_tests(&loaded.dir)
        };
        let error = iso_plan(&loaded.config, &iso_input, &files).expect_err("ISO input");
        assert!(
            error
                .to_string()
                .contains("os.bootloader.resetType: the input is a LiveOS ISO"),
            "{error}"
        );
        let none = config_of(root.path(), "os:\n  hostname: h\n");
        let plan = iso_plan(&none.config, &iso_input, &files).expect("no reset");
        assert_eq!(plan.request.customization.os.bootloader_reset, None);
    }

    #[test]
    fn kdump_boot_files_are_kept_only_when_asked() {
        let root = tempfile::tempdir().expect("temp dir");
        for (yaml, keep) in [
            ("previewFeatures: [kdump-boot-files]\niso:\n  initramfsType: full-os\n  kdumpBootFiles: keep\n", true),
            ("previewFeatures: [kdump-boot-files]\niso:\n  initramfsType: full-os\n  kdumpBootFiles: none\n", false),
            ("iso:\n  initramfsType: full-os\n", false),
        ] {
            let loaded = config_of(root.path(), yaml);
            let files = gathered(&loaded.config, &loaded.dir, &[]);
            let plan = iso_plan(&loaded.config, &HostFacts::for_tests(&loaded.dir), &files)
                .expect("plan");
            assert_eq!(plan.request.iso.keep_kdump_boot_files, keep, "{yaml}");
        }
    }

    #[test]
    fn a_bootstrap_pxe_output_fetches_its_iso_from_the_configured_url() {
        let root = tempfile::tempdir().expect("temp dir");
        let pxe = HostFacts {
            pxe_output: true,
            ..HostFacts::for_tests(root.path())
        };
        for (yaml, url, name) in [
            (
                "pxe:\n  initramfsType: bootstrap\n  bootstrapBaseUrl: http://10.0.2.2:8080/\n",
                Some("http://10.0.2.2:8080/image.iso"),
                "image.iso",
            ),
            (
                "pxe:\n  initramfsType: bootstrap\n  bootstrapFileUrl: http://h/d/live.iso\n",
                Some("http://h/d/live.iso"),
                "live.iso",
            ),
            // full-os, the PXE default, fetches nothing.
            ("pxe:\n  bootstrapBaseUrl: http://h\n", None, ""),
        ] {
            let loaded = config_of(root.path(), yaml);
            let files = gathered(&loaded.config, &loaded.dir, &[]);
            let plan = iso_plan(&loaded.config, &pxe, &files).expect("plan");
            let settings = plan.request.pxe.expect("PXE settings");
            assert_eq!(settings.bootstrap_url.as_deref(), url, "{yaml}");
            assert_eq!(settings.bootstrap_file_name, name, "{yaml}");
        }
        // An ISO output carries no PXE settings, whatever the pxe section says.
        let loaded = config_of(root.path(), "pxe:\n  initramfsType: bootstrap\n");
        let files = gathered(&loaded.config, &loaded.dir, &[]);
        let plan = iso_plan(&loaded.config, &HostFacts::for_tests(root.path()), &files)
            .expect("an ISO plan");
        assert_eq!(plan.request.pxe, None);
    }

    #[test]
    fn bootstrap_location_names_the_url_and_the_file_or_says_what_is_missing() {
        for (base, file, url, name) in [
            (
                Some("http://h:8080/"),
                None,
                "http://h:8080/image.iso",
                "image.iso",
            ),
            (
                Some("http://h:8080"),
                None,
                "http://h:8080/image.iso",
                "image.iso",
            ),
            (
                None,
                Some("http://h/d/live.iso?t=1#x"),
                "http://h/d/live.iso?t=1#x",
                "live.iso",
            ),
            (
                None,
                Some("https://h/live.iso"),
                "https://h/live.iso",
                "live.iso",
            ),
        ] {
            assert_eq!(
                bootstrap_location(base, file).expect("a location"),
                (url.to_string(), name.to_string())
            );
        }
        for file in ["http://h/", "http://h", "http://h/d/..", "http://h/d/."] {
            let error = bootstrap_location(None, Some(file)).expect_err(file);
            assert!(
                error.to_string().contains("names no file"),
                "{file}: {error}"
            );
        }
        for (base, file) in [(None, None), (Some("http://h"), Some("http://h/i.iso"))] {
            let error = bootstrap_location(base, file).expect_err("not one URL");
            assert!(
                error
                    .to_string()
                    .contains("set pxe.bootstrapBaseUrl or pxe.bootstrapFileUrl"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_package_file_is_uploaded_readable_whatever_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("temp dir");
        let deb = root.path().join("private.deb");
        fs_err::write(&deb, "deb").expect("write");
        fs_err::set_permissions(&deb, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let loaded = config_of(root.path(), "os:\n  packages:\n    install: [private]\n");
        let files = gathered(&loaded.config, &loaded.dir, &[deb]);
        let plan =
            iso_plan(&loaded.config, &HostFacts::for_tests(&loaded.dir), &files).expect("plan");
        let upload = plan
            .uploads
            .iter()
            .find(|upload| upload.guest.starts_with(GUEST_PACKAGES_DIR))
            .expect("the package is uploaded");
        // The package manager in the image reads it as another user (apt's _apt).
        assert_eq!(upload.mode, 0o644);
    }

    #[test]
    fn os_customization_reads_the_files_it_names_and_uploads_dirs_and_packages() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path();
        let write = |name: &str, text: &str| write_below(dir, name, text);
        write("keys/a.pub", "# a comment\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm a@x\n\n");
        write("hash.txt", "$6$s$h\n");
        write("lists/base.yaml", "packages: [jq, curl]\n");
        write("tree/sub/f.txt", "f");
        write("debs/hello.deb", "deb");
        write(
            "cfg.yaml",
            "os:\n  users:\n  - name: alice\n    sshPublicKeys: [ssh-rsa BBBB b@x]\n    \
             sshPublicKeyPaths: [keys/a.pub]\n    password:\n      type: hashed-file\n      \
             value: hash.txt\n  packages:\n    installLists: [lists/base.yaml]\n    \
             install: [hello]\n  additionalDirs:\n  - source: tree\n    destination: /opt/t\n    \
             childFilePermissions: \"0640\"\n  modules:\n  - name: loop\n    loadMode: always\n",
        );
        let loaded = load_and_validate(&dir.join("cfg.yaml"), &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{errors}"));
        let files = gathered(&loaded.config, &loaded.dir, &[dir.join("debs")]);
        let plan = |disable_base_repos| {
            disk_plan(
                &loaded.config,
                &HostFacts {
                    disable_base_repos,
                    ..HostFacts::for_tests(&loaded.dir)
                },
                &files,
            )
            .expect("plan")
        };
        let offline = plan(true);
        let os = &offline.request.customization.os;
        assert_eq!(
            os.users[0].ssh_public_keys,
            ["ssh-rsa BBBB b@x", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm a@x"]
        );
        assert_eq!(
            os.users[0].password,
            Some(PasswordSpec::Hashed("$6$s$h".into()))
        );
        assert_eq!(
            os.packages.install,
            ["jq", "curl", "hello"],
            "lists first, then inline"
        );
        assert_eq!(
            os.packages.sources,
            [PackageSource::Directory("/work/packages/0".into())]
        );
        assert!(
            !os.packages.network,
            "offline with --disable-base-image-repos"
        );
        assert!(plan(false).request.customization.os.packages.network);
        assert_eq!(os.additional_dirs[0].source, "/work/dirs/0");
        assert_eq!(os.additional_dirs[0].child_file_permissions, Some(0o640));
        assert_eq!(os.modules[0].load_mode, ModuleLoadMode::Always);
        let guests: Vec<&str> = offline.uploads.iter().map(|u| u.guest.as_str()).collect();
        for expected in ["/work/dirs/0/sub/f.txt", "/work/packages/0/hello.deb"] {
            assert!(guests.contains(&expected), "{expected} in {guests:?}");
        }
    }

    #[test]
    fn a_source_outside_the_config_dir_is_that_file_and_no_other() {
        let root = tempfile::tempdir().expect("temp dir");
        let config_dir = root.path().join("cfg");
        fs_err::create_dir_all(&config_dir).expect("mkdir");
        fs_err::write(root.path().join("motd"), "outside").expect("write");
        fs_err::write(config_dir.join("motd"), "decoy").expect("write");
        fs_err::write(
            config_dir.join("cfg.yaml"),
            "os:\n  additionalFiles:\n    ../motd: /etc/motd\n    motd: /etc/decoy\n",
        )
        .expect("write");
        // Given as a relative path with `..`, as a user in another directory would.
        let config_path = config_dir.join("../cfg/cfg.yaml");
        let loaded = load_and_validate(&config_path, &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{errors}"));
        let plan = disk_plan(
            &loaded.config,
            &HostFacts::for_tests(&loaded.dir),
            &gathered(&loaded.config, &loaded.dir, &[]),
        )
        .expect("plan");
        let copies = &plan.request.customization.os.additional_files;
        let outside_guest = outside_guest_path(&root.path().join("motd"));
        assert!(outside_guest.starts_with("/work/files/"), "{outside_guest}");
        assert_eq!(copies[0].source, FileSource::Path(outside_guest.clone()));
        assert_eq!(
            copies[1].source,
            FileSource::Path("/work/config/motd".into())
        );
        let upload = |guest: &str| {
            plan.uploads
                .iter()
                .find(|upload| upload.guest == guest)
                .map(|upload| fs_err::read_to_string(&upload.local).expect("read"))
        };
        assert_eq!(upload(&outside_guest).as_deref(), Some("outside"));
        assert_eq!(upload("/work/config/motd").as_deref(), Some("decoy"));
    }

    /// The plan decides from what was gathered and touches no file: here every path it is
    /// given is one that does not exist.
    #[test]
    fn the_plan_reads_nothing_and_enforces_the_limits_on_gathered_sizes() {
        let nowhere = Path::new("/nonexistent/vmic-plan-test");
        let config: Config = serde_saphyr::from_str(
            "os:\n  users:\n  - name: alice\n    sshPublicKeyPaths: [a.pub]\n  \
             - name: bob\n    password:\n      type: plain-text\n      value: hunter2\n  \
             packages:\n    installLists: [l.yaml]\n",
        )
        .expect("config");
        let file = |relative: &str, size: u64| Listed {
            relative: PathBuf::from(relative),
            local: nowhere.join(relative),
            size,
            mode: 0o600,
        };
        let mut files = HostFiles {
            config_dir: vec![
                file("a.pub", 10),
                file("huge.img", UNREFERENCED_FILE_LIMIT + 1),
            ],
            package_sources: vec![SourceFiles::File(file("extra.repo", 5))],
            ..HostFiles::default()
        };
        files
            .texts
            .insert("a.pub".into(), "ssh-ed25519 AAAA a@x\n".into());
        files
            .texts
            .insert("l.yaml".into(), "packages: [jq]\n".into());
        let plan = disk_plan(&config, &HostFacts::for_tests(nowhere), &files).expect("plan");
        let os = &plan.request.customization.os;
        assert_eq!(os.users[0].ssh_public_keys, ["ssh-ed25519 AAAA a@x"]);
        assert_eq!(os.packages.install, ["jq"]);
        assert_eq!(
            os.packages.sources,
            [PackageSource::RepoFile(
                "/work/packages/0-extra.repo".into()
            )]
        );
        let guests: Vec<_> = plan.uploads.iter().map(|u| u.guest.as_str()).collect();
        assert_eq!(
            guests,
            ["/work/config/a.pub", "/work/packages/0-extra.repo"]
        );
        assert_eq!(plan.uploads[0].size, 10);
        assert_eq!(plan.skipped[0].0, nowhere.join("huge.img"));
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(plan.warnings[0].contains("password of bob is plain text"));

        // The total is checked on the gathered sizes: a named file of 5 GiB is refused.
        files.referenced.push(PathBuf::from("huge.img"));
        files.config_dir[1].size = 5 << 30;
        let error = disk_plan(&config, &HostFacts::for_tests(nowhere), &files)
            .expect_err("over the upload limit");
        assert!(format!("{error}").contains("huge.img"), "{error}");

        // A text the plan needs but gather did not read is a bug, said as one.
        files.texts.clear();
        let error = disk_plan(&config, &HostFacts::for_tests(nowhere), &files)
            .expect_err("nothing gathered");
        assert!(format!("{error}").contains("a vmic bug"), "{error}");
    }

    /// The config directory's unnamed files: one of exactly the per-file limit goes up, one
    /// byte more stays behind; files up to exactly the total limit go up, the next does not;
    /// named files are never left behind.
    #[test]
    fn unnamed_config_files_are_uploaded_up_to_each_limit_and_not_a_byte_more() {
        let nowhere = Path::new("/nonexistent/vmic-plan-test");
        let file = |relative: &str, size: u64| Listed {
            relative: PathBuf::from(relative),
            local: nowhere.join(relative),
            size,
            mode: 0o644,
        };
        let guests = |files: &HostFiles| {
            let mut uploads = Vec::new();
            let skipped = config_dir_uploads(files, &mut uploads);
            let uploaded: Vec<String> = uploads.into_iter().map(|u| u.guest).collect();
            let skipped: Vec<(String, String)> = skipped
                .into_iter()
                .map(|(path, why)| (path.display().to_string(), why))
                .collect();
            (uploaded, skipped)
        };

        let files = HostFiles {
            config_dir: vec![
                file("at-limit.img", UNREFERENCED_FILE_LIMIT),
                file("over-limit.img", UNREFERENCED_FILE_LIMIT + 1),
            ],
            ..HostFiles::default()
        };
        let (uploaded, skipped) = guests(&files);
        assert_eq!(uploaded, ["/work/config/at-limit.img"]);
        assert_eq!(
            skipped,
            [(
                "/nonexistent/vmic-plan-test/over-limit.img".to_string(),
                "larger than 16 MiB and not named by the config".to_string()
            )]
        );

        // 16 files of 16 MiB make the 256 MiB total exactly; one byte more is too much.
        let mut config_dir: Vec<Listed> = (0..16)
            .map(|i| file(&format!("part-{i:02}.img"), UNREFERENCED_FILE_LIMIT))
            .collect();
        config_dir.push(file("one-byte-more", 1));
        config_dir.push(file("named.yaml", UNREFERENCED_FILE_LIMIT + 1));
        let files = HostFiles {
            config_dir,
            referenced: vec![PathBuf::from("named.yaml")],
            ..HostFiles::default()
        };
        let (uploaded, skipped) = guests(&files);
        assert_eq!(uploaded.len(), 17, "{uploaded:?}");
        assert_eq!(uploaded[15], "/work/config/part-15.img");
        assert_eq!(uploaded[16], "/work/config/named.yaml");
        assert_eq!(
            skipped,
            [(
                "/nonexistent/vmic-plan-test/one-byte-more".to_string(),
                "the config directory's unnamed files exceed 256 MiB".to_string()
            )]
        );
    }

    /// The history entry is the config with every named file's sha256, SSH keys and password
    /// values redacted, absent settings absent; `imageHistory: none` sends none.
    #[test]
    fn the_image_history_entry_hashes_what_the_config_names_and_redacts_secrets() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = fs_err::canonicalize(root.path()).expect("canonical");
        let write = |name: &str, text: &str| write_below(&dir, name, text);
        write("files/motd", "hello\n");
        write("scripts/s.sh", "echo hi\n");
        write("tree/a/b.txt", "b");
        let yaml = |history: &str| {
            format!(
                "os:\n{history}  additionalFiles:\n    files/motd: /etc/motd\n  additionalDirs:\n  \
                 - source: tree\n    destination: /opt\n  users:\n  - name: alice\n    \
                 sshPublicKeys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm a@x]\n    \
                 password:\n      type: plain-text\n      value: hunter2\nscripts:\n  \
                 postCustomization:\n  - path: scripts/s.sh\n"
            )
        };
        let entry = |history: &str| {
            write("cfg.yaml", &yaml(history));
            let loaded = load_and_validate(&dir.join("cfg.yaml"), &ValidationContext::default())
                .unwrap_or_else(|errors| panic!("{errors}"));
            let files = gathered(&loaded.config, &loaded.dir, &[]);
            disk_plan(&loaded.config, &HostFacts::for_tests(&loaded.dir), &files)
                .expect("plan")
                .request
                .customization
                .os
                .image_history
        };
        let written = entry("").expect("history on by default");
        assert_eq!(written.tool_version, env!("CARGO_PKG_VERSION"));
        assert!(
            !written.config_json.contains("hunter2"),
            "{}",
            written.config_json
        );
        assert!(
            !written.config_json.contains("AAAAC3"),
            "{}",
            written.config_json
        );
        assert!(
            !written.config_json.contains("null"),
            "{}",
            written.config_json
        );
        let json: Value = serde_json::from_str(&written.config_json).expect("json");
        // sha256 of "hello\n", "echo hi\n" and "b", as sha256sum prints them.
        assert_eq!(
            json["os"]["additionalFiles"][0]["sha256hash"],
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert_eq!(json["os"]["additionalFiles"][0]["destination"], "/etc/motd");
        assert_eq!(
            json["scripts"]["postCustomization"][0]["sha256hash"],
            sha256_text("echo hi\n")
        );
        assert_eq!(
            json["os"]["additionalDirs"][0]["sha256hashmap"]["a/b.txt"],
            sha256_text("b")
        );
        assert_eq!(json["os"]["users"][0]["sshPublicKeys"], REDACTED);
        assert_eq!(json["os"]["users"][0]["password"]["value"], REDACTED);
        assert_eq!(json["os"]["users"][0]["password"]["type"], "plain-text");

        assert_eq!(entry("  imageHistory: none\n"), None);
    }

    fn sha256_text(text: &str) -> String {
        hex::encode(vmic_protocol::sha256(text.as_bytes()))
    }
}
