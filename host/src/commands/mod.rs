//! One function per subcommand; `run` dispatches.

pub mod customize;
mod validate;

use crate::cli::{Cli, Command};
use crate::report::Failure;

pub fn run(cli: Cli) -> Result<(), Failure> {
    let global = cli.global.clone();
    match cli.command {
        Some(Command::Customize(args)) => customize::run(&global, args),
        None if cli.customize.is_empty() => Err(Failure::Usage(anyhow::anyhow!(
            "no command given; see `vmic --help`"
        ))),
        None => customize::run(&global, cli.customize),
        Some(Command::ValidateConfig(args)) => validate::run_validate(&global, args),
        Some(Command::Schema(args)) => match args.kind {
            crate::cli::SchemaKind::Config => validate::run_schema(),
            crate::cli::SchemaKind::Inspect => crate::inspect::run_schema(),
        },
        Some(Command::Inspect(args)) => crate::inspect::run(&global, args),
        Some(Command::Doctor(args)) => crate::doctor::run(&global, args),
        Some(Command::Boot(args)) => crate::boot::run(&global, args),
        Some(Command::Completions(args)) => crate::completions::run_completions(args),
        Some(Command::Man(args)) => crate::completions::run_man(args),
        Some(Command::GuestImage(command)) => crate::guest_image::export::run(command),
    }
}
