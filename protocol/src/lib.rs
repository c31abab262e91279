//! The wire contract between the vmic host and its guest agent: message types and framing.
//!
//! Pure types and codec: no sockets, no policy. Both sides link this crate, so a message type
//! lives here and nowhere else.
//!
//! # Frames
//! Every message is one frame: a 4-byte little-endian body length, then the body, a postcard
//! encoding of [`HostMessage`] or [`GuestMessage`]. Bodies over [`MAX_FRAME_LEN`] are refused
//! on both ends; variant 0 of each message enum is `Invalid`, so a zeroed frame is an error.
//!
//! # Sequence
//! ```text
//!  host                                   agent (PID 1 in the builder VM)
//!   |  <── connect (vsock port / serial) ──>  |
//!   |  <──────── GuestMessage::Hello ──────── |  protocol_version, agent_version, arch, kernel
//!   |  ──────── HostMessage::Hello ─────────> |  + the per-build token from fw_cfg: a wrong one
//!   |                                         |  is refused (version outside the range: host fails)
//!   |  ──── Request { id: 1, Exec } ────────> |
//!   |  <─── Event { id: 1, Output/Log } ───── |  any number, while the request runs
//!   |  ──── Cancel { id: 1 } ───────────────> |  optional: the agent stops the request
//!   |  <─── Response { id: 1, result } ────── |  exactly one per request
//!   |  ──── Request { id: 2, ListDisks } ───> |
//!   |  <─── Response { id: 2, Disks } ─────── |  kernel name, virtio serial, size of each disk
//!   |  ──── Request { id: 3, MountScratch } ─>|  serial + directory
//!   |  <─── Response { id: 3, Done } ──────── |  the agent formatted and mounted that disk
//!   |  ──── Request { id: 4, PutFile } ─────> |  (uploads land on the scratch disk)
//!   |  ──── Data { id: 4, chunk } ... ──────> |  file content, then DataEnd with its sha256
//!   |  ──── DataEnd { id: 4, sha256 } ──────> |
//!   |  <─── Response { id: 4, File } ──────── |  the agent checked size and sha256
//!   |  ──── Request { id: 5, BuildIso } ────> |  or CustomizeDisk: one whole build
//!   |  <─── Event { id: 5, Progress } ─────── |  Progress { step: Step, 0, 0 } starts a Step;
//!   |  <─── Event { id: 5, Progress } ─────── |  done/total > 0 is progress within it
//!   |  <─── Event { id: 5, Log/Output } ───── |  any number, in between
//!   |  ──── Cancel { id: 5 } ───────────────> |  optional: the build stops at the next check
//!   |  <─── Response { id: 5, Iso/Disk } ──── |  IsoOutcome / DiskOutcome, each Step's time
//!   |  ──── Request { id: 6, GetFile } ─────> |
//!   |  <─── Data { id: 6 } ... DataEnd ────── |  the host checks the sha256
//!   |  <─── Response { id: 6, File } ──────── |
//!   |  ──── Request { id: 7, Inspect } ─────> |  `vmic inspect`: serial of the disk
//!   |  <─── Response { id: 7, Inspection } ── |  partitions, OS, boot files, packages, verdict
//!   |  ──── Shutdown ───────────────────────> |  the agent syncs and powers off
//!   |  <─── Fatal (any time) ──────────────── |  panic or fatal error, then power-off
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of this contract. Every wire change bumps it in the same commit.
pub const PROTOCOL_VERSION: u32 = 8;
/// Oldest version the host still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 8;
/// Hard cap on a frame body: bounds memory on both ends whatever the peer sends.
pub const MAX_FRAME_LEN: usize = 2 << 20;
/// File data per [`HostMessage::Data`] / [`GuestMessage::Data`] frame.
pub const CHUNK_LEN: usize = 1 << 20;
// A full chunk and its framing fit one frame, and a chunk is large enough to stream with.
const _: () = assert!(MAX_FRAME_LEN >= 2 * CHUNK_LEN && CHUNK_LEN >= 64 << 10);
/// vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port the agent opens.
pub const SERIAL_PORT_NAME: &str = "org.vmic.agent.0";
/// The console line the agent prints once its channel listens (followed by the channel's
/// name): from then on, a connection the host makes must reach it.
pub const AGENT_LISTENING_LINE: &str = "vmic-agent: waiting for the host on the";

pub type RequestId = u64;
pub type Sha256 = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Never sent: keeps variant 0 (an all-zero body) invalid.
    Invalid,
    Hello(HostHello),
    Request {
        id: RequestId,
        request: Request,
    },
    Cancel {
        id: RequestId,
    },
    Data {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
    },
    DataEnd {
        id: RequestId,
        sha256: Sha256,
    },
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// Never sent: keeps variant 0 (an all-zero body) invalid.
    Invalid,
    Hello(GuestHello),
    Response {
        id: RequestId,
        result: Result<Response, RemoteError>,
    },
    Event {
        id: Option<RequestId>,
        event: Event,
    },
    Data {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
    },
    DataEnd {
        id: RequestId,
        sha256: Sha256,
    },
    /// The agent hit a panic or a fatal error and is powering the VM off.
    Fatal(RemoteError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHello {
    pub protocol_version: u32,
    pub agent_version: String,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// `uname -r` of the builder VM's kernel.
    pub kernel: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    pub protocol_version: u32,
    pub host_version: String,
    /// The per-build secret the host handed the VM out of band (fw_cfg [`TOKEN_FW_CFG_NAME`]):
    /// proves that this host started the VM, so another local process cannot drive the agent.
    pub token: String,
}

/// Host vsock port of vmic's HTTP/HTTPS proxy, the builder VM's only way out.
pub const PROXY_VSOCK_PORT: u32 = 3128;
/// Where the agent relays it inside the builder VM (what apt and dnf are pointed at).
pub const PROXY_GUEST_ADDRESS: &str = "127.0.0.1:3128";

/// fw_cfg item name of the per-build token (`-fw_cfg name=opt/vmic/token,file=…`).
pub const TOKEN_FW_CFG_NAME: &str = "opt/vmic/token";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Invalid,
    Ping,
    /// Run a program (explicit argv, never a shell string).
    Exec(ExecRequest),
    /// Receive a file: the host sends `Data` chunks then `DataEnd` with this id.
    PutFile {
        path: String,
        mode: u32,
        size: u64,
    },
    /// Send a file: the agent replies with `Data` chunks, `DataEnd`, then `Response::File`.
    GetFile {
        path: String,
    },
    /// List the virtio disks with their serial strings.
    ListDisks,
    /// Format the virtio disk with this serial (its content is lost) and mount it at `path`,
    /// the work directory of the build requests and the target of uploads.
    MountScratch {
        serial: String,
        path: String,
    },
    /// Run the whole disk/ISO → LiveOS ISO pipeline; progress arrives as events.
    BuildIso(Box<IsoBuild>),
    /// Customize a disk image in place (writes land in the host's overlay, which the host
    /// then converts to the output format).
    CustomizeDisk(Box<DiskBuild>),
    /// Describe the disk with this serial (`vmic inspect`); writes a mount makes land in the
    /// host's overlay.
    Inspect {
        input_serial: String,
    },
}

/// Everything the agent needs to customize a disk image in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBuild {
    /// virtio serial of the input disk (through its writable overlay).
    pub input_serial: String,
    pub work_dir: String,
    pub customization: Customization,
}

/// What is done to the mounted image, for either output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customization {
    /// Guest directory holding the uploaded config directory (read-only at `/_imageconfigs`).
    pub config_dir: String,
    pub os: OsCustomization,
    pub post_customization: Vec<Script>,
    pub finalize_customization: Vec<Script>,
}

/// What a disk customization did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOutcome {
    pub steps: Vec<StepTime>,
    /// The packages in the customized image, from its own package database.
    pub packages: PackageInventory,
}

/// Everything the agent needs to turn the input into a LiveOS ISO. Paths of config files are
/// guest paths under `config_dir`, where the host uploaded them beforehand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoBuild {
    /// virtio serial of the input disk (a disk image through its overlay, or a vmic ISO).
    pub input_serial: String,
    pub input_is_iso: bool,
    /// virtio serial of the raw disk the ISO is written to, from offset 0.
    pub output_serial: String,
    /// Guest directory for work files (the scratch disk of [`Request::MountScratch`]).
    pub work_dir: String,
    pub customization: Customization,
    pub iso: IsoSettings,
    pub squashfs: SquashfsSettings,
    /// Only `iso.*` changed on an ISO input: re-master without rebuilding `rootfs.img`.
    pub remaster_only: bool,
    /// With `remaster_only`: the input ISO's recorded `iso.*` settings (kernel args, additional
    /// files) are replaced by this request's instead of kept. The host's build cache uses it:
    /// the cached ISO was built with another `iso` section.
    pub replace_iso_settings: bool,
    /// With `remaster_only`: the host has checked the whole input ISO against a digest it
    /// recorded itself (its build cache), so the agent need not check the `rootfs.img` it
    /// keeps against the ISO's record. Never set for an ISO the user gives.
    pub input_checked_by_host: bool,
    /// `SOURCE_DATE_EPOCH`: every timestamp in the ISO is clamped to it. `None`: the agent
    /// takes it from the input (see [`IsoOutcome::source_date_epoch`]).
    pub source_date_epoch: Option<u64>,
    /// PXE artifacts instead of an ISO: the agent writes them to the output disk as one tar
    /// stream (see [`PxeSettings`]); `iso` then carries the `pxe.*` settings.
    pub pxe: Option<PxeSettings>,
}

/// How the LiveOS boots its root (`iso.initramfsType` / `pxe.initramfsType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitramfsType {
    /// Never sent: keeps variant 0 invalid.
    Invalid,
    /// A dracut initrd that finds `rootfs.img` (squashfs) and switches to it.
    Bootstrap,
    /// The whole OS is the initrd; no squashfs, no `root=`.
    FullOs,
}

/// What a PXE output adds to the LiveOS build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PxeSettings {
    /// Bootstrap only: where the booted initrd fetches the ISO (`root=live:<url>`).
    pub bootstrap_url: Option<String>,
    /// Bootstrap only: the ISO's file name at the artifacts' root.
    pub bootstrap_file_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsCustomization {
    pub hostname: Option<String>,
    pub additional_files: Vec<FileCopy>,
    pub kernel_args: Vec<String>,
    pub packages: PackageChanges,
    pub additional_dirs: Vec<DirCopy>,
    pub groups: Vec<GroupSpec>,
    pub users: Vec<UserSpec>,
    pub services: ServiceChanges,
    pub modules: Vec<ModuleSpec>,
    /// Disk outputs only (the ISO always boots with `selinux=0`).
    pub selinux_mode: Option<SelinuxMode>,
    /// The entry appended to the image's `/usr/share/image-customizer/history.json`; `None`
    /// with `os.imageHistory: none`.
    pub image_history: Option<ImageHistoryEntry>,
    /// `os.bootloader.resetType`: the image's boot loader configuration is written anew
    /// (before `kernel_args` and `selinux_mode` are applied to it).
    pub bootloader_reset: Option<BootloaderReset>,
}

/// How `os.bootloader.resetType` resets the boot loader configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootloaderReset {
    /// A new grub.cfg with one entry per installed kernel and only the root argument: every
    /// kernel argument the base image had is gone.
    HardReset,
}

/// What the host knows of an Image Customizer history entry; the agent adds the timestamp (the
/// build's `SOURCE_DATE_EPOCH`) and the image UUID (derived from the entry: reproducible).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHistoryEntry {
    pub tool_version: String,
    /// The config as JSON: secrets redacted, sha256 of every file it names added.
    pub config_json: String,
}

/// `os.packages`, with the `*Lists` files already read by the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChanges {
    pub update_existing: bool,
    pub remove: Vec<String>,
    pub install: Vec<String>,
    pub update: Vec<String>,
    /// Extra package sources uploaded by the host (`--package-source`).
    pub sources: Vec<PackageSource>,
    /// Use only `sources`, not the repositories the image is configured with.
    pub disable_base_repos: bool,
    /// The VM has a user-mode NIC for the image's own repositories.
    pub network: bool,
}

impl PackageChanges {
    pub fn is_empty(&self) -> bool {
        !self.update_existing
            && self.remove.is_empty()
            && self.install.is_empty()
            && self.update.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PackageSource {
    /// A guest directory holding package files (.deb or .rpm).
    Directory(String),
    /// A guest path of a repository definition (apt `.list`/`.sources`, dnf `.repo`).
    RepoFile(String),
}

/// `os.additionalDirs`: a directory tree copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirCopy {
    /// Guest path of the uploaded source directory.
    pub source: String,
    /// Absolute path in the image.
    pub destination: String,
    /// Mode of directories the copy creates.
    pub new_dir_permissions: Option<u32>,
    /// Mode set on directories that already existed.
    pub merged_dir_permissions: Option<u32>,
    /// Mode of every copied file.
    pub child_file_permissions: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    pub name: String,
    pub uid: Option<u32>,
    pub password: Option<PasswordSpec>,
    pub password_expires_days: Option<i64>,
    /// Public keys, those of `sshPublicKeyPaths` already read by the host.
    pub ssh_public_keys: Vec<String>,
    pub primary_group: Option<String>,
    pub secondary_groups: Vec<String>,
    pub startup_command: Option<String>,
    pub home_directory: Option<String>,
}

/// A user's password; `*-file` variants were read by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PasswordSpec {
    Locked,
    /// A crypt(3) hash, written as is.
    Hashed(String),
    /// Hashed by the agent (SHA-512 crypt) before it is written.
    PlainText(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChanges {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSpec {
    pub name: String,
    pub load_mode: ModuleLoadMode,
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleLoadMode {
    /// Loaded at every boot (`modules-load.d`).
    Always,
    /// Loaded when hardware asks for it (remove from `modules-load.d`, un-blacklist).
    Auto,
    /// Never loaded automatically (`blacklist NAME` in `modprobe.d`).
    Disable,
    /// Leave the load configuration alone (options only).
    Inherit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelinuxMode {
    Disabled,
    Permissive,
    Enforcing,
    ForceEnforcing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoSettings {
    /// ISO 9660 volume label; the live root is found by it.
    pub label: String,
    pub additional_files: Vec<FileCopy>,
    /// Appended last to every boot entry.
    pub extra_args: Vec<String>,
    /// The host's vmic version, recorded on the ISO.
    pub vmic_version: String,
    pub initramfs: InitramfsType,
    /// `kdumpBootFiles: keep`: the kdump kernel and initramfs stay under the full OS's `/boot`.
    pub keep_kdump_boot_files: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquashfsSettings {
    pub compression: Compression,
    pub threads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCopy {
    pub source: FileSource,
    /// Absolute path in the target (rootfs or ISO file system).
    pub destination: String,
    pub permissions: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileSource {
    /// A guest path (under the uploaded config directory).
    Path(String),
    Content(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Script {
    /// Name shown in progress and errors.
    pub name: String,
    /// Path relative to the config directory, or inline content.
    pub source: FileSource,
    pub interpreter: Option<String>,
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
}

/// The squashfs compressor the user asked for (`--squashfs-compression`), checked on the host
/// and resolved by the agent (`Auto` depends on what the image's kernel reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Compression {
    #[default]
    Auto,
    /// Level 1-22; `None`: mksquashfs' default.
    Zstd {
        level: Option<u8>,
    },
    Xz,
    /// Level 1-9; `None`: mksquashfs' default.
    Gzip {
        level: Option<u8>,
    },
    Lz4,
}

impl Compression {
    /// Parse `auto`, `zstd[:N]`, `xz`, `gzip[:N]` or `lz4`; the error says what is allowed.
    pub fn parse(value: &str) -> Result<Compression, String> {
        let (name, level) = match value.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (value, None),
        };
        let range = match name {
            "zstd" => Some(1..=22),
            "gzip" => Some(1..=9),
            "auto" | "xz" | "lz4" => None,
            _ => {
                return Err(format!(
                    "unknown compressor {name}; use zstd[:LEVEL], xz, gzip[:LEVEL] or lz4"
                ))
            }
        };
        let level = match (level, range) {
            (None, _) => None,
            (Some(level), None) => return Err(format!("bad level {level}: {name} takes no level")),
            (Some(level), Some(range)) => match level.parse::<u8>() {
                Ok(number) if range.contains(&number) => Some(number),
                _ => {
                    return Err(format!(
                        "bad level {level} for {name}: use a level from {} to {}",
                        range.start(),
                        range.end()
                    ))
                }
            },
        };
        Ok(match name {
            "zstd" => Compression::Zstd { level },
            "gzip" => Compression::Gzip { level },
            "xz" => Compression::Xz,
            "lz4" => Compression::Lz4,
            _ => Compression::Auto,
        })
    }
}

/// What the agent produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoOutcome {
    /// Bytes of ISO at the start of the output disk.
    pub size: u64,
    pub sha256: Sha256,
    pub rootfs_sha256: Sha256,
    /// Wall time of each pipeline step, in order.
    pub steps: Vec<StepTime>,
    /// The `SOURCE_DATE_EPOCH` the ISO was made with (the request's, or the input's).
    pub source_date_epoch: u64,
    /// The packages in the ISO's root file system, from its own package database.
    pub packages: PackageInventory,
}

/// The installed packages of an image, as its package database lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageInventory {
    /// `None`: the image has no package database vmic reads (neither dpkg nor rpm).
    pub manager: Option<PackageManager>,
    pub packages: Vec<InstalledPackage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PackageManager {
    /// Never sent: keeps variant 0 invalid.
    Invalid,
    Dpkg,
    Rpm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The licence as the database states it (rpm `LICENSE`; dpkg: the `License:` short names
    /// of a machine-readable `/usr/share/doc/NAME/copyright`, joined with ` AND `).
    pub license: Option<String>,
    /// The source package, when the database names one that differs from `name`.
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    pub step: Step,
    /// Finite and not negative: anything else is refused when decoded.
    #[serde(deserialize_with = "seconds")]
    pub seconds: f64,
}

/// A duration the guest reports: NaN, infinities and negative times are malformed (and would
/// break equality, sums and the JSON the host writes).
fn seconds<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(deserializer)?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(serde::de::Error::custom(
            "a step time must be a finite number of seconds",
        ))
    }
}

/// A phase of a build request, as the host shows it: one `Event::Progress` with `0/0` starts
/// it, [`StepTime`]s report it. The only table of step names: the host renders these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    /// Never sent: keeps variant 0 invalid.
    Invalid,
    /// The input's file systems (per its fstab) or the input ISO.
    Mount,
    /// `os.*` settings and scripts in the mounted image.
    Customize,
    /// The LiveOS initrd (dracut) and `rootfs.img` (mksquashfs), side by side.
    MakeInitrdAndSquashfs,
    /// The ISO tree and xorriso onto the output disk.
    MakeIso,
    /// Unmounting the customized image (disk output).
    Unmount,
}

impl Step {
    /// The status word (`--timestamp-file` names steps by it).
    pub fn title(self) -> &'static str {
        match self {
            Step::Invalid => "Invalid",
            Step::Mount => "Mounting",
            Step::Customize => "Customizing",
            Step::MakeInitrdAndSquashfs => "Initrd and squashfs",
            Step::MakeIso => "Mastering",
            Step::Unmount => "Unmounting",
        }
    }

    /// What the step does, beside its title.
    pub fn detail(self) -> &'static str {
        match self {
            Step::Invalid => "",
            Step::Mount => "image partitions per /etc/fstab",
            Step::Customize => "os settings and scripts",
            Step::MakeInitrdAndSquashfs => {
                "LiveOS initrd with the image's dracut, rootfs.img beside it"
            }
            Step::MakeIso => "ISO with xorriso, onto the output disk",
            Step::Unmount => "image file systems",
        }
    }
}

// f64 has no Eq; decoded step times are never NaN (see `seconds`), so equality is reflexive.
impl Eq for StepTime {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run inside this directory as root (`chroot`), e.g. the mounted image.
    pub chroot: Option<String>,
    /// Stream stdout/stderr as `Event::Output` while running (else collect into the response).
    pub stream_output: bool,
}

impl ExecRequest {
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ExecRequest {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            chroot: None,
            stream_output: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Invalid,
    Pong,
    Exec(ExecResult),
    File {
        size: u64,
        sha256: Sha256,
    },
    Disks(Vec<DiskInfo>),
    Iso(IsoOutcome),
    Disk(DiskOutcome),
    /// A request that returns nothing else succeeded.
    Done,
    Inspection(Box<Inspection>),
}

/// Most entries of each list in an [`Inspection`]: the agent stops there (`truncated`), the
/// host refuses more.
pub const MAX_INSPECTION_ITEMS: usize = 128;

/// What `vmic inspect` learns inside the builder VM. Every string is the image's (or a tool's
/// reading of it): the host makes it inert before showing it. Field names are the JSON's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// `gpt` or `dos`; `None` for an ISO or a bare file system.
    pub partition_table: Option<String>,
    pub partitions: Vec<InspectedPartition>,
    /// The disk itself holds a file system (no partition table): an ISO 9660 volume, say.
    pub whole_disk: Option<InspectedFileSystem>,
    /// For an ISO that vmic made: its settings record.
    pub vmic_iso: Option<InspectedVmicIso>,
    /// `/etc/os-release` (or `/usr/lib/os-release`).
    pub os: Option<InspectedOs>,
    /// The machine the image's binaries are for (`x86_64`, `aarch64`, or the ELF number).
    pub architecture: Option<String>,
    /// Kernel versions: `/boot/vmlinuz-<version>` (or `/boot/vmlinuz-*` on an ISO).
    pub kernels: Vec<String>,
    /// Initrd paths under `/boot`.
    pub initrds: Vec<String>,
    pub boot_loader: InspectedBootLoader,
    pub packages: Option<InspectedPackages>,
    pub dracut: InspectedDracut,
    /// Whether `vmic customize` can make a LiveOS ISO of it, with every reason it cannot.
    pub live_os: InspectedVerdict,
    /// Some list was cut at [`MAX_INSPECTION_ITEMS`].
    pub truncated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedPartition {
    /// 1-based partition number.
    pub number: u32,
    pub size_bytes: u64,
    /// GPT partition type GUID or MBR type byte (`0x83`).
    pub type_id: Option<String>,
    pub part_uuid: Option<String>,
    pub part_label: Option<String>,
    pub file_system: Option<InspectedFileSystem>,
    /// Where the image's `/etc/fstab` mounts it.
    pub mount_point: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedFileSystem {
    /// `ext4`, `vfat`, `xfs`, `iso9660`, … (blkid's name).
    pub kind: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedOs {
    pub id: Option<String>,
    pub version_id: Option<String>,
    pub pretty_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedBootLoader {
    /// EFI binaries under `/boot` (shim, grub, fallbacks), paths inside the image.
    pub efi_binaries: Vec<String>,
    /// The shim and grub EFI binary a LiveOS ISO would boot with.
    pub shim: Option<String>,
    pub grub_efi: Option<String>,
    /// The grub config (`/boot/grub2/grub.cfg`, else `/boot/grub/grub.cfg`).
    pub grub_cfg: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedPackages {
    /// `dpkg` or `rpm`.
    pub manager: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedDracut {
    pub installed: bool,
    /// dracut's `dmsquash-live` module, which a LiveOS initrd needs.
    pub dmsquash_live: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedVerdict {
    pub possible: bool,
    /// Empty when possible; else each check the build would fail, in its words.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct InspectedVmicIso {
    pub vmic_version: String,
    pub label: String,
    pub kernel_versions: Vec<String>,
    /// Kernel arguments the user added (`iso.kernelCommandLine`).
    pub user_kernel_args: Vec<String>,
    /// `SOURCE_DATE_EPOCH` of the build.
    pub created_unix_seconds: u64,
    pub rootfs_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code; `128 + signal` when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    pub serial: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Invalid,
    Log {
        level: Level,
        message: String,
    },
    Progress {
        step: Step,
        done: u64,
        total: u64,
    },
    Output {
        stream: Stream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A failure in the guest, as a context chain, outermost first (like an `anyhow` chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub context: Vec<String>,
}

impl RemoteError {
    pub fn new(message: impl Into<String>) -> RemoteError {
        RemoteError {
            context: vec![message.into()],
        }
    }

    /// Whether this is the agent's answer to a `Cancel`.
    pub fn is_cancelled(&self) -> bool {
        self.context.first().is_some_and(|m| m == CANCELLED)
    }
}

/// First context line of the error a cancelled request ends with.
pub const CANCELLED: &str = "request cancelled";

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context.join(": "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge(usize),
    #[error("empty frame")]
    EmptyFrame,
    #[error("malformed message")]
    Malformed(#[source] postcard::Error),
    #[error("invalid message (variant 0)")]
    InvalidMessage,
    #[error("cannot encode message")]
    Encode(#[source] postcard::Error),
    #[error("channel I/O failed")]
    Io(#[from] io::Error),
}

/// Messages that can be framed; variant 0 (`Invalid`) is refused on both ends.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    fn is_invalid(&self) -> bool;
}

impl Message for HostMessage {
    fn is_invalid(&self) -> bool {
        matches!(self, HostMessage::Invalid)
            || matches!(
                self,
                HostMessage::Request {
                    request: Request::Invalid,
                    ..
                }
            )
    }
}

impl Message for GuestMessage {
    fn is_invalid(&self) -> bool {
        matches!(
            self,
            GuestMessage::Invalid
                | GuestMessage::Response {
                    result: Ok(Response::Invalid),
                    ..
                }
                | GuestMessage::Event {
                    event: Event::Invalid
                        | Event::Progress {
                            step: Step::Invalid,
                            ..
                        },
                    ..
                }
        )
    }
}

/// Encode `message` as a complete frame (length prefix + body).
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, ProtocolError> {
    let mut frame = vec![0u8; 4];
    let frame =
        postcard::to_extend(message, std::mem::take(&mut frame)).map_err(ProtocolError::Encode)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    let mut frame = frame;
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Decode a frame body (without its length prefix).
pub fn decode<M: Message>(body: &[u8]) -> Result<M, ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError::EmptyFrame);
    }
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(body.len()));
    }
    let (message, rest): (M, &[u8]) =
        postcard::take_from_bytes(body).map_err(ProtocolError::Malformed)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    if message.is_invalid() {
        return Err(ProtocolError::InvalidMessage);
    }
    Ok(message)
}

/// Parse a 4-byte length prefix, enforcing the cap before any allocation.
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    Ok(len)
}

/// Blocking read of one message; `Ok(None)` on a clean end of stream between frames.
pub fn read_message<M: Message>(reader: &mut impl Read) -> Result<Option<M>, ProtocolError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    let mut body = vec![0u8; frame_len(header)?];
    reader.read_exact(&mut body)?;
    decode(&body).map(Some)
}

/// Blocking write of one message as a single `write_all` (so frames never interleave when
/// writers share a lock).
pub fn write_message<M: Message>(
    writer: &mut impl Write,
    message: &M,
) -> Result<(), ProtocolError> {
    writer.write_all(&encode(message)?)?;
    writer.flush()?;
    Ok(())
}

/// SHA-256 helper shared by both ends of a file transfer.
pub fn sha256(data: &[u8]) -> Sha256 {
    use sha2::{Digest, Sha256 as Hasher};
    Hasher::digest(data).into()
}

/// SHA-256 of everything `reader` yields (files and disks on both ends of the hand-over).
pub fn sha256_reader(mut reader: impl Read) -> io::Result<Sha256> {
    use sha2::{Digest, Sha256 as Hasher};
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; 4 << 20];
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().into())
}

/// Hex form of a digest, for messages.
pub fn hex_digest(digest: &Sha256) -> String {
    hex::encode(digest)
}

/// `(year, month, day, hour, minute, second)` in UTC of `epoch` seconds (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`): the agent dates xorriso with it, the host
/// the provenance record, so both render one epoch the same way.
pub fn utc_civil(epoch: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = (epoch / 86_400) as i64;
    let seconds = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year as u64,
        month as u64,
        day as u64,
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(message: M) {
        let frame = encode(&message).expect("encodes");
        let mut reader = &frame[..];
        let decoded: M = read_message(&mut reader)
            .expect("decodes")
            .expect("one frame");
        assert_eq!(decoded, message);
        assert!(reader.is_empty());
    }

    #[test]
    fn messages_round_trip() {
        round_trip(HostMessage::Hello(HostHello {
            protocol_version: PROTOCOL_VERSION,
            host_version: "0.1.0".into(),
            token: "0f".repeat(32),
        }));
        round_trip(HostMessage::Request {
            id: 7,
            request: Request::Exec(ExecRequest::new(["echo", "hi"])),
        });
        round_trip(HostMessage::Data {
            id: 3,
            chunk: vec![0xab; CHUNK_LEN],
        });
        round_trip(GuestMessage::Response {
            id: 9,
            result: Err(RemoteError {
                context: vec!["mounting rootfs".into(), "ENOENT".into()],
            }),
        });
        round_trip(GuestMessage::Event {
            id: Some(1),
            event: Event::Progress {
                step: Step::MakeInitrdAndSquashfs,
                done: 5,
                total: 10,
            },
        });
        round_trip(HostMessage::Request {
            id: 2,
            request: Request::MountScratch {
                serial: "vmic-scratch".into(),
                path: "/work".into(),
            },
        });
        round_trip(GuestMessage::Response {
            id: 2,
            result: Ok(Response::Done),
        });
        round_trip(GuestMessage::Response {
            id: 4,
            result: Ok(Response::Disk(DiskOutcome {
                steps: vec![StepTime {
                    step: Step::Unmount,
                    seconds: 1.5,
                }],
                packages: PackageInventory::default(),
            })),
        });
    }

    #[test]
    fn utc_civil_dates_across_leap_years_and_centuries() {
        // Reference values from Python's datetime (UTC).
        let cases = [
            (0, (1970, 1, 1, 0, 0, 0)),
            (946_684_799, (1999, 12, 31, 23, 59, 59)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (1_700_000_000, (2023, 11, 14, 22, 13, 20)),
            (1_709_251_199, (2024, 2, 29, 23, 59, 59)),
            (4_107_542_399, (2100, 2, 28, 23, 59, 59)),
            (4_107_542_400, (2100, 3, 1, 0, 0, 0)),
            (253_402_300_799, (9999, 12, 31, 23, 59, 59)),
        ];
        for (epoch, civil) in cases {
            assert_eq!(utc_civil(epoch), civil, "{epoch}");
        }
    }

    #[test]
    fn step_times_that_are_not_a_duration_are_malformed() {
        let outcome = |seconds| GuestMessage::Response {
            id: 1,
            result: Ok(Response::Disk(DiskOutcome {
                steps: vec![StepTime {
                    step: Step::Mount,
                    seconds,
                }],
                packages: PackageInventory::default(),
            })),
        };
        round_trip(outcome(0.0));
        round_trip(outcome(12.5));
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let frame = encode(&outcome(bad)).expect("encodes");
            let decoded = decode::<GuestMessage>(&frame[4..]);
            assert!(
                matches!(decoded, Err(ProtocolError::Malformed(_))),
                "{bad}: {decoded:?}"
            );
        }
    }

    #[test]
    fn a_full_data_chunk_fits_one_frame() {
        let chunk = HostMessage::Data {
            id: u64::MAX,
            chunk: vec![0xa5; CHUNK_LEN],
        };
        round_trip(chunk);
    }

    #[test]
    fn every_step_has_its_own_title_and_a_detail() {
        let steps = [
            Step::Mount,
            Step::Customize,
            Step::MakeInitrdAndSquashfs,
            Step::MakeIso,
            Step::Unmount,
        ];
        let titles: std::collections::BTreeSet<&str> = steps.iter().map(|s| s.title()).collect();
        assert_eq!(
            titles.len(),
            steps.len(),
            "titles name steps apart: {titles:?}"
        );
        let details: std::collections::BTreeSet<&str> = steps.iter().map(|s| s.detail()).collect();
        assert_eq!(details.len(), steps.len(), "details differ: {details:?}");
        for step in steps {
            assert!(!step.title().trim().is_empty(), "{step:?}");
            assert!(!step.detail().trim().is_empty(), "{step:?}");
            assert_ne!(step.title(), step.detail(), "{step:?}");
        }
        // `--timestamp-file` and the tests name the customization step by this word.
        assert_eq!(Step::Customize.title(), "Customizing");
    }

    #[test]
    fn compression_values() {
        assert_eq!(Compression::parse("auto"), Ok(Compression::Auto));
        assert_eq!(
            Compression::parse("zstd:19"),
            Ok(Compression::Zstd { level: Some(19) })
        );
        assert_eq!(
            Compression::parse("gzip:1"),
            Ok(Compression::Gzip { level: Some(1) })
        );
        assert_eq!(Compression::parse("lz4"), Ok(Compression::Lz4));
        assert_eq!(Compression::parse("xz"), Ok(Compression::Xz));
        for bad in ["zstd:0", "zstd:23", "lz4:1", "brotli", "gzip:x", "auto:3"] {
            assert!(Compression::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn full_chunk_fits_in_a_frame() {
        let frame = encode(&GuestMessage::Data {
            id: u64::MAX,
            chunk: vec![0xff; CHUNK_LEN],
        })
        .expect("a full chunk is within the cap");
        assert!(frame.len() - 4 <= MAX_FRAME_LEN);
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        let mut reader = &header[..];
        let error = read_message::<HostMessage>(&mut reader).expect_err("too large");
        assert!(matches!(error, ProtocolError::FrameTooLarge(_)), "{error}");
        assert!(encode(&HostMessage::Data {
            id: 1,
            chunk: vec![0; MAX_FRAME_LEN],
        })
        .is_err());
    }

    #[test]
    fn zeroed_and_garbage_frames_are_refused() {
        assert!(matches!(
            decode::<HostMessage>(&[0]),
            Err(ProtocolError::InvalidMessage)
        ));
        assert!(matches!(
            decode::<GuestMessage>(&[0, 0, 0]),
            Err(ProtocolError::InvalidMessage | ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode::<GuestMessage>(&[]),
            Err(ProtocolError::EmptyFrame)
        ));
        assert!(decode::<GuestMessage>(&[200, 1, 2, 3]).is_err());
        // Event(3), Some(1) id 1, Progress(2), step 0 (Invalid), done 0, total 0.
        assert!(matches!(
            decode::<GuestMessage>(&[3, 1, 1, 2, 0, 0, 0]),
            Err(ProtocolError::InvalidMessage)
        ));
        assert!(decode::<GuestMessage>(&[3, 1, 1, 2, 1, 0, 0]).is_ok());
        // Trailing bytes after a valid message mean the peer and we disagree on the layout.
        let mut frame = encode(&HostMessage::Shutdown).expect("encodes");
        frame.push(0);
        assert!(decode::<HostMessage>(&frame[4..]).is_err());
    }

    #[test]
    fn truncated_stream_is_an_error_but_clean_eof_is_not() {
        let frame = encode(&HostMessage::Shutdown).expect("encodes");
        let mut empty: &[u8] = &[];
        assert!(read_message::<HostMessage>(&mut empty)
            .expect("clean eof")
            .is_none());
        let mut cut = &frame[..frame.len() - 1];
        assert!(read_message::<HostMessage>(&mut cut).is_err());
        let mut half_header = &frame[..2];
        assert!(read_message::<HostMessage>(&mut half_header).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap property test: every short byte string either decodes or errors.
        let mut state = 0x1234_5678_u32;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let len = (state % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32) & 0xff) as u8)
                .collect();
            let _ = decode::<HostMessage>(&bytes);
            let _ = decode::<GuestMessage>(&bytes);
        }
    }

    /// A `GuestMessage::Data` whose frame body is exactly `body_len` bytes.
    fn data_with_body_len(body_len: usize) -> GuestMessage {
        let probe = |chunk_len: usize| {
            encode(&GuestMessage::Data {
                id: 1,
                chunk: vec![7; chunk_len],
            })
            .map(|frame| frame.len() - 4)
        };
        // The length prefix of the chunk is the same varint size for any length near the cap.
        let overhead = probe(MAX_FRAME_LEN - 64).expect("under the cap") - (MAX_FRAME_LEN - 64);
        let message = GuestMessage::Data {
            id: 1,
            chunk: vec![7; body_len - overhead],
        };
        let frame = postcard::to_allocvec(&message).expect("postcard encodes");
        assert_eq!(frame.len(), body_len);
        message
    }

    #[test]
    fn the_frame_cap_is_inclusive_everywhere() {
        // encode: a body of exactly MAX_FRAME_LEN bytes is sent, one more byte is not.
        let frame = encode(&data_with_body_len(MAX_FRAME_LEN)).expect("a body at the cap");
        assert_eq!(frame.len(), MAX_FRAME_LEN + 4);
        assert_eq!(frame[..4], (MAX_FRAME_LEN as u32).to_le_bytes());
        assert!(matches!(
            encode(&data_with_body_len(MAX_FRAME_LEN + 1)),
            Err(ProtocolError::FrameTooLarge(len)) if len == MAX_FRAME_LEN + 1
        ));
        // decode: the same frame body is read back whole.
        let decoded: GuestMessage = decode(&frame[4..]).expect("decodes at the cap");
        assert_eq!(decoded, data_with_body_len(MAX_FRAME_LEN));
        let over = postcard::to_allocvec(&data_with_body_len(MAX_FRAME_LEN + 1)).expect("body");
        assert!(matches!(
            decode::<GuestMessage>(&over),
            Err(ProtocolError::FrameTooLarge(len)) if len == MAX_FRAME_LEN + 1
        ));
        // frame_len: the header check that runs before any allocation.
        let header = |len: usize| (len as u32).to_le_bytes();
        assert_eq!(
            frame_len(header(MAX_FRAME_LEN)).expect("at the cap"),
            MAX_FRAME_LEN
        );
        assert_eq!(frame_len(header(1)).expect("one byte"), 1);
        assert!(matches!(
            frame_len(header(MAX_FRAME_LEN + 1)),
            Err(ProtocolError::FrameTooLarge(len)) if len == MAX_FRAME_LEN + 1
        ));
        assert!(matches!(
            frame_len(header(0)),
            Err(ProtocolError::EmptyFrame)
        ));
        assert!(matches!(
            frame_len([0xff; 4]),
            Err(ProtocolError::FrameTooLarge(len)) if len == u32::MAX as usize
        ));
    }

    /// A writer that records what was written and whether it was flushed.
    #[derive(Default)]
    struct Recorder {
        written: Vec<u8>,
        flushes: usize,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn write_message_writes_one_flushed_frame() {
        let message = HostMessage::Request {
            id: 42,
            request: Request::Exec(ExecRequest::new(["true"])),
        };
        let mut writer = Recorder::default();
        write_message(&mut writer, &message).expect("writes");
        assert_eq!(writer.written, encode(&message).expect("encodes"));
        assert_eq!(writer.flushes, 1, "flushed, so the peer sees it now");
        let mut reader = &writer.written[..];
        let back: HostMessage = read_message(&mut reader)
            .expect("reads")
            .expect("a message");
        assert_eq!(back, message);
        // Nothing is written for a message that cannot be sent.
        let mut writer = Recorder::default();
        assert!(write_message(&mut writer, &data_with_body_len(MAX_FRAME_LEN + 1)).is_err());
        assert!(writer.written.is_empty());
        assert!(write_message(&mut writer, &HostMessage::Shutdown).is_ok());
        assert!(!writer.written.is_empty());
    }

    /// A reader that hands out one byte at a time with an `Interrupted` error before each.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let Some((&first, rest)) = self.data.split_first() else {
                return Ok(0);
            };
            buf[0] = first;
            self.data = rest;
            Ok(1)
        }
    }

    #[test]
    fn reads_survive_short_reads_and_interruptions() {
        let message = GuestMessage::Event {
            id: Some(3),
            event: Event::Log {
                level: Level::Info,
                message: "hello".into(),
            },
        };
        let frame = encode(&message).expect("encodes");
        let mut reader = Trickle {
            data: &frame,
            interrupt: false,
        };
        let back: GuestMessage = read_message(&mut reader)
            .expect("reads")
            .expect("a message");
        assert_eq!(back, message);
        assert!(read_message::<GuestMessage>(&mut reader)
            .expect("clean end")
            .is_none());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let trickled = sha256_reader(Trickle {
            data: &data,
            interrupt: false,
        })
        .expect("hashes");
        assert_eq!(trickled, sha256(&data));
    }

    #[test]
    fn digests_are_sha256() {
        // FIPS 180-2 test vectors.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(hex_digest(&sha256(b"abc")), abc);
        assert_eq!(hex_digest(&sha256(b"")), empty);
        assert_eq!(
            hex_digest(&sha256_reader(&b"abc"[..]).expect("hashes")),
            abc
        );
        assert_eq!(hex_digest(&sha256_reader(&b""[..]).expect("hashes")), empty);
        // More than the reader's 4 MiB buffer: every read counts.
        let big: Vec<u8> = (0..(9u32 << 20) + 3).map(|i| (i % 253) as u8).collect();
        assert_eq!(sha256_reader(&big[..]).expect("hashes"), sha256(&big));
        assert_ne!(sha256(&big), sha256(&big[1..]));
        // A failing reader is an error, not the digest of what came before.
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        assert!(sha256_reader(Broken).is_err());
    }

    #[test]
    fn package_changes_are_empty_only_without_package_work() {
        assert!(PackageChanges::default().is_empty());
        // Where packages would come from is not itself a change.
        assert!(PackageChanges {
            disable_base_repos: true,
            network: true,
            ..PackageChanges::default()
        }
        .is_empty());
        let names = vec!["tree".to_string()];
        for changes in [
            PackageChanges {
                update_existing: true,
                ..PackageChanges::default()
            },
            PackageChanges {
                remove: names.clone(),
                ..PackageChanges::default()
            },
            PackageChanges {
                install: names.clone(),
                ..PackageChanges::default()
            },
            PackageChanges {
                update: names.clone(),
                ..PackageChanges::default()
            },
        ] {
            assert!(!changes.is_empty(), "{changes:?}");
        }
    }

    #[test]
    fn only_the_cancel_answer_is_cancelled() {
        assert!(RemoteError::new(CANCELLED).is_cancelled());
        assert!(!RemoteError::new("mounting rootfs").is_cancelled());
        assert!(!RemoteError { context: vec![] }.is_cancelled());
        let wrapped = RemoteError {
            context: vec!["running dracut".into(), CANCELLED.into()],
        };
        assert!(!wrapped.is_cancelled(), "only the outermost context counts");
        assert_eq!(wrapped.to_string(), format!("running dracut: {CANCELLED}"));
    }
}
