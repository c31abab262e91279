//! Paths inside a target root (the image, the ISO tree): one scoped-join helper, so that a
//! symlink in an untrusted image can never lead a write outside it.

use std::path::{Component, Path, PathBuf};

use anyhow::bail;

/// Resolve `path` (absolute or relative, as seen from inside `root`) to a host path under
/// `root`, following symlinks as the image would see them: an absolute link target restarts
/// at `root`, `..` never climbs above it. The last component need not exist.
pub fn scoped_join(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut pending: Vec<String> = Vec::new();
    push_components(&mut pending, path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." | "" => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = join(root, &resolved).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    bail!("too many symlinks resolving {path} in {}", root.display());
                }
                let target = std::fs::read_link(&candidate)?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                let mut parts = Vec::new();
                push_components(&mut parts, &target);
                for part in parts.into_iter().rev() {
                    pending.push(part);
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(join(root, &resolved))
}

fn push_components(out: &mut Vec<String>, path: &str) {
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => out.push(part.to_string_lossy().into_owned()),
            Component::ParentDir => out.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut path = root.to_path_buf();
    for part in parts {
        path.push(part);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_cannot_escape_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        symlink("/etc", root.join("link-abs")).expect("symlink");
        symlink("../../../../etc", root.join("etc/up")).expect("symlink");
        symlink("/", root.join("rootlink")).expect("symlink");
        assert_eq!(
            scoped_join(root, "/etc/hostname").expect("join"),
            root.join("etc/hostname")
        );
        assert_eq!(
            scoped_join(root, "/link-abs/x").expect("join"),
            root.join("etc/x")
        );
        assert_eq!(
            scoped_join(root, "/etc/up/passwd").expect("join"),
            root.join("etc/passwd")
        );
        assert_eq!(scoped_join(root, "../../x").expect("join"), root.join("x"));
        assert_eq!(
            scoped_join(root, "/rootlink/../../y").expect("join"),
            root.join("y")
        );
        symlink("loop", root.join("loop")).expect("symlink");
        assert!(scoped_join(root, "/loop/x").is_err());
    }
}
