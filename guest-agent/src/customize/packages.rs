//! `os.packages`: the image's own package manager (apt or dnf/tdnf) run in the chroot.
//!
//! Local package sources (`--package-source DIR`) are bind-mounted into the chroot's `/run`
//! and indexed there (apt: a flat `Packages` file made from the image's own `dpkg-deb -f`;
//! dnf/tdnf: the directory must already carry `repodata/`, made with `createrepo_c`). Every file vmic adds to the image for this (source lists, `policy-rc.d`,
//! `resolv.conf`) is removed or restored before the step ends, whether it fails or not.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use vmic_protocol::{PackageChanges, PackageSource};

use crate::build::{output_tail, strings, Build, Mounts};
use crate::rootfs::scoped_join;

/// Where local package directories appear inside the chroot.
const LOCAL_REPOS: &str = "/run/vmic-packages";
/// Private apt state for a build that must not touch the image's own repositories.
const PRIVATE_APT: &str = "/run/vmic-apt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Manager {
    Apt,
    Dnf,
    Tdnf,
}

impl Manager {
    fn program(self) -> &'static str {
        match self {
            Manager::Apt => "apt-get",
            Manager::Dnf => "dnf",
            Manager::Tdnf => "tdnf",
        }
    }
}

/// The image's package manager, by the programs it ships.
fn detect(root: &Path) -> anyhow::Result<Manager> {
    for (path, manager) in [
        ("/usr/bin/apt-get", Manager::Apt),
        ("/usr/bin/tdnf", Manager::Tdnf),
        ("/usr/bin/dnf", Manager::Dnf),
    ] {
        if scoped_join(root, path)?.exists() {
            return Ok(manager);
        }
    }
    bail!(
        "the image has no package manager vmic can drive (apt-get, tdnf or dnf); \
         install packages with a postCustomization script instead"
    )
}

/// A local repository as the package manager sees it inside the chroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalRepo {
    /// `vmic-local-N`.
    pub name: String,
    /// Path inside the chroot.
    pub path: String,
}

/// The commands to run, in AzL-IC's order: remove, update existing, install, update.
pub(crate) fn commands(
    manager: Manager,
    changes: &PackageChanges,
    private_apt: bool,
    local_repos: &[LocalRepo],
) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    match manager {
        Manager::Apt => {
            let mut base = strings(["apt-get", "-y", "-q"]);
            if private_apt {
                // Only vmic's lists: the image's sources and its lists directory stay as they are.
                for option in [
                    format!("Dir::Etc::SourceList={PRIVATE_APT}/sources.list"),
                    format!("Dir::Etc::SourceParts={PRIVATE_APT}/sources.list.d"),
                    format!("Dir::State::Lists={PRIVATE_APT}/lists"),
                ] {
                    base.push("-o".into());
                    base.push(option);
                }
            }
            let with = |args: &[&str], names: &[String]| {
                let mut argv = base.clone();
                argv.extend(args.iter().map(|arg| arg.to_string()));
                argv.extend(names.iter().cloned());
                argv
            };
            commands.push(with(&["update"], &[]));
            if !changes.remove.is_empty() {
                commands.push(with(&["remove", "--purge"], &changes.remove));
            }
            if changes.update_existing {
                commands.push(with(&["upgrade"], &[]));
            }
            if !changes.install.is_empty() {
                commands.push(with(&["install"], &changes.install));
            }
            if !changes.update.is_empty() {
                commands.push(with(&["install", "--only-upgrade"], &changes.update));
            }
            commands.push(with(&["clean"], &[]));
        }
        Manager::Dnf | Manager::Tdnf => {
            let mut base = vec![manager.program().to_string(), "-y".to_string()];
            if changes.disable_base_repos {
                base.push("--disablerepo=*".into());
                for repo in local_repos {
                    base.push(format!("--enablerepo={}", repo.name));
                }
            }
            let with = |args: &[&str], names: &[String]| {
                let mut argv = base.clone();
                argv.extend(args.iter().map(|arg| arg.to_string()));
                argv.extend(names.iter().cloned());
                argv
            };
            if !changes.remove.is_empty() {
                commands.push(with(&["remove"], &changes.remove));
            }
            if changes.update_existing {
                commands.push(with(&["update"], &[]));
            }
            if !changes.install.is_empty() {
                commands.push(with(&["install"], &changes.install));
            }
            if !changes.update.is_empty() {
                commands.push(with(&["update"], &changes.update));
            }
            commands.push(with(&["clean", "all"], &[]));
        }
    }
    commands
}

/// One `Packages` stanza: the .deb's control fields plus where apt finds the file.
pub(crate) fn packages_stanza(control: &str, filename: &str, size: u64, sha256: &str) -> String {
    let mut stanza = String::new();
    for line in control.lines() {
        if line.trim().is_empty() {
            continue;
        }
        stanza.push_str(line);
        stanza.push('\n');
    }
    let _ = writeln!(stanza, "Filename: ./{filename}");
    let _ = writeln!(stanza, "Size: {size}");
    let _ = writeln!(stanza, "SHA256: {sha256}");
    stanza.push('\n');
    stanza
}

/// The apt source line of a flat local repository (unsigned: the files came from the user).
pub(crate) fn apt_source_line(repo: &LocalRepo) -> String {
    format!("deb [trusted=yes] file:{} ./\n", repo.path)
}

/// The dnf/tdnf repo file of a local repository.
pub(crate) fn dnf_repo_file(repo: &LocalRepo) -> String {
    format!(
        "[{name}]\nname={name}\nbaseurl=file://{path}\nenabled=1\ngpgcheck=0\nskip_if_unavailable=0\n",
        name = repo.name,
        path = repo.path
    )
}

/// Files of `dir` (recursively) whose name ends with `suffix`, relative to `dir`, sorted.
fn files_with_suffix(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(base: &Path, dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(base, &path, suffix, out)?;
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path.strip_prefix(base).unwrap_or(&path).to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, suffix, &mut out)?;
    out.sort();
    Ok(out)
}

fn sha256_and_size(path: &Path) -> anyhow::Result<(String, u64)> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let size = file.metadata()?.len();
    Ok((hex::encode(vmic_protocol::sha256_reader(file)?), size))
}

/// Files vmic puts into the image for the duration of the step, put back however it ends.
#[derive(Default)]
struct Restore(Vec<(PathBuf, Option<PathBuf>)>);

impl Restore {
    /// Write `data` at `path` in the image, keeping what was there (file or symlink) aside.
    fn write(&mut self, root: &Path, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let target = scoped_join(root, path)?;
        let saved = if std::fs::symlink_metadata(&target).is_ok() {
            let aside = target.with_file_name(format!(
                ".{}.vmic-saved",
                target.file_name().unwrap_or_default().to_string_lossy()
            ));
            std::fs::rename(&target, &aside).with_context(|| format!("setting {path} aside"))?;
            Some(aside)
        } else {
            None
        };
        self.0.push((target.clone(), saved));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, data).with_context(|| format!("writing {path}"))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        while let Some((target, saved)) = self.0.pop() {
            let _ = std::fs::remove_file(&target);
            if let Some(saved) = saved {
                let _ = std::fs::rename(saved, &target);
            }
        }
    }
}

/// The VM's way out: loopback up and the relay to the host's proxy listening on it (the VM has
/// no NIC; the host proxy decides what is reachable).
fn network_up(build: &Build<'_>) -> anyhow::Result<()> {
    let argv = strings(["busybox", "ip", "link", "set", "lo", "up"]);
    let result = build.run_unchecked(&argv, None, Vec::new())?;
    if result.code != 0 {
        bail!(
            "bringing up the builder VM's loopback (`{}`): {}",
            argv.join(" "),
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    crate::relay::start()
}

pub(crate) fn apply(
    build: &Build<'_>,
    root: &Path,
    packages: &PackageChanges,
) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let manager = detect(root)?;
    if packages.disable_base_repos && packages.sources.is_empty() {
        bail!("--disable-base-image-repos leaves no package source: add --package-source DIR|FILE");
    }
    let mut mounts = Mounts::default();
    let mut restore = Restore::default();
    if packages.network {
        network_up(build)?;
    }
    if manager == Manager::Apt {
        // Packages' maintainer scripts must not start services in the build.
        restore.write(
            root,
            "/usr/sbin/policy-rc.d",
            b"#!/bin/sh\nexit 101\n",
            0o755,
        )?;
    }

    let private_apt = manager == Manager::Apt && packages.disable_base_repos;
    let list_dir = match manager {
        Manager::Apt if private_apt => format!("{PRIVATE_APT}/sources.list.d"),
        Manager::Apt => "/etc/apt/sources.list.d".to_string(),
        Manager::Dnf | Manager::Tdnf => "/etc/yum.repos.d".to_string(),
    };
    if private_apt {
        for dir in ["lists/partial", "sources.list.d"] {
            std::fs::create_dir_all(scoped_join(root, &format!("{PRIVATE_APT}/{dir}"))?)?;
        }
        std::fs::write(
            scoped_join(root, &format!("{PRIVATE_APT}/sources.list"))?,
            "",
        )?;
    }

    let mut local_repos = Vec::new();
    for (index, source) in packages.sources.iter().enumerate() {
        match source {
            PackageSource::Directory(dir) => {
                let repo = LocalRepo {
                    name: format!("vmic-local-{index}"),
                    path: format!("{LOCAL_REPOS}/{index}"),
                };
                let target = scoped_join(root, &repo.path)?;
                let mut argv = strings(["mount", "--bind"]);
                argv.push(dir.clone());
                argv.push(target.to_string_lossy().into_owned());
                mounts.mount(build, argv, &target)?;
                index_local_repo(build, root, manager, Path::new(dir), &repo.path)?;
                let (file, text) = match manager {
                    Manager::Apt => (format!("{}.list", repo.name), apt_source_line(&repo)),
                    Manager::Dnf | Manager::Tdnf => {
                        (format!("{}.repo", repo.name), dnf_repo_file(&repo))
                    }
                };
                restore.write(root, &format!("{list_dir}/{file}"), text.as_bytes(), 0o644)?;
                local_repos.push(repo);
            }
            PackageSource::RepoFile(path) => {
                let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                let name = Path::new(path)
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let wanted = match manager {
                    Manager::Apt => [".list", ".sources"].iter().any(|s| name.ends_with(s)),
                    Manager::Dnf | Manager::Tdnf => name.ends_with(".repo"),
                };
                if !wanted {
                    bail!(
                        "--package-source {name}: the image uses {} and needs {}",
                        manager.program(),
                        match manager {
                            Manager::Apt => "a .list or .sources file",
                            _ => "a .repo file",
                        }
                    );
                }
                restore.write(root, &format!("{list_dir}/vmic-{name}"), &data, 0o644)?;
                if manager != Manager::Apt {
                    // dnf's --enablerepo takes the repo ids defined in the file.
                    for line in String::from_utf8_lossy(&data).lines() {
                        if let Some(id) = line
                            .trim()
                            .strip_prefix('[')
                            .and_then(|l| l.strip_suffix(']'))
                        {
                            local_repos.push(LocalRepo {
                                name: id.to_string(),
                                path: String::new(),
                            });
                        }
                    }
                }
            }
        }
    }

    let env = [
        ("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string()),
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("LC_ALL".to_string(), "C".to_string()),
    ]
    .into_iter()
    .chain(proxy_env(packages.network))
    .collect::<Vec<_>>();
    for argv in commands(manager, packages, private_apt, &local_repos) {
        build.context.cancel.check()?;
        build.log(format!("running {}", argv.join(" ")));
        let result = build.run_unchecked(&argv, Some(root), env.clone())?;
        if result.code != 0 {
            let hint = if !packages.network && packages.sources.is_empty() {
                "\n(the builder VM is offline: pass --package-source DIR with the packages)"
            } else {
                ""
            };
            return Err(anyhow!(
                "`{}` failed with exit code {}{}{hint}",
                argv.join(" "),
                result.code,
                output_tail(&result)
            ));
        }
    }
    drop(restore);
    mounts.unmount_below(root);
    Ok(())
}

/// apt, dnf and tdnf (libcurl) all take their proxy from these when networking is on.
fn proxy_env(network: bool) -> Vec<(String, String)> {
    if !network {
        return Vec::new();
    }
    let url = crate::relay::proxy_url();
    ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]
        .into_iter()
        .map(|name| (name.to_string(), url.clone()))
        .collect()
}

/// Make `dir` a repository the image's package manager can read; it is bind-mounted at
/// `in_chroot` already, which is how the image's dpkg-deb reaches its files.
fn index_local_repo(
    build: &Build<'_>,
    root: &Path,
    manager: Manager,
    dir: &Path,
    in_chroot: &str,
) -> anyhow::Result<()> {
    match manager {
        Manager::Apt => {
            let debs = files_with_suffix(dir, ".deb")?;
            if debs.is_empty() {
                bail!("--package-source {}: no .deb files in it", dir.display());
            }
            let mut index = String::new();
            for deb in &debs {
                let relative = deb.to_string_lossy();
                let argv = vec![
                    "dpkg-deb".to_string(),
                    "-f".to_string(),
                    format!("{in_chroot}/{relative}"),
                ];
                let result = build
                    .run(&argv, Some(root))
                    .with_context(|| format!("reading the control fields of {relative}"))?;
                let (sha256, size) = sha256_and_size(&dir.join(deb))?;
                index.push_str(&packages_stanza(
                    &String::from_utf8_lossy(&result.stdout),
                    &relative,
                    size,
                    &sha256,
                ));
            }
            std::fs::write(dir.join("Packages"), index)
                .with_context(|| format!("writing {}/Packages", dir.display()))?;
            build.log(format!(
                "indexed {} packages in {}",
                debs.len(),
                dir.display()
            ));
        }
        Manager::Dnf | Manager::Tdnf => {
            if !dir.join("repodata/repomd.xml").is_file() {
                if files_with_suffix(dir, ".rpm")?.is_empty() {
                    bail!("--package-source {}: no .rpm files in it", dir.display());
                }
                bail!(
                    "--package-source {}: the directory has no repodata/; run `createrepo_c` on it first",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes() -> PackageChanges {
        PackageChanges {
            update_existing: true,
            remove: vec!["nano".into()],
            install: vec!["curl".into(), "jq".into()],
            update: vec!["openssl".into()],
            sources: vec![PackageSource::Directory("/work/packages/0".into())],
            disable_base_repos: true,
            network: false,
        }
    }

    fn repo() -> LocalRepo {
        LocalRepo {
            name: "vmic-local-0".into(),
            path: "/run/vmic-packages/0".into(),
        }
    }

    #[test]
    fn apt_commands_follow_azl_order_and_use_private_lists_when_base_repos_are_off() {
        let commands = commands(Manager::Apt, &changes(), true, &[repo()]);
        let verbs: Vec<String> = commands.iter().map(|argv| argv[9..].join(" ")).collect();
        assert_eq!(
            verbs,
            [
                "update",
                "remove --purge nano",
                "upgrade",
                "install curl jq",
                "install --only-upgrade openssl",
                "clean"
            ]
        );
        assert_eq!(
            commands[0][..9],
            [
                "apt-get",
                "-y",
                "-q",
                "-o",
                "Dir::Etc::SourceList=/run/vmic-apt/sources.list",
                "-o",
                "Dir::Etc::SourceParts=/run/vmic-apt/sources.list.d",
                "-o",
                "Dir::State::Lists=/run/vmic-apt/lists"
            ]
        );
    }

    #[test]
    fn apt_with_base_repos_uses_the_images_own_configuration() {
        let mut changes = changes();
        changes.update_existing = false;
        changes.remove.clear();
        changes.update.clear();
        let commands = commands(Manager::Apt, &changes, false, &[]);
        assert_eq!(
            commands,
            [
                strings(["apt-get", "-y", "-q", "update"]),
                strings(["apt-get", "-y", "-q", "install", "curl", "jq"]),
                strings(["apt-get", "-y", "-q", "clean"]),
            ]
        );
    }

    #[test]
    fn tdnf_without_base_repos_enables_only_local_ones() {
        let commands = commands(Manager::Tdnf, &changes(), false, &[repo()]);
        assert_eq!(
            commands[2],
            strings([
                "tdnf",
                "-y",
                "--disablerepo=*",
                "--enablerepo=vmic-local-0",
                "install",
                "curl",
                "jq"
            ])
        );
        assert_eq!(commands[0][4..], ["remove", "nano"]);
        assert_eq!(commands.last().unwrap()[4..], ["clean", "all"]);
    }

    #[test]
    fn packages_stanza_adds_location_and_checksums() {
        let control = "Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nDescription: x\n y\n";
        let stanza = packages_stanza(control, "sub/hello_2.10-3_amd64.deb", 53000, "ab12");
        assert_eq!(
            stanza,
            "Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nDescription: x\n y\n\
             Filename: ./sub/hello_2.10-3_amd64.deb\nSize: 53000\nSHA256: ab12\n\n"
        );
    }

    #[test]
    fn repo_definitions_point_at_the_chroot_path() {
        assert_eq!(
            apt_source_line(&repo()),
            "deb [trusted=yes] file:/run/vmic-packages/0 ./\n"
        );
        let text = dnf_repo_file(&repo());
        assert!(text.starts_with("[vmic-local-0]\n"));
        assert!(text.contains("baseurl=file:///run/vmic-packages/0\n"));
        assert!(text.contains("gpgcheck=0\n"));
    }

    #[test]
    fn restore_puts_back_what_was_there() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("../run/resolved", root.path().join("etc/resolv.conf")).unwrap();
        {
            let mut restore = Restore::default();
            restore
                .write(
                    root.path(),
                    "/etc/resolv.conf",
                    b"nameserver 10.0.2.3\n",
                    0o644,
                )
                .unwrap();
            restore
                .write(root.path(), "/usr/sbin/policy-rc.d", b"exit 101\n", 0o755)
                .unwrap();
            assert_eq!(
                std::fs::read_to_string(root.path().join("etc/resolv.conf")).unwrap(),
                "nameserver 10.0.2.3\n"
            );
        }
        assert_eq!(
            std::fs::read_link(root.path().join("etc/resolv.conf")).unwrap(),
            Path::new("../run/resolved")
        );
        assert!(!root.path().join("usr/sbin/policy-rc.d").exists());
        assert_eq!(
            std::fs::read_dir(root.path().join("etc")).unwrap().count(),
            1
        );
    }

    #[test]
    fn debs_are_found_recursively_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        for file in ["z.deb", "b/a.deb", "notes.txt"] {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        assert_eq!(
            files_with_suffix(dir.path(), ".deb").unwrap(),
            [PathBuf::from("b/a.deb"), PathBuf::from("z.deb")]
        );
    }
}
