//! The build plan: what to upload into the builder VM and the `IsoBuild` request, derived
//! purely from resolved settings (no I/O beyond listing the config directory).

use std::path::{Component, Path, PathBuf};

use vmic_protocol::{
    FileCopy, FileSource, IsoBuild, IsoSettings, OsCustomization, Script, SquashfsSettings,
};

use crate::config::model::{AdditionalFiles, Config, KernelCommandLine, Script as ScriptConfig};

/// Guest directory of the scratch disk.
pub const WORK_DIR: &str = "/work";
/// Guest directory the config directory is uploaded to.
pub const GUEST_CONFIG_DIR: &str = "/work/config";
/// Default ISO volume label (as AzL-IC's `mkisofs -V CDROM`).
pub const DEFAULT_ISO_LABEL: &str = "CDROM";

/// Files of the config directory not referenced by the config are uploaded only while small:
/// a config often sits beside multi-GiB images that scripts never read.
pub const UNREFERENCED_FILE_LIMIT: u64 = 16 << 20;
pub const UNREFERENCED_TOTAL_LIMIT: u64 = 256 << 20;

/// One file to copy into the builder VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub local: PathBuf,
    pub guest: String,
    pub mode: u32,
}

/// What the host does before sending the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoPlan {
    pub uploads: Vec<Upload>,
    /// Config-directory files left out of `/_imageconfigs`, with why.
    pub skipped: Vec<(PathBuf, String)>,
    pub request: IsoBuild,
}

/// Parameters that come from the host, not the config.
#[derive(Debug, Clone)]
pub struct HostFacts<'a> {
    pub config_dir: &'a Path,
    pub input_is_iso: bool,
    pub input_serial: &'a str,
    pub output_serial: &'a str,
    pub cpus: u32,
    /// Paths never uploaded even when inside the config directory (input, output, build dir).
    pub exclude: Vec<PathBuf>,
}

fn guest_path(relative: &Path) -> String {
    let mut path = String::from(GUEST_CONFIG_DIR);
    for component in relative.components() {
        if let Component::Normal(part) = component {
            path.push('/');
            path.push_str(&part.to_string_lossy());
        }
    }
    path
}

/// Lexically normalize `a/./b/../c` → `a/c` (validation already refused escapes).
fn normalize(path: &Path) -> PathBuf {
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

fn file_copies(files: Option<&AdditionalFiles>) -> Vec<FileCopy> {
    let Some(files) = files else {
        return Vec::new();
    };
    files
        .0
        .iter()
        .filter_map(|file| {
            let source = match (&file.source, &file.content) {
                (Some(source), _) => FileSource::Path(guest_path(&normalize(Path::new(source)))),
                (None, Some(content)) => FileSource::Content(content.clone()),
                (None, None) => return None,
            };
            Some(FileCopy {
                source,
                destination: file.destination.clone()?,
                permissions: file
                    .permissions
                    .as_deref()
                    .and_then(|text| u32::from_str_radix(text, 8).ok()),
            })
        })
        .collect()
}

fn kernel_args(line: Option<&KernelCommandLine>) -> Vec<String> {
    line.and_then(|line| line.extra_command_line.as_ref())
        .map(|args| args.0.clone())
        .unwrap_or_default()
}

fn scripts(list: Option<&Vec<ScriptConfig>>, phase: &str) -> Vec<Script> {
    list.map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(index, script)| {
                let source = match (&script.path, &script.content) {
                    (Some(path), _) => {
                        FileSource::Path(normalize(Path::new(path)).to_string_lossy().into_owned())
                    }
                    (None, Some(content)) => FileSource::Content(content.clone()),
                    (None, None) => return None,
                };
                let name = script.name.clone().unwrap_or_else(|| match &script.path {
                    Some(path) => path.clone(),
                    None => format!("{phase}[{index}]"),
                });
                Some(Script {
                    name,
                    source,
                    interpreter: script.interpreter.clone(),
                    arguments: script.arguments.clone().unwrap_or_default(),
                    environment: script
                        .environment_variables
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                })
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Relative paths (to the config dir) that the config names explicitly.
fn referenced_files(config: &Config) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut files = |list: Option<&AdditionalFiles>| {
        for file in list.map(|list| list.0.as_slice()).unwrap_or_default() {
            if let Some(source) = &file.source {
                paths.push(normalize(Path::new(source)));
            }
        }
    };
    files(
        config
            .os
            .as_ref()
            .and_then(|os| os.additional_files.as_ref()),
    );
    files(
        config
            .iso
            .as_ref()
            .and_then(|iso| iso.additional_files.as_ref()),
    );
    if let Some(scripts) = &config.scripts {
        for list in [&scripts.post_customization, &scripts.finalize_customization] {
            for script in list.iter().flatten() {
                if let Some(path) = &script.path {
                    paths.push(normalize(Path::new(path)));
                }
            }
        }
    }
    paths
}

/// Whether the config changes the root file system (else an ISO input is only re-mastered).
pub fn changes_rootfs(config: &Config) -> bool {
    let os_changes = config.os.as_ref().is_some_and(|os| {
        os.hostname.is_some()
            || os
                .additional_files
                .as_ref()
                .is_some_and(|f| !f.0.is_empty())
            || !kernel_args(os.kernel_command_line.as_ref()).is_empty()
    });
    let scripts = config.scripts.as_ref().is_some_and(|scripts| {
        scripts
            .post_customization
            .as_ref()
            .is_some_and(|s| !s.is_empty())
            || scripts
                .finalize_customization
                .as_ref()
                .is_some_and(|s| !s.is_empty())
    });
    os_changes || scripts
}

/// Build the plan for a disk/ISO → ISO conversion.
pub fn iso_plan(config: &Config, facts: &HostFacts<'_>) -> std::io::Result<IsoPlan> {
    let os = config.os.as_ref();
    let iso = config.iso.as_ref();
    let script_config = config.scripts.as_ref();
    let request = IsoBuild {
        input_serial: facts.input_serial.to_string(),
        input_is_iso: facts.input_is_iso,
        output_serial: facts.output_serial.to_string(),
        work_dir: WORK_DIR.to_string(),
        config_dir: GUEST_CONFIG_DIR.to_string(),
        os: OsCustomization {
            hostname: os.and_then(|os| os.hostname.clone()),
            additional_files: file_copies(os.and_then(|os| os.additional_files.as_ref())),
            kernel_args: kernel_args(os.and_then(|os| os.kernel_command_line.as_ref())),
            ..OsCustomization::default()
        },
        post_customization: scripts(
            script_config.and_then(|s| s.post_customization.as_ref()),
            "scripts.postCustomization",
        ),
        finalize_customization: scripts(
            script_config.and_then(|s| s.finalize_customization.as_ref()),
            "scripts.finalizeCustomization",
        ),
        iso: IsoSettings {
            label: DEFAULT_ISO_LABEL.to_string(),
            additional_files: file_copies(iso.and_then(|iso| iso.additional_files.as_ref())),
            extra_args: kernel_args(iso.and_then(|iso| iso.kernel_command_line.as_ref())),
            vmic_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        squashfs: SquashfsSettings {
            compression: "zstd".to_string(),
            threads: facts.cpus.max(1),
        },
        remaster_only: facts.input_is_iso && !changes_rootfs(config),
    };

    let referenced = referenced_files(config);
    let mut uploads = Vec::new();
    let mut skipped = Vec::new();
    let mut unreferenced_total = 0u64;
    let mut files = Vec::new();
    collect_files(facts.config_dir, Path::new(""), &facts.exclude, &mut files)?;
    files.sort();
    for relative in files {
        let local = facts.config_dir.join(&relative);
        let metadata = fs_err::metadata(&local)?;
        let is_referenced = referenced.contains(&relative);
        if !is_referenced {
            if metadata.len() > UNREFERENCED_FILE_LIMIT {
                skipped.push((
                    local,
                    format!(
                        "larger than {} MiB and not named by the config",
                        UNREFERENCED_FILE_LIMIT >> 20
                    ),
                ));
                continue;
            }
            if unreferenced_total + metadata.len() > UNREFERENCED_TOTAL_LIMIT {
                skipped.push((
                    local,
                    format!(
                        "the config directory's unnamed files exceed {} MiB",
                        UNREFERENCED_TOTAL_LIMIT >> 20
                    ),
                ));
                continue;
            }
            unreferenced_total += metadata.len();
        }
        use std::os::unix::fs::PermissionsExt;
        uploads.push(Upload {
            guest: guest_path(&relative),
            local,
            mode: metadata.permissions().mode() & 0o7777,
        });
    }
    Ok(IsoPlan {
        uploads,
        skipped,
        request,
    })
}

fn collect_files(
    root: &Path,
    relative: &Path,
    exclude: &[PathBuf],
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let dir = root.join(relative);
    for entry in fs_err::read_dir(&dir)? {
        let entry = entry?;
        let path = entry.path();
        let canonical = fs_err::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if exclude
            .iter()
            .any(|excluded| canonical.starts_with(excluded))
        {
            continue;
        }
        // Follow symlinks as the user's shell would; broken ones are left out.
        let Ok(metadata) = fs_err::metadata(&path) else {
            continue;
        };
        let child = relative.join(entry.file_name());
        if metadata.is_dir() {
            collect_files(root, &child, exclude, out)?;
        } else if metadata.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_and_validate, ValidationContext};

    fn plan_for(fixture: &str, input_is_iso: bool) -> IsoPlan {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/config/cloud-init")
            .join(fixture);
        let loaded = load_and_validate(&path, &ValidationContext::default())
            .unwrap_or_else(|errors| panic!("{errors}"));
        iso_plan(
            &loaded.config,
            &HostFacts {
                config_dir: &loaded.dir,
                input_is_iso,
                input_serial: "vmic-input",
                output_serial: "vmic-output",
                cpus: 2,
                exclude: Vec::new(),
            },
        )
        .expect("plan")
    }

    #[test]
    fn seed_example_1_puts_cloud_init_files_on_the_iso() {
        let plan = plan_for("iso-map.yaml", false);
        let request = &plan.request;
        assert_eq!(request.iso.extra_args, ["ds=nocloud"]);
        assert_eq!(request.iso.label, "CDROM");
        let destinations: Vec<_> = request
            .iso
            .additional_files
            .iter()
            .map(|file| file.destination.as_str())
            .collect();
        assert!(destinations.contains(&"/cloud-init-data/user-data"));
        assert!(matches!(
            &request.iso.additional_files[0].source,
            FileSource::Path(path) if path.starts_with("/work/config/cloud-init-data/")
        ));
        assert_eq!(request.post_customization.len(), 1);
        assert!(matches!(
            request.post_customization[0].source,
            FileSource::Content(_)
        ));
        assert!(plan
            .uploads
            .iter()
            .any(|upload| upload.guest == "/work/config/cloud-init-data/user-data"));
        assert!(!request.remaster_only);
    }

    #[test]
    fn map_and_list_syntax_plan_the_same_build() {
        assert_eq!(
            plan_for("iso-map.yaml", false).request,
            plan_for("iso-list.yaml", false).request
        );
        assert_eq!(
            plan_for("rootfs-map.yaml", false).request,
            plan_for("rootfs-list.yaml", false).request
        );
    }

    #[test]
    fn iso_input_is_remastered_only_without_rootfs_changes() {
        // Example 1 has a postCustomization script: the rootfs changes.
        assert!(!plan_for("iso-map.yaml", true).request.remaster_only);
        let config = Config::default();
        assert!(!changes_rootfs(&config));
    }
}
