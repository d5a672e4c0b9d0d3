"""The loop backend: images attached through loopctl.

Devices are attached with autoclear, so the kernel unbinds them at their last close: once the
volume is unmounted, or as soon as a driver killed mid-call has its fds closed. The image lock
(loopctl's OFD lock) then goes with them.
"""

from __future__ import annotations

import errno
import os

import loopctl
from loopctl import LoopDevice

from ..mounts import MountEntry

LOOP_MAJOR = 7
IMAGE_FORMATS = ("raw",)


def lock_image(fd: int, *, read_only: bool, path: str) -> None:
    loopctl.lock_image(fd, exclusive=not read_only, path=path)


def attach(image_fd: int, *, read_only: bool, lock: bool, image_format: str = "raw",
           path: str | None = None) -> LoopDevice:
    return loopctl.attach(image_fd, read_only=read_only, autoclear=True, lock=lock)


def collect() -> None:
    """Nothing to collect: autoclear unbinds a device at its last close, also when the driver
    that attached it is killed."""


def device_for(mount: MountEntry) -> LoopDevice | None:
    """The bound loop device a mount lives on, if it is one: found by the mount's device
    number, or by its source for filesystems that report an anonymous one (btrfs)."""
    try:
        if os.major(mount.devno) == LOOP_MAJOR:
            return loopctl.get_by_devno(mount.devno)
        if mount.source.startswith("/dev/loop"):
            return loopctl.get(mount.source)
    except (loopctl.NotBound, loopctl.NotALoopDevice):
        return None
    except loopctl.LoopError as e:
        if e.errno != errno.ENOENT:  # the node is gone: not ours to find any more
            raise
    return None
