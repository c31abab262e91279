//! dracut's `dracut-install` with vmic's preload library, so that it copies files in the
//! process instead of forking `cp` for each (see `guest-agent/preload`: ~600 `cp` processes
//! for a LiveOS initrd, ~22 ms each under TCG).
//!
//! dracut runs `$DRACUT_INSTALL` word-split (its own docs suggest `valgrind dracut-install`),
//! so the agent sets it to this wrapper followed by the image's `dracut-install`. The wrapper
//! is the agent binary itself, in the chroot's `/run` under [`WRAPPER_NAME`] (`main`
//! dispatches on the program name): it sets `LD_PRELOAD` and execs the rest of its arguments.
//! The library drops `LD_PRELOAD` again as it loads, so nothing `dracut-install` starts sees it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// The program name the agent answers to as the wrapper.
pub const WRAPPER_NAME: &str = "vmic-dracut-install";

/// Where the wrapper lives inside the chroot (the build's tmpfs, left out of the squashfs).
pub const WRAPPER_CHROOT_PATH: &str = "/run/vmic-dracut-install";

/// Where the guest image keeps the library (`guest-image/build.py`).
pub const PRELOAD_GUEST_PATH: &str = "/usr/lib/vmic/vmic-preload.so";

/// Where the library is copied inside the chroot.
pub const PRELOAD_CHROOT_PATH: &str = "/run/vmic-preload.so";

/// One byte per call, appended by vmic-ldd ([`crate::ldd::TRACED`], [`crate::ldd::HANDED_OVER`])
/// and by the library ([`COPIED`], [`DECLINED`]; the path is spelled again in
/// `guest-agent/preload/src/lib.rs`): the agent reads it after dracut to say which fast paths
/// were taken. Created by the agent, never by them.
pub const TALLY_PATH: &str = "/run/vmic-dracut.tally";

/// The library's tally marks (one byte per `FICLONE` request it answered): copied, or declined
/// so that `dracut-install` used `cp` (for that request and, as `dracut-install` stops trying
/// to clone after a failure, for the rest of its run).
pub const COPIED: u8 = b'c';
pub const DECLINED: u8 = b'd';

/// Where dracut looks for `dracut-install` when `DRACUT_INSTALL` is unset: `find_binary` over
/// its default `DRACUT_PATH`, then `$dracutbasedir` (dracut 059's `dracut-init.sh`).
const DRACUT_PATH: [&str; 4] = ["/sbin", "/bin", "/usr/sbin", "/usr/bin"];
const DRACUT_BASEDIR_INSTALL: &str = "/usr/lib/dracut/dracut-install";

/// The `dracut-install` dracut would use in an image, given which of its paths are present as
/// executables or links (`find_binary`'s `-L || -x`), as a path inside the image.
pub fn image_dracut_install(present: impl Fn(&str) -> bool) -> Option<String> {
    DRACUT_PATH
        .iter()
        .map(|dir| format!("{dir}/dracut-install"))
        .chain(std::iter::once(DRACUT_BASEDIR_INSTALL.to_string()))
        .find(|path| present(path))
}

/// `DRACUT_INSTALL` for dracut: the wrapper, then the image's `dracut-install` (one of the
/// fixed paths above: dracut splits the value on white space).
pub fn dracut_install_env(image_dracut_install: &str) -> String {
    format!("{WRAPPER_CHROOT_PATH} {image_dracut_install}")
}

/// Run as the wrapper: `vmic-dracut-install PROGRAM ARGS...` execs `PROGRAM ARGS...` with the
/// library preloaded.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let Some((program, rest)) = args.split_first() else {
        eprintln!("{WRAPPER_NAME}: usage: {WRAPPER_NAME} PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let error = Command::new(program)
        .args(rest)
        .env("LD_PRELOAD", PRELOAD_CHROOT_PATH)
        .exec();
    eprintln!("{WRAPPER_NAME}: {}: {error}", program.to_string_lossy());
    // A shell's codes: not found, or found and not run.
    ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_dracut_install_is_found_where_dracut_looks_first() {
        let debian = |path: &str| path == "/usr/lib/dracut/dracut-install";
        assert_eq!(
            image_dracut_install(debian).as_deref(),
            Some("/usr/lib/dracut/dracut-install")
        );
        let both = |path: &str| {
            path == "/usr/lib/dracut/dracut-install" || path == "/usr/bin/dracut-install"
        };
        assert_eq!(
            image_dracut_install(both).as_deref(),
            Some("/usr/bin/dracut-install")
        );
        let sbin_first = |path: &str| path.ends_with("/dracut-install");
        assert_eq!(
            image_dracut_install(sbin_first).as_deref(),
            Some("/sbin/dracut-install")
        );
        assert_eq!(image_dracut_install(|_| false), None);
    }

    #[test]
    fn dracut_install_runs_the_wrapper_with_the_image_program_as_its_argument() {
        assert_eq!(
            dracut_install_env("/usr/lib/dracut/dracut-install"),
            "/run/vmic-dracut-install /usr/lib/dracut/dracut-install"
        );
    }
}
