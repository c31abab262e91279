#!/usr/bin/env python3
"""Assembles the vmic builder VM (kernel + initramfs) for x86_64 and aarch64 from Debian packages.

Runs on an x86_64 (or any) Debian host without root, loop devices, binfmt or chroot: apt
downloads the target architecture's .debs with a private configuration, `dpkg-deb -x` unpacks
them into a staging tree, which is merged into /usr, trimmed, and written as a newc cpio by this
script (so ownership is root and /dev/console exists without root). The result is cached
content-addressed under ${VMIC_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vmic}/guest/ and rebuilt
only when the recipe, the resolved package versions or the agent binary change.

stdout carries only the resulting directory paths, one per arch; progress goes to stderr.
See guest-image/README.md for the output layout.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import fnmatch
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECIPE_DIR.parent
FORMAT_VERSION = 1  # bump when the output layout changes in a way the host must know about
AGENT_BIN = "vmic-agent"
# The agent's LD_PRELOAD for an image's dracut-install (guest-agent/preload; the agent's
# dracut_install::PRELOAD_GUEST_PATH).
PRELOAD_PATH = "usr/lib/vmic/vmic-preload.so"
KEEP_BUILDS_PER_ARCH = 3


class BuildError(Exception):
    """A failure with a message meant for the user (no traceback)."""


def log(message: str) -> None:
    print(f"guest-image: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        capture: bool = True) -> str:
    """Runs a command; on failure raises BuildError carrying its output."""
    result = subprocess.run(argv, env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr,
                            stderr=subprocess.STDOUT if capture else None)
    if result.returncode != 0:
        output = (result.stdout or "").strip()
        tail = "\n".join(output.splitlines()[-30:])
        raise BuildError(f"command failed ({result.returncode}): {' '.join(argv)}\n{tail}")
    return result.stdout or ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class ArchSettings:
    arch: str
    debian_arch: str
    rust_target: str
    kernel_format: str
    packages: list[str]
    stubs: list[str]
    boot_modules: list[str]
    on_demand_modules: list[str]
    prune: list[str]
    keep: list[str]


@dataclass
class Settings:
    cache_dir: Path
    refresh: bool
    force: bool
    agent: Path | None
    init: Path | None
    compress: str
    keep_work: bool
    recipe: dict
    arches: list[ArchSettings] = field(default_factory=list)


def load_settings(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="build-guest-image",
        description="Build (or find cached) the vmic builder VM kernel + initramfs.")
    parser.add_argument("--arch", default="all", choices=["x86_64", "aarch64", "all"])
    parser.add_argument("--refresh", action="store_true",
                        help="refresh the private apt lists even if they are recent")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--agent", type=Path,
                        help="use this agent binary instead of building it with cargo")
    parser.add_argument("--init", type=Path,
                        help="put this file at /init instead of the agent (test images; the "
                             "<arch> link is then left alone)")
    parser.add_argument("--compress", default="none", choices=["none", "zstd", "gzip"],
                        help="initramfs compression (default none: fastest boot under TCG)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the staging tree (printed on stderr)")
    parser.add_argument("--cache-dir", type=Path, help="default: $VMIC_CACHE_DIR, "
                        "$XDG_CACHE_HOME/vmic or ~/.cache/vmic")
    args = parser.parse_args(argv)
    if args.agent and args.arch == "all":
        parser.error("--agent names one binary: pick one --arch")

    cache_dir = args.cache_dir or default_cache_dir()
    recipe = tomllib.loads((RECIPE_DIR / "recipe.toml").read_text())
    settings = Settings(
        cache_dir=cache_dir.absolute(), refresh=args.refresh, force=args.force,
        agent=args.agent.absolute() if args.agent else None,
        init=args.init.absolute() if args.init else None,
        compress=args.compress, keep_work=args.keep_work, recipe=recipe)
    names = ["x86_64", "aarch64"] if args.arch == "all" else [args.arch]
    for name in names:
        arch_recipe = recipe["arch"][name]
        settings.arches.append(ArchSettings(
            arch=name,
            debian_arch=arch_recipe["debian_arch"],
            rust_target=arch_recipe["rust_target"],
            kernel_format=arch_recipe["kernel_format"],
            packages=recipe["packages"]["common"] + arch_recipe["packages"],
            stubs=recipe["packages"]["stubs"],
            boot_modules=recipe["modules"]["boot"],
            on_demand_modules=recipe["modules"]["on_demand"],
            prune=recipe["prune"]["paths"],
            keep=recipe["prune"]["keep"]))
    for path in filter(None, [settings.agent, settings.init]):
        if not path.is_file():
            raise BuildError(f"{path}: no such file")
    return settings


def default_cache_dir() -> Path:
    if os.environ.get("VMIC_CACHE_DIR"):
        return Path(os.environ["VMIC_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vmic"


def recipe_sha256() -> str:
    """Hash of every file of the recipe (this script included), docs excepted."""
    digest = hashlib.sha256()
    for path in sorted(RECIPE_DIR.rglob("*")):
        if path.is_file() and path.suffix != ".md" and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(RECIPE_DIR)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The build, top-down


def main(argv: list[str]) -> int:
    try:
        settings = load_settings(argv)
        guest_dir = settings.cache_dir / "guest"
        guest_dir.mkdir(parents=True, exist_ok=True)
        with open(guest_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for arch in settings.arches:
                print(build_arch(settings, arch, guest_dir), flush=True)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def build_arch(settings: Settings, arch: ArchSettings, guest_dir: Path) -> Path:
    agent = settings.agent or build_agent(arch)
    preload = build_preload(arch)
    apt = PrivateApt(guest_dir / "apt" / arch.debian_arch, arch, settings.recipe["debian"])
    apt.prepare(arch.stubs)
    apt.update(force=settings.refresh)
    packages = apt.resolve(arch.packages)

    inputs = BuildInputs(arch=arch.arch, recipe_sha256=recipe_sha256(), packages=packages,
                         agent_sha256=sha256_file(agent),
                         preload_sha256=sha256_file(preload),
                         init_sha256=sha256_file(settings.init) if settings.init else None,
                         compress=settings.compress)
    out_dir = guest_dir / f"{arch.arch}-{inputs.key()}"
    if (out_dir / "manifest.json").is_file() and not settings.force:
        log(f"{arch.arch}: up to date ({out_dir.name})")
    else:
        log(f"{arch.arch}: building {out_dir.name} from {len(packages)} packages")
        started = time.monotonic()
        debs = apt.download(arch.packages, packages)
        with tempfile.TemporaryDirectory(prefix=f".build-{arch.arch}-", dir=guest_dir) as work:
            make_image(settings, arch, inputs, debs, agent, preload, Path(work), out_dir)
            if settings.keep_work:
                kept = guest_dir / f".work-{out_dir.name}"
                shutil.rmtree(kept, ignore_errors=True)
                os.rename(Path(work) / "root", kept)
                log(f"{arch.arch}: staging tree kept in {kept}")
        log(f"{arch.arch}: built in {time.monotonic() - started:.0f} s")
    if settings.init is None:
        point_link(guest_dir / arch.arch, out_dir)
    remove_old_builds(guest_dir, arch.arch, keep=out_dir)
    return out_dir


def make_image(settings: Settings, arch: ArchSettings, inputs: BuildInputs,
               debs: list[Path], agent: Path, preload: Path, work: Path,
               out_dir: Path) -> None:
    root = work / "root"
    staging_out = work / "out"
    root.mkdir()
    staging_out.mkdir()
    unpack_debs(debs, root)
    mtime_clamp = newest_mtime(root)
    merge_usr(root)
    kernel_version = find_kernel_version(root)
    make_kernel(root, kernel_version, arch, staging_out)
    boot_order, load_order = select_modules(root, kernel_version, arch.boot_modules,
                                            arch.on_demand_modules)
    install_busybox_links(root)
    prune_tree(root, arch.prune, arch.keep)
    make_base_files(root, agent, preload, settings.init)
    check_shared_libraries(root)

    manifest = {
        "format_version": FORMAT_VERSION,
        "id": out_dir.name,
        "arch": arch.arch,
        "debian_arch": arch.debian_arch,
        "kernel_version": kernel_version,
        "kernel_format": arch.kernel_format,
        "packages": dict(sorted(inputs.packages.items())),
        "stubbed_packages": sorted(arch.stubs),
        "agent_sha256": inputs.agent_sha256,
        "init_sha256": inputs.init_sha256 or inputs.agent_sha256,
        "preload_sha256": inputs.preload_sha256,
        "recipe_sha256": inputs.recipe_sha256,
        "modules_boot": [module_name(path) for path in boot_order],
        "modules_load_order": [module_name(path) for path in load_order],
        "initramfs_compression": settings.compress,
    }
    write_file(root / "etc/vmic/manifest.json", json.dumps(manifest, indent=2) + "\n")
    make_initramfs(root, staging_out / "initramfs", mtime_clamp, settings.compress)
    manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    manifest["initramfs_bytes"] = (staging_out / "initramfs").stat().st_size
    manifest["kernel_bytes"] = (staging_out / "kernel").stat().st_size
    write_file(staging_out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    finalize_output(staging_out, out_dir)


# --------------------------------------------------------------------------------------------
# Agent


def build_agent(arch: ArchSettings) -> Path:
    log(f"{arch.arch}: cargo build --release -p vmic-guest-agent --target {arch.rust_target}")
    run(["cargo", "build", "--release", "--quiet", "-p", "vmic-guest-agent",
         "--target", arch.rust_target], cwd=REPO_ROOT, capture=False)
    metadata = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                              cwd=REPO_ROOT))
    agent = Path(metadata["target_directory"]) / arch.rust_target / "release" / AGENT_BIN
    if not agent.is_file():
        raise BuildError(f"cargo did not produce {agent}")
    return agent


def build_preload(arch: ArchSettings) -> Path:
    """The shared object of guest-agent/preload (its own cargo workspace: no_std, panic=abort),
    in a directory of the main target directory."""
    crate = REPO_ROOT / "guest-agent" / "preload"
    metadata = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                              cwd=REPO_ROOT))
    target_dir = Path(metadata["target_directory"]) / "preload"
    log(f"{arch.arch}: cargo build --release --target {arch.rust_target} (guest-agent/preload)")
    # cwd: its .cargo/config.toml drops the musl targets' static C runtime.
    run(["cargo", "build", "--release", "--quiet", "--locked", "--target", arch.rust_target,
         "--target-dir", str(target_dir)], cwd=crate, capture=False)
    preload = target_dir / arch.rust_target / "release" / "libvmic_preload.so"
    if not preload.is_file():
        raise BuildError(f"cargo did not produce {preload}")
    return preload


# --------------------------------------------------------------------------------------------
# apt with a private configuration


@dataclass
class BuildInputs:
    arch: str
    recipe_sha256: str
    packages: dict[str, str]
    agent_sha256: str
    preload_sha256: str
    init_sha256: str | None
    compress: str

    def key(self) -> str:
        lines = [f"vmic-guest-image {FORMAT_VERSION}", f"arch {self.arch}",
                 f"recipe {self.recipe_sha256}", f"agent {self.agent_sha256}",
                 f"preload {self.preload_sha256}",
                 f"init {self.init_sha256 or 'agent'}", f"compress {self.compress}"]
        lines += [f"package {name}={version}" for name, version in sorted(self.packages.items())]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


class PrivateApt:
    """apt-get for a foreign architecture with its own lists, cache and (fake) dpkg status."""

    def __init__(self, base: Path, arch: ArchSettings, debian: dict):
        self.base = base
        self.arch = arch
        self.debian = debian
        self.env = dict(os.environ, APT_CONFIG=str(base / "apt.conf"), LC_ALL="C",
                        DEBIAN_FRONTEND="noninteractive")

    def prepare(self, stubs: list[str]) -> None:
        for sub in ["etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d",
                    "state/lists/partial", "cache/archives/partial", "log"]:
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        write_file(self.base / "etc/sources.list", "")
        write_file(self.base / "etc/sources.list.d/debian.sources", self.sources())
        write_file(self.base / "state/status", "".join(
            f"Package: {name}\nStatus: install ok installed\nVersion: 99:0-stub\n"
            f"Architecture: {self.arch.debian_arch}\nMulti-Arch: allowed\nMaintainer: vmic\n"
            f"Description: stub: never run in the vmic builder VM\n\n" for name in stubs))
        b = self.base
        config = [
            'Dir::Etc::main "/dev/null";',
            f'Dir::Etc::parts "{b}/etc/apt.conf.d";',
            f'Dir::Etc::preferences "{b}/etc/preferences";',
            f'Dir::Etc::preferencesparts "{b}/etc/preferences.d";',
            f'Dir::Etc::sourcelist "{b}/etc/sources.list";',
            f'Dir::Etc::sourceparts "{b}/etc/sources.list.d";',
            f'Dir::State "{b}/state";',
            f'Dir::State::status "{b}/state/status";',
            f'Dir::Cache "{b}/cache";',
            f'Dir::Log "{b}/log";',
            f'APT::Architecture "{self.arch.debian_arch}";',
            f'APT::Architectures {{ "{self.arch.debian_arch}"; }};',
            'APT::Install-Recommends "false";',
            'APT::Install-Suggests "false";',
            'Acquire::Languages "none";',
            'Binary::apt::APT::Keep-Downloaded-Packages "true";',
        ]
        if os.geteuid() == 0:
            # The private dirs are not reachable by _apt; don't try to drop privileges.
            config.append('APT::Sandbox::User "root";')
        write_file(self.base / "apt.conf", "\n".join(config) + "\n")

    def sources(self) -> str:
        main_uri, security_uri, keyring = host_debian_mirror()
        components = " ".join(self.debian["components"])
        stanzas = [(main_uri, self.debian["suites"]), (security_uri, self.debian["security_suites"])]
        return "\n".join(
            f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: {components}\n"
            f"Signed-By: {keyring}\n" for uri, suites in stanzas)

    def update(self, force: bool) -> None:
        stamp = self.base / "state/updated"
        sources_changed = (not stamp.exists()
                           or stamp.read_text() != (self.base / "apt.conf").read_text()
                           + (self.base / "etc/sources.list.d/debian.sources").read_text())
        max_age = self.debian["lists_max_age_hours"] * 3600
        if not force and not sources_changed and time.time() - stamp.stat().st_mtime < max_age:
            return
        log(f"{self.arch.arch}: apt-get update ({self.arch.debian_arch})")
        try:
            run(["apt-get", "update", "-q"], env=self.env)
        except BuildError as error:
            if sources_changed or force:
                raise
            # Offline: the old lists still resolve, and usually to a cached image.
            log(f"{self.arch.arch}: apt-get update failed, using the lists of "
                f"{time.ctime(stamp.stat().st_mtime)}:\n{error}")
            return
        write_file(stamp, (self.base / "apt.conf").read_text()
                   + (self.base / "etc/sources.list.d/debian.sources").read_text())

    def resolve(self, packages: list[str]) -> dict[str, str]:
        """name -> version of every package that would be unpacked (the cache key's input)."""
        output = run(["apt-get", "install", "--simulate", "--no-install-recommends", *packages],
                     env=self.env)
        resolved = {}
        for line in output.splitlines():
            match = re.match(r"Inst (\S+) (?:\[\S+\] )?\((\S+) ", line)
            if match:
                resolved[match.group(1).split(":")[0]] = match.group(2)
        if not resolved:
            raise BuildError(f"apt resolved no packages:\n{output}")
        return resolved

    def download(self, packages: list[str], resolved: dict[str, str]) -> list[Path]:
        wanted = sorted(resolved.items())
        if not all(self.cached_deb(name, version) for name, version in wanted):
            log(f"{self.arch.arch}: downloading .debs")
            run(["apt-get", "install", "--download-only", "-y", "-q", "--no-install-recommends",
                 *packages], env=self.env)
            # Drops the .debs of versions the mirror no longer has (older kernels, ...).
            run(["apt-get", "autoclean", "-q"], env=self.env)
        debs = []
        for name, version in wanted:
            deb = self.cached_deb(name, version)
            if deb is None:
                raise BuildError(f"apt did not download {name} {version}")
            debs.append(deb)
        return debs

    def cached_deb(self, name: str, version: str) -> Path | None:
        """The .deb in apt's archive cache (named name_version_arch.deb, ':' escaped)."""
        for arch in [self.arch.debian_arch, "all"]:
            deb = self.base / "cache/archives" / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
            if deb.is_file():
                return deb
        return None


def host_debian_mirror() -> tuple[str, str, str]:
    """(main URI, security URI, keyring) of the machine's Debian sources, env overrides first."""
    main_uri = security_uri = None
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            uri = fields.get("URIs", "").split()
            if not uri:
                continue
            if "security" in fields.get("Suites", ""):
                security_uri = security_uri or uri[0]
            else:
                main_uri = main_uri or uri[0]
            if fields.get("Signed-By", "").startswith("/"):
                keyring = fields["Signed-By"].strip()
    main_uri = os.environ.get("VMIC_DEBIAN_MIRROR") or main_uri or "http://deb.debian.org/debian"
    security_uri = (os.environ.get("VMIC_DEBIAN_SECURITY_MIRROR") or security_uri
                    or "http://deb.debian.org/debian-security")
    return main_uri, security_uri, keyring


# --------------------------------------------------------------------------------------------
# Staging tree


def unpack_debs(debs: list[Path], root: Path) -> None:
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)])


def newest_mtime(root: Path) -> int:
    """Newest mtime among the packages' files: every cpio entry is clamped to it (reproducible)."""
    newest = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            newest = max(newest, int(os.lstat(os.path.join(dirpath, name)).st_mtime))
    return newest


def merge_usr(root: Path) -> None:
    """Moves /bin, /sbin, /lib* into /usr and leaves symlinks, as Debian's usrmerge does."""
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"]:
        source = root / top
        if source.is_symlink() or not source.is_dir():
            continue
        absolutize_symlinks(root, source)
        merge_dir(source, root / "usr" / top)
        source.rmdir()
        source.symlink_to(f"usr/{top}")


def absolutize_symlinks(root: Path, tree: Path) -> None:
    """Relative symlinks under a directory that is about to move would point elsewhere."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = os.readlink(path)
                if not target.startswith("/"):
                    inside = os.path.normpath(Path("/") / path.parent.relative_to(root) / target)
                    path.unlink()
                    path.symlink_to(inside)


def merge_dir(source: Path, dest: Path) -> None:
    if not dest.exists() and not dest.is_symlink():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, dest)
        source.mkdir()  # the caller removes it
        return
    for entry in sorted(source.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_symlink():
                target.unlink()
            merge_dir(entry, target)
            entry.rmdir()
        elif not target.exists() and not target.is_symlink():
            os.rename(entry, target)
        elif target.is_symlink() and not entry.is_symlink():
            os.replace(entry, target)  # /usr had only a compatibility link
        else:
            entry.unlink()  # /usr already has the real thing


def find_kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "usr/lib/modules").iterdir())
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in the packages, found {versions}")
    return versions[0]


def make_kernel(root: Path, version: str, arch: ArchSettings, out: Path) -> None:
    image = (root / "boot" / f"vmlinuz-{version}").read_bytes()
    config = root / "boot" / f"config-{version}"
    if config.is_file():
        shutil.copyfile(config, out / "kernel.config")
    if arch.kernel_format == "vmlinux":
        kernel = extract_vmlinux(image)
    elif arch.kernel_format == "Image":
        kernel = gzip.decompress(image) if image[:2] == b"\x1f\x8b" else image
        if kernel[0x38:0x3C] != b"ARM\x64":
            raise BuildError("the arm64 kernel is not an Image (no ARM\\x64 magic)")
    else:
        raise BuildError(f"unknown kernel_format {arch.kernel_format}")
    (out / "kernel").write_bytes(kernel)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF inside a bzImage: QEMU boots it through PVH, skipping the decompressor (several
    seconds under TCG). The payload is located by the boot protocol header; its last 4 bytes
    are the uncompressed size the kernel's build appends."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise BuildError("the x86 kernel is not a bzImage")
    setup_sectors = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length - 4]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.decompress(payload)
    elif payload.startswith(b"\x02\x21\x4c\x18"):  # lz4 legacy frame (Debian cloud kernels)
        elf = decompress_with(["lz4", "-dc"], payload, package="lz4")
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        elf = decompress_with(["zstd", "-dc"], payload, package="zstd")
    else:
        raise BuildError(f"unknown bzImage payload compression (magic {payload[:4].hex()})")
    if elf[:4] != b"\x7fELF":
        raise BuildError("the bzImage payload is not an ELF")
    return elf


def decompress_with(argv: list[str], data: bytes, package: str) -> bytes:
    if not shutil.which(argv[0]):
        raise BuildError(f"{argv[0]} not found (hint: apt-get install {package})")
    result = subprocess.run(argv, input=data, capture_output=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed: {result.stderr.decode().strip()}")
    return result.stdout


def select_modules(root: Path, version: str, boot: list[str],
                   on_demand: list[str]) -> tuple[list[str], list[str]]:
    """Keeps the wanted modules and their dependencies, deletes the others. Returns the in-guest
    paths in load order (dependencies first) of the boot modules and of all of them, also
    written to /etc/vmic/modules.boot and /etc/vmic/modules.order."""
    for tool in ["depmod", "modprobe"]:
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found (hint: apt-get install kmod)")
    run(["depmod", "-b", str(root), version])
    boot_order = module_load_order(root, version, boot, [])
    order = module_load_order(root, version, on_demand, boot_order)

    keep = {os.path.realpath(str(root) + path) for path in order}
    for dirpath, dirnames, filenames in os.walk(root / "usr/lib/modules" / version / "kernel",
                                                topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.realpath(path) not in keep:
                os.unlink(path)
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    run(["depmod", "-b", str(root), version])

    write_file(root / "etc/vmic/modules.boot", "".join(p + "\n" for p in boot_order))
    write_file(root / "etc/vmic/modules.order", "".join(p + "\n" for p in order))
    return boot_order, order


def module_load_order(root: Path, version: str, names: list[str], order: list[str]) -> list[str]:
    """Appends to a copy of order the modules (and dependencies) that names need, as
    /lib/modules/<version>/... paths, dependencies first."""
    order = list(order)
    with tempfile.TemporaryDirectory() as no_config:
        for name in names:
            optional = name.endswith("?")
            name = name.removesuffix("?")
            argv = ["modprobe", "-C", no_config, "-d", str(root), "-S", version,
                    "--show-depends", name]
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                if optional:
                    log(f"optional module {name} is not in kernel {version}: skipped")
                    continue
                raise BuildError(f"kernel {version} has no module {name}: "
                                 f"{result.stderr.strip()}")
            for line in result.stdout.splitlines():
                if line.startswith("insmod "):
                    # modprobe prints <root>/lib/modules/...: /lib links to usr/lib.
                    path = "/" + str(Path(line.split()[1]).relative_to(root))
                    path = re.sub(r"^/usr/lib/modules/", "/lib/modules/", path)
                    if path not in order:
                        order.append(path)
                elif not line.startswith("builtin "):
                    raise BuildError(f"modprobe --show-depends {name}: {line}")
    return order


def module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def install_busybox_links(root: Path) -> None:
    """Links busybox's applets into /usr/bin where no real command of that name exists.
    The applet list is read from the binary (it may be a foreign arch we cannot run)."""
    busybox = root / "usr/bin/busybox"
    data = busybox.read_bytes()
    start = data.find(b"[\x00[[\x00")
    if start < 0:
        raise BuildError("cannot find the applet table in busybox")
    applets = data[start:data.index(b"\x00\x00", start)].decode().split("\x00")
    if not {"sh", "mount", "ls", "cp", "poweroff"} <= set(applets):
        raise BuildError(f"unexpected busybox applet table: {applets[:10]}...")
    for applet in applets:
        if not any((root / "usr" / d / applet).exists() or (root / "usr" / d / applet).is_symlink()
                   for d in ["bin", "sbin"]):
            (root / "usr/bin" / applet).symlink_to("busybox")


def prune_tree(root: Path, patterns: list[str], keep: list[str]) -> None:
    for pattern in patterns:
        for path in root.glob(pattern):
            relative = str(path.relative_to(root))
            if any(fnmatch.fnmatchcase(relative, k) for k in keep):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def make_base_files(root: Path, agent: Path, preload: Path, init: Path | None) -> None:
    for name, mode in [("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755),
                       ("tmp", 0o1777), ("var/tmp", 0o1777), ("mnt", 0o755), ("root", 0o700),
                       ("etc/vmic", 0o755)]:
        (root / name).mkdir(parents=True, exist_ok=True)
        os.chmod(root / name, mode)
    write_file(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write_file(root / "etc/group", "root:x:0:\n")
    write_file(root / "etc/hostname", "vmic-builder\n")
    for link, target in [("etc/mtab", "../proc/self/mounts"), ("var/run", "../run")]:
        (root / link).unlink(missing_ok=True)
        (root / link).symlink_to(target)
    agent_path = root / "usr/bin" / AGENT_BIN
    shutil.copyfile(agent, agent_path)
    os.chmod(agent_path, 0o755)
    (root / PRELOAD_PATH).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(preload, root / PRELOAD_PATH)
    os.chmod(root / PRELOAD_PATH, 0o644)
    if init is None:
        (root / "init").symlink_to(f"usr/bin/{AGENT_BIN}")
    else:
        shutil.copyfile(init, root / "init")
        os.chmod(root / "init", 0o755)


# --------------------------------------------------------------------------------------------
# ELF check: every dynamic executable and library finds its interpreter and libraries.


def elf_dependencies(path: Path) -> tuple[str | None, list[str]] | None:
    """(PT_INTERP, DT_NEEDED) of a 64-bit little-endian ELF, None if it is not one."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        e_type, = struct.unpack_from("<H", head, 16)
        if e_type not in (2, 3):  # executables and shared objects only
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        headers = [struct.unpack_from("<IIQQQQQQ", f.read(phentsize)) for _ in range(phnum)]
        interp = None
        loads = [h for h in headers if h[0] == 1]
        needed_offsets, strtab = [], None
        for p_type, _, p_offset, _, _, p_filesz, _, _ in headers:
            if p_type == 3:
                f.seek(p_offset)
                interp = f.read(p_filesz).rstrip(b"\x00").decode()
            elif p_type == 2:
                f.seek(p_offset)
                dynamic = f.read(p_filesz)
                for i in range(0, len(dynamic) - 15, 16):
                    tag, value = struct.unpack_from("<qQ", dynamic, i)
                    if tag == 0:
                        break
                    if tag == 1:
                        needed_offsets.append(value)
                    elif tag == 5:
                        strtab = value
        needed = []
        if strtab is not None:
            for _, _, p_offset, p_vaddr, _, p_filesz, _, _ in loads:
                if p_vaddr <= strtab < p_vaddr + p_filesz:
                    base = strtab - p_vaddr + p_offset
                    for offset in needed_offsets:
                        f.seek(base + offset)
                        needed.append(f.read(256).split(b"\x00")[0].decode())
                    break
        return interp, needed


def check_shared_libraries(root: Path) -> None:
    library_dirs = [d for d in (root / "usr/lib").glob("*-linux-gnu") if d.is_dir()]
    library_dirs += [root / "usr/lib"]
    libraries = {p.name for d in library_dirs for p in d.iterdir()}
    missing = []
    for dirpath, dirnames, filenames in os.walk(root / "usr"):
        if "/lib/modules/" in dirpath + "/" or "/lib/grub/" in dirpath + "/":
            continue
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            info = elf_dependencies(path)
            if info is None:
                continue
            interp, needed = info
            if interp and not in_root_exists(root, interp):
                missing.append(f"{path.relative_to(root)}: interpreter {interp}")
            missing += [f"{path.relative_to(root)}: {lib}" for lib in needed
                        if lib not in libraries and not (path.parent / lib).exists()]
    if missing:
        raise BuildError("shared libraries missing (a stubbed package? prune the binary):\n  "
                         + "\n  ".join(missing))


def in_root_exists(root: Path, path: str) -> bool:
    """Whether an absolute in-guest path exists, following symlinks inside the root."""
    current = "/"
    parts = [p for p in path.split("/") if p]
    for _ in range(64):
        if not parts:
            return os.path.lexists(str(root) + current)
        part = parts.pop(0)
        candidate = os.path.normpath(os.path.join(current, part))
        host = str(root) + candidate
        if os.path.islink(host):
            target = os.readlink(host)
            base = "/" if target.startswith("/") else current
            parts = [p for p in os.path.normpath(os.path.join(base, target)).split("/") if p] + parts
            current = "/"
        elif os.path.lexists(host):
            current = candidate
        else:
            return False
    return False


# --------------------------------------------------------------------------------------------
# Initramfs: newc cpio written here, so no root is needed for ownership or /dev/console


def make_initramfs(root: Path, dest: Path, mtime_clamp: int, compress: str) -> None:
    raw = dest if compress == "none" else dest.with_suffix(".cpio")
    with open(raw, "wb") as out:
        CpioWriter(out, mtime_clamp).write_tree(root)
    if compress == "zstd":
        run(["zstd", "-q", "-19", "-T0", "--rm", "-f", str(raw), "-o", str(dest)])
    elif compress == "gzip":
        run(["gzip", "-9", "-n", "-f", str(raw)])
        os.rename(str(raw) + ".gz", dest)


class CpioWriter:
    def __init__(self, out, mtime_clamp: int):
        self.out = out
        self.mtime_clamp = mtime_clamp
        self.next_inode = 1

    def write_tree(self, root: Path) -> None:
        entries = []  # (name, lstat)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                entries.append((os.path.relpath(path, root), path, os.lstat(path)))
            if dirpath == str(root):
                # the console the kernel opens for /init's stdin/stdout/stderr
                entries.append(("dev/console", None, None))
        # Hard links: every name shares one inode number, the data goes with the last one.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (_, _, st) in enumerate(entries):
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append(index)
        inode_of: dict[tuple[int, int], int] = {}
        last_of_group = {members[-1] for members in groups.values()}
        for index, (name, path, st) in enumerate(entries):
            if st is None:
                self.entry(name, stat.S_IFCHR | 0o600, 1, 0, rdev=(5, 1))
                continue
            mode = st.st_mode
            key = (st.st_dev, st.st_ino)
            links = len(groups.get(key, [])) or 1
            if key in groups:
                inode = inode_of.setdefault(key, self.take_inode())
            else:
                inode = self.take_inode()
            if stat.S_ISDIR(mode):
                self.entry(name, mode, 2, 0, inode=inode)
            elif stat.S_ISLNK(mode):
                self.entry(name, mode, 1, 0, inode=inode, data=os.readlink(path).encode())
            elif stat.S_ISREG(mode):
                carries_data = key not in groups or index in last_of_group
                size = st.st_size if carries_data else 0
                self.entry(name, mode, links, size, inode=inode, mtime=int(st.st_mtime),
                           source=path if carries_data else None)
            else:
                raise BuildError(f"unexpected file type in the tree: {path}")
        self.entry("TRAILER!!!", 0, 1, 0, inode=0)

    def take_inode(self) -> int:
        self.next_inode += 1
        return self.next_inode

    def entry(self, name: str, mode: int, nlink: int, size: int, *, inode: int | None = None,
              mtime: int | None = None, data: bytes | None = None, source: str | None = None,
              rdev: tuple[int, int] = (0, 0)) -> None:
        if data is not None:
            size = len(data)
        encoded = name.encode() + b"\x00"
        mtime = min(mtime if mtime is not None else self.mtime_clamp, self.mtime_clamp)
        fields = [inode if inode is not None else self.take_inode(), mode, 0, 0, nlink, mtime,
                  size, 0, 0, rdev[0], rdev[1], len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + encoded + padding(len(header) + len(encoded)))
        if data is not None:
            self.out.write(data)
        elif source is not None:
            with open(source, "rb") as f:
                shutil.copyfileobj(f, self.out, 1 << 20)
        self.out.write(padding(size))


def padding(length: int) -> bytes:
    return b"\x00" * (-length % 4)


# --------------------------------------------------------------------------------------------
# Output


def write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def finalize_output(staging_out: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)  # --force
    os.rename(staging_out, out_dir)


def point_link(link: Path, target: Path) -> None:
    """Atomically repoints link -> target (a relative link inside the guest dir)."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target.name)
    os.replace(temporary, link)


def remove_old_builds(guest_dir: Path, arch: str, keep: Path) -> None:
    current = guest_dir / arch
    pinned = {keep.name, os.readlink(current) if current.is_symlink() else ""}
    builds = sorted((p for p in guest_dir.glob(f"{arch}-*") if p.is_dir()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS_PER_ARCH:]:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
