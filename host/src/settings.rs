//! What a `vmic customize` run will do, resolved once from the command line, the config and
//! the input image (its format, references and architecture); every later stage reads it.

use std::path::PathBuf;

use anyhow::anyhow;

use crate::cli::{Arch, CustomizeArgs, OutputFormat, VmArgs};
use crate::config::{self, ValidationContext};
use crate::image::{self, ImageFormat};
use crate::report::Failure;

/// What `customize` will do, resolved from the command line, the config and defaults.
#[derive(Debug)]
pub struct CustomizeSettings {
    pub input: PathBuf,
    pub input_format: ImageFormat,
    pub config: config::LoadedConfig,
    pub build_dir: PathBuf,
    pub output: PathBuf,
    pub output_format: OutputFormat,
    pub package_sources: Vec<PathBuf>,
    pub disable_base_image_repos: bool,
    pub allow_private_network: bool,
    pub squashfs_compression: vmic_protocol::Compression,
    /// The image's: `--arch`, else detected from its boot loaders, else the host's.
    pub arch: Arch,
    /// `--source-date-epoch` / `SOURCE_DATE_EPOCH`; `None`: the agent takes the input's.
    pub source_date_epoch: Option<u64>,
    /// The build cache (ISO outputs); `None` with `--no-cache`.
    pub cache: Option<crate::cache::CacheSettings>,
    pub vm: VmArgs,
}

pub fn resolve(args: &CustomizeArgs) -> Result<CustomizeSettings, Failure> {
    let required = |value: &Option<PathBuf>, flag: &str| {
        value
            .clone()
            .ok_or_else(|| Failure::Usage(anyhow!("{flag} is required")))
    };
    let input = absolute(&required(&args.image_file, "--image-file")?)?;
    let config_path = required(&args.config_file, "--config-file")?;
    let build_dir = required(&args.build_dir, "--build-dir")?;
    let input_format = image::detect_format(&input).map_err(|error| {
        Failure::Usage(anyhow::Error::new(error).context("cannot use the input image"))
    })?;
    // Before anything else opens the image (qemu-img check, the architecture probe).
    crate::references::check(&input, input_format).map_err(Failure::Usage)?;
    image::check_integrity(&input, input_format).map_err(Failure::Usage)?;
    // The image's architecture is checked again inside the VM against its binaries.
    let arch = image::resolve_arch(args.vm.arch, &input, input_format).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "cannot tell the image's architecture: pass --arch x86_64|aarch64"
        ))
    })?;
    let ctx = ValidationContext {
        output_format: args.output_image_format,
        input_is_iso: Some(input_format == ImageFormat::Iso),
    };
    let loaded = config::load_and_validate(&config_path, &ctx).map_err(Failure::Config)?;
    let unsupported = config::unsupported_fields(&loaded);
    if !unsupported.is_empty() {
        return Err(Failure::Config(unsupported));
    }
    let output_format = loaded.output_format(&ctx).ok_or_else(|| {
        Failure::Usage(crate::report::hinted(
            "no output format",
            "pass --output-image-format iso|raw|qcow2|vhd|vhd-fixed|vhdx or set output.image.format in the config",
        ))
    })?;
    let output = args
        .output_image_file
        .clone()
        .or_else(|| {
            let path = loaded
                .config
                .output
                .as_ref()?
                .image
                .as_ref()?
                .path
                .clone()?;
            Some(loaded.dir.join(path))
        })
        .ok_or_else(|| {
            Failure::Usage(crate::report::hinted(
                "no output file",
                "pass --output-image-file or set output.image.path in the config",
            ))
        })?;
    // The one promise about the input: never written, whatever path names it.
    crate::preflight::check_output(&input, &output, &build_dir).map_err(|error| {
        let hint = error.hint();
        Failure::Usage(crate::report::hinted(error.to_string(), hint))
    })?;
    for source in &args.package_source {
        if !source.exists() {
            return Err(Failure::Usage(crate::report::hinted(
                format!("--package-source {} does not exist", source.display()),
                "pass a directory of .deb/.rpm files or a repository file (.list, .sources, .repo)",
            )));
        }
    }
    let squashfs_compression = match &args.squashfs_compression {
        None => vmic_protocol::Compression::Auto,
        Some(value) => vmic_protocol::Compression::parse(value)
            .map_err(|error| Failure::Usage(anyhow!("--squashfs-compression {value}: {error}")))?,
    };
    Ok(CustomizeSettings {
        input,
        input_format,
        config: loaded,
        build_dir,
        output,
        output_format,
        package_sources: args.package_source.clone(),
        disable_base_image_repos: args.disable_base_image_repos,
        allow_private_network: args.allow_private_network,
        squashfs_compression,
        arch,
        source_date_epoch: args.source_date_epoch,
        cache: (!args.no_cache).then(|| crate::cache::CacheSettings {
            dir: args
                .cache_dir
                .clone()
                .unwrap_or_else(|| crate::guest_image::cache_dir().join("builds")),
            max_bytes: args.cache_max_size,
        }),
        vm: args.vm.clone(),
    })
}

/// Absolute, so that QEMU and qemu-img never read a path as a `json:` spec or a protocol URL.
pub fn absolute(path: &std::path::Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path).map_err(|error| {
        Failure::Usage(
            anyhow::Error::new(error).context(format!("cannot resolve {}", path.display())),
        )
    })
}
