//! `os.services`: systemd units enabled or disabled in the chroot.

use std::path::Path;

use anyhow::{bail, Context};
use vmic_protocol::ServiceChanges;

use crate::build::{output_tail, strings, Build};

pub(crate) fn apply(
    build: &Build<'_>,
    root: &Path,
    services: &ServiceChanges,
) -> anyhow::Result<()> {
    for name in &services.enable {
        build.log(format!("enabling service {name}"));
        build
            .run(&systemctl("enable", name), Some(root))
            .with_context(|| format!("enabling service {name}"))?;
    }
    for name in &services.disable {
        build.log(format!("disabling service {name}"));
        // `systemctl disable` of a unit that does not exist succeeds in a chroot (as AzL-IC
        // found): ask `is-enabled` first, which does tell.
        let state = build.run_unchecked(&systemctl("is-enabled", name), Some(root), Vec::new())?;
        if unit_is_missing(state.code, &state.stdout) {
            bail!(
                "cannot disable service {name}: the image has no such unit{}",
                output_tail(&state)
            );
        }
        build
            .run(&systemctl("disable", name), Some(root))
            .with_context(|| format!("disabling service {name}"))?;
    }
    Ok(())
}

fn systemctl(verb: &str, unit: &str) -> Vec<String> {
    let mut argv = strings(["systemctl", verb]);
    argv.push(unit.to_owned());
    argv
}

/// Reads `systemctl is-enabled`: a unit that exists prints its state (`enabled`, `disabled`,
/// `static`, ...) even when the exit code is non-zero; a missing one prints `not-found` and
/// exits 4 (systemd ≥ 250), or prints nothing and only an error (older systemd).
fn unit_is_missing(code: i32, stdout: &[u8]) -> bool {
    let state = String::from_utf8_lossy(stdout);
    let state = state.trim();
    code == 4 || state == "not-found" || (code != 0 && state.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemctl_argv_names_the_unit() {
        assert_eq!(
            systemctl("enable", "sshd.service"),
            ["systemctl", "enable", "sshd.service"]
        );
    }

    #[test]
    fn is_enabled_output_tells_missing_units_apart() {
        let cases: [(i32, &[u8], bool); 7] = [
            (0, b"enabled\n", false),
            (1, b"disabled\n", false),
            (1, b"static\n", false),
            (1, b"masked\n", false),
            (4, b"not-found\n", true),
            (1, b"", true),
            (4, b"", true),
        ];
        for (code, stdout, missing) in cases {
            assert_eq!(unit_is_missing(code, stdout), missing, "{code} {stdout:?}");
        }
    }
}
