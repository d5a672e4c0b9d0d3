"""Attach+detach latency of loopctl, next to a C reference, plain fcntl and the losetup CLI.

    .venv/bin/python bench/attach_latency.py [--iterations N] [--rounds R] [--json FILE]

(or `make bench`). Needs root and loop devices. One run measures, in interleaved rounds that
alternate their order, the same cycle four ways on a fresh 64 MiB sparse image:

  C reference   bench/ref_attach (built here from ref_attach.c): GET_FREE, CONFIGURE, CLR_FD
  loopctl       ``with loopctl.attach(image): pass``, in this process
  plain fcntl   the C reference's syscalls through fcntl.ioctl: the interpreter's own floor
  losetup       ``losetup -f --show IMAGE`` then ``losetup -d DEVICE``, two processes a cycle

and reports the median of the rounds per method, the ratios to the C reference and the targets
(loopctl <= 1.15x the C reference, losetup >= 20x loopctl), plus the time `import loopctl` adds
to a fresh interpreter. The image lives in $TMPDIR (tempfile's default).

Not a test: nothing about time is asserted, and the exit status is 0 unless something failed.
Every device it attaches is detached again, even on failure or Ctrl-C: the image sits in a
private directory, so whatever is still bound to it at the end was bound by this run.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The working tree's loopctl whether or not it is installed (`make venv` installs it editable,
# which is the same files), so that the import timed in a fresh interpreter is the one used here.
sys.path.insert(0, str(REPO))

import loopctl  # noqa: E402
from loopctl._ffi import ffi, lib  # noqa: E402  (only to check the constants below)

JSON_SCHEMA_VERSION = 1
REF_SOURCE = BENCH / "ref_attach.c"
REF_BINARY = BENCH / "ref_attach"
IMAGE_SIZE = 64 << 20
UDEV_CONTROL = "/run/udev/control"  # libudev's own test for a running udevd
TARGET_VS_C = 1.15
TARGET_LOSETUP_VS_LOOPCTL = 20.0
SWEEP_TIMEOUT = 5.0
# A measurement that lost the race for a free device to another process saw that process's
# activity too: it is discarded and run again after a pause, this many times at most.
LOST_RACE_TRIES = 5
LOST_RACE_PAUSE = 0.5
REF_LOST_RACE = 3  # ref_attach's exit status for a lost race

# The plain-fcntl method spells <linux/loop.h> out by hand, as a script without a binding would;
# check_layout() holds these against the header, as compiled into loopctl's binding.
LOOP_CONTROL = "/dev/loop-control"
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_NAME_SIZE = 64
# struct loop_config (304 bytes): fd, block_size, then struct loop_info64 (232 bytes: lo_device,
# lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number, lo_encrypt_type,
# lo_encrypt_key_size, lo_flags, lo_file_name[64] at offset 8 + 56, lo_crypt_name[64],
# lo_encrypt_key[32], lo_init[2]), then __reserved[8].
LOOP_CONFIG = struct.Struct("=II 5Q 4I 64s 64s 32s 16x 64x")
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
# Another process bound or removed the free device between LOOP_CTL_GET_FREE and our call.
_LOST_RACE = (errno.EBUSY, errno.ENXIO, errno.ENODEV)

METHODS = ("c", "loopctl", "fcntl", "losetup")
LABELS = {
    "c": "C reference (ref_attach)",
    "loopctl": "loopctl.attach + detach",
    "fcntl": "plain Python fcntl.ioctl",
    "losetup": "losetup -f --show / -d",
}


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


class LostRace(BenchError):
    """Another process took the free device first; the measurement is discarded and run again.

    Only the C reference and the fcntl method raise it: they do not retry, by design.
    """


def check_layout() -> None:
    expected = {
        "LOOP_CLR_FD": (LOOP_CLR_FD, lib.LOOP_CLR_FD),
        "LOOP_CONFIGURE": (LOOP_CONFIGURE, lib.LOOP_CONFIGURE),
        "LOOP_CTL_GET_FREE": (LOOP_CTL_GET_FREE, lib.LOOP_CTL_GET_FREE),
        "LO_NAME_SIZE": (LO_NAME_SIZE, lib.LO_NAME_SIZE),
        "sizeof(struct loop_config)": (LOOP_CONFIG.size, ffi.sizeof("struct loop_config")),
        "offsetof(lo_file_name)": (8 + 56, ffi.offsetof("struct loop_config", "info",
                                                        "lo_file_name")),
    }
    wrong = [f"{name} is {header}, not {ours}" for name, (ours, header) in expected.items()
             if ours != header]
    if wrong:
        raise BenchError("<linux/loop.h> disagrees with the plain-fcntl method: "
                         + "; ".join(wrong))


def build_reference() -> Path:
    """bench/ref_attach, compiled again when missing or older than its source."""
    if REF_BINARY.exists() and REF_BINARY.stat().st_mtime >= REF_SOURCE.stat().st_mtime:
        return REF_BINARY
    cc = shutil.which("cc")
    if cc is None:
        raise BenchError("no C compiler `cc` (`make host-packages` installs gcc)")
    partial = REF_BINARY.with_name(REF_BINARY.name + ".partial")
    done = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(REF_SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BenchError(f"cannot compile {REF_SOURCE.name}:\n{done.stderr.strip()}")
    os.replace(partial, REF_BINARY)
    return REF_BINARY


# -- the four methods: each runs n cycles and returns the mean microseconds per cycle ---------
def run_reference(binary: Path, image: str, n: int) -> float:
    proc = subprocess.Popen([str(binary), image, str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        # SIGTERM makes ref_attach stop between two cycles; subprocess.run's SIGKILL could
        # leave a device bound.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=SWEEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    if proc.returncode == REF_LOST_RACE:
        raise LostRace(err.strip())
    if proc.returncode != 0:
        raise BenchError(f"ref_attach failed (exit {proc.returncode}): {err.strip()}")
    try:
        return float(out)
    except ValueError:
        raise BenchError(f"ref_attach printed {out!r}, not a number") from None


def run_loopctl(image: str, n: int) -> float:
    attach = loopctl.attach
    start = time.perf_counter_ns()
    for _ in range(n):
        with attach(image):
            pass
    return (time.perf_counter_ns() - start) / n / 1e3


def _fcntl_cycle(image: str, file_name: bytes) -> None:
    """The C reference's cycle, syscall for syscall."""
    ctl = os.open(LOOP_CONTROL, _OPEN_FLAGS)
    try:
        number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        path = f"/dev/loop{number}"
        try:
            dev = os.open(path, _OPEN_FLAGS)
        except OSError as e:
            if e.errno in _LOST_RACE:
                raise LostRace(f"fcntl: {path}: open: {e.strerror}") from None
            raise
        try:
            backing = os.open(image, _OPEN_FLAGS)
            try:
                config = LOOP_CONFIG.pack(backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, file_name,
                                          b"", b"")
                # On failure the device is not ours: never LOOP_CLR_FD it.
                fcntl.ioctl(dev, LOOP_CONFIGURE, config)
            except OSError as e:
                if e.errno in _LOST_RACE:
                    raise LostRace(f"fcntl: {path}: LOOP_CONFIGURE: {e.strerror}") from None
                raise
            finally:
                os.close(backing)
            fcntl.ioctl(dev, LOOP_CLR_FD)
        finally:
            os.close(dev)
    finally:
        os.close(ctl)


def run_fcntl(image: str, n: int) -> float:
    file_name = os.fsencode(image)[: LO_NAME_SIZE - 1]
    start = time.perf_counter_ns()
    for _ in range(n):
        _fcntl_cycle(image, file_name)
    return (time.perf_counter_ns() - start) / n / 1e3


_LOSETUP_DEVICE = re.compile(r"/dev/loop\d+")


def run_losetup(image: str, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        shown = subprocess.run(["losetup", "-f", "--show", image], capture_output=True,
                               text=True)
        device = shown.stdout.strip()
        if shown.returncode != 0 or not _LOSETUP_DEVICE.fullmatch(device):
            raise BenchError(f"losetup -f --show failed (exit {shown.returncode}): "
                             f"{(shown.stderr or shown.stdout).strip()}")
        detached = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
        if detached.returncode != 0:
            raise BenchError(f"losetup -d {device} failed (exit {detached.returncode}): "
                             f"{detached.stderr.strip()}")
    return (time.perf_counter_ns() - start) / n / 1e3


# -- import time ------------------------------------------------------------------------------
_IMPORTTIME = re.compile(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\S.*)$")


def _wall_ns(code: str, env: dict[str, str]) -> int:
    start = time.perf_counter_ns()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return time.perf_counter_ns() - start


def _importtime_us(module: str, env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        match = _IMPORTTIME.match(line)
        if match and match.group(3) == module:  # top level: not indented
            return int(match.group(2))
    raise BenchError(f"-X importtime reported no line for {module}")


def measure_import(runs: int, cache_dir: str) -> dict:
    """`import loopctl` in a fresh interpreter, as -X importtime reports it and as wall time.

    The wall time of `python -c "import loopctl"` over `python -c pass` is what a command pays,
    but with a bare start of some 20 ms its noise is about the size of the import itself; the
    report leads with -X importtime's cumulative figure. Both are timed with bytecode cached, as
    an installed package has it, whatever PYTHONDONTWRITEBYTECODE says: the caches go to
    *cache_dir* (PYTHONPYCACHEPREFIX), not into the source tree.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME")}
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    _wall_ns("import loopctl", env)  # fills the cache outside the timing
    bare, loaded, self_reported = [], [], []
    for _ in range(runs):
        bare.append(_wall_ns("pass", env))
        loaded.append(_wall_ns("import loopctl", env))
        self_reported.append(_importtime_us("loopctl", env))
    return {
        "runs": runs,
        "bare_start_ms": statistics.median(bare) / 1e6,
        "with_import_ms": statistics.median(loaded) / 1e6,
        "import_ms": (statistics.median(loaded) - statistics.median(bare)) / 1e6,
        "importtime_cumulative_ms": statistics.median(self_reported) / 1e3,
    }


# -- cleanup ----------------------------------------------------------------------------------
def _bindings() -> dict[int, str]:
    """Every bound loop device's number and backing file, as the kernel names it."""
    found = {}
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = entry.read_text(errors="surrogateescape").rstrip("\n")
        except OSError:
            continue  # unbound while we looked
        found[int(entry.parent.parent.name[4:])] = name.removesuffix(" (deleted)")
    return found


def _bound_to(image: str) -> list[int]:
    """Numbers of the devices whose backing file the kernel names as *image*."""
    return sorted(number for number, name in _bindings().items() if name == image)


def _others_bound(image: str) -> int:
    return sum(1 for name in _bindings().values() if name != image)


def sweep(image: str, identity: tuple[int, int]) -> list[str]:
    """Detach whatever is still bound to our image; returns the devices it had to detach.

    A device with autoclear set already had its LOOP_CLR_FD and is only waiting for its last
    opener (udev's probe, typically) to close it, so it is waited for, not cleared again.
    """
    deadline = time.monotonic() + SWEEP_TIMEOUT
    detached = []
    while True:
        waiting = []
        for number in _bound_to(image):
            try:
                dev = loopctl.get(number)
            except (loopctl.NotBound, loopctl.NotALoopDevice):
                continue
            if (dev.backing_devno, dev.backing_inode) != identity:
                continue
            if dev.autoclear:
                waiting.append(dev.path)
                continue
            dev.detach()
            detached.append(dev.path)
        if not waiting:
            return detached
        if time.monotonic() >= deadline:
            print(f"warning: {', '.join(waiting)} still held open after {SWEEP_TIMEOUT:g} s; "
                  "the kernel detaches them when their last user closes them", file=sys.stderr)
            return detached
        time.sleep(0.05)


# -- the run ----------------------------------------------------------------------------------
def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _measure_racing(measure: Callable[[int], float], n: int) -> float:
    for attempt in range(LOST_RACE_TRIES):
        if attempt:
            time.sleep(LOST_RACE_PAUSE)
        try:
            return measure(n)
        except LostRace as e:
            print(f"note: {e}; measuring again", file=sys.stderr)
    raise BenchError(f"lost the race for a free device {LOST_RACE_TRIES} times in a row: "
                     "another process is attaching loop devices")


def run(args: argparse.Namespace) -> dict:
    check_layout()
    binary = build_reference()
    udevd = os.path.exists(UDEV_CONTROL)
    workdir = tempfile.mkdtemp(prefix="flexblock-bench-")
    image = os.path.realpath(os.path.join(workdir, "image"))
    try:
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        st = os.stat(image)
        try:
            plan: dict[str, tuple[Callable[[int], float], int]] = {
                "c": (lambda n: run_reference(binary, image, n), args.iterations),
                "loopctl": (lambda n: run_loopctl(image, n), args.iterations),
                "fcntl": (lambda n: run_fcntl(image, n), args.iterations),
                "losetup": (lambda n: run_losetup(image, n), args.losetup_iterations),
            }
            for measure, n in plan.values():  # warm caches, create the devices
                _measure_racing(measure, max(1, n // 20))
            rounds: dict[str, list[float]] = {m: [] for m in METHODS}
            others = _others_bound(image)
            for r in range(args.rounds):
                for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                    measure, n = plan[method]
                    rounds[method].append(_measure_racing(measure, n))
                    others = max(others, _others_bound(image))
        finally:
            leftovers = sweep(image, (st.st_dev, st.st_ino))
            if leftovers:
                print(f"cleanup: detached {', '.join(leftovers)}, left bound by an interrupted "
                      "cycle", file=sys.stderr)
        # Stacked mounts list a line each, in mount order: the last one is in effect.
        fs_types = _output(["findmnt", "-n", "-o", "FSTYPE", "--target", workdir]).split()
        fs_type = fs_types[-1] if fs_types else ""
        imports = measure_import(args.import_runs, os.path.join(workdir, "pycache"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    per_cycle = {m: statistics.median(rounds[m]) for m in METHODS}
    c_us = per_cycle["c"]
    return {
        "version": JSON_SCHEMA_VERSION,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "losetup": _output(["losetup", "--version"]),
        "image_filesystem": fs_type or "unknown",
        "udevd_running": udevd,
        "other_bindings_seen": others,
        "iterations": args.iterations,
        "losetup_iterations": args.losetup_iterations,
        "rounds": args.rounds,
        "methods": {
            m: {"label": LABELS[m], "per_cycle_us": per_cycle[m], "vs_c": per_cycle[m] / c_us,
                "rounds_us": rounds[m]}
            for m in METHODS
        },
        "targets": {
            "loopctl_vs_c": {"value": per_cycle["loopctl"] / c_us, "max": TARGET_VS_C,
                             "met": per_cycle["loopctl"] / c_us <= TARGET_VS_C},
            "losetup_vs_loopctl": {
                "value": per_cycle["losetup"] / per_cycle["loopctl"],
                "min": TARGET_LOSETUP_VS_LOOPCTL,
                "met": per_cycle["losetup"] / per_cycle["loopctl"] >= TARGET_LOSETUP_VS_LOOPCTL},
        },
        "import": imports,
    }


def report(results: dict) -> None:
    print(f"attach+detach latency: {results['iterations']} cycles x {results['rounds']} rounds "
          f"(losetup {results['losetup_iterations']} x {results['rounds']}), median of rounds")
    print(f"kernel {results['kernel']}, Python {results['python']}, {results['losetup']}, "
          f"image on {results['image_filesystem']}")
    print(f"udevd running: {'yes' if results['udevd_running'] else 'no'}")
    if results["other_bindings_seen"]:
        print(f"note: up to {results['other_bindings_seen']} loop devices of other users were "
              "bound meanwhile; their activity makes these numbers noisier")
    print()
    header = ("method", "per cycle", "vs C", "rounds (min-max)")
    rows = [header]
    for m in METHODS:
        r = results["methods"][m]
        rows.append((r["label"], f"{r['per_cycle_us']:.1f} µs", f"{r['vs_c']:.2f}x",
                     f"{min(r['rounds_us']):.1f}-{max(r['rounds_us']):.1f} µs"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  "
              f"{row[3]:>{widths[3]}}")
    print()
    imports = results["import"]
    print(f"import loopctl: {imports['importtime_cumulative_ms']:.1f} ms (-X importtime, "
          f"cumulative; bytecode cached; median of {imports['runs']} fresh interpreters)")
    print(f"  wall time: python -c 'import loopctl' {imports['with_import_ms']:.1f} ms, "
          f"python -c pass {imports['bare_start_ms']:.1f} ms: {imports['import_ms']:+.1f} ms")
    t = results["targets"]
    vs_c, vs_cli = t["loopctl_vs_c"], t["losetup_vs_loopctl"]
    print(f"loopctl / C reference: {vs_c['value']:.2f}x (target <= {vs_c['max']:g}x): "
          f"{'met' if vs_c['met'] else 'NOT met'}")
    print(f"losetup / loopctl: {vs_cli['value']:.1f}x (target >= {vs_cli['min']:g}x): "
          f"{'met' if vs_cli['met'] else 'NOT met'}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _terminate(signum: int, frame) -> None:
    # Python would die at once on these: unwind instead, so that the cleanup runs.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Attach+detach latency of loopctl against a C reference, plain fcntl and "
                    "losetup.")
    parser.add_argument("--iterations", type=_positive, default=2000,
                        help="cycles per round for the C reference, loopctl and fcntl "
                             "(default: %(default)s)")
    parser.add_argument("--losetup-iterations", type=_positive, default=50,
                        help="cycles per round for losetup (default: %(default)s)")
    parser.add_argument("--rounds", type=_positive, default=5,
                        help="interleaved rounds, order alternating (default: %(default)s)")
    parser.add_argument("--import-runs", type=_positive, default=21,
                        help="fresh interpreters timed for the import time "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("attach_latency: needs root (it attaches loop devices)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        results = run(args)
    except (BenchError, OSError, subprocess.CalledProcessError) as e:
        print(f"attach_latency: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attach_latency: interrupted", file=sys.stderr)
        return 130
    report(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
