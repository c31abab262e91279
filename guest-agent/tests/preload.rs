//! The preload library (`guest-agent/preload`) loaded into a real program on this host, as the
//! builder VM loads it into an image's `dracut-install`: python3 makes the `ioctl` calls
//! `dracut-install` makes. And the agent run as the wrapper that preloads it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The library, built for this host's musl target (the guest image builds the same crate for
/// both arches) into a directory of this test's target directory.
fn library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
        let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preload");
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("preload");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "--locked",
                "--target",
                &target,
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(&crate_dir)
            .status()
            .expect("running cargo");
        assert!(status.success(), "building guest-agent/preload: {status}");
        target_dir.join(&target).join("release/libvmic_preload.so")
    })
}

/// A directory to work in. The library's tally (`/run/vmic-dracut.tally`) is a fixed path of
/// the chroot; the ISO tests read it in the builder VM.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        Scene {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// python3 (the system's: a wrapper script, such as a pyenv shim, would take the library
    /// out of the environment before python starts) with the library preloaded runs `script` in the scene's directory; its stdout.
    fn python(&self, script: &str) -> String {
        let output = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .env("LD_PRELOAD", library())
            .output()
            .expect("running python3");
        assert!(
            output.status.success(),
            "python3 failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&output.stderr).contains("preloaded"),
            "the loader refused the library: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// What `dracut-install`'s `cp()` does: open the source, create the destination (its mode
/// under umask 022), ask for a clone. Prints `ok` or the errno.
const CLONE: &str = r#"
import errno, fcntl, os, sys
FICLONE = 0x40049409
def name(e):  # errorcode[95] is ENOTSUP, its alias
    return 'EOPNOTSUPP' if e.errno == errno.EOPNOTSUPP else errno.errorcode[e.errno]
def clone(src, dst):
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.stat(src).st_mode & 0o7777 & ~0o022)
    try:
        fcntl.ioctl(d, FICLONE, s)
        print("ok")
    except OSError as e:
        print(name(e))
"#;

fn write_file(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_clone_request_is_answered_with_the_bytes_and_permission_bits_of_the_source() {
    let scene = Scene::new();
    // Larger than one pipe buffer and not a multiple of a page; group-writable, which the
    // destination's umask dropped.
    let bytes: Vec<u8> = (0..300_001u32).map(|i| (i * 7 + i / 251) as u8).collect();
    write_file(&scene.path("src"), &bytes, 0o775);
    let out = scene.python(&format!("{CLONE}\nclone('src', 'dst')"));
    assert_eq!(out.trim(), "ok");
    assert_eq!(std::fs::read(scene.path("dst")).unwrap(), bytes);
    assert_eq!(mode_of(&scene.path("dst")), 0o775);
    // An empty file too.
    write_file(&scene.path("empty"), b"", 0o600);
    let out = scene.python(&format!("{CLONE}\nclone('empty', 'empty-dst')"));
    assert_eq!(out.trim(), "ok");
    assert_eq!(std::fs::read(scene.path("empty-dst")).unwrap(), b"");
    assert_eq!(mode_of(&scene.path("empty-dst")), 0o600);
}

#[test]
fn set_id_programs_and_non_files_are_declined_so_that_cp_copies_them() {
    let scene = Scene::new();
    write_file(&scene.path("suid"), b"#!/bin/sh\n", 0o4755);
    write_file(&scene.path("sgid"), b"#!/bin/sh\n", 0o2755);
    std::fs::create_dir(scene.path("dir")).unwrap();
    let out = scene.python(&format!(
        "{CLONE}\nclone('suid', 'suid-dst')\nclone('sgid', 'sgid-dst')\n\
         r, w = os.pipe()\n\
         d = os.open('pipe-dst', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n\
         try:\n    fcntl.ioctl(d, FICLONE, r)\nexcept OSError as e:\n    print(name(e))\n"
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["EOPNOTSUPP", "EOPNOTSUPP", "EOPNOTSUPP"]
    );
    assert_eq!(std::fs::read(scene.path("suid-dst")).unwrap(), b"");
    assert_eq!(std::fs::read(scene.path("pipe-dst")).unwrap(), b"");
}

#[test]
fn other_ioctls_reach_the_kernel_with_their_results_and_errors() {
    let scene = Scene::new();
    write_file(&scene.path("plain"), b"x", 0o644);
    let out = scene.python(
        "import array, errno, fcntl, os, termios\n\
         r, w = os.pipe()\nos.write(w, b'12345')\n\
         n = array.array('i', [0])\nfcntl.ioctl(r, termios.FIONREAD, n)\nprint(n[0])\n\
         f = os.open('plain', os.O_RDONLY)\n\
         try:\n    fcntl.ioctl(f, termios.TCGETS, bytes(64))\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["5", "ENOTTY"]);
}

#[test]
fn the_library_is_loaded_and_leaves_no_ld_preload_to_what_the_program_starts() {
    let scene = Scene::new();
    write_file(&scene.path("src"), b"x", 0o644);
    let out = scene.python(&format!(
        "{CLONE}\nclone('src', 'dst')\n\
         import subprocess\n\
         print(any(l.rstrip().endswith('libvmic_preload.so') for l in open('/proc/self/maps')))\n\
         print(os.environ.get('LD_PRELOAD'))\n\
         print(subprocess.run(['sh', '-c', 'echo \"[$LD_PRELOAD]\"'], capture_output=True, text=True).stdout.strip())\n",
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["ok", "True", "None", "[]"]
    );
    // The tally is appended to only where the agent created it; not on this host.
    assert!(!Path::new("/run/vmic-dracut.tally").exists());
}

#[test]
fn the_agent_as_the_wrapper_runs_its_arguments_with_the_library_preloaded() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("vmic-dracut-install");
    std::fs::copy(env!("CARGO_BIN_EXE_vmic-agent"), &wrapper).unwrap();
    // `env` prints the environment it was given; the library's chroot path does not exist
    // here, so the loader skips it with a warning and env runs as it is.
    let output = Command::new(&wrapper)
        .args(["/usr/bin/env", "-u", "PATH"])
        .env_clear()
        .env("KEPT", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["KEPT=1", "LD_PRELOAD=/run/vmic-preload.so"]
    );
    let missing = Command::new(&wrapper)
        .arg(dir.path().join("no-such-program"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("vmic-dracut-install:"));
    let usage = Command::new(&wrapper).output().unwrap();
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
}
