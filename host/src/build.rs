//! Executing a customize build: disks, builder VM, uploads, the agent's pipeline, and the
//! atomic hand-over of the output.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmic_protocol::{Event, Request, Response, Stream};

use crate::cli::{Arch, OutputFormat};
use crate::image::ImageFormat;
use crate::qemu::Disk;
use crate::report::{Reporter, Source};
use crate::settings::CustomizeSettings;
use crate::vm::{RunningVm, VmOptions};

pub const INPUT_SERIAL: &str = "vmic-input";
pub const OUTPUT_SERIAL: &str = "vmic-output";
pub const SCRATCH_SERIAL: &str = "vmic-scratch";
const GIB: u64 = 1 << 30;

/// A sparse file of `size` bytes: costs no disk until written.
fn sparse_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let file = fs_err::File::create(path)?;
    file.set_len(size)?;
    Ok(())
}

pub use crate::rundir::partial_path;

/// Removes the listed files unless disarmed: the failure path of the build.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a finished build reports.
#[derive(Debug)]
pub struct BuildSummary {
    pub output: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Run the build the settings ask for: a LiveOS ISO or a customized disk image.
pub async fn build(
    settings: &CustomizeSettings,
    arch: Arch,
    locked_dir: &crate::rundir::BuildDir,
    reporter: &Reporter,
) -> anyhow::Result<BuildSummary> {
    reporter.step("Preparing", "disks in the build directory");
    let build_dir = locked_dir.root().to_path_buf();
    // This run's files live in its private directory (removed with it, or by the next run
    // after a SIGKILL), so a planted name in the build directory is never followed.
    let run_dir = locked_dir.run_dir().to_path_buf();
    let input = fs_err::canonicalize(&settings.input)?;
    let input_size = crate::image::virtual_size(&input, settings.input_format)?;
    // Locked while we write it: a stale one from a killed run is replaced, a live one refused.
    let partial_output = crate::rundir::PartialOutput::create(&settings.output)?;
    for left in locked_dir.leftovers().iter().chain(
        partial_output
            .replaced_stale()
            .then(|| partial_output.path().to_path_buf())
            .as_ref(),
    ) {
        reporter.note(
            Source::Vmic,
            format_args!("removed {} left by a vmic run that ended", left.display()),
        );
    }
    let output_partial = partial_output.path().to_path_buf();
    let output_dir = crate::rundir::parent_dir(&settings.output).to_path_buf();
    let live_output = settings.output_format.is_live();
    // The ISO disk, and so the largest ISO the host accepts from the guest (crate::accept);
    // PXE artifacts hold the ISO and the boot files beside it.
    let output_disk_size = match settings.output_format.is_pxe() {
        true => input_size + 2 * GIB,
        false => input_size + GIB,
    };
    crate::space::check_space(&input, &build_dir, &output_dir, live_output)?;
    let overlay = run_dir.join("input-overlay.qcow2");
    let scratch = run_dir.join("scratch.raw");
    // Removed however the build ends (the partial output by its own guard).
    let _scratch_files = Cleanup(vec![overlay.clone(), scratch.clone()]);
    let mut partial_guard = Cleanup(Vec::new());

    let input_backing = crate::qemu::Backing {
        path: input.clone(),
        format: settings.input_format.qemu_name().into(),
    };
    let mut options = VmOptions::from_args(arch, &settings.vm);
    options.run_dir = Some(run_dir.clone());
    // Planned before the VM starts: files the config names are read (and fail) now, and the
    // plan says whether the VM needs a network.
    let mut planned = plan(settings, &build_dir, &input, options.cpus, reporter)?;
    // Hashed once: the build cache's key and the provenance record both need it.
    // Off the async runtime: a large image takes seconds, and Ctrl-C must not wait for it.
    let input_sha256 = {
        let input = input.clone();
        off_runtime(move || crate::provenance::sha256_hex(&input)).await?
    };
    let cache = use_cache(settings, arch, &input_sha256, &mut planned, reporter).await?;
    let input_disk = if let CacheUse::Hit(cached) = &cache {
        // The cached ISO is re-mastered: attached read-only like an ISO input.
        Disk {
            path: cached.clone(),
            format: "raw".into(),
            serial: INPUT_SERIAL.into(),
            read_only: true,
            backing: None,
        }
    } else if settings.input_format == ImageFormat::Iso {
        // An ISO is never written by the pipeline: attach it read-only as it is.
        Disk {
            path: input.clone(),
            format: "raw".into(),
            serial: INPUT_SERIAL.into(),
            read_only: true,
            backing: None,
        }
    } else {
        crate::image::create_overlay(&input, settings.input_format, &overlay, input_size)?;
        Disk {
            path: overlay.clone(),
            format: "qcow2".into(),
            serial: INPUT_SERIAL.into(),
            read_only: false,
            backing: Some(input_backing.clone()),
        }
    };
    // Sparse, so generous sizes cost nothing: the ISO is at most the rootfs plus boot files;
    // packages and ISO work files land on the scratch disk.
    sparse_file(&scratch, 2 * input_size + 2 * GIB)?;
    let mut disks = vec![input_disk];
    if live_output {
        sparse_file(&output_partial, output_disk_size)?;
        disks.push(Disk {
            path: output_partial.clone(),
            format: "raw".into(),
            serial: OUTPUT_SERIAL.into(),
            read_only: false,
            backing: None,
        });
    }
    disks.push(Disk {
        path: scratch.clone(),
        format: "raw".into(),
        serial: SCRATCH_SERIAL.into(),
        read_only: false,
        backing: None,
    });
    options.disks = disks;
    options.network = planned.os().packages.network;
    options.allow_private_network = settings.allow_private_network;
    if options.network {
        reporter.note(
            Source::Vmic,
            format_args!(
                "the builder VM reaches the image's package repositories through vmic's proxy (public addresses{})",
                if options.allow_private_network { " and private networks" } else { " only" }
            ),
        );
    }
    reporter.step("Booting", &format!("{arch} builder VM"));
    options.reporter = reporter.clone();
    let vm = RunningVm::start(options).await?;
    let result = drive_build(&vm, planned, reporter).await;
    let outcome = match result {
        Ok(outcome) => {
            vm.shutdown().await?;
            outcome
        }
        Err(error) => {
            let tail = crate::console::log_tail(&vm.console_log, 30);
            drop(vm);
            tracing::debug!("builder VM console:\n{tail}");
            return Err(error);
        }
    };

    // PXE outputs: the artifacts staged beside the output, moved into place at the end.
    let mut staged_pxe: Option<StagedPxe> = None;
    let (size, digest, packages, epoch) = match outcome {
        Response::Iso(outcome) if settings.output_format.is_pxe() => {
            reporter.step("Finishing", "checking the PXE artifacts");
            let mut staged = StagedPxe::new(&settings.output, settings.output_format)?;
            let (path, target, format) = (
                output_partial.clone(),
                staged.path.clone(),
                settings.output_format,
            );
            let name = settings
                .output
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let claimed = (outcome.size, outcome.sha256);
            let (digest, manifest) = off_runtime(move || {
                crate::accept::accept_pxe_stream(&path, output_disk_size, claimed.0, &claimed.1)?;
                let artifacts = crate::pxe::read_artifacts(fs_err::File::open(&path)?, claimed.0)?;
                match format {
                    OutputFormat::PxeDir => {
                        let manifest = crate::pxe::write_dir(&path, &artifacts, &target, &name)?;
                        Ok((vmic_protocol::sha256(manifest.as_bytes()), Some(manifest)))
                    }
                    _ => {
                        crate::pxe::write_tar_gz(&path, &artifacts, &target)?;
                        Ok((crate::provenance::sha256_file(&target)?, None))
                    }
                }
            })
            .await?;
            let size = match &manifest {
                Some(_) => outcome.size,
                None => fs_err::metadata(&staged.path)?.len(),
            };
            staged.manifest = manifest;
            staged_pxe = Some(staged);
            (
                size,
                digest,
                outcome.packages,
                Some(outcome.source_date_epoch),
            )
        }
        Response::Iso(outcome) => {
            reporter.step("Finishing", "verifying the ISO");
            // Reading the whole ISO three times: off the async runtime, so that Ctrl-C and
            // the timeout are not held up behind it.
            let path = output_partial.clone();
            let claimed = (outcome.size, outcome.sha256);
            let digest = off_runtime(move || {
                crate::accept::accept_iso(&path, output_disk_size, claimed.0, &claimed.1)?;
                crate::provenance::implant_iso_md5(&path)?;
                // The implanted MD5 changes the file: hash what is finally written.
                crate::provenance::sha256_file(&path)
            })
            .await?;
            if let CacheUse::Store(cache, parts) = &cache {
                // Copying the ISO into the cache is blocking work, like the hashing above.
                let (cache, parts, iso) = (cache.clone(), parts.clone(), output_partial.clone());
                let key = parts.key();
                let sha256 = hex::encode(digest);
                // A cache that cannot take the entry costs the next build time, not this one.
                match off_runtime(move || cache.store(&parts, &iso, &sha256)).await {
                    Ok(crate::cache::Stored::TooLarge { size, max_bytes }) => reporter.note(
                        Source::Vmic,
                        format_args!(
                            "build cache: the ISO ({} MiB) is larger than the cache ({} MiB); not stored",
                            size >> 20,
                            max_bytes >> 20
                        ),
                    ),
                    Ok(crate::cache::Stored::Entry { evicted }) => {
                        reporter.note(Source::Vmic, format_args!("build cache: stored {key}"));
                        for (key, size) in evicted {
                            reporter.note(
                                Source::Vmic,
                                format_args!("build cache: evicted {key} ({} MiB)", size >> 20),
                            );
                        }
                    }
                    Err(error) => reporter.warn(
                        Source::Vmic,
                        format_args!("build cache: not stored: {error:#}"),
                    ),
                }
            }
            (
                outcome.size,
                digest,
                outcome.packages,
                Some(outcome.source_date_epoch),
            )
        }
        Response::Disk(outcome) => {
            reporter.step(
                "Converting",
                &format!("customized disk to {}", settings.output_format.name()),
            );
            convert_overlay(
                &overlay,
                &input_backing,
                &output_partial,
                settings.output_format,
            )
            .await?;
            let size = fs_err::metadata(&output_partial)?.len();
            let path = output_partial.clone();
            let digest = off_runtime(move || crate::provenance::sha256_file(&path)).await?;
            (size, digest, outcome.packages, None)
        }
        other => bail!("unexpected answer to the build request: {other:?}"),
    };
    reporter.step("Recording", "sha256, SBOM and provenance beside the output");
    let sidecars = write_sidecars(
        settings,
        &input,
        &input_sha256,
        &hex::encode(digest),
        &packages,
        epoch,
        staged_pxe
            .as_ref()
            .and_then(|staged| staged.manifest.clone()),
    )?;
    partial_guard
        .0
        .extend(sidecars.iter().map(|(partial, _)| partial.clone()));
    // The sidecars first: an output in place always has its records beside it.
    for (partial, target) in &sidecars {
        fs_err::rename(partial, target)?;
    }
    match staged_pxe {
        // The output disk's stream was only the carrier: dropped, it is removed.
        Some(staged) => staged.commit(&settings.output)?,
        None => partial_output.commit(&settings.output)?,
    }
    partial_guard.0.clear();
    Ok(BuildSummary {
        output: settings.output.clone(),
        size,
        sha256: hex::encode(digest),
    })
}

/// PXE artifacts written beside the output under a temp name: a directory (`pxe-dir`) or the
/// `.tar.gz` (`pxe-tar`). Dropped before [`StagedPxe::commit`], it is removed.
struct StagedPxe {
    path: PathBuf,
    /// `pxe-dir`: the `sha256sum` lines of its files (the `.sha256` sidecar).
    manifest: Option<String>,
}

impl StagedPxe {
    fn new(output: &Path, format: OutputFormat) -> anyhow::Result<Self> {
        let path = crate::rundir::hidden_sibling(output, "vmic-pxe");
        // One left by a run that was killed (the output's lock is ours now).
        remove_any(&path)?;
        if format == OutputFormat::PxeDir && output.exists() && !output.is_dir() {
            bail!(
                "{} exists and is not a directory; pxe-dir writes a directory there: remove it or choose another --output-image-file",
                output.display()
            );
        }
        Ok(StagedPxe {
            path,
            manifest: None,
        })
    }

    /// Moves the artifacts into place; an older directory there is replaced whole.
    fn commit(mut self, output: &Path) -> anyhow::Result<()> {
        let path = std::mem::take(&mut self.path);
        if path.is_dir() && output.is_dir() {
            let old = crate::rundir::hidden_sibling(output, "vmic-old");
            remove_any(&old)?;
            fs_err::rename(output, &old)?;
            fs_err::rename(&path, output)?;
            remove_any(&old)?;
        } else {
            fs_err::rename(&path, output)?;
        }
        Ok(())
    }
}

impl Drop for StagedPxe {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = remove_any(&self.path);
        }
    }
}

/// Removes a file or a directory tree (never following a link); absent is fine.
fn remove_any(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs_err::remove_dir_all(path)?,
        Ok(_) => fs_err::remove_file(path)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("checking {}", path.display())),
    }
    Ok(())
}

/// `OUTPUT.sha256`, `OUTPUT.spdx.json` and `OUTPUT.provenance.json` under partial names.
/// `sha256_lines`: the `.sha256` content when the output is a directory (one line per file).
fn write_sidecars(
    settings: &CustomizeSettings,
    input: &Path,
    input_sha256: &str,
    output_sha256: &str,
    packages: &vmic_protocol::PackageInventory,
    epoch: Option<u64>,
    sha256_lines: Option<String>,
) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    use crate::provenance::{self, ProvenanceInputs};
    let output = &settings.output;
    let package_sources = settings
        .package_sources
        .iter()
        .map(|source| provenance::package_source_record(source))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let iso = settings.output_format.is_live();
    let inputs = ProvenanceInputs {
        input,
        input_format: settings.input_format.name(),
        input_sha256,
        config: &fs_err::canonicalize(&settings.config.path)?,
        config_sha256: &provenance::sha256_hex(&settings.config.path)?,
        package_sources,
        disable_base_image_repos: settings.disable_base_image_repos,
        squashfs: iso.then(|| {
            (
                format!("{:?}", settings.squashfs_compression).to_lowercase(),
                settings.vm.vm_cpus.unwrap_or(0),
            )
        }),
        source_date_epoch: epoch,
        source_date_epoch_given: settings.source_date_epoch.is_some(),
        packages,
    };
    // Disk outputs are not clamped: their SBOM is dated by the given epoch or the build.
    let created = epoch.or(settings.source_date_epoch).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    });
    let spdx = provenance::spdx_document(output, output_sha256, packages, created);
    let record = provenance::provenance_document(
        output,
        settings.output_format.name(),
        output_sha256,
        &inputs,
    );
    provenance::write_partial_sidecars(
        output,
        &[
            (
                provenance::SHA256_SUFFIX,
                sha256_lines.unwrap_or_else(|| provenance::sha256sum_line(output_sha256, output)),
            ),
            (
                provenance::SPDX_SUFFIX,
                serde_json::to_string_pretty(&spdx)? + "\n",
            ),
            (
                provenance::PROVENANCE_SUFFIX,
                serde_json::to_string_pretty(&record)? + "\n",
            ),
        ],
    )
}

/// `qemu-img convert` arguments that write `format` (the overlay and its backing input
/// flattened into one standalone image).
pub fn convert_argv(
    overlay: &Path,
    input: &crate::qemu::Backing,
    output: &Path,
    format: OutputFormat,
) -> Vec<OsString> {
    let (qemu_format, options) = format
        .qemu_target()
        .expect("an ISO is not converted from the overlay");
    let mut argv: Vec<OsString> = vec!["convert".into(), "-O".into(), qemu_format.into()];
    if let Some(options) = options {
        argv.push("-o".into());
        argv.push(options.into());
    }
    // The overlay and its input given whole, as data: the input's own header is never asked
    // for a backing file, even if the file changed since it was checked.
    let mut backing = serde_json::json!({
        "driver": input.format,
        "read-only": true,
        "file": {"driver": "file", "filename": input.path.to_string_lossy()},
    });
    if input.format == "qcow2" {
        backing["backing"] = serde_json::Value::Null;
    }
    let source = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": overlay.to_string_lossy()},
        "backing": backing,
    });
    argv.push(format!("json:{source}").into());
    argv.push(output.into());
    argv
}

/// `qemu-img convert` of the overlay (and its input) into the output; dropped, qemu-img dies.
async fn convert_overlay(
    overlay: &Path,
    input: &crate::qemu::Backing,
    output: &Path,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let done = crate::image::run_qemu_img_async(convert_argv(overlay, input, output, format))
        .await
        .with_context(|| format!("writing {}", output.display()))?;
    if !done.status.success() {
        let stderr = String::from_utf8_lossy(&done.stderr);
        bail!(
            "writing {}: qemu-img convert failed ({}): {}",
            output.display(),
            done.status,
            stderr.trim()
        );
    }
    Ok(())
}

/// Blocking work (hashing whole images) on tokio's blocking pool, so the build future stays
/// responsive to Ctrl-C, SIGTERM and the timeout. Dropped early, the work finishes unobserved.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking task of the build panicked")?
}

/// Format and mount the scratch disk at the work directory.
async fn mount_scratch(session: &crate::session::Session) -> anyhow::Result<()> {
    let request = Request::MountScratch {
        serial: SCRATCH_SERIAL.to_string(),
        path: crate::plan::WORK_DIR.to_string(),
    };
    match session.start(request).await?.finish(|_| {}).await? {
        Response::Done => Ok(()),
        other => bail!("unexpected answer to MountScratch: {other:?}"),
    }
}

/// What the build cache does for this build.
enum CacheUse {
    /// Not used: `--no-cache`, a disk output, or a build it cannot vouch for.
    Off,
    /// Re-master this cached ISO instead of building.
    Hit(PathBuf),
    /// Build, then store the ISO under these parts.
    Store(crate::cache::BuildCache, Box<crate::cache::KeyParts>),
}

/// Look the build up in the cache; on a hit, turn the request into a re-master of the cached
/// ISO that replaces its `iso.*` settings with this build's.
async fn use_cache(
    settings: &CustomizeSettings,
    arch: Arch,
    input_sha256: &str,
    planned: &mut Planned,
    reporter: &Reporter,
) -> anyhow::Result<CacheUse> {
    use crate::cache::{BuildCache, KeyInputs, KeyParts, Lookup};
    let (Some(cache_settings), Request::BuildIso(request)) =
        (&settings.cache, &mut planned.request)
    else {
        return Ok(CacheUse::Off);
    };
    // What the key does not hold yet: the cached ISO's rootfs and initrd are a bootstrap
    // build's, with /boot left out.
    if request.pxe.is_some()
        || request.iso.initramfs != vmic_protocol::InitramfsType::Bootstrap
        || request.iso.keep_kdump_boot_files
    {
        reporter.note(
            Source::Vmic,
            "build cache: not used: PXE outputs, full-OS initrds and kept kdump files are not cached yet",
        );
        return Ok(CacheUse::Off);
    }
    let manifest = fs_err::read(crate::guest_image::find(arch)?.dir.join("manifest.json"))?;
    let config_files: Vec<PathBuf> = std::iter::once(&settings.config.path)
        .chain(settings.config.chain.iter().map(|link| &link.path))
        .map(|path| fs_err::canonicalize(path).unwrap_or_else(|_| path.clone()))
        .collect();
    let inputs = KeyInputs {
        builder_manifest: &manifest,
        arch: arch.name(),
        input_sha256,
        uploads: &planned.uploads,
        config_files: &config_files,
    };
    let parts = match KeyParts::of(request, &inputs)? {
        Ok(parts) => parts,
        Err(why) => {
            reporter.note(Source::Vmic, format_args!("build cache: not used: {why}"));
            return Ok(CacheUse::Off);
        }
    };
    let cache = BuildCache::new(cache_settings.clone());
    // A hit reads the whole cached ISO to check it: off the async runtime.
    let lookup = {
        let (cache, parts) = (cache.clone(), parts.clone());
        off_runtime(move || Ok(cache.lookup(&parts))).await?
    };
    match lookup {
        Lookup::Hit(iso) => {
            reporter.note(
                Source::Vmic,
                format_args!(
                    "build cache: hit: the cached ISO (its sha256 checked against the entry) is re-mastered with this build's iso settings (no customization, dracut or mksquashfs); key {}",
                    parts.key()
                ),
            );
            request.input_is_iso = true;
            request.remaster_only = true;
            request.replace_iso_settings = true;
            request.input_checked_by_host = true;
            Ok(CacheUse::Hit(iso))
        }
        Lookup::Miss(why) => {
            reporter.note(
                Source::Vmic,
                format_args!("build cache: miss ({why}); key {}", parts.key()),
            );
            Ok(CacheUse::Store(cache, Box::new(parts)))
        }
    }
}

/// The request for the agent and the files it needs, from the settings.
struct Planned {
    uploads: Vec<crate::upload::Upload>,
    request: Request,
}

impl Planned {
    fn os(&self) -> &vmic_protocol::OsCustomization {
        match &self.request {
            Request::BuildIso(build) => &build.customization.os,
            Request::CustomizeDisk(build) => &build.customization.os,
            _ => unreachable!("a plan is a build request"),
        }
    }
}

/// What a config directory upload leaves out, whatever the directory holds: this build's own
/// files (canonical paths, as `upload::list_files` compares them).
fn never_uploaded(build_dir: &Path, input: &Path, output: &Path) -> Vec<PathBuf> {
    let output = fs_err::canonicalize(crate::rundir::parent_dir(output))
        .unwrap_or_default()
        .join(output.file_name().unwrap_or_default());
    vec![
        build_dir.to_path_buf(),
        input.to_path_buf(),
        // The output being written is sparse and as large as the output disk: uploaded, it
        // cost minutes of zeros at TCG speed.
        crate::rundir::partial_path(&output),
        output,
    ]
}

fn plan(
    settings: &CustomizeSettings,
    build_dir: &Path,
    input: &Path,
    cpus: u32,
    reporter: &Reporter,
) -> anyhow::Result<Planned> {
    let config_dir = fs_err::canonicalize(&settings.config.dir)?;
    let files = crate::gather::gather(
        &settings.config.config,
        crate::gather::Where {
            config_dir: &config_dir,
            exclude: &never_uploaded(build_dir, input, &settings.output),
            package_sources: &settings.package_sources,
        },
    )?;
    let facts = crate::plan::HostFacts {
        config_dir: &config_dir,
        input_is_iso: settings.input_format == ImageFormat::Iso,
        input_serial: INPUT_SERIAL,
        output_serial: OUTPUT_SERIAL,
        cpus,
        disable_base_repos: settings.disable_base_image_repos,
        squashfs_compression: settings.squashfs_compression,
        source_date_epoch: settings.source_date_epoch,
        pxe_output: settings.output_format.is_pxe(),
    };
    let (uploads, skipped, warnings, request) = if settings.output_format.is_live() {
        let plan = crate::plan::iso_plan(&settings.config.config, &facts, &files)?;
        let request = Request::BuildIso(Box::new(plan.request));
        (plan.uploads, plan.skipped, plan.warnings, request)
    } else {
        let plan = crate::plan::disk_plan(&settings.config.config, &facts, &files)?;
        let request = Request::CustomizeDisk(Box::new(plan.request));
        (plan.uploads, plan.skipped, plan.warnings, request)
    };
    for warning in warnings {
        reporter.warn(Source::Vmic, warning);
    }
    for (path, why) in &skipped {
        reporter.warn(
            Source::Vmic,
            format_args!("not copied to /_imageconfigs: {} ({why})", path.display()),
        );
    }
    Ok(Planned { uploads, request })
}

async fn drive_build(
    vm: &RunningVm,
    planned: Planned,
    reporter: &Reporter,
) -> anyhow::Result<Response> {
    let session = &vm.session;
    reporter.step("Uploading", "config directory");
    mount_scratch(session).await?;
    let Planned { uploads, request } = planned;
    crate::upload::send(session, crate::plan::GUEST_CONFIG_DIR, &uploads).await?;

    let mut handle = session.start(request).await?;
    let response = handle
        .finish(|event| match event {
            Event::Progress { step, done, total } => {
                if done == 0 && total == 0 {
                    reporter.step(step.title(), step.detail());
                } else {
                    reporter.update(done, total);
                }
            }
            Event::Output { stream, data } => {
                let text = String::from_utf8_lossy(&data);
                for line in text.lines() {
                    let line = crate::inert::inert_line(line);
                    match stream {
                        Stream::Stdout => reporter.note(Source::Guest, line),
                        Stream::Stderr => reporter.warn(Source::Guest, line),
                    }
                }
            }
            Event::Log { message, .. } => reporter.note(Source::Guest, message),
            Event::Invalid => {}
        })
        .await?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_being_written_in_the_config_directory_is_not_uploaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_dir = fs_err::canonicalize(dir.path()).expect("canonical");
        fs_err::write(config_dir.join("config.yaml"), "os: {}\n").expect("config");
        fs_err::write(config_dir.join("input.qcow2"), "input").expect("input");
        fs_err::create_dir(config_dir.join("build")).expect("build dir");
        fs_err::write(config_dir.join("build/scratch.raw"), "scratch").expect("scratch");
        let output = config_dir.join("out.iso");
        let partial = crate::rundir::PartialOutput::create(&output).expect("partial");
        fs_err::OpenOptions::new()
            .write(true)
            .open(partial.path())
            .expect("open")
            .set_len(1 << 30)
            .expect("sparse");
        fs_err::write(&output, "an older output").expect("old output");
        let exclude = never_uploaded(
            &config_dir.join("build"),
            &config_dir.join("input.qcow2"),
            &config_dir.join(".").join("out.iso"),
        );
        let listed = crate::upload::list_files(&config_dir, &exclude, &[]).expect("list");
        assert_eq!(listed, vec![PathBuf::from("config.yaml")]);
    }
}
