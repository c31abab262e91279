//! Helpers shared by the VM end-to-end tests: the test images of `scripts/make-test-image`,
//! one-VM-at-a-time locking, and running host tools.
//!
//! Images come from `$VMIC_TEST_IMAGES_DIR/<arch>-<variant>[-bootpart]/` when that holds them;
//! otherwise the script builds them (root needed, a few minutes cold, instant when cached).
//! VMs share the machine two at a time at most: libtest runs as many tests at once as there are
//! cores (2 here), and a VM under TCG leaves about a third of them idle (dracut and a booting
//! systemd are mostly one thread). A test whose assertion is a time takes the machine alone.

#![allow(dead_code)] // Each test crate uses its own subset.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use assert_cmd::Command;

static BUILD_LOCK: Mutex<()> = Mutex::new(());
/// Held while a VM (builder or booted image) runs: shared ([`vm_slot`]) by most tests, taken
/// alone ([`vm_alone`]) by those that time what they run.
static VM_LOCK: RwLock<()> = RwLock::new(());

pub fn lock(mutex: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A place for one VM beside other tests' VMs.
pub fn vm_slot() -> RwLockReadGuard<'static, ()> {
    VM_LOCK
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The machine to this test's VM alone: for assertions on how long something took.
pub fn vm_alone() -> RwLockWriteGuard<'static, ()> {
    VM_LOCK
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `vmic` without the build cache: a test sees the build it asks for, whatever an earlier run
/// left in `~/.cache/vmic/builds`. [`customize_to`] turns it back on for `--cache-dir`.
pub fn vmic() -> Command {
    let mut command = Command::cargo_bin("vmic").expect("the vmic binary is built for tests");
    command.env("VMIC_NO_CACHE", "1");
    command
}

/// `customize` with the paths every build names and the output format, for `.args(...)`.
pub fn customize_args(
    input: impl AsRef<std::ffi::OsStr>,
    config: impl AsRef<std::ffi::OsStr>,
    build_dir: impl AsRef<std::ffi::OsStr>,
    output: impl AsRef<std::ffi::OsStr>,
    format: &str,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["customize".into(), "--image-file".into()];
    args.push(input.as_ref().into());
    args.push("--config-file".into());
    args.push(config.as_ref().into());
    args.push("--build-dir".into());
    args.push(build_dir.as_ref().into());
    args.push("--output-image-file".into());
    args.push(output.as_ref().into());
    args.push("--output-image-format".into());
    args.push(format.into());
    args
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
    // As scripts/test builds them (the formats are part of the cache key): every format of
    // x86_64-minimal is read, only the qcow2 of the others.
    let formats = if name == "x86_64-minimal" {
        "raw,qcow2,vhd,vhdx"
    } else {
        "qcow2"
    };
    command.args([
        "--arch",
        arch,
        "--variant",
        variant,
        "--formats",
        formats,
        "--out",
    ]);
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
    run_in(Path::new("."), program, args)
}

/// [`run`] in the directory `dir`.
pub fn run_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let output = StdCommand::new(program)
        .args(args)
        .current_dir(dir)
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

/// A file of `mib` MiB of random bytes: no image of any kind.
pub fn random_file(path: &Path, mib: u32) {
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ],
    );
}

/// Work space under the target dir (ISOs and overlays are too big for a small /tmp).
pub fn work_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-tests");
    std::fs::create_dir_all(&base).expect("creating the VM tests' work dir");
    tempfile::tempdir_in(base).expect("temp dir")
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// One `vmic customize` run.
pub struct Customized {
    pub code: Option<i32>,
    pub stderr: String,
    pub seconds: f64,
    /// The `--timestamp-file` document.
    pub timestamps: serde_json::Value,
}

impl Customized {
    pub fn total_seconds(&self) -> f64 {
        self.timestamps["totalSeconds"]
            .as_f64()
            .expect("the timestamp file has totalSeconds")
    }
}

/// Run `vmic customize` to `format` in a fresh build dir (or `build_dir`), asserting that the
/// input is unchanged whatever happened.
pub fn customize_to(
    format: &str,
    input: &Path,
    config: &Path,
    output: &Path,
    build_dir: Option<&Path>,
    extra: &[&str],
) -> Customized {
    let before = sha256_of(input);
    let work = work_dir();
    let build_dir = build_dir.map_or_else(|| work.path().join("build"), Path::to_path_buf);
    let timestamps = work.path().join("timestamps.json");
    let _vm = vm_slot();
    let started = Instant::now();
    let mut command = vmic();
    if extra.contains(&"--cache-dir") {
        command.env_remove("VMIC_NO_CACHE");
    }
    let result = command
        .args(customize_args(input, config, &build_dir, output, format))
        .arg("--timestamp-file")
        .arg(&timestamps)
        .args(extra)
        .output()
        .expect("running vmic customize");
    let seconds = started.elapsed().as_secs_f64();
    drop(_vm);
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert_eq!(
        sha256_of(input),
        before,
        "customize left the input {} unchanged",
        input.display()
    );
    let timestamps = std::fs::read_to_string(&timestamps)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    eprintln!(
        "customize {} with {} -> exit {:?} after {seconds:.1} s",
        input.display(),
        config.display(),
        result.status.code()
    );
    Customized {
        code: result.status.code(),
        stderr,
        seconds,
        timestamps,
    }
}

pub fn assert_no_partial(output: &Path) {
    let name = output.file_name().expect("output has a name");
    let partial = output.with_file_name(format!(".{}.vmic-partial", name.to_string_lossy()));
    assert!(
        !partial.exists(),
        "the partial output {} is gone",
        partial.display()
    );
}

/// What the marker service printed on one boot of an ISO.
pub struct Booted {
    pub host: String,
    pub cmdline: Vec<String>,
    /// `(path, line)` per `VMIC-TEST-FILE` line.
    pub files: Vec<(String, String)>,
    /// `uefi` or `bios`, from `/sys/firmware/efi` in the booted system.
    pub firmware: String,
    /// `enabled`, `disabled` or `unsupported`, from the SecureBoot EFI variable.
    pub secureboot: String,
    /// `NAME-VERSION-RELEASE.ARCH` per `VMIC-TEST-RPM` line: the rpm database of the booted
    /// system (rpm test images only).
    pub rpms: Vec<String>,
    /// The whole serial console of the boot ([`boot_with`] fills it in).
    pub console: String,
}

/// Everything but the console, which assertion messages show by its tail when they need it.
impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Booted")
            .field("host", &self.host)
            .field("cmdline", &self.cmdline)
            .field("files", &self.files)
            .field("firmware", &self.firmware)
            .field("secureboot", &self.secureboot)
            .field("rpms", &self.rpms)
            .finish_non_exhaustive()
    }
}

impl Booted {
    /// The lines of one file of `/etc/vmic-test/`.
    pub fn file(&self, name: &str) -> Vec<&str> {
        let path = format!("/etc/vmic-test/{name}");
        self.files
            .iter()
            .filter(|(file, _)| *file == path)
            .map(|(_, line)| line.as_str())
            .collect()
    }

    /// `key=value` from the probe's file.
    pub fn probe(&self, key: &str) -> Option<&str> {
        self.file("probe")
            .into_iter()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }

    pub fn count_arg(&self, predicate: impl Fn(&str) -> bool) -> usize {
        self.cmdline.iter().filter(|arg| predicate(arg)).count()
    }

    pub fn position(&self, arg: &str) -> Option<usize> {
        self.cmdline.iter().position(|a| a == arg)
    }
}

/// Parse the marker's lines out of a console log.
pub fn parse_marker(console: &str) -> Option<Booted> {
    let console = without_interleaved_printk(console);
    let mut lines = console.lines().filter_map(|line| {
        let at = line.find("VMIC-TEST-")?;
        Some(line[at..].trim_end().to_string())
    });
    let booted = lines.find(|line| line.starts_with("VMIC-TEST-BOOTED "))?;
    let rest = booted.strip_prefix("VMIC-TEST-BOOTED host=")?;
    let (host, cmdline) = rest.split_once(" cmdline=")?;
    let mut files = Vec::new();
    let mut rpms = Vec::new();
    let mut firmware = None;
    for line in lines {
        if line == "VMIC-TEST-END" {
            let (firmware, secureboot) = firmware?;
            return Some(Booted {
                host: host.to_string(),
                cmdline: cmdline.split_whitespace().map(str::to_string).collect(),
                files,
                firmware,
                secureboot,
                rpms,
                console: String::new(),
            });
        }
        if let Some(entry) = line.strip_prefix("VMIC-TEST-FIRMWARE firmware=") {
            let (name, secureboot) = entry.split_once(" secureboot=")?;
            firmware = Some((name.to_string(), secureboot.to_string()));
        }
        if let Some(package) = line.strip_prefix("VMIC-TEST-RPM ") {
            rpms.push(package.to_string());
        }
        if let Some(entry) = line.strip_prefix("VMIC-TEST-FILE ") {
            let (path, text) = entry
                .split_once(": ")
                .unwrap_or((entry.trim_end_matches(':'), ""));
            files.push((path.to_string(), text.to_string()));
        }
    }
    None
}

/// The serial console carries the kernel's messages too, and one can land in the middle of a
/// marker line (`boot-entrie[   16.59] kvm: Nested Virtualization enabled\ns=0`): cut such a
/// message out, and any messages right after it, and join the line back together.
pub fn without_interleaved_printk(console: &str) -> String {
    let mut out = String::with_capacity(console.len());
    let mut rest = console;
    // Inside a cut line: whole kernel lines are skipped until the line's own rest comes.
    let mut joining = false;
    while let Some(line_end) = rest.find('\n') {
        let line = &rest[..line_end];
        match printk_start(line) {
            Some(0) if joining => {}
            Some(at) if at > 0 => {
                out.push_str(&line[..at]);
                joining = true;
            }
            _ => {
                out.push_str(&rest[..=line_end]);
                joining = false;
            }
        }
        rest = &rest[line_end + 1..];
    }
    out.push_str(rest);
    out
}

/// Where a `[   12.345678] ` kernel timestamp starts in `line`.
fn printk_start(line: &str) -> Option<usize> {
    line.match_indices('[').map(|(at, _)| at).find(|&at| {
        let Some(close) = line[at..].find("] ") else {
            return false;
        };
        let stamp = line[at + 1..at + close].trim_start();
        let (seconds, micros) = stamp.split_once('.').unwrap_or(("", ""));
        !seconds.is_empty()
            && seconds.bytes().all(|b| b.is_ascii_digit())
            && micros.len() == 6
            && micros.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Boot `image` with `vmic boot` until the marker's last line; returns what it printed.
pub fn boot(image: &Path, firmware: &str, media: &str, timeout: u64) -> Booted {
    boot_with(image, firmware, media, false, timeout)
}

/// [`boot`], with Secure Boot enforced when `secure_boot` (`vmic boot --secure-boot`).
pub fn boot_with(
    image: &Path,
    firmware: &str,
    media: &str,
    secure_boot: bool,
    timeout: u64,
) -> Booted {
    let work = work_dir();
    let log = work.path().join("console.log");
    let _vm = vm_slot();
    let started = Instant::now();
    let mut command = vmic();
    command.arg("boot");
    if secure_boot {
        command.arg("--secure-boot");
    }
    let output = command
        .args(["--expect", "^VMIC-TEST-END", "--timeout"])
        .arg(timeout.to_string())
        .args(["--firmware", firmware, "--media", media, "--image-file"])
        .arg(image)
        .arg("--console-log")
        .arg(&log)
        .output()
        .expect("running vmic boot");
    let seconds = started.elapsed().as_secs_f64();
    drop(_vm);
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(
        output.status.success(),
        "vmic boot {} ({firmware}, {media}) failed after {seconds:.1} s:\n{}\nconsole tail:\n{}",
        image.display(),
        String::from_utf8_lossy(&output.stderr),
        tail(&console, 60)
    );
    eprintln!(
        "boot {} ({firmware}, {media}): VMIC-TEST-END after {seconds:.1} s",
        image.display()
    );
    let mut booted = parse_marker(&console).unwrap_or_else(|| {
        panic!(
            "the console log has the marker's lines (firmware line included):\n{}",
            tail(&console, 60)
        )
    });
    // What booted is what was asked for: a BIOS boot that fell back to UEFI (or the reverse)
    // would otherwise pass every test named after one of them.
    assert_eq!(
        booted.firmware,
        firmware,
        "{} booted under the firmware asked for: {booted:?}",
        image.display()
    );
    // vmic's default firmware is OVMF/AAVMF without enrolled keys: nothing is signature-checked;
    // with --secure-boot, everything is.
    let expected_secureboot: &[&str] = match (firmware, secure_boot) {
        ("bios", _) => &["unsupported"],
        (_, true) => &["enabled"],
        _ => &["disabled", "unsupported"],
    };
    assert!(
        expected_secureboot.contains(&booted.secureboot.as_str()),
        "SecureBoot state {:?} under {firmware}: {booted:?}",
        booted.secureboot
    );
    booted.console = console;
    booted
}

/// The console without the kernel's own messages (`[   12.345678] ...` lines). printk writes
/// straight to the UART, so on a busy host one can land inside a line a program was writing
/// through the tty and split it; taking them out joins the program's line again.
pub fn without_kernel_messages(console: &str) -> String {
    static KERNEL_MESSAGE: OnceLock<regex::Regex> = OnceLock::new();
    KERNEL_MESSAGE
        .get_or_init(|| regex::Regex::new(r"\[ *[0-9]+\.[0-9]{6}\] [^\n]*\n").expect("a regex"))
        .replace_all(console, "")
        .into_owned()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
