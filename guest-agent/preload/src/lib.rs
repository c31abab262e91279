//! Loaded (`LD_PRELOAD`) into the image's `dracut-install` only, in the builder VM: makes its
//! file copies happen in the process instead of one `cp` process each.
//!
//! `dracut-install` copies a file by creating the destination itself and asking the kernel to
//! clone the source into it (`ioctl(dst, FICLONE, src)`). That works on btrfs and XFS only; on
//! anything else it unlinks the destination, stops trying, and forks `cp` for every file from
//! then on. For a LiveOS initrd that is ~600 `cp` processes, ~22 ms each under TCG. Here the
//! `FICLONE` request is answered by copying the bytes (`sendfile`) and the permission bits, and
//! `dracut-install` then sets owner and times as it does after a real clone. Every other
//! `ioctl` goes to the kernel unchanged.
//!
//! What `cp --preserve=mode,timestamps,ownership` would give and the clone path would not is
//! declined (the request fails, and `dracut-install` falls back to `cp` as it always did): a
//! source that is not a regular file, and set-user-ID or set-group-ID bits, which the
//! `fchown` that follows a clone clears. Extended attributes are not copied: a cpio archive has
//! none.
//!
//! The library removes `LD_PRELOAD` from the environment as it loads, so what
//! `dracut-install` starts (its `ldd`, `cp`) runs without it and `ldd` does not list it. It
//! calls no libc function but `unsetenv`, `__errno_location` and the `memset` the compiler
//! emits (glibc and musl have all three, unversioned), so it loads into any image's libc;
//! system calls are made directly.
//!
//! Each answered request appends one byte to [`TALLY_PATH`] if that file exists (the agent
//! creates it): `c` copied, `d` declined.

#![no_std]

use core::ffi::{c_char, c_int, c_long, c_ulong};

/// `_IOW(0x94, 9, int)`: the same number as `BTRFS_IOC_CLONE`, which is what
/// `dracut-install` spells it.
const FICLONE: u32 = 0x4004_9409;
const EINTR: c_long = 4;
const EOPNOTSUPP: c_int = 95;
const AT_FDCWD: c_long = -100;
const AT_EMPTY_PATH: c_long = 0x1000;
const STATX_TYPE_MODE: c_long = 0x3;
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_ISUID_ISGID: u32 = 0o6000;
const O_WRONLY_APPEND_CLOEXEC: c_long = 0o1 | 0o2000 | 0o2000000;

/// Shared with the agent (`guest-agent/src/iso.rs`: `DRACUT_TALLY_PATH`).
pub const TALLY_PATH: &[u8] = b"/run/vmic-dracut.tally\0";
const COPIED: u8 = b'c';
const DECLINED: u8 = b'd';

#[cfg(target_arch = "x86_64")]
mod sys {
    use core::ffi::c_long;
    pub const IOCTL: c_long = 16;
    pub const SENDFILE: c_long = 40;
    pub const FCHMOD: c_long = 91;
    pub const STATX: c_long = 332;
    pub const OPENAT: c_long = 257;
    pub const WRITE: c_long = 1;
    pub const CLOSE: c_long = 3;
    pub const O_NOFOLLOW: c_long = 0o400000;

    /// # Safety
    /// The arguments must be valid for system call `nr`.
    pub unsafe fn syscall(nr: c_long, a: [c_long; 5]) -> c_long {
        let ret: c_long;
        // SAFETY: the caller passes arguments valid for `nr`; the x86_64 system call ABI
        // clobbers rcx and r11 only.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

#[cfg(target_arch = "aarch64")]
mod sys {
    use core::ffi::c_long;
    pub const IOCTL: c_long = 29;
    pub const SENDFILE: c_long = 71;
    pub const FCHMOD: c_long = 52;
    pub const STATX: c_long = 291;
    pub const OPENAT: c_long = 56;
    pub const WRITE: c_long = 64;
    pub const CLOSE: c_long = 57;
    pub const O_NOFOLLOW: c_long = 0o100000;

    /// # Safety
    /// The arguments must be valid for system call `nr`.
    pub unsafe fn syscall(nr: c_long, a: [c_long; 5]) -> c_long {
        let ret: c_long;
        // SAFETY: the caller passes arguments valid for `nr`; `svc 0` returns in x0 and
        // clobbers nothing else.
        unsafe {
            core::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a[0] => ret,
                in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4],
                options(nostack),
            );
        }
        ret
    }
}

extern "C" {
    fn unsetenv(name: *const c_char) -> c_int;
    fn __errno_location() -> *mut c_int;
}

/// Runs as the library loads, before `dracut-install`'s `main`.
extern "C" fn on_load() {
    // SAFETY: a NUL-terminated name; the process is still single-threaded.
    unsafe { unsetenv(c"LD_PRELOAD".as_ptr()) };
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

/// A raw result as libc returns it: -1 with `errno` set, or the value.
fn libc_result(ret: c_long) -> c_int {
    if ret < 0 {
        fail(-ret as c_int)
    } else {
        ret as c_int
    }
}

fn fail(errno: c_int) -> c_int {
    // SAFETY: libc's thread-local errno.
    unsafe { *__errno_location() = errno };
    -1
}

/// `ioctl(2)`. Both libcs pass the request in the second integer register; the kernel reads
/// 32 bits of it.
///
/// # Safety
/// As `ioctl(2)`: `arg` must be what `request` expects.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: c_long) -> c_int {
    if request as u32 == FICLONE {
        let (ret, mark) = match copy(arg as c_int, fd) {
            Ok(()) => (0, COPIED),
            Err(errno) => (fail(errno), DECLINED),
        };
        tally(mark);
        return ret;
    }
    // SAFETY: the caller's arguments, passed through.
    libc_result(unsafe { sys::syscall(sys::IOCTL, [fd as c_long, request as c_long, arg, 0, 0]) })
}

/// The bytes and permission bits of `src` into `dst` (empty, just created), or an errno.
fn copy(src: c_int, dst: c_int) -> Result<(), c_int> {
    let mode = mode_of(src)?;
    if mode & S_IFMT != S_IFREG || mode & S_ISUID_ISGID != 0 {
        return Err(EOPNOTSUPP);
    }
    loop {
        // SAFETY: two file descriptors, no offset pointer (the source's own offset, 0 as
        // `dracut-install` just opened it), a count.
        let sent = unsafe {
            sys::syscall(
                sys::SENDFILE,
                [dst as c_long, src as c_long, 0, 0x7fff_f000, 0],
            )
        };
        match sent {
            0 => break,
            n if n > 0 => continue,
            n if n == -EINTR => continue,
            n => return Err(-n as c_int),
        }
    }
    // The destination was created with the source's bits under dracut-install's umask.
    // SAFETY: a file descriptor and a mode.
    let ret = unsafe {
        sys::syscall(
            sys::FCHMOD,
            [dst as c_long, (mode & 0o7777) as c_long, 0, 0, 0],
        )
    };
    if ret < 0 {
        return Err(-ret as c_int);
    }
    Ok(())
}

/// `st_mode` of an open file (`statx`: one layout on every architecture).
fn mode_of(fd: c_int) -> Result<u32, c_int> {
    // struct statx is 256 bytes; stx_mode is the u16 at byte 28.
    let mut buf = [0u64; 32];
    // SAFETY: an empty path with AT_EMPTY_PATH names `fd`; `buf` is a writable struct statx.
    let ret = unsafe {
        sys::syscall(
            sys::STATX,
            [
                fd as c_long,
                c"".as_ptr() as c_long,
                AT_EMPTY_PATH,
                STATX_TYPE_MODE,
                buf.as_mut_ptr() as c_long,
            ],
        )
    };
    if ret < 0 {
        return Err(-ret as c_int);
    }
    let word = buf[3].to_ne_bytes();
    Ok(u32::from(u16::from_ne_bytes([word[4], word[5]])))
}

/// One byte onto the tally, if the agent created it (never created here, no link followed).
fn tally(mark: u8) {
    // SAFETY: a NUL-terminated path and flags; the descriptor is closed below.
    let fd = unsafe {
        sys::syscall(
            sys::OPENAT,
            [
                AT_FDCWD,
                TALLY_PATH.as_ptr() as c_long,
                O_WRONLY_APPEND_CLOEXEC | sys::O_NOFOLLOW,
                0,
                0,
            ],
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: one byte from a live local; then the descriptor opened above.
    unsafe {
        sys::syscall(sys::WRITE, [fd, (&mark as *const u8) as c_long, 1, 0, 0]);
        sys::syscall(sys::CLOSE, [fd, 0, 0, 0, 0]);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
