//! Pure argv builders for `vmic boot`: the VM that boots an image under firmware, and the
//! throwaway overlay that keeps the image untouched.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cli::Arch;
use crate::machine::Accel;
use crate::qemu::escape_comma;

/// Firmware the VM starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareImages {
    /// SeaBIOS, QEMU's default on x86_64. `sercon_port` is a fw_cfg file holding the serial
    /// port (0x3f8, little endian) SeaBIOS mirrors its screen to, so that BIOS and boot loader
    /// messages (which go to the screen, and there is none) reach the serial console.
    Bios { sercon_port: PathBuf },
    /// UEFI: read-only code and this VM's own writable copy of the variable store. With
    /// `secure_boot`, the SMM build whose store enforces Secure Boot: the machine gets SMM and
    /// the flash is writable from SMM only, so the guest cannot turn it off.
    Uefi {
        code: PathBuf,
        vars: PathBuf,
        secure_boot: bool,
    },
}

/// What the VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootMedium {
    /// A disk (the throwaway qcow2 overlay over the image) on virtio-blk.
    Disk {
        path: PathBuf,
        format: String,
        backing: crate::qemu::Backing,
    },
    /// An ISO as a read-only CD-ROM.
    Cdrom { path: PathBuf },
    /// PXE: a NIC on QEMU's user network, whose DHCP names `bootfile` and whose TFTP server
    /// serves `tftp`; the firmware's own network stack boots it (no option ROM).
    Pxe { tftp: PathBuf, bootfile: String },
}

/// Everything needed to start the VM: pure data, turned into an argv by [`boot_argv`].
#[derive(Debug, Clone)]
pub struct BootVm {
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: FirmwareImages,
    pub medium: BootMedium,
    /// The write end of the serial console's pipe, inherited by QEMU (see
    /// [`crate::qemu::console_argv`]).
    pub console_fd: std::os::fd::RawFd,
}

fn os(value: impl Into<OsString>) -> OsString {
    value.into()
}

/// Argv (without the binary) for a VM booting `vm.medium` under `vm.firmware`, its first serial
/// port into the pipe `vm.console_fd`, no display, no network.
pub fn boot_argv(vm: &BootVm) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(os));
    let secure_boot = matches!(
        vm.firmware,
        FirmwareImages::Uefi {
            secure_boot: true,
            ..
        }
    );
    let mut machine = crate::machine::machine_argv(vm.arch, vm.accel).map(str::to_string);
    if secure_boot {
        // OVMF's Secure Boot build keeps its variables behind SMM.
        machine[1] = format!("{},smm=on", machine[1]);
    }
    push(&machine.each_ref().map(String::as_str));
    push(&[
        "-smp",
        &vm.cpus.to_string(),
        "-m",
        &format!("{}M", vm.memory_mib),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    match &vm.firmware {
        FirmwareImages::Uefi {
            code,
            vars,
            secure_boot,
        } => {
            if *secure_boot {
                push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            }
            push(&[
                "-drive",
                &format!(
                    "if=pflash,unit=0,format=raw,readonly=on,file={}",
                    escape_comma(code)
                ),
                "-drive",
                &format!("if=pflash,unit=1,format=raw,file={}", escape_comma(vars)),
            ])
        }
        FirmwareImages::Bios { sercon_port } => push(&[
            "-fw_cfg",
            &format!("name=etc/sercon-port,file={}", escape_comma(sercon_port)),
        ]),
    }
    push(
        &crate::qemu::console_argv(vm.console_fd)
            .each_ref()
            .map(String::as_str),
    );
    push(&["-device", "virtio-rng-pci"]);
    match &vm.medium {
        BootMedium::Disk {
            path,
            format,
            backing,
        } => {
            let disk = crate::qemu::Disk {
                path: path.clone(),
                format: format.clone(),
                serial: String::new(),
                read_only: false,
                backing: Some(backing.clone()),
            };
            argv.extend(crate::qemu::blockdev_args("disk0", &disk, true));
            argv.extend(
                ["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
                    .iter()
                    .map(os),
            );
        }
        BootMedium::Pxe { tftp, bootfile } => {
            push(&[
                "-netdev",
                &format!(
                    "user,id=net0,tftp={},bootfile={}",
                    escape_comma(tftp),
                    bootfile.replace(',', ",,")
                ),
                // romfile= (empty): OVMF/AAVMF's own virtio-net driver and PXE, not iPXE's.
                "-device",
                "virtio-net-pci,netdev=net0,romfile=,bootindex=1",
            ]);
        }
        BootMedium::Cdrom { path } => {
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id=cd0,format=raw,media=cdrom,readonly=on",
                    escape_comma(path)
                ),
            ]);
            // A virtio-scsi CD drive on both arches: virt has no IDE, and cloud kernels
            // (Debian's `cloud` flavour) have no AHCI driver for q35's built-in controller.
            push(&[
                "-device",
                "virtio-scsi-pci,id=scsi0",
                "-device",
                "scsi-cd,drive=cd0,bus=scsi0.0,bootindex=1",
            ]);
        }
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(argv: &[OsString]) -> String {
        argv.iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn vm(arch: Arch, firmware: FirmwareImages, medium: BootMedium) -> BootVm {
        BootVm {
            arch,
            accel: Accel::Tcg,
            memory_mib: 2048,
            cpus: 2,
            firmware,
            medium,
            console_fd: 3,
        }
    }

    fn uefi(arch: Arch) -> FirmwareImages {
        match arch {
            Arch::X86_64 => FirmwareImages::Uefi {
                code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                vars: PathBuf::from("/tmp/boot/vars.fd"),
                secure_boot: false,
            },
            Arch::Aarch64 => FirmwareImages::Uefi {
                code: PathBuf::from("/usr/share/AAVMF/AAVMF_CODE.fd"),
                vars: PathBuf::from("/tmp/boot/vars.fd"),
                secure_boot: false,
            },
        }
    }

    fn disk() -> BootMedium {
        BootMedium::Disk {
            path: PathBuf::from("/tmp/boot/overlay.qcow2"),
            format: "qcow2".into(),
            backing: crate::qemu::Backing {
                path: PathBuf::from("/images/disk.qcow2"),
                format: "qcow2".into(),
            },
        }
    }

    fn cdrom() -> BootMedium {
        BootMedium::Cdrom {
            path: PathBuf::from("/images/live,1.iso"),
        }
    }

    #[test]
    fn x86_64_uefi_disk() {
        insta::assert_snapshot!(render(&boot_argv(&vm(
            Arch::X86_64,
            uefi(Arch::X86_64),
            disk()
        ))));
    }

    #[test]
    fn x86_64_bios_cdrom() {
        let argv = render(&boot_argv(&vm(
            Arch::X86_64,
            FirmwareImages::Bios {
                sercon_port: PathBuf::from("/tmp/boot/sercon-port"),
            },
            cdrom(),
        )));
        insta::assert_snapshot!(argv);
        // The rule behind the snapshot: in a QEMU option value a comma ends the value unless
        // doubled, so the ISO `/images/live,1.iso` is given as `live,,1.iso`, never split.
        let drive = argv
            .lines()
            .find(|arg| arg.contains("media=cdrom"))
            .expect("a cdrom drive");
        assert!(drive.starts_with("file=/images/live,,1.iso,"), "{drive}");
        assert!(!argv.contains("live,1.iso"), "{argv}");
    }

    #[test]
    fn aarch64_uefi_cdrom() {
        insta::assert_snapshot!(render(&boot_argv(&vm(
            Arch::Aarch64,
            uefi(Arch::Aarch64),
            cdrom()
        ))));
    }

    #[test]
    fn aarch64_uefi_disk_under_kvm() {
        let mut vm = vm(Arch::Aarch64, uefi(Arch::Aarch64), disk());
        vm.accel = Accel::Kvm;
        insta::assert_snapshot!(render(&boot_argv(&vm)));
    }

    /// OVMF's Secure Boot build runs only on a machine with SMM, with its flash writable from
    /// SMM alone (else the guest could rewrite the keys); without Secure Boot neither is set.
    #[test]
    fn secure_boot_adds_smm_and_locks_the_flash() {
        let secure = FirmwareImages::Uefi {
            code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
            vars: PathBuf::from("/tmp/boot/vars.fd"),
            secure_boot: true,
        };
        let argv: Vec<String> = boot_argv(&vm(Arch::X86_64, secure, disk()))
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            argv.iter()
                .position(|arg| arg == flag)
                .map(|at| argv[at + 1].as_str())
        };
        assert_eq!(after("-machine"), Some("q35,smm=on"));
        assert_eq!(
            after("-global"),
            Some("driver=cfi.pflash01,property=secure,value=on")
        );
        assert!(argv.iter().any(|arg| arg.contains("OVMF_CODE_4M.ms.fd")));

        let plain: Vec<String> = boot_argv(&vm(Arch::X86_64, uefi(Arch::X86_64), disk()))
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert!(plain
            .iter()
            .all(|arg| !arg.contains("smm") && arg != "-global"));
    }
}
