//! `vmic doctor`: what this machine can do — QEMU, accelerators, transports, guest images —
//! and with `--boot`, a timed boot of each builder VM.

use std::process::Command;

use crate::cli::{AccelChoice, Arch, DoctorArgs, GlobalArgs, TransportChoice};
use crate::report::Failure;
use crate::transport::TransportKind;
use crate::vm::{RunningVm, VmOptions};

const ARCHES: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

fn qemu_version(arch: Arch) -> Option<String> {
    let binary = crate::qemu::find_system_binary(arch).ok()?;
    let output = Command::new(&binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(format!(
        "{} ({})",
        text.lines().next().unwrap_or("").trim(),
        binary.display()
    ))
}

pub fn run(_global: &GlobalArgs, args: DoctorArgs) -> Result<(), Failure> {
    let mut report = Vec::new();
    let mut problems = 0;
    for arch in ARCHES {
        match qemu_version(arch) {
            Some(version) => report.push(format!("qemu {arch}: {version}")),
            None => {
                problems += 1;
                report.push(format!(
                    "qemu {arch}: missing (install {})",
                    crate::qemu::system_package(arch)
                ));
            }
        }
    }
    let host = Arch::host();
    for arch in ARCHES {
        let image = crate::guest_image::find(arch);
        match &image {
            Ok(image) => report.push(format!(
                "guest image {arch}: {} (kernel {})",
                image.dir.display(),
                image.manifest.kernel_version
            )),
            Err(_) => report.push(format!(
                "guest image {arch}: missing (run `scripts/build-guest-image --arch {arch}`)"
            )),
        }
        let accel = crate::accel::resolve(
            AccelChoice::Auto,
            arch,
            image.as_ref().ok().map(|image| image.kernel.as_path()),
        );
        let native = if host == Some(arch) {
            "native"
        } else {
            "cross-arch"
        };
        report.push(format!("accelerator {arch}: {} ({native})", accel.name()));
    }
    let kvm_node = std::path::Path::new("/dev/kvm").exists();
    report.push(format!(
        "/dev/kvm: {}",
        if kvm_node {
            "present (KVM is used only when a probe boot works)"
        } else {
            "absent"
        }
    ));
    report.push(format!(
        "transport vhost-vsock: {}",
        if crate::transport::vhost_vsock_usable() {
            "available"
        } else {
            "unavailable (/dev/vhost-vsock)"
        }
    ));
    report.push(format!(
        "transport vhost-user-vsock: {}",
        match crate::transport::vsock_daemon() {
            Some(path) => format!("available ({})", path.display()),
            None => "unavailable (cargo install vhost-device-vsock)".to_string(),
        }
    ));
    report.push("transport virtio-serial: available".to_string());
    if let Ok(kind) = crate::transport::select(TransportChoice::Auto) {
        report.push(format!("transport auto: {}", kind.name()));
    }
    for line in &report {
        println!("{line}");
    }
    if args.boot {
        problems += boot_all(&args).map_err(Failure::Build)?;
    }
    if problems > 0 {
        return Err(Failure::Build(anyhow::anyhow!(
            "{problems} check(s) failed"
        )));
    }
    Ok(())
}

fn boot_all(args: &DoctorArgs) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut failures = 0;
    let transports = match args.transport {
        Some(choice) => vec![choice],
        None => vec![TransportChoice::Vsock, TransportChoice::Serial],
    };
    for arch in ARCHES {
        if args.arch.is_some_and(|only| only != arch) {
            continue;
        }
        if crate::guest_image::find(arch).is_err() {
            println!("boot {arch}: skipped (no guest image)");
            continue;
        }
        for &transport in &transports {
            if transport == TransportChoice::Vsock
                && crate::transport::select(TransportChoice::Vsock).is_err()
            {
                println!("boot {arch} vsock: skipped (vsock unavailable)");
                continue;
            }
            let mut options = VmOptions::new(arch);
            options.transport = transport;
            let outcome = runtime.block_on(async {
                let vm = RunningVm::start(options).await?;
                let line = describe_boot(&vm);
                vm.shutdown().await?;
                anyhow::Ok(line)
            });
            match outcome {
                Ok(line) => println!("{line}"),
                Err(error) => {
                    failures += 1;
                    println!(
                        "boot {arch}: FAILED\n{}",
                        crate::report::render_error(&error)
                    );
                }
            }
        }
    }
    Ok(failures)
}

fn describe_boot(vm: &RunningVm) -> String {
    let transport = match vm.transport {
        TransportKind::VhostVsock | TransportKind::VhostUserVsock => "vsock",
        TransportKind::Serial => "serial",
    };
    format!(
        "boot {} {transport}: agent ready in {:.2} s (accelerator {}, transport {}, kernel {})",
        vm.image.arch,
        vm.ready_after.as_secs_f64(),
        vm.accel.name(),
        vm.transport.name(),
        vm.session.hello().kernel
    )
}
