//! Helpers shared by the VM end-to-end tests: the test images of `scripts/make-test-image`,
//! one-VM-at-a-time locking, and running host tools.
//!
//! Images come from `$VMIC_TEST_IMAGES_DIR/<arch>-<variant>[-bootpart]/` when that holds them;
//! otherwise the script builds them (root needed, a few minutes cold, instant when cached).
//! VMs run one at a time: the machines these run on have few cores, and times are part of what
//! the tests show.

#![allow(dead_code)] // Each test crate uses its own subset.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use assert_cmd::Command;

static BUILD_LOCK: Mutex<()> = Mutex::new(());
/// Held while a VM (builder or booted image) runs.
pub static VM_LOCK: Mutex<()> = Mutex::new(());

pub fn lock(mutex: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn vmic() -> Command {
    Command::cargo_bin("vmic").expect("the vmic binary is built for tests")
}

/// The directory holding the test image `name` (`x86_64-minimal`, ...), built if missing.
pub fn test_image(arch: &str, variant: &str, boot_partition: bool) -> PathBuf {
    let name = format!(
        "{arch}-{variant}{}",
        if boot_partition { "-bootpart" } else { "" }
    );
    if let Some(dir) = std::env::var_os("VMIC_TEST_IMAGES_DIR") {
        let dir = PathBuf::from(dir).join(&name);
        if dir.join("manifest.json").is_file() {
            return dir;
        }
    }
    let out = std::env::var_os("VMIC_TEST_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-images"))
        .join(&name);
    let _build = lock(&BUILD_LOCK);
    let mut command = StdCommand::new(repo().join("scripts/make-test-image"));
    command.args(["--arch", arch, "--variant", variant, "--out"]);
    command.arg(&out);
    if boot_partition {
        command.arg("--boot-partition");
    }
    let started = Instant::now();
    let status = command.status().expect("running scripts/make-test-image");
    assert!(
        status.success(),
        "scripts/make-test-image failed for {name}"
    );
    eprintln!(
        "test image {name}: ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out
}

pub fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("reading manifest.json");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// Run a host program; it must succeed. Returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = StdCommand::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("running {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn sha256_of(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().expect("UTF-8 path")]);
    out.split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_string()
}
