//! `os.services`: systemd units enabled or disabled in the chroot.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::ServiceChanges;

use crate::build::Build;

pub(crate) fn apply(
    _build: &Build<'_>,
    _root: &Path,
    services: &ServiceChanges,
) -> anyhow::Result<()> {
    if !services.enable.is_empty() || !services.disable.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}
