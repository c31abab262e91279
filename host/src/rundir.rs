//! The build directory and the partial output: one vmic at a time per build directory (an
//! `flock` that dies with the process), a fresh private directory per run for its files, and the
//! leftovers of a run that was killed (SIGKILL leaves no chance to clean up) removed by the next.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside a build directory.
const LOCK_NAME: &str = ".vmic.lock";
/// Per-run directories are `run-<pid>`: everything of one run lives there.
const RUN_PREFIX: &str = "run-";
/// Files older vmic versions put straight into the build directory.
const LEGACY_FILES: &[&str] = &["input-overlay.qcow2", "scratch.raw", "console.log"];

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("build directory {dir} is in use by vmic pid {pid}")]
    InUse { dir: PathBuf, pid: String },
    #[error("output {path} is being written by another vmic right now")]
    OutputBusy { path: PathBuf },
    #[error("{path} is a symbolic link; vmic never writes through one here")]
    Symlink { path: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RunDirError + 'a {
    move |source| RunDirError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Opens `path` for read/write without following a symlink at its last component.
fn open_no_follow(path: &Path, create_new: bool) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    options.open(path)
}

/// Takes an exclusive `flock` without waiting; `Ok(false)` when another process holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}

fn symlink_error(error: std::io::Error, path: &Path, action: &'static str) -> RunDirError {
    // O_NOFOLLOW on a symlink fails with ELOOP.
    if error.raw_os_error() == Some(libc::ELOOP) {
        RunDirError::Symlink {
            path: path.to_path_buf(),
        }
    } else {
        io(action, path)(error)
    }
}

/// A locked build directory with this run's private subdirectory. Dropping it removes the
/// subdirectory and releases the lock.
#[derive(Debug)]
pub struct BuildDir {
    root: PathBuf,
    run: PathBuf,
    /// What ended runs had left here, removed when it was acquired.
    leftovers: Vec<PathBuf>,
    _lock: File,
}

impl BuildDir {
    /// Locks `dir` (created if missing), removes what dead runs left there and makes this
    /// run's directory. A second vmic on the same directory gets [`RunDirError::InUse`] at once.
    pub fn acquire(dir: &Path) -> Result<Self, RunDirError> {
        fs_err::create_dir_all(dir).map_err(io("create", dir))?;
        let root = fs_err::canonicalize(dir).map_err(io("resolve", dir))?;
        let lock_path = root.join(LOCK_NAME);
        let mut lock =
            open_no_follow(&lock_path, false).map_err(|e| symlink_error(e, &lock_path, "open"))?;
        if !try_lock(&lock).map_err(io("lock", &lock_path))? {
            let mut text = String::new();
            // The holder's pid, bounded: the file is ours but the directory may not be.
            let _ = (&lock).take(32).read_to_string(&mut text);
            let pid = text.trim();
            return Err(RunDirError::InUse {
                dir: root,
                pid: if pid.is_empty() {
                    "?".into()
                } else {
                    pid.into()
                },
            });
        }
        lock.set_len(0).map_err(io("write", &lock_path))?;
        lock.rewind().map_err(io("write", &lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io("write", &lock_path))?;
        // We hold the lock, so whatever a run left here belongs to a run that is gone.
        let leftovers = remove_leftovers(&root)?;
        let run = root.join(format!("{RUN_PREFIX}{}", std::process::id()));
        // mkdir never follows a planted symlink: an existing name fails instead.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&run)
            .map_err(io("create", &run))?;
        Ok(Self {
            root,
            run,
            leftovers,
            _lock: lock,
        })
    }

    /// What ended runs had left in the directory (removed by [`BuildDir::acquire`]).
    pub fn leftovers(&self) -> &[PathBuf] {
        &self.leftovers
    }

    /// The build directory itself (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This run's private directory: overlay, scratch disk, console log, sockets.
    pub fn run_dir(&self) -> &Path {
        &self.run
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

/// Remove what ended runs left in `root`; returns the runs' paths removed.
fn remove_leftovers(root: &Path) -> Result<Vec<PathBuf>, RunDirError> {
    let mut leftovers = Vec::new();
    for entry in fs_err::read_dir(root).map_err(io("read", root))? {
        let entry = entry.map_err(io("read", root))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        // file_type() does not follow symlinks: a planted link is removed, not its target.
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        if name.starts_with(RUN_PREFIX) {
            let removed = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io("remove", &path))?;
            leftovers.push(path);
        } else if LEGACY_FILES.contains(&name.as_ref()) && !is_dir {
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
        }
    }
    Ok(leftovers)
}

/// The directory a file is written into: its parent, or `.` for a bare name.
pub fn parent_dir(file: &Path) -> &Path {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Temp name beside the output, so the final rename is atomic and a failed build leaves
/// nothing that looks like a finished output.
pub fn partial_path(output: &Path) -> PathBuf {
    hidden_sibling(output, "vmic-partial")
}

/// `.NAME.SUFFIX` beside `output`: vmic's temp names for what becomes `output`.
pub fn hidden_sibling(output: &Path, suffix: &str) -> PathBuf {
    let name = output
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_string());
    output.with_file_name(format!(".{name}.{suffix}"))
}

/// The output being written, under its temp name and locked for this run. Dropped without
/// [`PartialOutput::commit`], it is removed.
#[derive(Debug)]
pub struct PartialOutput {
    path: PathBuf,
    file: Option<File>,
    /// A run that ended had left this temp name; it was replaced.
    replaced_stale: bool,
}

impl PartialOutput {
    /// Creates the temp file beside `output`. One left by a killed run (nobody holds its lock)
    /// is replaced; one that a live vmic is writing is [`RunDirError::OutputBusy`].
    pub fn create(output: &Path) -> Result<Self, RunDirError> {
        let path = partial_path(output);
        let mut replaced_stale = false;
        for _ in 0..3 {
            match open_no_follow(&path, true) {
                Ok(file) => {
                    if !try_lock(&file).map_err(io("lock", &path))? {
                        return Err(RunDirError::OutputBusy { path });
                    }
                    return Ok(Self {
                        path,
                        file: Some(file),
                        replaced_stale,
                    });
                }
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    let existing = open_no_follow(&path, false)
                        .map_err(|e| symlink_error(e, &path, "open"))?;
                    if !try_lock(&existing).map_err(io("lock", &path))? {
                        return Err(RunDirError::OutputBusy { path });
                    }
                    std::fs::remove_file(&path).map_err(io("remove", &path))?;
                    replaced_stale = true;
                }
                Err(error) => return Err(symlink_error(error, &path, "create")),
            }
        }
        Err(RunDirError::OutputBusy { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a temp file that an ended run left under this name was replaced.
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }

    /// Renames the finished file to `output`.
    pub fn commit(mut self, output: &Path) -> Result<(), RunDirError> {
        fs_err::rename(&self.path, output).map_err(io("rename into place", output))?;
        self.file = None;
        Ok(())
    }
}

impl Drop for PartialOutput {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = BuildDir::acquire(dir.path()).unwrap();
        let error = BuildDir::acquire(dir.path()).unwrap_err();
        match &error {
            RunDirError::InUse { pid, .. } => assert_eq!(pid, &std::process::id().to_string()),
            other => panic!("expected InUse, got {other:?}"),
        }
        assert!(error.to_string().contains("is in use by vmic pid"));
        // The first run's directory is untouched by the refused second one.
        assert!(first.run_dir().is_dir());
        drop(first);
        let again = acquire_once_released(dir.path());
        assert!(again.run_dir().is_dir());
    }

    /// [`BuildDir::acquire`] right after this process dropped its `BuildDir` there. A process
    /// another test thread forked while the lock was held keeps a copy of its descriptor until
    /// it execs (`O_CLOEXEC`), so the lock can outlive the drop for a moment (seen under load):
    /// wait for the last copy with a blocking `flock`, which returns when it is released.
    fn acquire_once_released(dir: &Path) -> BuildDir {
        for _ in 0..100 {
            match BuildDir::acquire(dir) {
                Err(RunDirError::InUse { pid, .. }) if pid == std::process::id().to_string() => {
                    let (released, wait) = std::sync::mpsc::channel();
                    let path = dir.join(LOCK_NAME);
                    std::thread::spawn(move || {
                        let lock = open_no_follow(&path, false).unwrap();
                        // SAFETY: flock on a file descriptor we own; no memory is passed.
                        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
                        let _ = released.send(());
                    });
                    // A lock the drop did not release is held by this process for good.
                    wait.recv_timeout(std::time::Duration::from_secs(30))
                        .expect("the build directory stayed locked after its BuildDir was dropped");
                }
                other => return other.unwrap(),
            }
        }
        panic!("the build directory stayed locked after its BuildDir was dropped");
    }

    #[test]
    fn leftovers_of_dead_runs_are_removed_and_the_run_dir_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("run-999999");
        fs_err::create_dir(&dead).unwrap();
        fs_err::write(dead.join("scratch.raw"), b"config secrets").unwrap();
        fs_err::write(dir.path().join("scratch.raw"), b"old layout").unwrap();
        let keep = dir.path().join("user-file");
        fs_err::write(&keep, b"mine").unwrap();
        let build = BuildDir::acquire(dir.path()).unwrap();
        assert!(!dead.exists());
        let root = fs_err::canonicalize(dir.path()).unwrap();
        assert_eq!(build.leftovers(), [root.join("run-999999")], "reported");
        assert!(!dir.path().join("scratch.raw").exists());
        assert!(keep.exists(), "files that are not vmic's stay");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs_err::metadata(build.run_dir()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        let run = build.run_dir().to_path_buf();
        drop(build);
        assert!(!run.exists(), "the run directory goes with the run");
    }

    #[test]
    fn a_planted_symlink_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        fs_err::write(victim.path().join("precious"), b"x").unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path().join("run-1")).unwrap();
        let _build = BuildDir::acquire(dir.path()).unwrap();
        assert!(victim.path().join("precious").exists());
        assert!(!dir.path().join("run-1").exists());
    }

    #[test]
    fn a_symlinked_lock_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs_err::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_NAME)).unwrap();
        let error = BuildDir::acquire(dir.path()).unwrap_err();
        assert!(matches!(error, RunDirError::Symlink { .. }), "{error:?}");
        assert_eq!(fs_err::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn partial_output_replaces_a_stale_one_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("live.iso");
        fs_err::write(partial_path(&output), b"stale").unwrap();
        let partial = PartialOutput::create(&output).unwrap();
        assert_eq!(fs_err::read(partial.path()).unwrap(), b"");
        assert!(partial.replaced_stale(), "reported");
        let error = PartialOutput::create(&output).unwrap_err();
        assert!(matches!(error, RunDirError::OutputBusy { .. }), "{error:?}");
        fs_err::write(partial.path(), b"iso").unwrap();
        partial.commit(&output).unwrap();
        assert_eq!(fs_err::read(&output).unwrap(), b"iso");
        assert!(!partial_path(&output).exists());
    }

    #[test]
    fn partial_output_dropped_uncommitted_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.qcow2");
        let partial = PartialOutput::create(&output).unwrap();
        assert!(!partial.replaced_stale(), "nothing was there");
        let path = partial.path().to_path_buf();
        assert!(path.exists());
        drop(partial);
        assert!(!path.exists());
        assert!(!output.exists());
    }

    #[test]
    fn partial_output_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.raw");
        let target = dir.path().join("target");
        fs_err::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, partial_path(&output)).unwrap();
        let error = PartialOutput::create(&output).unwrap_err();
        assert!(matches!(error, RunDirError::Symlink { .. }), "{error:?}");
        assert_eq!(fs_err::read(&target).unwrap(), b"keep");
    }
}
