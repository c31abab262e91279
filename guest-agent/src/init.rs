//! PID 1: the mount table, `vmic.*` kernel command line keys, the boot modules (loaded by
//! `modules.rs`), the build's memory bound (`memory.rs`), the server child, reaping, and the
//! one way out: sync and power off.

use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vmic_protocol::{Level, AGENT_VSOCK_PORT};

use crate::channel::ChannelSpec;
use crate::console;
use crate::context;
use crate::server;

/// `PATH` for the agent and everything it runs.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Kernel modules to load at boot, in order, one per line: a name (`virtio_blk`) or a path
/// relative to `/lib/modules/<release>/` ending in `.ko` (written by the guest-image builder).
/// Only device drivers: there is no udev, but file systems load on demand through the
/// kernel's `modprobe` call when a mount needs them, which saves ~2 s of boot under TCG.
const MODULES_BOOT: &str = "/etc/vmic/modules.boot";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

/// What PID 1 mounts, in order (the kernel's devtmpfs is not auto-mounted in our kernels).
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    // The build's memory bound (memory.rs) is a cgroup under it.
    Mount {
        source: "cgroup2",
        target: crate::memory::CGROUP_ROOT,
        fstype: "cgroup2",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
];

/// Something worth telling the host once the channel is up (it is not up during init).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub level: Level,
    pub message: String,
}

fn note(notes: &mut Vec<Note>, level: Level, message: String) {
    if level != Level::Debug || context::debug_enabled() {
        console!("{message}");
    }
    notes.push(Note { level, message });
}

/// Settings read from `vmic.*` keys on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub channel: ChannelSpec,
    pub debug: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCmdline {
    pub settings: Settings,
    /// Unknown keys and bad values (ignored, reported to the host).
    pub warnings: Vec<String>,
}

/// Read `vmic.transport=vsock|serial` (default serial), `vmic.port=N` (vsock port, default
/// [`AGENT_VSOCK_PORT`]) and `vmic.debug=1`.
pub fn parse_cmdline(cmdline: &str) -> ParsedCmdline {
    let mut warnings = Vec::new();
    let mut vsock = false;
    let mut port = AGENT_VSOCK_PORT;
    let mut debug = false;
    for word in cmdline.split_whitespace() {
        let Some(key_value) = word.strip_prefix("vmic.") else {
            continue;
        };
        let (key, value) = key_value.split_once('=').unwrap_or((key_value, "1"));
        match key {
            "transport" => match value {
                "serial" => vsock = false,
                "vsock" => vsock = true,
                _ => warnings.push(format!("unknown vmic.transport={value}, using serial")),
            },
            "port" => match value.parse() {
                Ok(value) => port = value,
                Err(_) => warnings.push(format!("invalid vmic.port={value}, using {port}")),
            },
            "debug" => debug = !matches!(value, "0" | "false" | "no" | "off"),
            _ => warnings.push(format!("unknown kernel command line key vmic.{key}")),
        }
    }
    let channel = if vsock {
        ChannelSpec::Vsock { port }
    } else {
        ChannelSpec::Serial
    };
    ParsedCmdline {
        settings: Settings { channel, debug },
        warnings,
    }
}

/// Run as PID 1: prepare the machine, fork the server, reap, power off. Never returns.
pub fn run() -> ! {
    let start = Instant::now();
    let mut notes = Vec::new();
    for mount in MOUNTS {
        if let Err(error) = mount_one(mount) {
            note(
                &mut notes,
                Level::Warn,
                format!("cannot mount {} on {}: {error}", mount.fstype, mount.target),
            );
        }
    }
    ensure_standard_fds();
    std::env::set_var("PATH", PATH);
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let ParsedCmdline { settings, warnings } = parse_cmdline(&cmdline);
    context::set_debug(settings.debug);
    for warning in warnings {
        note(&mut notes, Level::Warn, warning);
    }
    load_modules(Path::new(MODULES_BOOT), &mut notes);
    // Before the fork: the server and everything it runs inherit the cgroup.
    match crate::memory::limit_build_memory() {
        Ok(high) => note(
            &mut notes,
            Level::Debug,
            format!("the build's memory.high: {} MiB", high >> 20),
        ),
        Err(error) => note(
            &mut notes,
            Level::Warn,
            format!("no memory bound for the build (the host's memory use will grow with the image): {error:#}"),
        ),
    }
    note(
        &mut notes,
        Level::Debug,
        format!(
            "init done in {} ms, serving on {}",
            start.elapsed().as_millis(),
            settings.channel
        ),
    );

    // SAFETY: PID 1 is single-threaded here (no thread has been spawned yet), so the child
    // may run arbitrary code after fork.
    let server_pid = unsafe { libc::fork() };
    match server_pid {
        0 => {
            let code = match server::run(settings.channel, notes) {
                Ok(()) => 0,
                Err(error) => {
                    console!("{error:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        -1 => {
            console!(
                "fork failed ({}); serving from PID 1",
                io::Error::last_os_error()
            );
            if let Err(error) = server::run(settings.channel, notes) {
                console!("{error:#}");
            }
        }
        _ => reap_until(server_pid),
    }
    power_off()
}

fn mount_one(mount: &Mount) -> io::Result<()> {
    // A missing mount point is created; if that fails, mount(2) reports the real problem.
    let _ = fs::create_dir_all(mount.target);
    let c =
        |text: &str| CString::new(text).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target, fstype, data) = (
        c(mount.source)?,
        c(mount.target)?,
        c(mount.fstype)?,
        c(mount.data)?,
    );
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            mount.flags,
            data.as_ptr().cast(),
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        // Already mounted (e.g. a kernel with DEVTMPFS_MOUNT): fine.
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(error);
        }
    }
    Ok(())
}

/// The kernel gives PID 1 `/dev/console` as fds 0-2 only if the initramfs has that node.
/// Make sure they are open, so that no channel or file ever lands on 0, 1 or 2.
fn ensure_standard_fds() {
    let console = File::options()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| File::options().read(true).write(true).open("/dev/null"));
    let Ok(console) = console else { return };
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: `console` is an open descriptor; dup2 onto a closed slot affects no Rust-owned fd.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname(2) fills `release` with a NUL-terminated string.
    unsafe { CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn load_modules(order: &Path, notes: &mut Vec<Note>) {
    let start = Instant::now();
    let root = Path::new("/lib/modules").join(kernel_release());
    match crate::modules::load_listed(order, root) {
        Err(_) => note(
            notes,
            Level::Debug,
            format!("no {}: loading no modules", order.display()),
        ),
        Ok(loaded) => {
            for failure in loaded.failures {
                note(notes, Level::Warn, failure);
            }
            note(
                notes,
                Level::Debug,
                format!(
                    "loaded {} modules in {} ms",
                    loaded.count,
                    start.elapsed().as_millis()
                ),
            );
        }
    }
}

/// Wait for children, reaping orphans, until the server child `server` ends.
fn reap_until(server: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == server {
            if libc::WIFSIGNALED(status) {
                console!(
                    "server (pid {pid}) killed by signal {}",
                    libc::WTERMSIG(status)
                );
            } else {
                console!(
                    "server (pid {pid}) exited with code {}",
                    libc::WEXITSTATUS(status)
                );
            }
            return;
        }
        if pid < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                console!("waitpid failed: {error}");
                return;
            }
        }
    }
}

/// The one way out of PID 1: stop everything, unmount, sync, power off. Outside PID 1 (tests,
/// `--stdio`) this only exits the process.
pub fn power_off() -> ! {
    if std::process::id() != 1 {
        std::process::exit(1);
    }
    console!("syncing and powering off");
    // SAFETY: from PID 1, kill(-1) signals every other process; none of them is needed now.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: a null status pointer is allowed.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid < 0 || Instant::now() > deadline {
            break;
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    unmount_all();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: we are PID 1 and everything is synced; this does not return on success.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    console!("power off failed: {}", io::Error::last_os_error());
    std::process::exit(1)
}

/// Unmount everything but `/`, innermost first, so data disks are clean. Errors are ignored:
/// sync follows anyway.
fn unmount_all() {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let targets: Vec<CString> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|target| *target != "/")
        .filter_map(|target| CString::new(target.replace("\\040", " ")).ok())
        .collect();
    for target in targets.iter().rev() {
        // SAFETY: `target` is a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keys() {
        let cases: &[(&str, ChannelSpec, bool, usize)] = &[
            ("console=ttyS0 panic=-1", ChannelSpec::Serial, false, 0),
            ("vmic.transport=serial", ChannelSpec::Serial, false, 0),
            (
                "vmic.transport=vsock",
                ChannelSpec::Vsock { port: 1024 },
                false,
                0,
            ),
            (
                "vmic.port=5000 vmic.transport=vsock",
                ChannelSpec::Vsock { port: 5000 },
                false,
                0,
            ),
            (
                "vmic.transport=vsock vmic.port=x",
                ChannelSpec::Vsock { port: 1024 },
                false,
                1,
            ),
            ("vmic.debug=1", ChannelSpec::Serial, true, 0),
            ("vmic.debug", ChannelSpec::Serial, true, 0),
            (
                "vmic.debug=0 vmic.transport=carrier-pigeon vmic.colour=blue",
                ChannelSpec::Serial,
                false,
                2,
            ),
        ];
        for (cmdline, channel, debug, warnings) in cases {
            let parsed = parse_cmdline(cmdline);
            assert_eq!(parsed.settings.channel, *channel, "{cmdline}");
            assert_eq!(parsed.settings.debug, *debug, "{cmdline}");
            assert_eq!(
                parsed.warnings.len(),
                *warnings,
                "{cmdline}: {:?}",
                parsed.warnings
            );
        }
    }
}
