"""The qemu-nbd backend: each image served by a qemu-nbd daemon of its own (nbd.server) and
connected to a kernel NBD device through netlink (nbd.client).

Unlike a loop device with autoclear, an NBD device and its server outlive the driver call that
made them, and nothing tears them down by itself. So:

- every device carries the backend identifier ``flexblock:<image id>`` (sysfs ``backend``), from
  which a later call finds its image and server again: no state files;
- the calls for one image are serialised on this host by a flock on CLAIM_DIR/<image id>,
  held until the volume is mounted or torn down, and released by the kernel when a driver is
  killed;
- leftovers of killed calls (a server without a device, a device nobody mounts) are torn down
  under that flock: by the next mount of the same image, and by every unmount (collect()).

The image lock (``lock`` option) is one byte at LOCK_OFFSET, taken on the open file description
that the server inherits, so it lasts exactly as long as the server. qemu's own locks (bytes
100-300, shared, and they do not stop a second server) coexist with it; the whole-file lock of a
loop attach conflicts with it, so the two backends exclude each other on a shared image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

import loopctl
import nbd
from nbd import server

from .. import _faultpoint
from ..errors import DriverError
from ..mounts import MountEntry, mounts_of

IMAGE_FORMATS = ("raw", "qcow2")
NBD_MAJOR = 43
BACKEND_PREFIX = "flexblock:"
LOCK_OFFSET = 1 << 62
CLAIM_DIR = "/run/flexblock/volumes"
# A concurrent call for the same image may be formatting a large volume: wait for it this long.
CLAIM_TIMEOUT = 90.0
# expandfs answers this (volume.expandfs) before it touches the image. The kernel takes an NBD
# device's size only at connect (netlink RECONFIGURE and the ioctls cannot change it on a
# netlink device), and qemu-nbd reads it only at start.
GROWTH_REFUSAL = ("a qemu-nbd volume cannot grow while mounted; unmount it (delete the pod), "
                  "grow the image with qemu-img resize, and mount it again")


def lock_image(fd: int, *, read_only: bool, path: str) -> None:
    loopctl.lock_image(fd, exclusive=not read_only, path=path, offset=LOCK_OFFSET, length=1)


def _claim(ident: str, *, wait: bool = True) -> int | None:
    """This host's flock for calls on image *ident*; None if busy and not *wait*ing."""
    os.makedirs(CLAIM_DIR, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(CLAIM_DIR, ident), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + CLAIM_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not wait or time.monotonic() > deadline:
                os.close(fd)
                if not wait:
                    return None
                raise DriverError(f"another driver call for image {ident} has been running for "
                                  f"{CLAIM_TIMEOUT:.0f} s; try again later") from None
            time.sleep(0.05)


class NbdVolume:
    """The NBD device a volume's image is connected to, with its server."""

    def __init__(self, index: int, ident: str, claim_fd: int | None):
        self.index = index
        self.ident = ident
        self.path = nbd.control.device_path(index)
        dev, ino = ident.split("-")
        self.backing_devno, self.backing_inode = int(dev, 16), int(ino, 16)
        self._claim_fd = claim_fd
        self._fd = -1

    @property
    def size(self) -> int:
        return nbd.info(self.index).size

    def fileno(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def relinquish(self) -> None:
        """Keep the device and its server; drop our fd and this host's claim on the image."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None

    def detach(self) -> None:
        """Disconnect the device and stop its server (which drops the image lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._claim_fd is None:
            self._claim_fd = _claim(self.ident)
        try:
            _tear_down(self.ident, [self.index])
        finally:
            self.relinquish()


def _devices_of(ident: str | None = None) -> dict[int, str]:
    """index -> image id of every NBD device connected by this backend (for *ident* only, if
    given)."""
    try:
        devices = nbd.connected()
    except nbd.NotSupported:
        return {}  # no nbd driver in this kernel: no device of ours either
    found = {d.index: d.backend[len(BACKEND_PREFIX):] for d in devices
             if d.backend and d.backend.startswith(BACKEND_PREFIX)}
    return {i: owner for i, owner in found.items() if ident is None or owner == ident}


def _is_mounted(index: int) -> bool:
    with open(f"/sys/block/nbd{index}/dev", encoding="ascii") as f:
        major, minor = f.read().split(":")
    return bool(mounts_of(os.makedev(int(major), int(minor))))


def _tear_down(ident: str, indexes) -> None:
    """Disconnect *indexes*, stop the server of image *ident*, if running, and remove its
    files. Called under the image's claim."""
    for index in indexes:
        nbd.disconnect(index)
        nbd.wait_disconnected(index)
    _faultpoint.reached("disconnect")
    server.stop_by_id(ident)


def attach(image_fd: int, *, read_only: bool, lock: bool, image_format: str = "raw",
           path: str | None = None) -> NbdVolume:
    path = path or os.readlink(f"/proc/self/fd/{image_fd}")
    ident = server.image_id(image_fd)
    claim_fd = _claim(ident)
    try:
        devices = _devices_of(ident)
        mounted = [index for index in devices if _is_mounted(index)]
        if mounted:
            raise DriverError(f"{path} is in use (mounted from {nbd.control.device_path(mounted[0])} "
                              "on this host); a volume can be mounted by one pod at a time")
        # A killed call's leftovers: its claim died with it, so nobody is using them.
        _tear_down(ident, devices)
        if lock:
            lock_image(image_fd, read_only=read_only, path=path)
        try:
            running = server.start(image_fd, fmt=image_format, read_only=read_only)
        except nbd.NbdError as e:
            raise DriverError(f"serving {path}: {e.strerror}") from None
        _faultpoint.reached("serve")
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
    if os.major(mount.devno) != NBD_MAJOR:
        return None
    try:
        name = os.path.basename(os.readlink(
            f"/sys/dev/block/{os.major(mount.devno)}:{os.minor(mount.devno)}"))
        index = int(name[len("nbd"):])
        backend = nbd.info(index).backend or ""
    except (OSError, ValueError):
        return None
    if not backend.startswith(BACKEND_PREFIX):
        return None
    return NbdVolume(index, backend[len(BACKEND_PREFIX):], None)


def collect() -> None:
    """Tear down what killed calls left behind on this host: devices of ours that nothing
    mounts, servers without a device and the files of dead servers, skipping images a running
    call has claimed."""
    devices = _devices_of()
    idents = set(devices.values()) | {ident for ident in server.list_ids()
                                      if os.path.exists(os.path.join(CLAIM_DIR, ident))}
    for ident in idents:
        indexes = [i for i, owner in devices.items() if owner == ident]
        if any(_is_mounted(i) for i in indexes):
            continue
        claim_fd = _claim(ident, wait=False)
        if claim_fd is None:
            continue
        try:
            # Checked again under the claim: a call may have mounted it meanwhile.
            indexes = list(_devices_of(ident))
            if not any(_is_mounted(i) for i in indexes):
                _tear_down(ident, indexes)
        finally:
            os.close(claim_fd)
