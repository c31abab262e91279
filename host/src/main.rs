//! The `vmic` binary: parse the command line, run the command, map failures to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Some(code) = vmic::orphan::run_if_watchdog() {
        return ExitCode::from(code);
    }
    let cli = vmic::cli::Cli::parse();
    let _guard = match vmic::report::init_logging(&cli.global) {
        Ok(guard) => guard,
        Err(error) => {
            vmic::report::print_failure(&vmic::report::Failure::Usage(error));
            return ExitCode::from(2);
        }
    };
    match vmic::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            vmic::report::print_failure(&failure);
            ExitCode::from(failure.exit_code())
        }
    }
}
