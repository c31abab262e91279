//! Checks on the output path made before anything starts: the output is never the input (by
//! path, symlink, hard link or device and inode), never a directory, never inside the build
//! directory (whose contents vmic removes).

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutputPathError {
    #[error("the output {output} is the input image {input}; vmic never writes its input")]
    IsInput { output: PathBuf, input: PathBuf },
    #[error("the output {output} is an existing directory")]
    IsDirectory { output: PathBuf },
    #[error(
        "the output {output} is inside the build directory {build_dir}, whose files vmic removes"
    )]
    InBuildDir { output: PathBuf, build_dir: PathBuf },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OutputPathError {
    /// What the user should do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            OutputPathError::IsInput { .. } => {
                "pass a different --output-image-file; the input stays as it is"
            }
            OutputPathError::IsDirectory { .. } => "pass a file name for --output-image-file",
            OutputPathError::InBuildDir { .. } => {
                "write the output outside --build-dir (or use another build directory)"
            }
            OutputPathError::Io { .. } => "check the path and its permissions",
        }
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system.
pub fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `path` made absolute and lexically normalised (`.`/`..` folded) without touching the file
/// system: for paths that may not exist yet.
pub fn absolute(path: &Path) -> PathBuf {
    lexical(&std::path::absolute(path).unwrap_or_else(|_| PathBuf::from("/").join(path)))
}

/// The real location of a path that may not exist: its deepest existing ancestor resolved
/// through symlinks, the rest appended.
fn resolve_lenient(path: &Path) -> PathBuf {
    let path = absolute(path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |acc, part| acc.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// Refuses an output that would overwrite the input or land where vmic cleans up.
pub fn check_output(input: &Path, output: &Path, build_dir: &Path) -> Result<(), OutputPathError> {
    let input_meta = std::fs::metadata(input).map_err(|source| OutputPathError::Io {
        path: input.to_path_buf(),
        source,
    })?;
    // metadata() follows a symlinked output: a link to the input is the input. The lexical
    // form too: `missing/../disk.qcow2` names the input once the directory exists.
    for meta in [
        std::fs::metadata(output),
        std::fs::metadata(absolute(output)),
    ]
    .into_iter()
    .flatten()
    {
        if meta.dev() == input_meta.dev() && meta.ino() == input_meta.ino() {
            return Err(OutputPathError::IsInput {
                output: output.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
        if meta.is_dir() {
            return Err(OutputPathError::IsDirectory {
                output: output.to_path_buf(),
            });
        }
    }
    let real_output = resolve_lenient(output);
    let real_build_dir = resolve_lenient(build_dir);
    if real_output.starts_with(&real_build_dir) {
        return Err(OutputPathError::InBuildDir {
            output: output.to_path_buf(),
            build_dir: build_dir.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        input: PathBuf,
        build: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("disk.qcow2");
        fs_err::write(&input, b"image").unwrap();
        let build = dir.path().join("build");
        Fixture { dir, input, build }
    }

    #[test]
    fn same_path_symlink_and_hard_link_are_the_input() {
        let f = fixture();
        let link = f.dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&f.input, &link).unwrap();
        let hard = f.dir.path().join("hard.qcow2");
        fs_err::hard_link(&f.input, &hard).unwrap();
        let dotted = f.dir.path().join("x/../disk.qcow2");
        for output in [&f.input, &link, &hard, &dotted] {
            let error = check_output(&f.input, output, &f.build).unwrap_err();
            assert!(
                matches!(error, OutputPathError::IsInput { .. }),
                "{output:?}: {error:?}"
            );
        }
    }

    #[test]
    fn a_new_file_beside_the_input_is_fine() {
        let f = fixture();
        check_output(&f.input, &f.dir.path().join("live.iso"), &f.build).unwrap();
        // An existing, different file is simply replaced at the end.
        let other = f.dir.path().join("old.iso");
        fs_err::write(&other, b"old").unwrap();
        check_output(&f.input, &other, &f.build).unwrap();
    }

    #[test]
    fn a_directory_is_refused() {
        let f = fixture();
        let error = check_output(&f.input, f.dir.path(), &f.build).unwrap_err();
        assert!(
            matches!(error, OutputPathError::IsDirectory { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn inside_the_build_dir_is_refused_existing_or_not() {
        let f = fixture();
        let inside = f.build.join("out/live.iso");
        let error = check_output(&f.input, &inside, &f.build).unwrap_err();
        assert!(
            matches!(error, OutputPathError::InBuildDir { .. }),
            "{error:?}"
        );
        fs_err::create_dir_all(&f.build).unwrap();
        // Through a symlinked directory too.
        let alias = f.dir.path().join("alias");
        std::os::unix::fs::symlink(&f.build, &alias).unwrap();
        let error = check_output(&f.input, &alias.join("live.iso"), &f.build).unwrap_err();
        assert!(
            matches!(error, OutputPathError::InBuildDir { .. }),
            "{error:?}"
        );
        // A sibling whose name merely starts like the build dir is fine.
        check_output(&f.input, &f.dir.path().join("build2.iso"), &f.build).unwrap();
    }

    #[test]
    fn absolute_folds_dots() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
    }
}
