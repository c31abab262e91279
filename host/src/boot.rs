//! `vmic boot`: boot a disk image or ISO under firmware and watch its serial console.
//!
//! resolve (image format and arch, firmware, pattern: usage errors, nothing started) →
//! prepare (temp dir, overlay, firmware variables, argv) → run QEMU, reading the serial console
//! line by line until the pattern matches, the kernel panics, the VM stops or time runs out.
//! QEMU never outlives the command: it is killed on every way out.

mod argv;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use regex::Regex;
use tokio::io::AsyncReadExt;

pub use self::argv::{boot_argv, BootMedium, BootVm, FirmwareImages};
pub use crate::console::{clean_line, Console, ConsoleTail, Verdict};
pub use crate::image::{
    arch_from_bytes, detect_arch, detect_format, format_from_bytes, ImageFormat,
};

use crate::accel::Accel;
use crate::cli::{Arch, BootArgs, Firmware, GlobalArgs, Media};
use crate::report::{Failure, Reporter, Source};

/// `vmic boot`, resolved: every path checked, every choice made.
#[derive(Debug, Clone)]
pub struct BootSettings {
    pub image: PathBuf,
    /// The image's format; for PXE artifacts (a directory or an archive), `Raw` (unused).
    pub format: ImageFormat,
    pub attach: Attach,
    pub arch: Arch,
    pub firmware: Firmware,
    /// Secure Boot enforced (x86_64 UEFI only).
    pub secure_boot: bool,
    pub accel: Accel,
    pub expect: Option<Regex>,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub console_log: Option<PathBuf>,
}

/// How the image reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// A disk, through a throwaway overlay.
    Disk,
    /// A read-only CD-ROM.
    Cdrom,
    /// PXE artifacts over QEMU's user network.
    Pxe,
}

/// How a boot went wrong (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("no console line matched `{pattern}` within {seconds} s")]
    NoMatch {
        pattern: String,
        seconds: u64,
        #[source]
        tail: ConsoleTail,
    },
    #[error("the VM did not power off within {seconds} s")]
    StillRunning {
        seconds: u64,
        #[source]
        tail: ConsoleTail,
    },
    #[error("the guest kernel panicked: {line}")]
    KernelPanic {
        line: String,
        #[source]
        tail: ConsoleTail,
    },
    #[error("Secure Boot refused the boot chain: {line}")]
    SecureBootRefused {
        line: String,
        #[source]
        tail: ConsoleTail,
    },
    #[error("the VM stopped ({status}) before a console line matched `{pattern}`{stderr}")]
    StoppedWithoutMatch {
        status: String,
        pattern: String,
        stderr: String,
        #[source]
        tail: ConsoleTail,
    },
    #[error("QEMU failed ({status}){stderr}")]
    QemuFailed {
        status: String,
        stderr: String,
        #[source]
        tail: ConsoleTail,
    },
    #[error("interrupted; the VM was stopped")]
    Interrupted,
}

pub fn run(_global: &GlobalArgs, args: BootArgs) -> Result<(), Failure> {
    let settings = resolve(&args).map_err(Failure::Usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(Failure::Build)?;
    let reporter = crate::report::Reporter::plain();
    let matched = runtime
        .block_on(boot(&settings, &reporter))
        .map_err(Failure::Build)?;
    if let Some(line) = matched {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
    }
    Ok(())
}

/// Check the command line against the image: all usage errors surface here, before anything
/// starts.
pub fn resolve(args: &BootArgs) -> anyhow::Result<BootSettings> {
    let image = std::path::absolute(&args.image_file)
        .with_context(|| format!("cannot resolve {}", args.image_file.display()))?;
    let (format, arch) = if args.media == Media::Pxe {
        if args.firmware == Firmware::Bios {
            anyhow::bail!("PXE artifacts boot under UEFI (their boot files are EFI binaries): drop --firmware bios");
        }
        let arch = match args.arch {
            Some(arch) => arch,
            None => crate::pxe::boot_arch(&image)?,
        };
        (ImageFormat::Raw, arch)
    } else {
        let format = detect_format(&image)?;
        crate::references::check(&image, format)?;
        let arch = crate::image::resolve_arch(args.arch, &image, format).context(
            "cannot tell the image's architecture and the host's is unsupported: pass --arch",
        )?;
        (format, arch)
    };
    if args.firmware == Firmware::Bios && arch != Arch::X86_64 {
        anyhow::bail!("--firmware bios is for x86_64 only; {arch} boots with UEFI");
    }
    if args.secure_boot && (args.firmware != Firmware::Uefi || arch != Arch::X86_64) {
        anyhow::bail!(
            "--secure-boot needs UEFI firmware on x86_64 (OVMF with Microsoft's keys); this boot is {arch} with {} firmware",
            args.firmware.name()
        );
    }
    let expect = args
        .expect
        .as_deref()
        .map(Regex::new)
        .transpose()
        .context("--expect is not a valid regular expression")?;
    if args.timeout == 0 {
        anyhow::bail!("--timeout must be at least 1 second");
    }
    if let Some(path) = &args.console_log {
        fs_err::File::create(path).context("cannot write the --console-log file")?;
    }
    let accel = crate::accel::resolve(args.accel, arch, None);
    tracing::debug!(image = %image.display(), format = format.name(), %arch, accel = accel.name(), "boot settings");
    Ok(BootSettings {
        image,
        format,
        attach: match args.media {
            Media::Auto if format == ImageFormat::Iso => Attach::Cdrom,
            Media::Auto | Media::Disk => Attach::Disk,
            Media::Cdrom => Attach::Cdrom,
            Media::Pxe => Attach::Pxe,
        },
        arch,
        firmware: args.firmware,
        secure_boot: args.secure_boot,
        accel,
        expect,
        timeout: Duration::from_secs(args.timeout),
        memory_mib: args.memory,
        console_log: args.console_log.clone(),
    })
}

/// A VM ready to start: its temp dir (overlay, firmware variables) lives as long as this value.
struct Prepared {
    _dir: tempfile::TempDir,
    binary: PathBuf,
    argv: Vec<std::ffi::OsString>,
    console: crate::console::ConsolePipe,
    /// PXE: the artifacts' bootstrap ISO, served at this loopback port from this directory.
    http: Option<(u16, PathBuf)>,
}

fn prepare(settings: &BootSettings) -> anyhow::Result<Prepared> {
    let binary = crate::qemu::find_system_binary(settings.arch)?;
    let firmware_files = match settings.firmware {
        Firmware::Bios => None,
        Firmware::Uefi if settings.secure_boot => Some(crate::qemu::find_secure_boot_firmware()?),
        Firmware::Uefi => Some(crate::qemu::find_uefi_firmware(settings.arch)?),
    };
    let dir = tempfile::Builder::new()
        .prefix("vmic-boot-")
        .tempdir()
        .context("creating a temporary directory")?;
    let firmware = match firmware_files {
        None => {
            let sercon_port = dir.path().join("sercon-port");
            fs_err::write(&sercon_port, 0x3f8u16.to_le_bytes())?;
            FirmwareImages::Bios { sercon_port }
        }
        Some(files) => {
            let vars = dir.path().join("efi-vars.fd");
            fs_err::copy(&files.vars, &vars)?;
            FirmwareImages::Uefi {
                code: files.code,
                vars,
                secure_boot: settings.secure_boot,
            }
        }
    };
    let mut http = None;
    let medium = if settings.attach == Attach::Pxe {
        let tftp = crate::pxe::artifacts_dir(&settings.image, dir.path())?;
        let bootfile = crate::pxe::boot_file_name(settings.arch).to_string();
        if !tftp.join(&bootfile).is_file() {
            anyhow::bail!(
                "{} has no {bootfile}: not PXE artifacts for {}",
                settings.image.display(),
                settings.arch
            );
        }
        http = crate::pxe::served_bootstrap(&tftp)?.map(|port| (port, tftp.clone()));
        BootMedium::Pxe { tftp, bootfile }
    } else if settings.attach == Attach::Cdrom {
        BootMedium::Cdrom {
            path: settings.image.clone(),
        }
    } else {
        let overlay = dir.path().join("overlay.qcow2");
        let size = crate::image::virtual_size(&settings.image, settings.format)?;
        crate::image::create_overlay(&settings.image, settings.format, &overlay, size)?;
        BootMedium::Disk {
            path: overlay,
            format: "qcow2".into(),
            backing: crate::qemu::Backing {
                path: settings.image.clone(),
                format: settings.format.qemu_name().into(),
            },
        }
    };
    let console = crate::console::ConsolePipe::new().context("creating the console pipe")?;
    let cpus = crate::vm::default_cpus();
    let vm = BootVm {
        arch: settings.arch,
        accel: settings.accel,
        memory_mib: settings.memory_mib,
        cpus,
        firmware,
        medium,
        console_fd: std::os::fd::AsRawFd::as_raw_fd(&console.writer),
    };
    Ok(Prepared {
        argv: boot_argv(&vm),
        _dir: dir,
        binary,
        console,
        http,
    })
}

/// Boot and watch the console. `Ok(Some(line))`: the line that matched `--expect`;
/// `Ok(None)`: no pattern and the VM powered off cleanly.
pub async fn boot(settings: &BootSettings, reporter: &Reporter) -> anyhow::Result<Option<String>> {
    let prepared = prepare(settings)?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + settings.timeout;
    reporter.note(
        Source::Vmic,
        format_args!(
            "booting {} ({}, {}, {}, {})",
            settings.image.display(),
            match settings.attach {
                Attach::Pxe => "PXE artifacts",
                _ => settings.format.name(),
            },
            settings.arch,
            match settings.firmware {
                Firmware::Uefi => "UEFI",
                Firmware::Bios => "BIOS",
            },
            settings.accel.name()
        ),
    );
    crate::sandbox::warn_if_unsupported(&prepared.binary, reporter);
    // Listening before QEMU starts: the guest may ask as soon as it has an address.
    let _server = match &prepared.http {
        Some((port, root)) => {
            let server = crate::pxe::HttpServer::start(*port, root.clone()).await?;
            reporter.note(
                Source::Vmic,
                format_args!(
                    "serving {} at http://10.0.2.2:{port}/ (the host's 127.0.0.1:{port} in QEMU's user network)",
                    root.display()
                ),
            );
            Some(server)
        }
        None => None,
    };
    let Prepared {
        binary,
        argv,
        console: crate::console::ConsolePipe { reader, writer },
        ..
    } = prepared;
    let mut stream = crate::console::console_reader(reader).context("reading the console pipe")?;
    let mut qemu = crate::qemu::QemuProcess::spawn(&binary, argv, Some(writer))?;
    qemu.warn_if_unwatched(reporter);
    let mut log = match &settings.console_log {
        Some(path) => Some(
            crate::console::CappedLog::create(path, crate::console::CONSOLE_LOG_CAP)
                .with_context(|| format!("cannot write the console log {}", path.display()))?,
        ),
        None => None,
    };
    let mut console = Console::new(settings.expect.clone());
    let pattern = settings
        .expect
        .as_ref()
        .map(|regex| regex.as_str().to_string());
    let interrupted = interrupted();
    tokio::pin!(interrupted);
    let mut buffer = vec![0u8; 16 << 10];
    // A panic or a Secure Boot refusal ends the boot; reading goes on briefly first: what
    // follows says why.
    let mut fatal: Option<Verdict> = None;
    let mut panic_deadline = deadline;
    // A partial line matching `--expect` counts once the console is quiet this long.
    let mut partial_deadline: Option<tokio::time::Instant> = None;
    loop {
        let read = tokio::select! {
            read = stream.read(&mut buffer) => read,
            _ = sleep_until_some(partial_deadline) => {
                if let Some(line) = console.partial_match() {
                    return finish_matched(&mut qemu, started, line, reporter).await;
                }
                partial_deadline = None;
                continue;
            }
            _ = tokio::time::sleep_until(deadline.min(panic_deadline)) => {
                qemu.kill().await;
                if let Some(verdict) = fatal {
                    return Err(fatal_error(verdict, console.tail()));
                }
                let seconds = settings.timeout.as_secs();
                return Err(match pattern {
                    Some(pattern) => BootError::NoMatch { pattern, seconds, tail: console.tail() },
                    None => BootError::StillRunning { seconds, tail: console.tail() },
                }.into());
            }
            _ = &mut interrupted => {
                qemu.kill().await;
                return Err(BootError::Interrupted.into());
            }
        };
        let count = match read {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        let bytes = &buffer[..count];
        if let Some(log) = log.as_mut() {
            log.write(bytes)?;
        }
        let (lines, verdict) = console.feed(bytes);
        for line in &lines {
            tracing::debug!("console: {line}");
        }
        partial_deadline = console
            .partial_match()
            .map(|_| tokio::time::Instant::now() + Duration::from_millis(500));
        match verdict {
            Some(Verdict::Matched(line)) => {
                return finish_matched(&mut qemu, started, line, reporter).await;
            }
            Some(verdict @ (Verdict::Panic(_) | Verdict::SecureBootRefused(_)))
                if fatal.is_none() =>
            {
                tracing::debug!("{verdict:?} after {:.1} s", started.elapsed().as_secs_f64());
                fatal = Some(verdict);
                panic_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            }
            _ => {}
        }
    }
    // The console closed: QEMU has exited (the guest powered off or rebooted, -no-reboot).
    let (status, stderr) = qemu.wait().await?;
    if let Some(verdict) = fatal {
        return Err(fatal_error(verdict, console.tail()));
    }
    let tail = console.tail();
    if !status.success() && tail.lines.is_empty() {
        // QEMU itself failed (a bad option, a file it cannot open): no guest ever ran.
        return Err(BootError::QemuFailed {
            status: status.to_string(),
            stderr: stderr_suffix(&stderr),
            tail,
        }
        .into());
    }
    match pattern {
        Some(pattern) => Err(BootError::StoppedWithoutMatch {
            status: status.to_string(),
            pattern,
            stderr: stderr_suffix(&stderr),
            tail,
        }
        .into()),
        None if status.success() => {
            reporter.note(
                Source::Vmic,
                format_args!(
                    "the VM powered off after {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
            );
            Ok(None)
        }
        None => Err(BootError::QemuFailed {
            status: status.to_string(),
            stderr: stderr_suffix(&stderr),
            tail,
        }
        .into()),
    }
}

/// The error for a boot that ended with a panic or a Secure Boot refusal.
fn fatal_error(verdict: Verdict, tail: ConsoleTail) -> anyhow::Error {
    match verdict {
        Verdict::SecureBootRefused(line) => BootError::SecureBootRefused { line, tail }.into(),
        Verdict::Panic(line) => BootError::KernelPanic { line, tail }.into(),
        Verdict::Matched(_) => unreachable!("a match ends the boot at once, never kept"),
    }
}

async fn finish_matched(
    qemu: &mut crate::qemu::QemuProcess,
    started: Instant,
    line: String,
    reporter: &Reporter,
) -> anyhow::Result<Option<String>> {
    reporter.note(
        Source::Vmic,
        format_args!(
            "matched after {:.1} s: {line}",
            started.elapsed().as_secs_f64()
        ),
    );
    qemu.kill().await;
    Ok(Some(line))
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves on Ctrl-C (or SIGTERM on Unix).
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// QEMU's stderr as a suffix of an error message ("" when empty).
fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}
