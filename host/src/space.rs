//! Free space on the file systems a build writes to: checked before it starts and watched
//! while it runs, so that a build stops with a clear error before the host's disk is full
//! (a full disk otherwise surfaces as an I/O error deep in the guest, far from its cause).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

const MIB: u64 = 1 << 20;
/// Space a running build leaves free on the host: it stops before it takes the last of it.
pub const RESERVE: u64 = 256 * MIB;
/// How often the watch looks.
const EVERY: Duration = Duration::from_secs(2);

/// Bytes free for unprivileged writes on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("checking free space in {}", dir.display()));
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Refuse to start when the build directory or the output's directory clearly lack room:
/// failing after minutes of TCG work is worse than failing now. The estimates follow the
/// input's allocated bytes: the scratch disk holds the squashfs (about half of that) plus the
/// ISO tree and the ISO; the overlay takes what customization writes; a disk output holds
/// all the input's data plus the changes.
pub fn check_space(
    input: &Path,
    build_dir: &Path,
    output_dir: &Path,
    iso_output: bool,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let allocated = fs_err::metadata(input)?.blocks() * 512;
    let build_need = allocated + allocated / 5 + 256 * MIB;
    let output_need = if iso_output {
        allocated * 7 / 10 + 64 * MIB
    } else {
        allocated + 256 * MIB
    };
    let same_fs = fs_err::metadata(build_dir)?.dev() == fs_err::metadata(output_dir)?.dev();
    let checks: Vec<(&Path, u64, &str)> = if same_fs {
        vec![(
            build_dir,
            build_need + output_need,
            "build directory (also holds the output)",
        )]
    } else {
        vec![
            (build_dir, build_need, "build directory"),
            (output_dir, output_need, "output directory"),
        ]
    };
    for (dir, need, what) in checks {
        let free = free_bytes(dir)?;
        if free < need {
            return Err(crate::report::hinted(
                format!(
                    "not enough space in the {what} {}: {} MiB free, about {} MiB needed",
                    dir.display(),
                    free / MIB,
                    need / MIB
                ),
                "free some space or pass --build-dir on a larger file system",
            ));
        }
    }
    Ok(())
}

/// Resolves, with the error to report, once a watched directory's file system has less than
/// `reserve` bytes free; runs beside the build, which is dropped when this resolves.
pub async fn watch(dirs: Vec<(PathBuf, &'static str)>, reserve: u64) -> anyhow::Error {
    watch_with(dirs, reserve, EVERY, free_bytes).await
}

async fn watch_with(
    dirs: Vec<(PathBuf, &'static str)>,
    reserve: u64,
    every: Duration,
    probe: impl Fn(&Path) -> anyhow::Result<u64>,
) -> anyhow::Error {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        for (dir, what) in &dirs {
            match probe(dir) {
                Ok(free) if free < reserve => {
                    return crate::report::hinted(
                        format!(
                            "the {what} {} is almost full ({} MiB free, under the {} MiB vmic leaves free); the build was stopped and its files removed",
                            dir.display(),
                            free / MIB,
                            reserve / MIB
                        ),
                        "free some space there, or build on a larger file system (--build-dir, the output path)",
                    );
                }
                Ok(_) => {}
                // A directory that cannot be checked now (removed under us) is not a reason to
                // stop; the build reports what it meets.
                Err(error) => tracing::debug!("free space of {}: {error:#}", dir.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_watch_stops_the_build_once_a_directory_falls_under_the_reserve() {
        // The output directory loses 100 MiB per look; the build directory stays roomy.
        let output_free = AtomicU64::new(1000 * MIB);
        let looks = AtomicU64::new(0);
        let probe = |dir: &Path| {
            looks.fetch_add(1, Ordering::SeqCst);
            Ok(match dir.to_str() {
                Some("/out") => output_free.fetch_sub(100 * MIB, Ordering::SeqCst) - 100 * MIB,
                _ => 50_000 * MIB,
            })
        };
        let dirs = vec![
            (PathBuf::from("/build"), "build directory"),
            (PathBuf::from("/out"), "output directory"),
        ];
        let started = tokio::time::Instant::now();
        let error = watch_with(dirs, RESERVE, EVERY, probe).await;
        let message = format!("{error:#}");
        assert!(
            message.contains(
                "the output directory /out is almost full (200 MiB free, under the 256 MiB"
            ),
            "{message}"
        );
        // 1000 → 200 MiB in eight looks, one every EVERY (the first at once).
        assert_eq!(started.elapsed(), EVERY * 7);
        assert_eq!(looks.load(Ordering::SeqCst), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_lets_a_build_run_while_there_is_room_or_no_answer() {
        let probe = |dir: &Path| match dir.to_str() {
            Some("/gone") => Err(anyhow::anyhow!("no such directory")),
            _ => Ok(RESERVE),
        };
        let dirs = vec![
            (PathBuf::from("/build"), "build directory"),
            (PathBuf::from("/gone"), "output directory"),
        ];
        let watched = tokio::time::timeout(
            Duration::from_secs(24 * 3600),
            watch_with(dirs, RESERVE, EVERY, probe),
        )
        .await;
        assert!(watched.is_err(), "stopped a build that had room");
    }

    #[test]
    fn free_bytes_reads_the_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        let missing = free_bytes(&dir.path().join("missing")).expect_err("missing");
        assert!(format!("{missing:#}").contains("missing"), "{missing:#}");
    }
}
