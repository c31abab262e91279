//! `ldd` for dracut, without the shell. dracut asks `$DRACUT_LDD <file>` for the libraries of
//! every ELF file it installs (`dracut-install -R`, `find_binary`). glibc's `ldd` is a bash
//! script that, per file, runs the loader once for `--version`, once for `--verify` and once to
//! trace, in subshells: under TCG a process start costs ~20 ms, and that was ~22 s of a 117 s
//! dracut run. This does what the script does for the one case dracut needs, a single dynamic
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

/// The program name the agent answers to as `ldd`.
pub const LDD_NAME: &str = "vmic-ldd";

/// Where the copy lives inside the chroot: `/run` is the build's own tmpfs there, left out of
/// the squashfs.
pub const LDD_CHROOT_PATH: &str = "/run/vmic-ldd";

/// How much of a file is read for its ELF header and program headers.
const HEAD_BYTES: usize = 64 * 1024;

const PT_DYNAMIC: u32 = 2;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// What decides which loader can load an ELF file, and whether it has dynamic linking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfId {
    /// `EI_CLASS`: 1 = 32-bit, 2 = 64-bit.
    pub class: u8,
    /// `EI_DATA`: 1 = little-endian, 2 = big-endian.
    pub data: u8,
    pub machine: u16,
    /// `e_type` is `ET_EXEC` or `ET_DYN` and there is a `PT_DYNAMIC` program header.
    pub dynamic: bool,
}

impl ElfId {
    fn same_target(&self, other: &ElfId) -> bool {
        (self.class, self.data, self.machine) == (other.class, other.data, other.machine)
    }
}

/// The ELF identity of a file's first bytes; `None` when they are not a whole ELF header with
/// its program headers inside `head`.
pub fn elf_id(head: &[u8]) -> Option<ElfId> {
    if head.len() < 52 || head[..4] != *b"\x7fELF" {
        return None;
    }
    let (class, data) = (head[4], head[5]);
    let u16_at = |at: usize| -> Option<u16> {
        let bytes: [u8; 2] = head.get(at..at.checked_add(2)?)?.try_into().ok()?;
        match data {
            1 => Some(u16::from_le_bytes(bytes)),
            2 => Some(u16::from_be_bytes(bytes)),
            _ => None,
        }
    };
    let u32_at = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = head.get(at..at.checked_add(4)?)?.try_into().ok()?;
        match data {
            1 => Some(u32::from_le_bytes(bytes)),
            2 => Some(u32::from_be_bytes(bytes)),
            _ => None,
        }
    };
    let u64_at = |at: usize| -> Option<u64> {
        let bytes: [u8; 8] = head.get(at..at.checked_add(8)?)?.try_into().ok()?;
        match data {
            1 => Some(u64::from_le_bytes(bytes)),
            2 => Some(u64::from_be_bytes(bytes)),
            _ => None,
        }
    };
    let e_type = u16_at(16)?;
    let machine = u16_at(18)?;
    // e_phoff, e_phentsize, e_phnum: where the two classes differ.
    let (phoff, phentsize, phnum) = match class {
        1 => (u64::from(u32_at(28)?), u16_at(42)?, u16_at(44)?),
        2 => (u64_at(32)?, u16_at(54)?, u16_at(56)?),
        _ => return None,
    };
    let mut has_dynamic = false;
    for index in 0..u64::from(phnum) {
        let at = phoff.checked_add(index.checked_mul(u64::from(phentsize))?)?;
        let at = usize::try_from(at).ok()?;
        if u32_at(at)? == PT_DYNAMIC {
            has_dynamic = true;
        }
    }
    Some(ElfId {
        class,
        data,
        machine,
        dynamic: has_dynamic && (e_type == ET_EXEC || e_type == ET_DYN),
    })
}

/// The loaders glibc's `ldd` script tries, from its `RTLDLIST=` line; `None` when the script
/// has none or computes it (then it is not the script this replaces).
pub fn rtld_list(ldd_script: &str) -> Option<Vec<String>> {
    let value = ldd_script
        .lines()
        .find_map(|line| line.strip_prefix("RTLDLIST="))?;
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty() || value.contains(['$', '`', '"', '\'', '\\', ';', '(']) {
        return None;
    }
    Some(value.split_whitespace().map(str::to_string).collect())
}

/// The loader `ldd` would trace `file` with: the first candidate (in `RTLDLIST` order, with
/// its ELF identity when it is an executable file) built for the file's target. The script
/// asks each loader `--verify`, which fails for another class, byte order or machine.
pub fn choose_rtld<'a>(file: &ElfId, candidates: &'a [(String, Option<ElfId>)]) -> Option<&'a str> {
    candidates
        .iter()
        .find(|(_, id)| id.is_some_and(|id| id.same_target(file)))
        .map(|(path, _)| path.as_str())
}

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
    match trace_plan(&args, system_ldd.as_deref()) {
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
    let script = std::fs::read(system_ldd?).ok()?;
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

/// The first [`HEAD_BYTES`] of a regular file.
fn read_head(path: &Path) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut head = Vec::with_capacity(HEAD_BYTES);
    file.take(HEAD_BYTES as u64).read_to_end(&mut head).ok()?;
    Some(head)
}

/// A loader candidate's identity, when it is an executable regular file (the script's
/// `test -x`).
fn executable_elf_id(path: &Path) -> Option<ElfId> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() || metadata.permissions().mode() & 0o111 == 0 {
        return None;
    }
    elf_id(&read_head(path)?)
}

/// `name` as `execlp` would find it.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header with one program header of type `ptype`.
    fn elf(class: u8, data: u8, e_type: u16, machine: u16, ptype: u32) -> Vec<u8> {
        let mut head = vec![0u8; 256];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = class;
        head[5] = data;
        let put16 = |head: &mut Vec<u8>, at: usize, value: u16| {
            let bytes = if data == 1 {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            head[at..at + 2].copy_from_slice(&bytes);
        };
        let put32 = |head: &mut Vec<u8>, at: usize, value: u32| {
            let bytes = if data == 1 {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            head[at..at + 4].copy_from_slice(&bytes);
        };
        put16(&mut head, 16, e_type);
        put16(&mut head, 18, machine);
        if class == 2 {
            head[32] = if data == 1 { 64 } else { 0 };
            if data == 2 {
                head[39] = 64;
            }
            put16(&mut head, 54, 56);
            put16(&mut head, 56, 1);
            put32(&mut head, 64, ptype);
        } else {
            put32(&mut head, 28, 52);
            put16(&mut head, 42, 32);
            put16(&mut head, 44, 1);
            put32(&mut head, 52, ptype);
        }
        head
    }

    #[test]
    fn elf_headers_of_both_classes_and_byte_orders_are_read() {
        for (class, data) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            let id = elf_id(&elf(class, data, ET_DYN, 62, PT_DYNAMIC)).expect("an ELF header");
            assert_eq!(
                id,
                ElfId {
                    class,
                    data,
                    machine: 62,
                    dynamic: true
                },
                "class {class} data {data}"
            );
        }
    }

    #[test]
    fn only_executables_and_shared_objects_with_a_dynamic_section_are_dynamic() {
        // PT_LOAD only: static.
        assert!(!elf_id(&elf(2, 1, ET_EXEC, 62, 1)).unwrap().dynamic);
        assert!(elf_id(&elf(2, 1, ET_EXEC, 62, PT_DYNAMIC)).unwrap().dynamic);
        // ET_REL (a kernel module) with PT_DYNAMIC is still not a program.
        assert!(!elf_id(&elf(2, 1, 1, 62, PT_DYNAMIC)).unwrap().dynamic);
    }

    #[test]
    fn what_is_not_a_whole_elf_header_has_no_id() {
        assert_eq!(elf_id(b"#!/bin/sh\necho hi\n"), None);
        let whole = elf(2, 1, ET_DYN, 62, PT_DYNAMIC);
        assert_eq!(elf_id(&whole[..40]), None, "cut in the header");
        assert_eq!(elf_id(&whole[..66]), None, "cut in the program headers");
        let mut odd = whole.clone();
        odd[4] = 3;
        assert_eq!(elf_id(&odd), None, "unknown class");
        // Program headers claimed far beyond the bytes read.
        let mut far = whole;
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_id(&far), None, "program headers out of reach");
    }

    #[test]
    fn the_real_files_of_this_host_read_as_the_loader_sees_them() {
        let sh = elf_id(&read_head(Path::new("/bin/sh")).unwrap()).unwrap();
        assert!(sh.dynamic, "{sh:?}");
        let agent = std::env::current_exe().unwrap();
        assert_eq!(elf_id(&read_head(&agent).unwrap()).unwrap().class, sh.class);
    }

    #[test]
    fn rtldlist_is_read_from_glibcs_script() {
        let script = "#! /bin/bash\nTEXTDOMAIN=libc\nRTLDLIST=\"/lib/ld-linux.so.2 /lib64/ld-linux-x86-64.so.2 /libx32/ld-linux-x32.so.2\"\nwarn=\n";
        assert_eq!(
            rtld_list(script).unwrap(),
            [
                "/lib/ld-linux.so.2",
                "/lib64/ld-linux-x86-64.so.2",
                "/libx32/ld-linux-x32.so.2"
            ]
        );
        assert_eq!(
            rtld_list("RTLDLIST=/lib/ld-linux-aarch64.so.1\n").unwrap(),
            ["/lib/ld-linux-aarch64.so.1"]
        );
        assert_eq!(
            rtld_list("#!/bin/sh\nexec /lib/ld-musl-x86_64.so.1 --list \"$@\"\n"),
            None
        );
        assert_eq!(rtld_list("RTLDLIST=\"$(find /lib -name 'ld-*')\"\n"), None);
        assert_eq!(rtld_list("RTLDLIST=\n"), None);
    }

    #[test]
    fn the_loader_is_the_first_built_for_the_files_target() {
        let id = |class, machine| {
            Some(ElfId {
                class,
                data: 1,
                machine,
                dynamic: true,
            })
        };
        let candidates = vec![
            ("/lib/ld-linux.so.2".to_string(), id(1, 3)),
            ("/lib64/missing".to_string(), None),
            ("/lib64/ld-linux-x86-64.so.2".to_string(), id(2, 62)),
            ("/libx32/ld-linux-x32.so.2".to_string(), id(1, 62)),
        ];
        let file = |class, machine| ElfId {
            class,
            data: 1,
            machine,
            dynamic: true,
        };
        assert_eq!(
            choose_rtld(&file(2, 62), &candidates),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(
            choose_rtld(&file(1, 3), &candidates),
            Some("/lib/ld-linux.so.2")
        );
        assert_eq!(
            choose_rtld(&file(1, 62), &candidates),
            Some("/libx32/ld-linux-x32.so.2")
        );
        assert_eq!(
            choose_rtld(&file(2, 183), &candidates),
            None,
            "aarch64: no loader here"
        );
        let big_endian = ElfId {
            data: 2,
            ..file(2, 62)
        };
        assert_eq!(choose_rtld(&big_endian, &candidates), None);
    }
}
