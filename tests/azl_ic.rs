//! Image Customizer configs as their users write them: `vmic validate-config` over the corpus in
//! `tests/fixtures/azl-ic/`, each file with its expected verdict in `# expect:` comments.
//!
//! - `# expect: ok`: accepted, no warning;
//! - `# expect: warning: TEXT`: accepted, and a `warning:` line contains TEXT;
//! - `# expect: error: TEXT`: refused (exit 2), and an error line contains TEXT.
//!
//! `{dir}` in TEXT stands for the corpus directory; `# args:` adds command line arguments.
//! Warnings and errors are also checked the other way round: every line vmic prints must be
//! one the file expects, so a new unexpected complaint fails the test too.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/azl-ic")
}

#[derive(Debug)]
enum Verdict {
    Ok,
    Warning(String),
    Error(String),
}

fn expectations(path: &Path, dir: &str) -> (Vec<String>, Vec<Verdict>) {
    let text = fs_err::read_to_string(path).expect("read corpus file");
    let mut args = Vec::new();
    let mut verdicts = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# args: ") {
            args.extend(rest.split_whitespace().map(str::to_owned));
        }
        let Some(rest) = line.strip_prefix("# expect: ") else {
            continue;
        };
        let rest = rest.replace("{dir}", dir);
        verdicts.push(if rest == "ok" {
            Verdict::Ok
        } else if let Some(text) = rest.strip_prefix("warning: ") {
            Verdict::Warning(text.to_owned())
        } else if let Some(text) = rest.strip_prefix("error: ") {
            Verdict::Error(text.to_owned())
        } else {
            panic!("{}: bad expectation {rest:?}", path.display())
        });
    }
    assert!(
        !verdicts.is_empty(),
        "{} has no `# expect:` line",
        path.display()
    );
    (args, verdicts)
}

#[test]
fn validate_config_gives_each_corpus_file_its_expected_verdict() {
    let dir = corpus();
    let dir_text = fs_err::canonicalize(&dir)
        .expect("corpus dir")
        .display()
        .to_string();
    let mut files: Vec<PathBuf> = fs_err::read_dir(&dir)
        .expect("list corpus")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "corpus shrank: {} files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        // Through the canonical path, so `{dir}` matches the paths vmic prints.
        let file = fs_err::canonicalize(file).expect("canonical corpus file");
        let (args, verdicts) = expectations(&file, &dir_text);
        let output = Command::cargo_bin("vmic")
            .expect("vmic binary")
            .arg("validate-config")
            .args(&args)
            .arg("--config-file")
            .arg(&file)
            .output()
            .expect("run vmic");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let code = output.status.code();
        let refused = verdicts.iter().any(|v| matches!(v, Verdict::Error(_)));
        let mut problems = Vec::new();
        if stderr.contains("unknown key") {
            problems.push("an Image Customizer key is unknown to vmic".to_owned());
        }
        match (refused, code) {
            (true, Some(2)) | (false, Some(0)) => {}
            _ => problems.push(format!("exit code {code:?}, expected refused={refused}")),
        }
        for verdict in &verdicts {
            let found = match verdict {
                Verdict::Ok => stderr == format!("ok: {}\n", file.display()),
                Verdict::Warning(text) => stderr
                    .lines()
                    .any(|line| line.starts_with("warning: ") && line.contains(text.as_str())),
                Verdict::Error(text) => stderr
                    .lines()
                    .any(|line| !line.starts_with("warning: ") && line.contains(text.as_str())),
            };
            if !found {
                problems.push(format!("missing {verdict:?}"));
            }
        }
        // Every complaint printed is one the file expects.
        for line in stderr.lines().filter(|line| !line.starts_with("ok: ")) {
            let expected = verdicts.iter().any(|verdict| match verdict {
                Verdict::Warning(text) | Verdict::Error(text) => line.contains(text.as_str()),
                Verdict::Ok => false,
            });
            if !expected && !line.starts_with("hint: ") && !line.starts_with("error: ") {
                problems.push(format!("unexpected line {line:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  {}\n  stderr:\n{stderr}",
                file.display(),
                problems.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The corpus covers every Image Customizer key this release added to vmic's schema.
#[test]
fn the_corpus_covers_every_new_key() {
    let mut text = String::new();
    for entry in fs_err::read_dir(corpus()).expect("list corpus") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            text.push_str(&fs_err::read_to_string(&path).expect("read"));
        }
    }
    for key in [
        "baseConfigs:",
        "reinitializeVerity:",
        "dataDevice:",
        "dataDeviceMountIdType:",
        "hashDevice:",
        "btrfs:",
        "subvolumes:",
        "quota:",
        "mountPoint: /",
        "bootType: legacy",
        "uki:",
        "mode: passthrough",
        "imageHistory: none",
        "snapshotTime:",
        "removePackageManager:",
        "lowerDirs:",
        "pxe:",
        "bootstrapBaseUrl:",
        "bootstrapFileUrl:",
        "initramfsType: full-os",
        "kdumpBootFiles:",
        "oci:",
        "platform:",
        "azureLinux:",
        "selinuxPolicyPath:",
        "artifacts:",
        "cosi:",
        "format: pxe-dir",
        "format: pxe-tar",
        "previewFeatures:",
        "sshPublicKeyPaths:",
        "sshPublicKeys:",
    ] {
        assert!(text.contains(key), "no corpus file uses {key:?}");
    }
}
