//! `os.additionalDirs`: directory trees copied into the image with AzL-IC's permission fields.
//!
//! Directories the copy creates (the destination's missing parents too) get
//! `newDirPermissions` (default 0755); directories that already existed get
//! `mergedDirPermissions` when set; files get `childFilePermissions`, else the mode of the
//! source file; symlinks are copied as links. Everything the copy writes is owned by root,
//! the agent's user.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmic_protocol::DirCopy;

use crate::rootfs::scoped_join;

const DEFAULT_NEW_DIR_PERMISSIONS: u32 = 0o755;

pub(crate) fn copy_additional_dirs(root: &Path, dirs: &[DirCopy]) -> anyhow::Result<()> {
    for dir in dirs {
        if !dir.destination.starts_with('/') {
            bail!("destination {} is not an absolute path", dir.destination);
        }
        let source = Path::new(&dir.source);
        if !source.is_dir() {
            bail!("source {} is not a directory", dir.source);
        }
        ensure_dir(root, &dir.destination, dir)?;
        copy_tree(root, source, &dir.destination, dir)
            .with_context(|| format!("copying {} to {}", dir.source, dir.destination))?;
    }
    Ok(())
}

/// Create `path` in the image (and its missing parents), or apply `mergedDirPermissions` to
/// it when it exists. Symlinks in the image are followed (inside it): copying into `/lib`
/// merges into `/usr/lib` when `/lib` links there.
fn ensure_dir(root: &Path, path: &str, dir: &DirCopy) -> anyhow::Result<()> {
    let target = scoped_join(root, path)?;
    ensure_resolved_dir(root, &target, dir)
}

/// [`ensure_dir`] on a path `scoped_join` resolved: no component of it is a symlink, so
/// creating the missing ones (all after the last existing one) cannot leave the image.
/// Missing parents count as created by the copy: newDirPermissions, not merged.
fn ensure_resolved_dir(root: &Path, target: &Path, dir: &DirCopy) -> anyhow::Result<()> {
    let shown = in_image(root, target);
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            if let Some(mode) = dir_mode(true, dir) {
                set_mode(target, mode, &shown)?;
            }
            return Ok(());
        }
        Ok(_) => bail!("{shown} exists in the image and is not a directory"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("inspecting {shown}")),
    }
    if let Some(parent) = target.parent().filter(|parent| parent.starts_with(root)) {
        if !parent.is_dir() {
            ensure_resolved_dir(root, parent, dir)?;
        }
    }
    std::fs::create_dir(target).with_context(|| format!("creating {shown}"))?;
    let mode = dir_mode(false, dir).expect("a created directory always gets a mode");
    set_mode(target, mode, &shown)
}

/// How a host path under `root` is named in the image, for messages.
fn in_image(root: &Path, target: &Path) -> String {
    let relative = target.strip_prefix(root).unwrap_or(target);
    format!("/{}", relative.display())
}

fn copy_tree(root: &Path, source: &Path, destination: &str, dir: &DirCopy) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(source)
        .with_context(|| format!("reading {}", source.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", source.display()))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let from = entry.path();
        let to = format!("{}/{name}", destination.trim_end_matches('/'));
        let meta = std::fs::symlink_metadata(&from)
            .with_context(|| format!("inspecting {}", from.display()))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            ensure_dir(root, &to, dir)?;
            copy_tree(root, &from, &to, dir)?;
        } else if file_type.is_symlink() {
            let link = std::fs::read_link(&from)
                .with_context(|| format!("reading the link {}", from.display()))?;
            let target = entry_in_image(root, destination, &name)?;
            remove_non_dir(&target, &to)?;
            symlink(&link, &target).with_context(|| format!("creating the link {to}"))?;
        } else if file_type.is_file() {
            let target = entry_in_image(root, destination, &name)?;
            remove_non_dir(&target, &to)?;
            std::fs::copy(&from, &target).with_context(|| format!("writing {to}"))?;
            set_mode(&target, file_mode(meta.permissions().mode(), dir), &to)?;
        } else {
            bail!(
                "{} is not a file, directory or symlink; only those can be copied",
                from.display()
            );
        }
    }
    Ok(())
}

/// The host path of entry `name` of image directory `directory`. Only the directory is
/// resolved: a file or link in the image where the source has one is replaced, not
/// written through (a link there could point anywhere in the image).
fn entry_in_image(root: &Path, directory: &str, name: &str) -> anyhow::Result<PathBuf> {
    Ok(scoped_join(root, directory)?.join(name))
}

/// Remove a file or link at `target` so that what replaces it is new (owned by root); a
/// directory there is an error.
fn remove_non_dir(target: &Path, path: &str) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            bail!("{path} is a directory in the image, the source has a file there")
        }
        Ok(_) => std::fs::remove_file(target).with_context(|| format!("replacing {path}")),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("inspecting {path}")),
    }
}

/// The mode a directory gets: created ones always, existing ones only when asked.
fn dir_mode(existed: bool, dir: &DirCopy) -> Option<u32> {
    if existed {
        dir.merged_dir_permissions
    } else {
        Some(
            dir.new_dir_permissions
                .unwrap_or(DEFAULT_NEW_DIR_PERMISSIONS),
        )
    }
}

fn file_mode(source_mode: u32, dir: &DirCopy) -> u32 {
    dir.child_file_permissions.unwrap_or(source_mode & 0o7777)
}

fn set_mode(target: &Path, mode: u32, path: &str) -> anyhow::Result<()> {
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the permissions of {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    fn spec(source: &Path, destination: &str) -> DirCopy {
        DirCopy {
            source: source.to_string_lossy().into_owned(),
            destination: destination.to_owned(),
            new_dir_permissions: None,
            merged_dir_permissions: None,
            child_file_permissions: None,
        }
    }

    fn source_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path();
        std::fs::create_dir_all(source.join("sub/deeper")).expect("mkdir");
        std::fs::write(source.join("run.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(source.join("run.sh"), PermissionsExt::from_mode(0o750))
            .expect("chmod");
        std::fs::write(source.join("sub/deeper/data"), "data").expect("write");
        std::fs::set_permissions(
            source.join("sub/deeper/data"),
            PermissionsExt::from_mode(0o640),
        )
        .expect("chmod");
        symlink("../run.sh", source.join("sub/link")).expect("symlink");
        dir
    }

    #[test]
    fn modes_follow_the_azl_ic_fields() {
        let unset = spec(Path::new("/s"), "/d");
        assert_eq!(dir_mode(false, &unset), Some(0o755));
        assert_eq!(dir_mode(true, &unset), None);
        assert_eq!(file_mode(0o100_750, &unset), 0o750);
        let set = DirCopy {
            new_dir_permissions: Some(0o700),
            merged_dir_permissions: Some(0o775),
            child_file_permissions: Some(0o600),
            ..unset
        };
        assert_eq!(dir_mode(false, &set), Some(0o700));
        assert_eq!(dir_mode(true, &set), Some(0o775));
        assert_eq!(file_mode(0o100_750, &set), 0o600);
    }

    #[test]
    fn a_tree_is_copied_with_files_links_and_directories() {
        let source = source_tree();
        let image = tempfile::tempdir().expect("tempdir");
        let root = image.path();
        std::fs::create_dir_all(root.join("opt")).expect("mkdir");
        std::fs::set_permissions(root.join("opt"), PermissionsExt::from_mode(0o711))
            .expect("chmod");

        let dirs = [spec(source.path(), "/opt/app/tree")];
        copy_additional_dirs(root, &dirs).expect("copy");
        let tree = root.join("opt/app/tree");
        assert_eq!(
            mode_of(&root.join("opt")),
            0o711,
            "existing parents are left alone"
        );
        assert_eq!(mode_of(&root.join("opt/app")), 0o755);
        assert_eq!(mode_of(&tree), 0o755);
        assert_eq!(mode_of(&tree.join("sub/deeper")), 0o755);
        assert_eq!(mode_of(&tree.join("run.sh")), 0o750);
        assert_eq!(mode_of(&tree.join("sub/deeper/data")), 0o640);
        assert_eq!(
            std::fs::read_to_string(tree.join("sub/deeper/data")).expect("read"),
            "data"
        );
        assert_eq!(
            std::fs::read_link(tree.join("sub/link")).expect("readlink"),
            Path::new("../run.sh")
        );

        // Again, into what now exists: merged directories and replaced files and links.
        let merged = [DirCopy {
            merged_dir_permissions: Some(0o750),
            child_file_permissions: Some(0o600),
            ..spec(source.path(), "/opt/app/tree")
        }];
        copy_additional_dirs(root, &merged).expect("copy again");
        assert_eq!(mode_of(&tree), 0o750);
        assert_eq!(mode_of(&tree.join("sub/deeper")), 0o750);
        assert_eq!(
            mode_of(&root.join("opt/app")),
            0o755,
            "not part of the copy"
        );
        assert_eq!(mode_of(&tree.join("run.sh")), 0o600);
        assert_eq!(
            std::fs::read_link(tree.join("sub/link")).expect("readlink"),
            Path::new("../run.sh")
        );
    }

    #[test]
    fn symlinks_in_the_image_cannot_lead_the_copy_outside() {
        let source = source_tree();
        let image = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = image.path();
        symlink(outside.path(), root.join("escape")).expect("symlink");
        copy_additional_dirs(root, &[spec(source.path(), "/escape/tree")]).expect("copy");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "nothing written outside the image"
        );
        assert!(root
            .join(outside.path().strip_prefix("/").expect("absolute"))
            .join("tree/run.sh")
            .is_file());
    }

    #[test]
    fn a_file_where_a_directory_goes_is_an_error() {
        let source = source_tree();
        let image = tempfile::tempdir().expect("tempdir");
        let root = image.path();
        std::fs::write(root.join("tree"), "file").expect("write");
        let error = copy_additional_dirs(root, &[spec(source.path(), "/tree")])
            .expect_err("not a directory");
        assert!(
            error
                .to_string()
                .contains("/tree exists in the image and is not a directory"),
            "{error:#}"
        );
    }
}
