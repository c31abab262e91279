//! Paths and files inside a target root (the image, the ISO tree, an input ISO): one
//! scoped-join helper, so that a symlink in an untrusted image can never lead a read or a write
//! outside it, and file helpers that refuse what is not a regular file and bound what they read.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::bail;

/// Size cap for the image's text files vmic reads (fstab, grub.cfg, the ISO record, SELinux
/// config, passwd-like files): far above any real one, small enough to hold in memory.
pub const MAX_IMAGE_TEXT: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error(
        "{path} in the image is {kind}, not a regular file; vmic reads and writes only regular \
         files there (replace it with a file in the image, or remove it)"
    )]
    NotRegular { path: String, kind: &'static str },
    #[error(
        "{path} in the image is larger than {limit} bytes; this is not a config file vmic can read"
    )]
    TooLarge { path: String, limit: u64 },
    #[error("{path} in the image is not UTF-8 text")]
    NotText { path: String },
    #[error("resolving {path} in the image")]
    Resolve {
        path: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("reading {path} in the image")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The text of `path` inside `root`, or `None` when it does not exist. Symlinks resolve inside
/// `root` ([`scoped_join`]); the file is opened without following a last symlink and without
/// blocking, and anything but a regular file of at most `limit` bytes is an error: a FIFO or a
/// device (`/etc/fstab` -> `/proc/kmsg`, `/dev/zero`) is never read.
pub fn read_image_text(
    root: &Path,
    path: &str,
    limit: u64,
) -> Result<Option<String>, ImageFileError> {
    let Some(data) = read_image_file(root, path, limit)? else {
        return Ok(None);
    };
    String::from_utf8(data)
        .map(Some)
        .map_err(|_| ImageFileError::NotText { path: path.into() })
}

/// The bytes of `path` inside `root`, as [`read_image_text`].
pub fn read_image_file(
    root: &Path,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, ImageFileError> {
    let io = |source| ImageFileError::Io {
        path: path.into(),
        source,
    };
    let Some(file) = open_image_file(root, path)? else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(io)?;
    if meta.len() > limit {
        return Err(ImageFileError::TooLarge {
            path: path.into(),
            limit,
        });
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // The size can grow after fstat: read one byte past the limit to notice.
    file.take(limit + 1).read_to_end(&mut data).map_err(io)?;
    if data.len() as u64 > limit {
        return Err(ImageFileError::TooLarge {
            path: path.into(),
            limit,
        });
    }
    Ok(Some(data))
}

/// The regular file `path` inside `root` opened for reading (`None` when missing), as
/// [`read_image_text`] opens it; for files too large to hold in memory (`rootfs.img`).
pub fn open_image_file(root: &Path, path: &str) -> Result<Option<std::fs::File>, ImageFileError> {
    let io = |source| ImageFileError::Io {
        path: path.into(),
        source,
    };
    let target = scoped_join(root, path).map_err(|source| ImageFileError::Resolve {
        path: path.into(),
        source,
    })?;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&target)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symlink: it appeared after the scoped join resolved the path.
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ImageFileError::NotRegular {
                path: path.into(),
                kind: "a symlink",
            })
        }
        Err(error) => return Err(io(error)),
    };
    let file_type = file.metadata().map_err(io)?.file_type();
    if !file_type.is_file() {
        return Err(ImageFileError::NotRegular {
            path: path.into(),
            kind: file_kind(&file_type),
        });
    }
    Ok(Some(file))
}

/// Refuses to write through anything at `target` (an already resolved path) that is not a
/// regular file: writing to a FIFO blocks forever, to a device reaches the builder VM.
pub fn check_writable(target: &Path, path: &str) -> Result<(), ImageFileError> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if !meta.file_type().is_file() => Err(ImageFileError::NotRegular {
            path: path.into(),
            kind: file_kind(&meta.file_type()),
        }),
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageFileError::Io {
            path: path.into(),
            source,
        }),
    }
}

fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

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

    #[test]
    fn image_files_are_read_inside_the_root_and_only_when_regular_and_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/fstab"), "UUID=1 / ext4 defaults 0 1\n").expect("write");
        assert_eq!(
            read_image_text(root, "/etc/fstab", 1024)
                .expect("read")
                .as_deref(),
            Some("UUID=1 / ext4 defaults 0 1\n")
        );
        assert!(read_image_text(root, "/etc/missing", 1024)
            .expect("missing is fine")
            .is_none());

        // A link out of the image reads the image's own file, never the builder VM's.
        std::fs::write(root.join("etc/hostname"), "image\n").expect("write");
        symlink("/etc/hostname", root.join("etc/name-link")).expect("symlink");
        assert_eq!(
            read_image_text(root, "/etc/name-link", 1024)
                .expect("read")
                .as_deref(),
            Some("image\n")
        );
        // `/etc/fstab` -> `/proc/kmsg` in the image: /proc/kmsg of the image (missing here).
        symlink("/proc/kmsg", root.join("etc/kmsg-link")).expect("symlink");
        assert!(read_image_text(root, "/etc/kmsg-link", 1024)
            .expect("resolved inside the root")
            .is_none());

        // A FIFO is refused at once (a plain open would block until a writer came).
        let fifo = root.join("etc/fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo(3) with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let error = read_image_text(root, "/etc/fifo", 1024).expect_err("a FIFO");
        assert_eq!(
            error.to_string(),
            "/etc/fifo in the image is a FIFO, not a regular file; vmic reads and writes only \
             regular files there (replace it with a file in the image, or remove it)"
        );
        assert!(check_writable(&fifo, "/etc/fifo").is_err());

        // `/dev/zero` -> `/dev/zero` in the image points at itself, never at the VM's device.
        std::fs::create_dir_all(root.join("dev")).expect("mkdir");
        symlink("/dev/zero", root.join("dev/zero")).expect("symlink");
        let error = read_image_text(root, "/dev/zero", 1024).expect_err("a link loop");
        assert!(matches!(error, ImageFileError::Resolve { .. }), "{error}");
        let error = read_image_text(root, "/etc", 1024).expect_err("a directory");
        assert!(error.to_string().contains("is a directory"), "{error}");

        // Size cap.
        std::fs::write(root.join("etc/big"), vec![b'x'; 2048]).expect("write");
        let error = read_image_text(root, "/etc/big", 1024).expect_err("too large");
        assert!(
            matches!(error, ImageFileError::TooLarge { limit: 1024, .. }),
            "{error}"
        );
        assert_eq!(
            read_image_file(root, "/etc/big", 2048)
                .expect("at the cap")
                .map(|d| d.len()),
            Some(2048)
        );
        assert!(check_writable(&root.join("etc/big"), "/etc/big").is_ok());
        assert!(check_writable(&root.join("etc/new"), "/etc/new").is_ok());
    }
}
