//! `vmic validate-config` and `vmic schema`.

use std::io::Write;

use crate::cli::{GlobalArgs, ValidateConfigArgs};
use crate::config::{self, ValidationContext};
use crate::report::Failure;

/// Check a config and every file it references; settings the build cannot carry out yet are
/// warnings here (and errors in `customize`).
pub fn run_validate(_global: &GlobalArgs, args: ValidateConfigArgs) -> Result<(), Failure> {
    let ctx = ValidationContext {
        output_format: args.output_image_format,
        input_is_iso: None,
    };
    let loaded = config::load_and_validate(&args.config_file, &ctx).map_err(Failure::Config)?;
    let mut stderr = std::io::stderr().lock();
    // Diagnostics go to stderr (stdout is for data); a closed stderr is not worth failing for.
    for warning in config::unsupported_fields(&loaded).errors {
        let _ = writeln!(stderr, "warning: {warning}");
    }
    let _ = writeln!(stderr, "ok: {}", args.config_file.display());
    Ok(())
}

/// Print the config's JSON Schema to stdout.
pub fn run_schema() -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(&config::schema())
        .map_err(|error| Failure::Build(error.into()))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .map_err(|error| Failure::Build(anyhow::Error::new(error).context("writing the schema")))
}
