//! `vmic validate-config` and `vmic schema`.

use crate::cli::{GlobalArgs, ValidateConfigArgs};
use crate::report::Failure;

pub fn run_validate(_global: &GlobalArgs, _args: ValidateConfigArgs) -> Result<(), Failure> {
    Err(Failure::Usage(anyhow::anyhow!("not implemented yet")))
}

pub fn run_schema() -> Result<(), Failure> {
    Err(Failure::Usage(anyhow::anyhow!("not implemented yet")))
}
