//! The image's `/etc/fstab` → the file systems to mount for customization, parents first.

/// How fstab names a file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `UUID=` — the file system UUID (`/dev/disk/by-uuid`).
    Uuid(String),
    /// `LABEL=` — the file system label.
    Label(String),
    /// `PARTUUID=` — the GPT partition GUID (or MBR `<disk id>-<nn>`).
    PartUuid(String),
    /// `PARTLABEL=` — the GPT partition name.
    PartLabel(String),
    /// A device path such as `/dev/sda2` or `/dev/disk/by-id/...`.
    Path(String),
}

/// One file system to mount under the image root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub spec: DeviceSpec,
    /// Absolute, normalized (`/`, `/boot`, `/boot/efi`, ...).
    pub mountpoint: String,
    /// `None` for `auto`: let the kernel probe.
    pub fstype: Option<String>,
    /// Only the options that change what the file system shows (e.g. btrfs `subvol=`, vfat
    /// `umask=`); runtime policy (`noatime`, `errors=`, `x-systemd.*`, `nofail`, ...) is
    /// dropped. `ro` is reported in [`MountEntry::read_only`] instead: customization needs
    /// to write, so the executor decides.
    pub options: Vec<String>,
    /// fstab asked for `ro`.
    pub read_only: bool,
    /// 1-based line in fstab, for messages.
    pub line: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FstabError {
    #[error(
        "/etc/fstab line {line}: expected at least a device and a mount point, found {text:?}"
    )]
    TooFewFields { line: usize, text: String },
    #[error("/etc/fstab line {line}: mount point {mountpoint:?} is not a plain absolute path")]
    BadMountpoint { line: usize, mountpoint: String },
    #[error("/etc/fstab line {line}: {spec:?} names no device")]
    EmptyDevice { line: usize, spec: String },
    #[error("/etc/fstab lines {first} and {second} both mount {mountpoint}")]
    DuplicateMountpoint {
        first: usize,
        second: usize,
        mountpoint: String,
    },
}

/// File system types that are not on the image's disks (kernel, memory or network).
const VIRTUAL_FSTYPES: &[&str] = &[
    "swap",
    "tmpfs",
    "ramfs",
    "proc",
    "sysfs",
    "devpts",
    "devtmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "efivarfs",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "pstore",
    "bpf",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "9p",
    "virtiofs",
    "none",
];

/// Mount options kept: they change what the mounted file system shows.
const KEPT_OPTIONS: &[&str] = &[
    "subvol",
    "subvolid",
    "compress",
    "compress-force",
    "umask",
    "fmask",
    "dmask",
    "uid",
    "gid",
    "iocharset",
    "codepage",
    "shortname",
    "utf8",
];

/// Parses fstab and returns the file systems of the image's disks to mount, sorted so that
/// every parent mounts before its children (by mount point depth, then fstab order).
///
/// Skipped: comments and blank lines; swap; virtual, memory and network file systems;
/// bind mounts; `noauto` entries, except under `/boot` (the boot files must be collected
/// even when the ESP is mounted on demand, e.g. `noauto,x-systemd.automount`).
pub fn mount_plan(fstab: &str) -> Result<Vec<MountEntry>, FstabError> {
    let mut entries: Vec<MountEntry> = Vec::new();
    for (index, raw) in fstab.lines().enumerate() {
        let line = index + 1;
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let fields: Vec<String> = text.split_whitespace().map(unescape).collect();
        if fields.len() < 2 {
            return Err(FstabError::TooFewFields {
                line,
                text: text.to_owned(),
            });
        }
        let device = fields[0].as_str();
        let mountpoint = fields[1].as_str();
        let fstype = fields.get(2).map_or("auto", String::as_str);
        let options: Vec<&str> = fields.get(3).map_or(Vec::new(), |o| {
            o.split(',').filter(|o| !o.is_empty()).collect()
        });

        if VIRTUAL_FSTYPES.contains(&fstype)
            || fstype.starts_with("fuse")
            || mountpoint == "none"
            || mountpoint == "swap"
            || options
                .iter()
                .any(|o| matches!(*o, "bind" | "rbind" | "_netdev"))
        {
            continue;
        }
        let Some(spec) = parse_spec(device, line)? else {
            // `tmpfs`, `proc`, `overlay`, a host:path... — not a device of the image.
            continue;
        };
        let mountpoint =
            normalize_mountpoint(mountpoint).ok_or_else(|| FstabError::BadMountpoint {
                line,
                mountpoint: mountpoint.to_owned(),
            })?;
        let under_boot = mountpoint == "/boot" || mountpoint.starts_with("/boot/");
        if options.contains(&"noauto") && !under_boot {
            continue;
        }
        if let Some(previous) = entries.iter().find(|e| e.mountpoint == mountpoint) {
            return Err(FstabError::DuplicateMountpoint {
                first: previous.line,
                second: line,
                mountpoint,
            });
        }
        let read_only = options.contains(&"ro");
        let kept = options
            .iter()
            .filter(|o| {
                let key = o.split_once('=').map_or(**o, |(key, _)| key);
                KEPT_OPTIONS.contains(&key)
            })
            .map(|o| (*o).to_owned())
            .collect();
        entries.push(MountEntry {
            spec,
            mountpoint,
            fstype: (fstype != "auto").then(|| fstype.to_owned()),
            options: kept,
            read_only,
            line,
        });
    }
    // Stable: equal depths keep fstab order.
    entries.sort_by_key(|e| depth(&e.mountpoint));
    Ok(entries)
}

/// The device named by `spec`, or `None` when it is no device of the image.
fn parse_spec(device: &str, line: usize) -> Result<Option<DeviceSpec>, FstabError> {
    let tagged = [
        ("UUID=", DeviceSpec::Uuid as fn(String) -> DeviceSpec),
        ("LABEL=", DeviceSpec::Label),
        ("PARTUUID=", DeviceSpec::PartUuid),
        ("PARTLABEL=", DeviceSpec::PartLabel),
    ];
    for (tag, make) in tagged {
        if let Some(value) = strip_prefix_ignore_case(device, tag) {
            let value = unquote(value);
            if value.is_empty() {
                return Err(FstabError::EmptyDevice {
                    line,
                    spec: device.to_owned(),
                });
            }
            // UUIDs are compared case-insensitively by udev; keep them lower case.
            let value = if matches!(tag, "UUID=" | "PARTUUID=") {
                value.to_ascii_lowercase()
            } else {
                value.to_owned()
            };
            return Ok(Some(make(value)));
        }
    }
    if device.starts_with("/dev/") {
        return Ok(Some(DeviceSpec::Path(device.to_owned())));
    }
    Ok(None)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            return inner;
        }
    }
    value
}

/// fstab escapes blanks and backslashes in octal: `\040` (space), `\011` (tab), `\012`,
/// `\134` (backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/boot//efi/` → `/boot/efi`; `None` for relative paths and `.`/`..` components.
fn normalize_mountpoint(mountpoint: &str) -> Option<String> {
    if !mountpoint.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in mountpoint.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return None;
        }
        parts.push(part);
    }
    Some(format!("/{}", parts.join("/")))
}

fn depth(mountpoint: &str) -> usize {
    mountpoint.split('/').filter(|p| !p.is_empty()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (mount point, device, fstype, options, read only)
    type Row = (String, DeviceSpec, Option<String>, Vec<String>, bool);

    fn plan(text: &str) -> Vec<Row> {
        mount_plan(text)
            .expect("valid fstab")
            .into_iter()
            .map(|e| (e.mountpoint, e.spec, e.fstype, e.options, e.read_only))
            .collect()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn vmic_test_image() {
        let fstab = "# <file system> <mount point> <type> <options> <dump> <pass>\n\
            UUID=7d1c8a6e-0e49-4c5e-9d9c-3f1f6c9f2a11 / ext4 defaults,errors=remount-ro 0 1\n\
            UUID=0F1E-2D3C /boot/efi vfat umask=0077 0 0\n";
        assert_eq!(
            plan(fstab),
            vec![
                (
                    "/".into(),
                    DeviceSpec::Uuid("7d1c8a6e-0e49-4c5e-9d9c-3f1f6c9f2a11".into()),
                    Some("ext4".into()),
                    vec![],
                    false
                ),
                (
                    "/boot/efi".into(),
                    DeviceSpec::Uuid("0f1e-2d3c".into()),
                    Some("vfat".into()),
                    strings(&["umask=0077"]),
                    false
                ),
            ]
        );
    }

    #[test]
    fn parents_before_children_whatever_the_order() {
        let fstab = "UUID=c /boot/efi vfat umask=0077 0 2\n\
            UUID=b /boot ext4 defaults 0 2\n\
            UUID=d /var/lib/docker xfs defaults 0 2\n\
            UUID=a / ext4 defaults 0 1\n\
            UUID=e /var xfs defaults 0 2\n";
        let order: Vec<String> = plan(fstab).into_iter().map(|e| e.0).collect();
        assert_eq!(
            order,
            strings(&["/", "/boot", "/var", "/boot/efi", "/var/lib/docker"])
        );
    }

    #[test]
    fn azure_linux_style() {
        // Azure Linux images name partitions by PARTUUID and keep the ESP at /boot/efi.
        let fstab = "PARTUUID=0e4b2b4a-6ef7-4a1b-8b7b-aa0b5fbe7d46 /boot/efi vfat umask=0077 0 0\n\
            PARTUUID=A8B1C2D3-1111-2222-3333-444455556666 / ext4 defaults 0 0\n\
            PARTLABEL=data /data xfs defaults,nofail 0 2\n\
            LABEL=\"my\\040home\" /home ext4 defaults 0 2\n";
        assert_eq!(
            plan(fstab),
            vec![
                (
                    "/".into(),
                    DeviceSpec::PartUuid("a8b1c2d3-1111-2222-3333-444455556666".into()),
                    Some("ext4".into()),
                    vec![],
                    false
                ),
                (
                    "/data".into(),
                    DeviceSpec::PartLabel("data".into()),
                    Some("xfs".into()),
                    vec![],
                    false
                ),
                (
                    "/home".into(),
                    DeviceSpec::Label("my home".into()),
                    Some("ext4".into()),
                    vec![],
                    false
                ),
                (
                    "/boot/efi".into(),
                    DeviceSpec::PartUuid("0e4b2b4a-6ef7-4a1b-8b7b-aa0b5fbe7d46".into()),
                    Some("vfat".into()),
                    strings(&["umask=0077"]),
                    false
                ),
            ]
        );
    }

    #[test]
    fn skips_what_is_not_on_the_image_disks() {
        let fstab = "\
            # comment\n\
            \n\
               # indented comment\n\
            UUID=root / ext4 defaults 0 1\n\
            UUID=swap none swap sw 0 0\n\
            /swapfile swap swap defaults 0 0\n\
            tmpfs /tmp tmpfs defaults,size=1G 0 0\n\
            proc /proc proc defaults 0 0\n\
            sysfs /sys sysfs defaults 0 0\n\
            devpts /dev/pts devpts gid=5,mode=620 0 0\n\
            /srv/data /data none bind 0 0\n\
            /var/www /www ext4 rbind 0 0\n\
            server:/export /mnt/nfs nfs defaults 0 0\n\
            //host/share /mnt/smb cifs credentials=/x 0 0\n\
            sshfs#me@host:/ /mnt/ssh fuse defaults 0 0\n\
            UUID=usb /media/usb ext4 noauto,user 0 0\n\
            overlay /merged overlay lowerdir=/a 0 0\n\
            UUID=fuse /mnt/fuse fuse.sshfs defaults 0 0\n\
            UUID=none none ext4 defaults 0 0\n\
            UUID=swapdev swap ext4 defaults 0 0\n\
            UUID=bound /bound ext4 bind 0 0\n\
            UUID=net /net ext4 _netdev 0 0\n";
        // Each of the last five lines names a device of the image and is skipped by one rule
        // alone (a fuse type, mount point none or swap, a bind, a network device).
        let mounts: Vec<String> = plan(fstab).into_iter().map(|e| e.0).collect();
        assert_eq!(mounts, strings(&["/"]));
    }

    #[test]
    fn noauto_is_kept_under_boot() {
        let fstab = "UUID=root / ext4 defaults 0 1\n\
            UUID=ESP /boot/efi vfat noauto,x-systemd.automount,umask=0077 0 2\n";
        let mounts: Vec<String> = plan(fstab).into_iter().map(|e| e.0).collect();
        assert_eq!(mounts, strings(&["/", "/boot/efi"]));
    }

    #[test]
    fn options_filtered_and_read_only_reported() {
        let fstab = "/dev/vda3 / btrfs subvol=@,compress=zstd:1,noatime,ro,x-systemd.growfs 0 0\n\
            /dev/disk/by-id/virtio-boot-part1 /boot/efi vfat rw,relatime,fmask=0022,dmask=0022,codepage=437,iocharset=ascii,shortname=mixed,utf8,errors=remount-ro 0 2\n\
            UUID=h /home btrfs subvolid=257 0 0\n";
        assert_eq!(
            plan(fstab),
            vec![
                (
                    "/".into(),
                    DeviceSpec::Path("/dev/vda3".into()),
                    Some("btrfs".into()),
                    strings(&["subvol=@", "compress=zstd:1"]),
                    true
                ),
                (
                    "/home".into(),
                    DeviceSpec::Uuid("h".into()),
                    Some("btrfs".into()),
                    strings(&["subvolid=257"]),
                    false
                ),
                (
                    "/boot/efi".into(),
                    DeviceSpec::Path("/dev/disk/by-id/virtio-boot-part1".into()),
                    Some("vfat".into()),
                    strings(&[
                        "fmask=0022",
                        "dmask=0022",
                        "codepage=437",
                        "iocharset=ascii",
                        "shortname=mixed",
                        "utf8"
                    ]),
                    false
                ),
            ]
        );
    }

    #[test]
    fn short_lines_auto_type_escapes_and_normalization() {
        let fstab = "LABEL=root /\n\
            UUID=x /srv/my\\040data// auto\n\
            UUID=z /srv/back\\134slash ext4\n\
            uuid=Y /opt xfs\n";
        assert_eq!(
            plan(fstab),
            vec![
                (
                    "/".into(),
                    DeviceSpec::Label("root".into()),
                    None,
                    vec![],
                    false
                ),
                (
                    "/opt".into(),
                    DeviceSpec::Uuid("y".into()),
                    Some("xfs".into()),
                    vec![],
                    false
                ),
                (
                    "/srv/my data".into(),
                    DeviceSpec::Uuid("x".into()),
                    None,
                    vec![],
                    false
                ),
                (
                    "/srv/back\\slash".into(),
                    DeviceSpec::Uuid("z".into()),
                    Some("ext4".into()),
                    vec![],
                    false
                ),
            ]
        );
    }

    #[test]
    fn errors() {
        let cases = [
            (
                "UUID=a\n",
                "line 1: expected at least a device and a mount point",
            ),
            (
                "UUID=a / ext4\nUUID=b boot ext4\n",
                "line 2: mount point \"boot\"",
            ),
            ("UUID=a /a/../b ext4\n", "mount point \"/a/../b\""),
            ("UUID= / ext4\n", "line 1: \"UUID=\" names no device"),
            (
                "UUID=a / ext4\n# x\nUUID=b // ext4\n",
                "lines 1 and 3 both mount /",
            ),
        ];
        for (fstab, expected) in cases {
            let message = mount_plan(fstab).expect_err(fstab).to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn empty_fstab_is_empty_plan() {
        assert_eq!(mount_plan("# nothing\n").expect("valid"), vec![]);
    }
}
