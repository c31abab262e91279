//! The disk/ISO → LiveOS ISO build as the agent runs it: [`build`] calls the steps in order;
//! the pure planning and argv building live in [`crate::pipeline`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use vmic_protocol::{
    Event, ExecRequest, ExecResult, FileCopy, FileSource, IsoBuild, IsoOutcome, Level, Response,
    Script, StepTime,
};

use crate::pipeline::{
    self, argv, fstab, grub_cfg, iso_record, Arch, BootFile, EfiGrubSource, Generated, IsoSource,
    IsoTree,
};
use crate::rootfs::scoped_join;
use crate::server::RequestContext;

/// Where the image's partitions are mounted.
const IMAGE_ROOT: &str = "/mnt/root";
/// Where candidate root partitions are probed.
const PROBE: &str = "/mnt/probe";
/// Where an input ISO is mounted.
const INPUT_ISO: &str = "/mnt/iso";
/// The config directory inside the image while scripts run.
const IMAGE_CONFIGS: &str = "/_imageconfigs";

/// The VM's (and so the image's) architecture.
fn vm_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        Arch::X86_64
    }
}

/// Progress, step timing and command running for one build.
struct Build<'a> {
    context: &'a RequestContext,
    steps: Vec<StepTime>,
    current: Option<(String, Instant)>,
}

impl<'a> Build<'a> {
    fn new(context: &'a RequestContext) -> Build<'a> {
        Build {
            context,
            steps: Vec::new(),
            current: None,
        }
    }

    /// Start a step: tell the host (progress event with 0/0) and time it.
    fn step(&mut self, name: &str) -> anyhow::Result<()> {
        self.context.cancel.check()?;
        self.end_step();
        self.context.writer.event(
            Some(self.context.id),
            Event::Progress {
                step: name.to_string(),
                done: 0,
                total: 0,
            },
        );
        self.current = Some((name.to_string(), Instant::now()));
        Ok(())
    }

    fn end_step(&mut self) {
        if let Some((step, started)) = self.current.take() {
            self.steps.push(StepTime {
                step,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }

    fn log(&self, message: impl Into<String>) {
        self.context.writer.event(
            Some(self.context.id),
            Event::Log {
                level: Level::Info,
                message: message.into(),
            },
        );
    }

    /// Run a program; a non-zero exit is an error carrying the tail of its stderr.
    fn run(&self, argv: &[String], chroot: Option<&Path>) -> anyhow::Result<ExecResult> {
        let result = self.run_unchecked(argv, chroot, Vec::new())?;
        if result.code != 0 {
            bail!(
                "`{}` failed with exit code {}{}",
                argv.join(" "),
                result.code,
                output_tail(&result)
            );
        }
        Ok(result)
    }

    fn run_unchecked(
        &self,
        argv: &[String],
        chroot: Option<&Path>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<ExecResult> {
        let mut request = ExecRequest::new(argv.iter().cloned());
        request.env = env;
        if let Some(root) = chroot {
            request.chroot = Some(root.to_string_lossy().into_owned());
            request.cwd = Some("/".to_string());
        }
        match crate::exec::run(request, self.context)? {
            Response::Exec(result) => Ok(result),
            other => Err(anyhow!("unexpected exec response {other:?}")),
        }
    }
}

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// The last lines of a command's stderr (or stdout when stderr is empty), for errors.
fn output_tail(result: &ExecResult) -> String {
    let text = if result.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &result.stderr
    } else {
        &result.stdout
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(25)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{}", tail.join("\n"))
    }
}

/// Mount points made by the build, unmounted in reverse order however the build ends.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, build: &Build<'_>, argv: Vec<String>, target: &Path) -> anyhow::Result<()> {
        // A file is a mount point for a bind-mounted file; anything else needs a directory.
        if !target.is_file() {
            fs_create_dir_all(target)?;
        }
        build.run(&argv, None)?;
        self.0.push(target.to_path_buf());
        Ok(())
    }

    /// Unmount everything mounted at or below `prefix`, innermost first.
    fn unmount_below(&mut self, prefix: &Path) {
        let mut keep = Vec::new();
        while let Some(target) = self.0.pop() {
            if target.starts_with(prefix) {
                unmount(&target);
            } else {
                keep.push(target);
            }
        }
        keep.reverse();
        self.0 = keep;
    }
}

fn unmount(target: &Path) {
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a valid C string; MNT_DETACH as a fallback never blocks.
    unsafe {
        if libc::umount2(path.as_ptr(), 0) != 0 {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(target) = self.0.pop() {
            unmount(&target);
        }
    }
}

fn fs_create_dir_all(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

/// A virtio disk of the builder VM.
struct Disk {
    device: PathBuf,
    size_bytes: u64,
}

/// The virtio disk with this serial.
fn disk_by_serial(serial: &str) -> anyhow::Result<Disk> {
    let disks = crate::disks::list(Path::new(crate::disks::SYS_BLOCK))?;
    disks
        .into_iter()
        .find(|disk| disk.serial == serial)
        .map(|disk| Disk {
            device: PathBuf::from("/dev").join(&disk.name),
            size_bytes: disk.size_bytes,
        })
        .ok_or_else(|| anyhow!("no disk with serial {serial} in the builder VM"))
}

/// Build the LiveOS ISO and copy it to the output disk.
pub fn build(request: IsoBuild, context: &RequestContext) -> anyhow::Result<IsoOutcome> {
    let mut build = Build::new(context);
    let arch = vm_arch();
    let work = PathBuf::from(&request.work_dir);
    let tree = work.join("iso");
    let input = disk_by_serial(&request.input_serial)?.device;
    let output = disk_by_serial(&request.output_serial)?;
    let mut mounts = Mounts::default();

    build.step("Mounting")?;
    let record = if request.input_is_iso {
        Some(mount_input_iso(&build, &mut mounts, &input)?)
    } else {
        None
    };
    let recorded_args = record
        .as_ref()
        .map(|record| record.kernel_args_from_user.clone())
        .unwrap_or_default();
    let user_args = iso_record::merge_user_args(&recorded_args, &request.iso.extra_args);

    let rootfs_sha256 = if request.remaster_only {
        let record = record.as_ref().expect("remastering needs an ISO input");
        remaster_tree(&mut build, &mut mounts, &request, record, &tree, &user_args)?
    } else {
        let root = match &record {
            Some(_) => unpack_iso(&mut build, &work, arch)?,
            None => mount_image(&build, &mut mounts, &input)?,
        };
        check_arch(&root, arch)?;
        build.step("Customizing")?;
        apply_os_customizations(&build, &root, &request)?;
        let mut chroot_mounts = Mounts::default();
        mount_chroot(
            &build,
            &mut chroot_mounts,
            &root,
            Path::new(&request.config_dir),
        )?;
        run_scripts(&build, &root, &request.post_customization)?;
        run_scripts(&build, &root, &request.finalize_customization)?;

        let grub = read_grub_cfg(&root)?;
        let rewritten = grub_cfg::rewrite_for_iso(
            &grub,
            &grub_cfg::IsoBootSettings {
                label: request.iso.label.clone(),
                user_args: user_args.clone(),
            },
        )
        .context("rewriting /boot/grub2/grub.cfg for the ISO")?;
        let boot_files = collect_boot_files(&root)?;
        let plan = pipeline::plan_iso_tree(
            arch,
            &boot_files,
            &rewritten.initrd_file_names(),
            EfiGrubSource::Image,
        )?;

        build.step("Dracut")?;
        make_initrds(&build, &root, &plan)?;
        chroot_mounts.unmount_below(&root);
        drop(chroot_mounts);
        remove_config_mountpoint(&root);

        build.step("Squashing")?;
        let rootfs = tree.join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'));
        fs_create_dir_all(rootfs.parent().expect("rootfs has a parent"))?;
        make_rootfs_squashfs(&build, &root, &rootfs, &request)?;
        let rootfs_sha256 = hex::encode(sha256_file(&rootfs)?);

        build.step("Mastering")?;
        populate_tree(
            &build,
            &root,
            &tree,
            &work,
            &plan,
            &rewritten.text,
            &request,
        )?;
        let record = iso_record::IsoSettingsRecord {
            format: iso_record::FORMAT_VERSION,
            vmic_version: request.iso.vmic_version.clone(),
            arch,
            label: request.iso.label.clone(),
            kernel_args_from_user: user_args.clone(),
            live_args: grub_cfg::LIVE_ARGS
                .iter()
                .chain([&grub_cfg::SELINUX_OFF])
                .map(|arg| arg.to_string())
                .collect(),
            kernel_versions: plan.kernels.iter().map(|k| k.version.clone()).collect(),
            created_unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            rootfs_sha256: rootfs_sha256.clone(),
            grub_noprefix: plan.grub_noprefix,
        };
        write_file(
            &tree,
            iso_record::ISO_SETTINGS_PATH,
            record.render()?.as_bytes(),
            0o644,
        )?;
        if request.input_is_iso {
            copy_input_iso_extras(&tree)?;
        }
        mounts.unmount_below(Path::new(IMAGE_ROOT));
        rootfs_sha256
    };

    copy_additional_files(&tree, &request.iso.additional_files).context("iso.additionalFiles")?;
    let iso_file = work.join("out.iso");
    let options = argv::XorrisoOptions {
        iso_tree: tree.to_string_lossy().into_owned(),
        output: iso_file.to_string_lossy().into_owned(),
        label: request.iso.label.clone(),
        efi_boot_image: pipeline::ISO_EFIBOOT_IMG
            .trim_start_matches('/')
            .to_string(),
        bios: arch.has_bios().then(|| argv::BiosBoot {
            eltorito_image: pipeline::ISO_BIOS_ELTORITO_IMG
                .trim_start_matches('/')
                .to_string(),
            boot_hybrid_mbr: pipeline::BUILDER_BOOT_HYBRID_IMG.to_string(),
        }),
        modification_date: None,
    };
    build.run(&argv::xorriso_argv(&options), None)?;

    build.step("Copying")?;
    let (size, sha256) = copy_to_disk(&iso_file, &output)?;
    mounts.unmount_below(&work);
    mounts.unmount_below(Path::new("/mnt"));
    build.end_step();
    let rootfs_sha256 = hex_to_digest(&rootfs_sha256)?;
    Ok(IsoOutcome {
        size,
        sha256,
        rootfs_sha256,
        steps: build.steps,
    })
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
    let mut argv = strings(["mount", "-t", "iso9660", "-o", "ro"]);
    argv.push(device.to_string_lossy().into_owned());
    argv.push(INPUT_ISO.to_string());
    mounts
        .mount(build, argv, target)
        .context("the input is not a readable ISO 9660 image")?;
    let record_path = target.join(iso_record::ISO_SETTINGS_PATH.trim_start_matches('/'));
    let text = std::fs::read_to_string(&record_path).map_err(|_| {
        anyhow!(
            "the input ISO was not made by vmic (it has no {}); only vmic's LiveOS ISOs can be re-customized",
            iso_record::ISO_SETTINGS_PATH
        )
    })?;
    let record = iso_record::IsoSettingsRecord::parse(&text)?;
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

/// ISO → ISO with only `iso.*` changes: the ISO's own files, a new grub.cfg, same rootfs.
fn remaster_tree(
    build: &mut Build<'_>,
    mounts: &mut Mounts,
    request: &IsoBuild,
    record: &iso_record::IsoSettingsRecord,
    tree: &Path,
    user_args: &[String],
) -> anyhow::Result<String> {
    build.step("Mastering")?;
    if record.label != request.iso.label {
        bail!(
            "the input ISO's label is {:?}; re-mastering keeps it, but {:?} was asked",
            record.label,
            request.iso.label
        );
    }
    // rootfs.img is most of the ISO: bind-mount it into the tree instead of copying it (under
    // TCG the copy alone costs seconds, and re-mastering must stay cheap).
    let rootfs_in_iso = pipeline::ISO_ROOTFS_IMG.trim_start_matches('/');
    copy_tree_except(Path::new(INPUT_ISO), tree, &[Path::new(rootfs_in_iso)])?;
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
    let grub = std::fs::read_to_string(tree.join(pipeline::ISO_GRUB_CFG.trim_start_matches('/')))
        .context("reading the input ISO's grub.cfg")?;
    let rewritten = grub_cfg::rewrite_for_iso(
        &grub,
        &grub_cfg::IsoBootSettings {
            label: request.iso.label.clone(),
            user_args: user_args.to_vec(),
        },
    )?;
    for path in [pipeline::ISO_GRUB_CFG, "/EFI/BOOT/grub.cfg"] {
        write_file(tree, path, rewritten.text.as_bytes(), 0o644)?;
    }
    let mut record = record.clone();
    record.kernel_args_from_user = user_args.to_vec();
    record.vmic_version = request.iso.vmic_version.clone();
    write_file(
        tree,
        iso_record::ISO_SETTINGS_PATH,
        record.render()?.as_bytes(),
        0o644,
    )?;
    build.log("re-mastered without rebuilding rootfs.img");
    Ok(record.rootfs_sha256)
}

/// ISO → ISO with rootfs changes: unpack `rootfs.img` and put the ISO's `/boot` back.
fn unpack_iso(build: &mut Build<'_>, work: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let root = work.join("root");
    let image = Path::new(INPUT_ISO).join(pipeline::ISO_ROOTFS_IMG.trim_start_matches('/'));
    let mut argv = strings(["unsquashfs", "-no-progress", "-f", "-d"]);
    argv.push(root.to_string_lossy().into_owned());
    argv.push(image.to_string_lossy().into_owned());
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

/// Find the root partition (the one with `/etc/fstab`) and mount everything per its fstab.
fn mount_image(build: &Build<'_>, mounts: &mut Mounts, disk: &Path) -> anyhow::Result<PathBuf> {
    let partitions = probe_partitions(build, disk)?;
    if partitions.is_empty() {
        bail!(
            "the input has no partitions with a file system: it is not a disk image vmic can read (expected a GPT/MBR disk with the root file system on a partition)"
        );
    }
    let root_partition = find_root_partition(build, &partitions)?;
    let root = PathBuf::from(IMAGE_ROOT);
    let fstab_text = {
        let mut probe = Mounts::default();
        let mut argv = strings(["mount", "-o", "ro"]);
        argv.push(root_partition.device.clone());
        argv.push(PROBE.to_string());
        probe.mount(build, argv, Path::new(PROBE))?;
        std::fs::read_to_string(Path::new(PROBE).join("etc/fstab"))
            .context("reading the image's /etc/fstab")?
    };
    let plan = fstab::mount_plan(&fstab_text).context("the image's /etc/fstab")?;
    if !plan.iter().any(|entry| entry.mountpoint == "/") {
        bail!("the image's /etc/fstab has no entry for /");
    }
    for entry in &plan {
        let device = match entry.mountpoint.as_str() {
            // The partition we found the fstab on is the root, whatever fstab calls it.
            "/" => root_partition.device.clone(),
            _ => resolve_device(&partitions, &entry.spec).ok_or_else(|| {
                anyhow!(
                    "/etc/fstab line {}: no partition matches {:?} (mount point {})",
                    entry.line,
                    entry.spec,
                    entry.mountpoint
                )
            })?,
        };
        let target = scoped_join(&root, &entry.mountpoint)?;
        let mut argv = strings(["mount"]);
        if let Some(fstype) = &entry.fstype {
            argv.extend(strings(["-t", fstype]));
        }
        if !entry.options.is_empty() {
            argv.push("-o".into());
            argv.push(entry.options.join(","));
        }
        argv.push(device);
        argv.push(target.to_string_lossy().into_owned());
        mounts.mount(build, argv, &target).with_context(|| {
            format!("mounting {} (fstab line {})", entry.mountpoint, entry.line)
        })?;
    }
    Ok(root)
}

#[derive(Debug, Clone, Default)]
struct Partition {
    device: String,
    uuid: Option<String>,
    label: Option<String>,
    part_uuid: Option<String>,
    part_label: Option<String>,
    fs_type: Option<String>,
}

/// Partitions of `disk` with what `blkid` says about each (there is no udev to ask).
fn probe_partitions(build: &Build<'_>, disk: &Path) -> anyhow::Result<Vec<Partition>> {
    let name = disk
        .file_name()
        .context("disk path has no name")?
        .to_string_lossy()
        .into_owned();
    let mut devices: Vec<String> = std::fs::read_dir(Path::new("/sys/block").join(&name))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|entry| entry.starts_with(&name))
        .map(|entry| format!("/dev/{entry}"))
        .collect();
    devices.sort_by_key(|device| {
        let number: String = device
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        number
            .chars()
            .rev()
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    let mut partitions = Vec::new();
    for device in devices {
        // blkid exits 2 when it finds nothing on a partition: not an error here.
        let mut argv = strings(["blkid", "-p", "-o", "export"]);
        argv.push(device.clone());
        let result = build.run_unchecked(&argv, None, Vec::new())?;
        let mut partition = Partition {
            device,
            ..Partition::default()
        };
        for line in String::from_utf8_lossy(&result.stdout).lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = Some(value.to_string());
            match key {
                "UUID" => partition.uuid = value,
                "LABEL" => partition.label = value,
                "PART_ENTRY_UUID" | "PARTUUID" => partition.part_uuid = value,
                "PART_ENTRY_NAME" | "PARTLABEL" => partition.part_label = value,
                "TYPE" => partition.fs_type = value,
                _ => {}
            }
        }
        if partition.fs_type.is_some() {
            partitions.push(partition);
        }
    }
    Ok(partitions)
}

fn find_root_partition(build: &Build<'_>, partitions: &[Partition]) -> anyhow::Result<Partition> {
    for partition in partitions {
        let linux_fs = matches!(
            partition.fs_type.as_deref(),
            Some("ext4" | "ext3" | "ext2" | "xfs" | "btrfs")
        );
        if !linux_fs {
            continue;
        }
        let mut probe = Mounts::default();
        let mut argv = strings(["mount", "-o", "ro"]);
        argv.push(partition.device.clone());
        argv.push(PROBE.to_string());
        if probe.mount(build, argv, Path::new(PROBE)).is_err() {
            continue;
        }
        if Path::new(PROBE).join("etc/fstab").is_file() {
            return Ok(partition.clone());
        }
    }
    bail!(
        "no partition of the input holds a root file system with /etc/fstab (found: {})",
        partitions
            .iter()
            .map(|p| format!("{} {}", p.device, p.fs_type.as_deref().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn resolve_device(partitions: &[Partition], spec: &fstab::DeviceSpec) -> Option<String> {
    use fstab::DeviceSpec;
    let same =
        |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    partitions
        .iter()
        .find(|p| match spec {
            DeviceSpec::Uuid(uuid) => same(&p.uuid, uuid),
            DeviceSpec::Label(label) => p.label.as_deref() == Some(label.as_str()),
            DeviceSpec::PartUuid(uuid) => same(&p.part_uuid, uuid),
            DeviceSpec::PartLabel(label) => p.part_label.as_deref() == Some(label.as_str()),
            // Device names in the image's world mean nothing here.
            DeviceSpec::Path(_) => false,
        })
        .map(|p| p.device.clone())
}

/// The image's binaries must match the builder VM, which runs them in the chroot.
fn check_arch(root: &Path, arch: Arch) -> anyhow::Result<()> {
    for candidate in ["/usr/bin/env", "/bin/sh", "/usr/bin/sh"] {
        let Ok(path) = scoped_join(root, candidate) else {
            continue;
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        let mut header = [0u8; 20];
        if file.read_exact(&mut header).is_err() || &header[..4] != b"\x7fELF" {
            continue;
        }
        let machine = u16::from_le_bytes([header[18], header[19]]);
        let image_arch = match machine {
            0x3e => Arch::X86_64,
            0xb7 => Arch::Aarch64,
            other => bail!("the image's binaries are for an unsupported machine type {other:#x}"),
        };
        if image_arch != arch {
            bail!(
                "the image is {} but the builder VM is {}: pass --arch {}",
                image_arch.name(),
                arch.name(),
                image_arch.name()
            );
        }
        return Ok(());
    }
    Ok(())
}

fn write_file(root: &Path, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let target = scoped_join(root, path)?;
    if let Some(parent) = target.parent() {
        fs_create_dir_all(parent)?;
    }
    std::fs::write(&target, data).with_context(|| format!("writing {path}"))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the permissions of {path}"))?;
    Ok(())
}

fn copy_additional_files(root: &Path, files: &[FileCopy]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for file in files {
        let (data, default_mode) = match &file.source {
            FileSource::Content(content) => (content.as_bytes().to_vec(), 0o644),
            FileSource::Path(source) => {
                let data = std::fs::read(source).with_context(|| format!("reading {source}"))?;
                let mode = std::fs::metadata(source)?.permissions().mode() & 0o7777;
                (data, mode)
            }
        };
        write_file(
            root,
            &file.destination,
            &data,
            file.permissions.unwrap_or(default_mode),
        )
        .with_context(|| format!("adding {}", file.destination))?;
    }
    Ok(())
}

fn apply_os_customizations(
    build: &Build<'_>,
    root: &Path,
    request: &IsoBuild,
) -> anyhow::Result<()> {
    if let Some(hostname) = &request.os.hostname {
        write_file(
            root,
            "/etc/hostname",
            format!("{hostname}\n").as_bytes(),
            0o644,
        )?;
        build.log(format!("hostname set to {hostname}"));
    }
    copy_additional_files(root, &request.os.additional_files).context("os.additionalFiles")?;
    if !request.os.kernel_args.is_empty() {
        let path = scoped_join(root, pipeline::IMAGE_GRUB_CFG)?;
        let text = std::fs::read_to_string(&path).context("reading /boot/grub2/grub.cfg")?;
        std::fs::write(&path, append_kernel_args(&text, &request.os.kernel_args))?;
    }
    Ok(())
}

/// Append `args` to every `linux`/`linuxefi` line that lacks them (os.kernelCommandLine).
fn append_kernel_args(grub_cfg: &str, args: &[String]) -> String {
    let mut out = String::with_capacity(grub_cfg.len());
    for line in grub_cfg.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let first = body.split_whitespace().next().unwrap_or("");
        if first == "linux" || first == "linuxefi" {
            let present: Vec<&str> = body.split_whitespace().collect();
            let mut body = body.to_string();
            for arg in args {
                if !present.contains(&arg.as_str()) {
                    body.push(' ');
                    body.push_str(arg);
                }
            }
            out.push_str(&body);
            if line.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Mount what programs in the chroot need, and the config directory read-only.
fn mount_chroot(
    build: &Build<'_>,
    mounts: &mut Mounts,
    root: &Path,
    config_dir: &Path,
) -> anyhow::Result<()> {
    let target = |path: &str| scoped_join(root, path);
    // What programs in the chroot (scripts, dracut) need, as data: mount argv prefix, target.
    const CHROOT_MOUNTS: [(&[&str], &str); 4] = [
        (&["mount", "-t", "proc", "proc"], "/proc"),
        (&["mount", "-t", "sysfs", "sysfs"], "/sys"),
        (&["mount", "--bind", "/dev"], "/dev"),
        (&["mount", "-t", "tmpfs", "tmpfs"], "/run"),
    ];
    for (prefix, path) in CHROOT_MOUNTS {
        let mountpoint = target(path)?;
        let mut argv: Vec<String> = prefix.iter().map(|arg| arg.to_string()).collect();
        argv.push(mountpoint.to_string_lossy().into_owned());
        mounts.mount(build, argv, &mountpoint)?;
    }
    let configs = target(IMAGE_CONFIGS)?;
    let mut argv = strings(["mount", "--bind"]);
    argv.push(config_dir.to_string_lossy().into_owned());
    argv.push(configs.to_string_lossy().into_owned());
    mounts.mount(build, argv, &configs)?;
    let mut argv = strings(["mount", "-o", "remount,bind,ro"]);
    argv.push(configs.to_string_lossy().into_owned());
    build.run(&argv, None)?;
    Ok(())
}

fn remove_config_mountpoint(root: &Path) {
    if let Ok(path) = scoped_join(root, IMAGE_CONFIGS) {
        let _ = std::fs::remove_dir(path);
    }
}

fn run_scripts(build: &Build<'_>, root: &Path, scripts: &[Script]) -> anyhow::Result<()> {
    for (index, script) in scripts.iter().enumerate() {
        build.context.cancel.check()?;
        build.log(format!("running script {}", script.name));
        let temp = format!("/tmp/.vmic-script-{index}");
        let path_in_image = match &script.source {
            FileSource::Path(relative) => format!("{IMAGE_CONFIGS}/{relative}"),
            FileSource::Content(content) => {
                write_file(root, &temp, content.as_bytes(), 0o700)?;
                temp.clone()
            }
        };
        let mut argv = vec![script
            .interpreter
            .clone()
            .unwrap_or_else(|| "/bin/sh".to_string())];
        argv.push(path_in_image);
        argv.extend(script.arguments.iter().cloned());
        let result = build.run_unchecked(&argv, Some(root), script.environment.clone());
        if matches!(script.source, FileSource::Content(_)) {
            if let Ok(path) = scoped_join(root, &temp) {
                let _ = std::fs::remove_file(path);
            }
        }
        let result = result.with_context(|| format!("script {}", script.name))?;
        for line in String::from_utf8_lossy(&result.stdout).lines() {
            build.log(format!("{}: {line}", script.name));
        }
        if result.code != 0 {
            bail!(
                "script {} failed with exit code {}{}",
                script.name,
                result.code,
                output_tail(&result)
            );
        }
    }
    Ok(())
}

fn read_grub_cfg(root: &Path) -> anyhow::Result<String> {
    let path = scoped_join(root, pipeline::IMAGE_GRUB_CFG)?;
    std::fs::read_to_string(&path).map_err(|_| anyhow!(pipeline::IsoTreeError::GrubCfg))
}

/// Every regular file under the image's `/boot` (ESP included), with its size.
fn collect_boot_files(root: &Path) -> anyhow::Result<Vec<BootFile>> {
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

fn make_initrds(build: &Build<'_>, root: &Path, plan: &IsoTree) -> anyhow::Result<()> {
    let has_dracut = [
        "/usr/bin/dracut",
        "/usr/sbin/dracut",
        "/sbin/dracut",
        "/bin/dracut",
    ]
    .iter()
    .any(|path| scoped_join(root, path).is_ok_and(|p| p.exists()));
    if !has_dracut {
        bail!("the image has no dracut: install the `dracut` package in the image (its initrd must be regenerated for the LiveOS boot)");
    }
    let has_live = argv::DMSQUASH_LIVE_MODULE_DIRS
        .iter()
        .any(|path| scoped_join(root, path).is_ok_and(|p| p.is_dir()));
    if !has_live {
        bail!(argv::DMSQUASH_LIVE_HINT);
    }
    write_file(
        root,
        argv::DRACUT_LIVE_CONF_PATH,
        argv::dracut_live_conf().as_bytes(),
        0o644,
    )?;
    let result = (|| {
        for kernel in &plan.kernels {
            build.log(format!("dracut for kernel {}", kernel.version));
            build
                .run(
                    &argv::dracut_argv(&kernel.version, &kernel.initrd),
                    Some(root),
                )
                .with_context(|| {
                    format!("regenerating the initrd for kernel {}", kernel.version)
                })?;
        }
        Ok(())
    })();
    if let Ok(path) = scoped_join(root, argv::DRACUT_LIVE_CONF_PATH) {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn make_rootfs_squashfs(
    build: &Build<'_>,
    root: &Path,
    dest: &Path,
    request: &IsoBuild,
) -> anyhow::Result<()> {
    let compression = match request.squashfs.compression.as_str() {
        "xz" => argv::SquashfsCompression::Xz,
        "gzip" => argv::SquashfsCompression::Gzip,
        _ => argv::SquashfsCompression::Zstd { level: None },
    };
    let options = argv::SquashfsOptions {
        compression,
        processors: Some(request.squashfs.threads.max(1)),
        excludes: argv::ROOTFS_EXCLUDES
            .iter()
            .map(|e| e.to_string())
            .collect(),
        progress: false,
    };
    build.run(
        &argv::mksquashfs_argv(&root.to_string_lossy(), &dest.to_string_lossy(), &options),
        None,
    )?;
    Ok(())
}

/// Copy every entry of the plan into the ISO tree and make the generated boot images.
fn populate_tree(
    build: &Build<'_>,
    root: &Path,
    tree: &Path,
    work: &Path,
    plan: &IsoTree,
    grub_cfg_text: &str,
    request: &IsoBuild,
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
            IsoSource::Generated(Generated::Initrd { kernel_version }) => {
                let kernel = plan
                    .kernels
                    .iter()
                    .find(|k| &k.version == kernel_version)
                    .context("initrd of an unknown kernel")?;
                let from = scoped_join(root, &kernel.initrd)?;
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
        &argv::mkfs_vfat_argv(&image, argv::efiboot_image_size_kib(&efi.content_sizes)),
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
    run_mtools(argv::mmd_argv(&image, &efi.dirs))?;
    for (source, dest) in &efi.files {
        let from = source_path(source)?;
        run_mtools(argv::mcopy_argv(&image, &from.to_string_lossy(), dest))?;
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
fn copy_to_disk(iso: &Path, disk: &Disk) -> anyhow::Result<(u64, [u8; 32])> {
    let mut source = std::fs::File::open(iso)?;
    let size = source.metadata()?.len();
    let capacity = disk.size_bytes;
    if size > capacity {
        bail!("the ISO ({size} bytes) does not fit on the output disk ({capacity} bytes)");
    }
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.device)
        .with_context(|| format!("opening the output disk {}", disk.device.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 4 << 20];
    loop {
        let read = source.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        target.write_all(&buffer[..read])?;
    }
    target.sync_all()?;
    Ok((size, hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_kernel_args_are_appended_once_to_linux_lines() {
        let cfg = "menuentry x {\n  linux /boot/vmlinuz-1 root=UUID=a ro quiet\n  initrd /boot/initrd.img-1\n}\n";
        let args = vec!["ds=nocloud".to_string(), "quiet".to_string()];
        let once = append_kernel_args(cfg, &args);
        assert!(once.contains("linux /boot/vmlinuz-1 root=UUID=a ro quiet ds=nocloud\n"));
        assert_eq!(append_kernel_args(&once, &args), once);
        assert!(once.contains("  initrd /boot/initrd.img-1\n"));
    }
}
