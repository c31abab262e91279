//! The config file: model (as the user wrote it), loading with source positions, validation.
//!
//! [`load_and_validate`] reads a YAML (or JSON) file and returns the model, or every problem
//! found, each as `FILE:LINE:COL: key.path: message`. The stages: [`load`] parses YAML into a
//! tree with positions (syntax errors, duplicate keys), [`structure`] checks it against the
//! model's JSON Schema (unknown keys, types, enum values), serde builds the [`model::Config`],
//! and [`validate`] applies the semantic and cross-field rules.
//!
//! A config with `baseConfigs` is loaded with its bases ([`chain`]): each file is checked on
//! its own (errors name the file the value came from), then the chain is merged by the Image
//! Customizer's rules into [`LoadedConfig::config`].
//!
//! `customize` calls [`load_and_validate`] and then rejects a non-empty [`unsupported_fields`]
//! (settings parsed and checked but not yet carried out by the build); `validate-config` shows
//! those as warnings.

pub mod chain;
pub mod load;
pub mod model;
pub mod ssh_key;
pub mod structure;
pub mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::cli::OutputFormat;
pub use load::Position;
pub use model::{Config, ImageFormat};
pub use structure::SourceMap;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Where in the file; `None` when the file could not be read at all.
    pub position: Option<Position>,
    /// Key path as written, e.g. `iso.kernelCommandLine.extraCommandLine[1]`; empty for the
    /// whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some(position) = self.position {
            write!(f, "{}:{}:", position.line, position.column)?;
        }
        if !self.path.is_empty() {
            write!(f, " {}:", self.path)?;
        }
        write!(f, " {}", self.message)
    }
}

/// Every problem found in a config file, each with file:line:col and key path, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    fn sorted(mut self) -> ConfigErrors {
        // Stable: problems at one position keep the order the rules found them in.
        self.errors
            .sort_by(|a, b| (&a.file, a.position).cmp(&(&b.file, b.position)));
        self.errors.dedup();
        self
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Facts from outside the file that cross-field rules need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationContext {
    /// `--output-image-format`; overrides `output.image.format`.
    pub output_format: Option<OutputFormat>,
    /// Whether the input image is a LiveOS ISO, when known.
    pub input_is_iso: Option<bool>,
}

/// A config that passed validation, with what later stages need to resolve it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    pub config: Config,
    /// The config file as given.
    pub path: PathBuf,
    /// Its directory: relative paths in the config are relative to it.
    pub dir: PathBuf,
    /// Where each key path was written, for errors found later (e.g. "not supported yet").
    pub sources: SourceMap,
    /// Every file of a `baseConfigs` chain, bases first and this file last, each as written;
    /// empty when the config was checked on its own (one file, or a base being checked).
    /// `config` is their merge: values from a base file that name host paths are absolute
    /// (joined with that file's directory), this file's stay relative to `dir`.
    pub chain: Vec<LoadedConfig>,
    /// `--output-image-format`, when given (it overrides the config's format).
    pub cli_output_format: Option<OutputFormat>,
}

impl LoadedConfig {
    /// The output format in effect: the command line's, else the config's.
    pub fn output_format(&self, ctx: &ValidationContext) -> Option<OutputFormat> {
        effective_output_format(&self.config, ctx)
    }

    /// An error at a model key path of this config.
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (display, position) = self.sources.locate_key(path);
        ConfigError {
            file: self.path.clone(),
            position: Some(position),
            path: display,
            message: message.into(),
        }
    }
}

/// The command line's name for a config output format (`cosi` and `baremetal-image` have
/// none: vmic cannot write them yet).
pub fn output_format_of(format: ImageFormat) -> Option<OutputFormat> {
    Some(match format {
        ImageFormat::Iso => OutputFormat::Iso,
        ImageFormat::Raw => OutputFormat::Raw,
        ImageFormat::Qcow2 => OutputFormat::Qcow2,
        ImageFormat::Vhd => OutputFormat::Vhd,
        ImageFormat::VhdFixed => OutputFormat::VhdFixed,
        ImageFormat::Vhdx => OutputFormat::Vhdx,
        ImageFormat::PxeDir => OutputFormat::PxeDir,
        ImageFormat::PxeTar => OutputFormat::PxeTar,
        ImageFormat::Cosi | ImageFormat::BaremetalImage => return None,
    })
}

/// The config model's name for a command line output format.
pub fn image_format_of(format: OutputFormat) -> ImageFormat {
    match format {
        OutputFormat::Iso => ImageFormat::Iso,
        OutputFormat::Raw => ImageFormat::Raw,
        OutputFormat::Qcow2 => ImageFormat::Qcow2,
        OutputFormat::Vhd => ImageFormat::Vhd,
        OutputFormat::VhdFixed => ImageFormat::VhdFixed,
        OutputFormat::Vhdx => ImageFormat::Vhdx,
        OutputFormat::PxeDir => ImageFormat::PxeDir,
        OutputFormat::PxeTar => ImageFormat::PxeTar,
    }
}

/// The output format in effect in the config's own terms (PXE included): the command line's,
/// else the config's.
fn effective_image_format(config: &Config, ctx: &ValidationContext) -> Option<ImageFormat> {
    ctx.output_format.map(image_format_of).or_else(|| {
        config
            .output
            .as_ref()
            .and_then(|output| output.image.as_ref())
            .and_then(|image| image.format)
    })
}

fn effective_output_format(config: &Config, ctx: &ValidationContext) -> Option<OutputFormat> {
    ctx.output_format.or_else(|| {
        config
            .output
            .as_ref()
            .and_then(|output| output.image.as_ref())
            .and_then(|image| image.format)
            .and_then(output_format_of)
    })
}

/// Read, parse and validate a config file, reporting every problem found.
pub fn load_and_validate(
    path: &Path,
    ctx: &ValidationContext,
) -> Result<LoadedConfig, ConfigErrors> {
    let text = fs_err::read_to_string(path).map_err(|error| ConfigErrors {
        errors: vec![ConfigError {
            file: path.to_owned(),
            position: None,
            path: String::new(),
            message: format!("cannot read the config file: {}", error.kind()),
        }],
    })?;
    let dir = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Absolute, so that `../x` means the same file at validation and at build time.
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let top = parse_str(&text, path, &dir)?;
    if top.loaded.config.base_configs.is_none() {
        return validated(top, ctx);
    }
    chain::load_chain(top, ctx)
}

/// Run the semantic rules on a parsed file.
fn validated(parsed: Parsed, ctx: &ValidationContext) -> Result<LoadedConfig, ConfigErrors> {
    let Parsed {
        mut loaded,
        mut errors,
    } = parsed;
    loaded.cli_output_format = ctx.output_format;
    errors.extend(validate::validate(&loaded, ctx));
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors { errors }.sorted())
    }
}

/// Validate config text as if read from `path`, with relative paths resolved against `dir`
/// (`baseConfigs` are checked on their own but not followed: see [`load_and_validate`]).
pub fn validate_str(
    text: &str,
    path: &Path,
    dir: &Path,
    ctx: &ValidationContext,
) -> Result<LoadedConfig, ConfigErrors> {
    validated(parse_str(text, path, dir)?, ctx)
}

/// Parse config text and check its structure (syntax, keys, types, values) into the model.
fn parse_str(text: &str, path: &Path, dir: &Path) -> Result<Parsed, ConfigErrors> {
    let error = |position: Position, key_path: String, message: String| ConfigError {
        file: path.to_owned(),
        position: Some(position),
        path: key_path,
        message,
    };
    let (root, problems) = load::parse_yaml(text);
    let mut errors: Vec<ConfigError> = problems
        .into_iter()
        .map(|problem| {
            error(
                problem.position,
                problem.path.unwrap_or_default(),
                problem.message,
            )
        })
        .collect();
    let Some(root) = root else {
        return Err(ConfigErrors { errors }.sorted());
    };
    if let load::NodeKind::Mapping(entries) = &root.kind {
        // A `*Lists` file given as the config: say what it is rather than "unknown key".
        if let [(key, _)] = entries.as_slice() {
            if key.text == "packages" {
                errors.push(error(
                    key.position,
                    "packages".to_owned(),
                    "this is a package list file, not a config: name it in \
                     os.packages.installLists (or removeLists/updateLists) of a config"
                        .to_owned(),
                ));
                return Err(ConfigErrors { errors }.sorted());
            }
        }
    }

    let schema = schema_value();
    let mut walker = structure::Walker::new(&schema);
    let value = walker.walk(&root, &schema, "", "");
    errors.extend(
        walker
            .problems
            .into_iter()
            .map(|problem| error(problem.position, problem.path, problem.message)),
    );
    let Some(value) = value else {
        return Err(ConfigErrors { errors }.sorted());
    };
    // With structural problems the value lacks the bad parts; the semantic rules still check
    // the rest, so one run reports everything.
    let config: Config = match serde_json::from_value(value) {
        Ok(config) => config,
        Err(_) if !errors.is_empty() => return Err(ConfigErrors { errors }.sorted()),
        // The walk follows the model's own schema, so this means the two disagree: a bug, but
        // still reported rather than ignored.
        Err(serde_error) => {
            errors.push(error(
                root.position,
                String::new(),
                format!("config does not match the model: {serde_error}"),
            ));
            return Err(ConfigErrors { errors }.sorted());
        }
    };
    Ok(Parsed {
        loaded: LoadedConfig {
            config,
            path: path.to_owned(),
            dir: dir.to_owned(),
            sources: walker.sources,
            chain: Vec::new(),
            cli_output_format: None,
        },
        errors,
    })
}

/// A file whose structure allowed building the model; `errors` are the structural problems
/// of the parts left out, reported together with the semantic ones.
struct Parsed {
    loaded: LoadedConfig,
    errors: Vec<ConfigError>,
}

/// Settings the build cannot carry out yet, each as "not supported yet: <path>" at the key, in
/// every file of a `baseConfigs` chain. `customize` rejects a config that has any;
/// `validate-config` shows them as warnings.
pub fn unsupported_fields(loaded: &LoadedConfig) -> ConfigErrors {
    const UNSUPPORTED: &[&str] = &[
        "storage",
        "input.image.oci",
        "input.image.azureLinux",
        "os.overlays",
        "os.uki",
        "os.packages.snapshotTime",
        "os.packages.removePackageManager",
        "output.artifacts",
        "output.selinuxPolicyPath",
        "output.image.cosi",
    ];
    let files = if loaded.chain.is_empty() {
        std::slice::from_ref(loaded)
    } else {
        loaded.chain.as_slice()
    };
    let mut errors = Vec::new();
    for file in files {
        errors.extend(
            UNSUPPORTED
                .iter()
                .filter(|path| file.sources.contains(path))
                .map(|path| file.error_at(path, format!("not supported yet: {path}"))),
        );
        // Formats vmic cannot write yet; the command line's format replaces the config's.
        let format = file
            .config
            .output
            .as_ref()
            .and_then(|output| output.image.as_ref())
            .and_then(|image| image.format);
        if let Some(format) = format {
            if loaded.cli_output_format.is_none() && output_format_of(format).is_none() {
                errors.push(file.error_at(
                    "output.image.format",
                    format!("not supported yet: output.image.format {format}"),
                ));
            }
        }
    }
    ConfigErrors { errors }.sorted()
}

/// The JSON Schema of the config file (draft 2020-12).
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(Config)
}

fn schema_value() -> serde_json::Value {
    schema().to_value()
}

#[cfg(test)]
mod tests;

/// Where a file the config names lies on the host: `value` joined to the config file's
/// directory and lexically cleaned (`a/../b` → `b`), as the Image Customizer resolves it; an
/// absolute `value` stands for itself. The one meaning of a source path, for validation and
/// the build alike.
pub fn resolve_source(dir: &Path, value: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for component in dir.join(value).components() {
        match component {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
