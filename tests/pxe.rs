//! PXE outputs and full-OS initrds end to end: real builder VMs make `pxe-dir`/`pxe-tar`
//! artifacts and full-OS ISOs from the x86_64 test image, and `vmic boot` boots them — PXE
//! artifacts over QEMU's user network (its TFTP server, and vmic's HTTP server for the
//! bootstrap ISO), under OVMF, as a PXE client would.

mod common;

use std::path::{Path, PathBuf};

use common::{boot, customize_to, path_str, run, run_in, sha256_of, test_image, work_dir, Booted};

/// A loopback port nothing listens on now (the bootstrap URL names it; `vmic boot` serves it).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs_err::write(&path, text).expect("writing a config");
    path
}

fn must_succeed(built: &common::Customized, output: &Path) {
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    assert!(output.exists(), "{} was written", output.display());
    common::assert_no_partial(output);
}

/// The kernel command line of the marker, as one string for messages.
fn cmdline(booted: &Booted) -> String {
    booted.cmdline.join(" ")
}

#[test]
fn a_bootstrap_pxe_dir_boots_over_the_network_and_fetches_its_iso_from_vmic() {
    let image = test_image("x86_64", "minimal", false).join("disk.qcow2");
    let work = work_dir();
    let port = free_port();
    let config = write(
        work.path(),
        "pxe.yaml",
        &format!(
            "os:\n  hostname: vmic-pxe\npxe:\n  initramfsType: bootstrap\n  bootstrapBaseUrl: http://10.0.2.2:{port}/\n  kernelCommandLine:\n    extraCommandLine: [vmic.pxe=bootstrap]\n  additionalFiles:\n    - content: served beside the boot files\n      destination: /notes/readme.txt\n"
        ),
    );
    let output = work.path().join("artifacts");
    let built = customize_to("pxe-dir", &image, &config, &output, None, &[]);
    must_succeed(&built, &output);

    // The layout the Image Customizer documents: shim and grub at the top, grub.cfg under
    // boot/grub2, the bootstrap ISO at the root, the additional file where it was asked.
    for file in [
        "bootx64.efi",
        "grubx64.efi",
        "boot/grub2/grub.cfg",
        "image.iso",
        "notes/readme.txt",
    ] {
        assert!(output.join(file).is_file(), "{file} in the artifacts");
    }
    assert!(
        !output.join("liveos").exists(),
        "the squashfs is inside image.iso only"
    );
    let grub = fs_err::read_to_string(output.join("boot/grub2/grub.cfg")).expect("grub.cfg");
    let url = format!("root=live:http://10.0.2.2:{port}/image.iso");
    assert!(grub.contains(&url), "{grub}");
    assert!(grub.contains("ip=dhcp"), "{grub}");
    assert!(
        !grub.contains("search"),
        "the PXE grub.cfg searches no disk: {grub}"
    );
    // The sidecar lists every file with its sha256, checkable from the parent directory.
    let sums = run_in(work.path(), "sha256sum", &["-c", "artifacts.sha256"]);
    assert!(sums.contains("artifacts/image.iso: OK"), "{sums}");
    assert_eq!(
        sums.lines().count(),
        fs_err::read_to_string(work.path().join("artifacts.sha256"))
            .unwrap()
            .lines()
            .count()
    );
    // The bootstrap ISO is a LiveOS ISO with the same kernel args (it boots on its own too).
    let pvd = run(
        "xorriso",
        &["-indev", path_str(&output.join("image.iso")), "-pvd_info"],
    );
    assert!(pvd.contains("Volume Id    : CDROM"), "{pvd}");

    let booted = boot(&output, "uefi", "pxe", 600);
    assert_eq!(booted.host, "vmic-pxe", "{booted:?}");
    let line = cmdline(&booted);
    assert!(
        booted.cmdline.iter().any(|arg| arg == "vmic.pxe=bootstrap"),
        "{line}"
    );
    assert!(booted.cmdline.contains(&url), "booted with the URL: {line}");
    assert!(booted.cmdline.iter().any(|arg| arg == "ip=dhcp"), "{line}");
    // The root came over the network: the LiveOS was fetched (livenet) and mounted from it.
    assert!(
        booted.cmdline.iter().any(|arg| arg == "rd.live.image"),
        "{line}"
    );
}

/// A `baseConfigs` chain of three files in `dir`, each level adding its own settings; the
/// top one asks for full-OS initrds. Returns the top file.
fn three_level_config(dir: &Path) -> PathBuf {
    write(
    dir,
    "grand.yaml",
    "os:\n  hostname: vmic-chain\niso:\n  kernelCommandLine:\n    extraCommandLine: [vmic.grand=1]\n",
);
    write(
    dir,
    "parent.yaml",
    "previewFeatures: [base-configs]\nbaseConfigs:\n  - path: grand.yaml\niso:\n  initramfsType: full-os\n  kernelCommandLine:\n    extraCommandLine: [vmic.parent=2]\npxe:\n  kernelCommandLine:\n    extraCommandLine: [vmic.pxe=full-os]\n",
);
    write(
    dir,
    "top.yaml",
    "previewFeatures: [base-configs]\nbaseConfigs:\n  - path: parent.yaml\niso:\n  kernelCommandLine:\n    extraCommandLine: [vmic.top=3]\n",
)
}

/// A full-OS ISO from a three-level config. (Its PXE tar is the next test: apart, the two run
/// beside each other.)
#[test]
fn a_full_os_iso_boots_from_a_three_level_config() {
    let image = test_image("x86_64", "minimal", false).join("disk.qcow2");
    let work = work_dir();
    let top = three_level_config(work.path());
    // The ISO: the whole OS is the initrd, no rootfs.img, no root= at all.
    let iso = work.path().join("full-os.iso");
    let built = customize_to("iso", &image, &top, &iso, None, &[]);
    must_succeed(&built, &iso);
    let listing = run(
        "xorriso",
        &["-indev", path_str(&iso), "-find", "/", "-type", "f"],
    );
    assert!(
        !listing.contains("rootfs.img"),
        "a full-OS ISO has no squashfs: {listing}"
    );
    let booted = boot(&iso, "uefi", "cdrom", 600);
    assert_eq!(
        booted.host, "vmic-chain",
        "the grand config's hostname: {booted:?}"
    );
    let line = cmdline(&booted);
    let at = |arg: &str| {
        booted
            .position(arg)
            .unwrap_or_else(|| panic!("{arg} in {line}"))
    };
    assert!(
        at("vmic.grand=1") < at("vmic.parent=2") && at("vmic.parent=2") < at("vmic.top=3"),
        "{line}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("root=")),
        0,
        "{line}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("rd.live")),
        0,
        "{line}"
    );
}

#[test]
fn a_full_os_pxe_tar_is_reproducible_and_boots() {
    let image = test_image("x86_64", "minimal", false).join("disk.qcow2");
    let work = work_dir();
    let top = three_level_config(work.path());
    // PXE artifacts as a tar: the same bytes from two builds in two build directories.
    let tar = work.path().join("full-os.tar.gz");
    let built = customize_to("pxe-tar", &image, &top, &tar, None, &[]);
    must_succeed(&built, &tar);
    let again = work.path().join("again.tar.gz");
    let rebuilt = customize_to("pxe-tar", &image, &top, &again, None, &[]);
    must_succeed(&rebuilt, &again);
    assert_eq!(
        sha256_of(&tar),
        sha256_of(&again),
        "two builds, one pxe-tar"
    );
    let names = run("tar", &["-tzf", path_str(&tar)]);
    assert!(
        !names.contains("image.iso"),
        "full-OS artifacts have no bootstrap ISO: {names}"
    );
    for file in ["bootx64.efi", "grubx64.efi", "boot/grub2/grub.cfg"] {
        assert!(names.lines().any(|name| name == file), "{file} in {names}");
    }
    let sums = fs_err::read_to_string(work.path().join("full-os.tar.gz.sha256")).expect("sidecar");
    assert!(sums.starts_with(&sha256_of(&tar)), "{sums}");

    let booted = boot(&tar, "uefi", "pxe", 600);
    assert_eq!(booted.host, "vmic-chain", "{booted:?}");
    let line = cmdline(&booted);
    assert!(
        booted.cmdline.iter().any(|arg| arg == "vmic.pxe=full-os"),
        "{line}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("root=")),
        0,
        "{line}"
    );
    assert!(
        !booted.cmdline.iter().any(|arg| arg.starts_with("vmic.top")),
        "pxe args, not iso: {line}"
    );
}

#[test]
fn an_aarch64_pxe_dir_boots_under_aavmf() {
    let image = test_image("aarch64", "minimal", false).join("disk.qcow2");
    let work = work_dir();
    let config = write(
        work.path(),
        "pxe.yaml",
        "os:\n  hostname: vmic-pxe-arm\npxe:\n  kernelCommandLine:\n    extraCommandLine: [vmic.pxe=aarch64]\n",
    );
    let output = work.path().join("artifacts");
    let built = customize_to("pxe-dir", &image, &config, &output, None, &[]);
    must_succeed(&built, &output);
    for file in ["bootaa64.efi", "grubaa64.efi", "boot/grub2/grub.cfg"] {
        assert!(output.join(file).is_file(), "{file} in the artifacts");
    }
    assert!(
        !output.join("image.iso").exists(),
        "full-os is the PXE default: no bootstrap ISO"
    );
    let booted = boot(&output, "uefi", "pxe", 1200);
    assert_eq!(booted.host, "vmic-pxe-arm", "{booted:?}");
    let line = cmdline(&booted);
    assert!(
        booted.cmdline.iter().any(|arg| arg == "vmic.pxe=aarch64"),
        "{line}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("root=")),
        0,
        "{line}"
    );
}

#[test]
fn pxe_artifacts_without_their_iso_server_are_refused_by_vmic_boot_with_the_port_named() {
    // vmic boot cannot serve a port that is taken: it says so before starting a VM.
    let work = work_dir();
    let dir = work.path().join("artifacts");
    fs_err::create_dir_all(dir.join("boot/grub2")).expect("dirs");
    fs_err::write(dir.join("bootx64.efi"), b"not really shim").expect("shim");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    fs_err::write(
        dir.join("boot/grub2/grub.cfg"),
        format!("linux /boot/vmlinuz root=live:http://10.0.2.2:{port}/image.iso ip=dhcp\n"),
    )
    .expect("grub.cfg");
    let output = common::vmic()
        .args(["boot", "--media", "pxe", "--timeout", "30", "--image-file"])
        .arg(&dir)
        .output()
        .expect("vmic boot");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    drop(busy);
}
