//! Locating the builder VM's guest image (kernel + initramfs) built by `scripts/build-guest-image`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::cli::Arch;

pub mod export;

/// vmic's cache directory: `$VMIC_CACHE_DIR`, else `$XDG_CACHE_HOME/vmic`, else `~/.cache/vmic`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMIC_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("vmic");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("vmic")
}

/// A built guest image for one architecture.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub arch: Arch,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub manifest: Manifest,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub kernel_version: String,
    #[serde(default)]
    pub agent_sha256: String,
}

/// Where the guest images live: `$VMIC_GUEST_IMAGE_DIR`, else `<cache>/guest`.
pub fn root() -> PathBuf {
    match std::env::var_os("VMIC_GUEST_IMAGE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("guest"),
    }
}

/// The current guest image for `arch` (`<root>/<arch>` links to the newest build).
pub fn find(arch: Arch) -> anyhow::Result<GuestImage> {
    let dir = root().join(arch.name());
    let missing = || {
        crate::report::hinted(
            format!("no builder VM image for {arch} at {}", dir.display()),
            format!("build it with `scripts/build-guest-image --arch {arch}` (or `scripts/setup`)"),
        )
    };
    if !dir.join("manifest.json").is_file() {
        return Err(missing());
    }
    load(arch, &dir)
}

fn load(arch: Arch, dir: &Path) -> anyhow::Result<GuestImage> {
    let manifest_path = dir.join("manifest.json");
    let manifest: Manifest = serde_json::from_str(&fs_err::read_to_string(&manifest_path)?)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let image = GuestImage {
        arch,
        dir: dir.to_path_buf(),
        kernel: dir.join("kernel"),
        initramfs: dir.join("initramfs"),
        manifest,
    };
    for file in [&image.kernel, &image.initramfs] {
        if !file.is_file() {
            anyhow::bail!(
                "guest image {} is incomplete: {} is missing",
                dir.display(),
                file.display()
            );
        }
    }
    Ok(image)
}
