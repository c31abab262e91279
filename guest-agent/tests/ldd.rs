//! The agent run as dracut's `ldd` (`vmic-ldd`) prints what glibc's `ldd` script prints, with
//! the same exit code, for this host's own files (Debian 12: the test images' glibc): its own
//! trace for dynamic ELF files, the script itself for everything else.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Ldd {
    _dir: tempfile::TempDir,
    vmic_ldd: PathBuf,
    /// A directory whose `ldd` is the system's script plus a line logging its arguments.
    path_dir: PathBuf,
    log: PathBuf,
}

fn setup() -> Ldd {
    let dir = tempfile::tempdir().expect("temp dir");
    let vmic_ldd = dir.path().join("vmic-ldd");
    std::fs::copy(env!("CARGO_BIN_EXE_vmic-agent"), &vmic_ldd).expect("copying the agent");
    let path_dir = dir.path().join("bin");
    std::fs::create_dir(&path_dir).unwrap();
    let log = dir.path().join("fallbacks.log");
    let script = std::fs::read_to_string("/usr/bin/ldd").expect("glibc's ldd script");
    let (shebang, rest) = script.split_once('\n').expect("a script");
    let logged = format!(
        "{shebang}\nprintf '%s\\n' \"$*\" >> '{}'\n{rest}",
        log.display()
    );
    let ldd = path_dir.join("ldd");
    std::fs::write(&ldd, logged).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ldd, std::fs::Permissions::from_mode(0o755)).unwrap();
    Ldd {
        _dir: dir,
        vmic_ldd,
        path_dir,
        log,
    }
}

/// Output (stdout and stderr together, as dracut-install reads it) with load addresses, which
/// differ per run, masked; and the exit code.
fn run(program: &Path, file: &str, path: &str) -> (String, i32) {
    let output = Command::new("/bin/sh")
        .args(["-c", "exec \"$0\" \"$1\" 2>&1"])
        .arg(program)
        .arg(file)
        .env("PATH", path)
        .env("LC_ALL", "C")
        .output()
        .expect("running ldd");
    let text = String::from_utf8_lossy(&output.stdout);
    let masked: Vec<String> = text
        .split(" (0x")
        .enumerate()
        .map(|(index, part)| match index {
            0 => part.to_string(),
            _ => match part.split_once(')') {
                Some((_, rest)) => format!(" (ADDR){rest}"),
                None => format!(" (0x{part}"),
            },
        })
        .collect();
    (masked.concat(), output.status.code().unwrap_or(-1))
}

impl Ldd {
    /// Compares with the system's `ldd`; true when vmic-ldd handed over to the script.
    fn compare(&self, file: &str) -> bool {
        let path = format!("{}:/usr/bin:/bin", self.path_dir.display());
        let expected = run(Path::new("/usr/bin/ldd"), file, "/usr/bin:/bin");
        let _ = std::fs::remove_file(&self.log);
        let actual = run(&self.vmic_ldd, file, &path);
        assert_eq!(actual, expected, "vmic-ldd {file} against ldd {file}");
        self.log.exists()
    }
}

/// A library `ldd /bin/bash` names (`name` is a prefix of its file name).
fn library_of_bash(name: &str) -> String {
    let (text, _) = run(Path::new("/usr/bin/ldd"), "/bin/bash", "/usr/bin:/bin");
    text.lines()
        .find_map(|line| {
            let path = line.split("=> ").nth(1)?.split(' ').next()?;
            let file = Path::new(path).file_name()?.to_str()?;
            file.starts_with(name).then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in ldd /bin/bash: {text}"))
}

#[test]
fn dynamic_elf_files_are_traced_by_vmic_ldd_as_the_script_would() {
    let ldd = setup();
    let libc = library_of_bash("libc.so");
    let tinfo = library_of_bash("libtinfo.so");
    let (loader_line, _) = run(Path::new("/usr/bin/ldd"), "/bin/sh", "/usr/bin:/bin");
    let loader = loader_line
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with('/') && line.contains("ld-linux"))
        .and_then(|line| line.split(' ').next())
        .expect("the loader in ldd /bin/sh")
        .to_string();
    // A program, a library with an interpreter (libc), one without, the loader itself, and a
    // static-pie program (Debian's ldconfig: ET_DYN with a dynamic section, no interpreter).
    for file in [
        "/bin/sh",
        "/usr/bin/bash",
        &libc,
        &tinfo,
        &loader,
        "/sbin/ldconfig",
    ] {
        assert!(!ldd.compare(file), "{file} was handed to the script");
    }
}

#[test]
fn everything_else_goes_to_the_images_own_ldd() {
    let ldd = setup();
    // A static ELF program: a header and one PT_LOAD, no dynamic section.
    let static_elf = ldd.path_dir.join("static");
    let mut head = vec![0u8; 120];
    head[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    head[16] = 2; // ET_EXEC
    head[18] = 62; // x86_64
    head[32] = 64; // e_phoff
    head[54] = 56; // e_phentsize
    head[56] = 1; // e_phnum
    head[64] = 1; // PT_LOAD
    std::fs::write(&static_elf, head).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&static_elf, std::fs::Permissions::from_mode(0o755)).unwrap();
    let static_elf = static_elf.to_str().unwrap();
    // It, a script, a directory, a missing file, a name without a slash.
    for file in [
        static_elf,
        "/usr/bin/ldd",
        "/usr/bin",
        "/no/such/file",
        "sh",
    ] {
        assert!(ldd.compare(file), "{file} was not handed to the script");
    }
}

/// Every program of this host, and what each says, as the script says it: the programs and
/// libraries of a dracut initrd come from the same kind of system.
#[test]
fn every_program_in_usr_bin_gets_the_scripts_answer() {
    let ldd = setup();
    let mut traced = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir("/usr/bin")
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    for file in &files {
        if !ldd.compare(file.to_str().unwrap()) {
            traced += 1;
        }
    }
    assert!(
        traced * 2 > files.len(),
        "most of /usr/bin is dynamic ELF: {traced} of {} traced by vmic-ldd",
        files.len()
    );
}
