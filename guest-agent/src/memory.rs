//! The build's memory bound. Everything the agent runs (dracut, mksquashfs, xorriso, the
//! package managers) lives in one memory cgroup whose `memory.high` keeps the page cache they
//! fill small, and the virtio balloon's free page reporting hands the pages the guest frees
//! back to QEMU, which gives them back to the host. Without both, the page cache grows with
//! the image until it fills the VM, and QEMU's RSS with it: 1.3 → 4.4 GiB for root file
//! systems of 0.3 → 3 GiB in a 4 GiB builder VM (issue 13's scaling benchmark).

use std::fs;
use std::sync::OnceLock;

use anyhow::Context;

/// Where init mounts cgroup2.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup PID 1 moves into before it forks the server: every process of the build
/// inherits it.
const BUILD_CGROUP: &str = "/sys/fs/cgroup/vmic-build";

/// The `memory.high` in force, once [`limit_build_memory`] set it.
static HIGH: OnceLock<u64> = OnceLock::new();

const MIB: u64 = 1 << 20;

/// `memory.high` for a VM with `mem_total` bytes of RAM: an eighth of it, within 256 MiB and
/// 1 GiB. The build streams the image once (mksquashfs, then xorriso over the squashfs), so
/// a bigger cache only holds pages nobody reads again; what is read again (dracut's tools and
/// the kernel modules it copies) is a few hundred MiB at most.
pub fn build_memory_high(mem_total: u64) -> u64 {
    (mem_total / 8).clamp(256 * MIB, 1024 * MIB)
}

/// mksquashfs' `-mem` in MiB: its queues and caches are anonymous memory the cgroup cannot
/// reclaim (there is no swap), so they get a quarter of the bound instead of mksquashfs'
/// default quarter of the VM. `None` when no bound is in force.
pub fn mksquashfs_memory_mib() -> Option<u64> {
    HIGH.get().map(|high| mksquashfs_memory_for(*high))
}

/// unsquashfs' data and fragment queues (`-da`, `-fr`) in MiB, each half of mksquashfs' share:
/// their default, 256 MiB each, is as much anonymous memory as the whole bound of a 4 GiB VM.
pub fn unsquashfs_queue_mib() -> Option<u64> {
    mksquashfs_memory_mib().map(|memory| memory / 2)
}

fn mksquashfs_memory_for(high: u64) -> u64 {
    (high / 4 / MIB).max(64)
}

/// `MemTotal` in bytes from `/proc/meminfo` text.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// Create the build's cgroup (init mounted cgroup2 on `CGROUP_ROOT`) with its `memory.high`
/// and move this process (PID 1, before it forks the server) into it. Returns the bound in bytes.
pub fn limit_build_memory() -> anyhow::Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let total = mem_total(&meminfo).context("no MemTotal in /proc/meminfo")?;
    let high = build_memory_high(total);
    let write = |path: &str, value: &str| {
        fs::write(path, value).with_context(|| format!("writing {value:?} to {path}"))
    };
    write(&format!("{CGROUP_ROOT}/cgroup.subtree_control"), "+memory")?;
    fs::create_dir_all(BUILD_CGROUP).with_context(|| format!("creating {BUILD_CGROUP}"))?;
    write(&format!("{BUILD_CGROUP}/memory.high"), &high.to_string())?;
    write(
        &format!("{BUILD_CGROUP}/cgroup.procs"),
        &std::process::id().to_string(),
    )?;
    let _ = HIGH.set(high);
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_an_eighth_of_the_vm_within_256_mib_and_1_gib() {
        assert_eq!(build_memory_high(4096 * MIB), 512 * MIB);
        assert_eq!(build_memory_high(1536 * MIB), 256 * MIB);
        assert_eq!(build_memory_high(2048 * MIB), 256 * MIB);
        assert_eq!(build_memory_high(2056 * MIB), 257 * MIB);
        assert_eq!(build_memory_high(8192 * MIB), 1024 * MIB);
        assert_eq!(build_memory_high(8200 * MIB), 1024 * MIB);
        assert_eq!(build_memory_high(16384 * MIB), 1024 * MIB);
    }

    #[test]
    fn mksquashfs_gets_a_quarter_of_the_bound_and_at_least_64_mib() {
        assert_eq!(mksquashfs_memory_for(512 * MIB), 128);
        assert_eq!(mksquashfs_memory_for(1024 * MIB), 256);
        assert_eq!(mksquashfs_memory_for(256 * MIB), 64);
        assert_eq!(mksquashfs_memory_for(200 * MIB), 64);
        // unsquashfs' two queues share the same quarter.
        assert_eq!(mksquashfs_memory_for(512 * MIB) / 2, 64);
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemTotal:        4022300 kB\nMemFree:         3900000 kB\n";
        assert_eq!(mem_total(meminfo), Some(4022300 * 1024));
        assert_eq!(mem_total("MemFree: 12 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total("MemTotal: 12\n"), None);
    }
}
