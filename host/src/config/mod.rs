//! The config file: model (as the user wrote it), loading with source positions, validation.

use std::fmt;

/// Every problem found in a config file, each with file:line:col and key path.
#[derive(Debug, Default)]
pub struct ConfigErrors {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "{error}")?;
        }
        Ok(())
    }
}
