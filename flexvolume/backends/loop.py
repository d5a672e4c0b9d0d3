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
    # Without the image lock, ext4's MMP is the only guard against a second node, and it only
    # works if its heartbeat reaches the share and the other node reads the share, not its own
    # page cache of the image. On NFS a buffered loop device does neither (the writer's client
    # writes the heartbeat back some 30 s later, the reader serves its stale copy): a second
    # node mounted the volume (tests/driver/test_vm_two_nodes.py). So no lock, direct I/O.
    # With the lock, which the share carries to every node, the device stays buffered: direct
    # I/O sends every 4 KiB block as an RPC of its own: 3x fewer RPCs than plain NFS for small
    # files instead of 16x (bench/nfs_small_files.py). Where the share has no O_DIRECT (tmpfs)
    # the kernel keeps the device buffered, which a single page cache makes safe.
    # A buffered device reads its image through this open file (the kernel keeps our file),
    # so the file's readahead window is what a cold read of ext4's scattered metadata
    # fetches at a time: sequential doubles it (on NFS: 137 -> 94 READs for reading back
    # 3000 small files, bench/nfs_small_files.py). Direct I/O does not read ahead at all.
    os.posix_fadvise(image_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return loopctl.attach(image_fd, read_only=read_only, autoclear=True, lock=lock,
                          direct_io=not lock)


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
