//! `baseConfigs`: config inheritance as the Image Customizer does it
//! (`imagecustomizerlib/baseconfigs.go`, `configvalidation.go`).
//!
//! The chain is built depth first, each file's bases before the file itself, so the top file
//! comes last. A file that appears twice is refused with the chain named (the Image Customizer
//! keeps one `visited` set for the whole walk, so it refuses a file reached twice through
//! different bases too). Each file is checked on its own, so every error names the file and
//! line its value came from; the chain is then merged:
//! - lists append, in chain order: `os`/`iso`/`pxe` `additionalFiles` and `kernelCommandLine`,
//!   and (as the Image Customizer applies each file's os customizations and scripts in turn)
//!   packages, additionalDirs, users, groups, services, modules, overlays, scripts;
//! - scalars are overridden by the last file that sets them (hostname, selinux mode,
//!   bootloader reset type, uki, imageHistory, removePackageManager, iso/pxe initramfsType,
//!   kdumpBootFiles, bootstrap URLs, output image path and format, selinuxPolicyPath);
//! - `output.artifacts`: path overridden, items united; `previewFeatures` united;
//! - `storage` may be set in one file of the chain only.
//!
//! Paths a base file names are relative to that file's directory; in the merged config they are
//! made absolute (as the Image Customizer's `GetAbsPathWithBase` does), so each value carries
//! its own base. The top file's paths stay relative to [`LoadedConfig::dir`].

use std::path::{Path, PathBuf};

use super::model::{AdditionalFiles, Config, PasswordType, Script};
use super::{
    output_format_of, parse_str, ConfigError, ConfigErrors, LoadedConfig, Parsed, ValidationContext,
};

/// More files than any real chain has; bounds the work a hostile chain can cause.
const MAX_CHAIN_FILES: usize = 64;

/// Load the bases of `top`, check every file, and merge them.
pub(super) fn load_chain(
    top: Parsed,
    ctx: &ValidationContext,
) -> Result<LoadedConfig, ConfigErrors> {
    let mut walk = Walk {
        stack: Vec::new(),
        visited: Vec::new(),
        files: Vec::new(),
        errors: Vec::new(),
    };
    let top_key = identity(&top.loaded.path);
    walk.visited.push(top_key.clone());
    walk.stack.push(top_key);
    walk.collect(top);

    // The format decides rules in every file (e.g. `iso` needs ISO output): the command line's,
    // else the last file's that sets one.
    let format = ctx.output_format.or_else(|| {
        walk.files.iter().rev().find_map(|parsed| {
            let format = parsed
                .loaded
                .config
                .output
                .as_ref()?
                .image
                .as_ref()?
                .format?;
            output_format_of(format)
        })
    });
    let chain_ctx = ValidationContext {
        output_format: format,
        input_is_iso: ctx.input_is_iso,
    };
    let mut errors = walk.errors;
    let mut files = Vec::new();
    for parsed in walk.files {
        errors.extend(parsed.errors);
        let mut loaded = parsed.loaded;
        loaded.cli_output_format = ctx.output_format;
        errors.extend(super::validate::validate(&loaded, &chain_ctx));
        files.push(loaded);
    }
    errors.extend(storage_in_one_file(&files));
    let top = files.last().expect("the top file is always in the chain");
    errors.extend(base_scripts_outside(&files, top));
    if !errors.is_empty() {
        return Err(ConfigErrors { errors }.sorted());
    }
    let merged = merge(&files);
    let top = files
        .last()
        .expect("the top file is always in the chain")
        .clone();
    Ok(LoadedConfig {
        config: merged,
        path: top.path,
        dir: top.dir,
        sources: top.sources,
        chain: files,
        cli_output_format: ctx.output_format,
    })
}

struct Walk {
    /// Files from the top down to the one being read, for the cycle message.
    stack: Vec<PathBuf>,
    visited: Vec<PathBuf>,
    /// Chain order: bases first.
    files: Vec<Parsed>,
    errors: Vec<ConfigError>,
}

impl Walk {
    fn collect(&mut self, parsed: Parsed) {
        let bases: Vec<(usize, String)> = parsed
            .loaded
            .config
            .base_configs
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(index, base)| Some((index, base.path.clone()?)))
            .filter(|(_, path)| !path.trim().is_empty())
            .collect();
        for (index, relative) in bases {
            let key_path = format!("baseConfigs[{index}].path");
            let error = |message: String| parsed.loaded.error_at(&key_path, message);
            let path = absolute(&parsed.loaded.dir.join(&relative));
            let key = identity(&path);
            if let Some(start) = self.stack.iter().position(|seen| *seen == key) {
                let cycle: Vec<String> = self.stack[start..]
                    .iter()
                    .chain([&key])
                    .map(|path| path.display().to_string())
                    .collect();
                self.errors.push(error(format!(
                    "cycle in baseConfigs: {}; a config cannot inherit from itself",
                    cycle.join(" -> ")
                )));
                continue;
            }
            if self.visited.contains(&key) {
                self.errors.push(error(format!(
                    "{} is already in the baseConfigs chain (through another base); the Image \
                     Customizer includes each file once: name it in one place",
                    path.display()
                )));
                continue;
            }
            if self.visited.len() >= MAX_CHAIN_FILES {
                self.errors.push(error(format!(
                    "the baseConfigs chain has more than {MAX_CHAIN_FILES} files"
                )));
                return;
            }
            self.visited.push(key.clone());
            let text = match fs_err::read_to_string(&path) {
                Ok(text) => text,
                Err(io_error) => {
                    self.errors.push(error(format!(
                        "cannot read base config {}: {}; paths are relative to the directory of \
                         {}",
                        path.display(),
                        io_error.kind(),
                        parsed.loaded.path.display()
                    )));
                    continue;
                }
            };
            let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
            match parse_str(&text, &path, &dir) {
                Ok(base) => {
                    self.stack.push(key);
                    self.collect(base);
                    self.stack.pop();
                }
                Err(errors) => self.errors.extend(errors.errors),
            }
        }
        self.files.push(parsed);
    }
}

/// A path made absolute and cleaned lexically (`.` and `..` resolved, as Go's `filepath.Join`
/// does in the Image Customizer), without touching the file system.
fn absolute(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// What makes two names one file: the canonical path when the file exists.
fn identity(path: &Path) -> PathBuf {
    fs_err::canonicalize(path).unwrap_or_else(|_| absolute(path))
}

/// The Image Customizer allows `storage` in one file of the chain (`ErrStorageMoreThanOne`).
fn storage_in_one_file(files: &[LoadedConfig]) -> Vec<ConfigError> {
    let mut with_storage = files.iter().filter(|file| file.config.storage.is_some());
    let Some(first) = with_storage.next() else {
        return Vec::new();
    };
    with_storage
        .map(|file| {
            file.error_at(
                "storage",
                format!(
                    "storage is already set in {}; storage may be set in one file of a \
                     baseConfigs chain only",
                    first.path.display()
                ),
            )
        })
        .collect()
}

/// Scripts reach the builder VM inside the top config's directory: a base config's script
/// elsewhere cannot be run yet.
fn base_scripts_outside(files: &[LoadedConfig], top: &LoadedConfig) -> Vec<ConfigError> {
    let top_dir = identity(&top.dir);
    let mut errors = Vec::new();
    for file in &files[..files.len() - 1] {
        if identity(&file.dir).starts_with(&top_dir) {
            continue;
        }
        let Some(scripts) = &file.config.scripts else {
            continue;
        };
        for (list, entries) in [
            ("scripts.postCustomization", &scripts.post_customization),
            (
                "scripts.finalizeCustomization",
                &scripts.finalize_customization,
            ),
        ] {
            for (index, script) in entries.iter().flatten().enumerate() {
                if script.path.is_some() {
                    let path = format!("{list}[{index}].path");
                    errors.push(file.error_at(
                        &path,
                        format!(
                            "not supported yet: {path} in a base config outside the top config's \
                             directory {} (only that directory reaches the builder VM); move the \
                             base config under it or give the script as `content`",
                            top.dir.display()
                        ),
                    ));
                }
            }
        }
    }
    errors
}

/// The merged config of a checked chain (bases first).
fn merge(files: &[LoadedConfig]) -> Config {
    let last = files.len() - 1;
    let mut merged = Config::default();
    for (index, file) in files.iter().enumerate() {
        let mut config = file.config.clone();
        if index != last {
            rebase(&mut config, &file.dir, &files[last].dir);
        }
        merge_into(&mut merged, config);
    }
    merged.base_configs = None;
    merged
}

/// Set `target` to `value` when `value` is set: the later file wins.
fn over<T>(target: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *target = value;
    }
}

/// Append `value`'s entries to `target`'s.
fn append<T>(target: &mut Option<Vec<T>>, value: Option<Vec<T>>) {
    if let Some(values) = value {
        target.get_or_insert_with(Vec::new).extend(values);
    }
}

fn append_files(target: &mut Option<AdditionalFiles>, value: Option<AdditionalFiles>) {
    if let Some(files) = value {
        target
            .get_or_insert_with(Default::default)
            .0
            .extend(files.0);
    }
}

fn append_args(
    target: &mut Option<super::model::KernelCommandLine>,
    value: Option<super::model::KernelCommandLine>,
) {
    if let Some(args) = value.and_then(|line| line.extra_command_line) {
        target
            .get_or_insert_with(Default::default)
            .extra_command_line
            .get_or_insert_with(Default::default)
            .0
            .extend(args.0);
    }
}

fn merge_into(merged: &mut Config, config: Config) {
    if let Some(input) = config.input {
        let target = merged.input.get_or_insert_with(Default::default);
        if let Some(image) = input.image {
            // The input image is one thing, not a merge of fields.
            target.image = Some(image);
        }
    }
    over(&mut merged.storage, config.storage);
    if let Some(iso) = config.iso {
        let target = merged.iso.get_or_insert_with(Default::default);
        append_files(&mut target.additional_files, iso.additional_files);
        append_args(&mut target.kernel_command_line, iso.kernel_command_line);
        over(&mut target.initramfs_type, iso.initramfs_type);
        over(&mut target.kdump_boot_files, iso.kdump_boot_files);
    }
    if let Some(pxe) = config.pxe {
        let target = merged.pxe.get_or_insert_with(Default::default);
        append_files(&mut target.additional_files, pxe.additional_files);
        append_args(&mut target.kernel_command_line, pxe.kernel_command_line);
        over(&mut target.initramfs_type, pxe.initramfs_type);
        over(&mut target.kdump_boot_files, pxe.kdump_boot_files);
        over(&mut target.bootstrap_base_url, pxe.bootstrap_base_url);
        over(&mut target.bootstrap_file_url, pxe.bootstrap_file_url);
    }
    if let Some(os) = config.os {
        let target = merged.os.get_or_insert_with(Default::default);
        over(&mut target.hostname, os.hostname);
        if let Some(packages) = os.packages {
            let into = target.packages.get_or_insert_with(Default::default);
            over(
                &mut into.update_existing_packages,
                packages.update_existing_packages,
            );
            append(&mut into.install, packages.install);
            append(&mut into.remove, packages.remove);
            append(&mut into.update, packages.update);
            append(&mut into.install_lists, packages.install_lists);
            append(&mut into.remove_lists, packages.remove_lists);
            append(&mut into.update_lists, packages.update_lists);
            over(&mut into.snapshot_time, packages.snapshot_time);
            over(
                &mut into.remove_package_manager,
                packages.remove_package_manager,
            );
        }
        append_files(&mut target.additional_files, os.additional_files);
        append(&mut target.additional_dirs, os.additional_dirs);
        append(&mut target.users, os.users);
        append(&mut target.groups, os.groups);
        if let Some(services) = os.services {
            let into = target.services.get_or_insert_with(Default::default);
            append(&mut into.enable, services.enable);
            append(&mut into.disable, services.disable);
        }
        append(&mut target.modules, os.modules);
        append_args(&mut target.kernel_command_line, os.kernel_command_line);
        if let Some(mode) = os.selinux.and_then(|selinux| selinux.mode) {
            target.selinux.get_or_insert_with(Default::default).mode = Some(mode);
        }
        if let Some(reset) = os.bootloader.and_then(|bootloader| bootloader.reset_type) {
            target
                .bootloader
                .get_or_insert_with(Default::default)
                .reset_type = Some(reset);
        }
        append(&mut target.overlays, os.overlays);
        over(&mut target.uki, os.uki);
        over(&mut target.image_history, os.image_history);
    }
    if let Some(scripts) = config.scripts {
        let target = merged.scripts.get_or_insert_with(Default::default);
        append(&mut target.post_customization, scripts.post_customization);
        append(
            &mut target.finalize_customization,
            scripts.finalize_customization,
        );
    }
    if let Some(features) = config.preview_features {
        let target = merged.preview_features.get_or_insert_with(Vec::new);
        for feature in features {
            if !target.contains(&feature) {
                target.push(feature);
            }
        }
    }
    if let Some(output) = config.output {
        let target = merged.output.get_or_insert_with(Default::default);
        if let Some(image) = output.image {
            let into = target.image.get_or_insert_with(Default::default);
            over(&mut into.path, image.path);
            over(&mut into.format, image.format);
            over(&mut into.cosi, image.cosi);
        }
        if let Some(artifacts) = output.artifacts {
            let into = target.artifacts.get_or_insert_with(Default::default);
            over(&mut into.path, artifacts.path);
            for item in artifacts.items.into_iter().flatten() {
                let items = into.items.get_or_insert_with(Vec::new);
                if !items.contains(&item) {
                    items.push(item);
                }
            }
        }
        over(&mut target.selinux_policy_path, output.selinux_policy_path);
    }
}

/// Make a base file's host paths absolute (joined with its directory); script paths become
/// relative to the top file's directory, where the build finds them.
fn rebase(config: &mut Config, dir: &Path, top_dir: &Path) {
    let dir = absolute(dir);
    let join = |value: &mut String| {
        if !value.is_empty() {
            *value = dir.join(&*value).to_string_lossy().into_owned();
        }
    };
    let join_all = |values: &mut Option<Vec<String>>| {
        for value in values.iter_mut().flatten() {
            join(value);
        }
    };
    let join_files = |files: &mut Option<AdditionalFiles>| {
        for file in files.iter_mut().flat_map(|files| files.0.iter_mut()) {
            if let Some(source) = &mut file.source {
                join(source);
            }
        }
    };
    if let Some(path) = config
        .input
        .as_mut()
        .and_then(|input| input.image.as_mut())
        .and_then(|image| image.path.as_mut())
    {
        join(path);
    }
    if let Some(output) = &mut config.output {
        if let Some(path) = output.image.as_mut().and_then(|image| image.path.as_mut()) {
            join(path);
        }
        if let Some(path) = output.artifacts.as_mut().and_then(|a| a.path.as_mut()) {
            join(path);
        }
        if let Some(path) = &mut output.selinux_policy_path {
            join(path);
        }
    }
    for verity in config
        .storage
        .iter_mut()
        .flat_map(|storage| storage.verity.iter_mut().flatten())
    {
        if let Some(path) = &mut verity.hash_signature_path {
            join(path);
        }
    }
    if let Some(iso) = &mut config.iso {
        join_files(&mut iso.additional_files);
    }
    if let Some(pxe) = &mut config.pxe {
        join_files(&mut pxe.additional_files);
    }
    if let Some(os) = &mut config.os {
        join_files(&mut os.additional_files);
        for dir_config in os.additional_dirs.iter_mut().flatten() {
            if let Some(source) = &mut dir_config.source {
                join(source);
            }
        }
        if let Some(packages) = &mut os.packages {
            join_all(&mut packages.install_lists);
            join_all(&mut packages.remove_lists);
            join_all(&mut packages.update_lists);
        }
        for user in os.users.iter_mut().flatten() {
            join_all(&mut user.ssh_public_key_paths);
            if let Some(password) = &mut user.password {
                if matches!(
                    password.password_type,
                    Some(PasswordType::PlainTextFile | PasswordType::HashedFile)
                ) {
                    if let Some(value) = &mut password.value {
                        join(value);
                    }
                }
            }
        }
    }
    let top_dir = identity(top_dir);
    let relative_to_top = |script: &mut Script| {
        if let Some(path) = &mut script.path {
            let file = identity(&dir.join(&*path));
            // Checked before merging (`base_scripts_outside`): the base lies under the top dir.
            if let Ok(relative) = file.strip_prefix(&top_dir) {
                *path = relative.to_string_lossy().into_owned();
            }
        }
    };
    if let Some(scripts) = &mut config.scripts {
        for script in scripts
            .post_customization
            .iter_mut()
            .flatten()
            .chain(scripts.finalize_customization.iter_mut().flatten())
        {
            relative_to_top(script);
        }
    }
}
