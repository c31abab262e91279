//! The facts of a QEMU machine decided once for every VM vmic starts (builder VM, `vmic boot`,
//! the KVM probe): the guest architecture, the accelerator, machine type, CPU model, console
//! device, and where the emulator binary is found. A leaf module: it imports nothing of vmic.

use std::path::PathBuf;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64", alias = "amd64")]
    X86_64,
    #[value(name = "aarch64", alias = "arm64")]
    Aarch64,
}

impl Arch {
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for the architecture.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Hvf,
    Tcg,
}

impl Accel {
    /// The value for QEMU's `-accel`.
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            // Multi-threaded TCG uses every vCPU thread; it is the default where supported but
            // explicit is clearer when reading a logged argv.
            Accel::Tcg => "tcg,thread=multi",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }

    pub fn is_emulated(self) -> bool {
        self == Accel::Tcg
    }
}

/// QEMU's machine type for `arch`.
pub fn machine_type(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "q35",
        Arch::Aarch64 => "virt",
    }
}

/// QEMU's `-cpu` for `arch` under `accel`.
pub fn cpu_model(arch: Arch, accel: Accel) -> &'static str {
    match (arch, accel) {
        (_, Accel::Kvm | Accel::Hvf) => "host",
        // Without ERMS and FSRM the guest kernel copies and zeroes pages with plain moves, and
        // glibc's memcpy with vector moves, instead of `rep movsb`/`rep stosb`, which TCG
        // runs a byte at a time: reading 200 MB from the page cache took 0.2 s instead of
        // 0.9 s, and an x86_64 ISO build 47.1 s instead of 52.9 s (medians of 6 alternated
        // runs, the same ISO byte for byte). The flags only tell software which copy is fast.
        (Arch::X86_64, Accel::Tcg) => "max,erms=off,fsrm=off",
        // Without pointer auth the images' PAC instructions are NOPs instead of emulated
        // hashes: an aarch64 ISO build took 58.8 s instead of 70.8 s with
        // `max,pauth-impdef=on` (cortex-a57, lacking newer instructions: 86.5 s); the aarch64
        // test image's disk booted to its marker in 23.1 s instead of 28.0 s.
        (Arch::Aarch64, Accel::Tcg) => "max,pauth=off,sve=off",
    }
}

/// `-machine`, `-accel` and `-cpu` for a guest of `arch` under `accel`: every VM vmic starts.
pub fn machine_argv(arch: Arch, accel: Accel) -> [&'static str; 6] {
    [
        "-machine",
        machine_type(arch),
        "-accel",
        accel.qemu_arg(),
        "-cpu",
        cpu_model(arch, accel),
    ]
}

/// The kernel console device of the machine's first serial port.
pub fn console_device(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// Name of the QEMU system emulator for `arch`.
pub fn system_binary_name(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// The Debian package that provides the emulator (named in "not found" hints).
pub fn system_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

/// Path of the emulator: `$VMIC_QEMU_<ARCH>` if set, else the first match on `PATH`, else the
/// bare name (spawning it then fails with a hint from [`find_system_binary`]).
pub fn system_binary(arch: Arch) -> PathBuf {
    if let Some(path) = std::env::var_os(system_binary_variable(arch)) {
        return PathBuf::from(path);
    }
    find_in_path(system_binary_name(arch))
        .unwrap_or_else(|| PathBuf::from(system_binary_name(arch)))
}

/// The environment variable that overrides the emulator's path.
pub(crate) fn system_binary_variable(arch: Arch) -> String {
    format!("VMIC_QEMU_{}", arch.name().to_uppercase())
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
