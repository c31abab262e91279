//! `vmic inspect` end to end: real builder VMs read the test images, and what they report is
//! checked against each image's `manifest.json`, written by `scripts/make-test-image` when it
//! laid the disk out (partition table, file system UUIDs, fstab mount points, kernel, boot
//! files, the dpkg package list) — an account of the image that owes nothing to vmic. Several
//! images share one builder VM (`--image-file` repeated), so the suite boots few VMs.

mod common;

use std::path::Path;

use common::{manifest, path_str, run, sha256_of, test_image, vm_slot, vmic, work_dir};
use serde_json::Value;

/// `vmic inspect --json` over `images` (one VM); the JSON array in their order.
fn inspect(images: &[&Path], extra: &[&str]) -> Vec<Value> {
    let mut command = vmic();
    command.arg("inspect").arg("--json").args(extra);
    for image in images {
        command.arg("--image-file").arg(image);
    }
    let output = {
        let _vm = vm_slot();
        command.output().expect("running vmic inspect")
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "vmic inspect failed: {stderr}");
    let json: Value = serde_json::from_slice(&output.stdout).expect("the report is JSON");
    match json {
        Value::Array(reports) => reports,
        one => vec![one],
    }
}

fn eq_ignore_case(a: &Value, b: &Value) -> bool {
    match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// What the guest read must be what the image's recipe wrote.
fn assert_matches_manifest(report: &Value, manifest: &Value) {
    let name = &manifest["name"];
    let disk = &manifest["disk"];
    assert_eq!(report["partitionTable"], disk["label"], "{name}: {report}");
    let partitions = report["partitions"].as_array().expect("partitions");
    let expected = disk["partitions"].as_array().expect("manifest partitions");
    assert_eq!(partitions.len(), expected.len(), "{name}: {report}");
    for want in expected {
        let got = partitions
            .iter()
            .find(|p| p["number"] == want["number"])
            .unwrap_or_else(|| panic!("{name}: partition {} missing: {report}", want["number"]));
        let sectors = want["sectors"].as_u64().expect("sectors");
        assert_eq!(
            got["sizeBytes"].as_u64(),
            Some(sectors * 512),
            "{name}: {got}"
        );
        assert!(
            eq_ignore_case(&got["typeId"], &want["type_guid"]),
            "{name}: {got}"
        );
        assert!(
            eq_ignore_case(&got["partUuid"], &want["partuuid"]),
            "{name}: {got}"
        );
        assert_eq!(got["partLabel"], want["name"], "{name}: {got}");
        assert_eq!(got["fileSystem"]["kind"], want["fstype"], "{name}: {got}");
        assert!(
            eq_ignore_case(&got["fileSystem"]["uuid"], &want["fs_uuid"]),
            "{name}: {got}"
        );
        assert_eq!(got["mountPoint"], want["mountpoint"], "{name}: {got}");
    }
    assert_eq!(report["architecture"], manifest["arch"], "{name}");
    assert_eq!(report["builderArch"], manifest["arch"], "{name}");
    assert_eq!(report["os"]["id"], "debian", "{name}: {report}");
    let kernel = manifest["kernel_version"].as_str().expect("kernel_version");
    assert_eq!(report["kernels"], serde_json::json!([kernel]), "{name}");
    assert_eq!(
        report["initrds"],
        serde_json::json!([format!("/boot/initrd.img-{kernel}")]),
        "{name}"
    );
    let boot = &manifest["boot"];
    let esp = |path: &Value| format!("/boot/efi/{}", path.as_str().expect("a path"));
    assert_eq!(report["bootLoader"]["shim"], esp(&boot["shim"]), "{name}");
    assert_eq!(
        report["bootLoader"]["grubEfi"],
        esp(&boot["grub"]),
        "{name}"
    );
    assert_eq!(report["bootLoader"]["grubCfg"], boot["grub_cfg"], "{name}");
    assert_eq!(report["packages"]["manager"], "dpkg", "{name}");
    let packages = manifest["packages"].as_object().expect("packages").len();
    assert_eq!(
        report["packages"]["count"].as_u64(),
        Some(packages as u64),
        "{name}: the dpkg database's count"
    );
    assert_eq!(report["dracut"]["installed"], true, "{name}");
    assert_eq!(report["dracut"]["dmsquashLive"], true, "{name}");
    assert_eq!(report["liveOs"]["possible"], true, "{name}: {report}");
    assert_eq!(report["liveOs"]["reasons"], serde_json::json!([]), "{name}");
    assert_eq!(report["truncated"], false, "{name}");
}

/// The x86_64 test images in every container format, and an ISO that vmic did not make, in
/// one builder VM; none of the files is written.
#[test]
fn x86_64_images_in_every_format_read_as_their_manifests_say() {
    let minimal = test_image("x86_64", "minimal", false);
    let bootpart = test_image("x86_64", "minimal", true);
    let cloud_init = test_image("x86_64", "cloud-init", false);
    let work = work_dir();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hello.txt"), "not a LiveOS\n").expect("write");
    let foreign = work.path().join("foreign.iso");
    run(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-V",
            "FOREIGN",
            "-o",
            path_str(&foreign),
            path_str(&tree),
        ],
    );
    let formats = [
        ("disk.qcow2", "qcow2"),
        ("disk.raw", "raw"),
        ("disk.vhd", "vhd"),
        ("disk.vhdx", "vhdx"),
    ];
    let mut images: Vec<std::path::PathBuf> =
        formats.iter().map(|(file, _)| minimal.join(file)).collect();
    images.push(bootpart.join("disk.qcow2"));
    images.push(cloud_init.join("disk.qcow2"));
    images.push(foreign.clone());
    let paths: Vec<&Path> = images.iter().map(|p| p.as_path()).collect();
    let reports = inspect(&paths, &[]);
    assert_eq!(reports.len(), images.len());

    let minimal_manifest = manifest(&minimal);
    for ((file, format), report) in formats.iter().zip(&reports) {
        assert_eq!(report["format"], *format, "{file}");
        assert_eq!(report["image"], path_str(&minimal.join(file)), "{file}");
        assert_eq!(
            report["virtualSizeBytes"],
            minimal_manifest["disk"]["bytes"]
        );
        assert_matches_manifest(report, &minimal_manifest);
        // Inspecting mounted every file system (journal replay and all): behind the
        // overlay, so the file is still the one the recipe wrote.
        assert_eq!(
            sha256_of(&minimal.join(file)),
            minimal_manifest["files"][file]["sha256"]
                .as_str()
                .expect("sha256"),
            "{file} was written"
        );
    }
    assert_matches_manifest(&reports[4], &manifest(&bootpart));
    assert_matches_manifest(&reports[5], &manifest(&cloud_init));

    let foreign_report = &reports[6];
    assert_eq!(foreign_report["format"], "iso");
    assert_eq!(foreign_report["wholeDisk"]["kind"], "iso9660");
    assert_eq!(foreign_report["wholeDisk"]["label"], "FOREIGN");
    assert_eq!(foreign_report["vmicIso"], Value::Null);
    assert_eq!(foreign_report["liveOs"]["possible"], false);
    let reason = foreign_report["liveOs"]["reasons"][0]
        .as_str()
        .unwrap_or("");
    assert!(reason.contains("not made by vmic"), "{foreign_report}");
}

/// The aarch64 image, detected as such: the aarch64 builder reads it (TCG on this host).
#[test]
fn an_aarch64_image_is_read_by_the_aarch64_builder() {
    let image = test_image("aarch64", "minimal", false);
    let reports = inspect(&[&image.join("disk.qcow2")], &[]);
    assert_matches_manifest(&reports[0], &manifest(&image));
}

/// Forced onto the wrong builder, the image still reads, and the verdict names every check
/// the build would fail, in the human report.
#[test]
fn an_image_on_the_wrong_builder_says_why_it_cannot_become_an_iso() {
    let image = test_image("aarch64", "minimal", false).join("disk.qcow2");
    let output = {
        let _vm = vm_slot();
        vmic()
            .args(["inspect", "--arch", "x86_64", "--image-file"])
            .arg(&image)
            .output()
            .expect("running vmic inspect")
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("architecture  aarch64"), "{stdout}");
    let verdict = stdout
        .lines()
        .find(|line| line.starts_with("LiveOS ISO"))
        .unwrap_or_else(|| panic!("no verdict: {stdout}"));
    assert!(
        verdict.contains("no: the image is aarch64 but the builder VM is x86_64"),
        "{verdict}"
    );
    // The x86_64 shim a LiveOS ISO from this builder would need is absent too.
    assert!(verdict.contains("bootx64.efi"), "{verdict}");
}

#[test]
fn a_file_that_is_no_image_is_refused_clearly() {
    let work = work_dir();
    let input = work.path().join("random.img");
    common::random_file(&input, 4);
    let before = sha256_of(&input);
    let output = {
        let _vm = vm_slot();
        vmic()
            .args(["inspect", "--json", "--image-file"])
            .arg(&input)
            .output()
            .expect("running vmic inspect")
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty(), "no report for a failure");
    assert!(
        stderr.contains(&format!("inspecting {}", input.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("not a disk image: no partition table, file system or ISO 9660 volume"),
        "{stderr}"
    );
    assert_eq!(sha256_of(&input), before);
}
