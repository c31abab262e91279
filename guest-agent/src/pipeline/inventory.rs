//! Reading an image's package database (the SBOM's source) and the `SOURCE_DATE_EPOCH` the
//! reproducible outputs are clamped to. Pure: the agent reads the files, these parse them.

use vmic_protocol::InstalledPackage;

/// dpkg's database, inside the image.
pub const DPKG_STATUS_PATH: &str = "/var/lib/dpkg/status";
/// Where rpm keeps its database (older and newer layouts), inside the image.
pub const RPM_DB_DIRS: [&str; 2] = ["/var/lib/rpm", "/usr/lib/sysimage/rpm"];
/// Read at most this much of the image's dpkg status (a full desktop install is ~10 MiB).
pub const DPKG_STATUS_MAX_BYTES: u64 = 64 << 20;
/// Read at most this much of one `copyright` file; the `License:` fields come first.
pub const COPYRIGHT_MAX_BYTES: u64 = 1 << 20;
/// At most this many packages cross the wire (the frame cap bounds the bytes anyway).
pub const MAX_PACKAGES: usize = 20_000;
/// Longest field kept (name, version, licence, ...): longer ones are cut, never sent whole.
const MAX_FIELD: usize = 512;

/// The epoch taken from the input when none is given: the mtime of the image's `os-release`,
/// i.e. when its distribution release was made. Same input → same epoch, with no flag and
/// without hashing the input; and the ISO's dates stay meaningful (the release's date).
pub const OS_RELEASE_PATHS: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// `rpm -qa` with one tab-separated line per package (run chrooted in the image).
pub fn rpm_query_argv() -> Vec<String> {
    [
        "rpm",
        "-qa",
        "--queryformat",
        "%{NAME}\\t%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{LICENSE}\\t%{SOURCERPM}\\n",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

fn field(value: &str) -> String {
    let value = value.trim();
    match value.char_indices().nth(MAX_FIELD) {
        Some((cut, _)) => value[..cut].to_string(),
        None => value.to_string(),
    }
}

/// The installed packages of a dpkg `status` file, sorted by name and architecture. A package
/// counts when its `Status` ends in `installed` (as `dpkg-query -W` lists it as `ii`/`hi`);
/// half-installed, config-files and not-installed entries are left out.
pub fn parse_dpkg_status(text: &str) -> Vec<InstalledPackage> {
    let mut packages = Vec::new();
    for paragraph in text.split("\n\n") {
        let (mut name, mut version, mut architecture, mut status, mut source) =
            (None, None, None, None, None);
        for line in paragraph.lines() {
            // Continuation lines (descriptions, conffiles) start with white space.
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if key.starts_with([' ', '\t']) {
                continue;
            }
            match key {
                "Package" => name = Some(field(value)),
                "Version" => version = Some(field(value)),
                "Architecture" => architecture = Some(field(value)),
                "Status" => status = Some(value.trim().to_string()),
                // `Source: name (version)` when the source version differs.
                "Source" => source = value.split_whitespace().next().map(field),
                _ => {}
            }
        }
        let installed = status
            .as_deref()
            .is_some_and(|status| status.split_whitespace().nth(2) == Some("installed"));
        if let (Some(name), true) = (name, installed) {
            if packages.len() == MAX_PACKAGES {
                break;
            }
            packages.push(InstalledPackage {
                source: source.filter(|source| *source != name),
                name,
                version: version.unwrap_or_default(),
                architecture: architecture.unwrap_or_default(),
                license: None,
            });
        }
    }
    packages.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    packages
}

/// The `License:` short names of a machine-readable Debian `copyright` file (DEP-5), in order
/// of appearance without repeats, joined with ` AND ` (every file of the package is under one
/// of them). `None` for a free-form file: nothing in it states a licence reliably.
pub fn copyright_licenses(text: &str) -> Option<String> {
    let first = text.lines().find(|line| !line.trim().is_empty())?;
    if !(first.starts_with("Format:") && first.contains("copyright-format")) {
        return None;
    }
    let mut licenses: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("License:") {
            let value = field(value);
            if !value.is_empty() && !licenses.contains(&value) {
                licenses.push(value);
            }
        }
    }
    (!licenses.is_empty()).then(|| licenses.join(" AND "))
}

/// The packages of [`rpm_query_argv`]'s output, sorted by name and architecture.
pub fn parse_rpm_query(text: &str) -> Vec<InstalledPackage> {
    let mut packages: Vec<InstalledPackage> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split('\t');
            let name = field(parts.next()?);
            let version = field(parts.next()?);
            let architecture = field(parts.next()?);
            let license = parts.next().map(field).filter(|l| l != "(none)");
            // `bash-5.2.15-1.azl3.src.rpm` → `bash`: strip `-VERSION-RELEASE.src.rpm`.
            let source = parts
                .next()
                .and_then(|rpm| rpm.trim().strip_suffix(".src.rpm"))
                .and_then(|rest| rest.rsplitn(3, '-').nth(2))
                .map(field)
                .filter(|source| *source != name);
            (!name.is_empty()).then_some(InstalledPackage {
                name,
                version,
                architecture,
                license,
                source,
            })
        })
        .take(MAX_PACKAGES)
        .collect();
    packages.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    packages
}

/// xorriso's `YYYYMMDDhhmmsscc` (UTC) of `epoch`.
pub fn xorriso_date(epoch: u64) -> String {
    let (year, month, day, hour, minute, second) = vmic_protocol::utc_civil(epoch);
    format!("{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}00")
}

/// A FAT volume id derived from the epoch, so the El Torito FAT image changes only with it.
pub fn fat_volume_id(epoch: u64) -> String {
    format!("{:08x}", epoch as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u9
Description: GNU C Library
 Status: not a field, a description line

Package: removed-but-configured
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: bash
Status: hold ok installed
Architecture: amd64
Version: 5.2.15-2+b7
Source: bash (5.2.15-2)

Package: libc6
Status: install ok installed
Architecture: i386
Source: glibc
Version: 2.36-9+deb12u9

Package: half
Status: install reinstreq half-installed
Version: 2
";

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let packages = parse_dpkg_status(STATUS);
        let names: Vec<(&str, &str)> = packages
            .iter()
            .map(|p| (p.name.as_str(), p.architecture.as_str()))
            .collect();
        assert_eq!(
            names,
            [("bash", "amd64"), ("libc6", "amd64"), ("libc6", "i386")]
        );
        assert_eq!(
            packages[0].source, None,
            "the source named like the package"
        );
        assert_eq!(packages[0].version, "5.2.15-2+b7");
        assert_eq!(packages[1].source.as_deref(), Some("glibc"));
        assert_eq!(packages[1].version, "2.36-9+deb12u9");
    }

    #[test]
    fn machine_readable_copyright_gives_licences() {
        let dep5 = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
                    Upstream-Name: x\n\n\
                    Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\n\
                    Files: lib/*\nLicense: BSD-3-clause\n\n\
                    Files: debian/*\nLicense: GPL-2+\n\n\
                    License: GPL-2+\n This program is free software\n";
        assert_eq!(
            copyright_licenses(dep5).as_deref(),
            Some("GPL-2+ AND BSD-3-clause")
        );
        let free_form = "This package was debianized by someone.\n\nLicense: GPL\n";
        assert_eq!(copyright_licenses(free_form), None);
        assert_eq!(copyright_licenses(""), None);
    }

    #[test]
    fn rpm_query_lines() {
        let out = "bash\t5.2.15-1.azl3\tx86_64\tGPL-3.0-or-later\tbash-5.2.15-1.azl3.src.rpm\n\
                   gpg-pubkey\t3135ce90-5e6fda74\t(none)\t(none)\t(none)\n\
                   glibc-devel\t2.38-3.azl3\tx86_64\tLGPLv2+\tglibc-2.38-3.azl3.src.rpm\n";
        let packages = parse_rpm_query(out);
        assert_eq!(packages.len(), 3);
        assert_eq!(packages[0].name, "bash");
        assert_eq!(packages[0].source, None);
        assert_eq!(packages[0].license.as_deref(), Some("GPL-3.0-or-later"));
        assert_eq!(packages[1].name, "glibc-devel");
        assert_eq!(packages[1].source.as_deref(), Some("glibc"));
        assert_eq!(packages[2].license, None);
    }

    #[test]
    fn dates() {
        assert_eq!(xorriso_date(0), "1970010100000000");
        assert_eq!(xorriso_date(1_700_000_000), "2023111422132000");
        // 2024-02-29 23:59:59, a leap day.
        assert_eq!(xorriso_date(1_709_251_199), "2024022923595900");
        assert_eq!(fat_volume_id(0x1_2345_6789), "23456789");
    }

    #[test]
    fn long_fields_are_cut() {
        let long = "x".repeat(10_000);
        let status = format!("Package: {long}\nStatus: install ok installed\n");
        assert_eq!(parse_dpkg_status(&status)[0].name.len(), MAX_FIELD);
    }
}
