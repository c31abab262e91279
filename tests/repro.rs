//! Issue 12's promises on one set of builds: reproducible ISOs, self-checking media and the
//! records beside every output.
//!
//! Three ISOs of the smallest test image: two built alike in separate build directories (no
//! epoch given: it comes from the input), one with only `--source-date-epoch` changed. The
//! checks that follow reuse the first one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{customize_to, path_str, run, sha256_of, test_image, work_dir};

/// `vmic customize` to an ISO that must succeed.
fn build(input: &Path, config: &Path, output: &Path, extra: &[&str]) {
    let built = customize_to("iso", input, config, output, None, extra);
    assert_eq!(built.code, Some(0), "customize failed:\n{}", built.stderr);
    eprintln!("{} built in {:.1} s", output.display(), built.seconds);
}

fn sidecar(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output.file_name().expect("a file name").to_os_string();
    name.push(suffix);
    output.with_file_name(name)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Exit code of `checkisomd5` on `iso`, and its output.
fn checkisomd5(iso: &Path) -> (Option<i32>, String) {
    let out = Command::new("checkisomd5")
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

/// The installed packages of the ISO's root file system as dpkg itself lists them, read from
/// rootfs.img with unsquashfs and dpkg-query: independent of vmic's reading in the VM.
fn dpkg_packages(iso: &Path, work: &Path) -> Vec<(String, String)> {
    let rootfs = work.join("rootfs.img");
    extract(iso, "/liveos/rootfs.img", &rootfs);
    let root = work.join("rootfs");
    run(
        "unsquashfs",
        &[
            "-no-progress",
            "-d",
            path_str(&root),
            path_str(&rootfs),
            "var/lib/dpkg/status",
        ],
    );
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
    listed
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let status = fields.next()?;
            // `ii`, `hi`: installed; `rc` and half-installed states are not.
            let name = fields.next()?.to_string();
            let version = fields.next()?.to_string();
            (status.chars().nth(1) == Some('i')).then_some((name, version))
        })
        .collect()
}

#[test]
fn the_same_build_gives_the_same_self_checking_inventoried_iso() {
    let image = test_image("x86_64", "minimal", false).join("disk.qcow2");
    let config = common::repo().join("tests/fixtures/iso/plain.yaml");
    let work = work_dir();
    let [first, second, other] =
        ["first", "second", "other-epoch"].map(|name| work.path().join(name).join("live.iso"));
    for output in [&first, &second, &other] {
        std::fs::create_dir_all(output.parent().expect("a parent")).expect("output dir");
    }

    // 1. Reproducible: no flag, separate build dirs → the same bytes, the same records.
    build(&image, &config, &first, &[]);
    build(&image, &config, &second, &[]);
    assert_eq!(
        sha256_of(&first),
        sha256_of(&second),
        "two builds of the same input and config are bit-identical"
    );
    for suffix in [".sha256", ".spdx.json", ".provenance.json"] {
        assert_eq!(
            std::fs::read(sidecar(&first, suffix)).expect("first record"),
            std::fs::read(sidecar(&second, suffix)).expect("second record"),
            "OUTPUT{suffix} is reproducible too"
        );
    }
    let provenance = read_json(&sidecar(&first, ".provenance.json"));
    let epoch = provenance["source_date_epoch"]
        .as_u64()
        .expect("the provenance records the epoch");
    assert!(
        epoch > 1_000_000_000,
        "taken from the image's os-release: {epoch}"
    );
    let changed = (epoch + 86_400).to_string();
    build(&image, &config, &other, &["--source-date-epoch", &changed]);
    assert_ne!(
        sha256_of(&first),
        sha256_of(&other),
        "another SOURCE_DATE_EPOCH gives another ISO"
    );
    let other_provenance = read_json(&sidecar(&other, ".provenance.json"));
    assert_eq!(other_provenance["source_date_epoch"], epoch + 86_400);

    // 2. Self-checking: OUTPUT.sha256, the implanted MD5, the media check boot entry.
    let dir = first.parent().expect("a parent");
    let status = Command::new("sha256sum")
        .args(["--check", "--strict", "live.iso.sha256"])
        .current_dir(dir)
        .status()
        .expect("sha256sum");
    assert!(status.success(), "sha256sum -c OUTPUT.sha256 passes");
    let (code, text) = checkisomd5(&first);
    assert_eq!(code, Some(0), "checkisomd5 passes on a fresh ISO:\n{text}");
    let flipped = work.path().join("flipped.iso");
    std::fs::copy(&first, &flipped).expect("copy of the ISO");
    let offset = rootfs_offset(&flipped) + 4096;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&flipped)
            .expect("open the copy");
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).expect("read");
        byte[0] ^= 0xff;
        file.write_all_at(&byte, offset).expect("write");
    }
    let (code, text) = checkisomd5(&flipped);
    assert_eq!(
        code,
        Some(1),
        "one byte of rootfs.img flipped fails:\n{text}"
    );
    let grub_cfg = work.path().join("grub.cfg");
    extract(&first, "/boot/grub2/grub.cfg", &grub_cfg);
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

    // 3. The inventory: a valid SPDX 2.3 document listing exactly the installed packages.
    let spdx_path = sidecar(&first, ".spdx.json");
    let validator = std::env::var_os("VMIC_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/vmic"))
        .join("spdx-venv/bin/pyspdxtools");
    let validated = Command::new(&validator)
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
    let listed: Vec<(String, String)> = spdx["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Output")
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_string(),
                p["versionInfo"].as_str().expect("version").to_string(),
            )
        })
        .collect();
    let mut expected = dpkg_packages(&first, work.path());
    expected.iter_mut().for_each(|(name, _)| {
        // binary:Package adds `:arch` to foreign and Multi-Arch: same packages only.
        if let Some((base, _)) = name.split_once(':') {
            *name = base.to_string();
        }
    });
    expected.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert!(
        expected.len() > 50,
        "the image has packages: {}",
        expected.len()
    );
    assert_eq!(
        sorted, expected,
        "the SBOM lists the dpkg database's packages"
    );
    let licensed = spdx["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| p["licenseDeclared"] != "NOASSERTION")
        .count();
    assert!(
        licensed > 0,
        "machine-readable copyright files give licences"
    );
    let output_package = &spdx["packages"][0];
    assert_eq!(
        output_package["checksums"][0]["checksumValue"],
        sha256_of(&first),
        "the SBOM describes this ISO"
    );

    // The provenance names what the ISO was made from.
    assert_eq!(provenance["input"]["sha256"], sha256_of(&image));
    assert_eq!(provenance["config"]["sha256"], sha256_of(&config));
    assert_eq!(provenance["output"]["sha256"], sha256_of(&first));
    assert_eq!(provenance["vmic_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(provenance["packages"]["count"], expected.len());
    assert_eq!(provenance["packages"]["manager"], "dpkg");
}
