//! `vmic boot` end to end, with real QEMU and the test images of `scripts/make-test-image`.
//!
//! Images come from `$VMIC_TEST_IMAGES_DIR/<arch>-<variant>[-bootpart]/` when that holds them;
//! otherwise the script builds them (root needed, a few minutes cold, instant when cached).
//! Boots share the machine with at most one other test's VM ([`common::vm_slot`]); the tests
//! that assert how long something took have it alone ([`common::vm_alone`]).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Instant;

use common::{manifest, run, sha256_of, test_image, vm_alone, vm_slot, vmic};
use predicates::prelude::*;

const MARKER: &str = "VMIC-TEST-BOOTED host=vmic-test";

/// Boot `image` and wait for the marker; returns stdout and the boot time in seconds.
fn boot_to_marker(image: &Path, extra: &[&str], timeout: u64) -> (String, f64) {
    let _vm = vm_slot();
    let started = Instant::now();
    let output = vmic()
        .args(["boot", "--expect", "VMIC-TEST-BOOTED", "--timeout"])
        .arg(timeout.to_string())
        .arg("--image-file")
        .arg(image)
        .args(extra)
        .output()
        .expect("running vmic boot");
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "vmic boot {} failed after {seconds:.1} s:\n{}",
        image.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}: VMIC-TEST-BOOTED after {seconds:.1} s", image.display());
    (stdout, seconds)
}

#[test]
fn x86_64_image_boots_under_uefi() {
    let dir = test_image("x86_64", "minimal", false);
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let console_log = log.path().to_str().expect("UTF-8 path").to_string();
    // No --arch: detected from EFI/BOOT/BOOTX64.EFI in the ESP.
    let (stdout, _) = boot_to_marker(
        &dir.join("disk.raw"),
        &["--firmware", "uefi", "--console-log", &console_log],
        600,
    );
    assert!(stdout.starts_with(MARKER), "stdout: {stdout}");
    assert!(stdout.contains("console=ttyS0"), "stdout: {stdout}");
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the matching line: {stdout}"
    );
    let console = std::fs::read(log.path()).expect("reading the console log");
    let console = String::from_utf8_lossy(&console);
    assert!(
        console.contains("Linux version"),
        "the console log holds the whole boot"
    );
    assert!(console.contains(MARKER));
}

#[test]
fn aarch64_image_boots_under_aavmf() {
    let dir = test_image("aarch64", "minimal", false);
    // A qcow2 input, arch detected through `qemu-img dd`.
    let (stdout, _) = boot_to_marker(&dir.join("disk.qcow2"), &[], 900);
    assert!(stdout.starts_with(MARKER), "stdout: {stdout}");
    assert!(stdout.contains("console=ttyAMA0"), "stdout: {stdout}");
}

#[test]
fn x86_64_image_with_a_boot_partition_boots() {
    let dir = test_image("x86_64", "minimal", true);
    let (stdout, _) = boot_to_marker(&dir.join("disk.qcow2"), &[], 600);
    assert!(stdout.starts_with(MARKER), "stdout: {stdout}");
    // grub.cfg on the /boot file system names the kernel relative to it.
    assert!(stdout.contains("BOOT_IMAGE=/vmlinuz-"), "stdout: {stdout}");
}

/// Each format of the image holds the raw disk whose sha256 the manifest records (the raw file
/// itself is kept only for x86_64; aarch64 keeps the qcow2 alone, see scripts/test).
fn check_formats_match_raw(arch: &str, formats: &[(&str, &str)]) {
    let dir = test_image(arch, "minimal", false);
    let manifest = manifest(&dir);
    let raw_sha = manifest["files"]["disk.raw"]["sha256"]
        .as_str()
        .expect("manifest.json records the raw disk's sha256")
        .to_string();
    let work = tempfile::tempdir().expect("temp dir");
    for (file, format) in formats {
        let input = dir.join(file);
        if *format == "raw" {
            assert_eq!(sha256_of(&input), raw_sha, "the manifest's raw sha256");
            continue;
        }
        let info = run(
            "qemu-img",
            &["info", "-f", format, input.to_str().expect("UTF-8 path")],
        );
        assert!(info.contains("virtual size: 1 GiB"), "{file}: {info}");
        let converted = work.path().join(format!("{file}.raw"));
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                format,
                "-O",
                "raw",
                input.to_str().expect("UTF-8 path"),
                converted.to_str().expect("UTF-8 path"),
            ],
        );
        assert_eq!(sha256_of(&converted), raw_sha, "{file} holds the raw disk");
        std::fs::remove_file(&converted).expect("removing the conversion");
    }
}

#[test]
fn x86_64_formats_have_the_raw_content() {
    check_formats_match_raw(
        "x86_64",
        &[
            ("disk.raw", "raw"),
            ("disk.qcow2", "qcow2"),
            ("disk.vhd", "vpc"),
            ("disk.vhdx", "vhdx"),
        ],
    );
}

#[test]
fn aarch64_qcow2_has_the_raw_content() {
    check_formats_match_raw("aarch64", &[("disk.qcow2", "qcow2")]);
}

/// Copy partition `number` (1-based) of the raw disk out of it, per the manifest.
fn extract_partition(dir: &Path, number: u64, out: &Path) {
    let manifest = manifest(dir);
    let partition = manifest["disk"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|partition| partition["number"].as_u64() == Some(number))
        .expect("the partition is in the manifest")
        .clone();
    let start = partition["start_sector"].as_u64().expect("start");
    let sectors = partition["sectors"].as_u64().expect("sectors");
    run(
        "dd",
        &[
            &format!("if={}", dir.join("disk.raw").display()),
            &format!("of={}", out.display()),
            "bs=1M",
            &format!("skip={}", start * 512),
            &format!("count={}", sectors * 512),
            "iflag=skip_bytes,count_bytes",
            "conv=sparse",
            "status=none",
        ],
    );
}

#[test]
fn x86_64_image_has_the_azure_linux_layout() {
    let dir = test_image("x86_64", "minimal", false);
    let manifest = manifest(&dir);
    let partitions = manifest["disk"]["partitions"]
        .as_array()
        .expect("partitions");
    assert_eq!(partitions.len(), 2);
    assert_eq!(partitions[0]["mountpoint"], "/boot/efi");
    assert_eq!(partitions[1]["mountpoint"], "/");
    let esp = format!("{}@@1M", dir.join("disk.raw").display());
    let listing = run("mdir", &["-b", "-i", &esp, "::/EFI/BOOT"]).to_lowercase();
    assert!(listing.contains("bootx64.efi"), "{listing}");
    assert!(listing.contains("grubx64.efi"), "{listing}");
    let work = tempfile::tempdir().expect("temp dir");
    let root = work.path().join("root.img");
    extract_partition(&dir, 2, &root);
    let root = root.to_str().expect("UTF-8 path");
    let grub_cfg = run("debugfs", &["-R", "cat /boot/grub2/grub.cfg", root]);
    let kernel = manifest["kernel_version"].as_str().expect("kernel_version");
    assert!(
        grub_cfg.contains(&format!("linux /boot/vmlinuz-{kernel}")),
        "{grub_cfg}"
    );
    assert!(
        grub_cfg.contains(&format!("initrd /boot/initrd.img-{kernel}")),
        "{grub_cfg}"
    );
    let fstab = run("debugfs", &["-R", "cat /etc/fstab", root]);
    for partition in partitions {
        let uuid = partition["fs_uuid"].as_str().expect("fs_uuid");
        assert!(fstab.contains(&format!("UUID={uuid} ")), "{fstab}");
    }
    let dracut = run("debugfs", &["-R", "ls /usr/lib/dracut/modules.d", root]);
    assert!(
        dracut.contains("90dmsquash-live"),
        "dracut-live is installed"
    );
}

#[test]
fn no_match_before_the_timeout_fails_with_the_console_tail() {
    let dir = test_image("x86_64", "minimal", false);
    let _vm = vm_alone();
    let started = Instant::now();
    vmic()
        .args([
            "boot",
            "--expect",
            "NEVER-PRINTED",
            "--timeout",
            "20",
            "--image-file",
        ])
        .arg(dir.join("disk.raw"))
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicate::str::contains(
            "error: no console line matched `NEVER-PRINTED` within 20 s",
        ))
        .stderr(predicate::str::contains("console lines:"));
    let seconds = started.elapsed().as_secs_f64();
    assert!(seconds < 40.0, "the timeout stops the VM ({seconds:.1} s)");
}

/// A GPT disk whose ESP holds the image's grub as BOOTX64.EFI, its kernel, and a grub.cfg that
/// boots that kernel without an initrd or a root device: the kernel panics within seconds.
fn make_panic_disk(image: &Path, out: &Path) {
    let manifest = manifest(image);
    let kernel = manifest["kernel_version"].as_str().expect("kernel_version");
    let work = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| work.path().join(name).to_str().expect("UTF-8").to_string();
    extract_partition(image, 2, Path::new(&path("root.img")));
    run(
        "debugfs",
        &[
            "-R",
            &format!("dump /boot/vmlinuz-{kernel} {}", path("vmlinuz")),
            &path("root.img"),
        ],
    );
    let image_esp = format!("{}@@1M", image.join("disk.raw").display());
    run(
        "mcopy",
        &[
            "-i",
            &image_esp,
            "::/EFI/BOOT/grubx64.efi",
            &path("grub.efi"),
        ],
    );
    std::fs::write(
        path("grub.cfg"),
        "set timeout=0\nserial --unit=0 --speed=115200\nterminal_output serial\n\
         menuentry panic {\n  linux /boot/vmlinuz root=/dev/vmic-missing console=ttyS0,115200 panic=0\n}\n",
    )
    .expect("writing grub.cfg");
    run("truncate", &["-s", "32M", &path("esp.img")]);
    run("mkfs.vfat", &["-n", "PANIC", &path("esp.img")]);
    let esp = path("esp.img");
    run(
        "mmd",
        &[
            "-i",
            &esp,
            "::/EFI",
            "::/EFI/BOOT",
            "::/boot",
            "::/boot/grub2",
        ],
    );
    run(
        "mcopy",
        &["-i", &esp, &path("grub.efi"), "::/EFI/BOOT/BOOTX64.EFI"],
    );
    run("mcopy", &["-i", &esp, &path("vmlinuz"), "::/boot/vmlinuz"]);
    run(
        "mcopy",
        &["-i", &esp, &path("grub.cfg"), "::/boot/grub2/grub.cfg"],
    );
    let out_str = out.to_str().expect("UTF-8 path");
    run("truncate", &["-s", "40M", out_str]);
    let mut sfdisk = StdCommand::new("sfdisk")
        .args(["--quiet", out_str])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running sfdisk");
    {
        use std::io::Write;
        let stdin = sfdisk.stdin.as_mut().expect("sfdisk stdin");
        stdin
            .write_all(
                b"label: gpt\nstart=2048, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
            )
            .expect("writing the partition table");
    }
    assert!(sfdisk.wait().expect("sfdisk").success());
    run(
        "dd",
        &[
            &format!("if={esp}"),
            &format!("of={out_str}"),
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
}

#[test]
fn kernel_panic_stops_the_boot_early() {
    let dir = test_image("x86_64", "minimal", false);
    let work = tempfile::tempdir().expect("temp dir");
    let disk = work.path().join("panic.raw");
    make_panic_disk(&dir, &disk);
    let _vm = vm_alone();
    let started = Instant::now();
    vmic()
        .args([
            "boot",
            "--expect",
            "VMIC-TEST-BOOTED",
            "--timeout",
            "300",
            "--image-file",
        ])
        .arg(&disk)
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicate::str::contains(
            "error: the guest kernel panicked: ",
        ))
        .stderr(predicate::str::contains("Kernel panic - not syncing"))
        .stderr(predicate::str::contains("console lines:"));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("panic reported after {seconds:.1} s");
    assert!(
        seconds < 120.0,
        "a panic ends the boot early ({seconds:.1} s)"
    );
}

fn blank_disk(dir: &Path) -> PathBuf {
    let path = dir.join("blank.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("writing a blank disk");
    path
}

#[test]
fn missing_ovmf_names_its_package() {
    let work = tempfile::tempdir().expect("temp dir");
    vmic()
        .env("VMIC_OVMF_CODE", "/nonexistent/OVMF_CODE_4M.fd")
        .args(["boot", "--arch", "x86_64", "--timeout", "5", "--image-file"])
        .arg(blank_disk(work.path()))
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "error: UEFI firmware for x86_64 not found: /nonexistent/OVMF_CODE_4M.fd",
        ))
        .stderr(predicate::str::contains("hint: apt-get install ovmf"));
}

#[test]
fn missing_aavmf_names_its_package() {
    let work = tempfile::tempdir().expect("temp dir");
    vmic()
        .env("VMIC_AAVMF_VARS", "/nonexistent/AAVMF_VARS.fd")
        .args([
            "boot",
            "--arch",
            "aarch64",
            "--timeout",
            "5",
            "--image-file",
        ])
        .arg(blank_disk(work.path()))
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "error: UEFI firmware for aarch64 not found: /nonexistent/AAVMF_VARS.fd",
        ))
        .stderr(predicate::str::contains(
            "hint: apt-get install qemu-efi-aarch64",
        ));
}

#[test]
fn a_missing_image_is_a_usage_error_naming_it() {
    vmic()
        .args(["boot", "--image-file", "/nonexistent/disk.qcow2"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains(
            "error: cannot read image file /nonexistent/disk.qcow2",
        ))
        .stderr(predicate::str::contains("No such file or directory"));
}

#[test]
fn an_unreadable_image_is_a_usage_error_naming_it() {
    let work = tempfile::tempdir().expect("temp dir");
    vmic()
        .args(["boot", "--image-file"])
        .arg(work.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains(format!(
            "error: image file {} is not a regular file",
            work.path().display()
        )));
}

#[test]
fn bios_is_x86_64_only() {
    let work = tempfile::tempdir().expect("temp dir");
    vmic()
        .args([
            "boot",
            "--arch",
            "aarch64",
            "--firmware",
            "bios",
            "--image-file",
        ])
        .arg(blank_disk(work.path()))
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--firmware bios is for x86_64 only",
        ));
}

#[test]
fn an_invalid_pattern_is_a_usage_error() {
    let work = tempfile::tempdir().expect("temp dir");
    vmic()
        .args([
            "boot",
            "--arch",
            "x86_64",
            "--expect",
            "(unclosed",
            "--image-file",
        ])
        .arg(blank_disk(work.path()))
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--expect is not a valid regular expression",
        ));
}
