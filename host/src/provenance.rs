//! What vmic writes beside every output: `OUTPUT.sha256` (sha256sum format),
//! `OUTPUT.spdx.json` (an SPDX 2.3 SBOM of the packages the agent read from the image's own
//! package database) and `OUTPUT.provenance.json` (what the output was made from); and the MD5
//! implanted into an ISO for `checkisomd5` / `rd.live.check`.
//!
//! Everything here is a pure function of its inputs (no wall clock, no random ids): the same
//! build gives the same files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use vmic_protocol::{InstalledPackage, PackageInventory, PackageManager};

/// The sidecar files, in the order they are written, by the suffix added to the output's name.
pub const SHA256_SUFFIX: &str = ".sha256";
pub const SPDX_SUFFIX: &str = ".spdx.json";
pub const PROVENANCE_SUFFIX: &str = ".provenance.json";

/// Format of `OUTPUT.provenance.json`; bumped on incompatible changes.
pub const PROVENANCE_FORMAT: u32 = 1;

/// `OUTPUT` + `suffix`, beside it.
pub fn sidecar_path(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    output.with_file_name(name)
}

/// `implantisomd5 --force ISO`: the MD5 of the ISO's content goes into its primary volume
/// descriptor's application area, which `checkisomd5` and dracut's `rd.live.check` verify.
///
/// Run on the host, on the staged file the agent wrote, after its sha256 was checked: the
/// ISO is streamed from xorriso's stdout onto a raw disk in the VM, so implanting there would
/// need a second pass over the device and isomd5sum in the builder image. implantisomd5 only
/// reads the primary volume descriptor (bounded: the file's size is the agent's reported size)
/// and hashes the data; it follows no reference the image makes.
pub fn implant_iso_md5(iso: &Path) -> anyhow::Result<()> {
    let output = std::process::Command::new("implantisomd5")
        .arg("--force")
        .arg(iso)
        .output()
        .map_err(|error| {
            crate::report::hinted(
                format!("cannot run implantisomd5: {error}"),
                "install isomd5sum (Debian/Ubuntu: apt-get install isomd5sum; Fedora/Azure \
                 Linux: dnf install isomd5sum), or run scripts/setup",
            )
        })?;
    if !output.status.success() {
        bail!(
            "implantisomd5 {} failed: {}",
            iso.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// One `sha256sum` line: `sha256sum -c OUTPUT.sha256` in the output's directory checks it.
pub fn sha256sum_line(sha256_hex: &str, output: &Path) -> String {
    format!(
        "{sha256_hex}  {}\n",
        output.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// `YYYY-MM-DDThh:mm:ssZ` of `epoch`.
pub fn iso8601(epoch: u64) -> String {
    let (year, month, day, hour, minute, second) = vmic_protocol::utc_civil(epoch);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// SPDX identifiers of Debian's `copyright` short names (DEP-5 §7.2, the ones in common use).
const DEBIAN_TO_SPDX: [(&str, &str); 44] = [
    ("gpl-1", "GPL-1.0-only"),
    ("gpl-1+", "GPL-1.0-or-later"),
    ("gpl-2", "GPL-2.0-only"),
    ("gpl-2+", "GPL-2.0-or-later"),
    ("gpl-3", "GPL-3.0-only"),
    ("gpl-3+", "GPL-3.0-or-later"),
    ("lgpl-2", "LGPL-2.0-only"),
    ("lgpl-2+", "LGPL-2.0-or-later"),
    ("lgpl-2.1", "LGPL-2.1-only"),
    ("lgpl-2.1+", "LGPL-2.1-or-later"),
    ("lgpl-3", "LGPL-3.0-only"),
    ("lgpl-3+", "LGPL-3.0-or-later"),
    ("agpl-3", "AGPL-3.0-only"),
    ("agpl-3+", "AGPL-3.0-or-later"),
    ("gfdl-1.2", "GFDL-1.2-only"),
    ("gfdl-1.2+", "GFDL-1.2-or-later"),
    ("gfdl-1.3", "GFDL-1.3-only"),
    ("gfdl-1.3+", "GFDL-1.3-or-later"),
    ("artistic", "Artistic-1.0-Perl"),
    ("artistic-2.0", "Artistic-2.0"),
    ("apache-2.0", "Apache-2.0"),
    ("expat", "MIT"),
    ("mit", "MIT"),
    ("x11", "X11"),
    ("isc", "ISC"),
    ("zlib", "Zlib"),
    ("bsd-2-clause", "BSD-2-Clause"),
    ("bsd-3-clause", "BSD-3-Clause"),
    ("bsd-4-clause", "BSD-4-Clause"),
    ("0bsd", "0BSD"),
    ("mpl-1.1", "MPL-1.1"),
    ("mpl-2.0", "MPL-2.0"),
    ("cc0-1.0", "CC0-1.0"),
    ("cc0", "CC0-1.0"),
    ("psf-2", "PSF-2.0"),
    ("python-2.0", "Python-2.0"),
    ("bsl-1.0", "BSL-1.0"),
    ("curl", "curl"),
    ("openssl", "OpenSSL"),
    ("fsfap", "FSFAP"),
    ("fsful", "FSFUL"),
    ("fsfullr", "FSFULLR"),
    ("unicode-dfs-2016", "Unicode-DFS-2016"),
    ("unlicense", "Unlicense"),
];

/// An SPDX licence expression for a licence as the package database states it, or `None`
/// when any part has no SPDX identifier vmic knows (then the SBOM says `NOASSERTION` and
/// keeps the database's text as a comment). rpm databases mostly hold SPDX already (Fedora,
/// Azure Linux 3); Debian's are DEP-5 short names joined by the agent with ` AND `.
pub fn spdx_license(stated: &str) -> Option<String> {
    let fields: Vec<&str> = stated.split(" AND ").collect();
    let mut parts = Vec::new();
    for field in &fields {
        let mut tokens = Vec::new();
        for token in field.split_whitespace() {
            let mapped = match token.to_ascii_lowercase().as_str() {
                "or" => "OR".to_string(),
                "and" => "AND".to_string(),
                lower => DEBIAN_TO_SPDX
                    .iter()
                    .find(|(debian, spdx)| *debian == lower || spdx.eq_ignore_ascii_case(lower))
                    .map(|(_, spdx)| spdx.to_string())?,
            };
            tokens.push(mapped);
        }
        let operand = |token: &String| token != "OR" && token != "AND";
        // Operators only between operands: `GPL-2+ or` is no expression.
        let well_formed = !tokens.is_empty()
            && tokens
                .iter()
                .enumerate()
                .all(|(index, token)| operand(token) == (index % 2 == 0))
            && tokens.len() % 2 == 1;
        if !well_formed {
            return None;
        }
        let text = tokens.join(" ");
        parts.push(if fields.len() > 1 && tokens.iter().any(|t| t == "OR") {
            format!("({text})")
        } else {
            text
        });
    }
    Some(parts.join(" AND "))
}

/// `[A-Za-z0-9.-]` only, as SPDX identifiers require.
fn spdx_id_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A package URL; `:` and `+` (Debian epochs and versions) percent-encoded as purl requires.
fn purl(manager: PackageManager, package: &InstalledPackage) -> Option<String> {
    let kind = match manager {
        PackageManager::Dpkg => "deb",
        PackageManager::Rpm => "rpm",
        PackageManager::Invalid => return None,
    };
    let encode = |text: &str| {
        text.chars()
            .map(|c| match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' | '_' | '~' => c.to_string(),
                other => {
                    let mut buffer = [0u8; 4];
                    other
                        .encode_utf8(&mut buffer)
                        .bytes()
                        .map(|b| format!("%{b:02X}"))
                        .collect()
                }
            })
            .collect::<String>()
    };
    Some(format!(
        "pkg:{kind}/{}@{}?arch={}",
        encode(&package.name),
        encode(&package.version),
        encode(&package.architecture)
    ))
}

/// The SPDX 2.3 JSON document: the output as the described package, containing each package
/// of `inventory`.
pub fn spdx_document(
    output: &Path,
    output_sha256: &str,
    inventory: &PackageInventory,
    epoch: u64,
) -> Value {
    let output_name = output.file_name().unwrap_or_default().to_string_lossy();
    let mut packages = vec![json!({
        "SPDXID": "SPDXRef-Output",
        "name": output_name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "checksums": [{"algorithm": "SHA256", "checksumValue": output_sha256}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Output",
    })];
    for (index, package) in inventory.packages.iter().enumerate() {
        let id = format!("SPDXRef-Package-{index}-{}", spdx_id_part(&package.name));
        let declared = package
            .license
            .as_deref()
            .and_then(spdx_license)
            .unwrap_or_else(|| "NOASSERTION".to_string());
        let mut entry = json!({
            "SPDXID": id,
            "name": package.name,
            "versionInfo": package.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": declared,
            "copyrightText": "NOASSERTION",
        });
        if let Some(stated) = &package.license {
            entry["licenseComments"] =
                json!(format!("as the package database states it: {stated}"));
        }
        if let Some(source) = &package.source {
            entry["sourceInfo"] = json!(format!("built from the source package {source}"));
        }
        if let Some(locator) = inventory.manager.and_then(|m| purl(m, package)) {
            entry["externalRefs"] = json!([{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": locator,
            }]);
        }
        packages.push(entry);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Output",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{output_name} packages"),
        // Unique per output and the same for a rebuild of it.
        "documentNamespace": format!("https://vmic.invalid/spdx/{output_sha256}"),
        "creationInfo": {
            "created": iso8601(epoch),
            "creators": [format!("Tool: vmic-{}", env!("CARGO_PKG_VERSION"))],
        },
        "documentDescribes": ["SPDXRef-Output"],
        "packages": packages,
        "relationships": relationships,
    })
}

/// sha256 (hex) of a file, streamed.
pub fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    Ok(hex::encode(sha256_file(path)?))
}

/// A file's sha256, read in a stream (outputs and cached ISOs are gigabytes).
pub fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let file = fs_err::File::open(path)?;
    Ok(vmic_protocol::sha256_reader(file)?)
}

/// A `--package-source` as the provenance records it: a file with its sha256, or a directory
/// with each regular file below it (sorted, paths relative to it).
pub fn package_source_record(path: &Path) -> anyhow::Result<Value> {
    if !path.is_dir() {
        return Ok(json!({"path": path, "sha256": sha256_hex(path)?}));
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs_err::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let relative = entry
                    .path()
                    .strip_prefix(path)
                    .expect("walked below the source")
                    .to_string_lossy()
                    .into_owned();
                files.push((relative, sha256_hex(&entry.path())?));
            }
        }
    }
    files.sort();
    let files: Vec<Value> = files
        .into_iter()
        .map(|(path, sha256)| json!({"path": path, "sha256": sha256}))
        .collect();
    Ok(json!({"path": path, "files": files}))
}

/// What `OUTPUT.provenance.json` records, beyond the output itself.
pub struct ProvenanceInputs<'a> {
    pub input: &'a Path,
    pub input_format: &'a str,
    pub input_sha256: &'a str,
    pub config: &'a Path,
    pub config_sha256: &'a str,
    pub package_sources: Vec<Value>,
    pub disable_base_image_repos: bool,
    /// ISO outputs: the requested compression (`auto`: the agent's choice) and threads.
    pub squashfs: Option<(String, u32)>,
    /// `None` for disk outputs, which are not clamped.
    pub source_date_epoch: Option<u64>,
    pub source_date_epoch_given: bool,
    pub packages: &'a PackageInventory,
}

pub fn provenance_document(
    output: &Path,
    output_format: &str,
    output_sha256: &str,
    inputs: &ProvenanceInputs<'_>,
) -> Value {
    let manager = match inputs.packages.manager {
        Some(PackageManager::Dpkg) => Some("dpkg"),
        Some(PackageManager::Rpm) => Some("rpm"),
        _ => None,
    };
    json!({
        "format": PROVENANCE_FORMAT,
        "vmic_version": env!("CARGO_PKG_VERSION"),
        "output": {
            "file": output.file_name().unwrap_or_default().to_string_lossy(),
            "format": output_format,
            "sha256": output_sha256,
        },
        "input": {
            "path": inputs.input,
            "format": inputs.input_format,
            "sha256": inputs.input_sha256,
        },
        "config": {"path": inputs.config, "sha256": inputs.config_sha256},
        "package_sources": inputs.package_sources,
        "disable_base_image_repos": inputs.disable_base_image_repos,
        "squashfs": inputs.squashfs.as_ref().map(|(compression, threads)| json!({
            "compression": compression,
            "threads": threads,
        })),
        "source_date_epoch": inputs.source_date_epoch,
        "source_date_epoch_from": inputs.source_date_epoch.map(|_| {
            if inputs.source_date_epoch_given { "option or environment" } else { "input" }
        }),
        "packages": {"manager": manager, "count": inputs.packages.packages.len()},
    })
}

/// Write each `(suffix, content)` beside `output` under a partial name; returns the
/// `(partial, final)` pairs for the caller to rename once the output itself is in place.
pub fn write_partial_sidecars(
    output: &Path,
    files: &[(&str, String)],
) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut written = Vec::new();
    for (suffix, content) in files {
        let target = sidecar_path(output, suffix);
        let partial = crate::rundir::partial_path(&target);
        fs_err::write(&partial, content)
            .with_context(|| format!("writing {}", target.display()))?;
        written.push((partial, target));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licences_map_to_spdx_or_nothing() {
        let cases = [
            ("GPL-2+", Some("GPL-2.0-or-later")),
            (
                "GPL-2+ AND BSD-3-clause",
                Some("GPL-2.0-or-later AND BSD-3-Clause"),
            ),
            (
                "GPL-2+ or Artistic",
                Some("GPL-2.0-or-later OR Artistic-1.0-Perl"),
            ),
            (
                "GPL-2+ or Artistic AND Expat",
                Some("(GPL-2.0-or-later OR Artistic-1.0-Perl) AND MIT"),
            ),
            ("GPL-3.0-or-later", Some("GPL-3.0-or-later")),
            ("public-domain", None),
            ("GPL-2+ with OpenSSL exception", None),
            ("GPL-2+ or", None),
            ("", None),
        ];
        for (stated, expected) in cases {
            assert_eq!(spdx_license(stated).as_deref(), expected, "{stated}");
        }
    }

    #[test]
    fn dates_and_names() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(
            sidecar_path(Path::new("/out/live.iso"), SPDX_SUFFIX),
            Path::new("/out/live.iso.spdx.json")
        );
        assert_eq!(
            sha256sum_line("ab", Path::new("/out/live.iso")),
            "ab  live.iso\n"
        );
        assert_eq!(spdx_id_part("libstdc++6"), "libstdc--6");
    }

    #[test]
    fn sbom_lists_every_package_once_under_the_output() {
        let package = |name: &str, version: &str, license: Option<&str>| InstalledPackage {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            license: license.map(str::to_owned),
            source: None,
        };
        let inventory = PackageInventory {
            manager: Some(PackageManager::Dpkg),
            packages: vec![
                package("bash", "5.2.15-2+b7", Some("GPL-3+")),
                package("libc6", "2.36-9", Some("public-domain")),
                package("systemd", "1:252", None),
            ],
        };
        let doc = spdx_document(Path::new("/o/live.iso"), "abcd", &inventory, 1_700_000_000);
        let packages = doc["packages"].as_array().expect("packages");
        assert_eq!(packages.len(), 4, "the output and its three packages");
        assert_eq!(packages[1]["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(packages[2]["licenseDeclared"], "NOASSERTION");
        assert_eq!(
            packages[3]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/systemd@1%3A252?arch=amd64"
        );
        let contains = doc["relationships"]
            .as_array()
            .expect("relationships")
            .iter()
            .filter(|r| r["relationshipType"] == "CONTAINS")
            .count();
        assert_eq!(contains, 3);
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            doc,
            spdx_document(Path::new("/o/live.iso"), "abcd", &inventory, 1_700_000_000),
            "no clock, no randomness"
        );
    }
}
