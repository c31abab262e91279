//! `vmic customize`: resolve the settings, then build.

use anyhow::anyhow;

use crate::cli::{CustomizeArgs, GlobalArgs, OutputFormat};
use crate::report::Failure;
use crate::settings::resolve;

pub fn run(global: &GlobalArgs, args: CustomizeArgs) -> Result<(), Failure> {
    let settings = resolve(&args)?;
    tracing::debug!(
        input = %settings.input.display(),
        format = settings.input_format.name(),
        output = %settings.output.display(),
        config = %settings.config.path.display(),
        build_dir = %settings.build_dir.display(),
        arch = %settings.arch,
        "configuration is valid"
    );
    let arch = settings.arch;
    // One vmic per build directory; what a killed run left there goes now.
    let build_dir = crate::rundir::BuildDir::acquire(&settings.build_dir).map_err(|error| {
        let hint = match error {
            crate::rundir::RunDirError::InUse { .. } => {
                "wait for that build or pass another --build-dir"
            }
            _ => "pass a --build-dir vmic can write",
        };
        Failure::Usage(crate::report::hinted(error.to_string(), hint))
    })?;
    let runtime = tokio::runtime::Runtime::new().map_err(|error| Failure::Build(error.into()))?;
    let reporter = crate::report::Reporter::new(crate::report::interactive(global));
    let timeout = args.timeout;
    // On Ctrl-C, SIGTERM or the timeout the build future is dropped: QEMU is killed and the
    // scratch files and the partial output are removed by their guards.
    let mut timed_out = false;
    let output_dir = crate::rundir::parent_dir(&settings.output).to_path_buf();
    let watched = vec![
        (build_dir.root().to_path_buf(), "build directory"),
        (output_dir, "output directory"),
    ];
    let result = runtime.block_on(async {
        tokio::select! {
            result = crate::build::build(&settings, arch, &build_dir, &reporter) => result,
            error = crate::space::watch(watched, crate::space::RESERVE) => Err(error),
            () = crate::boot::interrupted() => Err(anyhow!("interrupted; the build was stopped and its files removed")),
            () = tokio::time::sleep(timeout) => {
                timed_out = true;
                Err(anyhow!("timed out"))
            }
        }
    });
    let result = if timed_out {
        Err(crate::report::hinted(
            format!(
                "the build timed out after {} during step {:?}; it was stopped and its files removed",
                humanize(timeout),
                reporter.current_step().as_deref().unwrap_or("starting")
            ),
            "find out why that step hangs (the log shows its last output) or pass a longer --timeout",
        ))
    } else {
        result
    };
    drop(build_dir);
    let total = reporter.finish();
    if let Some(path) = &global.timestamp_file {
        if let Err(error) = reporter.write_timestamps(path, total) {
            reporter.warn(
                crate::report::Source::Vmic,
                format_args!("cannot write {}: {error:#}", path.display()),
            );
        }
    }
    let summary = result.map_err(Failure::Build)?;
    tracing::info!(
        output = %summary.output.display(),
        size = summary.size,
        sha256 = summary.sha256,
        seconds = total,
        "{} written",
        match settings.output_format {
            OutputFormat::Iso => "LiveOS ISO".to_string(),
            OutputFormat::PxeDir => "PXE artifacts directory".to_string(),
            OutputFormat::PxeTar => "PXE artifacts archive".to_string(),
            other => format!("{} disk image", other.name()),
        }
    );
    Ok(())
}

/// `90s`, `30m`, `2h` (the shape `--timeout` takes).
fn humanize(duration: std::time::Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
