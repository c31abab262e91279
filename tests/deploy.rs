//! Where users run vmic: the Kubernetes manifests and the GitHub Actions workflow under
//! `deploy/` checked by real validators (PyPI `kubernetes-validate`; PyPI `check-jsonschema`
//! with its vendored SchemaStore `github-workflows` schema, installed by `scripts/setup` into
//! `~/.cache/vmic/deploy-venv`), the orphan watchdog that replaces PDEATHSIG on macOS, the shell
//! completions and man pages generated from the clap definitions and installed by
//! `scripts/install`, and a builder VM image moved with `vmic guest-image export/import` that
//! then runs a build.
//!
//! Each validator is also shown a broken copy and must reject it, so a validator that checks
//! nothing fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use common::{customize_args, path_str, vm_slot, vmic, work_dir};

fn deploy(path: &str) -> PathBuf {
    common::repo().join("deploy").join(path)
}

/// A validator from the deploy venv (`$VMIC_DEPLOY_VENV`, else `~/.cache/vmic/deploy-venv`).
fn validator(name: &str) -> PathBuf {
    let venv = std::env::var_os("VMIC_DEPLOY_VENV").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/vmic/deploy-venv")
        },
        PathBuf::from,
    );
    let path = venv.join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup (it installs kubernetes-validate and check-jsonschema)",
        path.display()
    );
    path
}

/// Run a validator on files; returns (success, stdout + stderr).
fn validate(program: &Path, args: &[&str], files: &[&Path]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .args(files)
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("reading a deploy file");
    serde_saphyr::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn mebibytes(quantity: &str) -> u64 {
    if let Some(gib) = quantity.strip_suffix("Gi") {
        gib.parse::<u64>().expect("a whole number of Gi") * 1024
    } else if let Some(mib) = quantity.strip_suffix("Mi") {
        mib.parse().expect("a whole number of Mi")
    } else {
        panic!("memory quantity {quantity:?} is not in Gi or Mi")
    }
}

#[test]
fn kubernetes_manifests_validate_and_run_unprivileged_sized_to_the_vm() {
    let checker = validator("kubernetes-validate");
    let files =
        ["pvc.yaml", "configmap.yaml", "job.yaml"].map(|name| deploy(&format!("k8s/{name}")));
    let file_refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&checker, &["--strict"], &file_refs);
    assert!(ok, "kubernetes-validate rejected deploy/k8s:\n{report}");

    // The validator really checks: a misspelled field and a wrong type are refused.
    let work = work_dir();
    let job_text = std::fs::read_to_string(&files[2]).expect("reading job.yaml");
    for (name, broken) in [
        (
            "typo",
            job_text.replace("allowPrivilegeEscalation:", "allowPrivilegeEscalaton:"),
        ),
        (
            "type",
            job_text.replace("completions: 4", "completions: four"),
        ),
    ] {
        assert_ne!(broken, job_text, "the {name} mutation applies");
        let path = work.path().join(format!("job-{name}.yaml"));
        std::fs::write(&path, broken).expect("writing a broken job");
        let (ok, report) = validate(&checker, &["--strict"], &[&path]);
        assert!(
            !ok,
            "kubernetes-validate accepted the broken ({name}) job:\n{report}"
        );
    }

    // What the schema cannot say: no privilege, and requests that fit the builder VM.
    let job = yaml(&files[2]);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["runAsUser"], 10001,
        "the image's UID"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one builder VM per pod");
    let container = &containers[0];
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(security.get("privileged").is_none() && security["capabilities"].get("add").is_none());
    let env = |name: &str| -> u64 {
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|var| var["name"] == name)
            .and_then(|var| var["value"].as_str())
            .unwrap_or_else(|| panic!("env {name}"))
            .parse()
            .expect("a number")
    };
    let requests = &container["resources"]["requests"];
    let cpus: u64 = requests["cpu"]
        .as_str()
        .expect("cpu request")
        .parse()
        .expect("whole CPUs");
    assert_eq!(cpus, env("VM_CPUS"), "one host CPU per vCPU");
    let memory = mebibytes(requests["memory"].as_str().expect("memory request"));
    assert!(
        memory >= env("VM_MEMORY") + 512,
        "memory request {memory} MiB leaves QEMU's ~512 MiB beside --vm-memory {}",
        env("VM_MEMORY")
    );
    assert_eq!(
        container["resources"]["limits"]["memory"], requests["memory"],
        "memory limit = request (a VM's memory is not elastic)"
    );
    // Every writable path is a volume (the root file system is read-only).
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|mount| mount["mountPath"].as_str().expect("mountPath"))
        .collect();
    for path in ["/work", "/tmp", "/outputs"] {
        assert!(mounts.contains(&path), "{path} is a volume: {mounts:?}");
    }
    // completions = the number of build lines, each with a config that exists.
    let config_map = yaml(&files[1]);
    let builds = config_map["data"]["builds.tsv"]
        .as_str()
        .expect("builds.tsv");
    let lines: Vec<&str> = builds
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(job["spec"]["completions"], lines.len());
    let mut arches = std::collections::BTreeSet::new();
    for line in &lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 4, "name, arch, image, config: {line:?}");
        arches.insert(fields[1]);
        let config = config_map["data"][fields[3]]
            .as_str()
            .unwrap_or_else(|| panic!("{line:?}: config"));
        let path = work.path().join(fields[3]);
        std::fs::write(&path, config).expect("writing a config");
        vmic()
            .args([
                "validate-config",
                "--output-image-format",
                "iso",
                "--config-file",
            ])
            .arg(&path)
            .assert()
            .success();
    }
    assert_eq!(
        arches.into_iter().collect::<Vec<_>>(),
        ["aarch64", "x86_64"]
    );
}

const WORKFLOW_SCHEMA: [&str; 2] = ["--builtin-schema", "vendor.github-workflows"];

#[test]
fn github_workflow_matches_the_schema_with_an_arch_matrix() {
    let checker = validator("check-jsonschema");
    let workflow = deploy("github/vmic.yml");
    let (ok, report) = validate(&checker, &WORKFLOW_SCHEMA, &[&workflow]);
    assert!(
        ok,
        "check-jsonschema rejected deploy/github/vmic.yml:\n{report}"
    );

    let text = std::fs::read_to_string(&workflow).expect("reading the workflow");
    let work = work_dir();
    for (name, broken) in [
        (
            "runner",
            text.replace("runs-on: ubuntu-24.04", "runs-on: [ubuntu-24.04, 42]"),
        ),
        ("key", text.replace("    runs-on:", "    run-on:")),
        (
            "type",
            text.replace("timeout-minutes: 90", "timeout-minutes: ninety"),
        ),
    ] {
        assert_ne!(broken, text, "the {name} mutation applies");
        let path = work.path().join(format!("{name}.yml"));
        std::fs::write(&path, broken).expect("writing a broken workflow");
        let (ok, report) = validate(&checker, &WORKFLOW_SCHEMA, &[&path]);
        assert!(
            !ok,
            "check-jsonschema accepted the broken ({name}) workflow:\n{report}"
        );
    }

    let parsed = yaml(&workflow);
    let job = &parsed["jobs"]["build"];
    assert_eq!(
        job["strategy"]["matrix"]["arch"],
        serde_json::json!(["x86_64", "aarch64"])
    );
    // What the schema cannot see (actionlint would): every `matrix.X` used is a matrix key.
    let keys = job["strategy"]["matrix"].as_object().expect("matrix");
    let mut used = 0;
    for (position, _) in text.match_indices("matrix.") {
        let name: String = text[position + "matrix.".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        assert!(
            keys.contains_key(&name),
            "matrix.{name} is not a matrix key"
        );
        used += 1;
    }
    assert!(used >= 5, "the steps use the matrix ({used} references)");
    let steps = serde_json::to_string(&job["steps"]).expect("steps");
    for needle in [
        "--cap-drop=all",
        "no-new-privileges",
        "--arch",
        "upload-artifact",
    ] {
        assert!(steps.contains(needle), "the workflow's steps use {needle}");
    }
    assert!(!steps.contains("--privileged"));
}

/// Every subcommand's name, nested ones as `parent child`, from the clap definitions.
fn subcommands() -> Vec<(String, Vec<String>)> {
    vmic::cli::Cli::command()
        .get_subcommands()
        .map(|command| {
            let children = command
                .get_subcommands()
                .map(|child| child.get_name().to_string())
                .collect();
            (command.get_name().to_string(), children)
        })
        .collect()
}

#[test]
fn completions_and_man_pages_cover_every_command_and_install_under_a_prefix() {
    let commands = subcommands();
    assert!(commands.len() >= 8, "{commands:?}");
    for shell in ["bash", "zsh", "fish"] {
        let script = vmic()
            .args(["completions", shell])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let script = String::from_utf8(script).expect("UTF-8 completions");
        for (command, children) in &commands {
            assert!(
                script.contains(command.as_str()),
                "{shell} completion names {command}"
            );
            for child in children {
                assert!(
                    script.contains(child.as_str()),
                    "{shell} completion names {command} {child}"
                );
            }
        }
        assert!(
            script.contains("output-image-format"),
            "{shell} completes options too"
        );
    }
    // bash really loads it and registers the completion function.
    let registered = common::run(
        "bash",
        &[
            "-c",
            &format!(
                "source <({} completions bash) && complete -p vmic",
                path_str(&assert_cmd::cargo::cargo_bin("vmic"))
            ),
        ],
    );
    assert!(registered.contains("vmic"), "{registered}");

    let page = vmic()
        .arg("man")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let page = String::from_utf8(page).expect("UTF-8 man page");
    assert!(
        page.starts_with(".ie") || page.contains(".TH vmic 1"),
        "roff: {}",
        &page[..200.min(page.len())]
    );
    for (command, _) in &commands {
        assert!(
            page.contains(&command.replace('-', "\\-")),
            "vmic.1 lists {command}"
        );
    }

    // scripts/install puts everything where shells and man look for it.
    let work = work_dir();
    let prefix = work.path().join("prefix");
    let binary = assert_cmd::cargo::cargo_bin("vmic");
    common::run(
        path_str(&common::repo().join("scripts/install")),
        &["--prefix", path_str(&prefix), "--binary", path_str(&binary)],
    );
    for file in [
        "bin/vmic",
        "share/bash-completion/completions/vmic",
        "share/zsh/site-functions/_vmic",
        "share/fish/vendor_completions.d/vmic.fish",
        "share/man/man1/vmic.1",
        "share/man/man1/vmic-guest-image-import.1",
    ] {
        assert!(prefix.join(file).is_file(), "scripts/install wrote {file}");
    }
    for (command, children) in &commands {
        let page = prefix.join(format!("share/man/man1/vmic-{command}.1"));
        assert!(page.is_file(), "a page for {command}");
        for child in children {
            assert!(prefix
                .join(format!("share/man/man1/vmic-{command}-{child}.1"))
                .is_file());
        }
    }
    // man renders the installed pages (man -l reads a file; plain text, no pager).
    let rendered = Command::new("man")
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .args(["-l"])
        .arg(prefix.join("share/man/man1/vmic-guest-image-export.1"))
        .output()
        .expect("running man -l");
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    assert!(
        text.contains("vmic-guest-image-export") && text.contains("--arch"),
        "{text}"
    );
}

#[test]
fn guest_image_export_import_then_build_with_the_imported_image() {
    let work = work_dir();
    let tarball = work.path().join("guest-x86_64.tar");
    // The machine's built image (scripts/setup) is the source.
    vmic()
        .args(["guest-image", "export", "--arch", "x86_64"])
        .arg(&tarball)
        .assert()
        .success();
    let imported = work.path().join("imported");
    vmic()
        .args(["guest-image", "import"])
        .arg(&tarball)
        .env("VMIC_GUEST_IMAGE_DIR", &imported)
        .assert()
        .success();
    let source = vmic::guest_image::find(vmic::cli::Arch::X86_64).expect("the built x86_64 image");
    for name in ["kernel", "initramfs", "manifest.json"] {
        assert_eq!(
            common::sha256_of(&source.dir.join(name)),
            common::sha256_of(&imported.join("x86_64").join(name)),
            "imported {name} is the exported one"
        );
    }
    // A tampered copy is refused and installs nothing.
    let mut bytes = std::fs::read(&tarball).expect("reading the tarball");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let tampered = work.path().join("tampered.tar");
    std::fs::write(&tampered, bytes).expect("writing the tampered tarball");
    let refused_root = work.path().join("refused");
    let refused = vmic()
        .args(["guest-image", "import"])
        .arg(&tampered)
        .env("VMIC_GUEST_IMAGE_DIR", &refused_root)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&refused.get_output().stderr).into_owned();
    assert!(stderr.contains("does not match its digest"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&refused_root).expect("root").count(),
        0,
        "nothing installed"
    );

    // The imported image (and only it: VMIC_GUEST_IMAGE_DIR) runs a real build.
    let input = common::test_image("x86_64", "minimal", false).join("disk.qcow2");
    // In its own directory: the config's directory is what the build uploads.
    let config_dir = work.path().join("config");
    std::fs::create_dir(&config_dir).expect("creating the config dir");
    let config = config_dir.join("config.yaml");
    std::fs::write(&config, "os:\n  hostname: imported-guest\n").expect("writing the config");
    let output = work.path().join("out.qcow2");
    let _vm = vm_slot();
    let built = vmic()
        .args(customize_args(
            &input,
            &config,
            work.path().join("build"),
            &output,
            "qcow2",
        ))
        .env("VMIC_GUEST_IMAGE_DIR", &imported)
        .output()
        .expect("running vmic customize");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(output.is_file());
}

/// Wait for `child` to exit, at most `seconds`; its status.
fn wait_exit(mut child: std::process::Child, seconds: u64) -> std::process::ExitStatus {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait());
    });
    receiver
        .recv_timeout(std::time::Duration::from_secs(seconds))
        .expect("the process exited in time")
        .expect("waiting for the process")
}

#[test]
fn orphan_watchdog_kills_the_child_once_its_parent_is_gone_and_only_then() {
    use std::os::unix::process::ExitStatusExt;
    let vmic_binary = assert_cmd::cargo::cargo_bin("vmic");
    // The parent (a shell) starts the watchdog for `sleep` and exits at once: the watchdog is
    // re-parented and must SIGKILL the sleep (the macOS path for QEMU when vmic dies).
    let orphaned = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("starting sleep");
    let shell = Command::new("sh")
        .args(["-c", "VMIC_ORPHAN_WATCHDOG=\"$1:$$\" \"$2\" & exit 0", "sh"])
        .arg(orphaned.id().to_string())
        .arg(&vmic_binary)
        .status()
        .expect("running sh");
    assert!(shell.success());
    let status = wait_exit(orphaned, 30);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");

    // With its parent alive the watchdog leaves the child alone (it dies of our SIGTERM, not
    // the watchdog's SIGKILL) and exits by itself once the child is gone.
    let guarded = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("starting sleep");
    let watchdog = Command::new(&vmic_binary)
        .env(
            "VMIC_ORPHAN_WATCHDOG",
            format!("{}:{}", guarded.id(), std::process::id()),
        )
        .spawn()
        .expect("starting the watchdog");
    // SAFETY: signalling our own child by pid.
    assert_eq!(unsafe { libc::kill(guarded.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(guarded, 30);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(
        wait_exit(watchdog, 30).success(),
        "the watchdog exits with its child"
    );

    // A malformed value is a usage error, not a silent no-op.
    vmic().env("VMIC_ORPHAN_WATCHDOG", "1").assert().code(2);
}
