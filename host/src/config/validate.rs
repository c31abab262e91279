//! Semantic and cross-field rules on a structurally valid config: each problem becomes an error
//! at the key path it concerns, saying what is allowed.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use super::model::{
    AdditionalFiles, Config, ImageFormat, KernelCommandLine, PasswordType, PreviewFeature, Script,
    SelinuxMode,
};
use super::{
    effective_image_format, effective_output_format, ConfigError, LoadedConfig, ValidationContext,
};

/// Run every rule; returns all errors found (empty when the config is valid).
pub fn validate(loaded: &LoadedConfig, ctx: &ValidationContext) -> Vec<ConfigError> {
    let mut rules = Rules {
        loaded,
        errors: Vec::new(),
    };
    let config = &loaded.config;
    rules.output(config);
    if let Some(os) = &config.os {
        if let Some(hostname) = &os.hostname {
            rules.hostname(hostname);
        }
        if let Some(files) = &os.additional_files {
            rules.additional_files("os.additionalFiles", files);
        }
        if let Some(command_line) = &os.kernel_command_line {
            rules.kernel_args("os.kernelCommandLine.extraCommandLine", command_line);
        }
        rules.os_settings(os);
    }
    if let Some(iso) = &config.iso {
        if let Some(files) = &iso.additional_files {
            rules.additional_files("iso.additionalFiles", files);
        }
        if let Some(command_line) = &iso.kernel_command_line {
            rules.kernel_args("iso.kernelCommandLine.extraCommandLine", command_line);
            rules.live_kernel_args(
                "iso.kernelCommandLine.extraCommandLine",
                command_line,
                "an ISO",
            );
        }
    }
    if let Some(pxe) = &config.pxe {
        if let Some(files) = &pxe.additional_files {
            rules.additional_files("pxe.additionalFiles", files);
        }
        if let Some(command_line) = &pxe.kernel_command_line {
            rules.kernel_args("pxe.kernelCommandLine.extraCommandLine", command_line);
            rules.live_kernel_args(
                "pxe.kernelCommandLine.extraCommandLine",
                command_line,
                "a PXE image",
            );
        }
        rules.pxe(pxe);
    }
    rules.live_os_kernel_args(config, ctx);
    rules.preview_features(config);
    rules.schema_rules(config, ctx);
    if let Some(scripts) = &config.scripts {
        for (list, entries) in [
            ("scripts.postCustomization", &scripts.post_customization),
            (
                "scripts.finalizeCustomization",
                &scripts.finalize_customization,
            ),
        ] {
            for (index, script) in entries.iter().flatten().enumerate() {
                rules.script(&format!("{list}[{index}]"), script);
            }
        }
    }
    rules.iso_output(config, ctx);
    rules.errors
}

struct Rules<'a> {
    loaded: &'a LoadedConfig,
    errors: Vec<ConfigError>,
}

impl Rules<'_> {
    /// An error pointing at the value of `path` (or its nearest written ancestor).
    fn error(&mut self, path: &str, message: impl Into<String>) {
        let (display, position) = self.loaded.sources.locate(path);
        self.push(display, position, message.into());
    }

    /// An error pointing at the key naming `path`, for "this setting is not allowed" problems.
    fn error_at_key(&mut self, path: &str, message: impl Into<String>) {
        let (display, position) = self.loaded.sources.locate_key(path);
        self.push(display, position, message.into());
    }

    fn push(&mut self, path: String, position: super::Position, message: String) {
        self.errors.push(ConfigError {
            file: self.loaded.path.clone(),
            position: Some(position),
            path,
            message,
        });
    }

    fn hostname(&mut self, hostname: &str) {
        if let Err(problem) = check_hostname(hostname) {
            self.error(
                "os.hostname",
                format!(
                    "invalid host name {hostname:?}: {problem}; allowed: DNS labels of 1-63 \
                     letters, digits and hyphens (not at either end), separated by dots"
                ),
            );
        }
    }

    fn kernel_args(&mut self, path: &str, command_line: &KernelCommandLine) {
        let Some(args) = &command_line.extra_command_line else {
            return;
        };
        for (index, arg) in args.0.iter().enumerate() {
            let arg_path = format!("{path}[{index}]");
            if arg.trim().is_empty() {
                self.error(
                    &arg_path,
                    "empty kernel argument; each argument must be non-empty text such as \
                     `console=ttyS0`",
                );
            } else if let Err(problem) = check_kernel_arg(arg) {
                self.error(
                    &arg_path,
                    format!("invalid kernel argument {arg:?}: {problem}"),
                );
            }
        }
    }

    fn additional_files(&mut self, path: &str, files: &AdditionalFiles) {
        let mut destinations: HashMap<&str, usize> = HashMap::new();
        for (index, file) in files.0.iter().enumerate() {
            let entry = format!("{path}[{index}]");
            match (&file.source, &file.content) {
                (Some(_), Some(_)) => self.error(
                    &entry,
                    "`source` and `content` are exclusive; set exactly one of them",
                ),
                (None, None) => self.error(
                    &entry,
                    "neither `source` nor `content` is set; set exactly one of them",
                ),
                (Some(source), None) => {
                    self.source_file(&format!("{entry}.source"), source);
                }
                (None, Some(_)) => {}
            }
            match file.destination.as_deref() {
                None => self.error(
                    &format!("{entry}.destination"),
                    "missing `destination`; give the absolute path of the file in the image",
                ),
                Some(destination) => {
                    let destination_path = format!("{entry}.destination");
                    if self.absolute_path(&destination_path, destination) {
                        if let Some(first) = destinations.insert(destination, index) {
                            self.error(
                                &destination_path,
                                format!(
                                    "destination {destination:?} is already written by \
                                     {path}[{first}]; each destination may appear once"
                                ),
                            );
                        }
                    }
                }
            }
            if let Some(permissions) = &file.permissions {
                self.permissions(&format!("{entry}.permissions"), permissions);
            }
        }
    }

    /// Checks that a destination is a non-empty absolute path; returns whether it is.
    fn absolute_path(&mut self, path: &str, value: &str) -> bool {
        if value.is_empty() {
            self.error(path, "empty path; give an absolute path such as /etc/motd");
            false
        } else if !value.starts_with('/') {
            self.error(
                path,
                format!("{value:?} is a relative path; give an absolute path such as /{value}"),
            );
            false
        } else {
            true
        }
    }

    fn permissions(&mut self, path: &str, value: &str) {
        if let Err(problem) = check_permissions(value) {
            self.error(
                path,
                format!(
                    "invalid permissions {value:?}: {problem}; allowed: 3 or 4 octal digits up \
                     to 0777, as a string such as \"0644\""
                ),
            );
        }
    }

    /// A file the config refers to must exist (relative to the config directory); returns
    /// whether it does.
    fn source_file(&mut self, path: &str, value: &str) -> bool {
        if value.is_empty() {
            self.error(
                path,
                "empty file name; name a file relative to the config file",
            );
            return false;
        }
        let resolved = self.resolve(value);
        if !resolved.is_file() {
            let what = if resolved.is_dir() {
                "is a directory, not a file"
            } else {
                "does not exist"
            };
            self.error(
                path,
                format!(
                    "file {} {what}; paths are relative to the config file's directory {}",
                    resolved.display(),
                    self.loaded.dir.display()
                ),
            );
            return false;
        }
        true
    }

    fn resolve(&self, value: &str) -> PathBuf {
        super::resolve_source(&self.loaded.dir, value)
    }

    fn script(&mut self, entry: &str, script: &Script) {
        match (&script.path, &script.content) {
            (Some(_), Some(_)) => self.error(
                entry,
                "`path` and `content` are exclusive; set exactly one of them",
            ),
            (None, None) => self.error(
                entry,
                "neither `path` nor `content` is set; set exactly one of them",
            ),
            (Some(path), None) => self.script_path(&format!("{entry}.path"), path),
            (None, Some(_)) => {}
        }
        if script
            .interpreter
            .as_deref()
            .is_some_and(|interpreter| interpreter.trim().is_empty())
        {
            self.error(
                &format!("{entry}.interpreter"),
                "empty interpreter; name a program such as /bin/bash, or omit it for /bin/sh",
            );
        }
        for name in script
            .environment_variables
            .iter()
            .flatten()
            .map(|(name, _)| name)
        {
            if !is_environment_name(name) {
                self.error(
                    &super::load::join_key(&format!("{entry}.environmentVariables"), name),
                    format!(
                        "invalid environment variable name {name:?}; allowed: letters, digits \
                         and underscores, not starting with a digit"
                    ),
                );
            }
        }
    }

    /// A script file must exist and lie inside the config directory (it is shared with the
    /// VM from there), after resolving `..` and symlinks.
    fn script_path(&mut self, path: &str, value: &str) {
        let outside = format!(
            "script {value:?} is outside the config directory {}; scripts must lie inside it",
            self.loaded.dir.display()
        );
        if value.is_empty() {
            self.error(
                path,
                "empty path; name a script file relative to the config file",
            );
            return;
        }
        if Path::new(value).is_absolute() || escapes(Path::new(value)) {
            self.error(path, outside);
            return;
        }
        let resolved = self.resolve(value);
        if !resolved.is_file() {
            self.error(
                path,
                format!(
                    "script file {} does not exist; paths are relative to the config file's \
                     directory",
                    resolved.display()
                ),
            );
            return;
        }
        let inside = match (
            fs_err::canonicalize(&resolved),
            fs_err::canonicalize(&self.loaded.dir),
        ) {
            (Ok(file), Ok(dir)) => file.starts_with(dir),
            _ => false,
        };
        if !inside {
            self.error(path, outside);
        }
    }

    fn os_settings(&mut self, os: &super::model::Os) {
        if let Some(packages) = &os.packages {
            for (field, names) in [
                ("install", &packages.install),
                ("remove", &packages.remove),
                ("update", &packages.update),
            ] {
                for (index, name) in names.iter().flatten().enumerate() {
                    if name.trim().is_empty() {
                        self.error(
                            &format!("os.packages.{field}[{index}]"),
                            "empty package name; name a package such as `curl`",
                        );
                    }
                }
            }
            for (field, lists) in [
                ("installLists", &packages.install_lists),
                ("removeLists", &packages.remove_lists),
                ("updateLists", &packages.update_lists),
            ] {
                for (index, list) in lists.iter().flatten().enumerate() {
                    let path = format!("os.packages.{field}[{index}]");
                    if !self.source_file(&path, list) {
                        continue;
                    }
                    if let Ok(text) = std::fs::read_to_string(self.resolve(list)) {
                        if let Err(error) = super::model::parse_package_list(&text) {
                            self.error(&path, format!("{}: {error}", self.resolve(list).display()));
                        }
                    }
                }
            }
        }
        for (index, dir) in os.additional_dirs.iter().flatten().enumerate() {
            let entry = format!("os.additionalDirs[{index}]");
            match dir.source.as_deref() {
                None | Some("") => self.error(
                    &format!("{entry}.source"),
                    "missing `source`; name a directory relative to the config file",
                ),
                Some(source) if !self.resolve(source).is_dir() => self.error(
                    &format!("{entry}.source"),
                    format!(
                        "directory {} does not exist; paths are relative to the config file's \
                         directory",
                        self.resolve(source).display()
                    ),
                ),
                Some(_) => {}
            }
            match dir.destination.as_deref() {
                None => self.error(
                    &format!("{entry}.destination"),
                    "missing `destination`; give an absolute path in the image",
                ),
                Some(destination) => {
                    self.absolute_path(&format!("{entry}.destination"), destination);
                }
            }
            for (field, value) in [
                ("newDirPermissions", &dir.new_dir_permissions),
                ("mergedDirPermissions", &dir.merged_dir_permissions),
                ("childFilePermissions", &dir.child_file_permissions),
            ] {
                if let Some(value) = value {
                    self.permissions(&format!("{entry}.{field}"), value);
                }
            }
        }
        let mut users = HashSet::new();
        for (index, user) in os.users.iter().flatten().enumerate() {
            let entry = format!("os.users[{index}]");
            self.account_name(
                &format!("{entry}.name"),
                user.name.as_deref(),
                &mut users,
                "user",
            );
            for (key_index, key_path) in user.ssh_public_key_paths.iter().flatten().enumerate() {
                let path = format!("{entry}.sshPublicKeyPaths[{key_index}]");
                if self.source_file(&path, key_path) {
                    self.public_key_file(&path, key_path);
                }
            }
            // Inline keys are taken as written, as the Image Customizer does (its own tests
            // use placeholders), except a private key, which must never reach an image.
            for (key_index, key) in user.ssh_public_keys.iter().flatten().enumerate() {
                if super::ssh_key::is_private_key(key) {
                    self.error(
                        &format!("{entry}.sshPublicKeys[{key_index}]"),
                        "this is a private key; give the public key (the `.pub` file's line) \
                         and keep the private key out of the image",
                    );
                }
            }
            if let Some(password) = &user.password {
                let password_path = format!("{entry}.password");
                match (password.password_type, password.value.as_deref()) {
                    (None, _) => self.error(
                        &format!("{password_path}.type"),
                        "missing `type`; allowed: locked, plain-text, hashed, plain-text-file, \
                         hashed-file",
                    ),
                    (Some(PasswordType::Locked), _) => {}
                    (Some(_), None) => self.error(
                        &format!("{password_path}.value"),
                        "missing `value` for this password type",
                    ),
                    (Some(PasswordType::PlainTextFile | PasswordType::HashedFile), Some(file)) => {
                        self.source_file(&format!("{password_path}.value"), file);
                    }
                    (Some(_), Some(_)) => {}
                }
            }
        }
        let mut groups = HashSet::new();
        for (index, group) in os.groups.iter().flatten().enumerate() {
            self.account_name(
                &format!("os.groups[{index}].name"),
                group.name.as_deref(),
                &mut groups,
                "group",
            );
        }
        if let Some(services) = &os.services {
            let enabled: HashSet<&str> = services
                .enable
                .iter()
                .flatten()
                .map(String::as_str)
                .collect();
            for (field, names) in [("enable", &services.enable), ("disable", &services.disable)] {
                for (index, name) in names.iter().flatten().enumerate() {
                    let path = format!("os.services.{field}[{index}]");
                    if name.trim().is_empty() {
                        self.error(&path, "empty service name; name a unit such as `sshd`");
                    } else if name.contains(char::is_whitespace) {
                        self.error(&path, format!("service name {name:?} contains whitespace"));
                    } else if field == "disable" && enabled.contains(name.as_str()) {
                        self.error(
                            &path,
                            format!("service {name:?} is both enabled and disabled; pick one"),
                        );
                    }
                }
            }
        }
        let mut modules: HashMap<&str, usize> = HashMap::new();
        for (index, module) in os.modules.iter().flatten().enumerate() {
            let entry = format!("os.modules[{index}]");
            match module.name.as_deref() {
                None | Some("") => self.error(
                    &format!("{entry}.name"),
                    "missing module name; name a kernel module such as `vfio`",
                ),
                Some(name) if name.contains(char::is_whitespace) => self.error(
                    &format!("{entry}.name"),
                    format!("module name {name:?} contains whitespace"),
                ),
                Some(name) => {
                    if let Some(first) = modules.insert(name, index) {
                        self.error(
                            &format!("{entry}.name"),
                            format!(
                                "duplicate module {name:?} (also os.modules[{first}]); list each \
                                 module once"
                            ),
                        );
                    }
                }
            }
            for (key, value) in module.options.iter().flatten() {
                let option = super::load::join_key(&format!("{entry}.options"), key);
                if key.is_empty() || key.contains(char::is_whitespace) {
                    self.error(&option, "option names must be non-empty without whitespace");
                } else if value.is_empty() || value.contains(char::is_whitespace) {
                    self.error(
                        &option,
                        "option values must be non-empty without whitespace",
                    );
                }
            }
        }
    }

    /// The LiveOS boot rules the agent applies when it writes the ISO's (or PXE) grub.cfg
    /// (`guest-agent/src/pipeline/grub_cfg.rs` `validate_user_args`), checked before the VM
    /// starts: the root is the LiveOS image, and SELinux is always off there.
    fn live_kernel_args(&mut self, path: &str, command_line: &KernelCommandLine, media: &str) {
        for (index, arg) in command_line
            .extra_command_line
            .iter()
            .flat_map(|args| args.0.iter())
            .enumerate()
        {
            if let Some(problem) = live_arg_problem(arg) {
                self.error(
                    &format!("{path}[{index}]"),
                    format!("kernel argument {arg:?} is not allowed on {media}: {problem}"),
                );
            }
        }
    }

    /// With ISO or PXE output the image's own args are rewritten for the LiveOS boot: `root=`
    /// and the SELinux args of `os.kernelCommandLine` would be dropped without a word.
    fn live_os_kernel_args(&mut self, config: &Config, ctx: &ValidationContext) {
        let media = match effective_image_format(config, ctx) {
            Some(ImageFormat::Iso) => "an ISO",
            Some(ImageFormat::PxeDir | ImageFormat::PxeTar) => "a PXE image",
            _ => return,
        };
        let Some(command_line) = config
            .os
            .as_ref()
            .and_then(|os| os.kernel_command_line.as_ref())
        else {
            return;
        };
        for (index, arg) in command_line
            .extra_command_line
            .iter()
            .flat_map(|args| args.0.iter())
            .enumerate()
        {
            if let Some(problem) = live_arg_problem(arg) {
                self.error(
                    &format!("os.kernelCommandLine.extraCommandLine[{index}]"),
                    format!(
                        "kernel argument {arg:?} cannot be kept on {media} (output format \
                         {}): {problem}",
                        effective_image_format(config, ctx)
                            .map(ImageFormat::name)
                            .unwrap_or_default()
                    ),
                );
            }
        }
    }

    /// AzL-IC's preview feature gates (`Config.IsValid`): a gated setting without its feature
    /// in this file's `previewFeatures` is an error, as there.
    fn preview_features(&mut self, config: &Config) {
        let enabled = |feature: PreviewFeature| {
            config
                .preview_features
                .iter()
                .flatten()
                .any(|enabled| *enabled == feature)
        };
        let os = config.os.as_ref();
        let packages = os.and_then(|os| os.packages.as_ref());
        let storage = config.storage.as_ref();
        let output = config.output.as_ref();
        let mut gates: Vec<(String, PreviewFeature)> = Vec::new();
        let mut gate = |set: bool, path: &str, feature| {
            if set {
                gates.push((path.to_owned(), feature));
            }
        };
        gate(
            config
                .iso
                .as_ref()
                .is_some_and(|iso| iso.kdump_boot_files.is_some()),
            "iso.kdumpBootFiles",
            PreviewFeature::KdumpBootFiles,
        );
        gate(
            config
                .pxe
                .as_ref()
                .is_some_and(|pxe| pxe.kdump_boot_files.is_some()),
            "pxe.kdumpBootFiles",
            PreviewFeature::KdumpBootFiles,
        );
        gate(
            os.is_some_and(|os| os.uki.is_some()),
            "os.uki",
            PreviewFeature::Uki,
        );
        gate(
            packages.is_some_and(|packages| packages.snapshot_time.is_some()),
            "os.packages.snapshotTime",
            PreviewFeature::PackageSnapshotTime,
        );
        gate(
            packages.is_some_and(|packages| packages.remove_package_manager.is_some()),
            "os.packages.removePackageManager",
            PreviewFeature::RemovePackageManager,
        );
        gate(
            output.is_some_and(|output| output.artifacts.is_some()),
            "output.artifacts",
            PreviewFeature::OutputArtifacts,
        );
        gate(
            output.is_some_and(|output| output.selinux_policy_path.is_some()),
            "output.selinuxPolicyPath",
            PreviewFeature::OutputSelinuxPolicy,
        );
        for (index, verity) in storage
            .iter()
            .flat_map(|storage| storage.verity.iter().flatten())
            .enumerate()
        {
            gate(
                verity.hash_signature_path.is_some(),
                &format!("storage.verity[{index}].hashSignaturePath"),
                PreviewFeature::OutputArtifacts,
            );
        }
        gate(
            storage.is_some_and(|storage| storage.reinitialize_verity.is_some()),
            "storage.reinitializeVerity",
            PreviewFeature::ReinitializeVerity,
        );
        gate(
            config.base_configs.is_some(),
            "baseConfigs",
            PreviewFeature::BaseConfigs,
        );
        gate(
            config
                .input
                .as_ref()
                .and_then(|input| input.image.as_ref())
                .is_some_and(|image| image.oci.is_some()),
            "input.image.oci",
            PreviewFeature::InputImageOci,
        );
        for (index, filesystem) in storage
            .iter()
            .flat_map(|storage| storage.filesystems.iter().flatten())
            .enumerate()
        {
            gate(
                filesystem.filesystem_type.as_deref() == Some("btrfs"),
                &format!("storage.filesystems[{index}].type"),
                PreviewFeature::Btrfs,
            );
        }
        for (path, feature) in gates {
            if !enabled(feature) {
                let name = feature.name();
                self.error_at_key(
                    &path,
                    format!(
                        "the '{name}' preview feature must be enabled to use '{path}'; add \
                         `previewFeatures: [{name}]` to this file"
                    ),
                );
            }
        }
    }

    /// The rest of AzL-IC's `IsValid()` rules for settings vmic parses but does not carry out
    /// yet (so a config it accepts is one the Image Customizer accepts).
    fn schema_rules(&mut self, config: &Config, ctx: &ValidationContext) {
        for (index, base) in config.base_configs.iter().flatten().enumerate() {
            if base
                .path
                .as_deref()
                .is_none_or(|path| path.trim().is_empty())
            {
                self.error(
                    &format!("baseConfigs[{index}].path"),
                    "path must not be empty; name a config file relative to this one",
                );
            }
        }
        if let Some(image) = config.input.as_ref().and_then(|input| input.image.as_ref()) {
            let sources = [
                image.path.is_some(),
                image.oci.is_some(),
                image.azure_linux.is_some(),
            ];
            if sources.iter().filter(|set| **set).count() > 1 {
                self.error(
                    "input.image",
                    "must only specify one of 'path', 'oci', and 'azureLinux'",
                );
            }
            if let Some(oci) = &image.oci {
                let uri = match oci {
                    super::model::OciImage::Uri(uri) => Some(uri.as_str()),
                    super::model::OciImage::Full(fields) => fields.uri.as_deref(),
                };
                if uri.is_none_or(|uri| uri.is_empty() || uri.contains(char::is_whitespace)) {
                    self.error(
                        "input.image.oci",
                        "missing or invalid `uri`; give an OCI reference such as \
                         mcr.microsoft.com/azurelinux/3.0/image/minimal-os:latest",
                    );
                }
            }
            if let Some(azure_linux) = &image.azure_linux {
                let version = azure_linux.version.as_deref().unwrap_or_default();
                if !is_azure_linux_version(version) {
                    self.error(
                        "input.image.azureLinux.version",
                        format!("invalid version {version:?}; expected MAJOR.MINOR[.DATE]"),
                    );
                }
                let variant = azure_linux.variant.as_deref().unwrap_or_default();
                if !is_oci_name_component(variant) {
                    self.error(
                        "input.image.azureLinux.variant",
                        format!(
                            "invalid variant {variant:?}; allowed: lowercase letters and digits \
                             separated by `.`, `_`, `__` or `-`"
                        ),
                    );
                }
            }
        }
        if let Some(time) = config
            .os
            .as_ref()
            .and_then(|os| os.packages.as_ref())
            .and_then(|packages| packages.snapshot_time.as_deref())
        {
            if !is_snapshot_time(time) {
                self.error(
                    "os.packages.snapshotTime",
                    format!(
                        "invalid snapshot time {time:?}: must be YYYY-MM-DD or full RFC3339 \
                         (e.g., 2024-05-20T15:04:05Z)"
                    ),
                );
            }
        }
        let remove_package_manager = config
            .os
            .as_ref()
            .and_then(|os| os.packages.as_ref())
            .and_then(|packages| packages.remove_package_manager)
            == Some(true);
        if remove_package_manager {
            if let Some(
                format @ (ImageFormat::Iso
                | ImageFormat::PxeDir
                | ImageFormat::PxeTar
                | ImageFormat::Cosi
                | ImageFormat::BaremetalImage),
            ) = effective_image_format(config, ctx)
            {
                self.error_at_key(
                    "os.packages.removePackageManager",
                    format!(
                        "the package manager cannot be removed with {format} output (as in the \
                         Image Customizer)"
                    ),
                );
            }
        }
        let storage = config.storage.as_ref();
        let reset_bootloader = config
            .os
            .as_ref()
            .and_then(|os| os.bootloader.as_ref())
            .is_some_and(|bootloader| bootloader.reset_type.is_some());
        if !reset_bootloader {
            for field in ["disks", "resetPartitionsUuidsType"] {
                let set = storage.is_some_and(|storage| match field {
                    "disks" => storage.disks.is_some(),
                    _ => storage.reset_partitions_uuids_type.is_some(),
                });
                if set {
                    self.error_at_key(
                        &format!("storage.{field}"),
                        format!(
                            "'os.bootloader.resetType' must be specified if 'storage.{field}' is \
                             specified"
                        ),
                    );
                }
            }
        }
        for (index, filesystem) in storage
            .iter()
            .flat_map(|storage| storage.filesystems.iter().flatten())
            .enumerate()
        {
            let entry = format!("storage.filesystems[{index}]");
            if let Some(mount_point) = &filesystem.mount_point {
                self.mount_point(&format!("{entry}.mountPoint"), mount_point);
            }
            let Some(btrfs) = &filesystem.btrfs else {
                continue;
            };
            if filesystem.filesystem_type.as_deref() != Some("btrfs") {
                self.error_at_key(
                    &format!("{entry}.btrfs"),
                    "`btrfs` settings need `type: btrfs`",
                );
            }
            for (sub_index, subvolume) in btrfs.subvolumes.iter().flatten().enumerate() {
                let sub = format!("{entry}.btrfs.subvolumes[{sub_index}]");
                if let Err(problem) = check_subvolume_path(subvolume.path.as_deref().unwrap_or(""))
                {
                    self.error(&format!("{sub}.path"), format!("invalid path: {problem}"));
                }
                if let Some(mount_point) = &subvolume.mount_point {
                    self.mount_point(&format!("{sub}.mountPoint"), mount_point);
                    if let super::model::MountPoint::Full(fields) = mount_point {
                        let options = fields.options.as_deref().unwrap_or_default();
                        if options.split(',').any(|option| {
                            option.starts_with("subvol=") || option.starts_with("subvolid=")
                        }) {
                            self.error(
                                &format!("{sub}.mountPoint.options"),
                                "'subvol=' and 'subvolid=' are added by the Image Customizer; \
                                 remove them",
                            );
                        }
                    }
                }
                for (field, limit) in [
                    (
                        "referencedLimit",
                        subvolume
                            .quota
                            .as_ref()
                            .and_then(|q| q.referenced_limit.as_deref()),
                    ),
                    (
                        "exclusiveLimit",
                        subvolume
                            .quota
                            .as_ref()
                            .and_then(|q| q.exclusive_limit.as_deref()),
                    ),
                ] {
                    if let Some(limit) = limit {
                        if !is_disk_size(limit) {
                            self.error(
                                &format!("{sub}.quota.{field}"),
                                format!(
                                    "invalid size {limit:?}; give a positive size such as 10G \
                                     (units K, M, G, T)"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    fn mount_point(&mut self, path: &str, mount_point: &super::model::MountPoint) {
        let target = mount_point.path().unwrap_or_default();
        if !target.starts_with('/') {
            self.error(
                path,
                format!("mount point {target:?} must be an absolute path such as /var"),
            );
        }
        if let super::model::MountPoint::Full(fields) = mount_point {
            if fields
                .options
                .as_deref()
                .is_some_and(|options| options.contains(char::is_whitespace))
            {
                self.error(
                    &format!("{path}.options"),
                    "options contain spaces, tabs, or newlines; separate them with commas",
                );
            }
        }
    }

    /// `pxe`'s own rules (`Pxe.IsValid`).
    fn pxe(&mut self, pxe: &super::model::Pxe) {
        if pxe.initramfs_type == Some(super::model::InitramfsType::FullOs)
            && (pxe.bootstrap_base_url.is_some() || pxe.bootstrap_file_url.is_some())
        {
            self.error_at_key(
                "pxe.initramfsType",
                "cannot specify either 'bootstrapBaseUrl' or 'bootstrapFileUrl' when the \
                 initramfs type is set to 'full-os'",
            );
        }
        if pxe.bootstrap_base_url.is_some() && pxe.bootstrap_file_url.is_some() {
            self.error_at_key(
                "pxe.bootstrapFileUrl",
                "cannot specify both 'bootstrapBaseUrl' and 'bootstrapFileUrl'; keep one",
            );
        }
        for (field, url) in [
            ("bootstrapBaseUrl", &pxe.bootstrap_base_url),
            ("bootstrapFileUrl", &pxe.bootstrap_file_url),
        ] {
            let Some(url) = url else {
                continue;
            };
            const PROTOCOLS: [&str; 5] = ["ftp://", "http://", "https://", "nfs://", "tftp://"];
            if !PROTOCOLS.iter().any(|protocol| url.starts_with(protocol)) {
                self.error(
                    &format!("pxe.{field}"),
                    format!(
                        "unsupported URL protocol in {url:?}; allowed: {}",
                        PROTOCOLS.join(", ")
                    ),
                );
            } else if url.contains(char::is_whitespace) {
                self.error(&format!("pxe.{field}"), format!("invalid URL {url:?}"));
            }
        }
    }

    /// Every line of an `sshPublicKeyPaths` file must be a public key: a private key copied
    /// there by mistake would end up in the image's `authorized_keys`.
    fn public_key_file(&mut self, path: &str, value: &str) {
        let file = self.resolve(value);
        let text = match fs_err::read(&file) {
            Ok(bytes) => bytes,
            Err(error) => {
                self.error(
                    path,
                    format!("cannot read {}: {}", file.display(), error.kind()),
                );
                return;
            }
        };
        if let Err(problem) = super::ssh_key::check_public_key_file(&text) {
            self.error(path, format!("{}: {problem}", file.display()));
        }
    }

    fn account_name(
        &mut self,
        path: &str,
        name: Option<&str>,
        seen: &mut HashSet<String>,
        what: &str,
    ) {
        match name {
            None => self.error(path, format!("missing {what} name")),
            Some(name) if !is_account_name(name) => self.error(
                path,
                format!(
                    "invalid {what} name {name:?}; allowed: up to 32 lowercase letters, digits, \
                     `_` and `-`, starting with a letter or `_`"
                ),
            ),
            Some(name) => {
                if !seen.insert(name.to_owned()) {
                    self.error(
                        path,
                        format!("duplicate {what} {name:?}; list each {what} once"),
                    );
                }
            }
        }
    }

    fn output(&mut self, config: &Config) {
        if let Some(image) = config.input.as_ref().and_then(|input| input.image.as_ref()) {
            if image.path.as_deref() == Some("") {
                self.error("input.image.path", "empty path; name the input image file");
            }
        }
        let Some(image) = config
            .output
            .as_ref()
            .and_then(|output| output.image.as_ref())
        else {
            return;
        };
        if image.path.as_deref() == Some("") {
            self.error("output.image.path", "empty path; name the output file");
        }
    }

    /// Rules that depend on the output format (command line over config).
    fn iso_output(&mut self, config: &Config, ctx: &ValidationContext) {
        let Some(format) = effective_output_format(config, ctx) else {
            return;
        };
        let format_name = format.name();
        if format.is_pxe() {
            let pxe = config.pxe.as_ref();
            let bootstrap = pxe.and_then(|pxe| pxe.initramfs_type)
                == Some(super::model::InitramfsType::Bootstrap);
            let url = pxe.is_some_and(|pxe| {
                pxe.bootstrap_base_url.is_some() || pxe.bootstrap_file_url.is_some()
            });
            if bootstrap && !url {
                self.error_at_key(
                    "pxe.initramfsType",
                    "a bootstrap PXE initrd fetches the ISO over the network: set \
                     pxe.bootstrapBaseUrl or pxe.bootstrapFileUrl (or use initramfsType full-os)",
                );
            }
        }
        if format.is_live() {
            let storage = config.storage.as_ref();
            if storage.is_some_and(|storage| storage.disks.is_some()) {
                self.error_at_key(
                    "storage.disks",
                    "disk layout changes are not possible with ISO output (the ISO holds one \
                     LiveOS image); remove `storage.disks` or choose a disk output format",
                );
            }
            if storage.is_some_and(|storage| storage.verity.is_some()) {
                self.error_at_key(
                    "storage.verity",
                    "dm-verity is not supported on a LiveOS ISO; remove `storage.verity` or \
                     choose a disk output format",
                );
            }
            let selinux = config
                .os
                .as_ref()
                .and_then(|os| os.selinux.as_ref())
                .and_then(|selinux| selinux.mode);
            if selinux.is_some_and(|mode| mode != SelinuxMode::Disabled) {
                self.error_at_key(
                    "os.selinux.mode",
                    "SELinux is not supported on a LiveOS ISO (it boots with selinux=0); \
                     allowed with ISO output: disabled",
                );
            }
        } else {
            if config.iso.is_some() {
                self.error_at_key(
                    "iso",
                    format!(
                        "`iso` settings need ISO output, but the output format is \
                         {format_name}; remove `iso` or use --output-image-format iso"
                    ),
                );
            }
            if ctx.input_is_iso == Some(true) {
                self.error_at_key(
                    "output.image.format",
                    format!(
                        "the input is a LiveOS ISO, which can only be written as an ISO, but the \
                         output format is {format_name}; allowed: iso"
                    ),
                );
            }
        }
    }
}

/// Why a kernel argument cannot be given for a LiveOS boot (ISO or PXE), if it cannot.
pub fn live_arg_problem(arg: &str) -> Option<&'static str> {
    let key = arg.split_once('=').map_or(arg, |(key, _)| key);
    if matches!(key, "security" | "selinux" | "enforcing") && arg != "selinux=0" {
        return Some("SELinux is always off on LiveOS media (selinux=0)");
    }
    if key == "root" {
        return Some("the root is the LiveOS image (root=live:...), set by vmic");
    }
    None
}

/// `MAJOR.MINOR` or `MAJOR.MINOR.DATE` (AzL-IC's `azureLinuxVersionRegex`).
fn is_azure_linux_version(version: &str) -> bool {
    let parts: Vec<&str> = version.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit()))
}

/// An OCI name component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_oci_name_component(name: &str) -> bool {
    let bytes = name.as_bytes();
    let alnum = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if alnum(bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !alnum(bytes[index]) {
            index += 1;
        }
        let separator = &name[start..index];
        let dashes = separator.bytes().all(|byte| byte == b'-');
        if !(matches!(separator, "." | "_" | "__") || dashes) {
            return false;
        }
    }
    true
}

/// `YYYY-MM-DD` or an RFC 3339 date-time (what Go's `time.RFC3339` parses).
fn is_snapshot_time(text: &str) -> bool {
    let date_ok = |date: &str| {
        let parts: Vec<&str> = date.split('-').collect();
        parts.len() == 3
            && [4, 2, 2]
                .iter()
                .zip(&parts)
                .all(|(len, part)| part.len() == *len && part.bytes().all(|b| b.is_ascii_digit()))
            && (1..=12).contains(&parts[1].parse::<u32>().unwrap_or(0))
            && (1..=31).contains(&parts[2].parse::<u32>().unwrap_or(0))
    };
    let Some((date, time)) = text.split_once('T') else {
        return date_ok(text);
    };
    let (clock, zone) = if let Some(clock) = time.strip_suffix('Z') {
        (clock, None)
    } else if let Some(index) = time.rfind(['+', '-']) {
        (&time[..index], Some(&time[index + 1..]))
    } else {
        return false;
    };
    let clock = clock.split('.').next().unwrap_or_default();
    let two_digits = |parts: &[&str], count: usize| {
        parts.len() == count
            && parts
                .iter()
                .all(|part| part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit()))
    };
    date_ok(date)
        && two_digits(&clock.split(':').collect::<Vec<_>>(), 3)
        && zone.is_none_or(|zone| two_digits(&zone.split(':').collect::<Vec<_>>(), 2))
}

/// A btrfs subvolume path as AzL-IC accepts it (`validateSubvolumePath`).
fn check_subvolume_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("path must not be empty");
    }
    if path.starts_with('/') {
        return Err("path must not start with '/'");
    }
    if path.ends_with('/') {
        return Err("path must not end with '/'");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("path must not contain double slashes"),
            ".." => return Err("path must not contain '..' components"),
            "." => return Err("path must not contain '.' components"),
            _ => {}
        }
    }
    Ok(())
}

/// A positive disk size: digits and a unit K, M, G or T (AzL-IC's `DiskSize`).
fn is_disk_size(text: &str) -> bool {
    let digits = text.trim_end_matches(['K', 'M', 'G', 'T']);
    digits.len() + 1 == text.len()
        && !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|value| value > 0)
}

/// A host name as AzL-IC accepts it: a DNS name (dot-separated RFC 1123 labels).
pub fn check_hostname(hostname: &str) -> Result<(), String> {
    if hostname.is_empty() {
        return Err("it is empty".to_owned());
    }
    if hostname.len() > 253 {
        return Err("it is longer than 253 characters".to_owned());
    }
    for label in hostname.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (two dots, or a dot at either end)".to_owned());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("{bad:?} is not allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with a hyphen"));
        }
    }
    Ok(())
}

/// One kernel argument: no whitespace outside quotes, balanced quotes, no control characters.
pub fn check_kernel_arg(arg: &str) -> Result<(), String> {
    if arg.chars().any(|c| c.is_control()) {
        return Err("contains a control character such as a newline".to_owned());
    }
    let mut quote = None;
    for character in arg.chars() {
        match quote {
            Some(open) if character == open => quote = None,
            Some(_) => {}
            None if character == '"' || character == '\'' => quote = Some(character),
            None if character.is_ascii_whitespace() => {
                return Err(
                    "contains whitespace outside quotes; write one argument per list entry"
                        .to_owned(),
                )
            }
            None => {}
        }
    }
    match quote {
        Some(open) => Err(format!("unterminated {open} quote")),
        None => Ok(()),
    }
}

/// Octal permissions as AzL-IC accepts them: 3 or 4 octal digits, permission bits only.
pub fn check_permissions(value: &str) -> Result<(), String> {
    if !(3..=4).contains(&value.len()) {
        return Err("wrong number of digits".to_owned());
    }
    if let Some(bad) = value.chars().find(|c| !('0'..='7').contains(c)) {
        return Err(format!("{bad:?} is not an octal digit"));
    }
    let mode = u32::from_str_radix(value, 8).map_err(|error| error.to_string())?;
    if mode > 0o777 {
        return Err("setuid, setgid and sticky bits are not allowed".to_owned());
    }
    Ok(())
}

fn is_account_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn is_environment_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether a relative path climbs out of its base directory (lexically).
fn escapes(path: &Path) -> bool {
    let mut depth: i64 = 0;
    for component in path.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return true,
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_linux_versions_are_major_minor_and_an_optional_date() {
        for good in ["3.0", "2.0", "3.0.20250101", "10.12"] {
            assert!(is_azure_linux_version(good), "{good}");
        }
        for bad in [
            "", "3", "3.", ".0", "3.0.", "3..0", "3.0.1.2", "3.x", "v3.0", "3.0-1", "三.0",
        ] {
            assert!(!is_azure_linux_version(bad), "{bad}");
        }
    }

    #[test]
    fn snapshot_times_are_a_date_or_an_rfc3339_time() {
        for good in [
            "2025-01-31",
            "2025-12-01T10:20:30Z",
            "2025-12-01T10:20:30.123Z",
            "2025-12-01T10:20:30+01:00",
            "2025-12-01T10:20:30-08:00",
        ] {
            assert!(is_snapshot_time(good), "{good}");
        }
        for bad in [
            "",
            "2025-1-31",
            "25-01-31",
            "2025-13-01",
            "2025-00-10",
            "2025-01-32",
            "2025-01-00",
            "2025-01",
            "2025-01-31-01",
            "2025-0a-31",
            "2025-12-01T10:20:30",
            "2025-12-01T10:20Z",
            "2025-12-01T10:20:3aZ",
            "2025-12-01T1:20:30Z",
            "2025-12-01T10:20:30+0100",
            "2025-12-01T10:20:30+01",
            "2025-13-01T10:20:30Z",
        ] {
            assert!(!is_snapshot_time(bad), "{bad}");
        }
    }

    #[test]
    fn subvolume_paths_are_relative_and_plain() {
        for good in ["root", "var/log", "a.b/c..d"] {
            assert_eq!(check_subvolume_path(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "path must not be empty"),
            ("/root", "path must not start with '/'"),
            ("root/", "path must not end with '/'"),
            ("a//b", "path must not contain double slashes"),
            ("a/../b", "path must not contain '..' components"),
            ("..", "path must not contain '..' components"),
            ("a/./b", "path must not contain '.' components"),
            (".", "path must not contain '.' components"),
        ] {
            assert_eq!(check_subvolume_path(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn disk_sizes_are_positive_digits_and_one_unit() {
        for good in ["1K", "10M", "512G", "2T", "1000000K"] {
            assert!(is_disk_size(good), "{good}");
        }
        for bad in [
            "",
            "G",
            "0G",
            "10",
            "10g",
            "10GB",
            "10GG",
            "1.5G",
            "-1G",
            "1 G",
            "G10",
            "99999999999999999999G",
        ] {
            assert!(!is_disk_size(bad), "{bad}");
        }
    }

    #[test]
    fn host_names_are_at_most_253_characters_with_labels_of_at_most_63() {
        let label = |n: usize| "a".repeat(n);
        assert_eq!(check_hostname(&label(63)), Ok(()));
        assert_eq!(
            check_hostname(&label(64)),
            Err(format!(
                "label {:?} is longer than 63 characters",
                label(64)
            ))
        );
        // Three labels of 63 and one of 61, with three dots: exactly 253.
        let longest = [label(63), label(63), label(63), label(61)].join(".");
        assert_eq!(longest.len(), 253);
        assert_eq!(check_hostname(&longest), Ok(()));
        assert_eq!(
            check_hostname(&format!("{longest}a")),
            Err("it is longer than 253 characters".to_owned())
        );
    }

    #[test]
    fn account_names_start_with_a_letter_or_underscore_and_stay_short() {
        let longest = format!("a{}", "b".repeat(31));
        for good in ["alice", "_svc", "a1", "a_b-c", "a-", longest.as_str()] {
            assert!(is_account_name(good), "{good}");
        }
        let too_long = format!("{longest}c");
        for bad in [
            "",
            "1a",
            "-a",
            "Alice",
            "aB",
            "a.b",
            "a b",
            "a$",
            too_long.as_str(),
        ] {
            assert!(!is_account_name(bad), "{bad}");
        }
    }

    #[test]
    fn oci_name_components_follow_the_distribution_spec() {
        for good in [
            "minimal-os",
            "a",
            "0",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "os2.core_x__y-z",
        ] {
            assert!(is_oci_name_component(good), "{good}");
        }
        for bad in [
            "", "-a", "a-", ".a", "a.", "_a", "a_", "Minimal", "a..b", "a___b", "a._b", "a-.b",
            "a b", "a/b", "a:b", "é",
        ] {
            assert!(!is_oci_name_component(bad), "{bad}");
        }
    }
}
