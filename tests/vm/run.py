"""Run the pytest tests marked `vm` inside a VM booting Debian's kernel: the real-kernel lane.

    .venv/bin/python tests/vm/run.py [lane options] [pytest args...]

Pytest args (node ids relative to the repository root, -k, -x, ...) go to the pytest in the VM,
which always gets `-m vm` first (a later -m of yours replaces it). Lane options:

    --timeout S     bound on the whole lane, install and boot included (default 1500, or
                    $FLEXBLOCK_VM_TIMEOUT); past it QEMU is killed and the lane fails
    --memory M      guest memory (default 2G)    --cpus N    guest CPUs (default 2)
    --console       show the guest kernel's console live (default: kept in a log file, whose
                    tail is shown when the lane fails)
    --no-install    skip tests/vm/install.sh (which is fast when everything is in place)
    --output DIR    copy the files the guest leaves in $FLEXBLOCK_VM_OUTPUT (a benchmark's
                    results) into DIR on the host; the repository is read-only in the guest

One boot runs all of them: install.sh (packages, virtme-ng, kernel), then `vng` boots the kernel
under TCG (software emulation: nested KVM hangs on the machines this runs on) with the host's
root shared read-only over 9p; guest.sh/guest.py load the modules, mount a scratch tmpfs and
run pytest in-process. The host collects the vm tests first (natively, in a second): with none
selected it says so and exits 0 without booting; else the VM's pytest gets just their files
(unless the args name tests themselves). The exit status is pytest's, except:
  - every test skipped, or any skipped as "not in the lane": failure (6, 3);
  - the VM's pytest collecting nothing when the host collected tests: failure (3);
  - the lane could not run (install failed, no QEMU, the VM died or never booted, no result):
    failure, loudly, with the console's tail; timeout: 124.
It prints the boot time (host wall time until the guest command starts, and the guest's uptime
then) and the total lane time. QEMU and everything vng started run in a process group of their
own, which is killed on timeout, on SIGINT/SIGTERM, and in any case once vng has returned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from vm.lane import HOST_KERNEL_ENV, LANE_ENV  # noqa: E402

# Modules udev would load at boot for q35's emulated hardware and the CPU, that no test uses:
# KVM (nested virtualisation under TCG is pointless), SATA/CD-ROM (the VM has no such disk),
# chipset, watchdog, speaker, PS/2 mouse. Loading them under TCG made up a good part of the
# boot. `modprobe` of one of these fails in the guest.
NOT_LOADED = ("kvm", "kvm_amd", "kvm_intel", "ahci", "libahci", "sr_mod", "cdrom", "i2c_i801",
              "iTCO_wdt", "lpc_ich", "pcspkr", "psmouse")
MARKER = "flexblock-vm: guest command started at uptime "
NO_TESTS = 5
TIMED_OUT = 124
LANE_FAILED = 3


def say(message: str) -> None:
    print(f"vm-lane: {message}", flush=True)


def fail(message: str, status: int = LANE_FAILED) -> NoReturn:
    print(f"vm-lane: ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(add_help=True, usage=__doc__.split("\n\n")[1])
    p.add_argument("--timeout", type=float,
                   default=float(os.environ.get("FLEXBLOCK_VM_TIMEOUT", 1500)))
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--console", action="store_true")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--venv", type=Path, default=REPO / ".venv")
    p.add_argument("--output", type=Path, metavar="DIR")
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="run this Python script in the VM (e.g. a benchmark) instead of "
                        "pytest; the remaining arguments go to it")
    if "--" in argv:
        i = argv.index("--")
        return p.parse_args(argv[:i]), argv[i + 1:]
    return p.parse_known_args(argv)


def install(venv: Path, deadline: float) -> None:
    try:
        r = subprocess.run(["bash", str(HERE / "install.sh"), str(venv)],
                           timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        fail("tests/vm/install.sh did not finish within the lane's timeout", TIMED_OUT)
    if r.returncode != 0:
        fail(f"tests/vm/install.sh failed (exit {r.returncode}): the lane cannot run here")


def find_kernel() -> Path:
    cache = Path(os.environ.get("FLEXBLOCK_VM_CACHE", "/var/lib/flexblock-vm"))
    kernels = sorted(cache.glob("*/.complete"), key=lambda p: p.stat().st_mtime)
    if not kernels:
        fail(f"no kernel unpacked under {cache} (tests/vm/install.sh puts it there)")
    root = kernels[-1].parent
    image = root / "boot" / f"vmlinuz-{root.name}"
    if not image.is_file():
        fail(f"{image} is missing")
    return image


def names_tests(args: list[str]) -> bool:
    """Whether the pytest args name test paths or node ids (else the lane adds its files)."""
    return any(not a.startswith("-") and ("::" in a or (REPO / a).exists()) for a in args)


# Run by the venv's Python on the host: pytest's collection, printing each selected test's file
# on a line of its own whatever the verbosity options say.
_COLLECT = """
import sys, pytest
class Files:
    def pytest_collection_finish(self, session):
        for f in sorted({item.nodeid.split("::", 1)[0] for item in session.items}):
            print("flexblock-vm-file:", f, flush=True)
sys.exit(pytest.main(sys.argv[1:], plugins=[Files()]))
"""


def collect_on_host(python: Path, pytest_args: list[str], deadline: float) -> list[str]:
    """The files holding the vm tests, collected on the host.

    Natively this takes a second; in the VM, importing every test module of the suite over 9p
    under TCG takes half a minute or more. So the VM's pytest is given these files only.
    """
    cmd = [str(python), "-c", _COLLECT, "--collect-only", "-p", "no:cacheprovider", "-m", "vm",
           *pytest_args]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           timeout=max(1.0, min(300.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        fail("collecting the vm tests on the host timed out", TIMED_OUT)
    if r.returncode == NO_TESTS:
        return []
    if r.returncode != 0:
        fail(f"collecting the vm tests on the host failed (pytest exit {r.returncode}):\n"
             f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    files = [line.split(" ", 1)[1] for line in r.stdout.splitlines()
             if line.startswith("flexblock-vm-file: ")]
    if not files:
        fail(f"pytest collected something but listed no test file:\n{r.stdout[-3000:]}")
    return files


def cached_exports(python: Path) -> list[tuple[str, Path]]:
    """Read-only directories to share again with 9p's page cache on (tag, host path = guest path).

    virtme-ng mounts the shared root without any cache, so each of Python's many stat() and
    open() calls while importing is a round trip to the host; under TCG, importing pytest and
    the suite's modules took 11 s that way and 4-6 s through a `cache=loose` mount of the same
    files. guest.sh mounts these over their own paths. Files on them do not change while the
    lane runs (the lane never writes there, and an edit on the host during a run is not seen).
    """
    prefix = Path(subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    candidates = [("fbrepo", REPO), ("fbpython", prefix.resolve())]
    venv = python.parent.parent.resolve()
    if not venv.is_relative_to(REPO):
        candidates.append(("fbvenv", venv))
    exports = []
    for tag, path in candidates:
        # Nothing as wide as /usr (a system Python's prefix) nor under the guest's own /tmp,
        # and nothing that the shell vng runs QEMU through would split or mangle.
        if (path.is_dir() and len(path.parts) > 3 and path.parts[1] != "tmp"
                and re.fullmatch(r"[A-Za-z0-9_./+-]+", str(path))):
            exports.append((tag, path))
    return exports


class Group:
    """The process group of vng and what it starts (virtme-run, QEMU)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the group is the leader's pid

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def kill(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it after a grace period."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + grace
            while time.monotonic() < end:
                self.proc.poll()  # reap the leader so the group can empty
                if not self.alive():
                    return
                time.sleep(0.05)
        self.proc.poll()


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    opts, pytest_args = parse_args(argv)
    deadline = t0 + opts.timeout
    if os.geteuid() != 0:
        fail("the lane needs root (it installs packages; the guest runs as the same user)")

    if not opts.no_install:
        install(opts.venv, deadline)
    vng = opts.venv / "bin" / "vng"
    python = opts.venv / "bin" / "python"
    qemu = shutil.which("qemu-system-x86_64")
    for what, path in (("vng (virtme-ng)", vng), ("the venv's python", python)):
        if not os.access(path, os.X_OK):
            fail(f"{what} not found at {path}: run tests/vm/install.sh")
    if qemu is None:
        fail("qemu-system-x86_64 not found: run tests/vm/install.sh")
    kernel = find_kernel()

    if opts.script is not None:
        request = {"script": [str(opts.script.resolve()), *pytest_args]}
    else:
        files = collect_on_host(python, pytest_args, deadline)
        if not files:
            say(f"no vm tests collected (pytest -m vm {shlex.join(pytest_args)}): nothing to "
                "run in the VM (exit 0)")
            return 0
        if not names_tests(pytest_args):
            pytest_args = [*pytest_args, *files]
        request = {"pytest_args": pytest_args}

    xchg = Path(tempfile.mkdtemp(prefix="flexblock-vm-"))
    console_fd, console_log = tempfile.mkstemp(prefix="flexblock-vm-console-", suffix=".log")
    console = os.fdopen(console_fd, "wb", buffering=0)
    (xchg / "args.json").write_text(json.dumps(request))
    exports = cached_exports(python)
    qemu_opts = []
    for tag, path in exports:
        qemu_opts += ["-fsdev", f"local,id={tag},path={path},security_model=none,readonly=on,"
                      "multidevs=remap", "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    guest_env = {LANE_ENV: "1", HOST_KERNEL_ENV: platform.release(),
                 "FLEXBLOCK_VM_XCHG": str(xchg), "FLEXBLOCK_VM_PYTHON": str(python),
                 "FLEXBLOCK_VM_CACHED": " ".join(f"{tag}:{path}" for tag, path in exports)}
    if opts.output is not None:
        (xchg / "output").mkdir()
        guest_env["FLEXBLOCK_VM_OUTPUT"] = str(xchg / "output")
    guest_cmd = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in guest_env.items()),
                          "/bin/sh", shlex.quote(str(HERE / "guest.sh"))])
    cmd = [str(vng), "--run", str(kernel), "--disable-kvm",
           # The qemu 7.2 package's C virtiofsd is found first and fails, after a 3 s wait,
           # before vng falls back to 9p: go to 9p at once.
           "--force-9p",
           "--cpus", str(opts.cpus), "--memory", opts.memory, "--name", "flexblock-vm",
           "--append", f"module_blacklist={','.join(NOT_LOADED)}",
           "--verbose", "--rwdir", str(xchg), "--cwd", str(REPO), "--exec", guest_cmd,
           # One word, split by the shell vng runs virtme-run with (hence the plain paths).
           *([f"--qemu-opts={' '.join(qemu_opts)}"] if qemu_opts else [])]
    env = dict(os.environ)
    env["PATH"] = f"{opts.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # vng runs virtme-run

    say(f"booting {kernel.name} under TCG ({opts.cpus} CPUs, {opts.memory}); "
        f"host kernel {platform.release()}")
    groups: list[Group] = []

    def on_signal(signum, _frame):
        say(f"got signal {signum}: killing the VM (guest console in {console_log})")
        for group in groups:
            group.kill()
        shutil.rmtree(xchg, ignore_errors=True)
        sys.exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    t_boot = time.monotonic()
    # QEMU opens the files behind its stdout and stderr anew, truncating them: give it pipes,
    # never a log file of the caller's.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    group = Group(proc)
    groups.append(group)
    guest_started: list[float] = []
    guest_uptime: list[float] = []

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            if not guest_started and line.startswith(MARKER):
                guest_started.append(time.monotonic())
                try:
                    guest_uptime.append(float(line[len(MARKER):].split()[0]))
                except (ValueError, IndexError):
                    pass
            sys.stdout.write(line)
            sys.stdout.flush()

    def pump_console():
        for raw in proc.stderr:
            console.write(raw)
            if opts.console:
                sys.stderr.write(raw.decode("utf-8", "replace"))
                sys.stderr.flush()
        console.close()

    readers = [threading.Thread(target=pump, daemon=True),
               threading.Thread(target=pump_console, daemon=True)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        vng_status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        vng_status = None
    # Whatever happened, nothing of the VM outlives this point. (vng waits for QEMU, so once it
    # has returned the group is normally empty already, and is left alone then.)
    lingering = group.alive()
    if lingering:
        group.kill()
    for reader in readers:
        reader.join(timeout=5)
    t_end = time.monotonic()

    result = None
    try:
        result = json.loads((xchg / "result.json").read_text())
    except (OSError, ValueError):
        pass
    if opts.output is not None:
        opts.output.mkdir(parents=True, exist_ok=True)
        for produced in sorted((xchg / "output").iterdir()):
            shutil.copy2(produced, opts.output / produced.name)
            say(f"guest output: {opts.output / produced.name}")
    shutil.rmtree(xchg, ignore_errors=True)

    boot = (f"boot {guest_started[0] - t_boot:.1f} s (guest uptime {guest_uptime[0]:.1f} s "
            "when its command started)" if guest_started and guest_uptime else "no boot")
    pytest_time = ""
    if result and "uptime_at_pytest" in result:
        pytest_time = (f", guest set-up {result['uptime_at_pytest'] - guest_uptime[0]:.1f} s"
                       if guest_uptime else "")
        pytest_time += f", pytest {result['uptime_at_end'] - result['uptime_at_pytest']:.1f} s"
        if result.get("uptime_collected"):
            pytest_time += (" (collection "
                            f"{result['uptime_collected'] - result['uptime_at_pytest']:.1f} s)")
    say(f"{boot}{pytest_time}, lane total {t_end - t0:.1f} s")

    def console_tail() -> None:
        if opts.console:
            return
        try:
            lines = Path(console_log).read_text(errors="replace").splitlines()
        except OSError:
            return
        print(f"vm-lane: last lines of the guest console ({console_log}):", file=sys.stderr)
        for line in lines[-40:]:
            print(f"  | {line}", file=sys.stderr)
        sys.stderr.flush()

    if timed_out:
        console_tail()
        fail(f"timed out after {opts.timeout:.0f} s; QEMU was killed", TIMED_OUT)
    if lingering:
        say("note: processes of the VM were still running after vng returned; killed them")
    if not guest_started:
        console_tail()
        fail(f"the VM never started the guest command (vng exit {vng_status})")
    if result is None or "status" not in result:
        console_tail()
        fail(f"the guest wrote no result (vng exit {vng_status}: 255 is a kernel panic or a "
             "guest that died)")
    if vng_status != result["status"]:
        console_tail()
        fail(f"vng returned {vng_status} but the guest reported {result['status']}")
    status = result["status"]
    if status == 0:
        os.unlink(console_log)
    else:
        say(f"the guest console is kept in {console_log}")
    if status == NO_TESTS and opts.script is None:
        fail(f"the host collected vm tests in {', '.join(files)} but the VM's pytest collected "
             "none")
    if "passed" in result:
        # The plain closing line of a test run, for whoever reads the log's last lines.
        say(f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
