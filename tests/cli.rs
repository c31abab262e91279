//! CLI tests: `vmic validate-config` and `vmic schema` as a user runs them.

mod common;

use std::path::PathBuf;

use assert_cmd::Command;
use common::customize_args;
use predicates::prelude::*;
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/config")
        .join(name)
}

fn vmic() -> Command {
    Command::cargo_bin("vmic").expect("the vmic binary is built for tests")
}

#[test]
fn validate_config_accepts_the_seed_examples() {
    for name in [
        "cloud-init/iso-map.yaml",
        "cloud-init/iso-list.yaml",
        "cloud-init/rootfs-map.yaml",
        "cloud-init/rootfs-list.yaml",
    ] {
        let path = fixture(name);
        vmic()
            .args([
                "validate-config",
                "--output-image-format",
                "iso",
                "--config-file",
            ])
            .arg(&path)
            .assert()
            .success()
            .stdout("")
            .stderr(format!("ok: {}\n", path.display()));
    }
}

/// `VMIC_NO_CACHE` takes the spellings CI files use, and every subcommand runs beside it
/// (`customize`'s flags are the top level's too, so a bad value broke `vmic boot`).
#[test]
fn the_no_cache_variable_takes_the_usual_spellings_under_every_command() {
    let path = fixture("cloud-init/iso-map.yaml");
    for value in ["1", "true", "yes", "0", "false", "no"] {
        vmic()
            .env("VMIC_NO_CACHE", value)
            .args([
                "validate-config",
                "--output-image-format",
                "iso",
                "--config-file",
            ])
            .arg(&path)
            .assert()
            .success();
        vmic()
            .env("VMIC_NO_CACHE", value)
            .args(["boot", "--help"])
            .assert()
            .success();
    }
    vmic()
        .env("VMIC_NO_CACHE", "maybe")
        .args(["validate-config", "--config-file"])
        .arg(&path)
        .assert()
        .failure()
        .stderr(
            predicates::str::contains("VMIC_NO_CACHE").or(predicates::str::contains("no-cache")),
        );
}

#[test]
fn validate_config_lists_every_error_with_file_line_column_and_path() {
    let path = fixture("bad/several-errors.yaml");
    let file = path.display().to_string();
    vmic()
        .args(["validate-config", "--config-file"])
        .arg(&path)
        .assert()
        .code(2)
        .stdout("")
        .stderr(format!(
            "{file}:2:13: os.hostname: invalid host name \"-not-a-label-\": label \
             \"-not-a-label-\" starts or ends with a hyphen; allowed: DNS labels of 1-63 \
             letters, digits and hyphens (not at either end), separated by dots\n\
             {file}:3:3: os.colour: unknown key; allowed here: additionalDirs, additionalFiles, \
             bootloader, groups, hostname, imageHistory, kernelCommandLine, modules, overlays, \
             packages, selinux, services, uki, users\n\
             {file}:8:7: iso.kernelCommandLine.extraCommandLine[1]: empty kernel argument; each \
             argument must be non-empty text such as `console=ttyS0`\n"
        ));
}

#[test]
fn validate_config_checks_iso_settings_against_the_output_format() {
    let path = fixture("cloud-init/iso-map.yaml");
    vmic()
        .args([
            "validate-config",
            "--output-image-format",
            "raw",
            "--config-file",
        ])
        .arg(&path)
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with(format!(
            "{}:8:1: iso: `iso` settings need ISO output, but the output format is raw",
            path.display()
        )));
}

#[test]
fn validate_config_warns_about_settings_the_build_cannot_do_yet() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("cfg.yaml");
    fs_err::write(
        &path,
        "previewFeatures: [uki]\nos:\n  hostname: ok\n  uki:\n    mode: create\n",
    )
    .expect("write config");
    vmic()
        .args(["validate-config", "--config-file"])
        .arg(&path)
        .assert()
        .success()
        .stderr(format!(
            "warning: {0}:4:3: os.uki: not supported yet: os.uki\nok: {0}\n",
            path.display()
        ));
}

#[test]
fn validate_config_reports_a_missing_file() {
    vmic()
        .args(["validate-config", "--config-file", "/nonexistent/vmic.yaml"])
        .assert()
        .code(2)
        .stderr("/nonexistent/vmic.yaml: cannot read the config file: entity not found\n");
}

fn schema() -> serde_json::Value {
    let output = vmic().arg("schema").output().expect("run vmic schema");
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).expect("vmic schema prints JSON")
}

#[test]
fn schema_is_valid_json_schema_and_checks_configs() {
    let schema = schema();
    assert!(
        jsonschema::meta::is_valid(&schema),
        "not a valid JSON Schema"
    );
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");

    let list_form = json!({
        "iso": {
            "additionalFiles": [
                {"source": "cloud-init-data/user-data", "destination": "/cloud-init-data/user-data"},
                {"content": "x", "destination": "/x", "permissions": "0644"}
            ],
            "kernelCommandLine": {"extraCommandLine": ["ds=nocloud"]}
        },
        "os": {"hostname": "vmic", "kernelCommandLine": {"extraCommandLine": "quiet splash"}},
        "scripts": {"postCustomization": [{"content": "true", "name": "noop"}]},
        "output": {"image": {"format": "iso", "path": "out.iso"}},
        "previewFeatures": []
    });
    assert!(validator.is_valid(&list_form), "list form rejected");

    let map_form = json!({
        "os": {"additionalFiles": {
            "cloud-init-data/user-data": "/var/lib/cloud/seed/nocloud/user-data",
            "files/a": {"path": "/a", "permissions": "0600"},
            "files/b": ["/b1", {"path": "/b2"}]
        }}
    });
    assert!(validator.is_valid(&map_form), "map form rejected");

    for bad in [
        json!({"colour": "blue"}),
        json!({"iso": {"kernelCommandLine": {"extra": "x"}}}),
        json!({"os": {"additionalFiles": [{"source": "a", "destination": "/a", "mode": "x"}]}}),
        json!({"output": {"image": {"format": "zip"}}}),
        json!({"os": {"hostname": ["a"]}}),
    ] {
        assert!(!validator.is_valid(&bad), "accepted {bad}");
    }
}

/// `customize` with bad build options exits 2 before anything starts (no VM, no build dir).
#[test]
fn customize_refuses_bad_build_options_before_starting() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(1 << 20))
        .expect("raw image");
    let config = dir.path().join("cfg.yaml");
    fs_err::write(&config, "os:\n  hostname: ok\n").expect("write config");
    let build_dir = dir.path().join("build");
    let run = |extra: &[&str]| {
        vmic()
            .args(customize_args(
                &image,
                &config,
                &build_dir,
                dir.path().join("out.iso"),
                "iso",
            ))
            .args(extra)
            .assert()
            .code(2)
    };
    run(&["--squashfs-compression", "brotli"]).stderr(predicate::str::contains(
        "--squashfs-compression brotli: unknown compressor brotli",
    ));
    run(&["--squashfs-compression", "zstd:30"])
        .stderr(predicate::str::contains("use a level from 1 to 22"));
    run(&["--package-source", "/nonexistent/debs"]).stderr(predicate::str::contains(
        "--package-source /nonexistent/debs does not exist",
    ));
    assert!(!build_dir.exists(), "nothing was started");
    assert!(!dir.path().join("out.iso").exists());
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(fs_err::read(path).expect("read")))
}

fn qemu_img(args: &[&str]) {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img {args:?}");
}

/// A PATH whose `qemu-system-*` only records that it was started (qemu-img stays the real
/// one, found further down the PATH).
fn path_with_recording_qemu(dir: &std::path::Path, marker: &std::path::Path) -> std::ffi::OsString {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("fake-bin");
    fs_err::create_dir_all(&bin).expect("mkdir");
    for name in ["qemu-system-x86_64", "qemu-system-aarch64"] {
        let script = bin.join(name);
        fs_err::write(
            &script,
            format!(
                "#!/bin/sh\necho started >> '{}'\nexit 1\n",
                marker.display()
            ),
        )
        .expect("write");
        fs_err::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut path = bin.into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path
}

/// Issue 10: an input whose header names another file (a host "secret" as backing file, an
/// external data file, a `json:` backing spec) is refused before anything starts: exit 2, the
/// reference named with the flattening command, the input unchanged, no output or partial
/// file, no build directory, QEMU never run.
#[test]
fn inputs_that_name_other_files_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret = dir.path().join("secret.raw");
    fs_err::write(&secret, vec![0x5a; 1 << 20]).expect("secret");
    let secret = secret.to_str().expect("utf-8 path");
    let json =
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}"#);
    let data_file = dir.path().join("data.raw");
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        (
            "backing.qcow2",
            vec!["-b".into(), secret.into(), "-F".into(), "raw".into()],
            format!("the backing file \"{secret}\""),
        ),
        (
            "data-file.qcow2",
            vec![
                "-o".into(),
                format!("data_file={}", data_file.display()),
                "-u".into(),
            ],
            format!("the external data file \"{}\"", data_file.display()),
        ),
        (
            "json.qcow2",
            vec![
                "-u".into(),
                "-b".into(),
                json.clone(),
                "-F".into(),
                "raw".into(),
            ],
            "the backing file \"json:{".into(),
        ),
    ];
    let config = dir.path().join("cfg.yaml");
    fs_err::write(&config, "os:\n  hostname: ok\n").expect("write config");
    let marker = dir.path().join("qemu-started");
    let path = path_with_recording_qemu(dir.path(), &marker);
    for (name, options, named) in cases {
        let image = dir.path().join(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend(options.iter().map(String::as_str));
        args.extend([image.to_str().expect("utf-8"), "1M"]);
        qemu_img(&args);
        let before = sha256(&image);
        let output = dir.path().join(format!("{name}.iso"));
        let build_dir = dir.path().join(format!("{name}.build"));
        let customize = vmic()
            .env("PATH", &path)
            .args(customize_args(&image, &config, &build_dir, &output, "iso"))
            .assert()
            .code(2);
        let stderr = String::from_utf8_lossy(&customize.get_output().stderr).into_owned();
        assert!(stderr.contains(&named), "{name}: {stderr}");
        assert!(
            stderr.contains("qemu-img convert -O qcow2 in.qcow2 flat.qcow2"),
            "{name}: {stderr}"
        );
        let boot = vmic()
            .env("PATH", &path)
            .arg("boot")
            .arg("--image-file")
            .arg(&image)
            .args(["--timeout", "5"])
            .assert()
            .code(2);
        let stderr = String::from_utf8_lossy(&boot.get_output().stderr).into_owned();
        assert!(stderr.contains(&named), "boot {name}: {stderr}");
        assert_eq!(sha256(&image), before, "{name}: the input is unchanged");
        assert!(!output.exists(), "{name}: no output");
        let leftovers: Vec<_> = fs_err::read_dir(dir.path())
            .expect("list")
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().contains("vmic-partial"))
            .collect();
        assert!(leftovers.is_empty(), "{name}: partial files {leftovers:?}");
        assert!(!build_dir.exists(), "{name}: nothing was started");
    }
    assert!(!marker.exists(), "QEMU was started");
    assert_eq!(fs_err::read(secret).expect("secret"), vec![0x5a; 1 << 20]);
}

/// Issue 10: the config directory uploads only what belongs to it. A symlink to a host file
/// outside it is refused naming the link; `a -> .` and `b -> .` are found at once (not walked
/// forever); in both cases QEMU never starts and no output is left.
#[test]
fn config_dirs_with_outside_links_or_loops_fail_fast_and_start_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(1 << 20))
        .expect("raw image");
    fs_err::write(dir.path().join("secret"), "host secret").expect("secret");
    let marker = dir.path().join("qemu-started");
    let path = path_with_recording_qemu(dir.path(), &marker);
    /// (case, symlinks as (name, target), what stderr says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 2] = [
        (
            "outside",
            &[("innocent.txt", "../secret")],
            "innocent.txt is a symlink to",
        ),
        ("loop", &[("a", "."), ("b", ".")], "a symlink loop"),
    ];
    for (name, links, expected) in cases {
        let config_dir = dir.path().join(name);
        fs_err::create_dir_all(&config_dir).expect("mkdir");
        for (link, target) in links {
            std::os::unix::fs::symlink(target, config_dir.join(link)).expect("symlink");
        }
        let config = config_dir.join("cfg.yaml");
        fs_err::write(&config, "os:\n  hostname: ok\n").expect("write config");
        let output = dir.path().join(format!("{name}.iso"));
        let started = std::time::Instant::now();
        let run = vmic()
            .env("PATH", &path)
            .args(customize_args(
                &image,
                &config,
                dir.path().join(format!("{name}.build")),
                &output,
                "iso",
            ))
            .timeout(std::time::Duration::from_secs(60))
            .assert()
            .failure();
        let stderr = String::from_utf8_lossy(&run.get_output().stderr).into_owned();
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{name}: took {:?}",
            started.elapsed()
        );
        assert!(!output.exists(), "{name}: no output");
    }
    assert!(!marker.exists(), "QEMU was started");
}

/// `customize` as a new user types it, with `args` added; its assertion handle.
fn customize_qcow2(
    image: &std::path::Path,
    config: &std::path::Path,
    build_dir: &std::path::Path,
    output: &std::path::Path,
    path: &std::ffi::OsStr,
) -> assert_cmd::assert::Assert {
    vmic()
        .env("PATH", path)
        .args(customize_args(image, config, build_dir, output, "qcow2"))
        .assert()
}

#[test]
fn an_output_that_is_the_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().expect("utf-8"),
        "1M",
    ]);
    let before = sha256(&image);
    let config = dir.path().join("cfg.yaml");
    fs_err::write(&config, "os:\n  hostname: ok\n").expect("write config");
    let symlink = dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&image, &symlink).expect("symlink");
    let hard_link = dir.path().join("hard.qcow2");
    fs_err::hard_link(&image, &hard_link).expect("hard link");
    let marker = dir.path().join("qemu-started");
    let path = path_with_recording_qemu(dir.path(), &marker);
    let build_dir = dir.path().join("build");
    for output in [&image, &symlink, &hard_link] {
        let assert = customize_qcow2(&image, &config, &build_dir, output, &path).code(2);
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
        assert!(
            stderr.contains("is the input image") && stderr.contains("never writes its input"),
            "{}: {stderr}",
            output.display()
        );
        assert_eq!(sha256(&image), before, "the input is unchanged");
        assert!(!marker.exists(), "QEMU never started");
        assert!(!build_dir.exists(), "nothing was created");
        assert!(
            !dir.path().join(".disk.qcow2.vmic-partial").exists()
                && !dir.path().join(".link.qcow2.vmic-partial").exists()
                && !dir.path().join(".hard.qcow2.vmic-partial").exists(),
            "no partial output"
        );
    }
    // An output inside the build directory, and one that is a directory.
    let inside = build_dir.join("out.qcow2");
    let assert = customize_qcow2(&image, &config, &build_dir, &inside, &path).code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("is inside the build directory"), "{stderr}");
    let assert = customize_qcow2(&image, &config, &build_dir, dir.path(), &path).code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("is an existing directory"), "{stderr}");
    assert_eq!(sha256(&image), before);
}

#[test]
fn a_second_vmic_on_a_busy_build_directory_exits_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().expect("utf-8"),
        "1M",
    ]);
    let config = dir.path().join("cfg.yaml");
    fs_err::write(&config, "os:\n  hostname: ok\n").expect("write config");
    let build_dir = dir.path().join("build");
    // The first vmic: this process holds the build directory's lock.
    let held = vmic::rundir::BuildDir::acquire(&build_dir).expect("lock");
    let marker = dir.path().join("qemu-started");
    let path = path_with_recording_qemu(dir.path(), &marker);
    let output = dir.path().join("out.qcow2");
    let started = std::time::Instant::now();
    let assert = customize_qcow2(&image, &config, &build_dir, &output, &path).code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!("is in use by vmic pid {}", std::process::id())),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused at once"
    );
    assert!(!marker.exists(), "QEMU never started");
    assert!(
        held.run_dir().is_dir(),
        "the first run's files are untouched"
    );
    assert!(!output.exists());
}
