"""The qemu-nbd backend: each image served by a qemu-nbd daemon of its own (nbd.server) and
connected to a kernel NBD device through netlink (nbd.client).

Its devices carry the backend identifier ``flexblock:<image id>``; the calls for one image are
serialised by a claim, and what killed calls left is torn down by the next mount of the image
and by every unmount, as flexvolume.backends.served describes.

The image lock (``lock`` option) is one byte at LOCK_OFFSET, taken on the open file description
that the server inherits, so it lasts exactly as long as the server. qemu's own locks (bytes
100-300, shared, and they do not stop a second server) coexist with it; the whole-file lock of a
loop attach conflicts with it, so the two backends exclude each other on a shared image.
"""

from __future__ import annotations

import os

import loopctl
import nbd
from nbd import server

from . import served
from ..errors import DriverError
from ..mounts import MountEntry

IMAGE_FORMATS = ("raw", "qcow2")
BACKEND_PREFIX = "flexblock:"
LOCK_OFFSET = 1 << 62


def lock_image(fd: int, *, read_only: bool, path: str) -> None:
    loopctl.lock_image(fd, exclusive=not read_only, path=path, offset=LOCK_OFFSET, length=1)


class NbdVolume(served.Handle):
    """The NBD device a volume's image is connected to, with its server."""

    def __init__(self, index: int, ident: str, claim_fd: int | None):
        super().__init__(nbd.control.device_path(index), ident, claim_fd)
        self.index = index
        dev, ino = ident.split("-")
        self.backing_devno, self.backing_inode = int(dev, 16), int(ino, 16)

    def tear_down(self) -> None:
        """Disconnect the device and stop its server (which drops the image lock)."""
        _tear_down(self.ident)

    def resize(self) -> None:
        # The kernel takes an NBD device's size only at connect (netlink RECONFIGURE and the
        # ioctls cannot change it on a netlink device), and qemu-nbd reads it only at start.
        raise DriverError("a qemu-nbd volume cannot grow while mounted; unmount it (delete the "
                          "pod), grow the image with qemu-img resize, and mount it again")


def _tear_down(ident: str) -> None:
    """Disconnect every device of image *ident* and stop its server (under its claim)."""
    served.tear_down(ident, list(served.nbd_devices(BACKEND_PREFIX, ident)))


def attach(image_fd: int, *, read_only: bool, lock: bool, image_format: str = "raw",
           path: str | None = None) -> NbdVolume:
    path = path or os.readlink(f"/proc/self/fd/{image_fd}")
    ident = server.image_id(image_fd)
    claim_fd = served.claim(ident)
    try:
        devices = served.nbd_devices(BACKEND_PREFIX, ident)
        mounted = [index for index in devices if served.is_mounted(index)]
        if mounted:
            raise DriverError(f"{path} is in use (mounted from {nbd.control.device_path(mounted[0])} "
                              "on this host); a volume can be mounted by one pod at a time")
        # A killed call's leftovers: its claim died with it, so nobody is using them.
        served.tear_down(ident, devices)
        if lock:
            lock_image(image_fd, read_only=read_only, path=path)
        try:
            running = server.start(image_fd, fmt=image_format, read_only=read_only)
        except nbd.NbdError as e:
            raise DriverError(f"serving {path}: {e.strerror}") from None
        try:
            device, _ = nbd.attach(running.socket_path, backend=BACKEND_PREFIX + ident)
        except BaseException:
            server.stop(running)
            raise
        return NbdVolume(device.index, ident, claim_fd)
    except BaseException:
        os.close(claim_fd)
        raise


def device_for(mount: MountEntry) -> NbdVolume | None:
    """The NBD device of this backend that a mount lives on, if it is one."""
    found = served.nbd_device(mount)
    if found is None or not found[1].startswith(BACKEND_PREFIX):
        return None
    return NbdVolume(found[0], found[1][len(BACKEND_PREFIX):], None)


def collect() -> None:
    """Tear down what killed calls left behind on this host: devices of ours that nothing
    mounts and servers without a device, skipping images a running call has claimed."""
    served.collect(BACKEND_PREFIX, _tear_down)
