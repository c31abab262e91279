//! `vmic guest-image export|import`: builder VM images (kernel, initramfs, manifest) moved
//! between machines as one OCI image layout in a tar (`oci-layout`, `index.json`,
//! `blobs/sha256/…`), so a machine that cannot build them (macOS: no apt) can still use them.
//!
//! Each architecture is one OCI artifact manifest: the guest image's `manifest.json` is its
//! config blob, the kernel, initramfs and kernel config are its layers (titled with their file
//! names). The tarball is untrusted on import: only those paths are read, every blob is hashed
//! while it is copied and must match its name and every descriptor that points at it, sizes are
//! capped, and nothing is installed unless every image in the tarball checks out.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::{Arch, GuestImageCommand, GuestImageExportArgs, GuestImageImportArgs};
use crate::report::Failure;

const LAYOUT_VERSION: &str = "1.0.0";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const ARTIFACT_TYPE: &str = "application/vnd.vmic.guest-image.v1";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.vmic.guest-image.manifest.v1+json";
const FILE_MEDIA_TYPE: &str = "application/octet-stream";
const TITLE: &str = "org.opencontainers.image.title";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The files of a guest image directory that travel, and whether each must be there.
const FILES: [(&str, bool); 3] = [
    ("kernel", true),
    ("initramfs", true),
    ("kernel.config", false),
];
/// JSON documents (oci-layout, index, manifests, the guest manifest) are small.
const MAX_JSON_BYTES: u64 = 1 << 20;
/// A guest initramfs is ~100-200 MiB uncompressed; anything far beyond is not one of ours.
const MAX_BLOB_BYTES: u64 = 2 << 30;

/// Why an import tarball was refused. Nothing is installed when any of these happens.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("unexpected entry {path:?} (only oci-layout, index.json and blobs/sha256/<digest>)")]
    UnexpectedEntry { path: String },
    #[error("entry {path:?} is not a regular file or directory")]
    NotAFile { path: String },
    #[error("entry {path:?} appears twice")]
    Duplicate { path: String },
    #[error("entry {path:?} is {size} bytes, more than the {limit} allowed")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("blob {name} does not match its digest (its content hashes to {actual})")]
    DigestMismatch { name: String, actual: String },
    #[error("{what} is missing")]
    Missing { what: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayout {
    image_layout_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: String,
    artifact_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The fields of the guest image's own `manifest.json` that import relies on.
#[derive(Debug, Deserialize)]
struct GuestManifest {
    id: String,
    arch: String,
    kernel_version: String,
}

pub fn run(command: GuestImageCommand) -> Result<(), Failure> {
    match command {
        GuestImageCommand::Export(GuestImageExportArgs { arch, file }) => {
            let written = export(&super::root(), &arch, &file).map_err(Failure::Build)?;
            for id in written {
                eprintln!("exported {id} to {}", file.display());
            }
            Ok(())
        }
        GuestImageCommand::Import(GuestImageImportArgs { file }) => {
            let root = super::root();
            let installed = import(&file, &root)
                .with_context(|| format!("importing guest images from {}", file.display()))
                .map_err(Failure::Build)?;
            for id in installed {
                eprintln!("installed {id} in {}", root.display());
            }
            Ok(())
        }
    }
}

// ------------------------------------------------------------------------------------------
// Export

/// Write the current image of each of `arches` (all that exist when empty) under `root` to
/// `file`, atomically. Returns the image ids written.
pub fn export(root: &Path, arches: &[Arch], file: &Path) -> anyhow::Result<Vec<String>> {
    let explicit = !arches.is_empty();
    let arches = if explicit {
        arches.to_vec()
    } else {
        vec![Arch::X86_64, Arch::Aarch64]
    };
    let mut images = Vec::new();
    for arch in arches {
        let dir = root.join(arch.name());
        if !dir.join("manifest.json").is_file() {
            if explicit {
                return Err(crate::report::hinted(
                    format!("no builder VM image for {arch} at {}", dir.display()),
                    format!("build it with `scripts/build-guest-image --arch {arch}`"),
                ));
            }
            continue;
        }
        images.push((arch, dir));
    }
    if images.is_empty() {
        return Err(crate::report::hinted(
            format!("no builder VM image under {}", root.display()),
            "build them with `scripts/build-guest-image --arch all`",
        ));
    }

    let parent = crate::rundir::parent_dir(file).to_path_buf();
    let staging = tempfile::Builder::new()
        .prefix(".vmic-export-")
        .tempfile_in(&parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(staging.as_file()));
    let mut blobs_written = BTreeSet::new();
    let mut index = Index {
        schema_version: 2,
        media_type: Some(INDEX_MEDIA_TYPE.to_string()),
        manifests: Vec::new(),
    };
    let mut ids = Vec::new();
    for (arch, dir) in images {
        let manifest_bytes = fs_err::read(dir.join("manifest.json"))?;
        let guest: GuestManifest = serde_json::from_slice(&manifest_bytes)
            .with_context(|| format!("reading {}", dir.join("manifest.json").display()))?;
        let config = add_bytes_blob(
            &mut tar,
            &mut blobs_written,
            &manifest_bytes,
            CONFIG_MEDIA_TYPE,
        )?;
        let mut layers = Vec::new();
        for (name, required) in FILES {
            let path = dir.join(name);
            if !path.is_file() {
                if required {
                    anyhow::bail!(
                        "guest image {} is incomplete: {name} is missing",
                        dir.display()
                    );
                }
                continue;
            }
            let mut layer = add_file_blob(&mut tar, &mut blobs_written, &path)?;
            layer
                .annotations
                .insert(TITLE.to_string(), name.to_string());
            layers.push(layer);
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.to_string(),
            artifact_type: ARTIFACT_TYPE.to_string(),
            config,
            layers,
        };
        let manifest_json = serde_json::to_vec_pretty(&manifest).expect("plain data serializes");
        let mut descriptor = add_bytes_blob(
            &mut tar,
            &mut blobs_written,
            &manifest_json,
            MANIFEST_MEDIA_TYPE,
        )?;
        descriptor.platform = Some(Platform {
            architecture: arch.debian().to_string(),
            os: "linux".to_string(),
        });
        descriptor
            .annotations
            .insert(REF_NAME.to_string(), guest.id.clone());
        index.manifests.push(descriptor);
        ids.push(guest.id);
    }
    let layout = OciLayout {
        image_layout_version: LAYOUT_VERSION.to_string(),
    };
    append_bytes(
        &mut tar,
        "oci-layout",
        &serde_json::to_vec(&layout).expect("plain data"),
    )?;
    append_bytes(
        &mut tar,
        "index.json",
        &serde_json::to_vec_pretty(&index).expect("plain data"),
    )?;
    let mut writer = tar.into_inner().context("finishing the tarball")?;
    writer.flush().context("writing the tarball")?;
    drop(writer);
    staging
        .as_file()
        .sync_all()
        .context("syncing the tarball")?;
    staging
        .persist(file)
        .with_context(|| format!("renaming the tarball to {}", file.display()))?;
    Ok(ids)
}

fn header(size: u64) -> tar::Header {
    // Fixed owner, mode and time: the same images give the same tarball.
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let mut header = header(bytes.len() as u64);
    tar.append_data(&mut header, path, bytes)
        .with_context(|| format!("writing {path} into the tarball"))
}

fn add_bytes_blob<W: Write>(
    tar: &mut tar::Builder<W>,
    written: &mut BTreeSet<String>,
    bytes: &[u8],
    media_type: &str,
) -> anyhow::Result<Descriptor> {
    let hex = hex::encode(Sha256::digest(bytes));
    if written.insert(hex.clone()) {
        append_bytes(tar, &format!("blobs/sha256/{hex}"), bytes)?;
    }
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

fn add_file_blob<W: Write>(
    tar: &mut tar::Builder<W>,
    written: &mut BTreeSet<String>,
    path: &Path,
) -> anyhow::Result<Descriptor> {
    // Hash first (the entry's name is its digest), then stream the same file into the tar.
    let (hex, size) = hash_reader(fs_err::File::open(path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    if written.insert(hex.clone()) {
        let mut header = header(size);
        let file = fs_err::File::open(path)?;
        tar.append_data(&mut header, format!("blobs/sha256/{hex}"), file.take(size))
            .with_context(|| format!("writing {} into the tarball", path.display()))?;
    }
    Ok(Descriptor {
        media_type: FILE_MEDIA_TYPE.to_string(),
        digest: format!("sha256:{hex}"),
        size,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

// ------------------------------------------------------------------------------------------
// Import

/// One verified image, ready to be installed from the staging directory.
struct Verified {
    arch: Arch,
    id: String,
    /// (file name in the image directory, blob hex digest)
    files: Vec<(String, String)>,
}

/// Verify `file` and install every image in it under `root` (`<root>/<id>/`, then `<root>/<arch>`
/// repointed to it). Returns the installed ids.
pub fn import(file: &Path, root: &Path) -> anyhow::Result<Vec<String>> {
    fs_err::create_dir_all(root)?;
    // Staging inside the root: installing is then a rename on the same file system.
    let staging = tempfile::Builder::new()
        .prefix(".vmic-import-")
        .tempdir_in(root)
        .with_context(|| format!("creating a staging directory in {}", root.display()))?;
    let blobs_dir = staging.path().join("blobs");
    fs_err::create_dir(&blobs_dir)?;
    let reader = std::io::BufReader::new(fs_err::File::open(file)?);
    let contents = unpack(reader, &blobs_dir)?;
    let images = verify(&contents, &blobs_dir)?;
    let mut installed = Vec::new();
    for image in &images {
        install(image, &blobs_dir, root)?;
        installed.push(image.id.clone());
    }
    Ok(installed)
}

/// What `unpack` read: the two small documents and the blobs' sizes by hex digest.
struct Contents {
    layout: Vec<u8>,
    index: Vec<u8>,
    blobs: BTreeMap<String, u64>,
}

enum EntryKind {
    Directory,
    Layout,
    Index,
    Blob(String),
}

fn classify(path: &str) -> Option<EntryKind> {
    let path = path.strip_prefix("./").unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "" | "." | "blobs" | "blobs/sha256" => Some(EntryKind::Directory),
        "oci-layout" => Some(EntryKind::Layout),
        "index.json" => Some(EntryKind::Index),
        _ => {
            let hex = path.strip_prefix("blobs/sha256/")?;
            is_sha256_hex(hex).then(|| EntryKind::Blob(hex.to_string()))
        }
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Read the tarball's entries without ever writing a path it names: blobs are copied to
/// `blobs_dir/<hex>` while hashed, everything else unexpected is refused.
fn unpack(reader: impl Read, blobs_dir: &Path) -> anyhow::Result<Contents> {
    let mut archive = tar::Archive::new(reader);
    let mut layout = None;
    let mut index = None;
    let mut blobs = BTreeMap::new();
    for entry in archive.entries().context("reading the tarball")? {
        let mut entry = entry.context("reading the tarball")?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(kind) = classify(&path) else {
            return Err(ImportError::UnexpectedEntry { path }.into());
        };
        let entry_type = entry.header().entry_type();
        if let EntryKind::Directory = kind {
            if entry_type != tar::EntryType::Directory {
                return Err(ImportError::NotAFile { path }.into());
            }
            continue;
        }
        if entry_type != tar::EntryType::Regular {
            return Err(ImportError::NotAFile { path }.into());
        }
        let size = entry.header().size().context("reading a tar header")?;
        let limit = match kind {
            EntryKind::Blob(_) => MAX_BLOB_BYTES,
            _ => MAX_JSON_BYTES,
        };
        if size > limit {
            return Err(ImportError::TooLarge { path, size, limit }.into());
        }
        match kind {
            EntryKind::Directory => unreachable!("handled above"),
            EntryKind::Layout | EntryKind::Index => {
                let mut bytes = Vec::new();
                (&mut entry).take(limit).read_to_end(&mut bytes)?;
                let slot = if let EntryKind::Layout = kind {
                    &mut layout
                } else {
                    &mut index
                };
                if slot.replace(bytes).is_some() {
                    return Err(ImportError::Duplicate { path }.into());
                }
            }
            EntryKind::Blob(hex) => {
                if blobs.contains_key(&hex) {
                    return Err(ImportError::Duplicate { path }.into());
                }
                let target = blobs_dir.join(&hex);
                let mut out = std::io::BufWriter::new(fs_err::File::create(&target)?);
                let mut hasher = Sha256::new();
                let mut buffer = vec![0u8; 1 << 20];
                let mut limited = (&mut entry).take(limit);
                let mut copied = 0u64;
                loop {
                    let read = limited.read(&mut buffer).context("reading the tarball")?;
                    if read == 0 {
                        break;
                    }
                    hasher.update(&buffer[..read]);
                    out.write_all(&buffer[..read])?;
                    copied += read as u64;
                }
                out.flush()?;
                let actual = hex::encode(hasher.finalize());
                if actual != hex {
                    return Err(ImportError::DigestMismatch { name: path, actual }.into());
                }
                blobs.insert(hex, copied);
            }
        }
    }
    Ok(Contents {
        layout: layout.ok_or(ImportError::Missing {
            what: "oci-layout".into(),
        })?,
        index: index.ok_or(ImportError::Missing {
            what: "index.json".into(),
        })?,
        blobs,
    })
}

/// The blob a descriptor names, present with the size the descriptor says.
fn check_descriptor(
    what: &str,
    descriptor: &Descriptor,
    contents: &Contents,
) -> Result<String, ImportError> {
    let hex = descriptor
        .digest
        .strip_prefix("sha256:")
        .filter(|hex| is_sha256_hex(hex))
        .ok_or_else(|| {
            invalid(
                what,
                format!("digest {:?} is not sha256:<64 hex>", descriptor.digest),
            )
        })?;
    let size = contents
        .blobs
        .get(hex)
        .ok_or_else(|| ImportError::Missing {
            what: format!("{what}: blob {}", descriptor.digest),
        })?;
    if *size != descriptor.size {
        return Err(invalid(
            what,
            format!(
                "descriptor says {} bytes, the blob has {size}",
                descriptor.size
            ),
        ));
    }
    Ok(hex.to_string())
}

fn read_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImportError> {
    serde_json::from_slice(bytes).map_err(|error| invalid(what, error.to_string()))
}

fn read_blob(blobs_dir: &Path, hex: &str, size: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    if size > MAX_JSON_BYTES {
        return Err(ImportError::TooLarge {
            path: what.to_string(),
            size,
            limit: MAX_JSON_BYTES,
        }
        .into());
    }
    Ok(fs_err::read(blobs_dir.join(hex))?)
}

fn verify(contents: &Contents, blobs_dir: &Path) -> anyhow::Result<Vec<Verified>> {
    let layout: OciLayout = read_json("oci-layout", &contents.layout)?;
    if layout.image_layout_version != LAYOUT_VERSION {
        return Err(invalid(
            "oci-layout",
            format!(
                "imageLayoutVersion {:?}, expected {LAYOUT_VERSION:?}",
                layout.image_layout_version
            ),
        )
        .into());
    }
    let index: Index = read_json("index.json", &contents.index)?;
    if index.schema_version != 2 || index.manifests.is_empty() {
        return Err(invalid(
            "index.json",
            "needs schemaVersion 2 and at least one manifest",
        )
        .into());
    }
    let mut images = Vec::new();
    let mut seen_arches = Vec::new();
    for (position, descriptor) in index.manifests.iter().enumerate() {
        let what = format!("index.json manifests[{position}]");
        if descriptor.media_type != MANIFEST_MEDIA_TYPE {
            return Err(invalid(&what, format!("mediaType {:?}", descriptor.media_type)).into());
        }
        let hex = check_descriptor(&what, descriptor, contents)?;
        let manifest: Manifest =
            read_json(&what, &read_blob(blobs_dir, &hex, descriptor.size, &what)?)?;
        if manifest.artifact_type != ARTIFACT_TYPE
            || manifest.config.media_type != CONFIG_MEDIA_TYPE
        {
            return Err(invalid(
                &what,
                format!(
                    "not a vmic guest image (artifactType {:?})",
                    manifest.artifact_type
                ),
            )
            .into());
        }
        let config_what = format!("{what} config");
        let config_hex = check_descriptor(&config_what, &manifest.config, contents)?;
        let guest: GuestManifest = read_json(
            &config_what,
            &read_blob(blobs_dir, &config_hex, manifest.config.size, &config_what)?,
        )?;
        let arch = [Arch::X86_64, Arch::Aarch64]
            .into_iter()
            .find(|arch| arch.name() == guest.arch)
            .ok_or_else(|| invalid(&config_what, format!("unknown arch {:?}", guest.arch)))?;
        let platform = descriptor
            .platform
            .as_ref()
            .map(|p| p.architecture.as_str());
        if platform != Some(arch.debian()) {
            return Err(invalid(
                &what,
                format!("platform {platform:?} does not match the image's arch {arch}"),
            )
            .into());
        }
        // The id becomes a directory name: only `<arch>-<hex>` as build.py makes them.
        let id_ok = guest
            .id
            .strip_prefix(&format!("{}-", arch.name()))
            .is_some_and(|rest| {
                !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_hexdigit())
            });
        if !id_ok || guest.kernel_version.is_empty() {
            return Err(invalid(
                &config_what,
                format!(
                    "id {:?} is not <arch>-<hex> (or kernel_version is empty)",
                    guest.id
                ),
            )
            .into());
        }
        if seen_arches.contains(&arch) {
            return Err(invalid("index.json", format!("two images for {arch}")).into());
        }
        seen_arches.push(arch);
        let mut files = vec![("manifest.json".to_string(), config_hex)];
        for (position, layer) in manifest.layers.iter().enumerate() {
            let layer_what = format!("{what} layers[{position}]");
            let title = layer
                .annotations
                .get(TITLE)
                .map(String::as_str)
                .unwrap_or("");
            if !FILES.iter().any(|(name, _)| *name == title) {
                return Err(invalid(
                    &layer_what,
                    format!("title {title:?} is not one of kernel, initramfs, kernel.config"),
                )
                .into());
            }
            if files.iter().any(|(name, _)| name == title) {
                return Err(invalid(&layer_what, format!("{title} appears twice")).into());
            }
            files.push((
                title.to_string(),
                check_descriptor(&layer_what, layer, contents)?,
            ));
        }
        for (name, required) in FILES {
            if required && !files.iter().any(|(file, _)| file == name) {
                return Err(ImportError::Missing {
                    what: format!("{what}: layer {name}"),
                }
                .into());
            }
        }
        images.push(Verified {
            arch,
            id: guest.id,
            files,
        });
    }
    Ok(images)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    Ok(hash_reader(fs_err::File::open(path)?)?.0)
}

/// (sha256 hex, bytes read) of everything `reader` yields.
fn hash_reader(mut reader: impl Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok((hex::encode(hasher.finalize()), total));
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
}

fn install(image: &Verified, blobs_dir: &Path, root: &Path) -> anyhow::Result<()> {
    let dir = root.join(&image.id);
    if dir.exists() {
        // Same id means same inputs; accept it only if the bytes agree too.
        for (name, hex) in &image.files {
            if sha256_of(&dir.join(name)).ok().as_deref() != Some(hex.as_str()) {
                anyhow::bail!(
                    "{} already exists with a different {name}; remove it to import this one",
                    dir.display()
                );
            }
        }
    } else {
        let staging = blobs_dir.with_file_name(&image.id);
        fs_err::create_dir(&staging)?;
        for (name, hex) in &image.files {
            // Copy, not rename: two images may share a blob.
            fs_err::copy(blobs_dir.join(hex), staging.join(name))?;
        }
        fs_err::rename(&staging, &dir)?;
    }
    // Repoint `<root>/<arch>` atomically, as build.py does.
    let link = root.join(image.arch.name());
    let temporary = root.join(format!(".{}.import-link", image.arch.name()));
    let _ = fs_err::remove_file(&temporary);
    symlink(Path::new(&image.id), &temporary)?;
    fs_err::rename(&temporary, &link)
        .with_context(|| format!("pointing {} at {}", link.display(), image.id))?;
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fake_image(root: &Path, arch: Arch, id: &str) {
        let dir = root.join(id);
        fs_err::create_dir_all(&dir).unwrap();
        let manifest = serde_json::json!({
            "format_version": 1, "id": id, "arch": arch.name(), "kernel_version": "6.1.0-test",
            "agent_sha256": "ab".repeat(32),
        });
        fs_err::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        fs_err::write(dir.join("kernel"), format!("kernel of {id}").repeat(1000)).unwrap();
        fs_err::write(
            dir.join("initramfs"),
            format!("initramfs of {id}").repeat(5000),
        )
        .unwrap();
        fs_err::write(dir.join("kernel.config"), "CONFIG_SQUASHFS=y\n").unwrap();
        symlink(Path::new(id), &root.join(arch.name())).unwrap();
    }

    fn exported() -> (tempfile::TempDir, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("source");
        fake_image(&source, Arch::X86_64, "x86_64-0123456789abcdef");
        fake_image(&source, Arch::Aarch64, "aarch64-fedcba9876543210");
        let tarball = temp.path().join("guest.tar");
        let ids = export(&source, &[], &tarball).unwrap();
        assert_eq!(ids, ["x86_64-0123456789abcdef", "aarch64-fedcba9876543210"]);
        (temp, tarball)
    }

    /// Rewrite a tarball entry by entry through `edit` (None drops the entry).
    fn rewrite(tarball: &Path, edit: impl Fn(&str, Vec<u8>) -> Option<(String, Vec<u8>)>) {
        let mut entries = Vec::new();
        let mut archive = tar::Archive::new(fs_err::File::open(tarball).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            if let Some(edited) = edit(&path, bytes) {
                entries.push(edited);
            }
        }
        let mut builder = tar::Builder::new(fs_err::File::create(tarball).unwrap());
        for (path, bytes) in entries {
            append_bytes(&mut builder, &path, &bytes).unwrap();
        }
        builder.finish().unwrap();
    }

    fn import_error(tarball: &Path) -> (String, tempfile::TempDir) {
        let target = tempfile::tempdir().unwrap();
        let error = import(tarball, target.path()).unwrap_err();
        (format!("{error:#}"), target)
    }

    /// Nothing but the (emptied) staging directory's absence: no image, no link.
    fn assert_nothing_installed(root: &Path) {
        let left: Vec<_> = fs_err::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "a refused import left {left:?}");
    }

    #[test]
    fn round_trip_installs_identical_files_that_find_loads() {
        let (temp, tarball) = exported();
        let target = temp.path().join("target");
        let ids = import(&tarball, &target).unwrap();
        assert_eq!(ids.len(), 2);
        for (arch, id) in [
            (Arch::X86_64, "x86_64-0123456789abcdef"),
            (Arch::Aarch64, "aarch64-fedcba9876543210"),
        ] {
            for name in ["manifest.json", "kernel", "initramfs", "kernel.config"] {
                let original =
                    fs_err::read(temp.path().join("source").join(id).join(name)).unwrap();
                let copied = fs_err::read(target.join(arch.name()).join(name)).unwrap();
                assert_eq!(original, copied, "{id}/{name}");
            }
            assert_eq!(
                fs_err::read_link(target.join(arch.name())).unwrap(),
                Path::new(id)
            );
            let image = super::super::load(arch, &target.join(arch.name())).unwrap();
            assert_eq!(image.manifest.kernel_version, "6.1.0-test");
        }
        // Importing the same tarball again is a no-op that succeeds.
        import(&tarball, &target).unwrap();
        // The layout is what OCI tools expect.
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(fs_err::File::open(&tarball).unwrap());
        for entry in archive.entries().unwrap() {
            names.push(
                entry
                    .unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        assert!(
            names.contains(&"oci-layout".to_string()) && names.contains(&"index.json".to_string())
        );
        // 2 x (manifest, config, kernel, initramfs) + the kernel.config both images share.
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/"))
                .count(),
            9
        );
    }

    #[test]
    fn export_is_deterministic() {
        let (temp, tarball) = exported();
        let again = temp.path().join("again.tar");
        export(&temp.path().join("source"), &[], &again).unwrap();
        assert_eq!(
            fs_err::read(&tarball).unwrap(),
            fs_err::read(&again).unwrap()
        );
    }

    #[test]
    fn tampered_blob_is_refused_and_nothing_installed() {
        let (_temp, tarball) = exported();
        let initramfs_hex = hex::encode(Sha256::digest(
            "initramfs of x86_64-0123456789abcdef"
                .repeat(5000)
                .as_bytes(),
        ));
        rewrite(&tarball, |path, mut bytes| {
            if path.ends_with(&initramfs_hex) {
                bytes[100] ^= 1;
            }
            Some((path.to_string(), bytes))
        });
        let (error, target) = import_error(&tarball);
        assert!(error.contains("does not match its digest"), "{error}");
        assert!(error.contains(&initramfs_hex), "{error}");
        assert_nothing_installed(target.path());
    }

    #[test]
    fn consistent_but_substituted_blob_is_refused() {
        // An attacker renames a swapped kernel to its own digest: the manifest no longer finds it.
        let (_temp, tarball) = exported();
        let kernel_hex = hex::encode(Sha256::digest(
            "kernel of x86_64-0123456789abcdef".repeat(1000).as_bytes(),
        ));
        rewrite(&tarball, |path, bytes| {
            if path.ends_with(&kernel_hex) {
                let evil = b"evil kernel".to_vec();
                return Some((
                    format!("blobs/sha256/{}", hex::encode(Sha256::digest(&evil))),
                    evil,
                ));
            }
            Some((path.to_string(), bytes))
        });
        let (error, target) = import_error(&tarball);
        assert!(
            error.contains(&format!("blob sha256:{kernel_hex} is missing")),
            "{error}"
        );
        assert_nothing_installed(target.path());
    }

    #[test]
    fn hostile_entries_are_refused() {
        let cases: [(&str, &str); 4] = [
            ("../escape", "unexpected entry \"../escape\""),
            ("blobs/sha256/../../../etc/passwd", "unexpected entry"),
            ("blobs/sha256/ABC", "unexpected entry"),
            ("index.json", "appears twice"),
        ];
        for (path, expected) in cases {
            let (_temp, tarball) = exported();
            rewrite(&tarball, |existing, bytes| {
                Some((existing.to_string(), bytes))
            });
            let mut file = fs_err::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tarball)
                .unwrap();
            // Drop the two zero end blocks and append the hostile entry before new ones.
            let length = file.metadata().unwrap().len();
            let mut content = Vec::new();
            file.read_to_end(&mut content).unwrap();
            let end = content
                .chunks(512)
                .rposition(|block| block.iter().any(|b| *b != 0))
                .unwrap();
            let keep = ((end + 1) * 512) as u64;
            assert!(keep < length);
            file.set_len(keep).unwrap();
            drop(file);
            let file = fs_err::OpenOptions::new()
                .append(true)
                .open(&tarball)
                .unwrap();
            let mut builder = tar::Builder::new(file);
            let mut header = header(2);
            // set_path refuses `..`; write the raw name as a hostile tarball would.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, &b"{}"[..]).unwrap();
            builder.finish().unwrap();
            let (error, target) = import_error(&tarball);
            assert!(error.contains(expected), "{path}: {error}");
            assert_nothing_installed(target.path());
        }
    }

    #[test]
    fn symlink_entry_is_refused() {
        let (_temp, tarball) = exported();
        rewrite(&tarball, |path, bytes| Some((path.to_string(), bytes)));
        let mut content = fs_err::read(&tarball).unwrap();
        // Turn the first entry (a blob) into a symlink by its type flag.
        content[156] = b'2';
        let mut header = tar::Header::from_byte_slice(&content[..512]).clone();
        header.set_cksum();
        content[..512].copy_from_slice(header.as_bytes());
        fs_err::write(&tarball, content).unwrap();
        let (error, target) = import_error(&tarball);
        assert!(error.contains("is not a regular file"), "{error}");
        assert_nothing_installed(target.path());
    }

    #[test]
    fn wrong_platform_is_refused() {
        let (_temp, tarball) = exported();
        rewrite(&tarball, |path, bytes| {
            if path == "index.json" {
                let text = String::from_utf8(bytes)
                    .unwrap()
                    .replace("\"arm64\"", "\"amd64\"");
                return Some((path.to_string(), text.into_bytes()));
            }
            Some((path.to_string(), bytes))
        });
        let (error, target) = import_error(&tarball);
        assert!(
            error.contains("does not match the image's arch aarch64"),
            "{error}"
        );
        assert_nothing_installed(target.path());
    }
}
