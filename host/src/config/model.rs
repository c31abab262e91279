//! The config file as the user wrote it: serde + schemars types with the Azure Linux Image
//! Customizer's (AzL-IC) camelCase field names.
//!
//! Every struct denies unknown keys. Two fields accept more than one syntax and normalize to one
//! model type, so configs written either way compare equal: `additionalFiles` (list or map
//! form, see [`AdditionalFiles`]) and `extraCommandLine` (string or list, see [`KernelArgs`]).

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The input image (`--image-file` overrides it).
    pub input: Option<Input>,
    /// Disk layout changes (not possible with ISO output).
    pub storage: Option<Storage>,
    /// Settings of the LiveOS ISO itself (only with ISO output).
    pub iso: Option<Iso>,
    /// Customizations applied inside the image's root file system.
    pub os: Option<Os>,
    /// Scripts run chrooted inside the image.
    pub scripts: Option<Scripts>,
    /// PXE boot artifacts (for the `pxe-dir`/`pxe-tar` output formats).
    pub pxe: Option<Pxe>,
    /// AzL-IC preview features to enable; gated settings are refused without theirs.
    pub preview_features: Option<Vec<PreviewFeature>>,
    /// The output image (`--output-image-file`/`--output-image-format` override it).
    pub output: Option<Output>,
    /// Configs this one inherits from (preview feature `base-configs`), paths relative to this
    /// file's directory; see [`super::chain`].
    pub base_configs: Option<Vec<BaseConfig>>,
}

/// AzL-IC's preview feature names (`previewfeaturetype.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PreviewFeature {
    Uki,
    OutputArtifacts,
    InjectFiles,
    ReinitializeVerity,
    PackageSnapshotTime,
    KdumpBootFiles,
    PreviewDistroVersion,
    BaseConfigs,
    InputImageOci,
    OutputSelinuxPolicy,
    Btrfs,
    Create,
    UnsupportedDistroVersion,
    ToolsDir,
    RemovePackageManager,
}

impl PreviewFeature {
    pub fn name(self) -> &'static str {
        match self {
            PreviewFeature::Uki => "uki",
            PreviewFeature::OutputArtifacts => "output-artifacts",
            PreviewFeature::InjectFiles => "inject-files",
            PreviewFeature::ReinitializeVerity => "reinitialize-verity",
            PreviewFeature::PackageSnapshotTime => "package-snapshot-time",
            PreviewFeature::KdumpBootFiles => "kdump-boot-files",
            PreviewFeature::PreviewDistroVersion => "preview-distro-version",
            PreviewFeature::BaseConfigs => "base-configs",
            PreviewFeature::InputImageOci => "input-image-oci",
            PreviewFeature::OutputSelinuxPolicy => "output-selinux-policy",
            PreviewFeature::Btrfs => "btrfs",
            PreviewFeature::Create => "create",
            PreviewFeature::UnsupportedDistroVersion => "unsupported-distro-version",
            PreviewFeature::ToolsDir => "tools-dir",
            PreviewFeature::RemovePackageManager => "remove-package-manager",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseConfig {
    /// The base config file, relative to the directory of the file that names it.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pxe {
    /// Files copied next to the PXE boot files.
    pub additional_files: Option<AdditionalFiles>,
    /// Kernel arguments appended to every boot entry of the PXE grub.cfg.
    pub kernel_command_line: Option<KernelCommandLine>,
    pub initramfs_type: Option<InitramfsType>,
    /// URL of the directory the bootstrap initrd fetches the ISO from (exclusive with
    /// `bootstrapFileUrl`).
    pub bootstrap_base_url: Option<String>,
    /// URL of the ISO the bootstrap initrd fetches.
    pub bootstrap_file_url: Option<String>,
    pub kdump_boot_files: Option<KdumpBootFiles>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Input {
    pub image: Option<InputImage>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputImage {
    /// Path of the input image, relative to the config file's directory.
    pub path: Option<String>,
    /// An OCI artifact holding the image (preview feature `input-image-oci`).
    pub oci: Option<OciImage>,
    /// An Azure Linux marketplace image by version and variant.
    pub azure_linux: Option<AzureLinuxImage>,
}

/// `oci: URI` or `oci: {uri, platform}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum OciImage {
    Uri(String),
    Full(OciImageFields),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OciImageFields {
    pub uri: Option<String>,
    pub platform: Option<OciPlatform>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OciPlatform {
    pub os: Option<String>,
    pub architecture: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AzureLinuxImage {
    /// `MAJOR.MINOR` or `MAJOR.MINOR.DATE`.
    pub version: Option<String>,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Output {
    pub image: Option<OutputImage>,
    /// Extra build artifacts (AzL-IC preview feature `output-artifacts`).
    pub artifacts: Option<OutputArtifacts>,
    /// Directory to copy the image's SELinux policy to (preview feature
    /// `output-selinux-policy`).
    pub selinux_policy_path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputImage {
    /// Output file, relative to the config file's directory.
    pub path: Option<String>,
    pub format: Option<ImageFormat>,
    /// Settings of the `cosi` format.
    pub cosi: Option<CosiConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CosiConfig {
    pub compression: Option<CosiCompression>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CosiCompression {
    /// zstd level.
    pub level: Option<i64>,
}

/// Output image formats, spelled as on the AzL-IC command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    Iso,
    Raw,
    Qcow2,
    Vhd,
    VhdFixed,
    Vhdx,
    Cosi,
    PxeDir,
    PxeTar,
    BaremetalImage,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Iso => "iso",
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vhd",
            ImageFormat::VhdFixed => "vhd-fixed",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Cosi => "cosi",
            ImageFormat::PxeDir => "pxe-dir",
            ImageFormat::PxeTar => "pxe-tar",
            ImageFormat::BaremetalImage => "baremetal-image",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputArtifacts {
    pub items: Option<Vec<OutputArtifactsItem>>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OutputArtifactsItem {
    Ukis,
    UkiAddons,
    Shim,
    Bootloader,
    VerityHash,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Storage {
    pub boot_type: Option<BootType>,
    pub disks: Option<Vec<Disk>>,
    pub filesystems: Option<Vec<FileSystem>>,
    pub verity: Option<Vec<Verity>>,
    pub reset_partitions_uuids_type: Option<ResetPartitionsUuidsType>,
    /// Recompute the image's existing verity hashes (preview feature `reinitialize-verity`).
    pub reinitialize_verity: Option<ReinitializeVerity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BootType {
    Efi,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReinitializeVerity {
    None,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResetPartitionsUuidsType {
    ResetAll,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    pub partition_table_type: Option<String>,
    pub max_size: Option<String>,
    pub partitions: Option<Vec<Partition>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Partition {
    pub id: Option<String>,
    pub label: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub size: Option<String>,
    #[serde(rename = "type")]
    pub partition_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSystem {
    pub device_id: Option<String>,
    #[serde(rename = "type")]
    pub filesystem_type: Option<String>,
    pub mount_point: Option<MountPoint>,
    /// Subvolumes of a btrfs file system (preview feature `btrfs`).
    pub btrfs: Option<BtrfsConfig>,
}

/// `mountPoint: /path` or `mountPoint: {path, options, idType}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum MountPoint {
    Path(String),
    Full(MountPointFields),
}

impl MountPoint {
    pub fn path(&self) -> Option<&str> {
        match self {
            MountPoint::Path(path) => Some(path),
            MountPoint::Full(fields) => fields.path.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MountPointFields {
    pub path: Option<String>,
    pub options: Option<String>,
    pub id_type: Option<MountIdType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MountIdType {
    Uuid,
    PartUuid,
    PartLabel,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BtrfsConfig {
    pub subvolumes: Option<Vec<BtrfsSubvolume>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BtrfsSubvolume {
    /// Relative to the file system's root, e.g. `home` or `var/log`.
    pub path: Option<String>,
    pub mount_point: Option<MountPoint>,
    pub quota: Option<BtrfsQuota>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BtrfsQuota {
    /// A disk size such as `10G`.
    pub referenced_limit: Option<String>,
    pub exclusive_limit: Option<String>,
}

/// A partition named by its GPT label.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentifiedPartition {
    pub id_type: Option<IdentifiedPartitionType>,
    pub id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IdentifiedPartitionType {
    PartLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptionOption {
    IoError,
    Ignore,
    Panic,
    Restart,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Verity {
    pub id: Option<String>,
    pub name: Option<String>,
    pub data_device_id: Option<String>,
    /// An existing partition (with `reinitializeVerity`), instead of `dataDeviceId`.
    pub data_device: Option<IdentifiedPartition>,
    pub data_device_mount_id_type: Option<MountIdType>,
    pub hash_device_id: Option<String>,
    pub hash_device: Option<IdentifiedPartition>,
    pub hash_device_mount_id_type: Option<MountIdType>,
    pub corruption_option: Option<CorruptionOption>,
    /// Signature file of the root hash (needs preview feature `output-artifacts`).
    pub hash_signature_path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Iso {
    /// Files copied onto the ISO file system (not into the rootfs).
    pub additional_files: Option<AdditionalFiles>,
    /// Kernel arguments appended last to every boot entry of the ISO.
    pub kernel_command_line: Option<KernelCommandLine>,
    pub initramfs_type: Option<InitramfsType>,
    pub kdump_boot_files: Option<KdumpBootFiles>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InitramfsType {
    Bootstrap,
    FullOs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KdumpBootFiles {
    None,
    Keep,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelCommandLine {
    /// Extra kernel arguments: a list, or one string split at whitespace outside quotes.
    pub extra_command_line: Option<KernelArgs>,
}

/// Kernel arguments, one per entry, whichever syntax the user wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[schemars(with = "KernelArgsSyntax")]
pub struct KernelArgs(pub Vec<String>);

/// The two spellings of `extraCommandLine`.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum KernelArgsSyntax {
    /// One string, split at whitespace outside quotes.
    Line(String),
    /// One argument per entry.
    List(Vec<String>),
}

/// Written back as the list form.
impl Serialize for KernelArgs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for KernelArgs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match KernelArgsSyntax::deserialize(deserializer)? {
            KernelArgsSyntax::Line(line) => KernelArgs(split_kernel_args(&line)),
            KernelArgsSyntax::List(list) => KernelArgs(list),
        })
    }
}

/// Split a kernel command line at ASCII whitespace outside single or double quotes; the quotes
/// stay in the argument because grub and the kernel interpret them, not vmic.
pub fn split_kernel_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for character in line.chars() {
        match quote {
            Some(open) if character == open => {
                quote = None;
                current.push(character);
            }
            Some(_) => current.push(character),
            None if character == '"' || character == '\'' => {
                quote = Some(character);
                current.push(character);
            }
            None if character.is_ascii_whitespace() => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            None => current.push(character),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

/// Files to copy, normalized from either the list form
/// (`[{source|content, destination, permissions}]`) or the map form
/// (`{ "relative/source": "/destination" }`, whose values may also be `{path, permissions}` or
/// a list of those, as in AzL-IC's older syntax).
#[derive(Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[schemars(with = "AdditionalFilesSyntax")]
pub struct AdditionalFiles(pub Vec<AdditionalFile>);

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdditionalFile {
    /// Source file, relative to the config file's directory. Exclusive with `content`.
    pub source: Option<String>,
    /// The file's contents. Exclusive with `source`.
    pub content: Option<String>,
    /// Absolute destination path.
    pub destination: Option<String>,
    /// Octal permissions as a string, e.g. "0644".
    pub permissions: Option<String>,
}

/// The two spellings of `additionalFiles`.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum AdditionalFilesSyntax {
    /// `- {source|content, destination, permissions}`
    List(Vec<AdditionalFile>),
    /// `source: destination`
    Map(AdditionalFilesMap),
}

/// The map form, in the order written (a sorted map would reorder the entries and make the
/// two syntaxes compare unequal).
struct AdditionalFilesMap(Vec<(String, MapDestinations)>);

impl JsonSchema for AdditionalFilesMap {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AdditionalFilesMap".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        BTreeMap::<String, MapDestinations>::json_schema(generator)
    }
}

impl<'de> Deserialize<'de> for AdditionalFilesMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor;
        impl<'de> Visitor<'de> for OrderedVisitor {
            type Value = AdditionalFilesMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from source file to destination")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(AdditionalFilesMap(entries))
            }
        }
        deserializer.deserialize_map(OrderedVisitor)
    }
}

/// A map-form value: one destination path, one `{path, permissions}`, or a list of those.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum MapDestinations {
    One(MapDestination),
    Many(Vec<MapDestination>),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum MapDestination {
    Path(String),
    File(FileConfig),
}

/// AzL-IC's older per-destination settings in the map form.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    path: Option<String>,
    permissions: Option<String>,
}

impl MapDestination {
    fn into_file(self, source: &str) -> AdditionalFile {
        let (destination, permissions) = match self {
            MapDestination::Path(path) => (Some(path), None),
            MapDestination::File(file) => (file.path, file.permissions),
        };
        AdditionalFile {
            source: Some(source.to_owned()),
            content: None,
            destination,
            permissions,
        }
    }
}

/// Written back as the list form, whichever form was read.
impl Serialize for AdditionalFiles {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AdditionalFiles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match AdditionalFilesSyntax::deserialize(deserializer)? {
            AdditionalFilesSyntax::List(list) => AdditionalFiles(list),
            AdditionalFilesSyntax::Map(map) => {
                let mut files = Vec::new();
                for (source, destinations) in map.0 {
                    match destinations {
                        MapDestinations::One(one) => files.push(one.into_file(&source)),
                        MapDestinations::Many(many) => {
                            files.extend(many.into_iter().map(|one| one.into_file(&source)))
                        }
                    }
                }
                AdditionalFiles(files)
            }
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Os {
    /// Host name: DNS labels (letters, digits, hyphens) separated by dots.
    pub hostname: Option<String>,
    pub packages: Option<Packages>,
    /// Files copied into the root file system.
    pub additional_files: Option<AdditionalFiles>,
    pub additional_dirs: Option<Vec<AdditionalDir>>,
    pub users: Option<Vec<User>>,
    pub groups: Option<Vec<Group>>,
    pub services: Option<Services>,
    pub modules: Option<Vec<Module>>,
    /// Kernel arguments added to the image's boot entries.
    pub kernel_command_line: Option<KernelCommandLine>,
    pub selinux: Option<Selinux>,
    pub bootloader: Option<Bootloader>,
    pub overlays: Option<Vec<Overlay>>,
    pub uki: Option<Uki>,
    pub image_history: Option<ImageHistory>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Packages {
    pub update_existing_packages: Option<bool>,
    pub install: Option<Vec<String>>,
    pub remove: Option<Vec<String>>,
    pub update: Option<Vec<String>>,
    /// YAML files with a `packages:` list, relative to the config file's directory.
    pub install_lists: Option<Vec<String>>,
    pub remove_lists: Option<Vec<String>>,
    pub update_lists: Option<Vec<String>>,
    /// Only packages published before this time: `YYYY-MM-DD` or RFC 3339 (preview feature
    /// `package-snapshot-time`).
    pub snapshot_time: Option<String>,
    /// Remove the package manager at the end (preview feature `remove-package-manager`).
    pub remove_package_manager: Option<bool>,
}

impl Packages {
    /// Whether the section asks for any package work at all (a list file may still turn out
    /// empty).
    pub fn asks_for_anything(&self) -> bool {
        self.update_existing_packages == Some(true)
            || [
                &self.install,
                &self.remove,
                &self.update,
                &self.install_lists,
                &self.remove_lists,
                &self.update_lists,
            ]
            .iter()
            .any(|list| list.as_ref().is_some_and(|list| !list.is_empty()))
    }
}

/// A `*Lists` file: YAML with a `packages:` list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageList {
    packages: Vec<String>,
}

/// The package names of a `*Lists` file, or why it is not one.
pub fn parse_package_list(text: &str) -> Result<Vec<String>, String> {
    let list: PackageList = serde_saphyr::from_str(text).map_err(|error| {
        // The parser's message ends with a source snippet; its first line says what is wrong.
        let error = error.to_string();
        let first = error
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        format!("not a package list (expected `packages: [name, ...]`): {first}")
    })?;
    if let Some(index) = list.packages.iter().position(|name| name.trim().is_empty()) {
        return Err(format!("packages[{index}] is an empty package name"));
    }
    Ok(list.packages)
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdditionalDir {
    pub source: Option<String>,
    pub destination: Option<String>,
    pub new_dir_permissions: Option<String>,
    pub merged_dir_permissions: Option<String>,
    pub child_file_permissions: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    pub name: Option<String>,
    pub uid: Option<u32>,
    pub password: Option<Password>,
    pub password_expires_days: Option<i64>,
    pub ssh_public_key_paths: Option<Vec<String>>,
    pub ssh_public_keys: Option<Vec<String>>,
    pub primary_group: Option<String>,
    pub secondary_groups: Option<Vec<String>>,
    pub startup_command: Option<String>,
    pub home_directory: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Password {
    #[serde(rename = "type")]
    pub password_type: Option<PasswordType>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PasswordType {
    Locked,
    PlainText,
    Hashed,
    PlainTextFile,
    HashedFile,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Group {
    pub name: Option<String>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Services {
    pub enable: Option<Vec<String>>,
    pub disable: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Module {
    pub name: Option<String>,
    pub load_mode: Option<ModuleLoadMode>,
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleLoadMode {
    Always,
    Auto,
    Disable,
    Inherit,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selinux {
    pub mode: Option<SelinuxMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SelinuxMode {
    Disabled,
    Permissive,
    Enforcing,
    ForceEnforcing,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bootloader {
    pub reset_type: Option<BootloaderResetType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BootloaderResetType {
    HardReset,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Overlay {
    pub lower_dirs: Option<Vec<String>>,
    pub upper_dir: Option<String>,
    pub work_dir: Option<String>,
    pub mount_point: Option<String>,
    pub is_initrd_overlay: Option<bool>,
    pub mount_dependencies: Option<Vec<String>>,
    pub mount_options: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Uki {
    pub mode: Option<UkiMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UkiMode {
    Create,
    Passthrough,
    Modify,
}

/// `none`: do not write `/usr/share/image-customizer/history.json` into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ImageHistory {
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scripts {
    pub post_customization: Option<Vec<Script>>,
    pub finalize_customization: Option<Vec<Script>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Script {
    /// Script file inside the config file's directory. Exclusive with `content`.
    pub path: Option<String>,
    /// Inline script. Exclusive with `path`.
    pub content: Option<String>,
    /// Program that runs the script (default `/bin/sh`).
    pub interpreter: Option<String>,
    pub arguments: Option<Vec<String>>,
    pub environment_variables: Option<BTreeMap<String, String>>,
    /// Name shown in logs.
    pub name: Option<String>,
}
