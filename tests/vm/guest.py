"""Inside the lane's VM: load the kernel modules, make the scratch tmpfs, run pytest, report.

Started by guest.sh (started by tests/vm/run.py through `vng --exec`), as root, with the working
directory at the repository and the environment of vm.lane set. Reads args.json from the exchange
directory (a 9p share of a host directory, $FLEXBLOCK_VM_XCHG), writes result.json there and exits
with the lane's status, which vng hands back to the host.

The host's root is shared read-only: the repository, /root and every directory not overlaid by
virtme-ng cannot be written. Writable are virtme-ng's RAM overlays (/etc, /var, /tmp, /usr, /lib,
/home, /opt, /srv; nothing reaches the host) and the scratch tmpfs made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for vm.lane
from vm.lane import MODULES, NOT_IN_LANE, SCRATCH_ENV  # noqa: E402

SCRATCH = Path("/tmp/flexblock-vm")

# Exit statuses of the lane beyond pytest's own (0-5).
LANE_BROKEN = 3  # pytest's "internal error" too: either way the lane did not do its job
ALL_SKIPPED = 6


def uptime() -> float:
    with open("/proc/uptime", encoding="ascii") as f:
        return float(f.read().split()[0])


def say(message: str) -> None:
    print(f"flexblock-vm: {message}", flush=True)


def stop_udevd() -> None:
    """Give the tests the host's situation: no udevd unless a test (the conftest) starts one.

    virtme-ng's init starts systemd-udevd for the boot; the suite's udev_mode fixture runs every
    test without udevd and again with one it starts itself, and cannot do the first while a
    udevd it did not start is running.
    """
    if subprocess.run(["udevadm", "control", "--exit"], capture_output=True).returncode != 0:
        return  # none running
    for leftover in ("/run/udev/control",):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass


def load_modules(modules: list[str]) -> None:
    # One modprobe for all. (Loading them while Python starts, in the background, saved about
    # 1 s of 10: the two vCPUs are emulated on the host's two cores.)
    r = subprocess.run(["modprobe", "-a", *modules], capture_output=True, text=True)
    missing = [m for m in modules if not os.path.isdir(f"/sys/module/{m}")]
    if r.returncode != 0 or missing:
        raise SystemExit(f"cannot load kernel modules {' '.join(missing or modules)}: "
                         f"{r.stderr.strip() or f'modprobe exit {r.returncode}'}")


def make_scratch() -> None:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    # A tmpfs of its own (half the guest's memory at most, allocated as used), so that test data
    # never competes with virtme-ng's overlays and is gone at power-off.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "flexblock-vm", str(SCRATCH)],
                   check=True)
    for sub in ("tmp", "pytest"):
        (SCRATCH / sub).mkdir()


class LaneCount:
    """Counts outcomes, to tell a lane that ran nothing from one that passed."""

    def __init__(self, not_in_lane_reason: str):
        self.not_in_lane_reason = not_in_lane_reason
        self.passed = self.failed = self.skipped = 0
        self.skipped_as_outside = []
        self.collected_at = None

    def pytest_collection_finish(self, session):
        self.collected_at = uptime()

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed += 1
        elif report.skipped:
            self.skipped += 1
            if self.not_in_lane_reason in str(report.longrepr):
                self.skipped_as_outside.append(report.nodeid)
        elif report.when == "call":
            self.passed += 1


def main() -> int:
    os.dup2(1, 2)  # one ordered stream to the host; the host's stderr carries the kernel console
    started = uptime()
    xchg = Path(os.environ["FLEXBLOCK_VM_XCHG"])
    request = json.loads((xchg / "args.json").read_text())
    result: dict = {"uptime_at_start": started}

    def finish(status: int) -> int:
        result["status"] = status
        result["uptime_at_end"] = uptime()
        (xchg / "result.json").write_text(json.dumps(result))
        return status

    try:
        load_modules(list(MODULES))
        result["uptime_modules_loaded"] = uptime()
        make_scratch()
        stop_udevd()
    except (SystemExit, subprocess.CalledProcessError, OSError) as e:
        say(f"ERROR: the guest could not be prepared: {e}")
        return finish(LANE_BROKEN)
    os.environ["TMPDIR"] = str(SCRATCH / "tmp")
    os.environ[SCRATCH_ENV] = str(SCRATCH)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the repository is read-only here
    sys.dont_write_bytecode = True
    result["uptime_at_pytest"] = uptime()
    say(f"python and pytest imported at {started:.1f} s; modules ({' '.join(MODULES)}) "
        f"loaded at {result['uptime_modules_loaded']:.1f} s; scratch tmpfs at {SCRATCH}; "
        f"starting pytest at uptime {result['uptime_at_pytest']:.1f} s")

    if "script" in request:
        # A script (a benchmark) instead of the tests: its exit status is the lane's.
        return finish(subprocess.run([sys.executable, *request["script"]]).returncode)

    import pytest

    count = LaneCount(NOT_IN_LANE)
    args = ["-p", "no:cacheprovider", f"--basetemp={SCRATCH / 'pytest'}", "-m", "vm",
            *request["pytest_args"]]
    status = int(pytest.main(args, plugins=[count]))
    result.update(passed=count.passed, failed=count.failed, skipped=count.skipped,
                  pytest_status=status, uptime_collected=count.collected_at)
    if count.skipped_as_outside:
        say(f"ERROR: {len(count.skipped_as_outside)} test(s) skipped as if outside the lane, "
            f"e.g. {count.skipped_as_outside[0]}: the lane's environment did not reach them")
        status = status or LANE_BROKEN
    elif status == 0 and count.passed == 0:
        say("ERROR: every vm test was skipped; the lane proves nothing (see the skip reasons)")
        status = ALL_SKIPPED
    return finish(status)


if __name__ == "__main__":
    sys.exit(main())
