//! QEMU's own seccomp sandbox (`-sandbox`), defence in depth should a hostile guest take over
//! the emulator: no obsolete syscalls, no privilege changes, no spawning programs, no
//! scheduler/resource changes. Used when the host's QEMU supports it (probed once per binary).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The `-sandbox` value: everything the builder VM and `vmic boot` never need, denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments that turn the sandbox on (empty when `supported` is false).
pub fn sandbox_argv(supported: bool) -> Vec<OsString> {
    if supported {
        vec!["-sandbox".into(), SANDBOX.into()]
    } else {
        Vec::new()
    }
}

/// Whether `binary` starts with [`SANDBOX`] (QEMU built without seccomp refuses the option).
/// The answer is cached for the life of the process.
pub fn supported(binary: &Path) -> bool {
    static CACHE: Mutex<Option<HashMap<PathBuf, bool>>> = Mutex::new(None);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(&answer) = cache.get(binary) {
        return answer;
    }
    let answer = probe(binary);
    cache.insert(binary.to_path_buf(), answer);
    answer
}

/// Say so when `binary` runs without the sandbox (the answer is cached: cheap to ask twice).
pub fn warn_if_unsupported(binary: &Path, reporter: &crate::report::Reporter) {
    if !supported(binary) {
        reporter.warn(
            crate::report::Source::Vmic,
            format_args!(
                "{} does not support -sandbox (built without seccomp): QEMU runs without its syscall filter",
                binary.display()
            ),
        );
    }
}

/// Start an empty machine with the sandbox on and quit it over QMP on stdin: the filter is
/// really installed, and the probe takes ~0.5 s.
fn probe(binary: &Path) -> bool {
    let child = Command::new(binary)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-sandbox",
        ])
        .arg(SANDBOX)
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        // QEMU may already have exited (option refused): a failed write is that answer.
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    child.wait().is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_denies_what_vmic_never_needs() {
        assert_eq!(
            sandbox_argv(true),
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        assert!(sandbox_argv(false).is_empty());
    }

    #[test]
    fn a_binary_that_refuses_the_option_is_not_sandboxed() {
        // `false` exits 1 whatever it is given, as a QEMU without seccomp does.
        assert!(!supported(Path::new("/bin/false")));
        assert!(!supported(Path::new("/nonexistent/qemu-system-x86_64")));
    }
}
