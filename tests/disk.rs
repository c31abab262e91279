//! `vmic customize` to disk images, end to end: every `os` customization applied by a real
//! builder VM, the output booted with `vmic boot`, and the evidence read from its console.
//!
//! `tests/fixtures/disk/full.yaml` installs `vmic-evidence.service`, which runs before the test
//! image's marker service and writes what the customizations did (`id`, `getent`, `stat`,
//! `systemctl is-enabled`, `/proc/modules`, the installed programs) to
//! `/etc/vmic-test/evidence`; the marker prints it to the serial console. Packages come from
//! a local directory of .debs fetched with `apt-get download` (see [`local_debs`]), with
//! `--disable-base-image-repos`, so the builder VM stays offline.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{assert_no_partial, boot, customize_to, path_str, run, test_image, work_dir, Booted};

/// What `local_debs` downloads: two programs and what `jq` needs beyond the test image.
const DEBS: [&str; 4] = ["hello", "jq", "libjq1", "libonig5"];

fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures/disk").join(name)
}

fn minimal_qcow2() -> PathBuf {
    test_image("x86_64", "minimal", false).join("disk.qcow2")
}

/// A directory of `arch` (`amd64`, `arm64`) .debs: `$VMIC_TEST_PACKAGES_DIR/ARCH` (filled by
/// `scripts/test`), else downloaded here once with `scripts/download-debs` (Debian 12, like the
/// test images; apt's own lists for `arch`, the host's apt left alone).
fn local_debs(arch: &str) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = std::env::var_os("VMIC_TEST_PACKAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-packages"))
        .join(arch);
    let _one_at_a_time = common::lock(&LOCK);
    let download = common::repo().join("scripts/download-debs");
    let mut args = vec![arch, path_str(&dir)];
    args.extend(DEBS);
    run(path_str(&download), &args);
    dir
}

/// A dnf repository of the test RPMs (`scripts/test-image/make-rpms`: each installs
/// `/etc/vmic-test/NAME`), made once per test binary run with the host's rpmbuild and
/// createrepo_c.
fn local_rpms() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-rpms");
        let _ = std::fs::remove_dir_all(&dir);
        let make_rpms = common::repo().join("scripts/test-image/make-rpms");
        run(
            path_str(&make_rpms),
            &["--repo", path_str(&dir), "vmic-rpm-hello", "vmic-rpm-tools"],
        );
        dir
    })
}

fn rpm_qcow2() -> PathBuf {
    test_image("x86_64", "rpm", false).join("disk.qcow2")
}

fn rpm_args() -> Vec<String> {
    vec![
        "--package-source".to_string(),
        path_str(local_rpms()).to_string(),
        "--disable-base-image-repos".to_string(),
    ]
}

/// `customize` to `format` that must succeed, leaving exactly the output.
fn build_disk(input: &Path, config: &Path, output: &Path, format: &str, extra: &[&str]) {
    let built = customize_to(format, input, config, output, None, extra);
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    assert!(output.is_file(), "{} was written", output.display());
    assert_no_partial(output);
    eprintln!("{format} output built in {:.1} s", built.seconds);
}

fn package_args() -> Vec<String> {
    package_args_for("amd64")
}

/// Offline: `arch`'s local .debs and nothing else.
fn package_args_for(arch: &str) -> Vec<String> {
    vec![
        "--package-source".to_string(),
        path_str(&local_debs(arch)).to_string(),
        "--disable-base-image-repos".to_string(),
    ]
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

/// `text` as the config file `name` in `dir`.
fn config_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::write(&config, text).expect("writing the config");
    config
}

/// The `password.value` of alice in full.yaml.
const ALICE_PASSWORD_HASH: &str = "$6$vmicsalt0123456$nSsIEjLabpKZ5VCIkRXDFzTp7zgVHjxZMyJIO9Hb/Mk.NUSPXsFfBRACmh9znYr9ASwAwSTXAQ.mQLWRrJMWH1";

/// `key=value` lines of the evidence file.
fn evidence<'a>(booted: &'a Booted, key: &str) -> &'a str {
    booted
        .file("evidence")
        .into_iter()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in the evidence: {:#?}", booted.files))
}

/// Everything `full.yaml` must show on the booted system.
fn assert_full_customization(booted: &Booted) {
    assert_os_customization(booted);
    assert_eq!(
        evidence(booted, "jq"),
        "7",
        "jq and its libraries installed"
    );
    assert_eq!(
        evidence(booted, "motd"),
        "from tests/fixtures/motd, named as ../motd",
        "a `../motd` source is the file beside the config directory, not the one inside it"
    );
}

/// What `full.yaml` shows but packages and files from outside its directory.
fn assert_os_customization(booted: &Booted) {
    assert_eq!(booted.host, "vmic-disk-test", "os.hostname");
    assert_eq!(
        evidence(booted, "id-alice"),
        "uid=1234(alice) gid=4321(vmic-team) groups=4321(vmic-team),100(users)",
        "uid, primaryGroup, secondaryGroups"
    );
    assert_eq!(
        evidence(booted, "passwd-alice"),
        "alice:x:1234:4321::/srv/alice:/bin/bash",
        "homeDirectory and startupCommand"
    );
    assert_eq!(
        evidence(booted, "shadow-alice"),
        ALICE_PASSWORD_HASH,
        "the hashed password is written as given, whole"
    );
    assert_eq!(evidence(booted, "shadow-bob"), "*", "a locked password");
    assert_eq!(evidence(booted, "group-team"), "vmic-team:x:4321:");
    assert_eq!(evidence(booted, "ssh-dir"), "700 alice:vmic-team");
    assert_eq!(evidence(booted, "ssh-keys"), "600 alice:vmic-team 1");
    assert_eq!(
        evidence(booted, "ssh-bob"),
        "bob@vmic-test",
        "sshPublicKeyPaths"
    );
    assert_eq!(evidence(booted, "enabled-evidence"), "enabled");
    assert_eq!(evidence(booted, "enabled-remote-fs"), "disabled");
    assert_eq!(
        evidence(booted, "module-loop"),
        "1 7",
        "loop loaded at boot with max_loop=7"
    );
    assert_eq!(evidence(booted, "modprobe-nlmon"), "blacklist nlmon");
    // Every modprobe.d file vmic writes (module-options-vmic.conf, then
    // modules-disabled-vmic.conf), ";" per line: nothing more than the config asked for.
    assert_eq!(
        evidence(booted, "module-options"),
        "options loop max_loop=7;blacklist nlmon;",
        "os.modules options and disable"
    );
    // A program of the test image itself: customizing leaves the image's packages alone.
    assert_eq!(
        evidence(booted, "zstd"),
        "/usr/bin/zstd",
        "the image's own zstd stays"
    );
    assert_eq!(
        evidence(booted, "tree"),
        "750 750 640 tree top",
        "additionalDirs with newDirPermissions and childFilePermissions"
    );
}

#[test]
fn x86_64_disk_outputs_carry_every_os_customization_and_boot() {
    let work = work_dir();
    let first = work.path().join("full.qcow2");
    build_disk(
        &minimal_qcow2(),
        &fixture("full.yaml"),
        &first,
        "qcow2",
        &args(&package_args()),
    );
    let info = run("qemu-img", &["info", "--output=json", path_str(&first)]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(
        !info.contains("backing-filename"),
        "the output stands alone: {info}"
    );
    let booted = boot(&first, "uefi", "disk", 300);
    assert_full_customization(&booted);
    assert_eq!(evidence(&booted, "hello"), "Hello, world!");
    let history = image_history(&first, "qcow2");
    assert_eq!(history.len(), 1, "one customization, one entry");
    let entry = &history[0];
    assert_eq!(entry["toolVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(entry["config"]["os"]["hostname"], "vmic-disk-test");
    assert_eq!(
        entry["config"]["os"]["users"][0]["password"]["value"],
        "[redacted]"
    );
    let text = entry.to_string();
    assert!(
        !text.contains(ALICE_PASSWORD_HASH),
        "no password in the history: {text}"
    );
    assert!(
        !text.contains("ssh-ed25519 "),
        "no key in the history: {text}"
    );

    // A second pass over the first output removes a package it installed.
    let second = work.path().join("removed.vhdx");
    build_disk(
        &first,
        &fixture("remove.yaml"),
        &second,
        "vhdx",
        &args(&package_args()),
    );
    let booted = boot(&second, "uefi", "disk", 300);
    assert!(
        evidence(&booted, "hello").contains("not found"),
        "hello was removed: {}",
        evidence(&booted, "hello")
    );
    assert_eq!(evidence(&booted, "jq"), "7", "the rest stays");
    let history = image_history(&second, "vhdx");
    assert_eq!(history.len(), 2, "the second customization appends");
    assert_eq!(
        history[0],
        image_history(&first, "qcow2")[0],
        "the first entry kept"
    );
    assert_eq!(
        history[1]["config"]["os"]["packages"]["remove"],
        serde_json::json!(["hello"])
    );
    assert_ne!(history[0]["imageUuid"], history[1]["imageUuid"]);
}

/// `/usr/share/image-customizer/history.json` of `disk`'s root file system: the Image
/// Customizer's history, one entry per customization.
fn image_history(disk: &Path, qemu_format: &str) -> Vec<serde_json::Value> {
    let text = root_file(
        disk,
        qemu_format,
        "/usr/share/image-customizer/history.json",
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("history.json: {e}: {text}"))
}

/// The aarch64 image with every os customization, packages from local arm64 .debs included
/// (offline, as on x86_64).
#[test]
fn aarch64_disk_output_carries_every_os_customization_and_boots() {
    let work = work_dir();
    let output = work.path().join("arm64.raw");
    let input = test_image("aarch64", "minimal", false).join("disk.qcow2");
    let mut extra = package_args_for("arm64");
    extra.extend(["--arch".to_string(), "aarch64".to_string()]);
    build_disk(&input, &fixture("full.yaml"), &output, "raw", &args(&extra));
    let booted = boot(&output, "uefi", "disk", 300);
    assert!(
        booted.cmdline.iter().any(|arg| arg.contains("arm64")),
        "an arm64 kernel booted: {:?}",
        booted.cmdline
    );
    assert_full_customization(&booted);
    assert_eq!(evidence(&booted, "hello"), "Hello, world!");
}

#[test]
fn the_same_config_as_an_iso_carries_the_same_customizations() {
    let work = work_dir();
    let iso = work.path().join("full.iso");
    let built = customize_to(
        "iso",
        &minimal_qcow2(),
        &fixture("full.yaml"),
        &iso,
        None,
        &args(&package_args()),
    );
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    let booted = boot(&iso, "uefi", "cdrom", 300);
    assert_full_customization(&booted);
    assert_eq!(evidence(&booted, "hello"), "Hello, world!");
}

/// Each disk format keeps the input's size and content; the raw output, booted, also proves
/// `os.bootloader.resetType: hard-reset` (the base image's kernel args gone, the config's
/// applied to the new grub.cfg).
#[test]
fn every_disk_format_is_written_and_a_boot_loader_reset_boots() {
    let virtual_size = |path: &Path, format: &str| -> u64 {
        let info = run(
            "qemu-img",
            &["info", "--output=json", "-f", format, path_str(path)],
        );
        let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
        info["virtual-size"].as_u64().expect("virtual-size")
    };
    let images = test_image("x86_64", "minimal", false);
    let work = work_dir();
    let config = config_file(
        work.path(),
        "hostname.yaml",
        "os:\n  hostname: vmic-format-test\n  bootloader:\n    resetType: hard-reset\n  \
         kernelCommandLine:\n    extraCommandLine: [vmic.reset=1, console=ttyS0]\n",
    );
    // Each output format from another input format: every format is read and written once
    // (the same disk in each file; `tests/iso.rs` also builds its ISO from the raw one).
    for (input, input_format, format, qemu_format) in [
        ("disk.raw", "raw", "raw", "raw"),
        ("disk.vhd", "vpc", "vhd", "vpc"),
        ("disk.vhdx", "vhdx", "vhd-fixed", "vpc"),
        ("disk.qcow2", "qcow2", "vhdx", "vhdx"),
    ] {
        let input = images.join(input);
        let expected = virtual_size(&input, input_format);
        let output = work.path().join(format!("out.{format}"));
        build_disk(&input, &config, &output, format, &[]);
        assert_eq!(
            virtual_size(&output, qemu_format),
            expected,
            "{format} from {} keeps the virtual size",
            input.display()
        );
        // Content, not just size: the customized root file system, read through the format.
        // (Two builds are never byte-identical, the mounts stamp the file systems, so the
        // outputs are not `qemu-img compare`d with each other.)
        assert_eq!(
            root_file(&output, qemu_format, "/etc/hostname"),
            "vmic-format-test\n",
            "{format} holds the customized disk"
        );
        if format == "vhd-fixed" {
            // A fixed VHD is the raw disk plus a 512-byte footer (what Azure requires).
            let length = std::fs::metadata(&output).expect("output").len();
            assert_eq!(length, expected + 512, "fixed VHD layout");
        }
        if qemu_format == "vhdx" {
            // The one of these formats with metadata for `qemu-img check` to verify.
            run("qemu-img", &["check", "-f", qemu_format, path_str(&output)]);
        }
        // Up to 1 GiB each, on a disk CI shares: only the raw one is kept, to boot.
        if format != "raw" {
            std::fs::remove_file(&output).expect("removing a checked output");
        }
    }
    let raw = work.path().join("out.raw");
    let grub_cfg = root_file(&raw, "raw", "/boot/grub2/grub.cfg");
    assert!(
        grub_cfg.starts_with("# Written by vmic for os.bootloader.resetType: hard-reset"),
        "{grub_cfg}"
    );
    let booted = boot(&raw, "uefi", "disk", 300);
    assert_eq!(booted.host, "vmic-format-test");
    // The test image's grub.cfg passes `rw console=ttyS0,115200 net.ifnames=0`: all gone.
    let cmdline = &booted.cmdline;
    assert!(
        cmdline.iter().any(|arg| arg == "vmic.reset=1"),
        "{cmdline:?}"
    );
    assert!(cmdline.iter().any(|arg| arg == "ro"), "{cmdline:?}");
    // (The config's `console=ttyS0` differs from the image's `console=ttyS0,115200`.)
    assert!(
        cmdline.iter().any(|arg| arg == "console=ttyS0"),
        "{cmdline:?}"
    );
    for gone in ["rw", "net.ifnames=0", "console=ttyS0,115200"] {
        assert!(
            !cmdline.iter().any(|arg| arg == gone),
            "{gone}: {cmdline:?}"
        );
    }
    assert!(
        cmdline.iter().any(|arg| arg.starts_with("root=UUID=")),
        "{cmdline:?}"
    );
}

/// A `customize` to `format` that must fail (exit 1) with each of `messages` in its stderr,
/// leaving no output, not even a partial one.
fn fails_with(input: &Path, config: &Path, format: &str, extra: &[&str], messages: &[&str]) {
    let work = work_dir();
    let output = work.path().join(format!("out.{format}"));
    let failed = customize_to(format, input, config, &output, None, extra);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    for message in messages {
        assert!(
            failed.stderr.contains(message),
            "{message:?} in:\n{}",
            failed.stderr
        );
    }
    assert!(!output.exists(), "no output after a failure");
    assert_no_partial(&output);
}

#[test]
fn a_missing_package_fails_with_the_package_managers_message() {
    fails_with(
        &minimal_qcow2(),
        &fixture("missing-package.yaml"),
        "qcow2",
        &args(&package_args()),
        // apt's own message, and the config section it failed in.
        &[
            "Unable to locate package vmic-no-such-package",
            "os.packages",
        ],
    );
}

/// The RPM family's path (the test image's rpm variant: Debian's rpm and dnf, no apt): dnf
/// removes an RPM the image has and installs two from a local repository, offline; the booted
/// system's `rpm -qa` and files show exactly that.
#[test]
fn rpm_packages_are_installed_and_removed_with_dnf_and_boot() {
    let work = work_dir();
    let config = config_file(work.path(), "rpm.yaml", "os:\n  hostname: vmic-rpm-test\n  packages:\n    remove: [vmic-rpm-preinstalled]\n    install: [vmic-rpm-hello, vmic-rpm-tools]\n");
    let input = rpm_qcow2();
    let manifest = common::manifest(&test_image("x86_64", "rpm", false));
    assert_eq!(
        manifest["rpms"],
        serde_json::json!(["vmic-rpm-preinstalled-1.0-1.noarch"]),
        "the input has the RPM the config removes"
    );
    let output = work.path().join("rpm.qcow2");
    build_disk(&input, &config, &output, "qcow2", &args(&rpm_args()));
    let booted = boot(&output, "uefi", "disk", 300);
    assert_eq!(booted.host, "vmic-rpm-test");
    assert_eq!(
        booted.rpms,
        ["vmic-rpm-hello-1.0-1.noarch", "vmic-rpm-tools-1.0-1.noarch"],
        "rpm -qa on the booted system: the two installed, the image's own one removed"
    );
    assert_eq!(booted.file("vmic-rpm-hello"), ["vmic-rpm-hello 1.0"]);
    assert_eq!(booted.file("vmic-rpm-tools"), ["vmic-rpm-tools 1.0"]);
    assert!(
        booted.file("vmic-rpm-preinstalled").is_empty(),
        "the removed package's file is gone: {:?}",
        booted.files
    );
}

#[test]
fn a_missing_rpm_fails_with_dnfs_own_message() {
    let work = work_dir();
    let config = config_file(
        work.path(),
        "missing.yaml",
        "os:\n  packages:\n    install: [vmic-rpm-hello, vmic-no-such-rpm]\n",
    );
    fails_with(
        &rpm_qcow2(),
        &config,
        "qcow2",
        &args(&rpm_args()),
        &[
            // dnf's own message, the command as run, the config section it failed in.
            "Error: Unable to find a match: vmic-no-such-rpm",
            "`dnf -y --disablerepo=* --enablerepo=vmic-local-0 install vmic-rpm-hello vmic-no-such-rpm` failed",
            "os.packages",
        ],
    );
}

#[test]
fn selinux_enforcing_needs_a_policy_in_the_image() {
    let work = work_dir();
    let config = config_file(
        work.path(),
        "selinux.yaml",
        "os:\n  selinux:\n    mode: enforcing\n",
    );
    fails_with(
        &minimal_qcow2(),
        &config,
        "raw",
        &[],
        &["the image has no SELinux policy installed"],
    );
}

/// What a postCustomization script in the networked build tries against the host: a listener
/// on the host's 127.0.0.1, through slirp's gateway address and through vmic's proxy.
const REACH_THE_HOST: &str = r#"
try() { # name, then a bash command; prints "probe NAME: RESULT"
  if result=$(timeout 10 bash -c "$2" 2>&1); then echo "probe $1: ${result:-connected}"; else echo "probe $1: failed"; fi
}
# A request to the proxy the agent relays on 127.0.0.1:3128; prints the status line.
ask='ask() { exec 3<>/dev/tcp/127.0.0.1/3128 || exit 1; printf "%s\r\n\r\n" "$1" >&3; head -n 1 <&3 | tr -d "\r"; }'
try gateway "exec 3<>/dev/tcp/10.0.2.2/PORT"
try host-dns "exec 3<>/dev/tcp/10.0.2.3/53"
try connect-loopback "$ask; ask 'CONNECT 127.0.0.1:PORT HTTP/1.1'"
try get-loopback "$ask; ask 'GET http://127.0.0.1:PORT/ HTTP/1.1'"
try get-localhost "$ask; ask 'GET http://localhost:PORT/ HTTP/1.1'"
try connect-gateway "$ask; ask 'CONNECT 10.0.2.2:PORT HTTP/1.1'"
try connect-metadata "$ask; ask 'CONNECT 169.254.169.254:80 HTTP/1.1'"
"#;

/// A build that installed `tree` with apt from the image's own repositories, through the
/// proxy vmic runs on the host (the builder VM has no NIC).
fn installed_tree_through_the_proxy(built: &common::Customized) {
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    for line in ["through vmic's proxy", "apt-get -y -q install tree"] {
        assert!(
            built.stderr.contains(line),
            "{line:?} in:\n{}",
            built.stderr
        );
    }
}

#[test]
fn packages_from_the_images_own_repositories_use_a_network() {
    // The host service a hostile image would like to reach: it must record nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("host listener");
    let port = listener.local_addr().expect("address").port().to_string();
    let work = work_dir();
    let config = work.path().join("tree.yaml");
    let script = REACH_THE_HOST.replace("PORT", &port);
    let indented: String = script
        .trim_start()
        .lines()
        .map(|line| format!("      {line}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "os:\n  packages:\n    install: [tree]\nscripts:\n  postCustomization:\n  - name: reach-the-host\n    content: |\n{indented}"
        ),
    )
    .expect("config");
    let output = work.path().join("out.qcow2");
    let built = customize_to("qcow2", &minimal_qcow2(), &config, &output, None, &[]);
    installed_tree_through_the_proxy(&built);
    // The builder VM has no NIC: the gateway and slirp's DNS are not even routable.
    for probe in ["gateway", "host-dns"] {
        assert!(
            built.stderr.contains(&format!("probe {probe}: failed")),
            "{probe}: {}",
            built.stderr
        );
    }
    // The proxy answers every attempt on the host's own addresses with a refusal.
    for probe in [
        "connect-loopback",
        "get-loopback",
        "get-localhost",
        "connect-gateway",
        "connect-metadata",
    ] {
        assert!(
            built
                .stderr
                .contains(&format!("probe {probe}: HTTP/1.1 403 vmic refused")),
            "{probe}: {}",
            built.stderr
        );
    }
    listener.set_nonblocking(true).expect("nonblocking");
    let mut reached = 0;
    while listener.accept().is_ok() {
        reached += 1;
    }
    assert_eq!(
        reached, 0,
        "nothing in the guest reached the host's listener"
    );
    // The package is in the output, installed as far as dpkg is concerned.
    let status = root_file(&output, "qcow2", "/var/lib/dpkg/status");
    assert!(
        status.contains("Package: tree\nStatus: install ok installed\n"),
        "tree is installed in the output"
    );
    let tree = run_debugfs(&output, "qcow2", "stat /usr/bin/tree");
    assert!(tree.contains("Type: regular"), "/usr/bin/tree: {tree}");
}

/// The aarch64 image's own repositories (Debian's), reached through vmic's proxy by the arm64
/// agent and apt: `tree` is in the output's dpkg database, is an AArch64 executable, and runs on
/// the booted output (a unit from the config records `tree --version` for the marker).
#[test]
fn aarch64_packages_from_the_images_own_repositories_use_a_network() {
    let work = work_dir();
    let config = config_file(work.path(), "tree.yaml", TREE_ON_BOOT);
    let image = test_image("aarch64", "minimal", false);
    let output = work.path().join("arm64-tree.qcow2");
    let built = customize_to(
        "qcow2",
        &image.join("disk.qcow2"),
        &config,
        &output,
        None,
        &["--arch", "aarch64"],
    );
    installed_tree_through_the_proxy(&built);
    let status = run_debugfs_of(&image, &output, "qcow2", "cat /var/lib/dpkg/status");
    let tree = status
        .split("\n\n")
        .find(|stanza| stanza.starts_with("Package: tree\n"))
        .unwrap_or_else(|| panic!("tree in the output's dpkg status"));
    assert!(tree.contains("\nStatus: install ok installed\n"), "{tree}");
    assert!(tree.contains("\nArchitecture: arm64\n"), "{tree}");
    let binary = work.path().join("tree");
    run_debugfs_of(
        &image,
        &output,
        "qcow2",
        &format!("dump /usr/bin/tree {}", path_str(&binary)),
    );
    let elf = std::fs::read(&binary).expect("the dumped /usr/bin/tree");
    // ELF e_machine (bytes 18-19, little-endian): 183 is EM_AARCH64.
    assert_eq!(elf.get(..4), Some(&b"\x7fELF"[..]), "an ELF file");
    assert_eq!(
        elf.get(18..20),
        Some(&[183u8, 0][..]),
        "an AArch64 executable"
    );
    let booted = boot(&output, "uefi", "disk", 300);
    let version = booted.file("tree");
    assert!(
        version.len() == 1 && version[0].starts_with("tree v"),
        "tree runs on the booted aarch64 output: {:?}",
        booted.files
    );
}

/// `tree` from the image's repositories, and a unit that runs it on the booted system before
/// the marker prints `/etc/vmic-test/*`.
const TREE_ON_BOOT: &str = "os:
  packages:
    install: [tree]
  additionalFiles:
  - destination: /etc/systemd/system/vmic-tree.service
    content: |
      [Unit]
      Description=vmic disk tests: record tree's version for the marker service
      Before=vmic-test-marker.service
      [Service]
      Type=oneshot
      ExecStart=/bin/sh -c 'tree --version > /etc/vmic-test/tree 2>&1'
      [Install]
      WantedBy=multi-user.target
  services:
    enable: [vmic-tree.service]
";

/// Output of debugfs `request` on the root file system of `disk` (`qemu_format`, made from the
/// x86_64 minimal test image, whose partition table the manifest gives), read on the host.
fn run_debugfs(disk: &Path, qemu_format: &str, request: &str) -> String {
    let image = test_image("x86_64", "minimal", false);
    run_debugfs_of(&image, disk, qemu_format, request)
}

/// [`run_debugfs`] for a disk made from the test image `image` (its directory).
fn run_debugfs_of(image: &Path, disk: &Path, qemu_format: &str, request: &str) -> String {
    let work = work_dir();
    let raw = work.path().join("disk.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            qemu_format,
            "-O",
            "raw",
            path_str(disk),
            path_str(&raw),
        ],
    );
    let manifest = common::manifest(image);
    let root = manifest["disk"]["partitions"]
        .as_array()
        .expect("partitions in the manifest")
        .iter()
        .find(|partition| partition["mountpoint"] == "/")
        .expect("a root partition");
    let offset = root["start_sector"].as_u64().expect("start_sector") * 512;
    // e2fsprogs opens "FILE?offset=N" as the file system starting N bytes into FILE.
    // In /usr/sbin, which an unprivileged user's PATH may not hold (scripts/test-unprivileged).
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .unwrap_or("debugfs");
    run(
        debugfs,
        &[
            "-R",
            request,
            &format!("{}?offset={offset}", path_str(&raw)),
        ],
    )
}

/// A file of the root file system of `disk` (see [`run_debugfs`]).
fn root_file(disk: &Path, qemu_format: &str, path: &str) -> String {
    run_debugfs(disk, qemu_format, &format!("cat {path}"))
}
