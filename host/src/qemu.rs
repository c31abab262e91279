//! QEMU: pure argv builders for the builder VM, and a process handle that never outlives vmic.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::cli::Arch;
use crate::machine::Accel;

use crate::machine::system_binary_variable;
pub use crate::machine::{find_in_path, system_binary, system_binary_name, system_package};

/// The emulator, or an error naming where it was looked for and the package to install.
pub fn find_system_binary(arch: Arch) -> anyhow::Result<PathBuf> {
    let path = system_binary(arch);
    if path.is_file() {
        return Ok(path);
    }
    let variable = system_binary_variable(arch);
    // Blame the setting that chose the path: PATH was never searched when the variable is set.
    let (problem, fix) = if std::env::var_os(&variable).is_some() {
        (
            format!("{} (set by {variable}) is not a file", path.display()),
            format!("point {variable} at the emulator, or unset it to search PATH; "),
        )
    } else {
        (
            format!("{} not found on PATH", system_binary_name(arch)),
            String::new(),
        )
    };
    let install = if cfg!(target_os = "macos") {
        "brew install qemu".to_string()
    } else {
        format!(
            "apt-get install {} (Debian 12: from bookworm-backports; `scripts/setup` does it)",
            system_package(arch)
        )
    };
    Err(crate::report::hinted(problem, format!("{fix}{install}")))
}

/// A disk attached to the builder VM, found in the guest by its virtio serial string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// QEMU block format (`raw`, `qcow2`, `vpc`, `vhdx`): always explicit, never probed.
    pub format: String,
    pub serial: String,
    pub read_only: bool,
    /// The image below a throwaway overlay, given explicitly so QEMU never reads a backing
    /// name from a header (`None`: the disk has no backing, and none is followed).
    pub backing: Option<Backing>,
}

/// An overlay's backing image, opened read-only as a plain file of an explicit format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: String,
}

/// `-blockdev` values (JSON, so that `"backing": null` is a real null) for a disk node named
/// `node`: the file protocol only (never a `json:` or network name read from a path), an
/// explicit format, and a backing that is either the explicit `backing` node or none at all,
/// so nothing an image's header names is ever opened.
pub fn blockdev_args(node: &str, disk: &Disk, unsafe_cache: bool) -> Vec<OsString> {
    fn node_json(
        name: &str,
        path: &Path,
        format: &str,
        read_only: bool,
        backing: serde_json::Value,
    ) -> serde_json::Value {
        let mut node = serde_json::json!({
            "node-name": name,
            "driver": format,
            "read-only": read_only,
            "file": {"driver": "file", "filename": path.to_string_lossy()},
        });
        // Only formats with backing support take the option (raw, vpc and vhdx have none).
        if format == "qcow2" {
            node["backing"] = backing;
        }
        node
    }
    let mut argv = Vec::new();
    let backing = match &disk.backing {
        Some(backing) => {
            let name = format!("{node}-backing");
            let json = node_json(
                &name,
                &backing.path,
                &backing.format,
                true,
                serde_json::Value::Null,
            );
            argv.push(os("-blockdev"));
            argv.push(os(json.to_string()));
            serde_json::Value::String(name)
        }
        None => serde_json::Value::Null,
    };
    let mut json = node_json(node, &disk.path, &disk.format, disk.read_only, backing);
    if unsafe_cache {
        // The builder's disks are scratch: no flushes (cache=unsafe), and freed blocks are
        // returned to the host.
        json["cache"] = serde_json::json!({"no-flush": true});
        json["discard"] = serde_json::json!("unmap");
    }
    argv.push(os("-blockdev"));
    argv.push(os(json.to_string()));
    argv
}

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// Kernel vhost-vsock (`/dev/vhost-vsock`).
    VhostVsock { cid: u32 },
    /// vhost-user-vsock through a `vhost-device-vsock` daemon listening on `socket`.
    VhostUserVsock { socket: PathBuf },
    /// virtio-serial port named `name`, QEMU listening on the unix socket `socket`.
    Serial { socket: PathBuf, name: String },
}

/// Everything needed to start a builder VM: pure data, turned into an argv by [`builder_argv`].
#[derive(Debug, Clone)]
pub struct BuilderVm {
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub disks: Vec<Disk>,
    pub channel: Channel,
    /// The write end of the serial console's pipe (see [`console_argv`]).
    pub console_fd: std::os::fd::RawFd,
    /// QMP socket, used to stop the VM cleanly.
    pub qmp_socket: PathBuf,
    /// A user-mode (slirp) NIC: outbound connections only, for the image's package repos.
    pub network: bool,
    /// The per-build token (a file in the 0700 run dir), passed to the guest through fw_cfg.
    pub token_file: PathBuf,
}

/// The fd set QEMU gets the console pipe's write end in.
const CONSOLE_FDSET: u32 = 1;

/// QEMU's first serial port writing into the console pipe whose write end is `fd` in QEMU
/// (inherited: see [`QemuProcess::spawn`]). A pipe vmic reads (console.rs says why not a
/// socket, and caps what it keeps), not a file QEMU grows without end. `append=on`: without it
/// QEMU 10 asks the fd set for `O_TRUNC` and the open fails (EINVAL).
pub fn console_argv(fd: std::os::fd::RawFd) -> [String; 6] {
    [
        "-add-fd".into(),
        format!("fd={fd},set={CONSOLE_FDSET},opaque=console"),
        "-chardev".into(),
        format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
        "-serial".into(),
        "chardev:console".into(),
    ]
}

fn os(value: impl Into<OsString>) -> OsString {
    value.into()
}

/// Argv (without the binary) for a builder VM. Direct kernel boot, no firmware, no network,
/// no default devices: the less QEMU emulates, the faster TCG boots.
pub fn builder_argv(vm: &BuilderVm) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(os));
    push(&crate::machine::machine_argv(vm.arch, vm.accel));
    push(&["-smp", &vm.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    // vhost-user needs guest memory shared with the daemon.
    if matches!(vm.channel, Channel::VhostUserVsock { .. }) {
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                vm.memory_mib
            ),
            "-numa",
            "node,memdev=mem",
        ]);
    }
    push(&["-m", &format!("{}M", vm.memory_mib)]);
    argv.push(os("-kernel"));
    argv.push(os(&vm.kernel));
    argv.push(os("-initrd"));
    argv.push(os(&vm.initramfs));
    argv.push(os("-append"));
    argv.push(os(&vm.cmdline));
    let mut push = |items: &[&str]| argv.extend(items.iter().map(os));
    push(&console_argv(vm.console_fd).each_ref().map(String::as_str));
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", vm.qmp_socket.display()),
    ]);
    push(&[
        "-fw_cfg",
        &format!(
            "name={},file={}",
            vmic_protocol::TOKEN_FW_CFG_NAME,
            escape_comma(&vm.token_file)
        ),
    ]);
    push(&["-device", "virtio-rng-pci"]);
    // The guest reports the pages it frees and QEMU hands them back to the host: with the
    // agent's memory cgroup this keeps QEMU's RSS near the build's working set instead of
    // growing with the image until it fills the VM.
    push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
    if vm.network {
        // No option ROM: the kernel is booted directly, nothing network-boots.
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]);
    }
    for (index, disk) in vm.disks.iter().enumerate() {
        let node = format!("disk{index}");
        argv.extend(blockdev_args(&node, disk, true));
        let mut push = |items: &[&str]| argv.extend(items.iter().map(os));
        // Errors go to the guest (EIO/ENOSPC), which reports them; QEMU's default would pause
        // the VM on a full host disk and the build would hang.
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive={node},serial={},werror=report,rerror=report",
                disk.serial
            ),
        ]);
    }
    let mut push = |items: &[&str]| argv.extend(items.iter().map(os));
    match &vm.channel {
        Channel::VhostVsock { cid } => {
            push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}")]);
        }
        Channel::VhostUserVsock { socket } => {
            push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", escape_comma(socket)),
                "-device",
                "vhost-user-vsock-pci,chardev=vsock",
            ]);
        }
        Channel::Serial { socket, name } => {
            push(&[
                "-device",
                "virtio-serial-pci",
                "-chardev",
                &format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    escape_comma(socket)
                ),
                "-device",
                &format!("virtserialport,chardev=agent,name={name}"),
            ]);
        }
    }
    argv
}

/// QEMU option values separate keys with commas; a literal comma is doubled.
pub fn escape_comma(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A running QEMU. Dropping it kills QEMU; QEMU also dies with vmic (PDEATHSIG on Linux, the
/// `orphan` watchdog elsewhere), so even a SIGKILLed vmic leaves no VM behind.
pub struct QemuProcess {
    child: tokio::process::Child,
    pub argv: Vec<OsString>,
    /// Without PDEATHSIG (macOS), the process that kills QEMU if vmic dies, or why it could
    /// not start.
    watchdog: Result<Option<crate::orphan::Watchdog>, String>,
}

impl QemuProcess {
    /// Start QEMU. `console`: the write end of a [`ConsolePipe`](crate::console::ConsolePipe),
    /// which QEMU inherits (its argv names it, see [`console_argv`]) and vmic closes here, so
    /// that the read end sees EOF when QEMU exits.
    pub fn spawn(
        binary: &Path,
        mut argv: Vec<OsString>,
        console: Option<std::os::fd::OwnedFd>,
    ) -> anyhow::Result<QemuProcess> {
        // Every QEMU vmic starts (builder VM, `vmic boot`) runs under the seccomp sandbox.
        argv.extend(crate::sandbox::sandbox_argv(crate::sandbox::supported(
            binary,
        )));
        tracing::debug!(binary = %binary.display(), argv = ?argv, "starting QEMU");
        let mut command = tokio::process::Command::new(binary);
        command
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        set_parent_death_signal(&mut command);
        if let Some(console) = &console {
            inherit_fd(&mut command, std::os::fd::AsRawFd::as_raw_fd(console));
        }
        let child = command.spawn().map_err(|error| {
            anyhow::Error::new(error).context(format!("starting {}", binary.display()))
        })?;
        // QEMU holds its copy now; ours would keep the console open after QEMU exits.
        drop(console);
        let watchdog = crate::orphan::watch(child.id()).map_err(|error| error.to_string());
        Ok(QemuProcess {
            child,
            argv,
            watchdog,
        })
    }

    /// Say so when QEMU runs without the watchdog that kills it should vmic die.
    pub fn warn_if_unwatched(&self, reporter: &crate::report::Reporter) {
        if let Err(error) = &self.watchdog {
            reporter.warn(
                crate::report::Source::Vmic,
                format_args!(
                    "no orphan watchdog for QEMU ({error}): if vmic is killed, QEMU may outlive it"
                ),
            );
        }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Wait for QEMU to exit; returns its status and what it wrote to stderr.
    pub async fn wait(&mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        use tokio::io::AsyncReadExt;
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        let status = self.child.wait().await?;
        Ok((status, stderr))
    }

    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The child keeps `fd` (open in vmic with close-on-exec, so no other child gets it).
fn inherit_fd(command: &mut tokio::process::Command, fd: std::os::fd::RawFd) {
    // SAFETY: fcntl is async-signal-safe; the closure only clears the flag of an fd number
    // that is open in the forked child.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child gets SIGKILL when vmic dies, even of SIGKILL (Linux; elsewhere a no-op).
#[cfg(target_os = "linux")]
pub(crate) fn set_parent_death_signal(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn set_parent_death_signal(_command: &mut tokio::process::Command) {}

/// UEFI firmware for a VM: the read-only code and the template of its variable store (each VM
/// gets its own writable copy of the template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFirmware {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// The Debian package that provides UEFI firmware for `arch` (named in "not found" hints).
pub fn uefi_firmware_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ovmf",
        Arch::Aarch64 => "qemu-efi-aarch64",
    }
}

/// Environment variables overriding the firmware paths for `arch` (code, vars).
pub fn uefi_firmware_variables(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("VMIC_OVMF_CODE", "VMIC_OVMF_VARS"),
        Arch::Aarch64 => ("VMIC_AAVMF_CODE", "VMIC_AAVMF_VARS"),
    }
}

/// Known (code, vars) locations: Debian/Ubuntu, Fedora, QEMU's own build, Homebrew.
fn uefi_firmware_candidates(arch: Arch) -> &'static [(&'static str, &'static str)] {
    match arch {
        Arch::X86_64 => &[
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
            ),
            (
                "/usr/share/edk2/ovmf/OVMF_CODE.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.fd",
            ),
            (
                "/usr/share/qemu/edk2-x86_64-code.fd",
                "/usr/share/qemu/edk2-i386-vars.fd",
            ),
            (
                "/opt/homebrew/share/qemu/edk2-x86_64-code.fd",
                "/opt/homebrew/share/qemu/edk2-i386-vars.fd",
            ),
        ],
        Arch::Aarch64 => &[
            (
                "/usr/share/AAVMF/AAVMF_CODE.fd",
                "/usr/share/AAVMF/AAVMF_VARS.fd",
            ),
            (
                "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
                "/usr/share/edk2/aarch64/vars-template-pflash.raw",
            ),
            (
                "/usr/share/qemu/edk2-aarch64-code.fd",
                "/usr/share/qemu/edk2-arm-vars.fd",
            ),
            (
                "/opt/homebrew/share/qemu/edk2-aarch64-code.fd",
                "/opt/homebrew/share/qemu/edk2-arm-vars.fd",
            ),
        ],
    }
}

/// UEFI firmware for `arch`: `$VMIC_OVMF_CODE`/`$VMIC_OVMF_VARS` (x86_64) or
/// `$VMIC_AAVMF_CODE`/`$VMIC_AAVMF_VARS` (aarch64) when set, else the first known location
/// holding both files; otherwise an error naming the package to install.
pub fn find_uefi_firmware(arch: Arch) -> anyhow::Result<UefiFirmware> {
    find_firmware(
        &format!("UEFI firmware for {arch}"),
        uefi_firmware_candidates(arch),
        uefi_firmware_variables(arch),
        uefi_firmware_package(arch),
    )
}

/// OVMF's Secure Boot build (SMM) with a variable store that has Microsoft's keys enrolled
/// and Secure Boot on: `$VMIC_OVMF_SECBOOT_CODE`/`$VMIC_OVMF_SECBOOT_VARS`, else Debian's
/// `ovmf` (`OVMF_CODE_4M.ms.fd`, `OVMF_VARS_4M.ms.fd`) or Fedora's `edk2-ovmf` files.
pub fn find_secure_boot_firmware() -> anyhow::Result<UefiFirmware> {
    find_firmware(
        "Secure Boot UEFI firmware for x86_64",
        &[
            (
                "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.ms.fd",
                "/usr/share/OVMF/OVMF_VARS.ms.fd",
            ),
            (
                "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
            ),
        ],
        ("VMIC_OVMF_SECBOOT_CODE", "VMIC_OVMF_SECBOOT_VARS"),
        "ovmf",
    )
}

fn find_firmware(
    what: &str,
    candidates: &[(&str, &str)],
    (code_variable, vars_variable): (&str, &str),
    package: &str,
) -> anyhow::Result<UefiFirmware> {
    let code_override = std::env::var_os(code_variable).map(PathBuf::from);
    let vars_override = std::env::var_os(vars_variable).map(PathBuf::from);
    let found = if code_override.is_some() || vars_override.is_some() {
        let (default_code, default_vars) = candidates[0];
        vec![UefiFirmware {
            code: code_override.unwrap_or_else(|| PathBuf::from(default_code)),
            vars: vars_override.unwrap_or_else(|| PathBuf::from(default_vars)),
        }]
    } else {
        candidates
            .iter()
            .map(|(code, vars)| UefiFirmware {
                code: PathBuf::from(code),
                vars: PathBuf::from(vars),
            })
            .collect()
    };
    if let Some(firmware) = found
        .iter()
        .find(|firmware| firmware.code.is_file() && firmware.vars.is_file())
    {
        return Ok(firmware.clone());
    }
    let first = &found[0];
    let missing = if first.code.is_file() {
        &first.vars
    } else {
        &first.code
    };
    let install = if cfg!(target_os = "macos") {
        "brew install qemu".to_string()
    } else {
        format!("apt-get install {package}")
    };
    Err(crate::report::hinted(
        format!("{what} not found: {}", missing.display()),
        format!("{install} (or point {code_variable} and {vars_variable} at the firmware files)"),
    ))
}

impl QemuProcess {
    /// QEMU's exit status if it has already exited, without waiting.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(arch: Arch, channel: Channel) -> BuilderVm {
        BuilderVm {
            arch,
            accel: Accel::Tcg,
            memory_mib: 2048,
            cpus: 2,
            kernel: "/cache/guest/kernel".into(),
            initramfs: "/cache/guest/initramfs".into(),
            cmdline: "console=ttyS0 vmic.transport=serial".into(),
            disks: vec![
                Disk {
                    path: "/build/input,1.qcow2".into(),
                    format: "qcow2".into(),
                    serial: "vmic-input".into(),
                    read_only: false,
                    backing: Some(Backing {
                        path: "/in/disk.vhdx".into(),
                        format: "vhdx".into(),
                    }),
                },
                Disk {
                    path: "/out/.x.iso.vmic-partial".into(),
                    format: "raw".into(),
                    serial: "vmic-output".into(),
                    read_only: true,
                    backing: None,
                },
            ],
            channel,
            console_fd: 3,
            qmp_socket: "/tmp/vmic-x/qmp.sock".into(),
            network: false,
            token_file: "/tmp/vmic-x/token".into(),
        }
    }

    fn render(argv: Vec<OsString>) -> String {
        argv.iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn builder_argv_x86_64_serial() {
        insta::assert_snapshot!(render(builder_argv(&vm(
            Arch::X86_64,
            Channel::Serial {
                socket: "/tmp/vmic-x/agent.sock".into(),
                name: "org.vmic.agent.0".into(),
            },
        ))));
    }

    #[test]
    fn builder_argv_aarch64_vhost_user_vsock() {
        insta::assert_snapshot!(render(builder_argv(&vm(
            Arch::Aarch64,
            Channel::VhostUserVsock {
                socket: "/tmp/vmic-x/vhost.sock".into(),
            },
        ))));
    }
}
