//! `ldd` for dracut, without the shell. dracut asks `$DRACUT_LDD <file>` for the libraries of
//! every ELF file it installs (`dracut-install -R`, `find_binary`). glibc's `ldd` is a bash
//! script that, per file, runs the loader once for `--version`, once for `--verify` and once to
//! trace, in subshells: in the builder VM under TCG a call took ~50 ms, and dracut makes ~120
//! for a LiveOS initrd. This does what the script does for the one case dracut needs, a single dynamic
//! ELF file, with one loader process: the loader the script would pick (the first of the image
//! ldd's `RTLDLIST` that can load the file), the same environment, the output on stdout with
//! the loader's stderr merged in, exit 0 or 1. Anything else (no `/` in the name, not a
//! regular file, not ELF, static, an `ldd` that is not glibc's script) runs the image's own
//! `ldd` with the same arguments, so its messages and exit codes stay the script's.
//!
//! It runs inside the image's chroot as the agent binary itself, copied there under
//! [`LDD_NAME`] (`main` dispatches on the program name).

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::pipeline::elf::{choose_rtld, elf_id, rtld_list, ElfId};

/// The program name the agent answers to as `ldd`.
pub const LDD_NAME: &str = "vmic-ldd";

/// Where the copy lives inside the chroot: `/run` is the build's own tmpfs there, left out of
/// the squashfs.
pub const LDD_CHROOT_PATH: &str = "/run/vmic-ldd";

/// The tally's marks (see [`crate::dracut_install::TALLY_PATH`]): traced here, or handed to
/// the image's `ldd`.
pub const TRACED: u8 = b't';
pub const HANDED_OVER: u8 = b's';

/// How much of a file is read for its ELF header and program headers.
const HEAD_BYTES: usize = 64 * 1024;

/// The environment the script traces with (`add_env`; no `-d`, `-r`, `-u` or `-v`, and
/// `--verify` prints nothing).
pub const TRACE_ENV: [(&str, &str); 5] = [
    ("LD_TRACE_LOADED_OBJECTS", "1"),
    ("LD_WARN", ""),
    ("LD_BIND_NOW", ""),
    ("LD_LIBRARY_VERSION", ""),
    ("LD_VERBOSE", ""),
];

/// Run as `ldd`: trace the one dynamic ELF file given, or hand over to the image's `ldd`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let system_ldd = find_in_path("ldd");
    let plan = trace_plan(&args, system_ldd.as_deref());
    tally(match plan {
        Some(_) => TRACED,
        None => HANDED_OVER,
    });
    match plan {
        Some((rtld, file)) => {
            // The script prints the loader's stdout and stderr together on its stdout.
            let stderr = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_or_else(|_| Stdio::inherit(), Stdio::from);
            let status = Command::new(&rtld)
                .arg(&file)
                .envs(TRACE_ENV)
                .stdin(Stdio::null())
                .stderr(stderr)
                .status();
            match status {
                Ok(status) if status.success() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(error) => {
                    eprintln!("ldd: {}: {error}", rtld.display());
                    ExitCode::from(1)
                }
            }
        }
        None => match system_ldd {
            Some(ldd) => {
                let error = Command::new(&ldd).args(&args).exec();
                eprintln!("ldd: {}: {error}", ldd.display());
                ExitCode::from(126)
            }
            None => {
                eprintln!("ldd: no ldd in PATH");
                ExitCode::from(127)
            }
        },
    }
}

fn tally(mark: u8) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .append(true)
        .open(crate::dracut_install::TALLY_PATH)
    {
        let _ = file.write_all(&[mark]);
    }
}

/// The loader and file to trace, or `None` for the image's `ldd`.
fn trace_plan(args: &[OsString], system_ldd: Option<&Path>) -> Option<(PathBuf, PathBuf)> {
    let [file] = args else { return None };
    let file = PathBuf::from(file);
    // The script names files without a `/` `./name`; and checks existence, type and read
    // access with messages of its own.
    if !file.as_os_str().as_encoded_bytes().contains(&b'/') {
        return None;
    }
    let id = elf_id(&read_head(&file)?)?;
    if !id.dynamic {
        return None;
    }
    let script = read_head(system_ldd?)?;
    let candidates: Vec<(String, Option<ElfId>)> = rtld_list(&String::from_utf8_lossy(&script))?
        .into_iter()
        .map(|path| {
            let id = executable_elf_id(Path::new(&path));
            (path, id)
        })
        .collect();
    let rtld = choose_rtld(&id, &candidates)?;
    Some((PathBuf::from(rtld), file))
}

/// The first [`HEAD_BYTES`] of a regular file (checked first: opening a FIFO would block).
fn read_head(path: &Path) -> Option<Vec<u8>> {
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    file.take(HEAD_BYTES as u64).read_to_end(&mut head).ok()?;
    Some(head)
}

/// A loader candidate's identity, when it is an executable regular file (the script's
/// `test -x`).
fn executable_elf_id(path: &Path) -> Option<ElfId> {
    if !is_executable_file(path) {
        return None;
    }
    elf_id(&read_head(path)?)
}

/// `name` as `execlp` would find it.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// A regular file someone may execute (the script's and `execlp`'s `test -x`).
fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_files_of_this_host_read_as_the_loader_sees_them() {
        let sh = elf_id(&read_head(Path::new("/bin/sh")).unwrap()).unwrap();
        assert!(sh.dynamic, "{sh:?}");
        let agent = std::env::current_exe().unwrap();
        assert_eq!(elf_id(&read_head(&agent).unwrap()).unwrap().class, sh.class);
    }
}
