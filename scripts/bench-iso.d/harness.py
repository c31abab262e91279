#!/usr/bin/env python3
"""The measuring half of scripts/bench-iso (which installs what is needed, then runs this).

For each arch: the x86_64/aarch64 minimal test image (qcow2), converted to a LiveOS ISO N times
by the native-root baseline (baseline.sh), N times by `vmic customize`, and N times by the
baseline with vmic's squashfs compression (read from vmic's log; for information), interleaved. Each
run is one child process (own session) whose whole process tree is watched: the sum of VmRSS
(and of Pss) every 0.2 s, and the allocated bytes (st_blocks * 512, hard links once, not
crossing mount points) of its build dir every ~0.5 s. Results: stdout, target/bench-iso.md,
target/bench-iso/results.json and the bench-iso section of docs/benchmarks.md.

--scaling MB,MB,... (x86_64 only): instead, the minimal image with that many MiB of filler
(`make-test-image --filler-mb`; 0 = the plain image), each converted by `vmic customize` N times
(sizes interleaved), against the issue's scaling criteria: a table and the checks in the
bench-iso-scaling section of docs/benchmarks.md, a plot in docs/bench-scaling.svg (hand-written
SVG), target/bench-iso-scaling.md and target/bench-iso/scaling-results.json.
--selftest-plot DIR: the scaling table, plot and doc update from made-up numbers, into DIR
(no VM, no root; docs/ is only read).
"""

import argparse
import datetime
import json
import math
import os
import re
import resource
import signal
import stat
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "target" / "bench-iso"
BASELINE = REPO / "scripts" / "bench-iso.d" / "baseline.sh"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-iso:begin -->", "<!-- bench-iso:end -->"
SCALING_BEGIN = "<!-- bench-iso-scaling:begin -->"
SCALING_END = "<!-- bench-iso-scaling:end -->"
PLOT = REPO / "docs" / "bench-scaling.svg"
MIB = 1 << 20
GIB = 1 << 30
# The scaling criteria (issue 13, "Scaling"): host peak RSS flat = max/min over the sizes at
# most RSS_FLAT; peak build-dir disk at most DISK_SHARE × (input used + ISO). MARGINAL_GROWTH:
# the stricter look at linearity (info): the last interval's seconds per added GiB at most this
# times the first interval's.
RSS_FLAT = 1.15
DISK_SHARE = 0.5
MARGINAL_GROWTH = 1.25

# The customization both pipelines apply (vmic reads it as config.yaml, the baseline as flags).
HOSTNAME = "vmic-bench"
EXTRA_FILE_DEST = "/etc/vmic-bench/extra.txt"
EXTRA_ARG = "vmic.bench=1"
RSS_INTERVAL = 0.2
DISK_INTERVAL = 0.5


class BenchError(Exception):
    pass


def log(message):
    print(f"==> {message}", file=sys.stderr, flush=True)


# --- watching a process tree ---------------------------------------------------------------


def process_tree(root_pid):
    """PIDs of root_pid and all its descendants, from /proc/*/stat."""
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = data[data.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def kib_field(path, key):
    """The kB value of `key:` in a /proc file, 0 when absent or gone."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def allocated_bytes(root):
    """Allocated bytes under root on root's file system; hard-linked files counted once."""
    try:
        device = os.lstat(root).st_dev
    except FileNotFoundError:
        return 0
    total, seen, stack = 0, set(), [root]
    while stack:
        try:
            iterator = os.scandir(stack.pop())
        except OSError:
            continue
        with iterator:
            for entry in iterator:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != device:  # a mount point: the mounted image, /dev bound in
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


class Watcher:
    """Samples a process tree's memory and a build dir's disk use until stopped."""

    def __init__(self, pid, build_dir):
        self.pid, self.build_dir = pid, build_dir
        self.peak_rss = self.peak_pss = self.peak_disk = 0
        self.disk_samples = self.rss_samples = 0
        self.max_disk_scan = 0.0
        self.qemu_argv = None  # the builder VM's command line, when the tree has one
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self.watch_memory, daemon=True),
            threading.Thread(target=self.watch_disk, daemon=True),
        ]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def watch_memory(self):
        while not self.stopped.is_set():
            rss = pss = 0
            for pid in process_tree(self.pid):
                if self.qemu_argv is None:
                    self.qemu_argv = qemu_argv(pid)
                rss += kib_field(f"/proc/{pid}/status", b"VmRSS:")
                pss += kib_field(f"/proc/{pid}/smaps_rollup", b"Pss:")
            self.peak_rss = max(self.peak_rss, rss * 1024)
            self.peak_pss = max(self.peak_pss, pss * 1024)
            self.rss_samples += 1
            self.stopped.wait(RSS_INTERVAL)

    def watch_disk(self):
        while not self.stopped.is_set():
            started = time.monotonic()
            self.peak_disk = max(self.peak_disk, allocated_bytes(self.build_dir))
            scan = time.monotonic() - started
            self.max_disk_scan = max(self.max_disk_scan, scan)
            self.disk_samples += 1
            # A big tree (the baseline's rootfs copy) takes a while to walk: keep the walker
            # under about a third of one core so it does not slow down what it measures.
            self.stopped.wait(max(DISK_INTERVAL - scan, 2 * scan))


def qemu_argv(pid):
    """The argv of pid if it is a qemu-system-* VM (vmic also runs it for `--version` and its
    accelerator probe, which have no -smp), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if argv and os.path.basename(argv[0]).startswith("qemu-system-") and "-smp" in argv:
        return argv
    return None


def vm_size(argv):
    """'2 vCPUs, 4096 MiB' from a QEMU argv (-smp N[,...], -m SIZE[M|G])."""
    if not argv:
        return "unknown"
    options = dict(zip(argv, argv[1:]))
    cpus = options.get("-smp", "?").split(",")[0].replace("cpus=", "")
    memory = options.get("-m", "?").split(",")[0].replace("size=", "")
    if memory.upper().endswith("G"):
        memory = str(int(float(memory[:-1]) * 1024))
    memory = memory.rstrip("Mm")
    return f"{cpus} vCPUs, {memory} MiB"


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def mounts_below(path):
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if (line.split()[4] + "/").startswith(prefix)]


def remove_tree(path):
    """rm -rf a build dir, refusing while anything is mounted below it."""
    if not path.exists():
        return
    mounted = mounts_below(path)
    if mounted:
        raise BenchError(f"still mounted below {path}: {', '.join(mounted)}; not removing it")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def measure(argv, build_dir, log_path, env=None):
    """Run argv (own session, output to log_path) while watching it. Returns a result dict."""
    remove_tree(build_dir)
    build_dir.mkdir(parents=True)
    load = load_average()
    with open(log_path, "wb") as log_file:
        busy_before = busy_cpu_seconds()
        own_before = cpu_seconds(resource.RUSAGE_CHILDREN)
        watch_before = cpu_seconds(resource.RUSAGE_SELF)
        started = time.monotonic()
        child = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        try:
            with Watcher(child.pid, build_dir) as watcher:
                code = child.wait()
        except BaseException:
            # Ctrl-C: the child's own traps release loop devices, mounts, QEMU.
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            raise
        wall = time.monotonic() - started
        # The run's own CPU (its waited-for process tree), the watcher's, everyone else's.
        own = cpu_seconds(resource.RUSAGE_CHILDREN) - own_before
        watch = cpu_seconds(resource.RUSAGE_SELF) - watch_before
        others = max(0.0, busy_cpu_seconds() - busy_before - own - watch)
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise BenchError(f"{argv[0]} exited {code}; log {log_path}:\n" + "\n".join(tail))
    remove_tree(build_dir)
    return {
        "wall": wall, "load": load, "cpu": own, "watcher_cpu": watch,
        "others_cores": others / wall,
        "peak_disk": watcher.peak_disk,
        "peak_rss": watcher.peak_rss, "peak_pss": watcher.peak_pss,
        "disk_samples": watcher.disk_samples, "rss_samples": watcher.rss_samples,
        "max_disk_scan": watcher.max_disk_scan, "vm": vm_size(watcher.qemu_argv),
    }


# --- the two pipelines ---------------------------------------------------------------------


def write_config(directory):
    """The vmic config and its additional file; the baseline gets the same as flags."""
    files = directory / "files"
    files.mkdir(parents=True, exist_ok=True)
    extra = files / "extra.txt"
    extra.write_text("added by scripts/bench-iso\n")
    config = directory / "config.yaml"
    config.write_text(
        "# Written by scripts/bench-iso: the customization both pipelines apply.\n"
        f"os:\n  hostname: {HOSTNAME}\n"
        f"  additionalFiles:\n    files/extra.txt: {EXTRA_FILE_DEST}\n"
        f"iso:\n  kernelCommandLine:\n    extraCommandLine: [{EXTRA_ARG}]\n"
    )
    return config, extra


def write_rebuild_config(config):
    """The same config with only its ISO kernel arg changed: a build cache hit."""
    rebuild = config.with_name("config-rebuild.yaml")
    # One argument per list entry (an entry with a space is refused, as AzL-IC refuses it).
    rebuild.write_text(config.read_text().replace(EXTRA_ARG, EXTRA_ARG + ", vmic.rebuild=1"))
    return rebuild


def test_image(arch):
    images = Path(os.environ.get("VMIC_TEST_IMAGES_DIR", REPO / "target" / "test-images"))
    out = images / f"{arch}-minimal"
    log(f"test image {out} (built if missing; cached otherwise)")
    # The formats scripts/test asks for (part of the cache key: another set would rebuild the
    # image and evict the tests' build).
    formats = "raw,qcow2,vhd,vhdx" if arch == "x86_64" else "qcow2"
    subprocess.run(
        [str(REPO / "scripts" / "make-test-image"), "--arch", arch, "--variant", "minimal",
         "--formats", formats, "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    disk = out / "disk.qcow2"
    if not disk.is_file():
        raise BenchError(f"make-test-image left no {disk}")
    return disk


# The pipelines, in the order the tables list them. The second is the baseline with vmic's
# squashfs compression: not the Azure Linux Image Customizer way, but like for like.
PIPELINES = {
    "baseline": "native root (baseline)",
    "baseline-vmic-comp": "native root, vmic's squashfs compression (info)",
    "vmic": "vmic",
    "vmic-rebuild": "vmic, rebuild with only the ISO arg changed (build cache hit)",
}


def run_baseline(arch, disk, extra, out_dir, run, name="baseline", squashfs=None):
    iso = out_dir / f"{name}.iso"
    times = out_dir / f"{name}-steps-{run}.tsv"
    argv = ["bash", str(BASELINE), "--arch", arch, "--input", str(disk),
            "--build-dir", str(out_dir / f"{name}-build"), "--output", str(iso),
            "--times", str(times), "--hostname", HOSTNAME,
            "--file", f"{extra}:{EXTRA_FILE_DEST}", "--extra-arg", EXTRA_ARG]
    if squashfs:
        compression, level = squashfs
        argv += ["--squashfs-comp", compression]
        if level is not None:
            argv += ["--squashfs-level", str(level)]
    result = measure(argv, out_dir / f"{name}-build", WORK / "logs" / f"{arch}-{name}-{run}.log")
    steps, notes = [], []
    for line in times.read_text().splitlines():
        name, value = line.split("\t", 1)
        if name == "#note":
            notes.append(value)
        else:
            steps.append((name, float(value)))
    result.update(steps=steps, notes=notes, iso_size=iso.stat().st_size)
    return result


def run_vmic(arch, disk, config, out_dir, run, vmic, guest_image_dir, name="vmic", tag=""):
    """A vmic build with this run's own, initially empty, build cache: `vmic` misses and
    stores, `vmic-rebuild` (only the ISO arg changed) then hits. tag: in the log's name."""
    iso = out_dir / f"{name}.iso"
    timestamps = out_dir / f"{name}-timestamps-{run}.json"
    cache = out_dir / f"cache-{run}"
    if name == "vmic":
        remove_tree(cache)
    argv = [str(vmic), "customize", "--image-file", str(disk), "--config-file", str(config),
            "--build-dir", str(out_dir / "vmic-build"), "--output-image-file", str(iso),
            "--output-image-format", "iso", "--arch", arch, "--accel", "tcg",
            "--timestamp-file", str(timestamps), "--cache-dir", str(cache)]
    log_path = WORK / "logs" / f"{arch}{tag}-{name}-{run}.log"
    env = None
    if guest_image_dir is not None:
        env = dict(os.environ, VMIC_GUEST_IMAGE_DIR=str(guest_image_dir))
    result = measure(argv, out_dir / "vmic-build", log_path, env)
    text = log_path.read_text(errors="replace")
    expected = "build cache: hit" if name == "vmic-rebuild" else "build cache: miss"
    if expected not in text:
        raise BenchError(f"{log_path}: no {expected!r}")
    compression = re.search(r"squashfs compression: (.*)", text)
    document = json.loads(timestamps.read_text())
    result.update(
        steps=[(s["step"], float(s["seconds"])) for s in document["steps"]],
        total_seconds=document["totalSeconds"], iso_size=iso.stat().st_size,
        squashfs=parse_squashfs(compression.group(1)) if compression else None,
        notes=[f"mksquashfs {squashfs_text(compression.group(1))}"] if compression else [],
        # A builder VM whose agent was never reached is replaced (vm.rs): its cost is in the
        # wall time, and the table says so.
        restarts=text.count("starting the builder VM once more"),
    )
    return result


def parse_squashfs(debug):
    """`Zstd { level: Some(3) }` (vmic's log) → ("zstd", 3); `Gzip` → ("gzip", None)."""
    found = re.match(r"\s*(\w+)(?:\s*\{\s*level:\s*Some\((\d+)\))?", debug)
    if not found:
        return None
    return found.group(1).lower(), int(found.group(2)) if found.group(2) else None


def squashfs_text(debug):
    """`Zstd { level: Some(3) }` (vmic's log) → `zstd -Xcompression-level 3`."""
    found = re.match(r"\s*(\w+)\s*\{\s*level:\s*Some\((\d+)\)", debug)
    if found:
        return f"{found.group(1).lower()} -Xcompression-level {found.group(2)}"
    return debug.strip().lower()


def check_iso(iso, arch, pipeline):
    """Both ISOs carry the customization: hostname, the file, the kernel arg. Not timed."""
    scratch = WORK / "check"
    subprocess.run(["rm", "-rf", str(scratch)], check=True)
    scratch.mkdir(parents=True)
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"],
                             check=True, capture_output=True, text=True).stdout
    paths = [line.strip().strip("'") for line in listing.splitlines() if line.startswith("'")]
    squash = next((p for p in paths if p.lower().endswith("/rootfs.img")), None)
    grub = next((p for p in paths if p.endswith("/boot/grub2/grub.cfg")), None)
    if not squash or not grub:
        raise BenchError(f"{pipeline} ISO {iso}: no rootfs.img or /boot/grub2/grub.cfg")
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", squash,
                    str(scratch / "rootfs.img"), "-extract", grub, str(scratch / "grub.cfg")],
                   check=True, capture_output=True)

    def cat(path):
        return subprocess.run(["unsquashfs", "-cat", str(scratch / "rootfs.img"), path],
                              check=True, capture_output=True, text=True).stdout

    problems = []
    if cat("etc/hostname").strip() != HOSTNAME:
        problems.append("hostname")
    if "bench-iso" not in cat(EXTRA_FILE_DEST.lstrip("/")):
        problems.append("additional file")
    if EXTRA_ARG not in (scratch / "grub.cfg").read_text():
        problems.append("kernel arg")
    fstab = subprocess.run(["unsquashfs", "-lls", str(scratch / "rootfs.img"), "etc/fstab"],
                           capture_output=True, text=True).stdout
    if "etc/fstab" in fstab:
        problems.append("/etc/fstab still present")
    subprocess.run(["rm", "-rf", str(scratch)], check=True)
    if problems:
        raise BenchError(f"{arch} {pipeline} ISO {iso} lacks: {', '.join(problems)}")
    log(f"{arch} {pipeline} ISO checked: hostname, additional file, kernel arg, no /etc/fstab")


# --- summary -------------------------------------------------------------------------------


def median_steps(runs):
    order, values = [], {}
    for run in runs:
        for name, seconds in run["steps"]:
            if name not in values:
                order.append(name)
                values[name] = []
            values[name].append(seconds)
    return [(name, statistics.median(values[name])) for name in order]


def summarize(runs):
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "walls": [r["wall"] for r in runs],
        "loads": [r["load"] for r in runs],
        "others": [r["others_cores"] for r in runs],
        "restarts": [r.get("restarts", 0) for r in runs],
        "cpu": statistics.median(r["cpu"] for r in runs),
        "peak_disk": statistics.median(r["peak_disk"] for r in runs),
        "peak_rss": statistics.median(r["peak_rss"] for r in runs),
        "peak_pss": statistics.median(r["peak_pss"] for r in runs),
        "iso_size": runs[-1]["iso_size"],
        "steps": median_steps(runs),
        "notes": sorted({n for r in runs for n in r["notes"]}),
        "vm": sorted({r["vm"] for r in runs}),
    }


def mib(value):
    return f"{value / MIB:.0f}"


def ratio(a, b):
    return a / b if b else float("nan")


def machine(revision):
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "accelerator": "tcg",
        "qemu": qemu[0].replace("QEMU emulator version ", "") if qemu else "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": os.uname().release,
        "revision": revision,
    }


def target(ok):
    return "met" if ok else "**not met**"


def markdown(results, info, runs):
    arches = list(results)
    vm = ", ".join(sorted({v for a in arches for v in results[a]["vmic"]["vm"]}))
    vmic_squashfs = ", ".join(
        sorted({n.replace("mksquashfs ", "") for a in arches for n in results[a]["vmic"]["notes"]})
    ) or "its default compression"
    lines = [
        "## Disk → LiveOS ISO against the native-root pipeline (`scripts/bench-iso`)",
        "",
        "`scripts/bench-iso [--arch x86_64|aarch64|all] [--runs N]` (written by it; do not edit by "
        "hand). Input: the minimal test image (`disk.qcow2`); config: hostname, one "
        "`os.additionalFiles` entry, one `iso.kernelCommandLine` arg. **vmic**: `vmic customize "
        f"--output-image-format iso --accel tcg` at commit {info['revision']} (builder VM: {vm}, "
        f"its defaults; its mksquashfs runs in the guest with {vmic_squashfs}). **Baseline**: the same conversion natively as root, the "
        "Azure Linux Image Customizer way (`scripts/bench-iso.d/baseline.sh`): `qemu-img convert` "
        "to raw, loop devices, mount root + fstab, `cp -a` to the build dir, customize, the "
        "image's dracut with dmsquash-live chrooted (aarch64: through qemu-user binfmt), "
        "`mksquashfs -xattrs` with default settings (gzip), kernel + initrd + grub.cfg + shim/grub "
        "+ `efiboot.img`, `xorriso` (UEFI El Torito only; vmic also makes the BIOS one on x86_64). "
        "The squashfs step is not like for like: the baseline keeps mksquashfs' default "
        "(gzip, as the Azure Linux Image Customizer does) while vmic sets its own; the (info) "
        "rows run the same baseline with vmic's compression, for comparison. The targets are "
        "against the plain baseline. dracut is the same work on all sides.",
        "",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, accelerator "
        f"{info['accelerator']}, QEMU {info['qemu']}, host kernel {info['kernel']}, "
        f"{info['date']}; median of {runs} run(s), baseline and vmic runs interleaved. Other QEMU "
        "jobs shared the machine. In brackets per run: the 1-minute load average at its start "
        "(it still carries the previous run), then the CPU the rest of the machine used during "
        "it, in cores (all busy CPU time from `/proc/stat` minus the run's own, from rusage, "
        "and the watcher's; kernel writeback counts as others); ↻N: N builder VMs replaced because "
        "their agent was never reached (the time is in the run's wall). CPU s: the run's own "
        "CPU time.",
        "",
        "Peak disk: allocated bytes (st_blocks × 512) of the build dir, polled every ~0.5 s "
        "(the output ISO is written outside it). Peak RSS: sum of VmRSS over the run's whole "
        "process tree (vmic + QEMU + vhost-device-vsock; bash + qemu-img + cp + dracut (+ "
        "qemu-user) + mksquashfs + xorriso), sampled every 0.2 s; PSS sum beside it (shared "
        "pages split). Host page cache is not counted for either.",
        "",
        "| arch | pipeline | wall s (median) | runs: s [load / others] | CPU s | "
        "peak build-dir disk MiB | peak RSS MiB | peak PSS MiB | ISO MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in arches:
        for pipeline, name in PIPELINES.items():
            s = results[arch].get(pipeline)
            if s is None:
                continue
            restarts = s.get("restarts", [0] * len(s["walls"]))
            runs_text = ", ".join(f"{w:.1f} [{l:.2f} / {o:.2f}]" + (f" ↻{n}" if n else "")
                                  for w, l, o, n in zip(s["walls"], s["loads"], s["others"],
                                                        restarts))
            lines.append(
                f"| {arch} | {name} | {s['wall']:.1f} | {runs_text} | {s['cpu']:.0f} | "
                f"{mib(s['peak_disk'])} | "
                f"{mib(s['peak_rss'])} | {mib(s['peak_pss'])} | {s['iso_size'] / MIB:.1f} |"
            )
    lines += [
        "",
        "| arch | wall vmic/baseline | disk vmic/baseline | RSS vmic/baseline | "
        "vmic peak disk / (input used + ISO) | baseline peak disk / (input used + ISO) | "
        "wall vmic / baseline with vmic's compression (info) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in arches:
        r = results[arch]
        b, v, used = r["baseline"], r["vmic"], r["input_used"]
        lines.append(
            f"| {arch} | {ratio(v['wall'], b['wall']):.2f} | "
            f"{ratio(v['peak_disk'], b['peak_disk']):.2f} | {ratio(v['peak_rss'], b['peak_rss']):.2f} | "
            f"{ratio(v['peak_disk'], used + v['iso_size']):.2f} "
            f"({mib(v['peak_disk'])} / ({mib(used)} + {mib(v['iso_size'])})) | "
            f"{ratio(b['peak_disk'], used + b['iso_size']):.2f} | "
            + (f"{ratio(v['wall'], r['baseline-vmic-comp']['wall']):.2f} |"
               if "baseline-vmic-comp" in r else "- |")
        )
    if len(arches) == 2:
        x, a = results["x86_64"]["vmic"], results["aarch64"]["vmic"]
        lines.append(
            f"| aarch64/x86_64, vmic | {ratio(a['wall'], x['wall']):.2f} | "
            f"{ratio(a['peak_disk'], x['peak_disk']):.2f} | {ratio(a['peak_rss'], x['peak_rss']):.2f} | - | - | - |"
        )
    lines += ["", "Targets (issue \"Benchmarks against the native-root pipeline\"):", "",
              "| target | measured | |", "|---|---|---|"]
    if "x86_64" in results:
        r = results["x86_64"]
        w = ratio(r["vmic"]["wall"], r["baseline"]["wall"])
        lines.append(f"| x86_64 vmic ≤ 3× baseline wall | {w:.2f}× | {target(w <= 3)} |")
    if len(arches) == 2:
        w = ratio(results["aarch64"]["vmic"]["wall"], results["x86_64"]["vmic"]["wall"])
        lines.append(f"| aarch64 vmic ≤ 4× x86_64 vmic | {w:.2f}× | {target(w <= 4)} |")
    if "aarch64" in results:
        r = results["aarch64"]
        v, b = r["vmic"]["wall"], r["baseline"]["wall"]
        lines.append(f"| aarch64 vmic faster than the qemu-user baseline | {v:.1f} s vs {b:.1f} s "
                     f"({ratio(v, b):.2f}×) | {target(v < b)} |")
    for arch in arches:
        r = results[arch]
        d = ratio(r["vmic"]["peak_disk"], r["input_used"] + r["vmic"]["iso_size"])
        lines.append(f"| {arch} vmic peak build-dir disk ≤ 2× (input used + ISO) | {d:.2f}× | "
                     f"{target(d <= 2)} |")
    for arch in arches:
        r = results[arch]
        if "vmic-rebuild" in r:
            w = ratio(r["vmic-rebuild"]["wall"], r["vmic"]["wall"])
            lines.append(f"| {arch} rebuild with only `iso.*` changed ≤ 0.25× the first build "
                         f"(build cache hit) | {w:.2f}× | {target(w <= 0.25)} |")
    lines += ["", "Steps (median seconds; the baseline timed by its script, vmic from "
              "`--timestamp-file`):", ""]
    header = "| pipeline | step | " + " | ".join(arches) + " |"
    lines += [header, "|---|---|" + "---|" * len(arches)]
    for pipeline in PIPELINES:
        if not any(pipeline in results[arch] for arch in arches):
            continue
        names = []
        for arch in arches:
            for name, _ in results[arch].get(pipeline, {"steps": []})["steps"]:
                if name not in names:
                    names.append(name)
        for name in names:
            cells = []
            for arch in arches:
                value = dict(results[arch].get(pipeline, {"steps": []})["steps"]).get(name)
                cells.append("-" if value is None else f"{value:.1f}")
            lines.append(f"| {pipeline} | {name} | " + " | ".join(cells) + " |")
    notes = sorted({n for arch in arches for n in results[arch]["baseline"]["notes"]})
    if notes:
        lines += ["", "Baseline on this host: " + "; ".join(notes) + "."]
    return wrap_prose(lines)


def wrap_prose(lines):
    """Prose wrapped at 100 columns like the rest of the doc; tables, headings, images as they
    are."""
    wrapped = []
    for line in lines:
        if line.startswith(("|", "#", "![")) or len(line) <= 100:
            wrapped.append(line)
        else:
            wrapped.extend(textwrap.wrap(line, 100, break_long_words=False,
                                         break_on_hyphens=False))
    return "\n".join(wrapped) + "\n"


def write_doc(section, begin=BEGIN, end=END, after=None, doc=DOC):
    """Put section between the begin and end markers of doc: in place of what they held, else
    (new markers) after the line holding `after` when there is one, else at the end. The blank
    line after the end marker stays."""
    text = doc.read_text()
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    elif after is not None and after in text:
        head, rest = text.split(after, 1)
        line_end, _, tail = rest.partition("\n")
        tail = tail.lstrip("\n")
        text = head + after + line_end + "\n\n" + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)


# --- scaling (--scaling) -------------------------------------------------------------------


def scaling_image(filler_mb):
    """The x86_64 minimal test image with filler_mb MiB of filler, and its manifest."""
    if filler_mb == 0:
        # The plain image as the plain benchmark and the tests get it (all formats): the same
        # cache entry. make-test-image keeps one recipe per image name, so asking for it with
        # other --formats would throw away theirs.
        disk = test_image("x86_64")
    else:
        out = WORK / "images" / f"x86_64-minimal-filler{filler_mb}"
        log(f"test image {out} (built if missing; cached otherwise)")
        subprocess.run(
            [str(REPO / "scripts" / "make-test-image"), "--arch", "x86_64", "--variant", "minimal",
             "--filler-mb", str(filler_mb), "--formats", "qcow2", "--out", str(out)],
            check=True, stdout=subprocess.DEVNULL,
        )
        disk = out / "disk.qcow2"
        if not disk.is_file():
            raise BenchError(f"make-test-image left no {disk}")
    manifest = json.loads((disk.parent / "manifest.json").read_text())
    if manifest.get("filler_mb", 0) != filler_mb or "root_fs_bytes" not in manifest:
        raise BenchError(f"{disk.parent}/manifest.json: no filler_mb {filler_mb} or no "
                         "root_fs_bytes (an image from an older make-test-image)")
    return disk, manifest


def run_scaling(sizes, runs, vmic, guest_image_dir, config, info):
    """vmic disk → ISO on the minimal image with each filler size, runs times each."""
    images = {n: scaling_image(n) for n in sizes}
    measured = {n: [] for n in sizes}
    for run in range(1, runs + 1):
        for n in sizes:
            out_dir = WORK / "scaling" / f"filler{n}"
            out_dir.mkdir(parents=True, exist_ok=True)
            log(f"x86_64 filler {n} MiB vmic run {run}/{runs} (load {load_average():.2f})")
            result = run_vmic("x86_64", images[n][0], config, out_dir, run, vmic,
                              guest_image_dir, tag=f"-filler{n}")
            # This run's build cache (a squashfs as big as the data): never read again.
            remove_tree(out_dir / f"cache-{run}")
            measured[n].append(result)
            log(f"x86_64 filler {n} MiB run {run}: {result['wall']:.1f} s, peak disk "
                f"{mib(result['peak_disk'])} MiB, peak RSS {mib(result['peak_rss'])} MiB")
    for n in sizes:
        check_iso(WORK / "scaling" / f"filler{n}" / "vmic.iso", "x86_64", f"vmic filler {n} MiB")
    rows = []
    for n in sizes:
        disk, manifest = images[n]
        rows.append(dict(summarize(measured[n]), filler_mb=n,
                         root_fs_bytes=manifest["root_fs_bytes"],
                         input_used=disk.stat().st_blocks * 512))
    section = scaling_markdown(rows, info, runs)
    PLOT.write_text(scaling_svg(rows, info))
    (WORK / "scaling-results.json").write_text(json.dumps(
        {"machine": info, "runs": {str(n): measured[n] for n in sizes}, "summary": rows},
        indent=2))
    (REPO / "target" / "bench-iso-scaling.md").write_text(section)
    write_doc(section, SCALING_BEGIN, SCALING_END, after=END)
    print(section)
    log(f"results: {DOC.relative_to(REPO)} (bench-iso-scaling section), "
        f"{PLOT.relative_to(REPO)}, target/bench-iso-scaling.md, "
        f"{(WORK / 'scaling-results.json').relative_to(REPO)}")


def step(row, name):
    return dict(row["steps"]).get(name)


def seconds_text(value):
    return "-" if value is None else f"{value:.1f}"


def scaling_checks(rows):
    """The issue's criteria on the rows (smallest root fs first): (target, measured, ok, info)."""
    checks = []
    first = rows[0]
    gib0 = first["root_fs_bytes"] / GIB
    for row in rows[1:]:
        size = ratio(row["root_fs_bytes"], first["root_fs_bytes"])
        time_ = ratio(row["wall"], first["wall"])
        checks.append((
            f"time at most linear: wall({row['root_fs_bytes'] / GIB:.2f} GiB) / "
            f"wall({gib0:.2f} GiB) ≤ root fs ratio",
            f"{time_:.2f}× the time for {size:.2f}× the data", time_ <= size, False))
    if len(rows) >= 3:
        marginal = [ratio(b["wall"] - a["wall"], (b["root_fs_bytes"] - a["root_fs_bytes"]) / GIB)
                    for a, b in zip(rows, rows[1:])]
        growth = ratio(marginal[-1], marginal[0])
        checks.append((
            f"(info, stricter) marginal s per added GiB, last interval ≤ {MARGINAL_GROWTH} × "
            "the first",
            f"{marginal[-1]:.1f} vs {marginal[0]:.1f} s/GiB ({growth:.2f}×)",
            growth <= MARGINAL_GROWTH, True))
    rss = [row["peak_rss"] for row in rows]
    flat = ratio(max(rss), min(rss))
    checks.append((f"host peak RSS flat: max / min over the sizes ≤ {RSS_FLAT}",
                   f"{flat:.2f} ({mib(min(rss))}-{mib(max(rss))} MiB)", flat <= RSS_FLAT, False))
    for row in rows:
        share = ratio(row["peak_disk"], row["input_used"] + row["iso_size"])
        checks.append((
            f"peak build-dir disk ≤ {DISK_SHARE} × (input used + ISO), "
            f"{row['root_fs_bytes'] / GIB:.2f} GiB",
            f"{share:.2f}× ({mib(row['peak_disk'])} / ({mib(row['input_used'])} + "
            f"{mib(row['iso_size'])}))", share <= DISK_SHARE, False))
    return checks


def scaling_markdown(rows, info, runs):
    vm = ", ".join(sorted({v for row in rows for v in row["vm"]}))
    squashfs = ", ".join(sorted({n.replace("mksquashfs ", "") for row in rows
                                 for n in row["notes"]})) or "its default compression"
    sizes = ",".join(str(row["filler_mb"]) for row in rows)
    lines = [
        "## Disk → LiveOS ISO: scaling with the root file system (`scripts/bench-iso --scaling`)",
        "",
        f"`scripts/bench-iso --scaling {sizes} [--runs N]` (written by it; do not edit by hand); "
        "x86_64 only. Input: the minimal test image (`disk.qcow2`) with N MiB of filler added "
        "by `scripts/make-test-image --filler-mb N` (N files of 1 MiB in `/opt/vmic-filler`: "
        "half incompressible, half text; N = 0 is the plain image of the section above). "
        "Config, command and measurements as in the section above: `vmic customize "
        f"--output-image-format iso --accel tcg` at commit {info['revision']} (builder VM: {vm}; "
        f"mksquashfs in the guest with {squashfs}), each run with an empty build cache. Root "
        "fs: bytes of the files in the root file system (`du -sb` when the image was built, "
        "from its manifest); input used: allocated bytes of the qcow2.",
        "",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, accelerator "
        f"{info['accelerator']}, QEMU {info['qemu']}, host kernel {info['kernel']}, "
        f"{info['date']}; median of {runs} run(s) per size, the sizes interleaved. Other jobs "
        "may have shared the machine: in brackets per run, the load average at its start and "
        "the cores the rest of the machine used during it, as above.",
        "",
        "![Wall time, peak host RSS and peak build-dir disk against the root file system's "
        "size](bench-scaling.svg)",
        "",
        "| filler MiB | root fs GiB | input used MiB | wall s (median) | runs: s [load / others] "
        "| s per GiB | Initrd and squashfs s | Mastering s | CPU s | peak RSS MiB | peak PSS MiB "
        "| peak build-dir disk MiB | disk / (input used + ISO) | ISO MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gib = row["root_fs_bytes"] / GIB
        runs_text = ", ".join(f"{w:.1f} [{l:.2f} / {o:.2f}]"
                              for w, l, o in zip(row["walls"], row["loads"], row["others"]))
        lines.append(
            f"| {row['filler_mb']} | {gib:.2f} | {mib(row['input_used'])} | {row['wall']:.1f} | "
            f"{runs_text} | {ratio(row['wall'], gib):.1f} | "
            f"{seconds_text(step(row, 'Initrd and squashfs'))} | "
            f"{seconds_text(step(row, 'Mastering'))} | {row['cpu']:.0f} | "
            f"{mib(row['peak_rss'])} | {mib(row['peak_pss'])} | {mib(row['peak_disk'])} | "
            f"{ratio(row['peak_disk'], row['input_used'] + row['iso_size']):.2f} | "
            f"{row['iso_size'] / MIB:.1f} |")
    if len(rows) >= 2:
        lines += ["", "Marginal cost between consecutive sizes (the time each added GiB costs):",
                  "", "| from → to GiB | added GiB | added wall s | s per added GiB | "
                  "added Initrd and squashfs s |", "|---|---|---|---|---|"]
        for a, b in zip(rows, rows[1:]):
            added = (b["root_fs_bytes"] - a["root_fs_bytes"]) / GIB
            squash_a, squash_b = step(a, "Initrd and squashfs"), step(b, "Initrd and squashfs")
            lines.append(
                f"| {a['root_fs_bytes'] / GIB:.2f} → {b['root_fs_bytes'] / GIB:.2f} | "
                f"{added:.2f} | {b['wall'] - a['wall']:.1f} | "
                f"{ratio(b['wall'] - a['wall'], added):.1f} | "
                + ("-" if squash_a is None or squash_b is None else f"{squash_b - squash_a:.1f}")
                + " |")
    lines += [
        "",
        "Targets (issue 13, \"Scaling\"). Time grows at most linearly: each size's wall time "
        "divided by the smallest's is at most the ratio of their root file systems. A fixed "
        "cost (VM boot, dracut, mastering) makes that test loose: the stricter look (info) "
        "compares the seconds each added GiB costs between the largest two sizes with that "
        "between the smallest two; if it grows, the data-dependent part grows faster than "
        "linearly. Host "
        "peak RSS is flat when the largest is at most "
        f"{RSS_FLAT}× the smallest (the builder VM's memory is fixed; the data must not be held "
        "in memory on the host). Peak build-dir disk: at most "
        f"{DISK_SHARE}× (input used + ISO) at every size.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    for name, measured, ok, info_only in scaling_checks(rows):
        lines.append(f"| {name} | {measured} | "
                     f"{('(info) ' if info_only else '') + target(ok)} |")
    lines += ["", "Steps (median seconds, from vmic's `--timestamp-file`), by root fs size:", "",
              "| step | " + " | ".join(f"{row['root_fs_bytes'] / GIB:.2f} GiB" for row in rows)
              + " |", "|---|" + "---|" * len(rows)]
    names = []
    for row in rows:
        names += [name for name, _ in row["steps"] if name not in names]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(seconds_text(step(row, name)) for row in rows)
                     + " |")
    return wrap_prose(lines)


# --- the plot: hand-written SVG ------------------------------------------------------------

COLORS = {"measured": "#1f77b4", "second": "#ff7f0e", "runs": "#9ab8d8", "limit": "#555555"}


def nice_ticks(top, count=5):
    """Ticks 0, step, ... covering [0, top] with step 1, 2, 2.5 or 5 × 10^k."""
    top = top if top > 0 else 1.0
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step_ = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [round(i * step_, 10) for i in range(int(math.ceil(top / step_ - 1e-9)) + 1)]


def tick_text(value):
    return f"{value:g}"


def svg_panel(x0, y0, width, height, title, xlabel, ylabel, series, xmax):
    """One chart at (x0, y0): axes from 0, ticks, grid, the series, a legend below.
    series: dicts with label, points [(x, y)], color, and optional dash, line, marker, r."""
    left, right, top, bottom = 62, 14, 34, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax = max((y for s in series for _, y in s["points"]), default=1.0) * 1.1
    xticks, yticks = nice_ticks(xmax), nice_ticks(ymax)
    xtop, ytop = xticks[-1], yticks[-1]

    def px(x):
        return x0 + left + plot_w * x / xtop

    def py(y):
        return y0 + top + plot_h * (1 - y / ytop)

    out = [f'<text x="{x0 + width / 2:.1f}" y="{y0 + 18}" text-anchor="middle" '
           f'font-size="14" font-weight="bold">{escape(title)}</text>']
    for t in yticks:
        out.append(f'<line x1="{px(0):.1f}" y1="{py(t):.1f}" x2="{px(xtop):.1f}" '
                   f'y2="{py(t):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{px(0) - 6:.1f}" y="{py(t) + 4:.1f}" '
                   f'text-anchor="end">{tick_text(t)}</text>')
    for t in xticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{py(0):.1f}" x2="{px(t):.1f}" '
                   f'y2="{py(0) + 5:.1f}" stroke="#000"/>')
        out.append(f'<text x="{px(t):.1f}" y="{py(0) + 18:.1f}" '
                   f'text-anchor="middle">{tick_text(t)}</text>')
    out.append(f'<polyline points="{px(0):.1f},{py(ytop):.1f} {px(0):.1f},{py(0):.1f} '
               f'{px(xtop):.1f},{py(0):.1f}" fill="none" stroke="#000"/>')
    out.append(f'<text x="{px(xtop / 2):.1f}" y="{py(0) + 36:.1f}" '
               f'text-anchor="middle">{escape(xlabel)}</text>')
    yc = (py(0) + py(ytop)) / 2
    out.append(f'<text x="{x0 + 16}" y="{yc:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 {x0 + 16} {yc:.1f})">{escape(ylabel)}</text>')
    for s in series:
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        points = sorted(s["points"])
        if s.get("line", True) and len(points) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{s["color"]}" '
                       f'stroke-width="2"{dash}/>')
        if s.get("marker", True):
            for x, y in points:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{s.get("r", 4)}" '
                           f'fill="{s["color"]}"/>')
    for i, s in enumerate(series):
        ly = y0 + height + 14 + 16 * i
        lx = x0 + left
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        if s.get("line", True):
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" '
                       f'stroke="{s["color"]}" stroke-width="2"{dash}/>')
        if s.get("marker", True):
            out.append(f'<circle cx="{lx + 12}" cy="{ly - 4}" r="{s.get("r", 4)}" '
                       f'fill="{s["color"]}"/>')
        out.append(f'<text x="{lx + 32}" y="{ly}">{escape(s["label"])}</text>')
    return out


def scaling_svg(rows, info):
    """Three panels against the root fs size: wall time (with the line proportional to the
    smallest size's), peak host RSS (with the flat limit), peak build-dir disk (with its
    limit)."""
    gib = [row["root_fs_bytes"] / GIB for row in rows]
    xmax = max(gib) * 1.05
    g0, t0 = gib[0], rows[0]["wall"]
    panel_w, panel_h, legend_h, title_h = 330, 300, 56, 40
    width, height = 3 * panel_w, title_h + panel_h + legend_h
    rss_min = min(row["peak_rss"] for row in rows) / MIB
    panels = [
        ("Wall time", "seconds", [
            {"label": "each run", "points": [(g, w) for g, row in zip(gib, rows)
                                             for w in row["walls"]],
             "color": COLORS["runs"], "line": False, "r": 3},
            {"label": "median", "points": list(zip(gib, (row["wall"] for row in rows))),
             "color": COLORS["measured"]},
            {"label": f"linear from the smallest ({t0:.0f} s × size / {g0:.2f} GiB)",
             "points": [(g0, t0), (max(gib), t0 * max(gib) / g0)],
             "color": COLORS["limit"], "dash": "6,4", "marker": False},
        ]),
        ("Peak host RSS", "MiB", [
            {"label": "RSS (process tree)", "points": [(g, row["peak_rss"] / MIB)
                                                       for g, row in zip(gib, rows)],
             "color": COLORS["measured"]},
            {"label": "PSS", "points": [(g, row["peak_pss"] / MIB) for g, row in zip(gib, rows)],
             "color": COLORS["second"], "r": 3},
            {"label": f"flat limit: smallest RSS × {RSS_FLAT}",
             "points": [(0, rss_min * RSS_FLAT), (xmax, rss_min * RSS_FLAT)],
             "color": COLORS["limit"], "dash": "6,4", "marker": False},
        ]),
        ("Peak build-dir disk", "MiB", [
            {"label": "peak build-dir disk", "points": [(g, row["peak_disk"] / MIB)
                                                        for g, row in zip(gib, rows)],
             "color": COLORS["measured"]},
            {"label": f"limit: {DISK_SHARE} × (input used + ISO)",
             "points": [(g, DISK_SHARE * (row["input_used"] + row["iso_size"]) / MIB)
                        for g, row in zip(gib, rows)],
             "color": COLORS["limit"], "dash": "6,4", "r": 3},
        ]),
    ]
    subtitle = (f"x86_64, accelerator {info['accelerator']}, commit {info['revision']}, "
                f"{info['date']}")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="16" '
        f'font-weight="bold">{escape("vmic disk → LiveOS ISO against the root file system")}'
        f'</text>',
        f'<text x="{width / 2:.1f}" y="38" text-anchor="middle" fill="#555">'
        f'{escape(subtitle)}'
        f'</text>',
    ]
    for i, (title, ylabel, series) in enumerate(panels):
        out += svg_panel(i * panel_w, title_h, panel_w, panel_h, title, "root fs GiB", ylabel,
                         series, xmax)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def selftest_plot(directory):
    """The scaling table, plot and doc update from made-up numbers, into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {"cores": 2, "memory_gib": 23.5, "accelerator": "tcg", "qemu": "10.0.2",
            "date": "2026-12-03 00:00 UTC", "kernel": "6.1", "revision": "selftest"}
    rows = []
    for filler, root, wall, rss, disk, used, iso in [
            (0, 0.33, 50.0, 1254, 188, 345, 131), (700, 1.02, 80.0, 1270, 420, 1060, 480),
            (2700, 2.98, 200.0, 1262, 1150, 3100, 1480)]:
        rows.append({
            "filler_mb": filler, "root_fs_bytes": int(root * GIB), "wall": wall,
            "walls": [wall - 1, wall, wall + 2], "loads": [1.0] * 3, "others": [0.1] * 3,
            "cpu": wall * 1.3, "peak_rss": rss * MIB, "peak_pss": (rss - 3) * MIB,
            "peak_disk": disk * MIB, "input_used": used * MIB, "iso_size": iso * MIB,
            "steps": [("Booting", 3.3), ("Initrd and squashfs", wall - 10), ("Mastering", 5.0)],
            "notes": ["mksquashfs zstd -Xcompression-level 3"], "vm": ["2 vCPUs, 4096 MiB"],
        })
    section = scaling_markdown(rows, info, 3)
    svg = directory / "bench-scaling.svg"
    svg.write_text(scaling_svg(rows, info))
    root = ElementTree.parse(svg).getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{namespace}svg", root.tag
    circles = root.findall(f"{namespace}circle")
    # 9 runs + 3 medians; 3 RSS + 3 PSS; 3 disk + 3 limits; one per marked legend entry (6).
    assert len(circles) == 9 + 3 + 3 + 3 + 3 + 3 + 6, len(circles)
    texts = [t.text for t in root.iter(f"{namespace}text")]
    for expected in ("Wall time", "Peak host RSS", "Peak build-dir disk", "root fs GiB"):
        assert expected in texts, expected
    checks = scaling_checks(rows)
    assert [ok for _, _, ok, _ in checks] == [True, True, False, True, True, True, True], checks
    # The doc: the section goes right after the bench-iso section, then replaces itself.
    doc = directory / "benchmarks.md"
    # A made-up doc, not the real one: that one already holds a scaling section.
    original = f"# Benchmarks\n\n{BEGIN}\nx\n{END}\n\n## After\n\ntext\n"
    doc.write_text(original)
    write_doc(section, SCALING_BEGIN, SCALING_END, after=END, doc=doc)
    once = doc.read_text()
    assert once.index(END) < once.index(SCALING_BEGIN) < once.index(SCALING_END), "order"
    assert once.replace(f"{SCALING_BEGIN}\n{section}{SCALING_END}\n\n", "", 1) == original \
        or once.replace(f"\n\n{SCALING_BEGIN}\n{section}{SCALING_END}\n", "\n", 1) == original, \
        "only the section was added"
    write_doc(section, SCALING_BEGIN, SCALING_END, after=END, doc=doc)
    assert doc.read_text() == once, "a second write changes nothing"
    write_doc("plain section\n", doc=doc)
    again = doc.read_text()
    assert f"{BEGIN}\nplain section\n{END}\n\n{SCALING_BEGIN}\n{section}{SCALING_END}\n" in again, \
        "the plain section rewritten, the scaling one kept after it"
    (directory / "bench-iso-scaling.md").write_text(section)
    print(section)
    log(f"selftest passed: {svg} ({len(circles)} points, valid XML), {doc}, "
        f"{directory / 'bench-iso-scaling.md'}")


def parse_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of MiB: {text}") from None
    if not sizes or any(n < 0 or n > 99999 for n in sizes):
        raise argparse.ArgumentTypeError(f"filler sizes are 0 to 99999 MiB: {text}")
    return sorted(set(sizes))


def main():
    parser = argparse.ArgumentParser(prog="scripts/bench-iso")
    parser.add_argument("--arch", choices=["x86_64", "aarch64", "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vmic", type=Path, default=REPO / "target" / "release" / "vmic")
    parser.add_argument("--guest-image-dir", type=Path,
                        help="VMIC_GUEST_IMAGE_DIR for vmic (a frozen copy of the guest images)")
    parser.add_argument("--revision", default="unknown", help="the vmic commit measured")
    parser.add_argument("--scaling", type=parse_sizes, metavar="MB,MB,...",
                        help="instead: vmic on the minimal x86_64 image with these MiB of filler")
    parser.add_argument("--selftest-plot", type=Path, metavar="DIR",
                        help="only the scaling table, plot and doc update from made-up numbers")
    args = parser.parse_args()
    if args.selftest_plot:
        selftest_plot(args.selftest_plot)
        return
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.scaling and len(args.scaling) < 2:
        parser.error("--scaling wants at least two sizes")
    if args.scaling and args.arch == "aarch64":
        parser.error("--scaling measures x86_64 only")
    if os.geteuid() != 0:
        raise BenchError("must run as root (loop devices, mounts, chroot)")
    if not args.vmic.is_file():
        raise BenchError(f"{args.vmic} missing: cargo build --release -p vmic")
    guest_image_dir = args.guest_image_dir.resolve() if args.guest_image_dir else None
    arches = ["x86_64", "aarch64"] if args.arch == "all" else [args.arch]
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    config, extra = write_config(WORK / "config")
    rebuild_config = write_rebuild_config(config)
    info = machine(args.revision)
    if args.scaling:
        run_scaling(args.scaling, args.runs, args.vmic.resolve(), guest_image_dir, config, info)
        return
    results, raw = {}, {}
    for arch in arches:
        disk = test_image(arch)
        out_dir = WORK / arch
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = {"baseline": [], "vmic": [], "vmic-rebuild": [], "baseline-vmic-comp": []}
        for run in range(1, args.runs + 1):
            for pipeline in ("baseline", "vmic", "vmic-rebuild", "baseline-vmic-comp"):
                log(f"{arch} {pipeline} run {run}/{args.runs} (load {load_average():.2f})")
                if pipeline == "baseline":
                    result = run_baseline(arch, disk, extra, out_dir, run)
                elif pipeline == "vmic":
                    result = run_vmic(arch, disk, config, out_dir, run, args.vmic.resolve(),
                                      guest_image_dir)
                elif pipeline == "vmic-rebuild":
                    result = run_vmic(arch, disk, rebuild_config, out_dir, run,
                                      args.vmic.resolve(), guest_image_dir, pipeline)
                elif runs["vmic"][-1]["squashfs"]:
                    result = run_baseline(arch, disk, extra, out_dir, run, pipeline,
                                          runs["vmic"][-1]["squashfs"])
                else:
                    log("vmic's log names no squashfs compression: no like-for-like baseline")
                    continue
                runs[pipeline].append(result)
                log(f"{arch} {pipeline} run {run}: {result['wall']:.1f} s, peak disk "
                    f"{mib(result['peak_disk'])} MiB, peak RSS {mib(result['peak_rss'])} MiB "
                    f"(disk scan ≤ {result['max_disk_scan']:.2f} s, {result['disk_samples']} samples)")
        for pipeline, pipeline_runs in runs.items():
            if pipeline_runs:
                check_iso(out_dir / f"{pipeline}.iso", arch, pipeline)
        results[arch] = {p: summarize(r) for p, r in runs.items() if r}
        results[arch]["input_used"] = disk.stat().st_blocks * 512
        raw[arch] = runs
    section = markdown(results, info, args.runs)
    (WORK / "results.json").write_text(json.dumps(
        {"machine": info, "runs": raw, "summary": results}, indent=2))
    (REPO / "target" / "bench-iso.md").write_text(section)
    print(section)
    # The docs' section holds both arches from one sitting: one arch alone would replace the
    # other's rows, and rows from two sittings do not compare.
    if args.arch == "all":
        write_doc(section)
        log(f"results: {DOC.relative_to(REPO)} (bench-iso section), target/bench-iso.md, "
            f"{(WORK / 'results.json').relative_to(REPO)}")
    else:
        log(f"results: target/bench-iso.md, {(WORK / 'results.json').relative_to(REPO)} "
            f"({DOC.relative_to(REPO)} is written by --arch all only)")


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C: the running child is stopped and cleans up after itself.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except BenchError as error:
        print(f"bench-iso: error: {error}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as error:
        print(f"bench-iso: error: {' '.join(map(str, error.cmd))} exited {error.returncode}",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench-iso: interrupted", file=sys.stderr)
        sys.exit(130)
