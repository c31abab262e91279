//! The full-OS initrd (`initramfsType: full-os`): the customized root as one newc cpio archive,
//! the format the kernel unpacks as its initramfs. Written here rather than by `cpio`/dracut:
//! the order, the inode numbers and every time (clamped to `SOURCE_DATE_EPOCH`) are ours, so
//! the same root gives the same bytes. The header is pure ([`newc_header`]); the walk reads
//! the image without following its links.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context};

/// Directories kept empty: the kernel and systemd fill them at boot, and `/boot` is on the
/// medium already (what `kdumpBootFiles: keep` names stays).
pub const EMPTIED_DIRS: [&str; 5] = ["boot", "proc", "sys", "dev", "run"];

/// What a full-OS root leaves out, as the squashfs does: no fstab (the initramfs is the root,
/// there is nothing to mount), vmic's own files.
pub const LEFT_OUT: [&str; 3] = [
    "etc/fstab",
    "_imageconfigs",
    "etc/dracut.conf.d/99-vmic-liveos.conf",
];

/// What the kernel runs from an initramfs: a full OS has no `/init`, so it points at systemd
/// (as the Image Customizer does), or at `/sbin/init` for an image without systemd.
pub const INIT_TARGETS: [&str; 2] = ["/lib/systemd/systemd", "/sbin/init"];

/// One archive member's metadata, as the newc header carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ino: u32,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub size: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// The 110-byte newc (`070701`) header, then the NUL-terminated name, padded to 4 bytes.
pub fn newc_header(name: &str, member: &Member) -> Vec<u8> {
    let fields = [
        member.ino,
        member.mode,
        member.uid,
        member.gid,
        member.nlink,
        member.mtime,
        member.size,
        0, // devmajor: the archive's own device, unused by the kernel
        0, // devminor
        member.rdev_major,
        member.rdev_minor,
        name.len() as u32 + 1,
        0, // check: only for the crc format
    ];
    let mut out = b"070701".to_vec();
    for field in fields {
        out.extend(format!("{field:08x}").as_bytes());
    }
    out.extend(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// Kept under `/boot` with `kdumpBootFiles: keep`: each `initramfs-<v>kdump.img` and the
/// `vmlinuz-<v>` of the same version, when there is one.
pub fn kdump_boot_files(names: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    for name in names {
        let Some(version) = name
            .strip_prefix("initramfs-")
            .and_then(|rest| rest.strip_suffix("kdump.img"))
        else {
            continue;
        };
        kept.push(name.clone());
        let kernel = format!("vmlinuz-{version}");
        if names.contains(&kernel) {
            kept.push(kernel);
        }
    }
    kept.sort();
    kept
}

/// Writes the archive of `root` to `out`; returns the number of members.
pub struct Writer<W: Write> {
    out: W,
    epoch: u32,
    next_ino: u32,
    members: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, epoch: u64) -> Self {
        Writer {
            out,
            epoch: u32::try_from(epoch).unwrap_or(u32::MAX),
            next_ino: 1,
            members: 0,
        }
    }

    fn member(
        &mut self,
        name: &str,
        member: Member,
        data: &mut dyn std::io::Read,
    ) -> anyhow::Result<()> {
        self.out.write_all(&newc_header(name, &member))?;
        let copied = std::io::copy(
            &mut std::io::Read::take(data, member.size.into()),
            &mut self.out,
        )?;
        if copied != u64::from(member.size) {
            bail!("{name} changed size while it was archived");
        }
        let padding = (4 - (copied % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..padding])?;
        self.members += 1;
        Ok(())
    }

    fn ino(&mut self) -> u32 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// A symlink member that the image itself does not have (`/init`).
    pub fn symlink(&mut self, name: &str, target: &str) -> anyhow::Result<()> {
        let member = Member {
            ino: self.ino(),
            mode: libc::S_IFLNK | 0o777,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: self.epoch,
            size: target.len() as u32,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.member(name, member, &mut target.as_bytes())
    }

    /// `path` (inside the image at `relative`) and, for a directory, everything below it that
    /// `keep` accepts, in name order. Links are archived as links, never followed; sockets are
    /// left out (nothing can use one from an archive).
    pub fn add_tree(
        &mut self,
        path: &Path,
        relative: &str,
        keep: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading /{relative} in the image"))?;
        let kind = meta.file_type();
        if kind.is_socket() {
            return Ok(());
        }
        let size = if kind.is_file() || kind.is_symlink() {
            u32::try_from(meta.len()).with_context(|| {
                format!("/{relative} is larger than 4 GiB: a newc cpio cannot hold it")
            })?
        } else {
            0
        };
        let member = Member {
            ino: self.ino(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            nlink: if kind.is_dir() { 2 } else { 1 },
            mtime: u32::try_from(meta.mtime().max(0))
                .unwrap_or(u32::MAX)
                .min(self.epoch),
            size,
            rdev_major: device_numbers(kind.is_block_device(), kind.is_char_device(), meta.rdev())
                .0,
            rdev_minor: device_numbers(kind.is_block_device(), kind.is_char_device(), meta.rdev())
                .1,
        };
        if kind.is_symlink() {
            let target = std::fs::read_link(path)?;
            let target = target.as_os_str().as_encoded_bytes();
            self.member(relative, member, &mut &target[..])?;
        } else if kind.is_file() {
            let mut file = std::fs::File::open(path)
                .with_context(|| format!("opening /{relative} in the image"))?;
            self.member(relative, member, &mut file)?;
        } else {
            self.member(relative, member, &mut std::io::empty())?;
        }
        if kind.is_dir() {
            let mut names: Vec<String> = std::fs::read_dir(path)?
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            names.sort();
            for name in names {
                let inside = format!("{relative}/{name}");
                if keep(&inside) {
                    self.add_tree(&path.join(&name), &inside, keep)?;
                }
            }
        }
        Ok(())
    }

    /// The trailer; returns the writer and the number of members.
    pub fn finish(mut self) -> anyhow::Result<(W, u64)> {
        let trailer = Member {
            ino: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.out.write_all(&newc_header("TRAILER!!!", &trailer))?;
        self.out.flush()?;
        Ok((self.out, self.members))
    }
}

/// A device node's major and minor numbers; (0, 0) for anything else.
pub fn device_numbers(block: bool, char: bool, rdev: u64) -> (u32, u32) {
    match block || char {
        true => (libc::major(rdev), libc::minor(rdev)),
        false => (0, 0),
    }
}

/// Whether the full-OS archive keeps `relative` (a path below the root, no leading `/`).
pub fn keeps(relative: &str, kdump: &[String]) -> bool {
    if LEFT_OUT.contains(&relative) {
        return false;
    }
    match relative.split_once('/') {
        Some((top, rest)) if EMPTIED_DIRS.contains(&top) => {
            top == "boot" && kdump.iter().any(|name| name == rest)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(size: u32) -> Member {
        Member {
            ino: 7,
            mode: libc::S_IFREG | 0o644,
            uid: 0,
            gid: 5,
            nlink: 1,
            mtime: 1_700_000_000,
            size,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }

    #[test]
    fn a_newc_header_is_110_bytes_of_hex_fields_then_the_name_padded_to_four() {
        let header = newc_header("etc/hostname", &member(9));
        // 110 + "etc/hostname\0" (13) = 123, padded to 124.
        assert_eq!(header.len(), 124);
        let text = String::from_utf8(header[..110].to_vec()).expect("ascii");
        assert_eq!(&text[..6], "070701");
        let field =
            |index: usize| u32::from_str_radix(&text[6 + index * 8..14 + index * 8], 16).unwrap();
        assert_eq!(field(0), 7);
        assert_eq!(field(1), libc::S_IFREG | 0o644);
        assert_eq!(field(3), 5);
        assert_eq!(field(5), 1_700_000_000);
        assert_eq!(field(6), 9);
        assert_eq!(field(11), 13, "namesize counts the NUL");
        assert_eq!(&header[110..123], b"etc/hostname\0");
        assert_eq!(header[123], 0);
        // A name whose header ends on a multiple of four gets no padding.
        assert_eq!(
            newc_header("ab", &member(0)).len(),
            113usize.next_multiple_of(4)
        );
    }

    #[test]
    fn an_archive_round_trips_through_the_kernels_format_with_times_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::create_dir_all(root.join("proc/1")).unwrap();
        std::fs::write(root.join("etc/hostname"), "vmic\n").unwrap();
        std::fs::write(root.join("etc/fstab"), "UUID=x / ext4\n").unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.1"), "kernel").unwrap();
        std::fs::write(root.join("boot/initramfs-6.1kdump.img"), "kdump").unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.2"), "other").unwrap();
        std::os::unix::fs::symlink("hostname", root.join("etc/name")).unwrap();
        let kdump = kdump_boot_files(&[
            "vmlinuz-6.1".into(),
            "initramfs-6.1kdump.img".into(),
            "vmlinuz-6.2".into(),
        ]);
        let mut writer = Writer::new(Vec::new(), 1_000);
        for name in ["boot", "etc", "proc"] {
            writer
                .add_tree(&root.join(name), name, &|path| keeps(path, &kdump))
                .unwrap();
        }
        writer.symlink("init", INIT_TARGETS[0]).unwrap();
        let (bytes, count) = writer.finish().unwrap();
        // Parse it back the way the kernel does.
        let mut members = Vec::new();
        let mut inodes = Vec::new();
        let mut at = 0;
        loop {
            let text = std::str::from_utf8(&bytes[at..at + 110]).unwrap();
            assert_eq!(&text[..6], "070701");
            let field = |index: usize| {
                u32::from_str_radix(&text[6 + index * 8..14 + index * 8], 16).unwrap() as usize
            };
            let (ino, mode, mtime, size, namesize) =
                (field(0), field(1), field(5), field(6), field(11));
            let name = std::str::from_utf8(&bytes[at + 110..at + 110 + namesize - 1])
                .unwrap()
                .to_string();
            at = (at + 110 + namesize).next_multiple_of(4);
            let data = bytes[at..at + size].to_vec();
            at = (at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
            assert!(mtime <= 1_000, "{name}: mtime {mtime} not clamped");
            inodes.push(ino);
            if name == "init" || name == "etc/name" {
                assert_eq!(
                    mode as u32 & libc::S_IFMT,
                    libc::S_IFLNK,
                    "{name} is a symlink"
                );
            }
            members.push((name, String::from_utf8(data).unwrap()));
        }
        assert_eq!(at, bytes.len());
        let names: Vec<&str> = members.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "boot",
                "boot/initramfs-6.1kdump.img",
                "boot/vmlinuz-6.1",
                "etc",
                "etc/hostname",
                "etc/name",
                "proc",
                "init"
            ]
        );
        assert_eq!(count, names.len() as u64);
        // Distinct inode numbers, in archive order: the kernel links members that share one.
        assert_eq!(inodes, (1..=names.len()).collect::<Vec<_>>());
        let data = |wanted: &str| {
            members
                .iter()
                .find(|(name, _)| name == wanted)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(data("etc/hostname"), "vmic\n");
        assert_eq!(
            data("etc/name"),
            "hostname",
            "a link is archived, not followed"
        );
        assert_eq!(data("init"), "/lib/systemd/systemd");
    }

    #[test]
    fn device_nodes_carry_their_numbers_and_nothing_else_does() {
        let null = libc::makedev(1, 3);
        assert_eq!(device_numbers(false, true, null), (1, 3));
        assert_eq!(device_numbers(true, false, libc::makedev(8, 1)), (8, 1));
        assert_eq!(device_numbers(false, false, null), (0, 0));
    }

    #[test]
    fn kdump_files_are_the_kdump_initramfs_and_its_kernel_only() {
        let names: Vec<String> = [
            "vmlinuz-6.1",
            "initramfs-6.1kdump.img",
            "initramfs-6.1.img",
            "vmlinuz-6.2",
            "initramfs-6.3kdump.img",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            kdump_boot_files(&names),
            [
                "initramfs-6.1kdump.img",
                "initramfs-6.3kdump.img",
                "vmlinuz-6.1"
            ]
        );
        assert!(kdump_boot_files(&["vmlinuz-6.1".into()]).is_empty());
        assert!(keeps("etc/passwd", &[]));
        assert!(keeps("boot", &[]), "the directory stays, empty");
        assert!(!keeps("boot/vmlinuz-6.1", &[]));
        assert!(keeps("boot/vmlinuz-6.1", &["vmlinuz-6.1".into()]));
        assert!(!keeps("proc/1", &[]));
        assert!(!keeps("etc/fstab", &[]));
        assert!(!keeps("_imageconfigs", &[]));
        assert!(keeps("etc/fstab.d", &[]));
    }
}
