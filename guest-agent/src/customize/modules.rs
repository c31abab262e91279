//! `os.modules`: `modules-load.d` and `modprobe.d` files.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::ModuleSpec;

pub(crate) fn apply(_root: &Path, modules: &[ModuleSpec]) -> anyhow::Result<()> {
    if !modules.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}
