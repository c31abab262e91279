//! `os.selinux.mode` (disk outputs): `/etc/selinux/config` and the kernel arguments.

use std::path::Path;

use anyhow::bail;
use vmic_protocol::SelinuxMode;

use crate::build::Build;

pub(crate) fn apply(_build: &Build<'_>, _root: &Path, mode: SelinuxMode) -> anyhow::Result<()> {
    bail!("not implemented: {mode:?}");
}
