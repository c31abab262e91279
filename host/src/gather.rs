//! Planning's I/O, done once before it: lists and reads what the config and the command line
//! name on the host's disk, so that [`crate::plan`] decides from values and reads nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::model::{Config, ImageHistory, PasswordType};

/// One file on the host, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the directory it was listed from; for a single file, its file name.
    pub relative: PathBuf,
    pub local: PathBuf,
    pub size: u64,
    pub mode: u32,
}

/// A `--package-source`: a directory of packages, or one repository file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFiles {
    Directory(Vec<Listed>),
    File(Listed),
}

/// Where this build's host files are, what they hold, and what the config reads of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFiles {
    /// The config directory's files (relative to it), sorted.
    pub config_dir: Vec<Listed>,
    /// Of those, the ones the config names (`additionalFiles` sources, script paths).
    pub referenced: Vec<PathBuf>,
    /// Files the config names outside its directory (`relative` is the absolute path).
    pub outside: Vec<Listed>,
    /// Each `os.additionalDirs` entry's files, in config order (empty for an entry without a
    /// source and destination).
    pub additional_dirs: Vec<Vec<Listed>>,
    /// `--package-source` paths, in command-line order; listed only when `os.packages` asks
    /// for something.
    pub package_sources: Vec<SourceFiles>,
    /// Text of the files whose content goes into the request (SSH key files, password files,
    /// package lists), by the path as the config writes it.
    pub texts: BTreeMap<String, String>,
    /// sha256 (hex) of the files the config names and of its `additionalDirs` files, by local
    /// path, for the image history entry; empty with `os.imageHistory: none`.
    pub sha256: BTreeMap<PathBuf, String>,
}

/// What [`gather`] needs besides the config.
#[derive(Debug, Clone, Copy)]
pub struct Where<'a> {
    pub config_dir: &'a Path,
    /// Canonical paths never listed even when inside the config directory (input, output,
    /// build directory).
    pub exclude: &'a [PathBuf],
    pub package_sources: &'a [PathBuf],
}

/// List and read everything the plan needs.
pub fn gather(config: &Config, at: Where<'_>) -> anyhow::Result<HostFiles> {
    let (inside, outside) = referenced_files(config, at.config_dir);
    let mut files = HostFiles {
        outside: outside
            .into_iter()
            .map(|local| listed(local.clone(), local))
            .collect::<anyhow::Result<_>>()?,
        config_dir: list_tree(at.config_dir, at.exclude, &inside)?,
        referenced: inside,
        ..HostFiles::default()
    };
    let os = config.os.as_ref();
    for dir in os
        .and_then(|os| os.additional_dirs.as_ref())
        .into_iter()
        .flatten()
    {
        files
            .additional_dirs
            .push(match (&dir.source, &dir.destination) {
                (Some(source), Some(_)) => list_tree(&at.config_dir.join(source), &[], &[])?,
                _ => Vec::new(),
            });
    }
    let mut read = |relative: &str| -> anyhow::Result<()> {
        if !files.texts.contains_key(relative) {
            let path = at.config_dir.join(relative);
            let text = fs_err::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.texts.insert(relative.to_string(), text);
        }
        Ok(())
    };
    for user in os.and_then(|os| os.users.as_ref()).into_iter().flatten() {
        for path in user.ssh_public_key_paths.iter().flatten() {
            read(path)?;
        }
        if let Some(password) = &user.password {
            if matches!(
                password.password_type,
                Some(PasswordType::HashedFile | PasswordType::PlainTextFile)
            ) {
                read(password.value.as_deref().unwrap_or_default())?;
            }
        }
    }
    if let Some(packages) = os.and_then(|os| os.packages.as_ref()) {
        for lists in [
            &packages.remove_lists,
            &packages.install_lists,
            &packages.update_lists,
        ] {
            for list in lists.iter().flatten() {
                read(list)?;
            }
        }
        if packages.asks_for_anything() {
            for source in at.package_sources {
                files.package_sources.push(source_files(source)?);
            }
        }
    }
    if os.and_then(|os| os.image_history) != Some(ImageHistory::None) {
        let named = files
            .outside
            .iter()
            .chain(
                files
                    .config_dir
                    .iter()
                    .filter(|file| files.referenced.contains(&file.relative)),
            )
            .chain(files.additional_dirs.iter().flatten());
        let mut sha256 = BTreeMap::new();
        for file in named {
            let reader = fs_err::File::open(&file.local)?;
            let digest = vmic_protocol::sha256_reader(reader)
                .with_context(|| format!("hashing {}", file.local.display()))?;
            sha256.insert(file.local.clone(), hex::encode(digest));
        }
        files.sha256 = sha256;
    }
    Ok(files)
}

fn source_files(source: &Path) -> anyhow::Result<SourceFiles> {
    let metadata = fs_err::metadata(source)
        .with_context(|| format!("--package-source {}", source.display()))?;
    if metadata.is_dir() {
        return Ok(SourceFiles::Directory(list_tree(source, &[], &[])?));
    }
    let name = source
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("source"));
    Ok(SourceFiles::File(Listed {
        relative: name,
        local: source.to_path_buf(),
        size: metadata.len(),
        mode: metadata.permissions().mode() & 0o7777,
    }))
}

fn listed(relative: PathBuf, local: PathBuf) -> anyhow::Result<Listed> {
    let metadata = fs_err::metadata(&local)?;
    Ok(Listed {
        relative,
        local,
        size: metadata.len(),
        mode: metadata.permissions().mode() & 0o7777,
    })
}

/// Every file below `root` that [`crate::upload::list_files`] lets through.
fn list_tree(root: &Path, exclude: &[PathBuf], named: &[PathBuf]) -> anyhow::Result<Vec<Listed>> {
    crate::upload::list_files(root, exclude, named)?
        .into_iter()
        .map(|relative| {
            let local = root.join(&relative);
            listed(relative, local)
        })
        .collect()
}

/// The files the config names explicitly: those inside the config directory (relative to it)
/// and those outside it (absolute host paths, each once).
fn referenced_files(config: &Config, config_dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let clean = crate::config::resolve_source(config_dir, ".");
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    let mut add = |value: &str| {
        let local = crate::config::resolve_source(config_dir, value);
        match local.strip_prefix(&clean) {
            Ok(relative) => inside.push(relative.to_path_buf()),
            Err(_) if !outside.contains(&local) => outside.push(local),
            Err(_) => {}
        }
    };
    for list in [
        config
            .os
            .as_ref()
            .and_then(|os| os.additional_files.as_ref()),
        config
            .iso
            .as_ref()
            .and_then(|iso| iso.additional_files.as_ref()),
    ] {
        for file in list.map(|list| list.0.as_slice()).unwrap_or_default() {
            if let Some(source) = &file.source {
                add(source);
            }
        }
    }
    if let Some(scripts) = &config.scripts {
        for list in [&scripts.post_customization, &scripts.finalize_customization] {
            for script in list.iter().flatten() {
                if let Some(path) = &script.path {
                    add(path);
                }
            }
        }
    }
    (inside, outside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_and_validate, ValidationContext};
    use crate::plan::tests::write_below;

    #[test]
    fn reads_only_what_the_config_names_and_lists_sources_only_for_package_work() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = fs_err::canonicalize(root.path()).expect("canonical");
        let write = |name: &str, text: &str| write_below(&dir, name, text);
        write(
            "keys/a.pub",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm a@x\n",
        );
        write("hash.txt", "$6$s$h\n");
        write("plain.txt", "not read: the type is hashed\n");
        write("lists/base.yaml", "packages: [jq]\n");
        write("tree/sub/f.txt", "f");
        write("debs/hello.deb", "deb");
        let config = |packages: &str| {
            format!(
                "os:\n  users:\n  - name: alice\n    sshPublicKeyPaths: [keys/a.pub]\n    \
                 password:\n      type: hashed-file\n      value: hash.txt\n  \
                 - name: bob\n    password:\n      type: hashed\n      value: plain.txt\n  \
                 additionalDirs:\n  - source: tree\n    destination: /opt/t\n{packages}"
            )
        };
        let sources = [dir.join("debs")];
        let gathered = |packages: &str| {
            write("cfg.yaml", &config(packages));
            let loaded = load_and_validate(&dir.join("cfg.yaml"), &ValidationContext::default())
                .unwrap_or_else(|errors| panic!("{errors}"));
            gather(
                &loaded.config,
                Where {
                    config_dir: &loaded.dir,
                    exclude: &[],
                    package_sources: &sources,
                },
            )
            .expect("gather")
        };
        let files = gathered("  packages:\n    installLists: [lists/base.yaml]\n");
        assert_eq!(
            files.texts.keys().collect::<Vec<_>>(),
            ["hash.txt", "keys/a.pub", "lists/base.yaml"]
        );
        assert_eq!(files.texts["hash.txt"], "$6$s$h\n");
        assert_eq!(files.additional_dirs.len(), 1);
        assert_eq!(
            files.additional_dirs[0][0].relative,
            PathBuf::from("sub/f.txt")
        );
        assert_eq!(files.additional_dirs[0][0].size, 1);
        match &files.package_sources[..] {
            [SourceFiles::Directory(debs)] => {
                assert_eq!(debs[0].relative, PathBuf::from("hello.deb"));
                assert_eq!(debs[0].size, 3);
            }
            other => panic!("one directory source, got {other:?}"),
        }
        let listed: Vec<_> = files.config_dir.iter().map(|f| &f.relative).collect();
        assert!(listed.contains(&&PathBuf::from("cfg.yaml")), "{listed:?}");

        let no_packages = gathered("");
        assert!(no_packages.package_sources.is_empty());
        assert!(!no_packages.texts.contains_key("lists/base.yaml"));
    }

    /// Validation checks that named files exist; one removed after it is named by gather.
    #[test]
    fn a_missing_named_file_is_named_in_the_error() {
        let root = tempfile::tempdir().expect("temp dir");
        let config: Config = serde_saphyr::from_str(
            "os:\n  users:\n  - name: alice\n    sshPublicKeyPaths: [gone.pub]\n",
        )
        .expect("config");
        let error = gather(
            &config,
            Where {
                config_dir: root.path(),
                exclude: &[],
                package_sources: &[],
            },
        )
        .expect_err("the key file is missing");
        assert!(format!("{error:#}").contains("gone.pub"), "{error:#}");
    }
}
