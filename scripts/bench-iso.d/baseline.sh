#!/usr/bin/env bash
# The baseline of scripts/bench-iso: disk image → LiveOS ISO natively as root on the host, the
# way the Azure Linux Image Customizer does it. Run by harness.py, which measures it.
#
# Usage: baseline.sh --arch x86_64|aarch64 --input DISK --build-dir DIR --output ISO
#                    --times FILE --hostname NAME --file SRC:DEST --extra-arg ARG
#                    [--squashfs-comp COMP [--squashfs-level N]]
#
# Steps (each timed into FILE as "step<TAB>seconds", notes as "#note<TAB>text"):
#   convert    qemu-img convert to raw in the build dir
#   attach     loop devices for the partitions (losetup -P; per-partition offset loops when the
#              host kernel reads no partition tables), mount root read-only, then what its
#              /etc/fstab lists (ESP: mtools copy when the host kernel has no vfat)
#   copy       cp -a of the whole tree to DIR/rootfs, unmount, detach
#   customize  hostname, the additional file
#   dracut     the image's dracut chrooted in the copy (bind /proc /sys /dev), dmsquash-live,
#              with vmic's options; aarch64 images through qemu-user binfmt
#   squashfs   mksquashfs -xattrs, default settings (or --squashfs-comp, to compare with
#              vmic's setting), no /boot contents, no /etc/fstab
#   iso-tree   kernel, new initrd, grub.cfg, shim + grub, efiboot.img (mkfs.vfat + mtools)
#   xorriso    the ISO (El Torito UEFI), written to ISO
#   cleanup    the build dir's contents removed
# Loop devices and mounts are released on every way out (trap).
set -euo pipefail

die() { printf 'baseline: error: %s\n' "$*" >&2; exit 1; }

ARCH="" INPUT="" BUILD="" OUTPUT="" TIMES="" HOSTNAME_VALUE="" FILE_SPEC="" EXTRA_ARG=""
SQUASHFS_COMP="" SQUASHFS_LEVEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --input) INPUT=$2; shift 2 ;;
    --build-dir) BUILD=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --times) TIMES=$2; shift 2 ;;
    --hostname) HOSTNAME_VALUE=$2; shift 2 ;;
    --file) FILE_SPEC=$2; shift 2 ;;
    --extra-arg) EXTRA_ARG=$2; shift 2 ;;
    --squashfs-comp) SQUASHFS_COMP=$2; shift 2 ;;
    --squashfs-level) SQUASHFS_LEVEL=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in ARCH INPUT BUILD OUTPUT TIMES HOSTNAME_VALUE FILE_SPEC EXTRA_ARG; do
  [ -n "${!v}" ] || die "missing argument for $v"
done
case "$ARCH" in
  x86_64) EFI_ARCH=x64 EFI_BOOT=BOOTX64.EFI ;;
  aarch64) EFI_ARCH=aa64 EFI_BOOT=BOOTAA64.EFI ;;
  *) die "--arch must be x86_64 or aarch64" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -f "$INPUT" ] || die "no input $INPUT"
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
: > "$TIMES"
export MTOOLS_SKIP_CHECK=1 LC_ALL=C

RAW="$BUILD/image.raw"
MNT="$BUILD/mnt"
ROOTFS="$BUILD/rootfs"
ISO="$BUILD/iso"

# --- cleanup: mounts in reverse order, then loop devices --------------------------------------
MOUNTS=()
LOOPS=()
cleanup() {
  local status=$? i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null \
      || echo "baseline: cannot unmount ${MOUNTS[i]}" >&2
  done
  MOUNTS=()
  for i in "${LOOPS[@]}"; do losetup -d "$i" 2>/dev/null || true; done
  LOOPS=()
  return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

do_mount() { # do_mount TARGET MOUNT-ARGS...
  local target=$1; shift
  mount "$@" "$target"
  MOUNTS+=("$target")
}
undo_mounts() { # unmount everything mounted so far, in reverse order
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}"; done
  MOUNTS=()
}

# --- step timing ---------------------------------------------------------------------------
STEP="" STEP_START=""
now() { date +%s.%N; }
step() {
  local t
  t=$(now)
  if [ -n "$STEP" ]; then
    printf '%s\t%s\n' "$STEP" "$(awk -v a="$STEP_START" -v b="$t" 'BEGIN {printf "%.3f", b - a}')" >> "$TIMES"
  fi
  STEP=$1 STEP_START=$t
  [ -n "$STEP" ] && printf '==> %s\n' "$STEP" >&2
  return 0
}
note() { printf '#note\t%s\n' "$*" >> "$TIMES"; printf 'baseline: note: %s\n' "$*" >&2; }

# --- convert -------------------------------------------------------------------------------
step convert
qemu-img convert -O raw "$INPUT" "$RAW"

# --- attach + mount ------------------------------------------------------------------------
step attach
# Partition devices, in table order: PART_DEV[i], with the table's PARTUUID in PART_UUID[i].
PART_DEV=() PART_UUID=()
loop=$(losetup -f --show -r -P "$RAW")
LOOPS+=("$loop")
# losetup -P rescans synchronously; devtmpfs makes the nodes. Allow udev-managed /dev a moment.
for _ in 1 2 3 4 5; do
  compgen -G "/sys/block/${loop##*/}/${loop##*/}p*" >/dev/null && break
  sleep 0.1
done
mapfile -t table < <(partx -g -o NR,START,SECTORS,UUID "$RAW")
[ ${#table[@]} -gt 0 ] || die "no partitions in $INPUT"
if compgen -G "/sys/block/${loop##*/}/${loop##*/}p*" >/dev/null; then
  for _ in $(seq 20); do [ -b "${loop}p1" ] && break; sleep 0.1; done
  for row in "${table[@]}"; do
    read -r nr _ _ uuid <<<"$row"
    PART_DEV+=("${loop}p$nr") PART_UUID+=("$uuid")
  done
else
  # This host's kernel reads no partition tables (no CONFIG_EFI_PARTITION): one loop device
  # per partition at its offset is the same block device.
  note "partitions: one offset loop device each (the host kernel reads no partition tables)"
  losetup -d "$loop"
  LOOPS=()
  for row in "${table[@]}"; do
    read -r _ start sectors uuid <<<"$row"
    dev=$(losetup -f --show -r -o $((start * 512)) --sizelimit $((sectors * 512)) "$RAW")
    LOOPS+=("$dev")
    PART_DEV+=("$dev") PART_UUID+=("$uuid")
  done
fi
mkdir -p "$MNT"
# Root: the Linux file system holding /etc/fstab.
ROOT_DEV=""
for dev in "${PART_DEV[@]}"; do
  case "$(blkid -s TYPE -o value "$dev" || true)" in ext2|ext3|ext4|xfs|btrfs) ;; *) continue ;; esac
  mount -o ro "$dev" "$MNT"
  if [ -f "$MNT/etc/fstab" ]; then ROOT_DEV=$dev; MOUNTS+=("$MNT"); break; fi
  umount "$MNT"
done
[ -n "$ROOT_DEV" ] || die "no partition holds /etc/fstab"
# The rest of /etc/fstab, parents before children. A vfat file system is copied with mtools
# when the host kernel cannot mount vfat.
has_vfat=0
grep -qw vfat /proc/filesystems || modprobe vfat 2>/dev/null || true
grep -qw vfat /proc/filesystems && has_vfat=1
MTOOLS_COPIES=() # "device<TAB>mount point"
find_dev() { # find_dev SPEC -> device of the partition it names
  local key=${1%%=*} value=${1#*=} i
  for i in "${!PART_DEV[@]}"; do
    case "$key" in
      UUID) [ "$(blkid -s UUID -o value "${PART_DEV[i]}" || true)" = "$value" ] ;;
      LABEL) [ "$(blkid -s LABEL -o value "${PART_DEV[i]}" || true)" = "$value" ] ;;
      PARTUUID) [ "${PART_UUID[i],,}" = "${value,,}" ] ;;
      *) [ "${PART_DEV[i]}" = "$1" ] ;;
    esac && { echo "${PART_DEV[i]}"; return 0; }
  done
  return 1
}
while read -r spec mountpoint fstype; do
  dev=$(find_dev "$spec") || die "fstab: no partition for $spec ($mountpoint)"
  if [ "$fstype" = vfat ] && [ "$has_vfat" -eq 0 ]; then
    note "$mountpoint: copied with mtools (the host kernel has no vfat)"
    MTOOLS_COPIES+=("$dev	$mountpoint")
    continue
  fi
  do_mount "$MNT$mountpoint" -o ro -t "$fstype" "$dev"
done < <(awk '$1 !~ /^#/ && NF >= 3 && $2 ~ /^\/./ && $3 != "swap" && $3 !~ /^(tmpfs|proc|sysfs|devpts|none)$/ {
           n = gsub("/", "/", $2); print n, $1, $2, $3 }' "$MNT/etc/fstab" | sort -n -k1,1 | cut -d' ' -f2-)

# --- copy ----------------------------------------------------------------------------------
step copy
mkdir -p "$ROOTFS"
cp -a "$MNT/." "$ROOTFS/"
for entry in "${MTOOLS_COPIES[@]}"; do
  dev=${entry%%	*} mountpoint=${entry#*	}
  mkdir -p "$ROOTFS$mountpoint"
  mcopy -s -p -m -n -i "$dev" '::/*' "$ROOTFS$mountpoint/"
done
undo_mounts
for dev in "${LOOPS[@]}"; do losetup -d "$dev"; done
LOOPS=()

# --- customize -----------------------------------------------------------------------------
step customize
printf '%s\n' "$HOSTNAME_VALUE" > "$ROOTFS/etc/hostname"
install -D -m 0644 "${FILE_SPEC%%:*}" "$ROOTFS${FILE_SPEC#*:}"

# --- dracut --------------------------------------------------------------------------------
step dracut
KVERS=()
for k in "$ROOTFS"/boot/vmlinuz-*; do [ -e "$k" ] && KVERS+=("${k##*/vmlinuz-}"); done
[ ${#KVERS[@]} -eq 1 ] || die "expected one kernel under /boot, found: ${KVERS[*]:-none}"
KVER=${KVERS[0]}
[ -d "$ROOTFS/usr/lib/dracut/modules.d/90dmsquash-live" ] || die "the image's dracut has no dmsquash-live"
LIVE_CONF=/etc/dracut.conf.d/99-bench-liveos.conf
printf '%s\n' 'add_dracutmodules+=" dmsquash-live "' 'add_drivers+=" overlay "' 'hostonly="no"' \
  'filesystems+=" squashfs iso9660 "' > "$ROOTFS$LIVE_CONF"
for fs in proc sys dev; do do_mount "$ROOTFS/$fs" --bind "/$fs"; done
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  chroot "$ROOTFS" dracut --force --no-hostonly --add dmsquash-live --add-drivers overlay \
  --filesystems "squashfs iso9660" --kver "$KVER" "/boot/initrd.img-$KVER"
undo_mounts
rm -f "$ROOTFS$LIVE_CONF"

# --- squashfs ------------------------------------------------------------------------------
step squashfs
mkdir -p "$ISO/LiveOS"
SQUASHFS_ARGS=()
[ -n "$SQUASHFS_COMP" ] && SQUASHFS_ARGS+=(-comp "$SQUASHFS_COMP")
[ -n "$SQUASHFS_LEVEL" ] && SQUASHFS_ARGS+=(-Xcompression-level "$SQUASHFS_LEVEL")
mksquashfs "$ROOTFS" "$ISO/LiveOS/rootfs.img" -noappend -xattrs -no-progress "${SQUASHFS_ARGS[@]}" \
  -wildcards -e 'boot/*' 'boot/.*' etc/fstab >&2

# --- iso-tree ------------------------------------------------------------------------------
step iso-tree
mkdir -p "$ISO/boot/grub2" "$ISO/EFI/BOOT"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$ROOTFS/boot/initrd.img-$KVER" "$ISO/boot/"
# The image's kernel args (its first `linux` line, minus root=), the LiveOS args, the extra arg.
image_args=$(awk '$1 == "linux" { for (i = 3; i <= NF; i++) if ($i !~ /^root=/) printf "%s ", $i; exit }' \
  "$ROOTFS/boot/grub2/grub.cfg")
cat > "$ISO/boot/grub2/grub.cfg" <<EOF
set timeout=0
set default=0
search --no-floppy --label CDROM --set=root
menuentry "LiveOS ($KVER)" {
	search --no-floppy --label CDROM --set=root
	linux /boot/vmlinuz-$KVER ${image_args}root=live:LABEL=CDROM rd.live.image rd.live.dir=LiveOS rd.live.squashimg=rootfs.img rd.live.overlay.overlayfs selinux=0 $EXTRA_ARG
	initrd /boot/initrd.img-$KVER
}
EOF
ESP_BOOT="$ROOTFS/boot/efi/EFI/BOOT"
SHIM="$ESP_BOOT/boot$EFI_ARCH.efi" GRUB="$ESP_BOOT/grub$EFI_ARCH.efi"
[ -f "$SHIM" ] && [ -f "$GRUB" ] || die "no shim/grub under /boot/efi/EFI/BOOT"
cp "$SHIM" "$ISO/EFI/BOOT/$EFI_BOOT"
cp "$GRUB" "$ISO/EFI/BOOT/grub$EFI_ARCH.efi"
cp "$ISO/boot/grub2/grub.cfg" "$ISO/EFI/BOOT/grub.cfg"
EFIBOOT="$ISO/boot/grub2/efiboot.img"
kib=$(( ( $(stat -c %s "$SHIM") + $(stat -c %s "$GRUB") + 4096 ) / 1024 + 1024 ))
mkfs.vfat -C -n BENCH_EFI "$EFIBOOT" "$kib" >/dev/null
mmd -i "$EFIBOOT" ::/EFI ::/EFI/BOOT ::/boot ::/boot/grub2
mcopy -i "$EFIBOOT" "$SHIM" "::/EFI/BOOT/$EFI_BOOT"
mcopy -i "$EFIBOOT" "$GRUB" "::/EFI/BOOT/grub$EFI_ARCH.efi"
mcopy -i "$EFIBOOT" "$ISO/boot/grub2/grub.cfg" ::/EFI/BOOT/grub.cfg
mcopy -i "$EFIBOOT" "$ISO/boot/grub2/grub.cfg" ::/boot/grub2/grub.cfg

# --- xorriso -------------------------------------------------------------------------------
step xorriso
rm -f "$OUTPUT"
xorriso -as mkisofs -iso-level 3 -R -J -joliet-long -V CDROM -o "$OUTPUT" \
  -e boot/grub2/efiboot.img -no-emul-boot -efi-boot-part --efi-boot-image \
  --protective-msdos-label "$ISO" 2>&1 | tail -n 3 >&2

# --- cleanup -------------------------------------------------------------------------------
step cleanup
# Nothing may be mounted below the build dir now (the binds of /dev above all).
if awk -v b="$BUILD/" 'index($5 "/", b) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  die "something is still mounted below $BUILD"
fi
rm -rf --one-file-system "$ROOTFS" "$ISO" "$MNT" "$RAW"
step ""
