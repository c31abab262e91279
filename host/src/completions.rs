//! Shell completion scripts and man pages, generated from the clap definitions in `cli`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::report::Failure;

/// Write the completion script for `shell` to `out`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "vmic", out);
}

/// The man page of `vmic` itself (section 1, with a SUBCOMMANDS section listing each command).
pub fn render_man_page() -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(page)
}

/// Write `vmic.1` and one `vmic-<command>.1` per subcommand (nested ones too) into `dir`.
/// Returns the file names written.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<String>> {
    fs_err::create_dir_all(dir)?;
    let mut command = Cli::command();
    // Subcommand pages show their full name ("vmic guest-image export") only once built.
    command.build();
    let mut written = Vec::new();
    write_pages(&command, "vmic", dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<String>,
) -> anyhow::Result<()> {
    let file = format!("{name}.1");
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone().display_name(name))
        .render(&mut page)
        .with_context(|| format!("rendering the man page {file}"))?;
    fs_err::write(dir.join(&file), page)?;
    written.push(file);
    for sub in command
        .get_subcommands()
        .filter(|sub| sub.get_name() != "help")
    {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

pub fn run_completions(args: CompletionsArgs) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    write_completions(args.shell, &mut stdout);
    stdout
        .flush()
        .context("writing the completion script to stdout")
        .map_err(Failure::Build)
}

pub fn run_man(args: ManArgs) -> Result<(), Failure> {
    match args.out_dir {
        Some(dir) => write_man_pages(&dir).map(|_| ()).map_err(Failure::Build),
        None => {
            let page = render_man_page()
                .context("rendering the man page")
                .map_err(Failure::Build)?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&page)
                .and_then(|()| stdout.flush())
                .context("writing the man page to stdout")
                .map_err(Failure::Build)
        }
    }
}
