#!/usr/bin/env bash
# The recipe of the vmic test images, run by scripts/make-test-image (which parses the
# arguments, prepares the host, and caches the result keyed by a hash of this directory).
# Input (environment): ARCH DEB_ARCH EFI_ARCH GRUB_TARGET CONSOLE VARIANT BOOT_PARTITION NAME
# HASH SOURCES WORK FORMATS, FILLER_MB (MiB of filler data in /opt/vmic-filler; default 0).
# Output: $WORK/disk.<format> per FORMATS (disk.raw always), manifest.json.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'make-test-image: error: %s\n' "$*" >&2; exit 1; }

# Everything runs from main, so that bash has parsed the whole file before it starts (editing
# the file during a build cannot change the running build), and `exit` on the line that calls
# it: bash never reads on into what the file holds by then.
main() {
FILLER_MB=${FILLER_MB:-0}

# --- fixed identities (derived from the image name: reproducible) ---------------------------
uuid_for() {
  local h
  h=$(printf 'vmic-test-image/%s/%s' "$NAME" "$1" | sha256sum | cut -c1-32)
  # Version 5-style layout: 8-4-4-4-12 with the version and variant bits set.
  printf '%s-%s-5%s-%x%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" \
    $(( (0x${h:16:1} & 0x3) | 0x8 )) "${h:17:3}" "${h:20:12}"
}
DISK_GUID=$(uuid_for disk)
ESP_PARTUUID=$(uuid_for esp-part)
BOOT_PARTUUID=$(uuid_for boot-part)
ROOT_PARTUUID=$(uuid_for root-part)
BOOT_FSUUID=$(uuid_for boot-fs)
ROOT_FSUUID=$(uuid_for root-fs)
ESP_VOLID=$(printf 'vmic-esp/%s' "$NAME" | sha256sum | cut -c1-8 | tr a-f A-F)
ESP_FSUUID="${ESP_VOLID:0:4}-${ESP_VOLID:4:4}"

SNAPSHOT=$(grep -o 'snapshot.debian.org/archive/debian/[0-9T]*Z' "$SOURCES" | head -1 | sed 's,.*/,,' || true)
if [ -n "$SNAPSHOT" ]; then
  SOURCE_DATE_EPOCH=$(date -u -d "${SNAPSHOT:0:4}-${SNAPSHOT:4:2}-${SNAPSHOT:6:2}T${SNAPSHOT:9:2}:${SNAPSHOT:11:2}:${SNAPSHOT:13:2}Z" +%s)
else
  SOURCE_DATE_EPOCH=1735689600 # 2025-01-01
fi
export SOURCE_DATE_EPOCH
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH

# --- sizes (512-byte sectors) ---------------------------------------------------------------
MIB=2048
ESP_START=$MIB
ESP_SECTORS=$((64 * MIB))
BOOT_SECTORS=$((256 * MIB))

START_TIME=$(date +%s)
ROOT="$WORK/rootfs"
BOOTFS="$WORK/bootfs"
ESPDIR="$WORK/esp"

# --- root file system -----------------------------------------------------------------------
PACKAGES=(
  systemd-sysv udev kmod mount e2fsprogs zstd
  "linux-image-cloud-$DEB_ARCH"
  dracut dracut-live
  # PXE bootstrap: dracut's livenet fetches the ISO with curl once dhclient (network-legacy,
  # which also wants pgrep) has brought the network up.
  dracut-network curl isc-dhcp-client procps
  # rd.live.check: dmsquash-live puts checkisomd5 in the LiveOS initrd when the image has it.
  isomd5sum
  "grub-efi-$DEB_ARCH-bin" shim-signed
)
[ "$VARIANT" = cloud-init ] && PACKAGES+=(cloud-init)
[ "$VARIANT" = secureboot ] && PACKAGES+=("grub-efi-$DEB_ARCH-signed")
# An RPM-family image as far as vmic can tell (see the rpm section below): Debian's rpm and dnf.
[ "$VARIANT" = rpm ] && PACKAGES+=(rpm dnf)

# Written before any package is configured, so the kernel's postinst runs dracut once, with this
# configuration: generic (not host-only), fast zstd, the drivers QEMU disks need.
DRACUT_CONF='# vmic test image: a generic initrd that boots under QEMU on any host.
hostonly="no"
hostonly_cmdline="no"
compress="zstd -q -3 -T0"
add_drivers+=" virtio_blk virtio_scsi virtio_pci virtio_console sd_mod sr_mod ext4 vfat nls_cp437 nls_ascii nls_utf8 "
# dracut-network (for PXE) asks for ifcfg, hence network, in every initrd; the image boots from
# its disk, so its own initrds go without. vmic adds livenet and network-legacy for PXE.
omit_dracutmodules+=" ifcfg "
'
log "$NAME: mmdebstrap bookworm $DEB_ARCH (${PACKAGES[*]})"
mmdebstrap --mode=root --variant=apt --arch="$DEB_ARCH" \
  --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook='mkdir -p "$1/etc/apt/preferences.d" "$1/etc/dracut.conf.d"' \
  --setup-hook='printf "Package: initramfs-tools\nPin: release *\nPin-Priority: -1\n" > "$1/etc/apt/preferences.d/no-initramfs-tools"' \
  --setup-hook="printf '%s' '$DRACUT_CONF' > \"\$1/etc/dracut.conf.d/50-vmic-test.conf\"" \
  --customize-hook='for k in "$1"/boot/vmlinuz-*; do v=${k##*/vmlinuz-}; [ -e "$1/boot/initrd.img-$v" ] || chroot "$1" dracut -f --kver "$v" "/boot/initrd.img-$v"; done' \
  bookworm "$ROOT" "$SOURCES" >&2

KERNELS=()
for k in "$ROOT"/boot/vmlinuz-*; do KERNELS+=("${k##*/vmlinuz-}"); done
[ ${#KERNELS[@]} -eq 1 ] || die "expected one kernel in the image, found: ${KERNELS[*]}"
KVER=${KERNELS[0]}
[ -s "$ROOT/boot/initrd.img-$KVER" ] || die "dracut made no initrd for $KVER"
[ -d "$ROOT/usr/lib/dracut/modules.d/90dmsquash-live" ] || die "dracut-live (dmsquash-live) missing"

# --- configuration ---------------------------------------------------------------------------
log "$NAME: configuring (kernel $KVER)"
echo vmic-test > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmic-test\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
: > "$ROOT/etc/machine-id"

{
  echo "# <file system> <mount point> <type> <options> <dump> <pass>"
  echo "UUID=$ROOT_FSUUID / ext4 defaults,errors=remount-ro 0 1"
  if [ "$BOOT_PARTITION" -eq 1 ]; then
    echo "UUID=$BOOT_FSUUID /boot ext4 defaults 0 2"
  fi
  echo "UUID=$ESP_FSUUID /boot/efi vfat umask=0077 0 0"
} > "$ROOT/etc/fstab"

install -d "$ROOT/etc/vmic-test" "$ROOT/usr/local/sbin" "$ROOT/etc/systemd/system/multi-user.target.wants"
echo "variant=$VARIANT" > "$ROOT/etc/vmic-test/image"
cat > "$ROOT/usr/local/sbin/vmic-test-marker" <<'EOF'
#!/bin/sh
# Prints the boot marker and /etc/vmic-test/* to every active kernel console (the serial port).
consoles=$(cat /sys/class/tty/console/active 2>/dev/null)
[ -n "$consoles" ] || consoles=console
# The firmware that booted this system, so that a test named "UEFI" or "BIOS" can prove it:
# /sys/firmware/efi exists only under UEFI; the SecureBoot variable's data byte (after 4 bytes
# of attributes) is 1 when the firmware enforces signatures.
firmware() {
  if [ -d /sys/firmware/efi ]; then
    fw=uefi
    var=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
    case "$(od -An -t u1 -j4 -N1 "$var" 2>/dev/null | tr -d ' ')" in
      1) sb=enabled ;;
      0) sb=disabled ;;
      *) sb=unsupported ;;
    esac
  else
    fw=bios sb=unsupported
  fi
  echo "VMIC-TEST-FIRMWARE firmware=$fw secureboot=$sb"
}
report() {
  echo "VMIC-TEST-BOOTED host=$(hostname) cmdline=$(cat /proc/cmdline)"
  firmware
  # What the rpm database holds, as `rpm -q` sees it on the booted system (rpm images).
  if command -v rpm >/dev/null 2>&1; then
    rpm -qa --qf 'VMIC-TEST-RPM %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\n' | LC_ALL=C sort
  fi
  for f in /etc/vmic-test/*; do
    [ -f "$f" ] || continue
    while IFS= read -r line || [ -n "$line" ]; do
      echo "VMIC-TEST-FILE $f: $line"
    done < "$f"
  done
  echo "VMIC-TEST-END"
}
text=$(report)
for c in $consoles; do
  [ -c "/dev/$c" ] && printf '\n%s\n' "$text" > "/dev/$c"
done
printf '%s\n' "$text"
EOF
chmod 0755 "$ROOT/usr/local/sbin/vmic-test-marker"
cat > "$ROOT/etc/systemd/system/vmic-test-marker.service" <<'EOF'
[Unit]
Description=vmic test image: print the boot marker to the serial console
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmic-test-marker
StandardOutput=journal

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vmic-test-marker.service \
  "$ROOT/etc/systemd/system/multi-user.target.wants/vmic-test-marker.service"
# Nothing in the image needs these; under TCG every unit costs boot time. The serial getty
# also races the marker: agetty flushes the port's pending output as it starts, and once cut
# the marker's text short of VMIC-TEST-END (CI, 2026-12-04).
for unit in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-timesyncd.service \
  serial-getty@ttyS0.service serial-getty@ttyAMA0.service; do
  ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done
if [ "$VARIANT" = cloud-init ]; then
  # No metadata service here: only look at a NoCloud seed, never wait on the network.
  printf 'datasource_list: [ NoCloud, None ]\n' > "$ROOT/etc/cloud/cloud.cfg.d/90-vmic-test.cfg"
fi

if [ "$VARIANT" = rpm ]; then
  # The RPM family, made of Debian packages: rpm's database where RPM distributions keep it
  # (Debian's rpm defaults to ~/.rpmdb), one package installed from it for a test to remove,
  # and no apt, so that vmic drives dnf as it would on Fedora or RHEL. The host's rpm (the same
  # Debian 4.18, sqlite) writes the database.
  install -d "$ROOT/etc/rpm"
  printf '%%_dbpath /var/lib/rpm\n' > "$ROOT/etc/rpm/macros.dbpath"
  rpm --root "$ROOT" --dbpath /var/lib/rpm --initdb
  "$HERE/make-rpms" "$WORK/rpms" vmic-rpm-preinstalled
  rpm --root "$ROOT" --dbpath /var/lib/rpm -i --nodeps --noscripts "$WORK/rpms/vmic-rpm-preinstalled-1.0-1.noarch.rpm"
  [ -s "$ROOT/etc/vmic-test/vmic-rpm-preinstalled" ] || die "rpm -i put nothing in the image"
  chroot "$ROOT" dpkg --purge apt >&2
  [ ! -e "$ROOT/usr/bin/apt-get" ] && [ -x "$ROOT/usr/bin/dnf" ] || die "the rpm image must have dnf and no apt-get"
fi

# --- grub ------------------------------------------------------------------------------------
if [ "$BOOT_PARTITION" -eq 1 ]; then
  BOOT_UUID=$BOOT_FSUUID BOOT_PREFIX="" # paths inside the /boot file system
else
  BOOT_UUID=$ROOT_FSUUID BOOT_PREFIX="/boot"
fi
install -d "$ROOT/boot/grub2"
cat > "$ROOT/boot/grub2/grub.cfg" <<EOF
# Main grub config of the vmic test image ($NAME).
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root $BOOT_UUID
menuentry "Debian GNU/Linux 12 (vmic test image, $KVER)" {
	search --no-floppy --fs-uuid --set=root $BOOT_UUID
	linux $BOOT_PREFIX/vmlinuz-$KVER root=UUID=$ROOT_FSUUID rw console=$CONSOLE,115200 net.ifnames=0
	initrd $BOOT_PREFIX/initrd.img-$KVER
}
EOF
# grub-mkimage's prefix (/boot/grub2) is relative to the device grub was loaded from (the ESP):
# the embedded early config finds the file system holding grub.cfg by UUID instead, falling back
# to any device with /boot/grub2/grub.cfg (e.g. a LiveOS ISO made from this image).
cat > "$ROOT/boot/grub2/early.cfg" <<EOF
search --no-floppy --file --set=root /boot/grub2/grub.cfg
set prefix=(\$root)/boot/grub2
search --no-floppy --fs-uuid --set=root $BOOT_UUID
set prefix=(\$root)$BOOT_PREFIX/grub2
configfile \$prefix/grub.cfg
EOF
GRUB_MODULES="part_gpt part_msdos fat ext2 iso9660 search search_fs_uuid search_fs_file search_label
  normal linux configfile echo test regexp ls cat boot chain minicmd loadenv sleep serial terminal
  all_video efi_gop font gfxterm gzio halt reboot net efinet tftp"
[ "$ARCH" = x86_64 ] && GRUB_MODULES="$GRUB_MODULES efi_uga"
install -d "$ROOT/boot/efi/EFI/BOOT"
GRUB_PREFIX=/boot/grub2
if [ "$VARIANT" = secureboot ]; then
  # Debian's signed grub is monolithic with its prefix at /EFI/debian on the device it was
  # loaded from (the ESP): the same early config, placed there, finds the main one.
  cp "$ROOT/usr/lib/grub/$GRUB_TARGET-signed/grub$EFI_ARCH.efi.signed" \
    "$ROOT/boot/efi/EFI/BOOT/grub$EFI_ARCH.efi"
  install -d "$ROOT/boot/efi/EFI/debian"
  cp "$ROOT/boot/grub2/early.cfg" "$ROOT/boot/efi/EFI/debian/grub.cfg"
  GRUB_PREFIX=/EFI/debian
else
  # shellcheck disable=SC2086
  chroot "$ROOT" grub-mkimage -O "$GRUB_TARGET" -p /boot/grub2 -c /boot/grub2/early.cfg \
    -o "/boot/efi/EFI/BOOT/grub$EFI_ARCH.efi" $GRUB_MODULES
fi
cp "$ROOT/usr/lib/shim/shim$EFI_ARCH.efi.signed" "$ROOT/boot/efi/EFI/BOOT/boot$EFI_ARCH.efi"

# --- filler (--filler-mb N, for the scaling benchmark) ---------------------------------------
# N files of exactly 1 MiB, /opt/vmic-filler/NNNNN.bin: the same bytes every build, and no two
# alike (squashfs stores identical files once: the data would not scale). The first half
# (rounded up) is incompressible: one AES-128-CTR keystream (fixed key and IV) cut in 1 MiB
# pieces. The rest is text: the image's own copyright files, concatenated in sorted order and
# repeated, each file a different rotation of them behind a line naming it.
if [ "$FILLER_MB" -gt 0 ]; then
  log "$NAME: filler ($FILLER_MB files of 1 MiB in /opt/vmic-filler)"
  local filler="$ROOT/opt/vmic-filler" text="$WORK/filler-text" repeated="$WORK/filler-repeated"
  local random_files=$(( (FILLER_MB + 1) / 2 )) text_bytes i header file
  install -d -m 0755 "$filler"
  # head's input is finite (no SIGPIPE for pipefail to see); split names the pieces 00000.bin on.
  head -c "$((random_files * 1048576))" /dev/zero \
    | openssl enc -aes-128-ctr -nosalt -K 766d69632d66696c6c65722d6b657921 \
        -iv 00000000000000000000000000000000 \
    | split -b 1048576 -a 5 -d --additional-suffix=.bin - "$filler/"
  find "$ROOT/usr/share/doc" -mindepth 2 -maxdepth 2 -name copyright -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 -r cat > "$text"
  text_bytes=$(stat -c %s "$text")
  [ "$text_bytes" -gt 0 ] || die "no /usr/share/doc/*/copyright in the image for the filler text"
  # At least 2 MiB + one copy of the text: any rotation (offset below text_bytes) has 1 MiB.
  for ((i = 0; i < 2 * 1048576 / text_bytes + 2; i++)); do cat "$text"; done > "$repeated"
  for ((i = random_files; i < FILLER_MB; i++)); do
    printf -v header 'vmic-filler %05d: the copyright files of the image, rotated\n' "$i"
    printf -v file '%s/%05d.bin' "$filler" "$i"
    {
      printf '%s' "$header"
      dd if="$repeated" bs=64K iflag=skip_bytes,count_bytes \
        skip="$(( i * 7919 % text_bytes ))" count="$(( 1048576 - ${#header} ))" status=none
    } > "$file"
  done
  rm -f "$text" "$repeated"
  find "$filler" -type f -exec chmod 0644 {} +
  [ "$(find "$filler" -type f -name '*.bin' -size 1048576c | wc -l)" -eq "$FILLER_MB" ] \
    || die "the filler is not $FILLER_MB files of 1 MiB"
fi

# --- split into file systems ---------------------------------------------------------------
mkdir -p "$ESPDIR"
mv "$ROOT/boot/efi/EFI" "$ESPDIR/"
if [ "$BOOT_PARTITION" -eq 1 ]; then
  mkdir -p "$BOOTFS"
  find "$ROOT/boot" -mindepth 1 -maxdepth 1 -exec mv -t "$BOOTFS" {} +
  # ROOT/boot stays as the mount point; BOOTFS/efi is the ESP's mount point inside /boot.
fi
find "$ROOT" "$ESPDIR" ${BOOTFS:+"$BOOTFS"} -xdev -newermt "@$SOURCE_DATE_EPOCH" \
  -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} + 2>/dev/null || true

ROOT_MIB=$(du -sm --apparent-size "$ROOT" | cut -f1)
ROOT_BYTES=$(du -sb "$ROOT" | cut -f1) # for the manifest: the data in the root file system
# Root partition: at least 30% free space; the disk is 1 GiB unless that does not fit. Half the
# data again, not 30 %: ext4's own blocks (inode tables, journal, 5 % reserved for root) and
# small files' slack take their share (with 30 %, a 3 GiB root, --filler-mb 2700, kept ~26 % of
# its size free, ~20 % for users other than root).
NEED_MIB=$(( ROOT_MIB * 3 / 2 + 64 + 1 + (BOOT_PARTITION ? 256 : 0) ))
DISK_MIB=1024
while [ "$DISK_MIB" -lt "$NEED_MIB" ]; do DISK_MIB=$((DISK_MIB + 512)); done
DISK_SECTORS=$((DISK_MIB * MIB))
if [ "$BOOT_PARTITION" -eq 1 ]; then
  BOOT_START=$((ESP_START + ESP_SECTORS))
  ROOT_START=$((BOOT_START + BOOT_SECTORS))
else
  ROOT_START=$((ESP_START + ESP_SECTORS))
fi
# The backup GPT takes the last 33 sectors; keep the root partition MiB-aligned.
ROOT_SECTORS=$(( (DISK_SECTORS - 34 - ROOT_START + 1) / MIB * MIB ))

log "$NAME: file systems (rootfs $ROOT_MIB MiB, disk $DISK_MIB MiB)"
mkfs.ext4 -q -F -L root -U "$ROOT_FSUUID" -E "hash_seed=$ROOT_FSUUID,root_owner=0:0" \
  -d "$ROOT" "$WORK/root.img" "$((ROOT_SECTORS / 2))k"
if [ "$BOOT_PARTITION" -eq 1 ]; then
  mkfs.ext4 -q -F -L boot -U "$BOOT_FSUUID" -E "hash_seed=$BOOT_FSUUID,root_owner=0:0" \
    -d "$BOOTFS" "$WORK/boot.img" "$((BOOT_SECTORS / 2))k"
fi
truncate -s "$((ESP_SECTORS * 512))" "$WORK/esp.img"
mkfs.vfat -F 16 -n ESP --invariant "$WORK/esp.img" >/dev/null
export MTOOLS_SKIP_CHECK=1
# --invariant pins the volume id to 1234-ABCD: give each image its own (fstab names it).
mlabel -i "$WORK/esp.img" -N "$ESP_VOLID" ::ESP
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -m -i "$WORK/esp.img" "$ESPDIR/EFI/BOOT/"* ::/EFI/BOOT/
if [ -d "$ESPDIR/EFI/debian" ]; then
  mmd -i "$WORK/esp.img" ::/EFI/debian
  mcopy -m -i "$WORK/esp.img" "$ESPDIR/EFI/debian/"* ::/EFI/debian/
fi

log "$NAME: disk"
truncate -s "$((DISK_SECTORS * 512))" "$WORK/disk.raw"
LINUX_FS=0FC63DAF-8483-4772-8E79-3D69D8477DE4
{
  echo "label: gpt"
  echo "label-id: $DISK_GUID"
  echo "unit: sectors"
  echo "first-lba: 2048"
  echo "start=$ESP_START, size=$ESP_SECTORS, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$ESP_PARTUUID, name=\"esp\""
  if [ "$BOOT_PARTITION" -eq 1 ]; then
    echo "start=$BOOT_START, size=$BOOT_SECTORS, type=$LINUX_FS, uuid=$BOOT_PARTUUID, name=\"boot\""
  fi
  echo "start=$ROOT_START, size=$ROOT_SECTORS, type=$LINUX_FS, uuid=$ROOT_PARTUUID, name=\"rootfs\""
} | sfdisk --quiet --no-reread --no-tell-kernel "$WORK/disk.raw"
place() { dd if="$1" of="$WORK/disk.raw" bs=1M seek="$(($2 * 512))" oflag=seek_bytes conv=notrunc,sparse status=none; }
place "$WORK/esp.img" "$ESP_START"
[ "$BOOT_PARTITION" -eq 1 ] && place "$WORK/boot.img" "$BOOT_START"
place "$WORK/root.img" "$ROOT_START"

log "$NAME: ${FORMATS// /, }"
for format in $FORMATS; do
  case "$format" in
    qcow2) qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2" ;;
    vhd) qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$WORK/disk.raw" "$WORK/disk.vhd" ;;
    vhdx) qemu-img convert -f raw -O vhdx "$WORK/disk.raw" "$WORK/disk.vhdx" ;;
  esac
done

# --- manifest --------------------------------------------------------------------------------
BUILD_SECONDS=$(( $(date +%s) - START_TIME ))
dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${Package}\t${Version}\n' \
  | jq -R -s 'split("\n") | map(select(length > 0) | split("\t") | {(.[0]): .[1]}) | add' \
  > "$WORK/packages.json"
# The rpm database's packages (the rpm variant), as NAME-VERSION-RELEASE.ARCH.
if [ -d "$ROOT/var/lib/rpm" ]; then
  rpm --root "$ROOT" --dbpath /var/lib/rpm -qa --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\n' | LC_ALL=C sort
fi | jq -R -s 'split("\n") | map(select(length > 0))' > "$WORK/rpms.json"
partition() { # name number start sectors type partuuid fstype fsuuid mountpoint
  jq -n --arg name "$1" --argjson number "$2" --argjson start "$3" --argjson sectors "$4" \
    --arg type "$5" --arg partuuid "$6" --arg fstype "$7" --arg fsuuid "$8" --arg mount "$9" \
    '{number: $number, name: $name, start_sector: $start, sectors: $sectors, type_guid: $type,
      partuuid: $partuuid, fstype: $fstype, fs_uuid: $fsuuid, mountpoint: $mount}'
}
{
  partition esp 1 "$ESP_START" "$ESP_SECTORS" C12A7328-F81F-11D2-BA4B-00A0C93EC93B "$ESP_PARTUUID" vfat "$ESP_FSUUID" /boot/efi
  if [ "$BOOT_PARTITION" -eq 1 ]; then
    partition boot 2 "$BOOT_START" "$BOOT_SECTORS" "$LINUX_FS" "$BOOT_PARTUUID" ext4 "$BOOT_FSUUID" /boot
    partition rootfs 3 "$ROOT_START" "$ROOT_SECTORS" "$LINUX_FS" "$ROOT_PARTUUID" ext4 "$ROOT_FSUUID" /
  else
    partition rootfs 2 "$ROOT_START" "$ROOT_SECTORS" "$LINUX_FS" "$ROOT_PARTUUID" ext4 "$ROOT_FSUUID" /
  fi
} | jq -s . > "$WORK/partitions.json"
# disk.raw is recorded even when it is not kept: the other formats hold its content.
for f in disk.raw $(printf 'disk.%s ' $FORMATS); do
  [ -f "$WORK/$f" ] || continue
  printf '%s\t%s\t%s\n' "$f" "$(sha256sum "$WORK/$f" | cut -d' ' -f1)" "$(stat -c %s "$WORK/$f")"
done | jq -R -s 'split("\n") | map(select(length > 0) | split("\t") | {(.[0]): {sha256: .[1], bytes: (.[2] | tonumber)}}) | add' \
  > "$WORK/files.json"
jq -n --arg name "$NAME" --arg arch "$ARCH" --arg variant "$VARIANT" \
  --argjson boot_partition "$([ "$BOOT_PARTITION" -eq 1 ] && echo true || echo false)" \
  --arg recipe_hash "$HASH" --argjson source_date_epoch "$SOURCE_DATE_EPOCH" \
  --arg kernel "$KVER" --arg disk_guid "$DISK_GUID" --argjson disk_bytes "$((DISK_SECTORS * 512))" \
  --argjson build_seconds "$BUILD_SECONDS" --arg grub_prefix "$GRUB_PREFIX" \
  --argjson filler_mb "$FILLER_MB" --argjson root_fs_bytes "$ROOT_BYTES" \
  --arg shim "EFI/BOOT/boot$EFI_ARCH.efi" --arg grub "EFI/BOOT/grub$EFI_ARCH.efi" \
  --slurpfile partitions "$WORK/partitions.json" --slurpfile packages "$WORK/packages.json" \
  --slurpfile files "$WORK/files.json" --slurpfile rpms "$WORK/rpms.json" \
  '{name: $name, arch: $arch, variant: $variant, boot_partition: $boot_partition,
    recipe_hash: $recipe_hash, source_date_epoch: $source_date_epoch, build_seconds: $build_seconds,
    filler_mb: $filler_mb, root_fs_bytes: $root_fs_bytes,
    kernel_version: $kernel, hostname: "vmic-test", marker: "VMIC-TEST-BOOTED",
    boot: {shim: $shim, grub: $grub, grub_prefix: $grub_prefix, grub_cfg: "/boot/grub2/grub.cfg"},
    disk: {label: "gpt", disk_guid: $disk_guid, bytes: $disk_bytes, partitions: $partitions[0]},
    files: $files[0], packages: $packages[0], rpms: $rpms[0]}' > "$WORK/manifest.json"

}

main "$@"; exit
