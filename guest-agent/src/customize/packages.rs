//! `os.packages`: the image's own package manager (apt or dnf/tdnf) run in the chroot.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::PackageChanges;

use crate::build::Build;

pub(crate) fn apply(
    _build: &Build<'_>,
    _root: &Path,
    packages: &PackageChanges,
) -> anyhow::Result<()> {
    if !packages.is_empty() {
        bail!("not implemented");
    }
    Ok(())
}
