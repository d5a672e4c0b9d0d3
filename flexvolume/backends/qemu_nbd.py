"""The qemu-nbd backend: each image served by a qemu-nbd daemon of its own and connected to a
kernel NBD device (nbd_served: found again from the kernel, calls serialised per image, a
killed call's leftovers collected). The server's identity is the image's ``<dev>-<ino>``, and
its device's backend identifier ``flexblock:<dev>-<ino>``.

The image lock (``lock`` option) is one byte at LOCK_OFFSET. It is taken on the driver's own
open file first, so a busy image is refused before any server opens it; a qemu-nbd inherits
that open file, a spare server gets the lock moved onto its own open file of the image
(nbd.server.open_image): either way it lasts exactly as long as the server. qemu's own locks (bytes 100-300, shared, and they do not stop a second server of a raw
image) coexist with it; the whole-file lock of a loop attach conflicts with it, so the two
backends exclude each other on a shared image.
"""

from __future__ import annotations

import os

import loopctl
import nbd
from nbd import server

from ..errors import DriverError
from ..mounts import MountEntry
from .nbd_served import Family, NbdVolume

IMAGE_FORMATS = ("raw", "qcow2")
LOCK_OFFSET = 1 << 62
FAMILY = Family("flexblock:", "/run/flexblock/volumes")
# expandfs answers this (volume.expandfs) before it touches the image. The kernel takes an NBD
# device's size only at connect (netlink RECONFIGURE and the ioctls cannot change it on a
# netlink device), and qemu-nbd reads it only at start.
GROWTH_REFUSAL = ("a qemu-nbd volume cannot grow while mounted; unmount it (delete the pod), "
                  "grow the image with qemu-img resize, and mount it again")


def lock_image(fd: int, *, read_only: bool, path: str) -> None:
    loopctl.lock_image(fd, exclusive=not read_only, path=path, offset=LOCK_OFFSET, length=1)


class ImageVolume(NbdVolume):
    """The NBD device an image file is connected to: its identity names the image."""

    def __init__(self, index: int, ident: str, claim_fd: int | None):
        super().__init__(FAMILY, index, ident, claim_fd)
        dev, ino = ident.split("-")
        self.backing_devno, self.backing_inode = int(dev, 16), int(ino, 16)


def attach(image_fd: int, *, read_only: bool, lock: bool, image_format: str = "raw",
           path: str | None = None) -> ImageVolume:
    path = path or os.readlink(f"/proc/self/fd/{image_fd}")
    ident = server.image_id(image_fd)

    def start() -> server.Server:
        if lock:
            lock_image(image_fd, read_only=read_only, path=path)
        try:
            running = server.start(image_fd, fmt=image_format, read_only=read_only)
        except nbd.NbdError as e:
            raise DriverError(f"serving {path}: {e.strerror}") from None
        if lock:
            try:
                _move_lock(image_fd, running, read_only=read_only, path=path)
            except BaseException:
                server.stop(running)
                raise
        return running

    index, claim_fd = FAMILY.connect(ident, start, path)
    return ImageVolume(index, ident, claim_fd)


def _move_lock(image_fd: int, running: server.Server, *, read_only: bool, path: str) -> None:
    """Move the image lock from our open file onto the server's. The two are different
    open file descriptions, whose locks conflict: ours goes first. A node that takes the lock
    in between is refused by neither, so this node gives up (ImageBusy)."""
    if running.program == "qemu-nbd":
        return  # it inherited our open file, and the lock with it
    try:
        held = server.open_image(running)
    except nbd.NbdError as e:
        raise DriverError(f"serving {path}: {e.strerror}") from None
    try:
        loopctl.unlock_image(image_fd)
        lock_image(held, read_only=read_only, path=path)
    finally:
        os.close(held)


def keep_ready() -> None:
    """After a mount: a spare server ready for the next one (nbd.server.keep_spare)."""
    server.keep_spare()


def release_ready() -> None:
    """Stop what keep_ready() keeps (at uninstall)."""
    server.stop_spares()


def device_for(mount: MountEntry) -> ImageVolume | None:
    """The NBD device of this backend that a mount lives on, if it is one."""
    found = FAMILY.find(mount)
    return ImageVolume(*found, None) if found is not None else None


def collect() -> None:
    """Tear down what killed calls left behind on this host (nbd_served.Family.collect)."""
    FAMILY.collect()
