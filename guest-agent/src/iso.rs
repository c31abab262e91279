//! The disk/ISO → LiveOS ISO build as the agent runs it: [`build`] calls the steps in order;
//! the pure planning and argv building live in [`crate::pipeline`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use vmic_protocol::{ExecRequest, InitramfsType, IsoBuild, IsoOutcome, PxeSettings, Step};

use crate::build::{
    disk_by_serial, fs_create_dir_all, output_tail, strings, succeeded, Build, Disk, Mounts,
};
use crate::context::RequestContext;
use crate::customize::{
    copy_additional_files, customize_image, remove_config_mountpoint, write_file,
};
use crate::image::{check_arch, mount_image, IMAGE_ROOT};
use crate::pipeline::{
    self, argv, grub_cfg, inventory, iso_record, media_check, Arch, BootFile, EfiGrubSource,
    Generated, IsoSource, IsoTree,
};
use crate::rootfs::{open_image_file, read_image_text, scoped_join, MAX_IMAGE_TEXT};

/// Where an input ISO is mounted.
const INPUT_ISO: &str = "/mnt/iso";

/// The VM's (and so the image's) architecture.
pub(crate) fn vm_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        Arch::X86_64
    }
}

/// What every step of one ISO build works on.
struct IsoJob<'r> {
    request: &'r IsoBuild,
    arch: Arch,
    work: PathBuf,
    /// The ISO's file tree, mastered by xorriso at the end.
    tree: PathBuf,
    input: PathBuf,
    output: Disk,
    mounts: Mounts,
}

/// The `iso.*` settings the new ISO ends with (an input ISO's recorded ones merged in, or
/// replaced for the build cache's re-master), and the epoch when it is already known.
struct NewIsoSettings {
    user_args: Vec<String>,
    iso_additional_files: Vec<String>,
    replace: bool,
    /// The request's, else an input ISO's; `None`: taken from the image once mounted.
    epoch: Option<u64>,
}

/// What the root file system steps produced.
struct Made {
    rootfs_sha256: String,
    epoch: u64,
    packages: vmic_protocol::PackageInventory,
}

/// Build the LiveOS ISO and copy it to the output disk: the steps, in order.
pub fn build(request: IsoBuild, context: &RequestContext) -> anyhow::Result<IsoOutcome> {
    let mut build = Build::new(context);
    let mut job = IsoJob {
        request: &request,
        arch: vm_arch(),
        work: PathBuf::from(&request.work_dir),
        tree: PathBuf::from(&request.work_dir).join("iso"),
        input: disk_by_serial(&request.input_serial)?.device,
        output: disk_by_serial(&request.output_serial)?,
        mounts: Mounts::default(),
    };
    build.step(Step::Mount)?;
    let record = match request.input_is_iso {
        true => Some(mount_input_iso(&build, &mut job.mounts, &job.input)?),
        false => None,
    };
    let settings = outcome_settings(&request, record.as_ref());
    std::thread::scope(|scope| {
        // A re-master keeps the input's rootfs.img, which its record vouches for: the sha256 is
        // checked beside the work (under TCG, seconds of reading and hashing otherwise on the
        // critical path), and the ISO written meanwhile is returned only if it matches. The
        // host's build cache checks a cached ISO whole, natively, before it hands it over.
        let verified = match &record {
            Some(_) if request.remaster_only && request.input_checked_by_host => {
                build.log("rootfs.img: the host checked the cached ISO it comes from");
                None
            }
            Some(record) if request.remaster_only => {
                Some(scope.spawn(move || verify_input_rootfs(record)))
            }
            _ => None,
        };
        let outcome = (|| {
            let made = match &record {
                Some(record) if request.remaster_only => {
                    remaster(&mut build, &mut job, record, &settings)?
                }
                _ => rebuild_rootfs(&mut build, &mut job, record.as_ref(), &settings)?,
            };
            copy_additional_files(&job.tree, &request.iso.additional_files).context(
                match request.pxe {
                    Some(_) => "pxe.additionalFiles",
                    None => "iso.additionalFiles",
                },
            )?;
            let (size, sha256) = match &request.pxe {
                Some(pxe) => make_pxe(&build, &mut job, pxe, made.epoch)?,
                None => make_iso(&build, &mut job, made.epoch)?,
            };
            build.end_step();
            Ok(IsoOutcome {
                size,
                sha256,
                rootfs_sha256: hex_to_digest(&made.rootfs_sha256)?,
                steps: std::mem::take(&mut build.steps),
                source_date_epoch: made.epoch,
                packages: made.packages,
            })
        })();
        if let Some(verified) = verified {
            verified
                .join()
                .expect("the rootfs.img check does not panic")?;
        }
        outcome
    })
}

/// The new ISO's kernel args and additional files, from the request and an input's record.
fn outcome_settings(
    request: &IsoBuild,
    record: Option<&iso_record::IsoSettingsRecord>,
) -> NewIsoSettings {
    // The build cache's re-master replaces the cached ISO's `iso.*` settings; any other
    // ISO → ISO build keeps them and adds the new ones.
    let replace = request.remaster_only && request.replace_iso_settings;
    let kept = record.filter(|_| !replace);
    let recorded_args = kept
        .map(|record| record.kernel_args_from_user.clone())
        .unwrap_or_default();
    let mut iso_additional_files = kept
        .map(|record| record.iso_additional_files.clone())
        .unwrap_or_default();
    for file in &request.iso.additional_files {
        if !iso_additional_files.contains(&file.destination) {
            iso_additional_files.push(file.destination.clone());
        }
    }
    NewIsoSettings {
        user_args: iso_record::merge_user_args(&recorded_args, &request.iso.extra_args),
        iso_additional_files,
        replace,
        // An ISO input keeps its epoch unless the user gives one: re-customizing reproduces too.
        epoch: request
            .source_date_epoch
            .or(record.map(|record| record.created_unix_seconds)),
    }
}

/// ISO → ISO with only `iso.*` changes: `rootfs.img` and the initrds stay.
fn remaster(
    build: &mut Build<'_>,
    job: &mut IsoJob<'_>,
    record: &iso_record::IsoSettingsRecord,
    settings: &NewIsoSettings,
) -> anyhow::Result<Made> {
    let epoch = settings.epoch.expect("an ISO input has a record");
    let rootfs_sha256 = remaster_tree(
        build,
        &mut job.mounts,
        job.request,
        record,
        &job.tree,
        &Remaster {
            user_args: &settings.user_args,
            iso_additional_files: &settings.iso_additional_files,
            replace: settings.replace,
        },
        epoch,
    )?;
    let packages = remastered_packages(build, &mut job.mounts, &job.tree)?;
    Ok(Made {
        rootfs_sha256,
        epoch,
        packages,
    })
}

/// Disk (or an ISO's unpacked root) → customized root → initrd + `rootfs.img` → ISO tree.
fn rebuild_rootfs(
    build: &mut Build<'_>,
    job: &mut IsoJob<'_>,
    record: Option<&iso_record::IsoSettingsRecord>,
    settings: &NewIsoSettings,
) -> anyhow::Result<Made> {
    let request = job.request;
    let root = match record {
        Some(record) => unpack_iso(build, record, &job.work, job.arch)?,
        None => mount_image(build, &mut job.mounts, &job.input)?,
    };
    check_arch(&root, job.arch)?;
    let epoch = settings
        .epoch
        .unwrap_or_else(|| crate::inventory::epoch_from_image(build, &root));

    build.step(Step::Customize)?;
    let chroot_mounts = customize_image(build, &root, &request.customization, epoch)?;
    let grub = read_grub_cfg(&root)?;
    let full_os = request.iso.initramfs == InitramfsType::FullOs;
    let rewrite = match full_os {
        true => grub_cfg::rewrite_for_full_os_iso,
        false => grub_cfg::rewrite_for_iso,
    };
    let rewritten = rewrite(
        &grub,
        &grub_cfg::IsoBootSettings {
            label: request.iso.label.clone(),
            user_args: settings.user_args.clone(),
            dropped_args: Vec::new(),
        },
    )
    .context("rewriting /boot/grub2/grub.cfg for the ISO")?;
    let plan = pipeline::plan_iso_tree(
        job.arch,
        &collect_boot_files(&root)?,
        &rewritten.initrd_file_names(),
        EfiGrubSource::Image,
    )?;

    build.step(Step::MakeInitrdAndSquashfs)?;
    let (rootfs_sha256, full_os_initrd) = match full_os {
        false => {
            let sha256 = make_initrds_and_squashfs(build, &root, &job.tree, &plan, request, epoch)?;
            drop(chroot_mounts);
            remove_config_mountpoint(&root);
            (sha256, None)
        }
        true => {
            // The root is archived as it is: nothing of the build may be mounted in it.
            drop(chroot_mounts);
            remove_config_mountpoint(&root);
            let initrd = make_full_os_initrd(build, &root, &job.work, request, epoch)?;
            (hex::encode(sha256_file(&initrd)?), Some(initrd))
        }
    };
    let packages = crate::inventory::read_packages(build, &root)?;

    build.step(Step::MakeIso)?;
    populate_tree(
        build,
        &root,
        &job.tree,
        &job.work,
        &plan,
        &match full_os {
            // The media check is dracut's (dmsquash-live); a full-OS initrd has no dracut.
            true => rewritten.text.clone(),
            false => media_check::add_entry(&rewritten.text, &request.iso.label),
        },
        request,
        epoch,
        full_os_initrd.as_deref(),
    )?;
    write_record(job, settings, &plan, &rootfs_sha256, epoch)?;
    if record.is_some() {
        copy_input_iso_extras(&job.tree)?;
    }
    job.mounts.unmount_below(Path::new(IMAGE_ROOT));
    Ok(Made {
        rootfs_sha256,
        epoch,
        packages,
    })
}

/// dracut and mksquashfs side by side; returns `rootfs.img`'s sha256. dracut is mostly one
/// bash process; mksquashfs takes whatever CPU is left. The squashfs leaves out everything
/// dracut writes (see ROOTFS_EXCLUDES): under emulation that hides most of the squashing time.
fn make_initrds_and_squashfs(
    build: &Build<'_>,
    root: &Path,
    tree: &Path,
    plan: &IsoTree,
    request: &IsoBuild,
    epoch: u64,
) -> anyhow::Result<String> {
    check_dracut(root)?;
    let rootfs = tree.join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'));
    fs_create_dir_all(rootfs.parent().expect("rootfs has a parent"))?;
    let network = match request.pxe {
        Some(_) => Some(pxe_network_modules(root)?),
        None => None,
    };
    let (initrds, squashed) = std::thread::scope(|scope| {
        let squash = scope.spawn(|| {
            // dracut is the critical path and mksquashfs would take half its vCPU: at the
            // lowest priority (Linux threads have their own, and children inherit it) it
            // only takes what dracut leaves.
            // SAFETY: a plain syscall on the calling thread (`0`: this thread).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let started = std::time::Instant::now();
            make_rootfs_squashfs(build, root, &rootfs, request, epoch)?;
            let seconds = started.elapsed().as_secs_f64();
            // Hashed here, while dracut still runs.
            anyhow::Ok((seconds, sha256_file(&rootfs)?))
        });
        let started = std::time::Instant::now();
        let initrds = make_initrds(build, root, plan, epoch, network)
            .map(|()| started.elapsed().as_secs_f64());
        (
            initrds,
            squash.join().expect("the mksquashfs thread does not panic"),
        )
    });
    let (dracut_seconds, (squash_seconds, rootfs_sha256)) = (initrds?, squashed?);
    build.log(format!(
        "dracut took {dracut_seconds:.1} s and mksquashfs {squash_seconds:.1} s, side by side"
    ));
    Ok(hex::encode(rootfs_sha256))
}

/// The settings record (spec step 7), so that the ISO can be re-customized.
fn write_record(
    job: &IsoJob<'_>,
    settings: &NewIsoSettings,
    plan: &IsoTree,
    rootfs_sha256: &str,
    epoch: u64,
) -> anyhow::Result<()> {
    let record = iso_record::IsoSettingsRecord {
        format: iso_record::FORMAT_VERSION,
        vmic_version: job.request.iso.vmic_version.clone(),
        arch: job.arch,
        label: job.request.iso.label.clone(),
        kernel_args_from_user: settings.user_args.clone(),
        live_args: match job.request.iso.initramfs {
            InitramfsType::FullOs => &[][..],
            _ => &grub_cfg::LIVE_ARGS[..],
        }
        .iter()
        .chain([&grub_cfg::SELINUX_OFF])
        .map(|arg| arg.to_string())
        .collect(),
        full_os: job.request.iso.initramfs == InitramfsType::FullOs,
        kernel_versions: plan.kernels.iter().map(|k| k.version.clone()).collect(),
        created_unix_seconds: epoch,
        rootfs_sha256: rootfs_sha256.to_string(),
        grub_noprefix: plan.grub_noprefix,
        iso_additional_files: settings.iso_additional_files.clone(),
    };
    write_file(
        &job.tree,
        iso_record::ISO_SETTINGS_PATH,
        record.render()?.as_bytes(),
        0o644,
    )
}

/// xorriso writes the image to stdout, straight onto the output disk: no ISO-sized temporary
/// file on the scratch disk and no second pass to copy it. Returns its size and sha256.
fn make_iso(
    build: &Build<'_>,
    job: &mut IsoJob<'_>,
    epoch: u64,
) -> anyhow::Result<(u64, [u8; 32])> {
    let argv = argv::xorriso_argv(&xorriso_options(job, "-", epoch));
    let written = write_to_disk(build, &argv, &job.output, epoch)?;
    job.mounts.unmount_below(&job.work);
    job.mounts.unmount_below(Path::new("/mnt"));
    Ok(written)
}

/// PXE artifacts ([`pipeline::pxe::plan_pxe`]) as one tar stream on the output disk (the host
/// checks it and writes the directory or `.tar.gz`): the bootstrap ISO first, made from the
/// tree as it is; then every grub.cfg replaced by the PXE one.
fn make_pxe(
    build: &Build<'_>,
    job: &mut IsoJob<'_>,
    pxe: &PxeSettings,
    epoch: u64,
) -> anyhow::Result<(u64, [u8; 32])> {
    let bootstrap_iso = job.work.join("bootstrap.iso");
    let bootstrap = pxe.bootstrap_url.as_deref();
    if bootstrap.is_some() {
        let output = bootstrap_iso.to_string_lossy().into_owned();
        let argv = argv::xorriso_argv(&xorriso_options(job, &output, epoch));
        build
            .run_unchecked(&argv, None, argv::source_date_epoch_env(epoch))
            .and_then(|result| succeeded(&argv, result))
            .context("making the bootstrap ISO")?;
    }
    let iso_cfg = read_image_text(&job.tree, pipeline::ISO_GRUB_CFG, MAX_IMAGE_TEXT)?
        .with_context(|| format!("the ISO tree has no {}", pipeline::ISO_GRUB_CFG))?;
    let pxe_cfg = grub_cfg::rewrite_for_pxe(&iso_cfg, bootstrap)?;
    let mut files = Vec::new();
    list_files(&job.tree, "", &mut files)?;
    let plan = pipeline::pxe::plan_pxe(
        &files,
        job.arch,
        bootstrap.map(|_| pxe.bootstrap_file_name.as_str()),
    )?;
    let mut tar = tar::Builder::new(HashingWriter::onto(&job.output)?);
    for (dest, source) in &plan {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(epoch);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(0o644);
        let from = match source {
            pipeline::pxe::PxeSource::GrubCfg => {
                header.set_size(pxe_cfg.len() as u64);
                tar.append_data(&mut header, dest, pxe_cfg.as_bytes())?;
                continue;
            }
            pipeline::pxe::PxeSource::Tree(path) => job.tree.join(path),
            pipeline::pxe::PxeSource::BootstrapIso => bootstrap_iso.clone(),
        };
        let file =
            std::fs::File::open(&from).with_context(|| format!("opening {}", from.display()))?;
        header.set_size(file.metadata()?.len());
        tar.append_data(&mut header, dest, file)
            .with_context(|| format!("writing {dest} to the PXE artifacts"))?;
    }
    let mut writer = tar.into_inner()?;
    writer.flush()?;
    writer.target.sync_all()?;
    build.log(format!(
        "PXE artifacts: {} files ({}), {} bytes",
        plan.len(),
        match bootstrap {
            Some(url) => format!("bootstrap ISO fetched from {url}"),
            None => "full-OS initrd".to_string(),
        },
        writer.written
    ));
    job.mounts.unmount_below(&job.work);
    job.mounts.unmount_below(Path::new("/mnt"));
    Ok((writer.written, writer.hasher.finalize().into()))
}

/// Every regular file below `dir`, as paths relative to the tree (links and the rest are no
/// PXE artifacts: the ISO tree has none).
fn list_files(dir: &Path, relative: &str, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let inside = match relative {
            "" => name,
            _ => format!("{relative}/{name}"),
        };
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(&entry.path(), &inside, out)?;
        } else if kind.is_file() {
            out.push(inside);
        }
    }
    Ok(())
}

/// The whole customized root as the initrd (`initramfsType: full-os`), compressed as its
/// kernels can read: zstd when every one reads it, else gzip. Returns its path.
fn make_full_os_initrd(
    build: &Build<'_>,
    root: &Path,
    work: &Path,
    request: &IsoBuild,
    epoch: u64,
) -> anyhow::Result<PathBuf> {
    let boot_names = boot_entry_names(root);
    let kdump = match request.iso.keep_kdump_boot_files {
        true => crate::cpio::kdump_boot_files(&boot_names),
        false => Vec::new(),
    };
    if request.iso.keep_kdump_boot_files {
        build.log(format!(
            "kdump boot files kept in /boot: {}",
            kdump.join(", ")
        ));
    }
    let raw = work.join("full-os.cpio");
    let out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?,
    );
    let mut writer = crate::cpio::Writer::new(out, epoch);
    let mut names: Vec<String> = std::fs::read_dir(root)?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let keep = |relative: &str| crate::cpio::keeps(relative, &kdump);
    for name in &names {
        if keep(name) && name != "init" {
            writer.add_tree(&root.join(name), name, &keep)?;
        }
    }
    let init = crate::cpio::INIT_TARGETS
        .iter()
        .find(|target| has_any(root, &[target]))
        .context("the image has neither /lib/systemd/systemd nor /sbin/init to run as the full-OS initrd's /init")?;
    writer.symlink("init", init)?;
    let (out, members) = writer.finish()?;
    out.into_inner()
        .map_err(|error| error.into_error())?
        .sync_all()?;
    let zstd = argv::kernels_read_zstd(&kernel_configs(root));
    let initrd = work.join("full-os-initrd.img");
    let raw_text = raw.to_string_lossy().into_owned();
    let initrd_text = initrd.to_string_lossy().into_owned();
    let argv = match zstd {
        true => strings([
            "zstd",
            "-q",
            "-3",
            "-T0",
            "-f",
            "--rm",
            "-o",
            &initrd_text,
            &raw_text,
        ]),
        false => strings(["busybox", "gzip", "-n", "-6", &raw_text]),
    };
    build.log(format!(
        "full-OS initrd: {members} members (init -> {init}), compressed with {}",
        argv[0..2].join(" ")
    ));
    build.run(&argv, None)?;
    if !zstd {
        std::fs::rename(work.join("full-os.cpio.gz"), &initrd)?;
    }
    Ok(initrd)
}

/// xorriso's options for this job's tree, written to `output` (`-` is stdout).
fn xorriso_options(job: &IsoJob<'_>, output: &str, epoch: u64) -> argv::XorrisoOptions {
    let label = &job.request.iso.label;
    argv::XorrisoOptions {
        iso_tree: job.tree.to_string_lossy().into_owned(),
        output: output.to_string(),
        label: label.clone(),
        efi_boot_image: pipeline::ISO_EFIBOOT_IMG
            .trim_start_matches('/')
            .to_string(),
        bios: job.arch.has_bios().then(|| argv::BiosBoot {
            eltorito_image: pipeline::ISO_BIOS_ELTORITO_IMG
                .trim_start_matches('/')
                .to_string(),
            boot_hybrid_mbr: pipeline::BUILDER_BOOT_HYBRID_IMG.to_string(),
        }),
        modification_date: Some(inventory::xorriso_date(epoch)),
    }
}

fn hex_to_digest(text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(text).context("bad sha256 in the settings record")?;
    bytes
        .try_into()
        .map_err(|_| anyhow!("bad sha256 length in the settings record"))
}

/// Mount a vmic ISO and read its settings record (no record: not made by vmic).
fn mount_input_iso(
    build: &Build<'_>,
    mounts: &mut Mounts,
    device: &Path,
) -> anyhow::Result<iso_record::IsoSettingsRecord> {
    let target = Path::new(INPUT_ISO);
    mounts
        .mount_iso(build, device, target)
        .context("the input is not a readable ISO 9660 image")?;
    let text = read_image_text(target, iso_record::ISO_SETTINGS_PATH, MAX_IMAGE_TEXT)
        .context("the input ISO's settings record")?
        .ok_or_else(|| {
            anyhow!(
                "the input ISO was not made by vmic (it has no {}); only vmic's LiveOS ISOs can be re-customized",
                iso_record::ISO_SETTINGS_PATH
            )
        })?;
    let record = iso_record::IsoSettingsRecord::parse(&text)?;
    if record.full_os {
        bail!(
            "the input ISO boots a full-OS initrd (initramfsType full-os); re-customizing one is not supported yet: build again from the disk image"
        );
    }
    if record.arch != vm_arch() {
        bail!(
            "the input ISO is {} but the builder VM is {}: pass --arch {}",
            record.arch.name(),
            vm_arch().name(),
            record.arch.name()
        );
    }
    Ok(record)
}

/// The input ISO's `rootfs.img` is the one its record names: nothing else vouches for the
/// root file system a re-master keeps or a re-customization unpacks.
fn verify_input_rootfs(record: &iso_record::IsoSettingsRecord) -> anyhow::Result<()> {
    let rootfs = open_image_file(Path::new(INPUT_ISO), pipeline::ISO_ROOTFS_IMG)?
        .with_context(|| format!("the input ISO has no {}", pipeline::ISO_ROOTFS_IMG))?;
    record.check_rootfs(rootfs)?;
    Ok(())
}

/// The `iso.*` settings a re-master ends with.
struct Remaster<'a> {
    /// Every ISO kernel arg the new ISO carries, in order.
    user_args: &'a [String],
    /// Every ISO path `iso.additionalFiles` put on the new ISO.
    iso_additional_files: &'a [String],
    /// The input's recorded args and additional files go (else they stay).
    replace: bool,
}

/// ISO → ISO with only `iso.*` changes: the ISO's own files, a new grub.cfg, same rootfs.
fn remaster_tree(
    build: &mut Build<'_>,
    mounts: &mut Mounts,
    request: &IsoBuild,
    record: &iso_record::IsoSettingsRecord,
    tree: &Path,
    remaster: &Remaster<'_>,
    epoch: u64,
) -> anyhow::Result<String> {
    let user_args = remaster.user_args;
    build.step(Step::MakeIso)?;
    if record.label != request.iso.label {
        bail!(
            "the input ISO's label is {:?}; re-mastering keeps it, but {:?} was asked",
            record.label,
            request.iso.label
        );
    }
    // rootfs.img is checked against the record beside this (see `build`).
    // rootfs.img is most of the ISO: bind-mount it into the tree instead of copying it (under
    // TCG the copy alone costs seconds, and re-mastering must stay cheap).
    let rootfs_in_iso = pipeline::ISO_ROOTFS_IMG.trim_start_matches('/');
    // Replacing: the previous build's iso.additionalFiles stay behind (the new ones are
    // copied in later, as for every build).
    let mut except = vec![PathBuf::from(rootfs_in_iso)];
    if remaster.replace {
        except.extend(
            record
                .iso_additional_files
                .iter()
                .map(|file| PathBuf::from(file.trim_start_matches('/'))),
        );
    }
    let except: Vec<&Path> = except.iter().map(PathBuf::as_path).collect();
    copy_tree_except(Path::new(INPUT_ISO), tree, &except)?;
    let rootfs = tree.join(rootfs_in_iso);
    fs_create_dir_all(rootfs.parent().expect("rootfs has a parent"))?;
    std::fs::File::create(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let mut argv = strings(["mount", "--bind", "-o", "ro"]);
    argv.push(
        Path::new(INPUT_ISO)
            .join(rootfs_in_iso)
            .to_string_lossy()
            .into_owned(),
    );
    argv.push(rootfs.to_string_lossy().into_owned());
    mounts
        .mount(build, argv, &rootfs)
        .context("binding the input ISO's rootfs.img into the new ISO tree")?;
    let grub = read_image_text(tree, pipeline::ISO_GRUB_CFG, MAX_IMAGE_TEXT)
        .context("reading the input ISO's grub.cfg")?
        .with_context(|| format!("the input ISO has no {}", pipeline::ISO_GRUB_CFG))?;
    let rewritten = grub_cfg::rewrite_for_iso(
        &grub,
        &grub_cfg::IsoBootSettings {
            label: request.iso.label.clone(),
            user_args: user_args.to_vec(),
            dropped_args: match remaster.replace {
                true => record
                    .kernel_args_from_user
                    .iter()
                    .filter(|arg| !user_args.contains(arg))
                    .cloned()
                    .collect(),
                false => Vec::new(),
            },
        },
    )?;
    for path in [pipeline::ISO_GRUB_CFG, "/EFI/BOOT/grub.cfg"] {
        let text = media_check::add_entry(&rewritten.text, &request.iso.label);
        write_file(tree, path, text.as_bytes(), 0o644)?;
    }
    let mut record = record.clone();
    record.kernel_args_from_user = user_args.to_vec();
    record.iso_additional_files = remaster.iso_additional_files.to_vec();
    record.vmic_version = request.iso.vmic_version.clone();
    record.created_unix_seconds = epoch;
    write_file(
        tree,
        iso_record::ISO_SETTINGS_PATH,
        record.render()?.as_bytes(),
        0o644,
    )?;
    build.log("re-mastered without rebuilding rootfs.img");
    Ok(record.rootfs_sha256)
}

/// The packages of a re-mastered ISO: its `rootfs.img` (bound into the tree) mounted
/// read-only for as long as the database is read.
fn remastered_packages(
    build: &Build<'_>,
    mounts: &mut Mounts,
    tree: &Path,
) -> anyhow::Result<vmic_protocol::PackageInventory> {
    const ROOTFS_MOUNT: &str = "/mnt/rootfs-inventory";
    let target = Path::new(ROOTFS_MOUNT);
    fs_create_dir_all(target)?;
    let rootfs = tree.join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'));
    let mut argv = strings(["mount", "-t", "squashfs", "-o", "ro,loop"]);
    argv.push(rootfs.to_string_lossy().into_owned());
    argv.push(ROOTFS_MOUNT.to_string());
    mounts
        .mount(build, argv, target)
        .context("mounting the input ISO's rootfs.img to list its packages")?;
    let packages = crate::inventory::read_packages(build, target);
    mounts.unmount_below(target);
    packages
}

/// ISO → ISO with rootfs changes: unpack `rootfs.img` and put the ISO's `/boot` back.
fn unpack_iso(
    build: &mut Build<'_>,
    record: &iso_record::IsoSettingsRecord,
    work: &Path,
    arch: Arch,
) -> anyhow::Result<PathBuf> {
    verify_input_rootfs(record)?;
    let root = work.join("root");
    let image = Path::new(INPUT_ISO).join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'));
    let argv = argv::unsquashfs_argv(
        &image.to_string_lossy(),
        &root.to_string_lossy(),
        crate::memory::unsquashfs_queue_mib(),
    );
    build
        .run(&argv, None)
        .context("unpacking the input ISO's rootfs.img")?;
    let boot = Path::new(INPUT_ISO).join("boot");
    copy_tree(&boot, &root.join("boot"))?;
    // The ISO's shim and grub go back where an image keeps them.
    let efi = root.join("boot/efi/EFI/BOOT");
    fs_create_dir_all(&efi)?;
    for (from, to) in [
        (arch.shim_iso_name(), arch.shim_name()),
        (arch.grub_name(), arch.grub_name()),
    ] {
        let source = Path::new(INPUT_ISO).join("EFI/BOOT").join(&from);
        std::fs::copy(&source, efi.join(&to))
            .with_context(|| format!("copying {} from the input ISO", source.display()))?;
    }
    Ok(root)
}

pub(crate) fn read_grub_cfg(root: &Path) -> anyhow::Result<String> {
    read_image_text(root, pipeline::IMAGE_GRUB_CFG, MAX_IMAGE_TEXT)?
        .ok_or_else(|| anyhow!(pipeline::IsoTreeError::GrubCfg))
}

/// Every regular file under the image's `/boot` (ESP included), with its size.
pub(crate) fn collect_boot_files(root: &Path) -> anyhow::Result<Vec<BootFile>> {
    let mut files = Vec::new();
    let mut pending = vec![root.join("boot")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            let path = entry.path();
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let inside = path.strip_prefix(root).expect("walked below root");
                files.push(BootFile::new(
                    format!("/{}", inside.to_string_lossy()),
                    meta.len(),
                ));
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The image can make a LiveOS initrd: it has dracut and dracut's dmsquash-live module.
pub(crate) fn check_dracut(root: &Path) -> anyhow::Result<()> {
    if !has_dracut(root) {
        bail!("the image has no dracut: install the `dracut` package in the image (its initrd must be regenerated for the LiveOS boot)");
    }
    if !has_dmsquash_live(root) {
        bail!(argv::DMSQUASH_LIVE_HINT);
    }
    Ok(())
}

/// The image at `root` has a `dracut` program.
pub(crate) fn has_dracut(root: &Path) -> bool {
    has_any(
        root,
        &[
            "/usr/bin/dracut",
            "/usr/sbin/dracut",
            "/sbin/dracut",
            "/bin/dracut",
        ],
    )
}

/// The image at `root` has something at one of `paths`.
fn has_any(root: &Path, paths: &[&str]) -> bool {
    paths
        .iter()
        .any(|path| scoped_join(root, path).is_ok_and(|p| p.exists()))
}

/// The image's dracut has the `dmsquash-live` module.
pub(crate) fn has_dmsquash_live(root: &Path) -> bool {
    argv::DMSQUASH_LIVE_MODULE_DIRS
        .iter()
        .any(|path| scoped_join(root, path).is_ok_and(|p| p.is_dir()))
}

/// A bootstrap PXE initrd's network modules; the image must have `livenet` and curl.
fn pxe_network_modules(root: &Path) -> anyhow::Result<argv::NetworkModules> {
    if !has_any(root, &argv::LIVENET_MODULE_DIRS) || !has_any(root, &["/usr/bin/curl", "/bin/curl"])
    {
        bail!(argv::LIVENET_HINT);
    }
    Ok(
        match argv::DHCLIENT_NEEDS
            .iter()
            .all(|paths| has_any(root, paths))
        {
            true => argv::NetworkModules::Dhclient,
            false => argv::NetworkModules::DracutsChoice,
        },
    )
}

fn make_initrds(
    build: &Build<'_>,
    root: &Path,
    plan: &IsoTree,
    epoch: u64,
    network: Option<argv::NetworkModules>,
) -> anyhow::Result<()> {
    let install_items: Vec<String> = crate::customize::modules::MODPROBE_CONFS
        .iter()
        .filter(|path| scoped_join(root, path).is_ok_and(|p| p.is_file()))
        .map(|path| path.to_string())
        .collect();
    write_file(
        root,
        argv::DRACUT_LIVE_CONF_PATH,
        argv::dracut_live_conf(&install_items).as_bytes(),
        0o644,
    )?;
    let compress = argv::initrd_compressor(
        &dracut_configs(root),
        &kernel_configs(root),
        ["/usr/bin/zstd", "/bin/zstd"]
            .iter()
            .any(|path| scoped_join(root, path).is_ok_and(|p| p.is_file())),
    );
    let helpers = install_dracut_helpers(build, root);
    let result = (|| {
        for kernel in &plan.kernels {
            match compress {
                Some(compress) => build.log(format!(
                    "dracut for kernel {} (initrd compressed with `{compress}`: the image's dracut config names no compressor)",
                    kernel.version
                )),
                None => build.log(format!("dracut for kernel {}", kernel.version)),
            }
            let dracut = argv::dracut_argv(&kernel.version, &kernel.initrd, compress, network);
            let mut env = argv::source_date_epoch_env(epoch);
            if helpers.ldd {
                env.push(("DRACUT_LDD".into(), crate::ldd::LDD_CHROOT_PATH.into()));
            }
            if let Some(dracut_install) = &helpers.dracut_install {
                env.push(("DRACUT_INSTALL".into(), dracut_install.clone()));
            }
            build
                .run_unchecked(&dracut, Some(root), env)
                .and_then(|result| succeeded(&dracut, result))
                .with_context(|| {
                    format!("regenerating the initrd for kernel {}", kernel.version)
                })?;
        }
        Ok(())
    })();
    if let Ok(path) = scoped_join(root, argv::DRACUT_LIVE_CONF_PATH) {
        let _ = std::fs::remove_file(path);
    }
    helpers.report_and_remove(build, root);
    result
}

/// A path of the image with its last component not resolved: a link a script left at one of
/// the chroot's `/run` names is what gets removed or refused, not what it points at.
fn run_file_path(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let (dir, name) = path.rsplit_once('/').context("an absolute path")?;
    Ok(scoped_join(root, dir)?.join(name))
}

/// A new, empty file there (whatever was at the name is removed first).
fn create_run_file(root: &Path, path: &str, mode: u32) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = run_file_path(root, path)?;
    let _ = std::fs::remove_file(&target);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))
}

/// What the agent put into the chroot's `/run` to make dracut start fewer processes: itself as
/// dracut's `ldd` ([`crate::ldd`]), and a `dracut-install` that copies files without `cp`
/// ([`crate::dracut_install`]). Each is optional: without them dracut runs as the image has it.
struct DracutHelpers {
    /// `DRACUT_LDD` is set.
    ldd: bool,
    /// `DRACUT_INSTALL`, if set.
    dracut_install: Option<String>,
}

const DRACUT_HELPER_FILES: [&str; 4] = [
    crate::ldd::LDD_CHROOT_PATH,
    crate::dracut_install::WRAPPER_CHROOT_PATH,
    crate::dracut_install::PRELOAD_CHROOT_PATH,
    crate::dracut_install::TALLY_PATH,
];

fn install_dracut_helpers(build: &Build<'_>, root: &Path) -> DracutHelpers {
    let ldd = match install_fast_ldd(root) {
        Ok(()) => true,
        Err(error) => {
            build.log(format!(
                "dracut runs the image's own ldd (vmic's could not be installed: {error:#})"
            ));
            false
        }
    };
    let dracut_install = match install_preload(root) {
        Ok(Some(value)) => Some(value),
        Ok(None) => {
            build.log(
                "dracut-install copies with cp: the image has no dracut-install where dracut looks",
            );
            None
        }
        Err(error) => {
            build.log(format!(
                "dracut-install copies with cp (vmic's preload could not be installed: {error:#})"
            ));
            None
        }
    };
    DracutHelpers {
        ldd,
        dracut_install,
    }
}

impl DracutHelpers {
    /// Logs what the fast paths did (from the tally) and removes the helpers from `/run`.
    fn report_and_remove(&self, build: &Build<'_>, root: &Path) {
        if self.ldd || self.dracut_install.is_some() {
            match read_dracut_tally(root) {
                Ok(tally) => {
                    if self.ldd {
                        build.log(format!(
                            "dracut's ldd: vmic-ldd traced {} ELF files itself and handed {} to the image's ldd",
                            tally.count(crate::ldd::TRACED),
                            tally.count(crate::ldd::HANDED_OVER)
                        ));
                    }
                    if self.dracut_install.is_some() {
                        // A declined request turns cloning off for the rest of that
                        // dracut-install run (it uses cp from then on): a count of runs.
                        build.log(format!(
                            "dracut-install copied {} files in its own process; {} of its runs met a file it leaves to cp (set-ID or not regular) and used cp from there on",
                            tally.count(crate::dracut_install::COPIED),
                            tally.count(crate::dracut_install::DECLINED)
                        ));
                    }
                }
                Err(error) => build.log(format!("dracut's helpers: no tally ({error:#})")),
            }
        }
        for path in DRACUT_HELPER_FILES {
            if let Ok(path) = run_file_path(root, path) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The agent itself as dracut's `ldd` inside the chroot, and the tally it shares with the
/// preload library.
fn install_fast_ldd(root: &Path) -> anyhow::Result<()> {
    create_run_file(root, crate::dracut_install::TALLY_PATH, 0o644)?;
    copy_to_run_file(root, "/proc/self/exe", crate::ldd::LDD_CHROOT_PATH, 0o755)
}

/// A file of the builder VM copied to a new file of the chroot's `/run`.
fn copy_to_run_file(root: &Path, source: &str, path: &str, mode: u32) -> anyhow::Result<()> {
    let mut out = create_run_file(root, path, mode)?;
    std::io::copy(
        &mut std::fs::File::open(source).with_context(|| format!("opening {source}"))?,
        &mut out,
    )
    .with_context(|| format!("copying {source}"))?;
    Ok(())
}

/// The preload library and the wrapper (the agent again) in the chroot; `DRACUT_INSTALL` for
/// them, or `None` when the image has no `dracut-install` where dracut would find one.
fn install_preload(root: &Path) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt;
    let present = |path: &str| {
        run_file_path(root, path).is_ok_and(|path| {
            std::fs::symlink_metadata(&path).is_ok_and(|meta| {
                meta.file_type().is_symlink()
                    || (meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            })
        })
    };
    let Some(program) = crate::dracut_install::image_dracut_install(present) else {
        return Ok(None);
    };
    copy_to_run_file(
        root,
        crate::dracut_install::PRELOAD_GUEST_PATH,
        crate::dracut_install::PRELOAD_CHROOT_PATH,
        0o644,
    )?;
    copy_to_run_file(
        root,
        "/proc/self/exe",
        crate::dracut_install::WRAPPER_CHROOT_PATH,
        0o755,
    )?;
    Ok(Some(crate::dracut_install::dracut_install_env(&program)))
}

/// The tally's marks. Read as any file of the image (bounded, regular files only, no last link
/// followed): the image's programs could write there too.
struct Tally(Vec<u8>);

impl Tally {
    fn count(&self, mark: u8) -> usize {
        self.0.iter().filter(|m| **m == mark).count()
    }
}

fn read_dracut_tally(root: &Path) -> anyhow::Result<Tally> {
    let marks = crate::rootfs::read_image_file(root, crate::dracut_install::TALLY_PATH, 1 << 20)?
        .context("missing")?;
    Ok(Tally(marks))
}

fn make_rootfs_squashfs(
    build: &Build<'_>,
    root: &Path,
    dest: &Path,
    request: &IsoBuild,
    epoch: u64,
) -> anyhow::Result<()> {
    let compression =
        argv::SquashfsCompression::resolve(request.squashfs.compression, &kernel_configs(root));
    build.log(format!("squashfs compression: {compression:?}"));
    let options = argv::SquashfsOptions {
        compression,
        processors: Some(request.squashfs.threads.max(1)),
        memory_mib: crate::memory::mksquashfs_memory_mib(),
        excludes: rootfs_excludes(root, request.iso.keep_kdump_boot_files),
        progress: false,
        source_date_epoch: Some(epoch),
    };
    build.run(
        &argv::mksquashfs_argv(&root.to_string_lossy(), &dest.to_string_lossy(), &options),
        None,
    )?;
    Ok(())
}

/// mksquashfs' excludes: [`argv::ROOTFS_EXCLUDES`], except that `kdumpBootFiles: keep` keeps
/// the kdump kernel and initramfs under `/boot` (every other entry there is excluded by name).
fn rootfs_excludes(root: &Path, keep_kdump: bool) -> Vec<String> {
    let all: Vec<String> = argv::ROOTFS_EXCLUDES
        .iter()
        .map(|e| e.to_string())
        .collect();
    if !keep_kdump {
        return all;
    }
    let names = boot_entry_names(root);
    argv::rootfs_excludes_keeping(&names, &crate::cpio::kdump_boot_files(&names))
}

/// The names of the entries of the image's `/boot` (none when it cannot be read).
fn boot_entry_names(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("boot"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The text of the image's dracut configs (bounded reads; unreadable ones are skipped).
fn dracut_configs(root: &Path) -> Vec<String> {
    let mut paths: Vec<String> = argv::DRACUT_CONFIG_FILES
        .iter()
        .map(|path| path.to_string())
        .collect();
    for dir in argv::DRACUT_CONFIG_DIRS {
        let Ok(local) = scoped_join(root, dir) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(local) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".conf"))
            .collect();
        names.sort();
        paths.extend(names.into_iter().map(|name| format!("{dir}/{name}")));
    }
    paths
        .iter()
        .filter_map(|path| read_image_text(root, path, MAX_IMAGE_TEXT).ok().flatten())
        .collect()
}

/// The image's kernel build configs (`/boot/config-*`), for what its kernels can read.
fn kernel_configs(root: &Path) -> Vec<String> {
    let Ok(boot) = scoped_join(root, "/boot") else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(boot) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("config-"))
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .collect()
}

/// Copy every entry of the plan into the ISO tree and make the generated boot images.
// h-agent restructures this into step(context) functions; until then the epoch is one more argument.
#[allow(clippy::too_many_arguments)]
fn populate_tree(
    build: &Build<'_>,
    root: &Path,
    tree: &Path,
    work: &Path,
    plan: &IsoTree,
    grub_cfg_text: &str,
    request: &IsoBuild,
    epoch: u64,
    full_os_initrd: Option<&Path>,
) -> anyhow::Result<()> {
    let label = &request.iso.label;
    let redirect = work.join("grub-redirect.cfg");
    std::fs::write(&redirect, argv::grub_redirect_cfg(label))?;
    let source_path = |source: &IsoSource| -> anyhow::Result<PathBuf> {
        match source {
            IsoSource::Image(path) => scoped_join(root, path),
            IsoSource::Builder(path) => Ok(PathBuf::from(path)),
            IsoSource::Generated(Generated::GrubRedirectCfg) => Ok(redirect.clone()),
            IsoSource::Generated(other) => Err(anyhow!("{other:?} is not a file to copy")),
        }
    };
    for (dest, source) in &plan.entries {
        let target = scoped_join(tree, dest)?;
        match source {
            IsoSource::Image(_) | IsoSource::Builder(_) => {
                let from = source_path(source)?;
                if from.is_dir() {
                    copy_tree(&from, &target)?;
                } else {
                    fs_create_dir_all(target.parent().expect("has a parent"))?;
                    std::fs::copy(&from, &target)
                        .with_context(|| format!("copying {} to the ISO", from.display()))?;
                }
            }
            IsoSource::Generated(Generated::GrubCfg) => {
                write_file(tree, dest, grub_cfg_text.as_bytes(), 0o644)?;
            }
            IsoSource::Generated(Generated::GrubRedirectCfg) => {
                write_file(tree, dest, argv::grub_redirect_cfg(label).as_bytes(), 0o644)?;
            }
            IsoSource::Generated(Generated::Initrd { kernel_version }) => {
                let kernel = plan
                    .kernels
                    .iter()
                    .find(|k| &k.version == kernel_version)
                    .context("initrd of an unknown kernel")?;
                let from = match full_os_initrd {
                    Some(initrd) => initrd.to_path_buf(),
                    None => scoped_join(root, &kernel.initrd)?,
                };
                fs_create_dir_all(target.parent().expect("has a parent"))?;
                std::fs::copy(&from, &target)
                    .with_context(|| format!("copying the new initrd {}", kernel.initrd))?;
            }
            // Made by their own steps, below or before.
            IsoSource::Generated(_) => {}
        }
    }

    let efi_image = scoped_join(tree, pipeline::ISO_EFIBOOT_IMG)?;
    fs_create_dir_all(efi_image.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&efi_image);
    let efi = &plan.efi_boot_image;
    let image = efi_image.to_string_lossy().into_owned();
    build.run(
        &argv::mkfs_vfat_argv(
            &image,
            argv::efiboot_image_size_kib(&efi.content_sizes),
            &inventory::fat_volume_id(epoch),
        ),
        None,
    )?;
    let mtools_env: Vec<(String, String)> = argv::MTOOLS_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let run_mtools = |argv: Vec<String>| -> anyhow::Result<()> {
        let result = build.run_unchecked(&argv, None, mtools_env.clone())?;
        if result.code != 0 {
            bail!("`{}` failed{}", argv.join(" "), output_tail(&result));
        }
        Ok(())
    };
    // The FAT's content is staged with every time set to the epoch, then copied one entry at
    // a time in the plan's order: directories (parents first, each as an empty staged
    // directory of its name), then files.
    let dirs = work.join("efiboot-dirs");
    let files = work.join("efiboot");
    let _ = std::fs::remove_dir_all(&dirs);
    let _ = std::fs::remove_dir_all(&files);
    let mut copies = Vec::new();
    for (index, dir) in efi.dirs.iter().enumerate() {
        let (parent, name) = dir
            .rsplit_once('/')
            .context("a FAT directory is absolute")?;
        let staged = dirs.join(index.to_string()).join(name);
        fs_create_dir_all(&staged)?;
        copies.push((staged, format!("{parent}/")));
    }
    for (source, dest) in &efi.files {
        let from = source_path(source)?;
        let to = scoped_join(&files, dest)?;
        fs_create_dir_all(to.parent().expect("has a parent"))?;
        std::fs::copy(&from, &to).with_context(|| format!("staging {}", from.display()))?;
        copies.push((to, dest.clone()));
    }
    fs_create_dir_all(&files)?;
    set_times_below(&dirs, epoch)?;
    set_times_below(&files, epoch)?;
    for (staged, dest) in copies {
        run_mtools(argv::mcopy_preserving_argv(
            &image,
            &staged.to_string_lossy(),
            &dest,
        ))?;
    }

    if plan.bios {
        let early = work.join("grub-early.cfg");
        std::fs::write(&early, argv::grub_early_config(label))?;
        let eltorito = scoped_join(tree, pipeline::ISO_BIOS_ELTORITO_IMG)?;
        fs_create_dir_all(eltorito.parent().expect("has a parent"))?;
        build.run(
            &argv::bios_grub_mkimage_argv(&eltorito.to_string_lossy(), &early.to_string_lossy()),
            None,
        )?;
    }
    Ok(())
}

/// Set the mtime and atime of `dir` and everything below it (no symlinks there) to `epoch`.
fn set_times_below(dir: &Path, epoch: u64) -> anyhow::Result<()> {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let times = std::fs::FileTimes::new()
        .set_accessed(time)
        .set_modified(time);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            set_times_below(&path, epoch)?;
        } else {
            std::fs::File::options()
                .write(true)
                .open(&path)?
                .set_times(times)?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|file| file.set_times(times))
        .with_context(|| format!("setting the times of {}", dir.display()))
}

/// ISO → ISO with a rebuilt rootfs: the input ISO's own files (its `iso.additionalFiles`, e.g.
/// a cloud-init seed) stay on the new ISO, as they do when re-mastering. What vmic generates
/// (`/boot`, `/EFI`, `/liveos`, the settings record, the boot catalog) is made anew instead.
fn copy_input_iso_extras(tree: &Path) -> anyhow::Result<()> {
    const GENERATED: [&str; 5] = ["boot", "EFI", "liveos", "vmic", "boot.catalog"];
    let input = Path::new(INPUT_ISO);
    for entry in std::fs::read_dir(input).with_context(|| format!("reading {}", input.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if GENERATED.iter().any(|generated| name == *generated) {
            continue;
        }
        let target = tree.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            copy_tree_entry(&entry, &target)?;
        }
    }
    Ok(())
}

/// Recursive copy of regular files, directories and symlinks (the ISO tree has no others).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    copy_tree_except(from, to, &[])
}

/// [`copy_tree`] leaving out the paths in `except` (relative to `from`).
fn copy_tree_except(from: &Path, to: &Path, except: &[&Path]) -> anyhow::Result<()> {
    copy_tree_below(from, to, Path::new(""), except)
}

fn copy_tree_below(
    from: &Path,
    to: &Path,
    relative: &Path,
    except: &[&Path],
) -> anyhow::Result<()> {
    fs_create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let meta = entry.file_type()?;
        let target = to.join(entry.file_name());
        let inside = relative.join(entry.file_name());
        if except.contains(&inside.as_path()) {
            continue;
        }
        if meta.is_dir() {
            copy_tree_below(&entry.path(), &target, &inside, except)?;
        } else {
            copy_tree_entry(&entry, &target)?;
        }
    }
    Ok(())
}

/// Copy one non-directory entry: a symlink as a symlink, a regular file's content.
fn copy_tree_entry(entry: &std::fs::DirEntry, target: &Path) -> anyhow::Result<()> {
    let meta = entry.file_type()?;
    if meta.is_symlink() {
        let link = std::fs::read_link(entry.path())?;
        let _ = std::fs::remove_file(target);
        std::os::unix::fs::symlink(link, target)?;
    } else if meta.is_file() {
        std::fs::copy(entry.path(), target)
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(vmic_protocol::sha256_reader(file)?)
}

/// Write the ISO at the start of the output disk, hashing as it goes.
/// Counts and hashes what passes through, and refuses to run past the disk's end.
struct HashingWriter {
    target: std::fs::File,
    hasher: Sha256,
    written: u64,
    capacity: u64,
}

impl HashingWriter {
    /// Writing `disk` from offset 0.
    fn onto(disk: &Disk) -> anyhow::Result<Self> {
        let target = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.device)
            .with_context(|| format!("opening the output disk {}", disk.device.display()))?;
        Ok(HashingWriter {
            target,
            hasher: Sha256::new(),
            written: 0,
            capacity: disk.size_bytes,
        })
    }
}

impl Write for HashingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() as u64 > self.capacity {
            return Err(std::io::Error::other(format!(
                "the ISO does not fit on the output disk ({} bytes)",
                self.capacity
            )));
        }
        let written = self.target.write(data)?;
        self.hasher.update(&data[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.target.flush()
    }
}

/// Run `argv` (xorriso writing to stdout) with its output going onto `disk` from offset 0;
/// returns the bytes written and their sha256.
fn write_to_disk(
    build: &Build<'_>,
    argv: &[String],
    disk: &Disk,
    epoch: u64,
) -> anyhow::Result<(u64, [u8; 32])> {
    let mut writer = HashingWriter::onto(disk)?;
    let mut request = ExecRequest::new(argv.iter().cloned());
    request.env = argv::source_date_epoch_env(epoch);
    let result = crate::exec::run_into(request, build.context, &mut writer)?;
    succeeded(argv, result)?;
    writer.target.sync_all()?;
    Ok((writer.written, writer.hasher.finalize().into()))
}
