//! `os.groups` and `os.users`, with the image's own shadow tools in the chroot.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::{GroupSpec, UserSpec};

use crate::build::Build;

pub(crate) fn apply_groups(
    _build: &Build<'_>,
    _root: &Path,
    groups: &[GroupSpec],
) -> anyhow::Result<()> {
    if !groups.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}

pub(crate) fn apply_users(
    _build: &Build<'_>,
    _root: &Path,
    users: &[UserSpec],
) -> anyhow::Result<()> {
    if !users.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}
