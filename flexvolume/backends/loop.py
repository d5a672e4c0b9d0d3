"""The loop backend: images attached through loopctl.

Devices are attached with autoclear, so the kernel unbinds them at their last close: once the
volume is unmounted, or as soon as a driver killed mid-call has its fds closed. The image lock
(loopctl's OFD lock) then goes with them.
"""

from __future__ import annotations

import loopctl
from loopctl import LoopDevice


def attach(image_fd: int, *, read_only: bool, lock: bool) -> LoopDevice:
    return loopctl.attach(image_fd, read_only=read_only, autoclear=True, lock=lock)


def device_for(devno: int) -> LoopDevice | None:
    """The bound loop device with number *devno*, if it is one."""
    try:
        return loopctl.get_by_devno(devno)
    except (loopctl.NotBound, loopctl.NotALoopDevice):
        return None
