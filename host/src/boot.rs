//! `vmic boot`: boot a disk image or ISO under firmware and watch its serial console.

use crate::cli::{BootArgs, GlobalArgs};
use crate::report::Failure;

pub fn run(_global: &GlobalArgs, _args: BootArgs) -> Result<(), Failure> {
    Err(Failure::Usage(anyhow::anyhow!("not implemented yet")))
}
