//! `vmic doctor`: what this machine can do.

use crate::cli::{DoctorArgs, GlobalArgs};
use crate::report::Failure;

pub fn run(_global: &GlobalArgs, _args: DoctorArgs) -> Result<(), Failure> {
    Err(Failure::Usage(anyhow::anyhow!("not implemented yet")))
}
