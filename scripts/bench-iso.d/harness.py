#!/usr/bin/env python3
"""The measuring half of scripts/bench-iso (which installs what is needed, then runs this).

For each arch: the x86_64/aarch64 minimal test image (qcow2), converted to a LiveOS ISO N times
by the native-root baseline (baseline.sh), N times by `vmic customize`, and N times by the
baseline with vmic's squashfs compression (read from vmic's log; for information), interleaved. Each
run is one child process (own session) whose whole process tree is watched: the sum of VmRSS
(and of Pss) every 0.2 s, and the allocated bytes (st_blocks * 512, hard links once, not
crossing mount points) of its build dir every ~0.5 s. Results: stdout, target/bench-iso.md,
target/bench-iso/results.json and the bench-iso section of docs/benchmarks.md.
"""

import argparse
import datetime
import json
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "target" / "bench-iso"
BASELINE = REPO / "scripts" / "bench-iso.d" / "baseline.sh"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-iso:begin -->", "<!-- bench-iso:end -->"
MIB = 1 << 20

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
    """The argv of pid if it is a qemu-system-* process, else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if argv and os.path.basename(argv[0]).startswith("qemu-system-"):
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
    rebuild.write_text(config.read_text().replace(EXTRA_ARG, EXTRA_ARG + " vmic.rebuild=1"))
    return rebuild


def test_image(arch):
    images = Path(os.environ.get("VMIC_TEST_IMAGES_DIR", REPO / "target" / "test-images"))
    out = images / f"{arch}-minimal"
    log(f"test image {out} (built if missing; cached otherwise)")
    subprocess.run(
        [str(REPO / "scripts" / "make-test-image"), "--arch", arch, "--variant", "minimal",
         "--out", str(out)],
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


def run_vmic(arch, disk, config, out_dir, run, vmic, guest_image_dir, name="vmic"):
    """A vmic build with this run's own, initially empty, build cache: `vmic` misses and
    stores, `vmic-rebuild` (only the ISO arg changed) then hits."""
    iso = out_dir / f"{name}.iso"
    timestamps = out_dir / f"{name}-timestamps-{run}.json"
    cache = out_dir / f"cache-{run}"
    if name == "vmic":
        remove_tree(cache)
    argv = [str(vmic), "customize", "--image-file", str(disk), "--config-file", str(config),
            "--build-dir", str(out_dir / "vmic-build"), "--output-image-file", str(iso),
            "--output-image-format", "iso", "--arch", arch, "--accel", "tcg",
            "--timestamp-file", str(timestamps), "--cache-dir", str(cache)]
    log_path = WORK / "logs" / f"{arch}-{name}-{run}.log"
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
        "and the watcher's; kernel writeback counts as others). CPU s: the run's own CPU time.",
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
            runs_text = ", ".join(f"{w:.1f} [{l:.2f} / {o:.2f}]"
                                  for w, l, o in zip(s["walls"], s["loads"], s["others"]))
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
    # Prose wrapped at 100 columns like the rest of the doc; tables and headings as they are.
    wrapped = []
    for line in lines:
        if line.startswith(("|", "#")) or len(line) <= 100:
            wrapped.append(line)
        else:
            wrapped.extend(textwrap.wrap(line, 100, break_long_words=False,
                                         break_on_hyphens=False))
    return "\n".join(wrapped) + "\n"


def write_doc(section):
    text = DOC.read_text()
    block = f"{BEGIN}\n{section}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOC.write_text(text)


def main():
    parser = argparse.ArgumentParser(prog="scripts/bench-iso")
    parser.add_argument("--arch", choices=["x86_64", "aarch64", "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vmic", type=Path, default=REPO / "target" / "release" / "vmic")
    parser.add_argument("--guest-image-dir", type=Path,
                        help="VMIC_GUEST_IMAGE_DIR for vmic (a frozen copy of the guest images)")
    parser.add_argument("--revision", default="unknown", help="the vmic commit measured")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
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
    write_doc(section)
    print(section)
    log(f"results: {DOC.relative_to(REPO)} (bench-iso section), target/bench-iso.md, "
        f"{(WORK / 'results.json').relative_to(REPO)}")


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
