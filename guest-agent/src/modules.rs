//! Kernel modules for the builder VM's own kernel: the boot list (`/etc/vmic/modules.boot`,
//! names or `.ko` paths) loaded in order with their dependencies from `modules.dep` (or a walk
//! of the tree), through `finit_module` so that compressed modules need no userspace tool.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `finit_module` flag: the kernel decompresses the file itself (`.ko.xz`, `.ko.zst`).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// What loading a module list did.
pub struct Loaded {
    pub count: usize,
    /// One line per entry that failed, with its cause chain.
    pub failures: Vec<String>,
}

/// Load every entry of the list file `order` from the modules tree `root`; an error only when
/// the list cannot be read.
pub fn load_listed(order: &Path, root: PathBuf) -> io::Result<Loaded> {
    let list = fs::read_to_string(order)?;
    let mut loader = ModuleLoader::new(root);
    let mut failures = Vec::new();
    for entry in module_entries(&list) {
        if let Err(error) = loader.load(entry) {
            let chain: Vec<String> =
                std::iter::successors(Some(&error as &dyn std::error::Error), |error| {
                    error.source()
                })
                .map(ToString::to_string)
                .collect();
            failures.push(format!("cannot load module {entry}: {}", chain.join(": ")));
        }
    }
    Ok(Loaded {
        count: loader.loaded.len(),
        failures,
    })
}

#[derive(Debug, thiserror::Error)]
enum ModuleError {
    #[error("module {name} not found under {root} and not built in")]
    NotFound { name: String, root: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("finit_module({path}) failed")]
    Load {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Entries of a modules.order file: trimmed, without blank lines and `#` comments.
fn module_entries(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

fn is_module_file(entry: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|suffix| entry.ends_with(suffix))
}

/// Module name as the kernel sees it: file stem without `.ko*`, `-` folded to `_`.
fn module_name(entry: &str) -> String {
    let file = entry.rsplit('/').next().unwrap_or(entry);
    let stem = file.find(".ko").map_or(file, |end| &file[..end]);
    stem.replace('-', "_")
}

struct ModuleInfo {
    /// Relative to the modules root.
    path: PathBuf,
    /// From modules.dep, in its order (load last first).
    dependencies: Vec<PathBuf>,
}

struct ModuleLoader {
    root: PathBuf,
    index: Option<HashMap<String, ModuleInfo>>,
    loaded: HashSet<PathBuf>,
}

impl ModuleLoader {
    fn new(root: PathBuf) -> ModuleLoader {
        ModuleLoader {
            root,
            index: None,
            loaded: HashSet::new(),
        }
    }

    /// Load one modules.order entry (a name or a `.ko` path) after its dependencies.
    fn load(&mut self, entry: &str) -> Result<(), ModuleError> {
        let name = module_name(entry);
        let known = self
            .index()
            .get(&name)
            .map(|info| (info.path.clone(), info.dependencies.clone()));
        let (path, dependencies) = if is_module_file(entry) && self.root.join(entry).exists() {
            let dependencies = known
                .map(|(_, dependencies)| dependencies)
                .unwrap_or_default();
            (PathBuf::from(entry), dependencies)
        } else if let Some(known) = known {
            known
        } else if self.is_builtin(&name) {
            return Ok(());
        } else if is_module_file(entry) {
            // Not there and not built in: let the open report the path.
            (PathBuf::from(entry), Vec::new())
        } else {
            return Err(ModuleError::NotFound {
                name,
                root: self.root.clone(),
            });
        };
        for dependency in dependencies.iter().rev() {
            self.load_file(dependency)?;
        }
        self.load_file(&path)
    }

    fn load_file(&mut self, relative: &Path) -> Result<(), ModuleError> {
        let path = self.root.join(relative);
        if self.loaded.contains(&path) {
            return Ok(());
        }
        let file = File::open(&path).map_err(|source| ModuleError::Open {
            path: path.clone(),
            source,
        })?;
        let flags = if relative.to_string_lossy().ends_with(".ko") {
            0
        } else {
            MODULE_INIT_COMPRESSED_FILE
        };
        // SAFETY: `file` is an open module file and the parameter string is a valid empty C string.
        let result = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                flags,
            )
        };
        if result != 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::EEXIST) {
                return Err(ModuleError::Load { path, source });
            }
        }
        self.loaded.insert(path);
        Ok(())
    }

    /// Built into the kernel (another architecture's kernel may build in what ours loads).
    fn is_builtin(&self, name: &str) -> bool {
        let builtin = fs::read_to_string(self.root.join("modules.builtin")).unwrap_or_default();
        builtin.lines().any(|line| module_name(line.trim()) == name)
            || Path::new("/sys/module").join(name).exists()
    }

    /// Name → file, from modules.dep if the image has one, else by walking the tree.
    fn index(&mut self) -> &HashMap<String, ModuleInfo> {
        let root = &self.root;
        self.index
            .get_or_insert_with(|| match fs::read_to_string(root.join("modules.dep")) {
                Ok(dep) => parse_modules_dep(&dep),
                Err(_) => {
                    let mut index = HashMap::new();
                    walk_modules(root, Path::new(""), &mut index);
                    index
                }
            })
    }
}

fn parse_modules_dep(dep: &str) -> HashMap<String, ModuleInfo> {
    dep.lines()
        .filter_map(|line| {
            let (module, dependencies) = line.split_once(':')?;
            let info = ModuleInfo {
                path: PathBuf::from(module.trim()),
                dependencies: dependencies.split_whitespace().map(PathBuf::from).collect(),
            };
            Some((module_name(module.trim()), info))
        })
        .collect()
}

fn walk_modules(root: &Path, relative: &Path, index: &mut HashMap<String, ModuleInfo>) {
    let Ok(entries) = fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        let relative = relative.join(entry.file_name());
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk_modules(root, &relative, index);
        } else if is_module_file(&entry.file_name().to_string_lossy()) {
            let name = module_name(&relative.to_string_lossy());
            index.entry(name).or_insert(ModuleInfo {
                path: relative,
                dependencies: Vec::new(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_entries_and_names() {
        let list = "# comment\nvirtio_ring\n\n  kernel/drivers/block/virtio_blk.ko \ndm-mod\n";
        let entries: Vec<&str> = module_entries(list).collect();
        assert_eq!(
            entries,
            [
                "virtio_ring",
                "kernel/drivers/block/virtio_blk.ko",
                "dm-mod"
            ]
        );
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("dm-mod"), "dm_mod");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert!(is_module_file("a/b.ko") && is_module_file("b.ko.zst") && !is_module_file("vfat"));
    }

    #[test]
    fn modules_are_indexed_from_modules_dep_or_the_tree() {
        let dep = "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\nkernel/md/dm-mod.ko:\n";
        let index = parse_modules_dep(dep);
        assert_eq!(index["ext4"].path, Path::new("kernel/fs/ext4/ext4.ko"));
        assert_eq!(index["ext4"].dependencies.len(), 2);
        assert!(index["dm_mod"].dependencies.is_empty());

        let root = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(root.path().join("kernel/drivers/block")).expect("dirs");
        fs::write(root.path().join("kernel/drivers/block/virtio_blk.ko"), b"").expect("ko");
        fs::write(root.path().join("modules.order"), b"").expect("other file");
        let mut index = HashMap::new();
        walk_modules(root.path(), Path::new(""), &mut index);
        assert_eq!(index.len(), 1);
        assert_eq!(
            index["virtio_blk"].path,
            Path::new("kernel/drivers/block/virtio_blk.ko")
        );

        fs::write(
            root.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .expect("builtin");
        let loader = ModuleLoader::new(root.path().to_owned());
        assert!(loader.is_builtin("virtio"));
        assert!(!loader.is_builtin("vmic_no_such_module"));
    }
}
