//! `os.additionalDirs`: directory trees copied into the image with AzL-IC's permission fields.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::DirCopy;

pub(crate) fn copy_additional_dirs(_root: &Path, dirs: &[DirCopy]) -> anyhow::Result<()> {
    if !dirs.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}
