//! `os.modules`: `modules-load.d` and `modprobe.d` files.
//!
//! vmic keeps its own three files, so that a rerun (or an input that vmic built) rewrites
//! exactly what vmic wrote before and never edits the image's own configuration:
//! - [`LOAD_CONF`]: one module per line, loaded at every boot (`always`);
//! - [`DISABLED_CONF`]: `blacklist NAME` lines (`disable`);
//! - [`OPTIONS_CONF`]: one `options NAME k=v ...` line per module.

use std::path::Path;

use anyhow::Context;
use vmic_protocol::{ModuleLoadMode, ModuleSpec};

use super::read_optional;
use crate::rootfs::scoped_join;

const LOAD_CONF: &str = "/etc/modules-load.d/modules-load-vmic.conf";
const DISABLED_CONF: &str = "/etc/modprobe.d/modules-disabled-vmic.conf";
const OPTIONS_CONF: &str = "/etc/modprobe.d/module-options-vmic.conf";
/// The `modprobe.d` files vmic writes, which a LiveOS initrd must carry too.
pub(crate) const MODPROBE_CONFS: [&str; 2] = [DISABLED_CONF, OPTIONS_CONF];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ModulesError {
    #[error("module name {name:?} is not valid (empty, or contains whitespace or `/`)")]
    BadName { name: String },
    #[error(
        "module {module}: options cannot be set on a module with loadMode disable \
         (use always or auto)"
    )]
    OptionsForDisabled { module: String },
    #[error(
        "module {module}: options cannot be set with loadMode inherit because an earlier \
         os.modules entry disabled the module (use always or auto)"
    )]
    OptionsForInheritedDisabled { module: String },
    #[error("module {module}: option {key:?} is not valid (empty, or contains whitespace or `=`)")]
    BadOptionKey { module: String, key: String },
    #[error("module {module}: the value of option {key} contains a line break or a quote")]
    BadOptionValue { module: String, key: String },
}

/// The text of vmic's three files (empty when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ModuleFiles {
    load: String,
    disabled: String,
    options: String,
}

pub(crate) fn apply(root: &Path, modules: &[ModuleSpec]) -> anyhow::Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let current = ModuleFiles {
        load: read_optional(root, LOAD_CONF)?,
        disabled: read_optional(root, DISABLED_CONF)?,
        options: read_optional(root, OPTIONS_CONF)?,
    };
    let wanted = plan(&current, modules)?;
    for (path, before, after) in [
        (LOAD_CONF, &current.load, &wanted.load),
        (DISABLED_CONF, &current.disabled, &wanted.disabled),
        (OPTIONS_CONF, &current.options, &wanted.options),
    ] {
        if before == after {
            continue;
        }
        if after.is_empty() {
            let target = scoped_join(root, path)?;
            std::fs::remove_file(&target).with_context(|| format!("removing {path}"))?;
        } else {
            super::write_file(root, path, after.as_bytes(), 0o644)?;
        }
    }
    Ok(())
}

/// vmic's files after applying `modules` in order. Lines vmic did not write are kept.
fn plan(current: &ModuleFiles, modules: &[ModuleSpec]) -> Result<ModuleFiles, ModulesError> {
    let mut load = lines(&current.load);
    let mut disabled = lines(&current.disabled);
    let mut options = lines(&current.options);
    for module in modules {
        let name = module.name.as_str();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(ModulesError::BadName {
                name: name.to_owned(),
            });
        }
        match module.load_mode {
            ModuleLoadMode::Always => {
                disabled.retain(|line| !is_directive(line, "blacklist", name));
                if !load.iter().any(|line| is_directive(line, "", name)) {
                    load.push(name.to_owned());
                }
            }
            ModuleLoadMode::Auto => {
                disabled.retain(|line| !is_directive(line, "blacklist", name));
                load.retain(|line| !is_directive(line, "", name));
            }
            ModuleLoadMode::Disable => {
                if !module.options.is_empty() {
                    return Err(ModulesError::OptionsForDisabled {
                        module: name.to_owned(),
                    });
                }
                if !disabled
                    .iter()
                    .any(|line| is_directive(line, "blacklist", name))
                {
                    disabled.push(format!("blacklist {name}"));
                }
            }
            ModuleLoadMode::Inherit => {
                if !module.options.is_empty()
                    && disabled
                        .iter()
                        .any(|line| is_directive(line, "blacklist", name))
                {
                    return Err(ModulesError::OptionsForInheritedDisabled {
                        module: name.to_owned(),
                    });
                }
            }
        }
        if !module.options.is_empty() {
            let line = options_line(name, &module.options)?;
            // Replace the module's line in place (keeping the file's order), drop repeats.
            let mut replaced = false;
            options.retain_mut(|existing| {
                if !is_directive(existing, "options", name) {
                    return true;
                }
                if replaced {
                    return false;
                }
                replaced = true;
                *existing = line.clone();
                true
            });
            if !replaced {
                options.push(line);
            }
        }
    }
    Ok(ModuleFiles {
        load: join_lines(&load),
        disabled: join_lines(&disabled),
        options: join_lines(&options),
    })
}

fn options_line(module: &str, options: &[(String, String)]) -> Result<String, ModulesError> {
    let mut line = format!("options {module}");
    for (key, value) in options {
        if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == '=') {
            return Err(ModulesError::BadOptionKey {
                module: module.to_owned(),
                key: key.clone(),
            });
        }
        if value.contains(['\n', '\r', '"']) {
            return Err(ModulesError::BadOptionValue {
                module: module.to_owned(),
                key: key.clone(),
            });
        }
        // modprobe splits options at whitespace outside double quotes.
        if value.contains(char::is_whitespace) {
            line.push_str(&format!(" {key}=\"{value}\""));
        } else {
            line.push_str(&format!(" {key}={value}"));
        }
    }
    Ok(line)
}

/// Whether `line` is `<keyword> <module> ...` (or just `<module>` for an empty keyword).
/// modprobe treats `-` and `_` in module names alike, and so does this.
fn is_directive(line: &str, keyword: &str, module: &str) -> bool {
    let mut words = line.split_whitespace();
    if !keyword.is_empty() && words.next() != Some(keyword) {
        return false;
    }
    words
        .next()
        .is_some_and(|word| normalize(word) == normalize(module))
}

fn normalize(module: &str) -> String {
    module.replace('-', "_")
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

fn join_lines(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, load_mode: ModuleLoadMode, options: &[(&str, &str)]) -> ModuleSpec {
        ModuleSpec {
            name: name.to_owned(),
            load_mode,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn modes_write_the_three_files_idempotently() {
        let modules = [
            module("vfio", ModuleLoadMode::Always, &[("disable_vga", "Y")]),
            module("br_netfilter", ModuleLoadMode::Disable, &[]),
            module("mlx5_ib", ModuleLoadMode::Auto, &[("a", "1"), ("b", "x y")]),
            module(
                "kvm",
                ModuleLoadMode::Inherit,
                &[("nx_huge_pages", "never")],
            ),
        ];
        let once = plan(&ModuleFiles::default(), &modules).expect("plan");
        assert_eq!(once.load, "vfio\n");
        assert_eq!(once.disabled, "blacklist br_netfilter\n");
        assert_eq!(
            once.options,
            "options vfio disable_vga=Y\noptions mlx5_ib a=1 b=\"x y\"\n\
             options kvm nx_huge_pages=never\n"
        );
        assert_eq!(plan(&once, &modules).expect("plan again"), once);
    }

    #[test]
    fn always_and_auto_undo_an_earlier_disable() {
        let current = ModuleFiles {
            load: "# keep me\nloop\nvfio\n".into(),
            disabled: "blacklist vfio\nblacklist loop\nblacklist other\n".into(),
            options: String::new(),
        };
        let planned = plan(
            &current,
            &[
                module("vfio", ModuleLoadMode::Always, &[]),
                module("loop", ModuleLoadMode::Auto, &[]),
            ],
        )
        .expect("plan");
        assert_eq!(planned.load, "# keep me\nvfio\n");
        assert_eq!(planned.disabled, "blacklist other\n");
    }

    #[test]
    fn options_replace_the_line_of_their_module_only() {
        let current = ModuleFiles {
            options: "options vfio a=1\noptions kvm x=1\noptions vfio b=2\n".into(),
            ..ModuleFiles::default()
        };
        let planned = plan(
            &current,
            &[module("vfio", ModuleLoadMode::Inherit, &[("c", "3")])],
        )
        .expect("plan");
        assert_eq!(planned.options, "options vfio c=3\noptions kvm x=1\n");
        assert_eq!(planned.load, "");
        assert_eq!(planned.disabled, "");
    }

    #[test]
    fn dashes_and_underscores_name_the_same_module() {
        let current = ModuleFiles {
            disabled: "blacklist br-netfilter\n".into(),
            ..ModuleFiles::default()
        };
        let planned = plan(
            &current,
            &[module("br_netfilter", ModuleLoadMode::Always, &[])],
        )
        .expect("plan");
        assert_eq!(planned.disabled, "");
        assert_eq!(planned.load, "br_netfilter\n");
    }

    #[test]
    fn invalid_requests_are_errors() {
        let none = ModuleFiles::default();
        let cases = [
            (
                vec![module("vfio", ModuleLoadMode::Disable, &[("a", "1")])],
                ModulesError::OptionsForDisabled {
                    module: "vfio".into(),
                },
            ),
            (
                vec![
                    module("vfio", ModuleLoadMode::Disable, &[]),
                    module("vfio", ModuleLoadMode::Inherit, &[("a", "1")]),
                ],
                ModulesError::OptionsForInheritedDisabled {
                    module: "vfio".into(),
                },
            ),
            (
                vec![module("a b", ModuleLoadMode::Always, &[])],
                ModulesError::BadName { name: "a b".into() },
            ),
            (
                vec![module("vfio", ModuleLoadMode::Auto, &[("k=v", "1")])],
                ModulesError::BadOptionKey {
                    module: "vfio".into(),
                    key: "k=v".into(),
                },
            ),
            (
                vec![module("vfio", ModuleLoadMode::Auto, &[("k", "1\n")])],
                ModulesError::BadOptionValue {
                    module: "vfio".into(),
                    key: "k".into(),
                },
            ),
        ];
        for (modules, expected) in cases {
            assert_eq!(plan(&none, &modules), Err(expected));
        }
    }

    #[test]
    fn apply_writes_and_removes_files_in_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        apply(root, &[module("vfio", ModuleLoadMode::Disable, &[])]).expect("disable");
        let disabled = root.join("etc/modprobe.d/modules-disabled-vmic.conf");
        assert_eq!(
            std::fs::read_to_string(&disabled).expect("read"),
            "blacklist vfio\n"
        );
        apply(root, &[module("vfio", ModuleLoadMode::Always, &[])]).expect("always");
        assert!(!disabled.exists());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/modules-load.d/modules-load-vmic.conf"))
                .expect("read"),
            "vfio\n"
        );
        assert!(!root
            .join("etc/modprobe.d/module-options-vmic.conf")
            .exists());
    }
}
