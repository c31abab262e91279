//! `vmic customize`.

use crate::cli::{CustomizeArgs, GlobalArgs};
use crate::report::Failure;

pub fn run(_global: &GlobalArgs, _args: CustomizeArgs) -> Result<(), Failure> {
    Err(Failure::Usage(anyhow::anyhow!("not implemented yet")))
}
