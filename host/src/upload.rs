//! What a directory upload (the config directory, `os.additionalDirs` sources,
//! `--package-source` directories) takes from the host: regular files and directories that
//! belong to it. A symlink leading out of the directory is refused (naming it) unless the config
//! names that file explicitly; a symlink loop is refused at once; special files are left out;
//! the total size is capped.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmic_protocol::ExecRequest;

/// All uploads of one build together: they land on the scratch disk and cross the transport.
pub const UPLOAD_TOTAL_LIMIT: u64 = 4 << 30;
/// Directory entries one walk visits at most: links to sibling directories can multiply a
/// small tree without forming a loop.
pub const MAX_ENTRIES: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot list {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a symlink to {}, outside {}: only what lies inside the directory is uploaded (name the file in the config, or copy it in, to upload it)", link.display(), target.display(), root.display())]
    OutsideLink {
        link: PathBuf,
        target: PathBuf,
        root: PathBuf,
    },
    #[error("{} is a symlink to {}, which contains it: a symlink loop", link.display(), target.display())]
    Loop { link: PathBuf, target: PathBuf },
    #[error("{} holds more than {MAX_ENTRIES} entries (counting what its symlinks lead to): upload a smaller directory", root.display())]
    TooMany { root: PathBuf },
    #[error("the files uploaded into the builder VM exceed {} GiB (at {}): leave large files out of the config directory and the directories it names", UPLOAD_TOTAL_LIMIT >> 30, path.display())]
    TooLarge { path: PathBuf },
}

/// One file to copy into the builder VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub local: PathBuf,
    pub guest: String,
    pub mode: u32,
    /// The size when gathered: what the plan's limits counted, and the most that is sent.
    pub size: u64,
}

/// The upload stage: copy the plan's files into the builder VM, below `root` (created even
/// when nothing is uploaded: scripts find the config directory there).
pub async fn send(
    session: &crate::session::Session,
    root: &str,
    uploads: &[Upload],
) -> anyhow::Result<()> {
    let mut directories: Vec<String> = uploads
        .iter()
        .filter_map(|upload| Path::new(&upload.guest).parent())
        .map(|parent| parent.to_string_lossy().into_owned())
        .collect();
    directories.sort();
    directories.dedup();
    directories.insert(0, root.to_string());
    let mut mkdir = vec!["mkdir".to_string(), "-p".to_string()];
    mkdir.extend(directories);
    let result = session.exec(ExecRequest::new(mkdir), |_, _| {}).await?;
    if result.code != 0 {
        bail!(
            "creating upload directories: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    for upload in uploads {
        session
            .put_file_within(&upload.local, &upload.guest, upload.mode, upload.size)
            .await
            .with_context(|| format!("uploading {}", upload.local.display()))?;
    }
    Ok(())
}

/// Running total of the bytes uploaded, checked against [`UPLOAD_TOTAL_LIMIT`].
#[derive(Debug, Default)]
pub struct UploadBudget {
    used: u64,
}

impl UploadBudget {
    pub fn take(&mut self, path: &Path, bytes: u64) -> Result<(), UploadError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > UPLOAD_TOTAL_LIMIT {
            return Err(UploadError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }
}

/// The regular files below `root`, as paths relative to it, sorted. `exclude` (canonical
/// paths) are left out; a symlink whose target lies outside `root` is an error unless its
/// relative path is in `named_outside` (files the config names may live anywhere).
pub fn list_files(
    root: &Path,
    exclude: &[PathBuf],
    named_outside: &[PathBuf],
) -> Result<Vec<PathBuf>, UploadError> {
    let canonical_root = std::fs::canonicalize(root).map_err(|source| UploadError::List {
        path: root.to_path_buf(),
        source,
    })?;
    let mut walk = Walk {
        root,
        canonical_root: &canonical_root,
        exclude,
        named_outside,
        files: Vec::new(),
        visited: 0,
    };
    walk.dir(Path::new(""), &mut vec![canonical_root.clone()])?;
    walk.files.sort();
    Ok(walk.files)
}

struct Walk<'a> {
    root: &'a Path,
    canonical_root: &'a Path,
    exclude: &'a [PathBuf],
    named_outside: &'a [PathBuf],
    files: Vec<PathBuf>,
    visited: usize,
}

impl Walk<'_> {
    /// `ancestors`: the canonical directories from the root down to this one, so a link back
    /// into any of them is a loop, found at the link itself.
    fn dir(&mut self, relative: &Path, ancestors: &mut Vec<PathBuf>) -> Result<(), UploadError> {
        let dir = self.root.join(relative);
        let list_error = |source| UploadError::List {
            path: dir.clone(),
            source,
        };
        let mut entries = std::fs::read_dir(&dir)
            .map_err(list_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(list_error)?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            self.visited += 1;
            if self.visited > MAX_ENTRIES {
                return Err(UploadError::TooMany {
                    root: self.root.to_path_buf(),
                });
            }
            let path = entry.path();
            let child = relative.join(entry.file_name());
            let Ok(link_metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            // Broken links and unreadable entries are left out, as before.
            let Ok(target) = std::fs::canonicalize(&path) else {
                continue;
            };
            if self
                .exclude
                .iter()
                .any(|excluded| target.starts_with(excluded))
            {
                continue;
            }
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            if link_metadata.file_type().is_symlink() {
                if !target.starts_with(self.canonical_root) {
                    if metadata.is_file() && self.named_outside.contains(&child) {
                        self.files.push(child);
                        continue;
                    }
                    return Err(UploadError::OutsideLink {
                        link: path,
                        target,
                        root: self.root.to_path_buf(),
                    });
                }
                if metadata.is_dir() && ancestors.contains(&target) {
                    return Err(UploadError::Loop { link: path, target });
                }
            }
            if metadata.is_dir() {
                ancestors.push(target);
                self.dir(&child, ancestors)?;
                ancestors.pop();
            } else if metadata.is_file() {
                self.files.push(child);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temp dir");
        let config = root.path().join("config");
        fs_err::create_dir_all(config.join("sub")).expect("mkdir");
        fs_err::write(config.join("a.txt"), "a").expect("write");
        fs_err::write(config.join("sub/b.txt"), "b").expect("write");
        fs_err::write(root.path().join("secret"), "secret").expect("write");
        root
    }

    #[test]
    fn files_and_inside_links_are_listed() {
        let root = tree();
        let config = root.path().join("config");
        symlink("sub/b.txt", config.join("link.txt")).expect("symlink");
        symlink("sub", config.join("linked-dir")).expect("symlink");
        symlink("missing", config.join("broken")).expect("symlink");
        let files = list_files(&config, &[], &[]).expect("listed");
        let files: Vec<_> = files.iter().map(|path| path.to_string_lossy()).collect();
        assert_eq!(
            files,
            ["a.txt", "link.txt", "linked-dir/b.txt", "sub/b.txt"]
        );
    }

    #[test]
    fn a_link_out_of_the_directory_is_refused_naming_it_unless_the_config_names_it() {
        let root = tree();
        let config = root.path().join("config");
        symlink("../../secret", config.join("sub/innocent.txt")).expect("symlink");
        let error = list_files(&config, &[], &[]).expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("sub/innocent.txt"), "{message}");
        assert!(message.contains("secret"), "{message}");
        assert!(matches!(error, UploadError::OutsideLink { .. }));
        let named = [PathBuf::from("sub/innocent.txt")];
        let files = list_files(&config, &[], &named).expect("named by the config");
        assert!(files.contains(&PathBuf::from("sub/innocent.txt")));
        // A directory link out of the tree is refused even when named.
        symlink("..", config.join("up")).expect("symlink");
        assert!(matches!(
            list_files(&config, &[], &named),
            Err(UploadError::OutsideLink { .. })
        ));
    }

    #[test]
    fn symlink_loops_are_found_at_once() {
        let root = tree();
        let config = root.path().join("config");
        symlink(".", config.join("a")).expect("symlink");
        symlink(".", config.join("b")).expect("symlink");
        let start = std::time::Instant::now();
        let error = list_files(&config, &[], &[]).expect_err("loop");
        assert!(matches!(error, UploadError::Loop { .. }), "{error}");
        assert!(error.to_string().contains("config/a"), "{error}");
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        // A loop through two directories pointing at each other.
        let other = tempfile::tempdir().expect("temp dir");
        fs_err::create_dir_all(other.path().join("x")).expect("mkdir");
        fs_err::create_dir_all(other.path().join("y")).expect("mkdir");
        symlink("../y", other.path().join("x/to-y")).expect("symlink");
        symlink("../x", other.path().join("y/to-x")).expect("symlink");
        assert!(matches!(
            list_files(other.path(), &[], &[]),
            Err(UploadError::Loop { .. })
        ));
    }

    #[test]
    fn special_files_and_excluded_paths_are_left_out() {
        let root = tree();
        let config = root.path().join("config");
        let fifo = std::ffi::CString::new(
            config
                .join("fifo")
                .to_str()
                .expect("utf-8")
                .as_bytes()
                .to_vec(),
        )
        .expect("c string");
        // SAFETY: a valid C string; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let excluded = std::fs::canonicalize(config.join("sub")).expect("canonical");
        let files = list_files(&config, &[excluded], &[]).expect("listed");
        assert_eq!(files, [PathBuf::from("a.txt")]);
    }

    #[test]
    fn the_budget_caps_the_total() {
        let mut budget = UploadBudget::default();
        budget
            .take(Path::new("a"), UPLOAD_TOTAL_LIMIT - 1)
            .expect("fits");
        budget.take(Path::new("b"), 1).expect("fits exactly");
        let error = budget.take(Path::new("c"), 1).expect_err("over");
        assert!(error.to_string().contains("at c"), "{error}");
    }
}
