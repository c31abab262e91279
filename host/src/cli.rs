//! Command-line definition (clap only: no behaviour lives here).

use std::path::PathBuf;

pub use crate::format::OutputFormat;
pub use crate::machine::Arch;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "vmic",
    version,
    about = "Customize Linux disk images into LiveOS ISOs inside a throwaway QEMU builder VM"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// `customize` is the default subcommand (as in the Azure Linux Image Customizer).
    #[command(flatten)]
    pub customize: CustomizeArgs,
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also write logs (always JSON lines) to this file.
    #[arg(long, global = true)]
    pub log_file: Option<PathBuf>,

    /// Write the wall time of each build step to this file as JSON.
    #[arg(long, global = true)]
    pub timestamp_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Customize an image and write it as a LiveOS ISO or a disk image.
    Customize(CustomizeArgs),
    /// Check a config file and every file it references, without starting anything.
    ValidateConfig(ValidateConfigArgs),
    /// Print a JSON Schema: of the config file (default) or of `vmic inspect --json`.
    Schema(SchemaArgs),
    /// Describe a disk image or vmic ISO (read inside the builder VM) and say whether it can
    /// become a LiveOS ISO.
    Inspect(InspectArgs),
    /// Report QEMU, accelerators, transports and guest images; with --boot, boot each builder VM.
    Doctor(DoctorArgs),
    /// Boot a disk image or ISO in QEMU and wait for a line on its serial console.
    Boot(BootArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout, or write one page per command into a directory.
    Man(ManArgs),
    /// Move built builder VM images between machines as one OCI-layout tarball.
    #[command(subcommand)]
    GuestImage(GuestImageCommand),
}

#[derive(Debug, Args, Clone)]
pub struct SchemaArgs {
    /// Which document's schema.
    #[arg(value_enum, default_value_t = SchemaKind::Config)]
    pub kind: SchemaKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaKind {
    /// The config file (`--config-file`).
    Config,
    /// The report `vmic inspect --json` prints.
    Inspect,
}

#[derive(Debug, Args, Clone)]
pub struct InspectArgs {
    /// Disk image (raw, qcow2, vhd, vhdx) or ISO to describe; never written. Repeat it to
    /// inspect several images of one architecture in one builder VM.
    #[arg(long, required = true)]
    pub image_file: Vec<PathBuf>,

    /// Print the report as JSON (its schema: `vmic schema inspect`): one object, or an array
    /// of them for several images.
    #[arg(long)]
    pub json: bool,

    /// Stop the builder VM after this long (e.g. 90s, 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args, Clone)]
pub struct CompletionsArgs {
    /// Shell to generate the completion script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args, Clone)]
pub struct ManArgs {
    /// Write vmic.1 and vmic-<command>.1 into this directory instead of printing vmic.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum GuestImageCommand {
    /// Write the current builder VM image(s) (kernel, initramfs, manifest) to an OCI-layout tar.
    Export(GuestImageExportArgs),
    /// Verify an OCI-layout tar made by `export` and install its images as the current ones.
    Import(GuestImageImportArgs),
}

#[derive(Debug, Args, Clone)]
pub struct GuestImageExportArgs {
    /// Only this architecture (default: every architecture that has a built image).
    #[arg(long, value_enum)]
    pub arch: Vec<Arch>,

    /// The tarball to write.
    pub file: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct GuestImageImportArgs {
    /// The tarball to read.
    pub file: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct CustomizeArgs {
    /// Input image: raw, qcow2, vhd, vhdx, or a LiveOS ISO made by vmic.
    #[arg(long)]
    pub image_file: Option<PathBuf>,

    /// Config file (YAML or JSON).
    #[arg(long)]
    pub config_file: Option<PathBuf>,

    /// Directory for temporary build files (overlay, sockets, console log).
    #[arg(long)]
    pub build_dir: Option<PathBuf>,

    /// Output file; overrides `output.image.path` in the config.
    #[arg(long)]
    pub output_image_file: Option<PathBuf>,

    /// Output format; overrides `output.image.format` in the config.
    #[arg(long, value_enum)]
    pub output_image_format: Option<OutputFormat>,

    /// Extra package source for `os.packages`: a directory of .deb/.rpm files, or a repository
    /// file (apt `.list`/`.sources`, dnf `.repo`). Repeatable.
    #[arg(long, visible_alias = "rpm-source", value_name = "DIR|FILE")]
    pub package_source: Vec<PathBuf>,

    /// Install packages only from --package-source, not from the image's own repositories
    /// (the builder VM then stays offline).
    #[arg(long)]
    pub disable_base_image_repos: bool,

    /// Let the builder VM's package downloads reach private networks (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7): for a private mirror. Loopback and link-local
    /// (metadata) addresses stay unreachable.
    #[arg(long)]
    pub allow_private_network: bool,

    /// mksquashfs compressor for the ISO's rootfs.img: zstd[:LEVEL], xz, gzip or lz4. The
    /// default is zstd:3 when the image's kernel reads zstd squashfs, else xz.
    #[arg(long, value_name = "COMP[:LEVEL]")]
    pub squashfs_compression: Option<String>,

    /// Clamp every timestamp in the output to this time (seconds since 1970, UTC): the same
    /// input, config, package sources and vmic version give a bit-identical ISO. Default: the
    /// mtime of the image's /etc/os-release (a vmic ISO input: the epoch it was made with).
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "SECONDS")]
    pub source_date_epoch: Option<u64>,

    /// Stop the build when it runs longer than this (`90s`, `30m`, `2h`): QEMU and every
    /// helper are killed and nothing partial is left; the error names the running step.
    #[arg(long, value_name = "DURATION", default_value = "4h", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    /// Neither reuse nor store ISO builds in the build cache (`VMIC_NO_CACHE=1|true|yes`).
    #[arg(
        long,
        env = "VMIC_NO_CACHE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_cache: bool,

    /// The build cache: a disk -> ISO build whose input, `os` and `scripts` sections, the
    /// files they name and package sources are those of a cached build re-masters the cached
    /// ISO with this build's `iso` settings instead of customizing, running dracut and
    /// mksquashfs again. Default: <vmic cache dir>/builds (~/.cache/vmic/builds).
    #[arg(long, env = "VMIC_BUILD_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The build cache's size cap (`500M`, `8G`); the least recently used entries go first.
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = parse_size)]
    pub cache_max_size: u64,

    #[command(flatten)]
    pub vm: VmArgs,
}

/// `8G`, `500M`, `64K` (binary units) or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {text:?}: use e.g. 500M, 8G or a number of bytes");
    let text = text.trim();
    let (number, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(invalid()),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = number.parse().map_err(|_| invalid())?;
    value
        .checked_shl(shift)
        .filter(|bytes| bytes >> shift == value)
        .ok_or_else(invalid)
}

/// `90s`, `30m`, `2h`, `1h30m` or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let invalid = || format!("invalid duration {text:?}: use e.g. 90s, 30m, 2h or 1h30m");
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(seconds));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(invalid()),
        };
        let value: u64 = number.parse().map_err(|_| invalid())?;
        number.clear();
        total = value
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(invalid)?;
    }
    if !number.is_empty() || total == 0 {
        return Err(invalid());
    }
    Ok(std::time::Duration::from_secs(total))
}

impl CustomizeArgs {
    /// No customize argument given at all (then `vmic` alone asks for a command).
    pub fn is_empty(&self) -> bool {
        self.image_file.is_none()
            && self.config_file.is_none()
            && self.build_dir.is_none()
            && self.output_image_file.is_none()
            && self.output_image_format.is_none()
    }
}

#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Architecture of the image (default: detected from the image).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,

    /// Host-guest channel.
    #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
    pub transport: TransportChoice,

    /// Accelerator for the builder VM.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,

    /// vCPUs of the builder VM (default: one per host core, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vm_cpus: Option<u32>,

    /// Memory of the builder VM in MiB (default: a quarter of the host's, 1536-4096).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(512..=65536))]
    pub vm_memory: Option<u32>,
}

#[derive(Debug, Args, Clone)]
pub struct ValidateConfigArgs {
    /// Config file (YAML or JSON).
    #[arg(long)]
    pub config_file: PathBuf,

    /// Output format the config will be used with (checks `iso:` against it).
    #[arg(long, value_enum)]
    pub output_image_format: Option<OutputFormat>,
}

#[derive(Debug, Args, Clone)]
pub struct DoctorArgs {
    /// Boot each available builder VM and time it to agent-ready.
    #[arg(long)]
    pub boot: bool,

    /// Only this architecture (with --boot).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,

    /// Only this transport (with --boot).
    #[arg(long, value_enum)]
    pub transport: Option<TransportChoice>,
}

#[derive(Debug, Args, Clone)]
pub struct BootArgs {
    /// Disk image (raw, qcow2, vhd, vhdx) or ISO to boot; never written. With `--media pxe`:
    /// a directory or `.tar.gz` of PXE artifacts.
    #[arg(long)]
    pub image_file: PathBuf,

    /// Architecture of the image (default: detected from the image, else the host's).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,

    /// Firmware to boot with.
    #[arg(long, value_enum, default_value_t = Firmware::Uefi)]
    pub firmware: Firmware,

    /// Enforce Secure Boot: OVMF with Microsoft's keys enrolled (x86_64 UEFI). A boot chain
    /// the firmware or shim refuses ends the boot with their refusal.
    #[arg(long)]
    pub secure_boot: bool,

    /// Succeed as soon as the serial console prints a line matching this regex.
    #[arg(long)]
    pub expect: Option<String>,

    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,

    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,

    /// Copy the serial console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,

    /// Attach the image as a disk or a CD-ROM (auto: ISO 9660 files as CD-ROMs). A hybrid
    /// ISO attached as a disk boots as it would from a `dd`-written USB stick. `pxe`: boot PXE
    /// artifacts over QEMU's user network (its TFTP server; a bootstrap ISO named
    /// `http://10.0.2.2:PORT/...` is served by vmic on the host's loopback at PORT).
    #[arg(long, value_enum, default_value_t = Media::Auto)]
    pub media: Media,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Media {
    Auto,
    Disk,
    Cdrom,
    Pxe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    Auto,
    Vsock,
    Serial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Hvf,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Firmware {
    Uefi,
    Bios,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Uefi => "UEFI",
            Firmware::Bios => "BIOS",
        }
    }
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0s", "h", "5x", "10m5", "-3s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod cache_flag_tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "8X", "-1G", "99999999999T", "1.5G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
