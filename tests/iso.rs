//! `vmic customize --output-image-format iso` end to end: real builder VMs make LiveOS ISOs from
//! the test images of `scripts/make-test-image`, and `vmic boot` boots them.
//!
//! What a booted ISO shows comes from the test image's marker service, which prints
//! `VMIC-TEST-BOOTED host=… cmdline=…` and every line of `/etc/vmic-test/*` to the serial
//! console. The configs under `tests/fixtures/iso/` add `vmic-probe.service`, which runs before
//! the marker and records facts of the running LiveOS (`/etc/fstab` absent, the file from
//! `iso.additionalFiles` under `/run/initramfs/live/`, ...) in `/etc/vmic-test/probe`.
//!
//! Every customize run goes through [`customize`], which checks that the input file is
//! byte-for-byte unchanged afterwards. A VM shares the machine with at most one other test's
//! ([`common::vm_slot`]); the ISO of `live.yaml` from the x86_64 qcow2 image is built once and
//! shared by the tests that boot it in several ways or re-customize it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{
    assert_no_partial, boot, customize_to, manifest, path_str, run, sha256_of, test_image,
    work_dir, Booted, Customized,
};

/// Agent log lines that exist only when dracut and mksquashfs ran (guest-agent/src/iso.rs).
const DRACUT_AND_MKSQUASHFS_RAN: &str = "dracut took ";
const SQUASHFS_COMPRESSION_CHOSEN: &str = "squashfs compression: ";

/// The ISO args of `live.yaml`, which must end the kernel command line in this order.
const LIVE_ISO_ARGS: [&str; 2] = ["vmic.first=1", "vmic.second=2"];

fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures").join(name)
}

/// `vmic customize` to an ISO (see [`customize_to`]).
fn customize(
    input: &Path,
    config: &Path,
    output: &Path,
    build_dir: Option<&Path>,
    extra: &[&str],
) -> Customized {
    customize_to("iso", input, config, output, build_dir, extra)
}

/// `customize` that must succeed and leave exactly the output behind.
fn build_iso(input: &Path, config: &Path, output: &Path, extra: &[&str]) -> Customized {
    let built = customize(input, config, output, None, extra);
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    assert!(output.is_file(), "{} was written", output.display());
    assert_no_partial(output);
    let pvd = run("xorriso", &["-indev", path_str(output), "-pvd_info"]);
    assert!(pvd.contains("Volume Id    : CDROM"), "{pvd}");
    let eltorito = run(
        "xorriso",
        &["-indev", path_str(output), "-report_el_torito", "plain"],
    );
    assert!(eltorito.contains("UEFI  y"), "UEFI El Torito: {eltorito}");
    built
}

/// `customize` that must fail with `code`, leaving no output and no partial output.
fn fail_iso(input: &Path, config: &Path, code: i32, extra: &[&str]) -> String {
    let work = work_dir();
    let output = work.path().join("out.iso");
    let failed = customize(input, config, &output, None, extra);
    assert_eq!(
        failed.code,
        Some(code),
        "customize exits {code}:\n{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("error: "),
        "an error is reported:\n{}",
        failed.stderr
    );
    assert!(!output.exists(), "no output is left after a failure");
    assert_no_partial(&output);
    eprintln!("{}", failed.stderr);
    failed.stderr
}

#[test]
fn a_kernel_message_inside_a_marker_line_is_cut_out() {
    let console = "VMIC-TEST-BOOTED host=h cmdline=a b\n\
                   VMIC-TEST-FIRMWARE firmware=bios secureboot=unsupported\n\
                   VMIC-TEST-FILE /etc/vmic-test/probe: boot-entrie[   16.592963] kvm: Nested Virtualization enabled\n\
                   s=0\n\
                   [   17.000001] a message on its own line\n\
                   VMIC-TEST-END\n";
    let booted = common::parse_marker(console).expect("marker parsed");
    assert_eq!(booted.probe("boot-entries"), Some("0"));
    assert_eq!(booted.cmdline, ["a", "b"]);
    assert_eq!(
        (booted.firmware.as_str(), booted.secureboot.as_str()),
        ("bios", "unsupported")
    );
    // Seen on a BIOS boot: two messages in a row inside the marker's line; the second, on a
    // line of its own, once stayed joined to it (`rd.live.check[   49.527880] SVM: ...`).
    let two = "VMIC-TEST-BOOTED host=h cmdline=a rd.live.check[   49.527870] kvm: one\n\
               [   49.527880] SVM: kvm: Nested Paging enabled\n\
               \n\
               VMIC-TEST-FIRMWARE firmware=bios secureboot=unsupported\n\
               VMIC-TEST-END\n";
    let booted = common::parse_marker(two).expect("marker parsed");
    assert_eq!(booted.cmdline, ["a", "rd.live.check"]);
    // A marker without the firmware line (an image from before it existed) proves nothing.
    let no_firmware = console.replace(
        "VMIC-TEST-FIRMWARE firmware=bios secureboot=unsupported\n",
        "",
    );
    assert!(
        common::parse_marker(&no_firmware).is_none(),
        "{no_firmware}"
    );
}

/// Everything `live.yaml` must show on a booted ISO; `iso_args` are the ISO's user args, which
/// end the command line in order.
fn assert_live_iso(booted: &Booted, iso_args: &[&str]) {
    let cmdline = booted.cmdline.join(" ");
    assert_eq!(booted.host, "vmic-iso-test", "os.hostname applies");
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("root=live:")),
        1,
        "one live root: {cmdline}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("root=")),
        1,
        "the image's root= is replaced: {cmdline}"
    );
    for arg in ["rd.live.image", "selinux=0", "vmic.os=1"] {
        assert_eq!(booted.count_arg(|a| a == arg), 1, "{arg} once: {cmdline}");
    }
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("rd.live.dir=")),
        1,
        "{cmdline}"
    );
    assert_eq!(
        booted.count_arg(|arg| arg.starts_with("enforcing=") || arg.starts_with("security=")),
        0,
        "{cmdline}"
    );
    let last = &booted.cmdline[booted.cmdline.len().saturating_sub(iso_args.len())..];
    assert_eq!(
        last, iso_args,
        "the ISO's user args come last, in order: {cmdline}"
    );
    let os_arg = booted.position("vmic.os=1").expect("os arg present");
    let live_arg = booted.position("rd.live.image").expect("live arg present");
    let first_iso_arg = booted.position(iso_args[0]).expect("ISO arg present");
    assert!(
        os_arg < first_iso_arg && live_arg < first_iso_arg,
        "os and LiveOS args come before the ISO args: {cmdline}"
    );
    assert_eq!(
        booted.file("os-extra"),
        ["from os.additionalFiles"],
        "os.additionalFiles: {booted:?}"
    );
    assert_eq!(booted.file("image"), ["variant=minimal"], "{booted:?}");
    assert_eq!(booted.probe("fstab"), Some("absent"), "{booted:?}");
    assert_eq!(
        booted.probe("live-file"),
        Some("from iso.additionalFiles"),
        "iso.additionalFiles under /run/initramfs/live/: {booted:?}"
    );
    assert_eq!(
        booted.probe("boot-entries"),
        Some("0"),
        "rootfs.img has no /boot: {booted:?}"
    );
    assert_eq!(booted.probe("root-fstype"), Some("overlay"), "{booted:?}");
}

/// The x86_64 qcow2 image with `live.yaml` as an ISO, built once for all the tests that use it:
/// its path, the build's seconds per `--timestamp-file` and its stderr.
fn shared_live_iso() -> &'static (PathBuf, f64, String) {
    static ISO: OnceLock<(PathBuf, f64, String)> = OnceLock::new();
    ISO.get_or_init(|| {
        let image = test_image("x86_64", "minimal", false);
        // Kept for the whole test process; replaced by the next run.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("iso-tests/shared");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the shared ISO's dir");
        let iso = dir.join("live-qcow2.iso");
        // The build cache of this test process, empty now: this build stores its ISO there
        // for `a_rebuild_with_only_iso_changes_reuses_the_cached_build`.
        let cache = shared_cache_dir();
        let built = build_iso(
            &image.join("disk.qcow2"),
            &fixture("iso/live.yaml"),
            &iso,
            &["--cache-dir", path_str(&cache)],
        );
        assert!(
            built
                .stderr
                .contains("build cache: miss (no cached build of this input)"),
            "{}",
            built.stderr
        );
        assert!(
            built.stderr.contains("build cache: stored"),
            "{}",
            built.stderr
        );
        // dracut took its ldd from DRACUT_LDD: vmic-ldd, which traced the ELF files itself.
        let traced = logged_count(&built.stderr, "vmic-ldd traced ");
        assert!(
            traced >= 50,
            "vmic-ldd traced {traced} files: {}",
            built.stderr
        );
        // dracut ran dracut-install through vmic's wrapper: the preload library answered its
        // clone requests, so its copies were made without a `cp` process each.
        let copied = logged_count(&built.stderr, "dracut-install copied ");
        assert!(
            copied >= 200,
            "dracut-install copied {copied} files itself: {}",
            built.stderr
        );
        let steps = &built.timestamps["steps"];
        eprintln!(
            "live ISO from qcow2: {:.1} s wall, {:.1} s total per --timestamp-file, steps {steps}",
            built.seconds,
            built.total_seconds()
        );
        (iso, built.total_seconds(), built.stderr)
    })
}

/// The number after `prefix` in a build's log.
fn logged_count(log: &str, prefix: &str) -> usize {
    log.split(prefix)
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}N` in the log: {log}"))
}

/// The build cache the shared ISO's build fills (inside its directory, so new each run).
fn shared_cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("iso-tests/shared/cache")
}

/// A rebuild of the same disk whose config differs only in its `iso` section (edited in place,
/// as a user iterating would) hits the cache: no customization, dracut or mksquashfs, the same
/// `rootfs.img`, at most a quarter of the first build's time, and the ISO boots with the new
/// `iso` settings only (the cached ISO's args and file are gone).
#[test]
fn a_rebuild_with_only_iso_changes_reuses_the_cached_build() {
    let (shared, full_seconds, _) = shared_live_iso();
    let work = work_dir();
    let config_dir = work.path().join("iso");
    run(
        "cp",
        &["-a", path_str(&fixture("iso")), path_str(&config_dir)],
    );
    let config = config_dir.join("live.yaml");
    let text = std::fs::read_to_string(&config).expect("live.yaml");
    let (os_and_scripts, _) = text.split_once("\niso:\n").expect("an iso section");
    std::fs::write(
        &config,
        format!(
            "{os_and_scripts}\niso:\n  additionalFiles:\n    files/iso-extra-2.txt: /iso-extra-2.txt\n  \
             kernelCommandLine:\n    extraCommandLine: [vmic.third=3]\n"
        ),
    )
    .expect("editing the iso section");
    let output = work.path().join("cached.iso");
    let cache = shared_cache_dir();
    let image = test_image("x86_64", "minimal", false).join("disk.qcow2");
    let rebuilt = build_iso(&image, &config, &output, &["--cache-dir", path_str(&cache)]);
    assert!(
        rebuilt.stderr.contains("build cache: hit"),
        "{}",
        rebuilt.stderr
    );
    // The host checked the cached ISO whole, so the builder VM did not hash its rootfs.img.
    assert!(
        rebuilt
            .stderr
            .contains("rootfs.img: the host checked the cached ISO it comes from"),
        "{}",
        rebuilt.stderr
    );
    for evidence in [
        DRACUT_AND_MKSQUASHFS_RAN,
        SQUASHFS_COMPRESSION_CHOSEN,
        "running script",
    ] {
        assert!(
            !rebuilt.stderr.contains(evidence),
            "a hit neither customizes nor runs dracut or mksquashfs ({evidence:?}):\n{}",
            rebuilt.stderr
        );
    }
    assert_eq!(
        rootfs_sha256(&output),
        rootfs_sha256(shared),
        "the cached rootfs.img"
    );
    eprintln!(
        "cache hit in {:.1} s ({:.1} s per --timestamp-file) vs {full_seconds:.1} s for the full build",
        rebuilt.seconds,
        rebuilt.total_seconds()
    );
    // How fast a hit is, is `scripts/bench-iso`'s to measure (its vmic-rebuild row); a timed
    // assertion here failed on a loaded machine while the hit itself was right. That no work
    // was redone is checked above by what the agent logged and the rootfs.img digest.
    // The provenance still names the disk image, not the cached ISO.
    let provenance = read_json(&sidecar(&output, ".provenance.json"));
    assert_eq!(provenance["input"]["sha256"], sha256_of(&image));
    let booted = boot(&output, "uefi", "cdrom", 600);
    assert_eq!(booted.host, "vmic-iso-test", "the cached customization");
    assert_eq!(
        booted.cmdline.last().map(String::as_str),
        Some("vmic.third=3"),
        "{booted:?}"
    );
    for old in LIVE_ISO_ARGS {
        assert_eq!(
            booted.count_arg(|arg| arg == old),
            0,
            "{old} is gone: {booted:?}"
        );
    }
    assert_eq!(booted.count_arg(|arg| arg == "vmic.os=1"), 1, "{booted:?}");
    assert_eq!(booted.probe("live-file"), Some("missing"), "{booted:?}");
    assert_eq!(
        booted.probe("live-file-2"),
        Some("added by a later iso-only change"),
        "{booted:?}"
    );
}

/// `rootfs.img` of an ISO, extracted on the host with xorriso.
fn rootfs_sha256(iso: &Path) -> String {
    let work = work_dir();
    let rootfs = work.path().join("rootfs.img");
    extract(iso, "/liveos/rootfs.img", &rootfs);
    sha256_of(&rootfs)
}

/// Boot `image` and check it is the shared ISO's LiveOS, started by `firmware`.
fn boots_as_the_live_iso(image: &Path, firmware: &str, media: &str) {
    let booted = boot(image, firmware, media, 600);
    assert_eq!(booted.firmware, firmware, "{booted:?}");
    assert_live_iso(&booted, &LIVE_ISO_ARGS);
}

// The shared ISO booted three ways, one test each: apart, they run beside other tests' VMs.
#[test]
fn x86_64_qcow2_to_iso_boots_under_uefi() {
    boots_as_the_live_iso(&shared_live_iso().0, "uefi", "cdrom");
}

#[test]
fn x86_64_qcow2_to_iso_boots_under_bios() {
    boots_as_the_live_iso(&shared_live_iso().0, "bios", "cdrom");
}

/// As `dd` to a USB stick would: the ISO at the start of a bigger disk.
#[test]
fn x86_64_qcow2_to_iso_boots_from_a_disk() {
    let work = work_dir();
    let disk = work.path().join("usb.raw");
    std::fs::copy(&shared_live_iso().0, &disk).expect("copying the ISO to a disk file");
    run("truncate", &["-s", "1G", path_str(&disk)]);
    boots_as_the_live_iso(&disk, "uefi", "disk");
}

/// The sidecar `suffix` (`.sha256`, `.spdx.json`, `.provenance.json`) beside `output`.
fn sidecar(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output.file_name().expect("a file name").to_os_string();
    name.push(suffix);
    output.with_file_name(name)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reproducible, whatever file holds the disk: the test image's raw file holds the same disk
/// as its qcow2, and built in a build directory of its own with no epoch given (it comes from
/// the image) it gives the shared qcow2 ISO byte for byte, records included. The shared ISO
/// was booted under UEFI, BIOS and from a disk: these are the same bytes, so booting them again
/// would prove nothing more. (vhd and vhdx inputs: `tests/disk.rs`, which reads every format.)
#[test]
fn the_same_disk_as_raw_gives_the_same_iso_byte_for_byte() {
    let (shared, _, _) = shared_live_iso();
    let image = test_image("x86_64", "minimal", false);
    let shared_provenance = read_json(&sidecar(shared, ".provenance.json"));
    let (file, format) = ("disk.raw", "raw");
    let work = work_dir();
    // The shared ISO's file name: `.sha256` and the SBOM name the file.
    let iso = work.path().join(shared.file_name().expect("a file name"));
    build_iso(&image.join(file), &fixture("iso/live.yaml"), &iso, &[]);
    assert_eq!(
        sha256_of(&iso),
        sha256_of(shared),
        "{file} gives the qcow2's ISO, bit for bit"
    );
    for suffix in [".sha256", ".spdx.json"] {
        assert_eq!(
            std::fs::read(sidecar(&iso, suffix)).expect("record"),
            std::fs::read(sidecar(shared, suffix)).expect("shared record"),
            "OUTPUT{suffix} of {file} is the qcow2's"
        );
    }
    // The provenance differs in what names the input file, and only there.
    let mut provenance = read_json(&sidecar(&iso, ".provenance.json"));
    assert_eq!(provenance["input"]["format"], format, "{provenance}");
    assert_eq!(
        provenance["input"]["sha256"],
        sha256_of(&image.join(file)),
        "{provenance}"
    );
    let mut expected = shared_provenance.clone();
    for record in [&mut provenance, &mut expected] {
        record["input"] = serde_json::Value::Null;
    }
    assert_eq!(provenance, expected, "{file}: the rest of the provenance");
}

/// Extract `path` of the ISO to `to` with xorriso.
fn extract(iso: &Path, path: &str, to: &Path) {
    run(
        "xorriso",
        &[
            "-osirrox",
            "on",
            "-indev",
            path_str(iso),
            "-extract",
            path,
            path_str(to),
        ],
    );
}

/// Every date vmic sets on an ISO is `epoch`: the volume's creation and modification dates
/// (ISO 9660 primary volume descriptor), the squashfs' mkfs time, the settings record's date.
fn assert_dated(iso: &Path, epoch: u64) {
    use std::io::{Read, Seek, SeekFrom};
    // `date` renders the expected text, independently of vmic's own date code.
    let expected = run("date", &["-u", "-d", &format!("@{epoch}"), "+%Y%m%d%H%M%S"]);
    let expected = expected.trim();
    let mut pvd = [0u8; 2048];
    let mut file = std::fs::File::open(iso).expect("open the ISO");
    file.seek(SeekFrom::Start(16 * 2048)).expect("seek");
    file.read_exact(&mut pvd)
        .expect("the primary volume descriptor");
    assert_eq!(&pvd[1..6], b"CD001", "a primary volume descriptor");
    // ECMA-119 8.4.26-27: creation at 813, modification at 830, "YYYYMMDDHHMMSScc" + zone.
    for (what, offset) in [("creation", 813), ("modification", 830)] {
        let date = String::from_utf8_lossy(&pvd[offset..offset + 14]);
        assert_eq!(date, expected, "the volume's {what} date is the epoch");
    }
    let work = work_dir();
    let rootfs = work.path().join("rootfs.img");
    extract(iso, "/liveos/rootfs.img", &rootfs);
    let mut superblock = [0u8; 12];
    std::fs::File::open(&rootfs)
        .and_then(|mut f| f.read_exact(&mut superblock))
        .expect("the squashfs superblock");
    assert_eq!(&superblock[..4], b"hsqs", "rootfs.img is a squashfs");
    let mkfs_time = u32::from_le_bytes(superblock[8..12].try_into().expect("4 bytes"));
    assert_eq!(u64::from(mkfs_time), epoch, "the squashfs' mkfs time");
    let record = work.path().join("iso-settings.json");
    extract(iso, "/vmic/iso-settings.json", &record);
    assert_eq!(read_json(&record)["created_unix_seconds"], epoch);
}

/// Exit code of `checkisomd5` on `iso`, and its output.
fn checkisomd5(iso: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new("checkisomd5")
        .arg(iso)
        .output()
        .expect("running checkisomd5 (package isomd5sum, installed by scripts/setup)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Byte offset of `/liveos/rootfs.img`'s data in `iso`, from xorriso's own layout report.
fn rootfs_offset(iso: &Path) -> u64 {
    let report = run(
        "xorriso",
        &[
            "-indev",
            path_str(iso),
            "-find",
            "/liveos/rootfs.img",
            "-exec",
            "report_lba",
        ],
    );
    let line = report
        .lines()
        .find(|line| line.starts_with("File data lba:") && line.contains("/liveos/rootfs.img"))
        .unwrap_or_else(|| panic!("no rootfs.img extent in:\n{report}"));
    let lba: u64 = line["File data lba:".len()..]
        .split(',')
        .nth(1)
        .and_then(|field| field.trim().parse().ok())
        .unwrap_or_else(|| panic!("no start LBA in {line:?}"));
    lba * 2048
}

/// A copy of `iso` at `to` with one byte inside `rootfs.img`'s data inverted.
fn copy_with_rootfs_byte_flipped(iso: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    std::fs::copy(iso, to).expect("copy of the ISO");
    let offset = rootfs_offset(to) + 4096;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(to)
        .expect("open the copy");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read");
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset).expect("write");
}

/// A vmic ISO whose `rootfs.img` was changed after vmic made it (its record unchanged) is
/// refused when re-mastered: the record's sha256 vouches for the root file system it keeps.
#[test]
fn a_vmic_iso_whose_rootfs_was_altered_is_refused() {
    let (shared, _, _) = shared_live_iso();
    let work = work_dir();
    let forged = work.path().join("forged.iso");
    copy_with_rootfs_byte_flipped(shared, &forged);
    let stderr = fail_iso(&forged, &fixture("iso/remaster.yaml"), 1, &[]);
    assert!(
        stderr.contains("/liveos/rootfs.img on the input ISO does not match its settings record"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the ISO was changed after vmic made it"),
        "{stderr}"
    );
}

/// The installed packages of the ISO's root file system as dpkg itself lists them, read from
/// rootfs.img with unsquashfs and dpkg-query: independent of vmic's reading in the VM.
fn dpkg_packages(iso: &Path, work: &Path) -> Vec<(String, String)> {
    let root = work.join("rootfs");
    unsquash(iso, work, &root, &["var/lib/dpkg/status"]);
    let admin = root.join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).expect("dpkg admin dir");
    let listed = run(
        "dpkg-query",
        &[
            &format!("--admindir={}", path_str(&admin)),
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${binary:Package}\t${Version}\n",
        ],
    );
    let mut packages: Vec<(String, String)> = listed
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let status = fields.next()?;
            // `ii`, `hi`: installed; `rc` and half-installed states are not.
            // binary:Package adds `:arch` to foreign and Multi-Arch: same packages only.
            let name = fields.next()?.split(':').next()?.to_string();
            let version = fields.next()?.to_string();
            (status.chars().nth(1) == Some('i')).then_some((name, version))
        })
        .collect();
    packages.sort();
    packages
}

/// The shared ISO checks itself (`OUTPUT.sha256`, the implanted MD5 that one flipped byte
/// breaks, a "Check the medium and boot" entry), is dated by the image's epoch, and carries a
/// valid SPDX 2.3 SBOM listing exactly the packages dpkg lists, and its provenance.
#[test]
fn the_shared_iso_checks_itself_and_lists_its_packages() {
    let (iso, _, _) = shared_live_iso();
    let work = work_dir();
    let provenance = read_json(&sidecar(iso, ".provenance.json"));
    let epoch = provenance["source_date_epoch"]
        .as_u64()
        .expect("the provenance records the epoch");
    assert_eq!(provenance["source_date_epoch_from"], "input");
    assert!(
        epoch > 1_000_000_000,
        "the image's os-release mtime: {epoch}"
    );
    assert_dated(iso, epoch);

    let dir = iso.parent().expect("a parent");
    let name = iso.file_name().expect("a name").to_string_lossy();
    let status = std::process::Command::new("sha256sum")
        .args(["--check", "--strict", &format!("{name}.sha256")])
        .current_dir(dir)
        .status()
        .expect("sha256sum");
    assert!(status.success(), "sha256sum -c OUTPUT.sha256 passes");
    let (code, text) = checkisomd5(iso);
    assert_eq!(code, Some(0), "checkisomd5 passes on a fresh ISO:\n{text}");
    let flipped = work.path().join("flipped.iso");
    copy_with_rootfs_byte_flipped(iso, &flipped);
    let (code, text) = checkisomd5(&flipped);
    assert_eq!(
        code,
        Some(1),
        "one byte of rootfs.img flipped fails:\n{text}"
    );
    std::fs::remove_file(&flipped).expect("remove the copy");
    let grub_cfg = work.path().join("grub.cfg");
    extract(iso, "/boot/grub2/grub.cfg", &grub_cfg);
    let grub_cfg = std::fs::read_to_string(&grub_cfg).expect("grub.cfg");
    let entry = grub_cfg
        .split("menuentry 'Check the medium and boot'")
        .nth(1)
        .unwrap_or_else(|| panic!("a media check entry:\n{grub_cfg}"));
    let linux = entry
        .lines()
        .find(|line| line.trim_start().starts_with("linux"))
        .expect("the entry boots a kernel");
    assert!(linux.ends_with(" rd.live.check"), "{linux}");
    assert!(linux.contains("root=live:LABEL=CDROM"), "{linux}");

    // The inventory: a valid SPDX 2.3 document listing exactly the installed packages.
    let spdx_path = sidecar(iso, ".spdx.json");
    // Where scripts/setup put it: vmic's cache dir, found as vmic finds it.
    let validator = vmic::guest_image::cache_dir().join("spdx-venv/bin/pyspdxtools");
    let validated = std::process::Command::new(&validator)
        .arg("-i")
        .arg(&spdx_path)
        .output()
        .unwrap_or_else(|e| panic!("{} (scripts/setup installs it): {e}", validator.display()));
    assert!(
        validated.status.success(),
        "pyspdxtools accepts the SBOM:\n{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
    let spdx = read_json(&spdx_path);
    assert_eq!(spdx["spdxVersion"], "SPDX-2.3");
    let packages = spdx["packages"].as_array().expect("packages");
    let mut listed: Vec<(String, String)> = packages
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Output")
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_string(),
                p["versionInfo"].as_str().expect("version").to_string(),
            )
        })
        .collect();
    listed.sort();
    let expected = dpkg_packages(iso, work.path());
    assert!(
        expected.len() > 50,
        "the image has packages: {}",
        expected.len()
    );
    assert_eq!(
        listed, expected,
        "the SBOM lists the dpkg database's packages"
    );
    let licensed = packages
        .iter()
        .filter(|p| p["licenseDeclared"] != "NOASSERTION")
        .count();
    assert!(
        licensed > 0,
        "machine-readable copyright files give licences"
    );
    assert_eq!(
        packages[0]["checksums"][0]["checksumValue"],
        sha256_of(iso),
        "the SBOM describes this ISO"
    );

    // The provenance names what the ISO was made from.
    let input = test_image("x86_64", "minimal", false).join("disk.qcow2");
    assert_eq!(provenance["input"]["sha256"], sha256_of(&input));
    assert_eq!(provenance["input"]["format"], "qcow2");
    assert_eq!(
        provenance["config"]["sha256"],
        sha256_of(&fixture("iso/live.yaml"))
    );
    assert_eq!(provenance["output"]["sha256"], sha256_of(iso));
    assert_eq!(provenance["vmic_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(provenance["packages"]["count"], expected.len());
    assert_eq!(provenance["packages"]["manager"], "dpkg");
}

/// `vmic inspect` reads the shared ISO as a vmic ISO: its record (label, kernel, the user's
/// args, epoch, rootfs.img's digest) as the provenance and the ISO itself hold them, the OS and
/// packages from its rootfs.img, and a yes for re-customizing it.
#[test]
fn the_shared_iso_inspects_as_a_vmic_iso() {
    let (iso, _, _) = shared_live_iso();
    let output = {
        let _vm = common::vm_slot();
        common::vmic()
            .args(["inspect", "--json", "--image-file"])
            .arg(iso)
            .output()
            .expect("running vmic inspect")
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let image = test_image("x86_64", "minimal", false);
    let provenance = read_json(&sidecar(iso, ".provenance.json"));
    assert_eq!(report["format"], "iso");
    assert_eq!(report["wholeDisk"]["kind"], "iso9660");
    assert_eq!(report["wholeDisk"]["label"], "CDROM");
    let record = &report["vmicIso"];
    assert_eq!(record["label"], "CDROM", "{report}");
    assert_eq!(
        record["kernelVersions"],
        serde_json::json!([manifest(&image)["kernel_version"]])
    );
    assert_eq!(record["userKernelArgs"], serde_json::json!(LIVE_ISO_ARGS));
    assert_eq!(
        record["createdUnixSeconds"],
        provenance["source_date_epoch"]
    );
    assert_eq!(record["rootfsSha256"], rootfs_sha256(iso));
    assert_eq!(report["os"]["id"], "debian");
    assert_eq!(report["architecture"], "x86_64");
    assert_eq!(report["packages"]["manager"], "dpkg");
    assert_eq!(report["packages"]["count"], provenance["packages"]["count"]);
    assert_eq!(report["liveOs"]["possible"], true, "{report}");
}

#[test]
fn aarch64_qcow2_to_iso_boots_under_aavmf() {
    let image = test_image("aarch64", "minimal", false);
    let work = work_dir();
    let iso = work.path().join("live.iso");
    let built = build_iso(
        &image.join("disk.qcow2"),
        &fixture("iso/live.yaml"),
        &iso,
        // No --arch: detected from the image's boot loader, as for `vmic boot`.
        &[],
    );
    eprintln!("aarch64 ISO: {:.1} s", built.seconds);
    let booted = boot(&iso, "uefi", "cdrom", 1200);
    assert_live_iso(&booted, &LIVE_ISO_ARGS);
    assert!(
        booted
            .cmdline
            .iter()
            .any(|arg| arg.starts_with("console=ttyAMA0")),
        "{booted:?}"
    );
}

/// The cloud-init test image as an ISO with the Image Customizer's cloud-init example `config`.
fn cloud_init_iso(config: &str, work: &Path) -> PathBuf {
    let image = test_image("x86_64", "cloud-init", false);
    let iso = work.join("cloud-init.iso");
    build_iso(
        &image.join("disk.qcow2"),
        &fixture(&format!("config/cloud-init/{config}")),
        &iso,
        &[],
    );
    iso
}

/// Example 1 keeps the NoCloud seed on the ISO, outside the root file system: cloud-init finds
/// it only if the ISO's files are where the LiveOS mounts the medium, so it is booted.
#[test]
fn cloud_init_example_1_seed_on_the_iso() {
    let work = work_dir();
    let iso = cloud_init_iso("iso-map.yaml", work.path());
    let booted = boot(&iso, "uefi", "cdrom", 900);
    assert_eq!(booted.count_arg(|arg| arg == "ds=nocloud"), 1, "{booted:?}");
    assert_eq!(booted.file("image"), ["variant=cloud-init"], "{booted:?}");
    // The user-data's hostname and write_files (both applied before multi-user.target).
    assert_eq!(booted.host, "vmic-cloud-init", "{booted:?}");
    assert_eq!(
        booted.file("cloud-init"),
        ["cloud-init applied the user-data"],
        "{booted:?}"
    );
}

/// Example 2 puts the seed into the root file system with `os.additionalFiles`, where
/// cloud-init's NoCloud source reads it on any boot; what vmic must get right is the files in
/// `rootfs.img` and `ds=nocloud` on every entry, read here from the ISO (example 1 boots the
/// same image, and the seed it reads is the same three files).
#[test]
fn cloud_init_example_2_seed_in_the_rootfs() {
    let work = work_dir();
    let iso = cloud_init_iso("rootfs-map.yaml", work.path());
    for args in grub_linux_args(&iso) {
        assert_eq!(
            args.iter().filter(|arg| *arg == "ds=nocloud").count(),
            1,
            "{args:?}"
        );
    }
    let root = work.path().join("rootfs");
    let seeds = ["user-data", "network-config", "meta-data"]
        .map(|name| format!("var/lib/cloud/seed/nocloud/{name}"));
    unsquash(
        &iso,
        work.path(),
        &root,
        &seeds.each_ref().map(String::as_str),
    );
    for (seed, name) in seeds
        .iter()
        .zip(["user-data", "network-config", "meta-data"])
    {
        assert_eq!(
            std::fs::read(root.join(seed)).unwrap_or_else(|e| panic!("{seed}: {e}")),
            std::fs::read(fixture(&format!(
                "config/cloud-init/cloud-init-data/{name}"
            )))
            .expect("the fixture"),
            "{seed} in rootfs.img"
        );
    }
}

/// `paths` of the ISO's `rootfs.img`, unpacked under `root` with unsquashfs (on the host,
/// independently of vmic's reading in the VM); `work` holds the extracted image.
fn unsquash(iso: &Path, work: &Path, root: &Path, paths: &[&str]) {
    let rootfs = work.join("rootfs.img");
    extract(iso, "/liveos/rootfs.img", &rootfs);
    let mut args = vec!["-no-progress", "-d", path_str(root), path_str(&rootfs)];
    args.extend_from_slice(paths);
    run("unsquashfs", &args);
}

#[test]
fn iso_to_iso_with_iso_changes_only_keeps_rootfs_img() {
    let (input, full_seconds, full_stderr) = shared_live_iso();
    let work = work_dir();
    let output = work.path().join("remastered.iso");
    let remastered = build_iso(input, &fixture("iso/remaster.yaml"), &output, &[]);
    eprintln!(
        "re-mastered in {:.1} s ({:.1} s per --timestamp-file) vs {full_seconds:.1} s for the full build",
        remastered.seconds,
        remastered.total_seconds()
    );
    assert_eq!(
        rootfs_sha256(&output),
        rootfs_sha256(input),
        "rootfs.img is not rebuilt"
    );
    // The agent logs one line per dracut + mksquashfs run ("dracut took … and mksquashfs …")
    // and one when it picks the squashfs compression: the full build shows both (so the check
    // below can see them), the re-master neither.
    for evidence in [DRACUT_AND_MKSQUASHFS_RAN, SQUASHFS_COMPRESSION_CHOSEN] {
        assert!(
            full_stderr.contains(evidence),
            "the full build logs {evidence:?}:\n{full_stderr}"
        );
        assert!(
            !remastered.stderr.contains(evidence),
            "re-mastering runs neither dracut nor mksquashfs ({evidence:?}):\n{}",
            remastered.stderr
        );
    }
    // The time is printed, not asserted: under load the fixed costs (builder boot, xorriso)
    // took 22.2 s against an 88.2 s full build and a "≤ 25%" check failed with nothing wrong.
    // Speed is `scripts/bench-iso`'s; that nothing was rebuilt is what the lines above check.
    // Not booted: a re-master with new ISO settings is what a build cache hit runs too, and
    // `a_rebuild_with_only_iso_changes_reuses_the_cached_build` boots one. What differs here
    // (the recorded settings kept, the new ones added) is all in grub.cfg and the ISO's files.
    let entries = grub_linux_args(&output);
    for args in &entries {
        let args: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|arg| *arg != "rd.live.check")
            .collect();
        // The recorded ISO args stay, the new one follows; nothing doubles.
        assert!(
            args.ends_with(&["vmic.first=1", "vmic.second=2", "vmic.third=3"]),
            "{args:?}"
        );
        for once in ["rd.live.image", "vmic.os=1", "vmic.first=1", "vmic.third=3"] {
            assert_eq!(
                args.iter().filter(|arg| **arg == once).count(),
                1,
                "{once} once: {args:?}"
            );
        }
        assert_eq!(
            args.iter().filter(|arg| arg.starts_with("root=")).count(),
            1,
            "{args:?}"
        );
    }
    for (file, fixture_file) in [
        ("/iso-extra.txt", "iso/files/iso-extra.txt"),
        ("/iso-extra-2.txt", "iso/files/iso-extra-2.txt"),
    ] {
        let extracted = work.path().join(fixture_file.replace('/', "-"));
        extract(&output, file, &extracted);
        assert_eq!(
            std::fs::read(&extracted).expect("extracted"),
            std::fs::read(fixture(fixture_file)).expect("fixture"),
            "{file} on the re-mastered ISO"
        );
    }
}

/// The arguments of every `linux` line of the ISO's grub.cfg (the one file UEFI and BIOS
/// read): the normal entry and the media check one.
fn grub_linux_args(iso: &Path) -> Vec<Vec<String>> {
    let work = work_dir();
    let grub_cfg = work.path().join("grub.cfg");
    extract(iso, "/boot/grub2/grub.cfg", &grub_cfg);
    let text = std::fs::read_to_string(&grub_cfg).expect("grub.cfg");
    let entries: Vec<Vec<String>> = text
        .lines()
        .map(str::split_whitespace)
        .filter_map(|mut words| match words.next() {
            Some("linux" | "linuxefi") => Some(words.skip(1).map(str::to_string).collect()),
            _ => None,
        })
        .collect();
    assert_eq!(entries.len(), 2, "two entries:\n{text}");
    entries
}

#[test]
fn iso_to_iso_with_an_os_change_rebuilds_rootfs_img_dated_by_the_given_epoch() {
    let (input, _, _) = shared_live_iso();
    let work = work_dir();
    let output = work.path().join("rebuilt.iso");
    // A day after the input's epoch, given on the command line: every date follows it.
    let input_epoch = read_json(&sidecar(input, ".provenance.json"))["source_date_epoch"]
        .as_u64()
        .expect("the shared ISO's epoch");
    let epoch = (input_epoch + 86_400).to_string();
    build_iso(
        input,
        &fixture("iso/rebuild.yaml"),
        &output,
        &["--source-date-epoch", &epoch],
    );
    assert_ne!(
        rootfs_sha256(&output),
        rootfs_sha256(input),
        "rootfs.img is rebuilt"
    );
    assert_dated(&output, input_epoch + 86_400);
    let provenance = read_json(&sidecar(&output, ".provenance.json"));
    assert_eq!(provenance["source_date_epoch"], input_epoch + 86_400);
    assert_eq!(
        provenance["source_date_epoch_from"],
        "option or environment"
    );
    let booted = boot(&output, "uefi", "cdrom", 600);
    // The first build's settings stay (hostname, files, ISO args), the new file is there.
    assert_live_iso(&booted, &LIVE_ISO_ARGS);
    assert_eq!(
        booted.file("os-later"),
        ["added by a later os change"],
        "{booted:?}"
    );
}

fn minimal_qcow2() -> PathBuf {
    test_image("x86_64", "minimal", false).join("disk.qcow2")
}

/// The separate-/boot test image with `bootpart.yaml` as an ISO, built once for both boots.
fn shared_bootpart_iso() -> &'static Path {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| {
        let image = test_image("x86_64", "minimal", true).join("disk.qcow2");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("iso-tests/bootpart");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the bootpart ISO's dir");
        let iso = dir.join("bootpart.iso");
        build_iso(&image, &fixture("iso/bootpart.yaml"), &iso, &[]);
        iso
    })
}

/// An image with a separate /boot partition: its grub's embedded config searches that
/// partition's UUID and keeps its prefix relative to it (`/grub2`), which on the CD (or the
/// El Torito FAT image) once ended at a `grub>` prompt. The ISO boots under `firmware`,
/// through dracut's media check (`rd.live.check`, what the ISO's "Check the medium and boot"
/// entry adds): the MD5 vmic implanted is checked against the medium and passes.
fn the_bootpart_iso_boots_after_its_media_check(firmware: &str) {
    let booted = boot(shared_bootpart_iso(), firmware, "cdrom", 600);
    assert_eq!(booted.firmware, firmware, "{booted:?}");
    for arg in ["root=live:LABEL=CDROM", "vmic.bootpart=1", "rd.live.check"] {
        assert!(
            booted.cmdline.iter().any(|a| a == arg),
            "{arg} in {booted:?}"
        );
    }
    assert_media_check_passed(&booted.console);
}

/// checkisomd5 runs in the initrd before the root is mounted: it prints the MD5 vmic
/// implanted and its progress, and exits 0 only for PASS (its unit then "Finished"; for
/// anything else dmsquash-live stops the boot). Its verdict, written just before it exits, is
/// not always on the console: the unit holds the serial port as its controlling tty, and the
/// kernel's hangup at its exit flushes what the UART has not sent yet (seen once in CI,
/// 2026-12-04), progress included. So the unit must have finished, and a verdict that shows
/// must read PASS.
fn assert_media_check_passed(console: &str) {
    let console = common::without_kernel_messages(console);
    let check = media_check_output(&console);
    assert!(
        check.contains("/dev/disk/by-label/CDROM:") && check.contains("Fragment count:"),
        "checkisomd5 read an implanted MD5 and fragment sums:\n{check}"
    );
    assert!(
        check.lines().any(|line| line.starts_with("Checking: ")),
        "the media check read the medium:\n{check}"
    );
    assert!(
        check
            .lines()
            .any(|line| line.contains("Finished") && line.contains("checkisomd5@")),
        "the media check's unit finished (exit 0, a PASS):\n{check}"
    );
    for verdict in check
        .lines()
        .filter(|line| line.contains("The media check is complete"))
    {
        assert!(
            verdict.ends_with("the result is: PASS."),
            "the media check's verdict:\n{check}"
        );
    }
}

/// The console excerpts are a real boot's (`media-check-pass.log`), as CI once saw it with the
/// verdict flushed away, and with checkisomd5 failing.
#[test]
fn a_media_check_passes_when_its_unit_finished_and_no_verdict_says_otherwise() {
    let read = |name: &str| {
        std::fs::read_to_string(fixture(&format!("console/{name}"))).expect("a console fixture")
    };
    assert_media_check_passed(&read("media-check-pass.log"));
    assert_media_check_passed(&read("media-check-verdict-cut.log"));
    let fail = read("media-check-fail.log");
    // The same failure with its verdict flushed away: the unit's status alone tells.
    let fail_cut = fail.replace(
        "\r\n\r\nThe media check is complete, the result is: FAIL.\r\n\r\nIt is not recommended to use this media.\r\n",
        "\r\n",
    );
    assert_ne!(fail_cut, fail);
    for console in [fail, fail_cut] {
        let failed = std::panic::catch_unwind(|| assert_media_check_passed(&console));
        assert!(
            failed.is_err(),
            "a failed media check is not a pass:\n{console}"
        );
    }
}

/// What the console shows of the media check: from its unit's first mention on, each run of
/// progress updates (`\r`-separated) cut to its last.
fn media_check_output(console: &str) -> String {
    // `lines().take(60)` bounds the text; no byte cut, which could split a UTF-8 character.
    console[console.find("checkisomd5").unwrap_or(0)..]
        .lines()
        .take(60)
        .map(|line| {
            line.rsplit('\r')
                .find(|part| !part.is_empty())
                .unwrap_or("")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_image_with_a_boot_partition_makes_an_iso_that_boots_under_uefi_after_its_media_check() {
    the_bootpart_iso_boots_after_its_media_check("uefi");
}

#[test]
fn an_image_with_a_boot_partition_makes_an_iso_that_boots_under_bios_after_its_media_check() {
    the_bootpart_iso_boots_after_its_media_check("bios");
}

/// Secure Boot kept end to end: from an image whose boot chain is signed (shim by Microsoft,
/// grub and kernel by Debian), the ISO boots with Secure Boot enforced (the marker reads the
/// firmware's SecureBoot variable) as a LiveOS, with the ISO's own argument.
#[test]
fn a_signed_boot_chain_boots_as_an_iso_with_secure_boot_enforced() {
    let image = test_image("x86_64", "secureboot", false).join("disk.qcow2");
    let work = work_dir();
    let iso = work.path().join("secureboot.iso");
    build_iso(&image, &fixture("iso/secureboot.yaml"), &iso, &[]);
    let booted = common::boot_with(&iso, "uefi", "cdrom", true, 600);
    assert_eq!(booted.secureboot, "enabled", "{booted:?}");
    assert!(
        booted
            .cmdline
            .iter()
            .any(|arg| arg == "root=live:LABEL=CDROM"),
        "{booted:?}"
    );
    assert!(
        booted.cmdline.iter().any(|arg| arg == "vmic.secureboot=1"),
        "{booted:?}"
    );
}

/// `vmic boot --secure-boot` of the minimal image, whose grub is vmic's own grub-mkimage
/// build, signed by nobody. With `hold_up`, vmic is stopped (SIGSTOP) 300 ms of every 400 ms
/// while it runs, as a loaded host holds up its console reader: what the guest prints must
/// wait for vmic, not be lost.
fn boot_the_unsigned_grub_under_secure_boot(hold_up: bool) -> std::process::Output {
    let _vm = common::vm_slot();
    let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmic"));
    command
        .args([
            "boot",
            "--secure-boot",
            "--expect",
            "^VMIC-TEST-END",
            "--timeout",
            "600",
        ])
        .arg("--image-file")
        .arg(minimal_qcow2())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("running vmic boot");
    // Read beside the loop below, so that vmic never waits on a full pipe.
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).expect("reading vmic's output");
            }
            bytes
        })
    }
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let pid = child.id() as libc::pid_t;
    let status = if hold_up {
        // The stops are the fault injected, not a wait for anything. vmic is reaped only by
        // `try_wait` in this loop, so no signal can reach its pid once it is free.
        loop {
            if let Some(status) = child.try_wait().expect("vmic's status") {
                break status;
            }
            // SAFETY: signals to our own child, not yet reaped (see above).
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            std::thread::sleep(std::time::Duration::from_millis(300));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    } else {
        child.wait().expect("waiting for vmic boot")
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    }
}

/// Shim refuses the unsigned grub, and `vmic boot` ends at once with shim's words (shim shows
/// them in a dialog that waits for a key, so no line of it ever ends).
fn assert_refused_with_shims_words(output: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "Secure Boot refused the boot chain: Verification failed: (0x1A) Security Violation"
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("within 600 s"),
        "ended by the refusal: {stderr}"
    );
}

#[test]
fn an_unsigned_grub_under_secure_boot_is_refused_with_shims_words() {
    assert_refused_with_shims_words(&boot_the_unsigned_grub_under_secure_boot(false));
}

/// The CI failure this guards against: with the console on a unix socket (~280 one-byte
/// writes of slack), a reader held up for a moment made OVMF and QEMU drop console output,
/// shim's refusal among it, and the boot ran into OVMF's 5-minute watchdog instead.
#[test]
fn shims_refusal_arrives_whole_while_vmic_is_held_up() {
    assert_refused_with_shims_words(&boot_the_unsigned_grub_under_secure_boot(true));
}

#[test]
fn missing_grub_cfg_is_named() {
    let stderr = fail_iso(&minimal_qcow2(), &fixture("iso/no-grub-cfg.yaml"), 1, &[]);
    assert!(stderr.contains("/boot/grub2/grub.cfg"), "{stderr}");
}

#[test]
fn missing_shim_is_named_with_its_package() {
    let stderr = fail_iso(&minimal_qcow2(), &fixture("iso/no-shim.yaml"), 1, &[]);
    // Not just "shim", which the fixture's script name `remove-shim` prints anyway.
    assert!(
        stderr.contains("the image has no shim (bootx64.efi) under /boot"),
        "{stderr}"
    );
    assert!(
        stderr.contains("provided by the package `shim` (Azure Linux) or `shim-signed` (Debian)"),
        "names the package: {stderr}"
    );
}

#[test]
fn dracut_without_dmsquash_live_names_dracut_live() {
    let stderr = fail_iso(
        &minimal_qcow2(),
        &fixture("iso/no-dmsquash-live.yaml"),
        1,
        &[],
    );
    // The fixture's script (`remove-dmsquash-live`) prints the module's name anyway.
    assert!(
        stderr.contains("the image's dracut has no dmsquash-live module"),
        "{stderr}"
    );
    assert!(
        stderr.contains("add the package `dracut-live`"),
        "names the package: {stderr}"
    );
}

#[test]
fn a_failing_script_shows_its_stderr() {
    let stderr = fail_iso(
        &minimal_qcow2(),
        &fixture("iso/failing-script.yaml"),
        1,
        &[],
    );
    // The script's name alone is in the log anyway: the error itself must name it.
    assert!(
        stderr.contains("script fails failed with exit code 3"),
        "names the script and its exit code: {stderr}"
    );
    assert!(stderr.contains("boom-on-stderr"), "{stderr}");
    // The script's ESC]52 (clipboard write) and ESC[2J (clear screen) reach the user escaped.
    assert!(
        stderr.contains("]52;c;aGFja2Vk"),
        "the text is shown: {stderr}"
    );
    for byte in [0x1b_u8, 0x07, 0x9b] {
        assert!(
            !stderr.as_bytes().contains(&byte),
            "vmic's stderr holds no control byte {byte:#x}: {stderr:?}"
        );
    }
    assert!(!stderr.contains('\u{9b}'), "no C1 CSI either: {stderr:?}");
}

#[test]
fn an_input_that_is_not_a_disk_image_is_refused() {
    let work = work_dir();
    let input = work.path().join("random.img");
    common::random_file(&input, 16);
    let stderr = fail_iso(&input, &fixture("iso/plain.yaml"), 1, &[]);
    assert!(stderr.contains("not a disk image"), "{stderr}");
}

#[test]
fn a_truncated_qcow2_is_refused_naming_it() {
    let work = work_dir();
    let input = work.path().join("truncated.qcow2");
    run(
        "dd",
        &[
            &format!("if={}", minimal_qcow2().display()),
            &format!("of={}", input.display()),
            "bs=1M",
            "count=10",
            "status=none",
        ],
    );
    let stderr = fail_iso(&input, &fixture("iso/plain.yaml"), 2, &[]);
    assert!(stderr.contains(path_str(&input)), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
}

#[test]
fn an_iso_not_made_by_vmic_is_refused() {
    let work = work_dir();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hello.txt"), "not a LiveOS\n").expect("write");
    let input = work.path().join("foreign.iso");
    run(
        "xorriso",
        &["-as", "mkisofs", "-o", path_str(&input), path_str(&tree)],
    );
    let stderr = fail_iso(&input, &fixture("iso/plain.yaml"), 1, &[]);
    assert!(stderr.contains("not made by vmic"), "{stderr}");
}

/// A small tmpfs, unmounted (and its mount point removed) however the test ends.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_build_dir_without_space_is_refused() {
    let work = work_dir();
    let build_dir = work.path().join("small");
    std::fs::create_dir_all(&build_dir).expect("mkdir");
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64m",
            "tmpfs",
            path_str(&build_dir),
        ],
    );
    let _mount = TmpfsMount(build_dir.clone());
    let input = minimal_qcow2();
    let before = sha256_of(&input);
    let output = work.path().join("out.iso");
    let failed = customize(
        &input,
        &fixture("iso/plain.yaml"),
        &output,
        Some(&build_dir),
        &[],
    );
    // Not a usage or config error: the machine lacks room (like a missing QEMU, exit 1).
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(
        failed
            .stderr
            .contains("not enough space in the build directory"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains(path_str(&build_dir)),
        "{}",
        failed.stderr
    );
    assert!(!output.exists());
    assert_no_partial(&output);
    assert_eq!(sha256_of(&input), before);
    assert!(failed.seconds < 30.0, "refused before any VM work");
}

#[test]
fn the_test_images_are_the_ones_these_tests_expect() {
    for (arch, variant, boot_partition) in [
        ("x86_64", "minimal", false),
        ("x86_64", "minimal", true),
        ("x86_64", "cloud-init", false),
        ("x86_64", "secureboot", false),
        ("aarch64", "minimal", false),
    ] {
        let manifest = manifest(&test_image(arch, variant, boot_partition));
        assert_eq!(manifest["arch"], arch);
        assert_eq!(manifest["variant"], variant);
        assert_eq!(manifest["boot_partition"], boot_partition);
        // Debian's signed grub reads its config from /EFI/debian; vmic's own from /boot/grub2.
        let prefix = match variant {
            "secureboot" => "/EFI/debian",
            _ => "/boot/grub2",
        };
        assert_eq!(manifest["boot"]["grub_prefix"], prefix, "{arch}-{variant}");
        let packages = manifest["packages"].as_object().expect("packages");
        assert_eq!(
            packages.contains_key("grub-efi-amd64-signed"),
            variant == "secureboot",
            "{arch}-{variant}"
        );
    }
}
