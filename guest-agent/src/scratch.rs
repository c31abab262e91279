//! The scratch disk: formatted and mounted as the builds' work directory before the host
//! uploads into it (`Request::MountScratch`).

use std::path::Path;

use anyhow::Context;
use vmic_protocol::Response;

use crate::build::{disk_by_serial, fs_create_dir_all, Build};
use crate::context::RequestContext;

/// mkfs.ext4 for a throwaway file system: no journal, lazy init and no discard save seconds
/// under TCG, and nothing on it has to survive a crash.
pub(crate) fn mkfs_argv(device: &Path) -> Vec<String> {
    let mut argv: Vec<String> = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-O",
        "^has_journal",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    argv.push(device.to_string_lossy().into_owned());
    argv
}

/// Format the disk with `serial` and mount it at `path`.
pub fn mount_scratch(
    serial: &str,
    path: &str,
    context: &RequestContext,
) -> anyhow::Result<Response> {
    let build = Build::new(context);
    let disk = disk_by_serial(serial).context("the builder VM does not see the scratch disk")?;
    build
        .run(&mkfs_argv(&disk.device), None)
        .context("formatting the scratch disk")?;
    fs_create_dir_all(Path::new(path))?;
    let argv = vec![
        "mount".to_string(),
        "-t".to_string(),
        "ext4".to_string(),
        disk.device.to_string_lossy().into_owned(),
        path.to_string(),
    ];
    build
        .run(&argv, None)
        .with_context(|| format!("mounting the scratch disk at {path}"))?;
    Ok(Response::Done)
}
