//! Semantic and cross-field rules on a structurally valid config: each problem becomes an error
//! at the key path it concerns, saying what is allowed.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use super::model::{AdditionalFiles, Config, KernelCommandLine, PasswordType, Script, SelinuxMode};
use super::{
    effective_output_format, output_format_of, ConfigError, LoadedConfig, ValidationContext,
};
use crate::cli::OutputFormat;

/// Run every rule; returns all errors found (empty when the config is valid).
pub fn validate(loaded: &LoadedConfig, ctx: &ValidationContext) -> Vec<ConfigError> {
    let mut rules = Rules {
        loaded,
        errors: Vec::new(),
    };
    let config = &loaded.config;
    rules.output(config, ctx);
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
        }
    }
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
    for (index, feature) in config.preview_features.iter().flatten().enumerate() {
        if feature.trim().is_empty() {
            rules.error(
                &format!("previewFeatures[{index}]"),
                "empty preview feature name; remove the entry or name a feature",
            );
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
                (Some(source), None) => self.source_file(&format!("{entry}.source"), source),
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

    /// A file the config refers to must exist (relative to the config directory).
    fn source_file(&mut self, path: &str, value: &str) {
        if value.is_empty() {
            self.error(
                path,
                "empty file name; name a file relative to the config file",
            );
            return;
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
        }
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
                    self.source_file(&path, list);
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
                self.source_file(&format!("{entry}.sshPublicKeyPaths[{key_index}]"), key_path);
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
                        self.source_file(&format!("{password_path}.value"), file)
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
        if let Some(super::model::UkiKernels::Auto(value)) =
            os.uki.as_ref().and_then(|uki| uki.kernels.as_ref())
        {
            if value != "auto" {
                self.error(
                    "os.uki.kernels",
                    format!("unsupported value {value:?}; allowed: auto, or a list of versions"),
                );
            }
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

    fn output(&mut self, config: &Config, ctx: &ValidationContext) {
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
        if let Some(format) = image.format {
            if ctx.output_format.is_none() && output_format_of(format).is_none() {
                self.error(
                    "output.image.format",
                    format!(
                        "vmic cannot write {format} images; allowed: iso, raw, qcow2, vhd, \
                         vhd-fixed, vhdx"
                    ),
                );
            }
        }
    }

    /// Rules that depend on the output format (command line over config).
    fn iso_output(&mut self, config: &Config, ctx: &ValidationContext) {
        let Some(format) = effective_output_format(config, ctx) else {
            return;
        };
        let format_name = format.name();
        if format == OutputFormat::Iso {
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
