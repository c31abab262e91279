//! QEMU must not outlive vmic, even a SIGKILLed one. Linux has `PR_SET_PDEATHSIG` (see
//! `qemu.rs`); elsewhere (macOS) a watchdog process does it: vmic re-executes itself with
//! `VMIC_ORPHAN_WATCHDOG=<child pid>:<vmic pid>`, and that process kills the child as soon as
//! its parent is no longer vmic (re-parented to launchd/init), then exits; it also exits once
//! the child is gone.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The environment variable that turns the `vmic` binary into the watchdog.
pub const WATCHDOG_ENV: &str = "VMIC_ORPHAN_WATCHDOG";
/// How often the watchdog looks (a VM left running for this long is harmless).
const POLL: Duration = Duration::from_millis(200);

/// A running watchdog; dropping it stops it (its child is then vmic's business again).
#[derive(Debug)]
pub struct Watchdog(Child);

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a watchdog for `child_pid` where the OS has no parent-death signal; `Ok(None)` where
/// none is needed (Linux). An error is reported by the caller: the build goes on without it.
pub fn watch(child_pid: Option<u32>) -> std::io::Result<Option<Watchdog>> {
    let Some(child_pid) = child_pid.filter(|_| !cfg!(target_os = "linux")) else {
        return Ok(None);
    };
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env(WATCHDOG_ENV, format!("{child_pid}:{}", std::process::id()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command.spawn().map(|child| Some(Watchdog(child)))
}

/// In `main`, before anything else: when started as a watchdog, watch and return the exit
/// code; otherwise `None`.
pub fn run_if_watchdog() -> Option<u8> {
    let value = std::env::var_os(WATCHDOG_ENV)?;
    let pids = value.to_str().and_then(|text| {
        let (child, parent) = text.split_once(':')?;
        Some((child.parse::<i32>().ok()?, parent.parse::<i32>().ok()?))
    });
    match pids {
        Some((child, parent)) if child > 1 && parent > 1 => {
            watchdog(child, parent);
            Some(0)
        }
        _ => {
            eprintln!("error: {WATCHDOG_ENV} must be <child pid>:<parent pid>, both above 1");
            Some(2)
        }
    }
}

#[cfg(unix)]
fn watchdog(pid: i32, parent: i32) {
    loop {
        // SAFETY: signal 0 only checks that the process exists; no memory is involved.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return; // the child is gone (reaped): nothing to guard
        }
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            // vmic died: we were re-parented (to init/launchd). Take QEMU with it.
            // SAFETY: sending a signal to a pid touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(not(unix))]
fn watchdog(_pid: i32, _parent: i32) {}
