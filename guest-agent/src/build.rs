//! What every guest pipeline shares: step timing and progress, running programs, mounts that
//! undo themselves, and finding the VM's disks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use vmic_protocol::{Event, ExecRequest, ExecResult, Level, Response, Step, StepTime};

use crate::context::RequestContext;

/// Progress, step timing and command running for one build.
pub(crate) struct Build<'a> {
    pub(crate) context: &'a RequestContext,
    pub(crate) steps: Vec<StepTime>,
    current: Option<(Step, Instant)>,
}

impl<'a> Build<'a> {
    pub(crate) fn new(context: &'a RequestContext) -> Build<'a> {
        Build {
            context,
            steps: Vec::new(),
            current: None,
        }
    }

    /// Start a step: tell the host (progress event with 0/0) and time it.
    pub(crate) fn step(&mut self, step: Step) -> anyhow::Result<()> {
        self.context.cancel.check()?;
        self.end_step();
        self.context.writer.event(
            Some(self.context.id),
            Event::Progress {
                step,
                done: 0,
                total: 0,
            },
        );
        self.current = Some((step, Instant::now()));
        Ok(())
    }

    pub(crate) fn end_step(&mut self) {
        if let Some((step, started)) = self.current.take() {
            self.steps.push(StepTime {
                step,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }

    pub(crate) fn log(&self, message: impl Into<String>) {
        self.context.writer.event(
            Some(self.context.id),
            Event::Log {
                level: Level::Info,
                message: message.into(),
            },
        );
    }

    /// Run a program; a non-zero exit is an error carrying the tail of its stderr.
    pub(crate) fn run(&self, argv: &[String], chroot: Option<&Path>) -> anyhow::Result<ExecResult> {
        succeeded(argv, self.run_unchecked(argv, chroot, Vec::new())?)
    }

    pub(crate) fn run_unchecked(
        &self,
        argv: &[String],
        chroot: Option<&Path>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<ExecResult> {
        let mut request = ExecRequest::new(argv.iter().cloned());
        request.env = env;
        if let Some(root) = chroot {
            request.chroot = Some(root.to_string_lossy().into_owned());
            request.cwd = Some("/".to_string());
        }
        match crate::exec::run(request, self.context)? {
            Response::Exec(result) => Ok(result),
            other => Err(anyhow!("unexpected exec response {other:?}")),
        }
    }
}

pub(crate) fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// `result` of running `argv`, or an error with the tail of its output if it exited non-zero.
pub(crate) fn succeeded(argv: &[String], result: ExecResult) -> anyhow::Result<ExecResult> {
    if result.code != 0 {
        bail!(
            "`{}` failed with exit code {}{}",
            argv.join(" "),
            result.code,
            output_tail(&result)
        );
    }
    Ok(result)
}

/// The last lines of a command's stderr (or stdout when stderr is empty), for errors.
pub(crate) fn output_tail(result: &ExecResult) -> String {
    let text = if result.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &result.stderr
    } else {
        &result.stdout
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(25)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{}", tail.join("\n"))
    }
}

/// Mount points made by the build, unmounted in reverse order however the build ends.
#[derive(Default)]
pub(crate) struct Mounts(Vec<PathBuf>);

impl Mounts {
    pub(crate) fn mount(
        &mut self,
        build: &Build<'_>,
        argv: Vec<String>,
        target: &Path,
    ) -> anyhow::Result<()> {
        // A file is a mount point for a bind-mounted file; anything else needs a directory.
        if !target.is_file() {
            fs_create_dir_all(target)?;
        }
        build.run(&argv, None)?;
        self.0.push(target.to_path_buf());
        Ok(())
    }

    /// Mount the ISO 9660 file system on `device` read-only at `target`.
    pub(crate) fn mount_iso(
        &mut self,
        build: &Build<'_>,
        device: &Path,
        target: &Path,
    ) -> anyhow::Result<()> {
        let mut argv = strings(["mount", "-t", "iso9660", "-o", "ro"]);
        argv.push(device.to_string_lossy().into_owned());
        argv.push(target.to_string_lossy().into_owned());
        self.mount(build, argv, target)
    }

    /// Unmount everything mounted at or below `prefix`, innermost first.
    pub(crate) fn unmount_below(&mut self, prefix: &Path) {
        let mut keep = Vec::new();
        while let Some(target) = self.0.pop() {
            if target.starts_with(prefix) {
                unmount(&target);
            } else {
                keep.push(target);
            }
        }
        keep.reverse();
        self.0 = keep;
    }
}

pub(crate) fn unmount(target: &Path) {
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a valid C string; MNT_DETACH as a fallback never blocks.
    unsafe {
        if libc::umount2(path.as_ptr(), 0) != 0 {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(target) = self.0.pop() {
            unmount(&target);
        }
    }
}

pub(crate) fn fs_create_dir_all(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

/// A virtio disk of the builder VM.
pub(crate) struct Disk {
    pub(crate) device: PathBuf,
    pub(crate) size_bytes: u64,
}

/// The virtio disk with this serial.
pub(crate) fn disk_by_serial(serial: &str) -> anyhow::Result<Disk> {
    let disks = crate::disks::list(Path::new(crate::disks::SYS_BLOCK))?;
    disks
        .into_iter()
        .find(|disk| disk.serial == serial)
        .map(|disk| Disk {
            device: PathBuf::from("/dev").join(&disk.name),
            size_bytes: disk.size_bytes,
        })
        .ok_or_else(|| anyhow!("no disk with serial {serial} in the builder VM"))
}
