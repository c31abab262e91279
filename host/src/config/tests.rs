//! Table-driven tests of every config rule: each bad config names the exact key path and line.

use std::path::{Path, PathBuf};

use super::*;
use crate::cli::OutputFormat;

/// A config directory with the files the test configs refer to, and one file outside it.
struct Fixture {
    _root: tempfile::TempDir,
    dir: PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().expect("temporary directory");
    let dir = root.path().join("config");
    for file in [
        "files/a.txt",
        "files/b.txt",
        "scripts/ok.sh",
        "keys/id.pub",
        "keys/id",
        "hash.txt",
        "packages.yaml",
        "tree/inner.txt",
    ] {
        let path = dir.join(file);
        fs_err::create_dir_all(path.parent().expect("has a parent")).expect("create dir");
        let content = match file {
            "packages.yaml" => "packages: [jq, curl]\n",
            "keys/id.pub" => "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm a@b\n",
            "keys/id" => "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            _ => "x\n",
        };
        fs_err::write(&path, content).expect("write fixture file");
    }
    fs_err::write(root.path().join("outside.sh"), "x\n").expect("write outside file");
    std::os::unix::fs::symlink("../../outside.sh", dir.join("scripts/escape.sh")).expect("symlink");
    Fixture { _root: root, dir }
}

fn check_in(dir: &Path, yaml: &str, ctx: &ValidationContext) -> Result<LoadedConfig, ConfigErrors> {
    validate_str(yaml, &dir.join("cfg.yaml"), dir, ctx)
}

fn with_format(format: OutputFormat) -> ValidationContext {
    ValidationContext {
        output_format: Some(format),
        input_is_iso: None,
    }
}

const ISO: Option<OutputFormat> = Some(OutputFormat::Iso);
const RAW: Option<OutputFormat> = Some(OutputFormat::Raw);

/// (name, config, output format from the command line, input is an ISO, key path, line,
/// a fragment of the message)
type Bad = (
    &'static str,
    &'static str,
    Option<OutputFormat>,
    bool,
    &'static str,
    usize,
    &'static str,
);

const BAD: &[Bad] = &[
    ("unknown top-level key", "os: {}\nfoo: 1\n", None, false, "foo", 2, "unknown key; allowed here: baseConfigs, input, iso, os, output, previewFeatures, pxe, scripts, storage"),
    ("unknown iso.kernelCommandLine key", "iso:\n  kernelCommandLine:\n    extra: ds=nocloud\n", None, false, "iso.kernelCommandLine.extra", 3, "allowed here: extraCommandLine"),
    ("unknown additionalFiles item key", "os:\n  additionalFiles:\n  - source: files/a.txt\n    destination: /a\n    mode: \"0644\"\n", None, false, "os.additionalFiles[0].mode", 5, "unknown key"),
    ("unknown script key", "scripts:\n  postCustomization:\n  - content: echo\n    cmd: x\n", None, false, "scripts.postCustomization[0].cmd", 4, "unknown key"),
    ("unknown map-form file config key", "iso:\n  additionalFiles:\n    files/a.txt:\n      path: /a\n      mode: x\n", None, false, "iso.additionalFiles[\"files/a.txt\"].mode", 5, "allowed here: path, permissions"),
    ("unknown key under storage", "storage:\n  disk: []\n", None, false, "storage.disk", 2, "unknown key"),
    ("hostname is a list", "os:\n  hostname: [a]\n", None, false, "os.hostname", 2, "expected a string, found a list"),
    ("os is a number", "os: 5\n", None, false, "os", 1, "expected a mapping, found an integer"),
    ("extraCommandLine is a mapping", "iso:\n  kernelCommandLine:\n    extraCommandLine: {a: b}\n", None, false, "iso.kernelCommandLine.extraCommandLine", 3, "expected a string or a list"),
    ("negative uid", "os:\n  users:\n  - name: test\n    uid: -1\n", None, false, "os.users[0].uid", 4, "out of range"),
    ("boolean given as a string", "os:\n  packages:\n    updateExistingPackages: \"yes\"\n", None, false, "os.packages.updateExistingPackages", 3, "expected a boolean, found a string"),
    ("list item is a list", "os:\n  services:\n    enable:\n    - [sshd]\n", None, false, "os.services.enable[0]", 4, "expected a string, found a list"),
    ("previewFeatures is a string", "previewFeatures: uki\n", None, false, "previewFeatures", 1, "expected a list"),
    ("hostname is a boolean", "os:\n  hostname: true\n", None, false, "os.hostname", 2, "expected a string, found a boolean"),
    ("unknown output format", "output:\n  image:\n    format: zip\n", None, false, "output.image.format", 3, "allowed: iso, raw, qcow2, vhd, vhd-fixed, vhdx, cosi"),
    ("unknown selinux mode", "os:\n  selinux:\n    mode: strict\n", None, false, "os.selinux.mode", 3, "allowed: disabled, permissive, enforcing, force-enforcing"),
    ("unknown initramfsType", "iso:\n  initramfsType: tiny\n", None, false, "iso.initramfsType", 2, "allowed: bootstrap, full-os"),
    ("unknown module loadMode", "os:\n  modules:\n  - name: vfio\n    loadMode: sometimes\n", None, false, "os.modules[0].loadMode", 4, "allowed: always, auto, disable, inherit"),
    ("unknown bootType", "storage:\n  bootType: uefi\n", None, false, "storage.bootType", 2, "allowed: efi, legacy"),
    ("unknown password type", "os:\n  users:\n  - name: test\n    password:\n      type: secret\n      value: x\n", None, false, "os.users[0].password.type", 5, "allowed: locked"),
    ("duplicate key", "os:\n  hostname: a\n  hostname: b\n", None, false, "os.hostname", 3, "duplicate key (first set at line 2)"),
    ("duplicate map-form source", "iso:\n  additionalFiles:\n    files/a.txt: /a\n    files/a.txt: /b\n", None, false, "iso.additionalFiles[\"files/a.txt\"]", 4, "duplicate key"),
    ("duplicate top-level key", "os: {}\nos: {}\n", None, false, "os", 2, "duplicate key"),
    ("empty kernel argument in a list", "iso:\n  kernelCommandLine:\n    extraCommandLine:\n    - console=ttyS0\n    - \"\"\n", None, false, "iso.kernelCommandLine.extraCommandLine[1]", 5, "empty kernel argument"),
    ("empty kernel argument string", "os:\n  kernelCommandLine:\n    extraCommandLine: \"\"\n", None, false, "os.kernelCommandLine.extraCommandLine", 3, "empty kernel argument"),
    ("blank kernel argument", "os:\n  kernelCommandLine:\n    extraCommandLine:\n    - \"  \"\n", None, false, "os.kernelCommandLine.extraCommandLine[0]", 4, "empty kernel argument"),
    ("kernel argument with a space", "iso:\n  kernelCommandLine:\n    extraCommandLine:\n    - a b\n", None, false, "iso.kernelCommandLine.extraCommandLine[0]", 4, "one argument per list entry"),
    ("unterminated quote", "iso:\n  kernelCommandLine:\n    extraCommandLine: \"a 'b c\"\n", None, false, "iso.kernelCommandLine.extraCommandLine", 3, "unterminated ' quote"),
    ("source and content", "os:\n  additionalFiles:\n  - source: files/a.txt\n    content: x\n    destination: /a\n", None, false, "os.additionalFiles[0]", 3, "`source` and `content` are exclusive"),
    ("neither source nor content", "iso:\n  additionalFiles:\n  - source: files/a.txt\n    destination: /a\n  - destination: /b\n", None, false, "iso.additionalFiles[1]", 5, "neither `source` nor `content`"),
    ("hostname with a leading hyphen", "os:\n  hostname: -bad\n", None, false, "os.hostname", 2, "starts or ends with a hyphen"),
    ("hostname with an underscore", "os:\n  hostname: my_host\n", None, false, "os.hostname", 2, "'_' is not allowed"),
    ("hostname label too long", "os:\n  hostname: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", None, false, "os.hostname", 2, "longer than 63"),
    ("hostname with an empty label", "os:\n  hostname: a..b\n", None, false, "os.hostname", 2, "empty label"),
    ("script climbs out", "scripts:\n  postCustomization:\n  - path: ../outside.sh\n", None, false, "scripts.postCustomization[0].path", 3, "outside the config directory"),
    ("script absolute path", "scripts:\n  finalizeCustomization:\n  - path: /bin/true\n", None, false, "scripts.finalizeCustomization[0].path", 3, "outside the config directory"),
    // Outside is said before missing: the path's place is wrong whatever lies there.
    ("script climbing out to nothing", "scripts:\n  finalizeCustomization:\n  - path: ../nonexistent-vmic.sh\n", None, false, "scripts.finalizeCustomization[0].path", 3, "outside the config directory"),
    ("script symlink out", "scripts:\n  postCustomization:\n  - path: scripts/ok.sh\n  - path: scripts/escape.sh\n", None, false, "scripts.postCustomization[1].path", 4, "outside the config directory"),
    ("script missing", "scripts:\n  postCustomization:\n  - path: scripts/missing.sh\n", None, false, "scripts.postCustomization[0].path", 3, "does not exist"),
    ("script path and content", "scripts:\n  postCustomization:\n  - path: scripts/ok.sh\n    content: echo\n", None, false, "scripts.postCustomization[0]", 3, "`path` and `content` are exclusive"),
    ("script without path or content", "scripts:\n  postCustomization:\n  - name: nothing\n", None, false, "scripts.postCustomization[0]", 3, "neither `path` nor `content`"),
    ("script empty interpreter", "scripts:\n  postCustomization:\n  - content: echo\n    interpreter: \"\"\n", None, false, "scripts.postCustomization[0].interpreter", 4, "empty interpreter"),
    ("script bad environment name", "scripts:\n  postCustomization:\n  - content: echo\n    environmentVariables:\n      1X: y\n", None, false, "scripts.postCustomization[0].environmentVariables[\"1X\"]", 5, "invalid environment variable name"),
    ("missing source (list)", "os:\n  additionalFiles:\n  - source: files/missing.txt\n    destination: /a\n", None, false, "os.additionalFiles[0].source", 3, "does not exist"),
    ("missing source (map)", "iso:\n  additionalFiles:\n    files/a.txt: /a\n    files/missing.txt: /m\n", None, false, "iso.additionalFiles[\"files/missing.txt\"]", 4, "does not exist"),
    ("source is a directory", "os:\n  additionalFiles:\n  - source: files\n    destination: /a\n", None, false, "os.additionalFiles[0].source", 3, "is a directory"),
    ("missing ssh key file", "os:\n  users:\n  - name: test\n    sshPublicKeyPaths:\n    - keys/id.pub\n    - keys/missing.pub\n", None, false, "os.users[0].sshPublicKeyPaths[1]", 6, "does not exist"),
    ("missing password file", "os:\n  users:\n  - name: test\n    password:\n      type: hashed-file\n      value: missing-hash.txt\n", None, false, "os.users[0].password.value", 6, "does not exist"),
    ("not a package list", "os:\n  packages:\n    removeLists: [files/a.txt]\n", None, false, "os.packages.removeLists[0]", 3, "not a package list (expected `packages: [name, ...]`)"),
    ("missing package list", "os:\n  packages:\n    installLists:\n    - packages.yaml\n    - missing.yaml\n", None, false, "os.packages.installLists[1]", 5, "does not exist"),
    ("missing additionalDirs source", "os:\n  additionalDirs:\n  - source: nodir\n    destination: /opt/x\n", None, false, "os.additionalDirs[0].source", 3, "does not exist"),
    ("non-octal permissions", "os:\n  additionalFiles:\n  - content: x\n    destination: /a\n    permissions: \"0688\"\n", None, false, "os.additionalFiles[0].permissions", 5, "'8' is not an octal digit"),
    ("too many permission digits", "os:\n  additionalFiles:\n  - content: x\n    destination: /a\n    permissions: \"00644\"\n", None, false, "os.additionalFiles[0].permissions", 5, "wrong number of digits"),
    ("setuid permissions", "os:\n  additionalFiles:\n  - content: x\n    destination: /a\n    permissions: \"4755\"\n", None, false, "os.additionalFiles[0].permissions", 5, "setuid"),
    ("map-form permissions", "iso:\n  additionalFiles:\n    files/a.txt:\n      path: /a\n      permissions: \"9\"\n", None, false, "iso.additionalFiles[\"files/a.txt\"].permissions", 5, "invalid permissions"),
    ("additionalDirs permissions", "os:\n  additionalDirs:\n  - source: tree\n    destination: /opt/tree\n    newDirPermissions: \"rwx\"\n", None, false, "os.additionalDirs[0].newDirPermissions", 5, "invalid permissions"),
    ("duplicate module", "os:\n  modules:\n  - name: vfio\n  - name: kvm\n  - name: vfio\n", None, false, "os.modules[2].name", 5, "duplicate module \"vfio\""),
    ("empty module name", "os:\n  modules:\n  - name: \"\"\n", None, false, "os.modules[0].name", 3, "missing module name"),
    ("module option with a space", "os:\n  modules:\n  - name: vfio\n    options:\n      ids: \"a b\"\n", None, false, "os.modules[0].options.ids", 5, "option values"),
    ("empty service name", "os:\n  services:\n    enable:\n    - \"\"\n", None, false, "os.services.enable[0]", 4, "empty service name"),
    ("service enabled and disabled", "os:\n  services:\n    enable: [sshd]\n    disable: [sshd]\n", None, false, "os.services.disable[0]", 4, "both enabled and disabled"),
    ("empty package name", "os:\n  packages:\n    install:\n    - \"\"\n", None, false, "os.packages.install[0]", 4, "empty package name"),
    ("invalid user name", "os:\n  users:\n  - name: Bad User\n", None, false, "os.users[0].name", 3, "invalid user name"),
    ("duplicate user", "os:\n  users:\n  - name: test\n  - name: test\n", None, false, "os.users[1].name", 4, "duplicate user"),
    ("group without a name", "os:\n  groups:\n  - gid: 1000\n", None, false, "os.groups[0].name", 3, "missing group name"),
    ("iso with raw output (config)", "iso:\n  kernelCommandLine:\n    extraCommandLine: [ds=nocloud]\noutput:\n  image:\n    format: raw\n", None, false, "iso", 1, "`iso` settings need ISO output, but the output format is raw"),
    ("iso with qcow2 output (command line)", "os:\n  hostname: a\niso:\n  additionalFiles: []\n", Some(OutputFormat::Qcow2), false, "iso", 3, "output format is qcow2"),
    ("command line overrides config format", "iso: {}\noutput:\n  image:\n    format: iso\n", RAW, false, "iso", 1, "output format is raw"),
    ("iso input with raw output", "output:\n  image:\n    format: raw\n", None, true, "output.image.format", 3, "the input is a LiveOS ISO"),
    ("disk layout with iso output", "storage:\n  disks:\n  - partitionTableType: gpt\n", ISO, false, "storage.disks", 2, "disk layout changes are not possible with ISO output"),
    ("verity with iso output", "storage:\n  verity:\n  - id: root\n", ISO, false, "storage.verity", 2, "dm-verity"),
    ("selinux with iso output", "os:\n  selinux:\n    mode: enforcing\n", ISO, false, "os.selinux.mode", 3, "SELinux is not supported on a LiveOS ISO"),
    ("empty destination", "os:\n  additionalFiles:\n  - content: x\n    destination: \"\"\n", None, false, "os.additionalFiles[0].destination", 4, "empty path"),
    ("relative destination", "os:\n  additionalFiles:\n  - content: x\n    destination: etc/motd\n", None, false, "os.additionalFiles[0].destination", 4, "relative path"),
    ("relative map-form destination", "iso:\n  additionalFiles:\n    files/a.txt: a.txt\n", None, false, "iso.additionalFiles[\"files/a.txt\"]", 3, "relative path"),
    ("missing destination", "os:\n  additionalFiles:\n  - content: x\n", None, false, "os.additionalFiles[0].destination", 3, "missing `destination`"),
    ("duplicate destination", "os:\n  additionalFiles:\n  - content: x\n    destination: /a\n  - content: y\n    destination: /a\n", None, false, "os.additionalFiles[1].destination", 6, "already written by os.additionalFiles[0]"),
    ("relative additionalDirs destination", "os:\n  additionalDirs:\n  - source: tree\n    destination: opt\n", None, false, "os.additionalDirs[0].destination", 4, "relative path"),
    ("remove package manager with iso output", "previewFeatures: [remove-package-manager]\nos:\n  packages:\n    removePackageManager: true\n", ISO, false, "os.packages.removePackageManager", 4, "cannot be removed with iso output"),
    ("uki without its preview feature", "os:\n  uki:\n    mode: create\n", None, false, "os.uki", 2, "the 'uki' preview feature must be enabled to use 'os.uki'"),
    ("baseConfigs without its preview feature", "baseConfigs:\n- path: base.yaml\n", None, false, "baseConfigs", 1, "the 'base-configs' preview feature must be enabled"),
    ("iso root arg", "iso:\n  kernelCommandLine:\n    extraCommandLine: [quiet, root=/dev/sda1]\n", None, false, "iso.kernelCommandLine.extraCommandLine[1]", 3, "not allowed on an ISO"),
    ("iso selinux arg", "iso:\n  kernelCommandLine:\n    extraCommandLine: \"security=selinux\"\n", None, false, "iso.kernelCommandLine.extraCommandLine", 3, "SELinux is always off"),
    ("pxe enforcing arg", "pxe:\n  kernelCommandLine:\n    extraCommandLine: [enforcing=1]\n", None, false, "pxe.kernelCommandLine.extraCommandLine[0]", 3, "not allowed on a PXE image"),
    ("os root arg with pxe output", "os:\n  kernelCommandLine:\n    extraCommandLine: [root=/dev/sda1]\n", Some(OutputFormat::PxeDir), false, "os.kernelCommandLine.extraCommandLine[0]", 3, "cannot be kept on a PXE image"),
    ("module name with a space", "os:\n  modules:\n  - name: \"vfio pci\"\n", None, false, "os.modules[0].name", 3, "module name \"vfio pci\" contains whitespace"),
    ("module option name with a space", "os:\n  modules:\n  - name: vfio\n    options:\n      \"a b\": \"1\"\n", None, false, "os.modules[0].options[\"a b\"]", 5, "option names must be non-empty"),
    ("two image sources", "input:\n  image:\n    path: a.qcow2\n    azureLinux:\n      version: \"3.0\"\n      variant: minimal-os\n", None, false, "input.image", 3, "must only specify one of 'path', 'oci', and 'azureLinux'"),
    ("oci uri with a space", "input:\n  image:\n    oci: \"mcr.microsoft.com/a b\"\n", None, false, "input.image.oci", 3, "missing or invalid `uri`"),
    ("disks without a boot loader reset", "storage:\n  disks:\n  - partitionTableType: gpt\n", RAW, false, "storage.disks", 2, "'os.bootloader.resetType' must be specified if 'storage.disks' is specified"),
    ("btrfs settings on ext4", "storage:\n  filesystems:\n  - deviceId: root\n    type: ext4\n    btrfs:\n      subvolumes: []\n", RAW, false, "storage.filesystems[0].btrfs", 5, "`btrfs` settings need `type: btrfs`"),
    ("subvolid= in subvolume mount options", "previewFeatures: [btrfs]\nstorage:\n  filesystems:\n  - deviceId: root\n    type: btrfs\n    btrfs:\n      subvolumes:\n      - path: root\n        mountPoint:\n          path: /\n          options: defaults,subvolid=5\n", RAW, false, "storage.filesystems[0].btrfs.subvolumes[0].mountPoint.options", 11, "'subvol=' and 'subvolid=' are added by the Image Customizer"),
    ("relative mount point", "storage:\n  filesystems:\n  - deviceId: root\n    type: ext4\n    mountPoint: var\n", RAW, false, "storage.filesystems[0].mountPoint", 5, "mount point \"var\" must be an absolute path"),
    ("subvolume quota without a unit", "previewFeatures: [btrfs]\nstorage:\n  filesystems:\n  - deviceId: root\n    type: btrfs\n    btrfs:\n      subvolumes:\n      - path: root\n        quota:\n          referencedLimit: lots\n", RAW, false, "storage.filesystems[0].btrfs.subvolumes[0].quota.referencedLimit", 10, "invalid size \"lots\""),
    ("full-os pxe with a bootstrap file url", "pxe:\n  initramfsType: full-os\n  bootstrapFileUrl: http://10.0.2.2/image.iso\n", None, false, "pxe.initramfsType", 2, "cannot specify either 'bootstrapBaseUrl' or 'bootstrapFileUrl'"),
    ("empty input path", "input:\n  image:\n    path: \"\"\n", None, false, "input.image.path", 3, "empty path; name the input image file"),
    ("bootstrap pxe without a url", "pxe:\n  initramfsType: bootstrap\n", Some(OutputFormat::PxeDir), false, "pxe.initramfsType", 2, "a bootstrap PXE initrd fetches the ISO over the network"),
    ("os root arg with iso output", "os:\n  kernelCommandLine:\n    extraCommandLine: [root=/dev/sda1]\n", ISO, false, "os.kernelCommandLine.extraCommandLine[0]", 3, "cannot be kept on an ISO"),
    ("ssh key file is not a key", "os:\n  users:\n  - name: a\n    sshPublicKeyPaths: [hash.txt]\n", None, false, "os.users[0].sshPublicKeyPaths[0]", 4, "line 1: no key type"),
    ("ssh key file is a private key", "os:\n  users:\n  - name: a\n    sshPublicKeyPaths: [keys/id]\n", None, false, "os.users[0].sshPublicKeyPaths[0]", 4, "this is a private key"),
    ("inline private key", "os:\n  users:\n  - name: a\n    sshPublicKeys:\n    - |\n      -----BEGIN OPENSSH PRIVATE KEY-----\n      AAAA\n      -----END OPENSSH PRIVATE KEY-----\n", None, false, "os.users[0].sshPublicKeys[0]", 6, "this is a private key"),
    ("pxe url protocol", "pxe:\n  bootstrapFileUrl: file:///x.iso\n", None, false, "pxe.bootstrapFileUrl", 2, "unsupported URL protocol"),
    ("snapshot time format", "previewFeatures: [package-snapshot-time]\nos:\n  packages:\n    snapshotTime: 2024-13-01\n", None, false, "os.packages.snapshotTime", 4, "must be YYYY-MM-DD"),
    ("empty output path", "output:\n  image:\n    path: \"\"\n", None, false, "output.image.path", 3, "empty path"),
    ("empty preview feature", "previewFeatures:\n- \"\"\n", None, false, "previewFeatures[0]", 2, "unsupported value \"\""),
    ("uki mode", "previewFeatures: [uki]\nos:\n  uki:\n    mode: all\n", None, false, "os.uki.mode", 4, "allowed: create, passthrough, modify"),
    ("invalid YAML", "os:\n  hostname: [a\n", None, false, "", 2, "invalid YAML"),
    ("two documents", "os: {}\n---\nos: {}\n", None, false, "", 2, "one YAML document"),
];

#[test]
fn every_bad_config_names_its_path_and_line() {
    let fixture = fixture();
    assert!(
        BAD.len() >= 40,
        "the issue asks for at least 40 bad configs"
    );
    let mut failures = Vec::new();
    for (name, yaml, format, input_is_iso, path, line, fragment) in BAD {
        let ctx = ValidationContext {
            output_format: *format,
            input_is_iso: Some(*input_is_iso),
        };
        let errors = match check_in(&fixture.dir, yaml, &ctx) {
            Ok(_) => {
                failures.push(format!("{name}: accepted"));
                continue;
            }
            Err(errors) => errors,
        };
        let found = errors.errors.iter().any(|error| {
            error.path == *path
                && error.position.map(|position| position.line) == Some(*line)
                && error.message.contains(fragment)
        });
        if !found {
            failures.push(format!(
                "{name}: wanted {path} at line {line} with {fragment:?}, got:\n{errors}"
            ));
        }
        // The rendered form is FILE:LINE:COL: key.path: message.
        let text = errors.to_string();
        let prefix = format!("{}:{line}:", fixture.dir.join("cfg.yaml").display());
        if !text.lines().any(|rendered| rendered.starts_with(&prefix)) {
            failures.push(format!("{name}: no line starts with {prefix}: {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each rule's passing side: near-misses of the bad configs above.
const GOOD: &[(&str, &str, Option<OutputFormat>)] = &[
    ("empty file", "", None),
    ("hostname FQDN", "os:\n  hostname: build-01.example.com\n", None),
    ("numeric hostname label", "os:\n  hostname: 42\n", None),
    ("kernel args list", "iso:\n  kernelCommandLine:\n    extraCommandLine: [console=ttyS0, \"quiet\"]\n", ISO),
    ("kernel args string with quotes", "os:\n  kernelCommandLine:\n    extraCommandLine: \"a=1 'b=2 3' c=\\\"x y\\\"\"\n", None),
    ("source only", "os:\n  additionalFiles:\n  - source: files/a.txt\n    destination: /a\n", None),
    ("content only", "os:\n  additionalFiles:\n  - content: \"\"\n    destination: /a\n    permissions: \"0600\"\n", None),
    ("unquoted permissions", "os:\n  additionalFiles:\n  - content: x\n    destination: /a\n    permissions: 644\n", None),
    ("map form with settings and lists", "iso:\n  additionalFiles:\n    files/a.txt:\n      path: /a\n      permissions: \"0644\"\n    files/b.txt:\n    - /b1\n    - path: /b2\n", ISO),
    ("script inside", "scripts:\n  postCustomization:\n  - path: scripts/ok.sh\n    interpreter: /bin/bash\n    arguments: [--x]\n    environmentVariables:\n      MY_VAR: y\n    name: ok\n  - path: ./scripts/../scripts/ok.sh\n", None),
    ("ssh key, password file, package list", "os:\n  users:\n  - name: test\n    uid: 1000\n    sshPublicKeyPaths: [keys/id.pub]\n    password:\n      type: hashed-file\n      value: hash.txt\n  - name: locked\n    password:\n      type: locked\n  packages:\n    installLists: [packages.yaml]\n    install: [curl]\n    updateExistingPackages: true\n", None),
    ("modules", "os:\n  modules:\n  - name: vfio\n    loadMode: always\n    options:\n      ids: \"10de:1b80\"\n  - name: kvm\n", None),
    ("services", "os:\n  services:\n    enable: [sshd]\n    disable: [cups]\n", None),
    ("iso with iso output", "iso:\n  additionalFiles: []\noutput:\n  image:\n    format: iso\n    path: out.iso\n", None),
    ("iso input with iso output", "output:\n  image:\n    format: iso\n", None),
    ("an Azure Linux image by version and variant", "input:\n  image:\n    azureLinux:\n      version: \"3.0\"\n      variant: minimal-os\n", RAW),
    ("bootstrap pxe from a base url", "pxe:\n  initramfsType: bootstrap\n  bootstrapBaseUrl: http://10.0.2.2:8080\n", Some(OutputFormat::PxeDir)),
    ("full-os pxe", "pxe:\n  initramfsType: full-os\n", Some(OutputFormat::PxeTar)),
    ("disks with raw output", "storage:\n  bootType: efi\n  disks:\n  - partitionTableType: gpt\n    partitions:\n    - id: esp\n      type: esp\n      size: 8M\n  filesystems:\n  - deviceId: esp\n    type: fat32\n    mountPoint:\n      path: /boot/efi\nos:\n  bootloader:\n    resetType: hard-reset\n", RAW),
    ("selinux disabled with iso output", "os:\n  selinux:\n    mode: disabled\n", ISO),
    ("selinux enforcing with raw output", "os:\n  selinux:\n    mode: enforcing\n", RAW),
    ("additionalDirs", "os:\n  additionalDirs:\n  - source: tree\n    destination: /opt/tree\n    newDirPermissions: \"0755\"\n", None),
    ("groups", "os:\n  groups:\n  - name: builders\n    gid: 2000\n", None),
    ("preview features and uki", "previewFeatures: [uki]\nos:\n  uki:\n    mode: modify\n", None),
    ("snapshot times", "previewFeatures: [package-snapshot-time]\nos:\n  packages:\n    snapshotTime: \"2024-05-20\"\n", None),
    ("rfc 3339 snapshot time", "previewFeatures: [package-snapshot-time]\nos:\n  packages:\n    snapshotTime: 2024-05-20T15:04:05.5+02:00\n", None),
    ("selinux=0 on the iso", "iso:\n  kernelCommandLine:\n    extraCommandLine: [selinux=0, rootwait]\n", ISO),
    ("root arg on a disk", "os:\n  kernelCommandLine:\n    extraCommandLine: [root=/dev/sda1]\n", RAW),
    ("public key file", "os:\n  users:\n  - name: a\n    sshPublicKeyPaths: [keys/id.pub]\n    sshPublicKeys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm\"]\n", None),
    ("JSON", "{\"os\": {\"hostname\": \"json-host\", \"kernelCommandLine\": {\"extraCommandLine\": [\"quiet\"]}}}", None),
    ("anchors and aliases", "os:\n  additionalFiles:\n  - &file\n    source: files/a.txt\n    destination: /a\niso:\n  additionalFiles:\n  - *file\n", ISO),
    ("empty sections", "os:\niso:\nscripts:\n", ISO),
];

#[test]
fn good_configs_pass() {
    let fixture = fixture();
    for (name, yaml, format) in GOOD {
        let ctx = ValidationContext {
            output_format: *format,
            input_is_iso: None,
        };
        if let Err(errors) = check_in(&fixture.dir, yaml, &ctx) {
            panic!("{name}: rejected:\n{errors}");
        }
    }
}

#[test]
fn all_errors_are_reported_in_one_run() {
    let fixture = fixture();
    let yaml = "os:\n  hostname: -x-\n  colour: blue\n  modules:\n  - name: a\n  - name: a\niso:\n  kernelCommandLine:\n    extraCommandLine: [\"\", ok, \"\"]\noutput:\n  image:\n    format: raw\n";
    let errors =
        check_in(&fixture.dir, yaml, &ValidationContext::default()).expect_err("several errors");
    let found: Vec<(String, usize)> = errors
        .errors
        .iter()
        .map(|error| (error.path.clone(), error.position.map_or(0, |p| p.line)))
        .collect();
    assert_eq!(
        found,
        [
            ("os.hostname".to_owned(), 2),
            ("os.colour".to_owned(), 3),
            ("os.modules[1].name".to_owned(), 6),
            ("iso".to_owned(), 7),
            ("iso.kernelCommandLine.extraCommandLine[0]".to_owned(), 9),
            ("iso.kernelCommandLine.extraCommandLine[2]".to_owned(), 9),
        ]
    );
}

#[test]
fn positions_include_columns() {
    let fixture = fixture();
    let errors = check_in(
        &fixture.dir,
        "iso:\n  kernelCommandLine:\n    extraCommandLine:\n    - a\n    - \"\"\n",
        &ValidationContext::default(),
    )
    .expect_err("empty argument");
    assert_eq!(
        errors.errors[0].position,
        Some(Position { line: 5, column: 7 })
    );
    let rendered = errors.to_string();
    assert!(
        rendered.ends_with(
            "cfg.yaml:5:7: iso.kernelCommandLine.extraCommandLine[1]: empty kernel argument; \
             each argument must be non-empty text such as `console=ttyS0`\n"
        ),
        "{rendered}"
    );
}

fn cloud_init(name: &str, format: OutputFormat) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/config/cloud-init")
        .join(name);
    match load_and_validate(&path, &with_format(format)) {
        Ok(loaded) => loaded.config,
        Err(errors) => panic!("{name} rejected:\n{errors}"),
    }
}

#[test]
fn seed_examples_in_map_and_list_syntax_are_equal() {
    let iso_map = cloud_init("iso-map.yaml", OutputFormat::Iso);
    let iso_list = cloud_init("iso-list.yaml", OutputFormat::Iso);
    assert_eq!(iso_map, iso_list);
    let iso = iso_map.iso.as_ref().expect("iso section");
    let files = &iso.additional_files.as_ref().expect("files").0;
    assert_eq!(files.len(), 3);
    assert_eq!(
        files[0].source.as_deref(),
        Some("cloud-init-data/user-data")
    );
    assert_eq!(
        files[0].destination.as_deref(),
        Some("/cloud-init-data/user-data")
    );
    assert_eq!(
        files[2].source.as_deref(),
        Some("cloud-init-data/meta-data")
    );
    let args = iso
        .kernel_command_line
        .as_ref()
        .and_then(|k| k.extra_command_line.as_ref());
    assert_eq!(
        args,
        Some(&model::KernelArgs(vec!["ds=nocloud".to_owned()]))
    );

    let rootfs_map = cloud_init("rootfs-map.yaml", OutputFormat::Iso);
    let rootfs_list = cloud_init("rootfs-list.yaml", OutputFormat::Iso);
    assert_eq!(rootfs_map, rootfs_list);
    assert_ne!(iso_map, rootfs_map);
}

#[test]
fn map_form_errors_point_at_what_was_written() {
    let fixture = fixture();
    let errors = check_in(
        &fixture.dir,
        "iso:\n  additionalFiles:\n    files/a.txt: /a\n    files/b.txt:\n    - /b\n    - b2\n",
        &ValidationContext::default(),
    )
    .expect_err("relative destination");
    assert_eq!(errors.errors.len(), 1, "{errors}");
    assert_eq!(
        errors.errors[0].path,
        "iso.additionalFiles[\"files/b.txt\"][1]"
    );
    assert_eq!(
        errors.errors[0].position,
        Some(Position { line: 6, column: 7 })
    );
}

#[test]
fn unsupported_fields_are_listed_with_locations() {
    let fixture = fixture();
    let loaded = check_in(
        &fixture.dir,
        "os:\n  hostname: ok\n  users:\n  - name: test\n  overlays:\n  - mountPoint: /x\n  bootloader:\n    resetType: hard-reset\n",
        &with_format(OutputFormat::Iso),
    )
    .expect("valid config");
    let unsupported = unsupported_fields(&loaded);
    let found: Vec<String> = unsupported.errors.iter().map(ToString::to_string).collect();
    let file = fixture.dir.join("cfg.yaml");
    let file = file.display();
    assert_eq!(
        found,
        [
            // os.bootloader (resetType) is carried out: not listed.
            format!("{file}:5:3: os.overlays: not supported yet: os.overlays"),
        ]
    );
    let cloud = check_in(
        &fixture.dir,
        "os:\n  hostname: ok\n  kernelCommandLine:\n    extraCommandLine: quiet\n",
        &ValidationContext::default(),
    )
    .expect("valid config");
    assert!(unsupported_fields(&cloud).is_empty());
}

#[test]
fn missing_config_file_is_an_error() {
    let errors = load_and_validate(
        Path::new("/nonexistent/cfg.yaml"),
        &ValidationContext::default(),
    )
    .expect_err("missing file");
    assert_eq!(
        errors.to_string(),
        "/nonexistent/cfg.yaml: cannot read the config file: entity not found\n"
    );
}

#[test]
fn kernel_args_split_like_a_shell_without_escapes() {
    assert_eq!(
        model::split_kernel_args("  a=1  'b c'\td=\"e f\" "),
        ["a=1", "'b c'", "d=\"e f\""]
    );
    assert!(model::split_kernel_args("   ").is_empty());
}

#[test]
fn permission_and_hostname_checks() {
    for good in ["644", "0644", "0777", "000"] {
        assert_eq!(validate::check_permissions(good), Ok(()), "{good}");
    }
    for bad in ["64", "0x644", "1777", "0800", "", "06444"] {
        assert!(validate::check_permissions(bad).is_err(), "{bad}");
    }
    for good in ["a", "A-1", "host.example.com", "1"] {
        assert_eq!(validate::check_hostname(good), Ok(()), "{good}");
    }
    for bad in ["", "-a", "a-", "a_b", "a.", "a b", "ä"] {
        assert!(validate::check_hostname(bad).is_err(), "{bad}");
    }
}

/// A three-level `baseConfigs` chain in three directories: the merge follows AzL-IC's rules and
/// every base path keeps the directory it is relative to.
#[test]
fn base_configs_merge_by_the_image_customizer_rules() {
    let root = tempfile::tempdir().expect("temporary directory");
    let write = |name: &str, text: &str| {
        let path = root.path().join(name);
        fs_err::create_dir_all(path.parent().expect("parent")).expect("dir");
        fs_err::write(&path, text).expect("write");
    };
    write("lower/motd", "x\n");
    write(
        "lower/grand.yaml",
        "os:\n  hostname: grand\n  packages:\n    install: [a]\n  additionalFiles:\n  - source: motd\n    destination: /etc/motd\n  kernelCommandLine:\n    extraCommandLine: [grand=1]\n  bootloader:\n    resetType: hard-reset\n  overlays:\n  - mountPoint: /x\noutput:\n  image:\n    path: grand.iso\n    format: raw\n",
    );
    write(
        "middle/parent.yaml",
        "previewFeatures: [base-configs]\nbaseConfigs:\n- path: ../lower/grand.yaml\nos:\n  hostname: parent\n  packages:\n    install: [b]\n  kernelCommandLine:\n    extraCommandLine: [parent=1]\noutput:\n  image:\n    format: iso\n",
    );
    write(
        "top/config.yaml",
        "previewFeatures: [base-configs]\nbaseConfigs:\n- path: ../middle/parent.yaml\nos:\n  packages:\n    install: [c]\n  kernelCommandLine:\n    extraCommandLine: [top=1]\n",
    );
    let loaded = load_and_validate(
        &root.path().join("top/config.yaml"),
        &ValidationContext::default(),
    )
    .unwrap_or_else(|errors| panic!("chain rejected:\n{errors}"));
    let os = loaded.config.os.as_ref().expect("os");
    // Scalars: the last file that sets one wins.
    assert_eq!(os.hostname.as_deref(), Some("parent"));
    let output = loaded
        .config
        .output
        .as_ref()
        .and_then(|o| o.image.as_ref())
        .expect("image");
    assert_eq!(output.format, Some(ImageFormat::Iso));
    // Lists append, bases first.
    let packages = os.packages.as_ref().and_then(|p| p.install.clone());
    assert_eq!(packages, Some(vec!["a".into(), "b".into(), "c".into()]));
    let args = os
        .kernel_command_line
        .as_ref()
        .and_then(|k| k.extra_command_line.clone());
    assert_eq!(
        args.map(|args| args.0),
        Some(vec!["grand=1".into(), "parent=1".into(), "top=1".into()])
    );
    // Paths from a base are relative to that base's directory.
    let lower = std::path::absolute(root.path().join("lower")).expect("absolute");
    let files = os.additional_files.as_ref().expect("files");
    assert_eq!(
        files.0[0].source.as_deref().map(PathBuf::from),
        Some(lower.join("motd"))
    );
    assert_eq!(
        output.path.as_deref().map(PathBuf::from),
        Some(lower.join("grand.iso"))
    );
    assert!(loaded.config.base_configs.is_none());
    assert_eq!(loaded.chain.len(), 3);
    // "not supported yet" is found in the base that wrote it.
    let unsupported = unsupported_fields(&loaded);
    assert_eq!(unsupported.errors.len(), 1, "{unsupported}");
    assert!(unsupported.errors[0].file.ends_with("lower/grand.yaml"));
    assert_eq!(unsupported.errors[0].path, "os.overlays");
    // A scalar only a base set is inherited.
    assert_eq!(
        os.bootloader.as_ref().and_then(|b| b.reset_type),
        Some(model::BootloaderResetType::HardReset)
    );
}

#[test]
fn base_config_cycles_and_errors_name_their_file() {
    let root = tempfile::tempdir().expect("temporary directory");
    let dir = fs_err::canonicalize(root.path()).expect("canonical");
    let write = |name: &str, text: &str| fs_err::write(dir.join(name), text).expect("write");
    write(
        "a.yaml",
        "previewFeatures: [base-configs]\nbaseConfigs:\n- path: b.yaml\n",
    );
    write(
        "b.yaml",
        "previewFeatures: [base-configs]\nbaseConfigs:\n- path: a.yaml\n",
    );
    let errors =
        load_and_validate(&dir.join("a.yaml"), &ValidationContext::default()).expect_err("a cycle");
    assert_eq!(errors.errors.len(), 1, "{errors}");
    let error = &errors.errors[0];
    assert_eq!(error.file, dir.join("b.yaml"));
    assert_eq!(error.path, "baseConfigs[0].path");
    assert_eq!(error.position.map(|p| p.line), Some(3));
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    assert!(
        error.message.contains(&format!(
            "cycle in baseConfigs: {} -> {} -> {}",
            a.display(),
            b.display(),
            a.display()
        )),
        "{error}"
    );

    write("c.yaml", "previewFeatures: [base-configs]\nbaseConfigs:\n- path: d.yaml\nstorage:\n  bootType: efi\n");
    write(
        "d.yaml",
        "os:\n  hostname: bad_host\nstorage:\n  bootType: legacy\n",
    );
    let errors = load_and_validate(&dir.join("c.yaml"), &ValidationContext::default())
        .expect_err("bad base");
    let text = errors.to_string();
    assert!(
        text.contains(&format!(
            "{}:2:13: os.hostname: invalid host name",
            dir.join("d.yaml").display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}:4:1: storage: storage is already set in {}",
            dir.join("c.yaml").display(),
            dir.join("d.yaml").display()
        )),
        "{text}"
    );
}
