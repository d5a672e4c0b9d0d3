"""The loopctl suite runs twice: once with no udevd, where device nodes come from devtmpfs alone
and nobody else opens our devices, and once with systemd-udevd running, which probes every device
we bind (so detaches become lazy) and tells loopctl about nodes through its event stream.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass

import pytest

from loopctl import _devnode

from helpers import run, wait_until

UDEVD = "/lib/systemd/systemd-udevd"
RUN_UDEV = "/run/udev"
UDEVD_NAMES = ("systemd-udevd", "udevd")
UDEV_WORKER = "(udev-worker)"  # what workers of udev >= 252 call themselves


# -- udevd -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Process:
    pid: int
    start_time: str  # field 22 of /proc/PID/stat: tells a reused pid from the process we started

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); a zombie has exited already.
    return None if fields[0] == "Z" else fields[19]


def _comm_and_ppid(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            head, rest = f.read().rsplit(")", 1)
    except OSError:
        return None
    return head.split("(", 1)[1], int(rest.split()[1])


def _udevd_processes() -> dict[int, tuple[str, int]]:
    """Live udevd daemons and their workers: pid -> (comm, ppid)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (cp := _comm_and_ppid(int(entry))) and _start_time(int(entry)):
            if cp[0] in UDEVD_NAMES or cp[0] == UDEV_WORKER:
                procs[int(entry)] = cp
    return procs


def udevd_main_processes() -> list[_Process]:
    """Running udevd daemons (not their workers)."""
    procs = _udevd_processes()
    mains = []
    for pid, (comm, ppid) in sorted(procs.items()):
        # A worker forked just before its daemon exited may not have renamed itself yet and be
        # re-parented: it counts until it is gone too.
        if comm in UDEVD_NAMES and ppid not in procs and (start := _start_time(pid)):
            mains.append(_Process(pid, start))
    return mains


def _start_udevd() -> _Process:
    run(UDEVD, "--daemon")
    if not wait_until(lambda: os.path.exists(_devnode.UDEV_CONTROL)):
        pytest.fail(f"{UDEVD} --daemon started but {_devnode.UDEV_CONTROL} did not appear")
    mains = udevd_main_processes()
    if len(mains) != 1:
        pytest.fail(f"expected the one udevd we started, found {mains}")
    return mains[0]


def _stop_udevd(proc: _Process, *, had_run_udev: bool, had_control: bool) -> None:
    if proc.alive():
        os.kill(proc.pid, signal.SIGTERM)
        if not wait_until(lambda: not proc.alive()) and proc.alive():
            os.kill(proc.pid, signal.SIGKILL)
            wait_until(lambda: not proc.alive())
    # We started it when no udevd ran, so udevd processes left now are its exiting workers
    # (unless another session started its own meanwhile: then this waits in vain, and
    # /run/udev, which that udevd uses, stays).
    wait_until(lambda: not _udevd_processes())
    # udevd leaves its control socket behind, and loopctl takes that socket for a running udevd.
    if not _udevd_processes():
        if not had_run_udev:
            shutil.rmtree(RUN_UDEV, ignore_errors=True)
        elif not had_control and os.path.exists(_devnode.UDEV_CONTROL):
            os.unlink(_devnode.UDEV_CONTROL)


class _UdevdKeeper:
    """Keeps a udevd running for the udevd mode: anyone's, or else one we start (and stop)."""

    def __init__(self):
        self.started: _Process | None = None
        self.had_run_udev = os.path.exists(RUN_UDEV)
        self.had_control = os.path.exists(_devnode.UDEV_CONTROL)

    def ensure(self) -> None:
        if udevd_main_processes() and _devnode.udevd_running():
            return
        if self.started is None:
            self.had_run_udev = os.path.exists(RUN_UDEV)
            self.had_control = os.path.exists(_devnode.UDEV_CONTROL)
        self.started = _start_udevd()

    def stop(self) -> None:
        if self.started is not None:
            _stop_udevd(self.started, had_run_udev=self.had_run_udev,
                        had_control=self.had_control)
            self.started = None


_keeper = _UdevdKeeper()


@pytest.fixture(scope="session", params=["no-udevd", "udevd"], autouse=True)
def udev_mode(request):
    """Run the whole suite once without udevd and once with it."""
    if request.param == "no-udevd":
        foreign = udevd_main_processes()
        if foreign:
            pytest.skip(f"a udevd we did not start is running (pid {foreign[0].pid}); it is "
                        "not ours to stop, so the no-udevd mode cannot run")
        if os.path.exists(_devnode.UDEV_CONTROL):
            pytest.skip(f"{_devnode.UDEV_CONTROL} exists but no udevd runs (left over?); "
                        "loopctl would take it for a running udevd")
        assert not _devnode.udevd_running()
        yield request.param
        return
    try:
        _keeper.ensure()
        assert _devnode.udevd_running()
        yield request.param
    finally:
        _keeper.stop()


@pytest.fixture(autouse=True)
def _udev_mode_still_holds(udev_mode):
    """Keep the mode true for each test although another test session on this machine may
    start or stop a udevd meanwhile: skip in the no-udevd mode, start our own in the other."""
    if udev_mode == "no-udevd" and _devnode.udevd_running():
        pytest.skip("a udevd was started by someone else during the no-udevd run")
    if udev_mode == "udevd":
        _keeper.ensure()


