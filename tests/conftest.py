"""Fixtures for the whole suite, which drives real loop devices, mkfs and mounts as root.

Whatever a test does, `leak_guard` detaches at teardown every loop device backed by a file under
that test's tmp_path and unmounts everything mounted there. It identifies devices by their
backing file only, so devices attached by anyone else on the machine are never touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import loopctl
from loopctl import _sysfs
from loopctl._ffi import lib

from helpers import (MiB, WAIT_TIMEOUT, bound_under, is_under, losetup_associated, make_image,
                     mounts_under, run, sysfs_backing_file, wait_until)

LOOP_CONTROL = "/dev/loop-control"


def _unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "loopctl tests attach real loop devices and need root"
    if not os.path.exists(LOOP_CONTROL):
        return f"{LOOP_CONTROL} is missing: no loop driver in this kernel"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _unusable_reason()
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


# -- leak guard --------------------------------------------------------------------------------
def _clear_if_ours(number: int, root: str) -> None:
    """LOOP_CLR_FD on /dev/loopN, if it is still bound to a file under *root* once we hold it.

    While our fd is open the binding cannot end (a clear by anyone waits for the last close),
    so the device we check is the device we clear. Closing our fd then completes the clear.
    """
    try:
        fd = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return  # gone, in rundown (ENXIO), or no node
    try:
        if number in bound_under(root):
            try:
                fcntl.ioctl(fd, lib.LOOP_CLR_FD, 0)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
    finally:
        os.close(fd)


def _candidates(root: Path) -> set[int]:
    """Devices under *root* by sysfs, cross-checked with loopctl and `losetup -j`."""
    numbers = bound_under(root)
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    try:
        numbers |= {d.number for d in loopctl.list_devices()
                    if d.backing_file and is_under(d.backing_file, root)}
        for f in files:
            numbers |= {d.number for d in loopctl.find(f)}
    except Exception:  # loopctl is what is under test; sysfs and losetup still find them
        pass
    for f in files:
        numbers |= losetup_associated(f)
    return numbers


def _close_our_fds_on(numbers: set[int]) -> None:
    """Close fds this process still has open on those devices.

    A failed test can leave an attach() handle alive in its traceback; its fd keeps the device
    open, and an open device is only cleared at its last close. Every other fixture has been
    torn down by now, so nothing will use those fds again.
    """
    devnos = {_sysfs.devno(n) for n in numbers}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in devnos:
            os.close(int(name))


def release_everything_under(root: Path) -> list[str]:
    """Detach and unmount everything of ours under *root*; what could not be, as messages."""
    root_text = str(root)
    numbers = _candidates(root) if root.exists() else bound_under(root)
    _close_our_fds_on(numbers)
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        mounts = mounts_under(root_text)
        if not numbers and not mounts:
            return []
        if time.monotonic() >= deadline:
            break
        # Mounted devices stay bound (autoclear) until unmounted; busy mounts (a backing file
        # still open by a device) unmount on a later round.
        for number in sorted(numbers):
            _clear_if_ours(number, root_text)
        for target in mounts:
            subprocess.run(["umount", target], capture_output=True)
        time.sleep(0.02)
        numbers = bound_under(root)
    problems = []
    for target in mounts_under(root_text):
        subprocess.run(["umount", "-l", target], capture_output=True)
        problems.append(f"{target} was still mounted (unmounted lazily)")
    for number in sorted(bound_under(root)):
        problems.append(f"/dev/loop{number} is still bound to {sysfs_backing_file(number)}")
    return problems


@pytest.fixture(autouse=True)
def leak_guard(tmp_path):
    """At teardown, pass or fail, release every device and mount under this test's tmp_path."""
    yield
    problems = release_everything_under(tmp_path.resolve())
    if problems:
        pytest.fail("teardown could not release: " + "; ".join(problems))


# -- images, mounts, CLI -----------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    """image(size=16 MiB, name=None, directory=tmp_path) -> Path of a new sparse file."""
    counter = iter(range(1, 10**6))

    def make(size: int = 16 * MiB, name: str | None = None, directory: Path | None = None) -> Path:
        name = name or f"disk{next(counter)}.img"
        return make_image((directory or tmp_path) / name, size)

    return make


@pytest.fixture
def mount(tmp_path):
    """mount(*mount_args, name=...) -> Path: mount something at tmp_path/name (leak_guard
    unmounts it)."""

    def do_mount(*args: str | os.PathLike, name: str) -> Path:
        target = tmp_path / name
        target.mkdir(exist_ok=True)
        run("mount", *args, target)
        return target

    return do_mount


@pytest.fixture
def read_only_dir(tmp_path, mount):
    """A directory holding disk.img (4 MiB), seen through a read-only bind mount.

    chmod is no obstacle to root; a read-only mount is (EROFS)."""
    src = tmp_path / "src"
    src.mkdir()
    make_image(src / "disk.img", 4 * MiB)
    target = mount("--bind", src, name="ro")
    run("mount", "-o", "remount,bind,ro", target)
    return target


def _loopctl_executable() -> Path:
    scripts = Path(sysconfig.get_path("scripts"))
    for directory in (scripts, Path(sys.executable).parent):
        if (directory / "loopctl").exists():
            return directory / "loopctl"
    pytest.fail(f"no loopctl script next to {sys.executable}: install the project (make venv)")


@pytest.fixture(scope="session")
def cli():
    """cli(*args) -> (returncode, stdout, stderr) of the installed `loopctl` command."""
    executable = _loopctl_executable()

    def run_cli(*args: str | os.PathLike) -> tuple[int, str, str]:
        p = subprocess.run([executable, *map(os.fspath, args)], capture_output=True, text=True,
                           timeout=120)
        return p.returncode, p.stdout, p.stderr

    return run_cli


# -- a loop device of our own, unbound ---------------------------------------------------------
@dataclass(frozen=True)
class SpareLoop:
    number: int
    devno: int

    @property
    def path(self) -> str:
        return f"/dev/loop{self.number}"


def _node_is(path: str, devno: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == devno


def _add_loop(ctl: int, first: int) -> int:
    number = first
    while True:
        if not os.path.exists(f"/sys/block/loop{number}") and not os.path.lexists(
                f"/dev/loop{number}"):
            try:
                return fcntl.ioctl(ctl, lib.LOOP_CTL_ADD, number)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
        number += 1


def _remove_loop(ctl: int, spare: SpareLoop) -> None:
    """LOOP_CTL_REMOVE *spare*, its node restored first if a test removed or replaced it."""
    if os.path.exists(f"/sys/block/loop{spare.number}"):
        if not _node_is(spare.path, spare.devno):
            if os.path.lexists(spare.path):
                os.unlink(spare.path)
            os.mknod(spare.path, 0o660 | stat.S_IFBLK, spare.devno)

        def removed() -> bool:
            try:
                fcntl.ioctl(ctl, lib.LOOP_CTL_REMOVE, spare.number)
            except OSError as e:
                if e.errno == errno.EBUSY:  # udevd may still be probing it
                    return False
                if e.errno != errno.ENODEV:
                    raise
            return True

        assert wait_until(removed), f"LOOP_CTL_REMOVE {spare.number}: still busy"
    # devtmpfs removes the node it made, not one we made with mknod.
    if _node_is(spare.path, spare.devno) and not os.path.exists(f"/sys/block/loop{spare.number}"):
        os.unlink(spare.path)


@pytest.fixture
def spare_loop():
    """An unbound loop device we create with LOOP_CTL_ADD at the first free number >= 100,
    and remove afterwards."""
    ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        number = _add_loop(ctl, 100)
        with open(f"/sys/block/loop{number}/dev", encoding="utf-8") as f:
            major, minor = map(int, f.read().split(":"))
        spare = SpareLoop(number, os.makedev(major, minor))
        try:
            assert wait_until(lambda: _node_is(spare.path, spare.devno))
            yield spare
        finally:
            _remove_loop(ctl, spare)
    finally:
        os.close(ctl)
