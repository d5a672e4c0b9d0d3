"""Opening /dev/loopN, waiting for the node when it is not there yet.

On devtmpfs the kernel creates the node before LOOP_CTL_GET_FREE returns, so the first open
almost always succeeds. A node can still be missing or not yet accessible: a static /dev (some
containers) filled in by udev rules, or udev still applying permissions. When udevd runs we wait
on its event stream (pyudev, imported only then); otherwise the node can only appear by itself,
so we poll, as util-linux does (UL 663bf0406).
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import _sysfs
from .errors import LoopError, NotALoopDevice

DEV_DIR = "/dev"
NODE_PREFIX = f"{DEV_DIR}/loop"
# libudev's own test for a running udevd (udev_queue_get_udev_is_active).
UDEV_CONTROL = "/run/udev/control"
NODE_TIMEOUT = 5.0
POLL_INTERVAL = 0.025
_WAIT_ERRNOS = (errno.ENOENT, errno.EACCES)
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def node_path(number: int) -> str:
    return f"{NODE_PREFIX}{number}"


def open_flags(writable: bool) -> int:
    return _OPEN_FLAGS | (os.O_RDWR if writable else os.O_RDONLY)


def udevd_running() -> bool:
    return os.path.exists(UDEV_CONTROL)


def open_node(number: int, *, writable: bool, timeout: float = NODE_TIMEOUT) -> int:
    """Open loop device *number*, checking that the node really is that device."""
    path = node_path(number)
    flags = open_flags(writable)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno not in _WAIT_ERRNOS:
            raise LoopError(e.errno, f"cannot open device: {e.strerror}", path) from None
        fd = _open_when_ready(path, flags, timeout)
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != _sysfs.devno(number):
            raise NotALoopDevice(errno.ENODEV, "node is not the loop device it is named after", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_when_ready(path: str, flags: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    monitor = _udev_block_monitor() if udevd_running() else None
    while True:
        # Try again after the monitor started listening, so no event falls between the two.
        try:
            return os.open(path, flags)
        except OSError as e:
            if e.errno not in _WAIT_ERRNOS:
                raise LoopError(e.errno, f"cannot open device: {e.strerror}", path) from None
            last_error = e
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LoopError(last_error.errno,
                            f"device node not ready after {timeout:g} s: {last_error.strerror}",
                            path)
        if monitor is not None:
            # Any block event may be the one; the open above is the real test. Wake up now and
            # then anyway: the node may come from devtmpfs without an event reaching us.
            monitor.poll(timeout=min(remaining, 0.25))
        else:
            time.sleep(min(remaining, POLL_INTERVAL))


def _udev_block_monitor():
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by("block")
    monitor.start()
    return monitor
