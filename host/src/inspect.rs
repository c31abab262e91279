//! `vmic inspect`: what a disk image or vmic ISO holds, read inside the builder VM like every
//! other look at an image (the host never mounts it), and whether it can become a LiveOS ISO.
//! The image is attached behind a throwaway overlay (an ISO read-only): it is never written.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail};
use serde::Serialize;
use vmic_protocol::{Inspection, Request, Response, MAX_INSPECTION_ITEMS};

use crate::cli::{Arch, GlobalArgs, InspectArgs};
use crate::image::{self, ImageFormat};
use crate::qemu::{Backing, Disk};
use crate::report::{Failure, Reporter};

/// What `vmic inspect --json` prints: the host's facts about the file, then the guest's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InspectReport {
    /// The file inspected (absolute).
    pub image: PathBuf,
    /// `raw`, `qcow2`, `vhd`, `vhdx` or `iso` (from the content, never the name).
    pub format: String,
    pub virtual_size_bytes: u64,
    pub file_size_bytes: u64,
    /// The builder VM's architecture: the image's, detected or `--arch`.
    pub builder_arch: String,
    #[serde(flatten)]
    pub inspection: Inspection,
}

/// One image to inspect, checked on the host first.
struct Input {
    image: PathBuf,
    format: ImageFormat,
    serial: String,
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> Result<(), Failure> {
    let mut inputs = Vec::new();
    let mut arch = args.vm.arch;
    for (index, path) in args.image_file.iter().enumerate() {
        let image = crate::settings::absolute(path)?;
        let format = image::detect_format(&image).map_err(|error| {
            Failure::Usage(
                anyhow::Error::new(error).context(format!("cannot inspect {}", image.display())),
            )
        })?;
        crate::references::check(&image, format).map_err(Failure::Usage)?;
        image::check_integrity(&image, format).map_err(Failure::Usage)?;
        // One builder VM reads every image: they must agree (or --arch decides).
        let detected = image::resolve_arch(args.vm.arch, &image, format).ok_or_else(|| {
            Failure::Usage(anyhow!(
                "cannot tell the architecture of {}: pass --arch x86_64|aarch64",
                image.display()
            ))
        })?;
        match arch {
            Some(first) if first != detected => {
                return Err(Failure::Usage(crate::report::hinted(
                    format!(
                        "{} is {detected} but the images before it are {first}: one builder VM reads them all",
                        image.display()
                    ),
                    "inspect images of each architecture in their own run, or pass --arch",
                )))
            }
            _ => arch = Some(detected),
        }
        inputs.push(Input {
            image,
            format,
            serial: format!("vmic-inspect-{index}"),
        });
    }
    let arch = arch.ok_or_else(|| Failure::Usage(anyhow!("--image-file is required")))?;
    let runtime = tokio::runtime::Runtime::new().map_err(|error| Failure::Build(error.into()))?;
    let reporter = Reporter::new(crate::report::interactive(global) && !args.json);
    let result = runtime.block_on(async {
        tokio::select! {
            result = inspect(&inputs, arch, &args, &reporter) => result,
            () = crate::boot::interrupted() => Err(anyhow!("interrupted; the builder VM was stopped")),
            () = tokio::time::sleep(args.timeout) => Err(crate::report::hinted(
                format!("the inspection timed out after {:?}", args.timeout),
                "pass a longer --timeout",
            )),
        }
    });
    reporter.finish();
    let reports = result.map_err(Failure::Build)?;
    let text = if args.json {
        let json = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one),
            several => serde_json::to_string_pretty(several),
        };
        json.map_err(|error| Failure::Build(error.into()))? + "\n"
    } else {
        reports.iter().map(render).collect::<Vec<_>>().join("\n")
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|error| Failure::Build(anyhow::Error::new(error).context("writing the report")))
}

/// Print the JSON Schema of [`InspectReport`].
pub fn run_schema() -> Result<(), Failure> {
    let schema = schemars::schema_for!(InspectReport);
    let text =
        serde_json::to_string_pretty(&schema).map_err(|error| Failure::Build(error.into()))?;
    writeln!(std::io::stdout().lock(), "{text}")
        .map_err(|error| Failure::Build(anyhow::Error::new(error).context("writing the schema")))
}

async fn inspect(
    inputs: &[Input],
    arch: Arch,
    args: &InspectArgs,
    reporter: &Reporter,
) -> anyhow::Result<Vec<InspectReport>> {
    reporter.step("Preparing", "the images behind throwaway overlays");
    let temp = tempfile::Builder::new().prefix("vmic-inspect-").tempdir()?;
    crate::secret::private_dir(temp.path())?;
    let mut disks = Vec::new();
    let mut sizes = Vec::new();
    for (index, input) in inputs.iter().enumerate() {
        let virtual_size = image::virtual_size(&input.image, input.format)?;
        sizes.push((virtual_size, fs_err::metadata(&input.image)?.len()));
        disks.push(if input.format == ImageFormat::Iso {
            Disk {
                path: input.image.clone(),
                format: "raw".into(),
                serial: input.serial.clone(),
                read_only: true,
                backing: None,
            }
        } else {
            // Mounting replays journals: those writes land in the overlay, never in the image.
            let overlay = temp.path().join(format!("overlay-{index}.qcow2"));
            image::create_overlay(&input.image, input.format, &overlay, virtual_size)?;
            Disk {
                path: overlay,
                format: "qcow2".into(),
                serial: input.serial.clone(),
                read_only: false,
                backing: Some(Backing {
                    path: input.image.clone(),
                    format: input.format.qemu_name().into(),
                }),
            }
        });
    }
    let mut options = crate::vm::VmOptions::from_args(arch, &args.vm);
    options.run_dir = Some(temp.path().to_path_buf());
    options.disks = disks;
    options.reporter = reporter.clone();
    reporter.step("Booting", &format!("{arch} builder VM"));
    let vm = crate::vm::RunningVm::start(options).await?;
    let mut reports = Vec::new();
    for (input, (virtual_size, file_size)) in inputs.iter().zip(sizes) {
        reporter.step("Inspecting", &input.image.display().to_string());
        let request = Request::Inspect {
            input_serial: input.serial.clone(),
        };
        let answer = async { vm.session.start(request).await?.finish(|_| {}).await }.await;
        let inspection = match answer {
            Ok(Response::Inspection(inspection)) => *inspection,
            Ok(other) => bail!("unexpected answer to Inspect: {other:?}"),
            Err(error) => {
                drop(vm);
                return Err(error.context(format!("inspecting {}", input.image.display())));
            }
        };
        reports.push(InspectReport {
            image: input.image.clone(),
            format: input.format.name().to_string(),
            virtual_size_bytes: virtual_size,
            file_size_bytes: file_size,
            builder_arch: arch.to_string(),
            inspection: checked(inspection)?,
        });
    }
    vm.shutdown().await?;
    Ok(reports)
}

/// The guest's report, bounded and made inert: every string is the image's to choose.
fn checked(mut inspection: Inspection) -> anyhow::Result<Inspection> {
    let lists = [
        ("partitions", inspection.partitions.len()),
        ("kernels", inspection.kernels.len()),
        ("initrds", inspection.initrds.len()),
        ("EFI binaries", inspection.boot_loader.efi_binaries.len()),
        ("reasons", inspection.live_os.reasons.len()),
        (
            "ISO kernel versions",
            inspection
                .vmic_iso
                .as_ref()
                .map_or(0, |iso| iso.kernel_versions.len()),
        ),
        (
            "ISO kernel args",
            inspection
                .vmic_iso
                .as_ref()
                .map_or(0, |iso| iso.user_kernel_args.len()),
        ),
    ];
    for (name, count) in lists {
        if count > MAX_INSPECTION_ITEMS {
            bail!("the builder VM reported {count} {name}, more than the {MAX_INSPECTION_ITEMS} vmic accepts");
        }
    }
    let clean = |text: &mut String| {
        // Each value is one line of at most 4 KiB: anything longer is not a name or a path.
        let mut line = crate::inert::inert_line(text).into_owned();
        if line.len() > 4096 {
            let mut end = 4096;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        *text = line;
    };
    let clean_opt = |text: &mut Option<String>| {
        if let Some(text) = text {
            clean(text);
        }
    };
    let clean_fs = |fs: &mut Option<vmic_protocol::InspectedFileSystem>| {
        if let Some(fs) = fs {
            clean(&mut fs.kind);
            clean_opt(&mut fs.label);
            clean_opt(&mut fs.uuid);
        }
    };
    clean_opt(&mut inspection.partition_table);
    clean_fs(&mut inspection.whole_disk);
    for partition in &mut inspection.partitions {
        clean_opt(&mut partition.type_id);
        clean_opt(&mut partition.part_uuid);
        clean_opt(&mut partition.part_label);
        clean_opt(&mut partition.mount_point);
        clean_fs(&mut partition.file_system);
    }
    if let Some(iso) = &mut inspection.vmic_iso {
        clean(&mut iso.vmic_version);
        clean(&mut iso.label);
        clean(&mut iso.rootfs_sha256);
        iso.kernel_versions.iter_mut().for_each(clean);
        iso.user_kernel_args.iter_mut().for_each(clean);
    }
    if let Some(os) = &mut inspection.os {
        clean_opt(&mut os.id);
        clean_opt(&mut os.version_id);
        clean_opt(&mut os.pretty_name);
    }
    clean_opt(&mut inspection.architecture);
    inspection.kernels.iter_mut().for_each(clean);
    inspection.initrds.iter_mut().for_each(clean);
    let boot = &mut inspection.boot_loader;
    boot.efi_binaries.iter_mut().for_each(clean);
    clean_opt(&mut boot.shim);
    clean_opt(&mut boot.grub_efi);
    clean_opt(&mut boot.grub_cfg);
    if let Some(packages) = &mut inspection.packages {
        clean(&mut packages.manager);
    }
    inspection.live_os.reasons.iter_mut().for_each(clean);
    Ok(inspection)
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// The report for people: one fact per line, the verdict last.
pub fn render(report: &InspectReport) -> String {
    let inspection = &report.inspection;
    let mut out = String::new();
    let mut line = |key: &str, value: String| out.push_str(&format!("{key:<13} {value}\n"));
    line("image", report.image.display().to_string());
    line(
        "format",
        format!(
            "{}, virtual size {} ({} on disk)",
            report.format,
            size(report.virtual_size_bytes),
            size(report.file_size_bytes)
        ),
    );
    if let Some(table) = &inspection.partition_table {
        line(
            "partitions",
            format!("{table}, {}", inspection.partitions.len()),
        );
    }
    for partition in &inspection.partitions {
        let mut fields = vec![format!("#{}", partition.number), size(partition.size_bytes)];
        match &partition.file_system {
            Some(fs) => {
                fields.push(fs.kind.clone());
                fields.extend(fs.label.as_ref().map(|label| format!("label={label}")));
                fields.extend(fs.uuid.as_ref().map(|uuid| format!("uuid={uuid}")));
            }
            None => fields.push("no file system".into()),
        }
        fields.extend(partition.mount_point.as_ref().map(|m| format!("on {m}")));
        line("", fields.join("  "));
    }
    if let Some(fs) = &inspection.whole_disk {
        let label = fs.label.as_deref().unwrap_or("-");
        line(
            "file system",
            format!("{} (whole disk), label {label}", fs.kind),
        );
    }
    if let Some(iso) = &inspection.vmic_iso {
        line(
            "vmic ISO",
            format!(
                "vmic {}, label {}, kernels {}, SOURCE_DATE_EPOCH {}",
                iso.vmic_version,
                iso.label,
                iso.kernel_versions.join(" "),
                iso.created_unix_seconds
            ),
        );
        if !iso.user_kernel_args.is_empty() {
            line("ISO args", iso.user_kernel_args.join(" "));
        }
    }
    if let Some(os) = &inspection.os {
        let name = os
            .pretty_name
            .clone()
            .or_else(|| os.id.clone())
            .unwrap_or_else(|| "unknown".into());
        line("os", name);
    }
    if let Some(arch) = &inspection.architecture {
        line("architecture", arch.clone());
    }
    let list = |items: &[String]| match items.is_empty() {
        true => "none".to_string(),
        false => items.join(" "),
    };
    line("kernels", list(&inspection.kernels));
    line("initrds", list(&inspection.initrds));
    let boot = &inspection.boot_loader;
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "none".into());
    line("shim", or_none(&boot.shim));
    line("grub EFI", or_none(&boot.grub_efi));
    line("grub.cfg", or_none(&boot.grub_cfg));
    line(
        "packages",
        match &inspection.packages {
            Some(packages) => format!("{}, {} installed", packages.manager, packages.count),
            None => "no dpkg or rpm database".into(),
        },
    );
    line(
        "dracut",
        match (inspection.dracut.installed, inspection.dracut.dmsquash_live) {
            (true, true) => "installed, with dmsquash-live".to_string(),
            (true, false) => "installed, without dmsquash-live".to_string(),
            (false, _) => "not installed".to_string(),
        },
    );
    if inspection.truncated {
        line(
            "note",
            format!("lists cut at {MAX_INSPECTION_ITEMS} entries"),
        );
    }
    let verdict = match inspection.live_os.possible {
        true => "yes".to_string(),
        false => format!("no: {}", inspection.live_os.reasons.join("; ")),
    };
    line("LiveOS ISO", verdict);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmic_protocol::{InspectedFileSystem, InspectedOs, InspectedPartition};

    fn report(inspection: Inspection) -> InspectReport {
        InspectReport {
            image: PathBuf::from("/images/x.qcow2"),
            format: "qcow2".into(),
            virtual_size_bytes: 2 << 30,
            file_size_bytes: 300 << 20,
            builder_arch: "x86_64".into(),
            inspection,
        }
    }

    #[test]
    fn the_guests_strings_are_made_inert_and_its_lists_bounded() {
        let hostile = Inspection {
            os: Some(InspectedOs {
                pretty_name: Some("Evil\u{1b}]0;pwned\u{7}\nsecond line".into()),
                ..InspectedOs::default()
            }),
            kernels: vec!["a".repeat(10_000)],
            ..Inspection::default()
        };
        let clean = checked(hostile).expect("bounded");
        let name = clean.os.unwrap().pretty_name.unwrap();
        assert!(!name.contains('\u{1b}') && !name.contains('\n'), "{name:?}");
        assert!(clean.kernels[0].len() <= 4096);

        let flood = Inspection {
            initrds: vec!["x".into(); MAX_INSPECTION_ITEMS + 1],
            ..Inspection::default()
        };
        let error = checked(flood).expect_err("too many");
        assert!(error.to_string().contains("129 initrds"), "{error}");
    }

    #[test]
    fn the_report_names_each_partition_and_ends_with_the_verdict_and_its_reasons() {
        let mut inspection = Inspection {
            partition_table: Some("gpt".into()),
            partitions: vec![InspectedPartition {
                number: 2,
                size_bytes: 3 << 29,
                file_system: Some(InspectedFileSystem {
                    kind: "ext4".into(),
                    label: Some("root".into()),
                    uuid: None,
                }),
                mount_point: Some("/".into()),
                ..InspectedPartition::default()
            }],
            ..Inspection::default()
        };
        inspection.live_os.reasons = vec!["no dracut".into(), "no kernel".into()];
        let text = render(&report(inspection.clone()));
        assert!(
            text.contains("#2  1.5 GiB  ext4  label=root  on /"),
            "{text}"
        );
        assert!(
            text.contains("virtual size 2.0 GiB (300.0 MiB on disk)"),
            "{text}"
        );
        assert!(
            text.trim_end()
                .ends_with("LiveOS ISO    no: no dracut; no kernel"),
            "{text}"
        );
        inspection.live_os.possible = true;
        inspection.live_os.reasons.clear();
        assert!(render(&report(inspection))
            .trim_end()
            .ends_with("LiveOS ISO    yes"));
    }

    #[test]
    fn the_json_report_flattens_the_guests_fields_beside_the_hosts_and_matches_its_schema() {
        let json = serde_json::to_value(report(Inspection::default())).expect("json");
        assert_eq!(json["format"], "qcow2");
        assert_eq!(json["virtualSizeBytes"], 2u64 << 30);
        assert!(json["liveOs"]["possible"].is_boolean(), "{json}");
        assert!(json["bootLoader"]["efiBinaries"].is_array(), "{json}");
        let schema = serde_json::to_value(schemars::schema_for!(InspectReport)).expect("schema");
        let properties = schema["properties"].as_object().expect("properties");
        for key in json.as_object().expect("object").keys() {
            assert!(
                properties.contains_key(key),
                "{key} missing from the schema"
            );
        }
    }
}
