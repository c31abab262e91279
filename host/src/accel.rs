//! Accelerator choice: KVM only when a Linux guest really boots with it, HVF on macOS, else TCG.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{AccelChoice, Arch};

pub use crate::machine::Accel;

/// Resolve the user's choice for a guest of `arch`. `probe_kernel` is a Linux kernel of the
/// host's arch used to check that KVM really runs guests (a device node is not proof: on a
/// nested PVM host `/dev/kvm` opens but Linux guests hang or die).
pub fn resolve(choice: AccelChoice, arch: Arch, probe_kernel: Option<&Path>) -> Accel {
    let native = Arch::host() == Some(arch);
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Hvf => Accel::Hvf,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto if !native => Accel::Tcg,
        AccelChoice::Auto if cfg!(target_os = "macos") => Accel::Hvf,
        AccelChoice::Auto => match probe_kernel {
            Some(kernel) if kvm_works(arch, kernel) => Accel::Kvm,
            _ => Accel::Tcg,
        },
    }
}

/// Boot `kernel` under KVM without a root file system: reaching the "unable to mount root"
/// panic proves the whole kernel boot path works. The verdict is cached per host kernel,
/// QEMU binary and guest kernel, since the probe costs up to a few seconds.
pub fn kvm_works(arch: Arch, kernel: &Path) -> bool {
    if fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let key = probe_key(arch, kernel);
    let cache = crate::guest_image::cache_dir().join("kvm-probe");
    let cached = cache.join(&key);
    if let Ok(verdict) = fs_err::read_to_string(&cached) {
        return verdict.trim() == "ok";
    }
    let ok = run_kvm_probe(arch, kernel);
    let _ = fs_err::create_dir_all(&cache);
    let _ = fs_err::write(&cached, if ok { "ok\n" } else { "fail\n" });
    tracing::debug!(ok, "KVM probe");
    ok
}

fn probe_key(arch: Arch, kernel: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let host_release = fs_err::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    hasher.update(host_release.as_bytes());
    let qemu = crate::machine::system_binary(arch);
    hasher.update(qemu.to_string_lossy().as_bytes());
    if let Ok(meta) = fs_err::metadata(&qemu) {
        hasher.update(meta.len().to_le_bytes());
        if let Ok(modified) = meta.modified() {
            hasher.update(format!("{modified:?}").as_bytes());
        }
    }
    // The kernel by content, not path: a rebuilt guest image (new agent) keeps its kernel,
    // and must not pay for the probe again.
    if let Ok(mut file) = fs_err::File::open(kernel) {
        use std::io::Read;
        let mut head = vec![0u8; 1 << 20];
        let read = file.read(&mut head).unwrap_or(0);
        hasher.update(&head[..read]);
        hasher.update(file.metadata().map(|m| m.len()).unwrap_or(0).to_le_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

fn run_kvm_probe(arch: Arch, kernel: &Path) -> bool {
    let qemu = crate::machine::system_binary(arch);
    let console = format!("console={}", crate::machine::console_device(arch));
    let machine = crate::machine::machine_type(arch);
    let mut child = match Command::new(&qemu)
        .args(["-accel", "kvm", "-M", machine, "-cpu", "host", "-m", "256"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &format!("{console} panic=-1 loglevel=4")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(_) => return false,
    };
    let stdout = child.stdout.take().expect("stdout was piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("Unable to mount root") || line.contains("Kernel panic") {
                let _ = sender.send(true);
                return;
            }
        }
        let _ = sender.send(false);
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let verdict = receiver
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or(false);
    let _ = child.kill();
    let _ = child.wait();
    verdict
}

/// Where KVM verdicts are cached (for tests and `doctor`).
pub fn probe_cache_dir() -> PathBuf {
    crate::guest_image::cache_dir().join("kvm-probe")
}
