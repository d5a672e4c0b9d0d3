"""What the qemu-nbd and ploop backends share: their volumes are served by something that
outlives the driver call (a qemu-nbd daemon and an NBD device, or a native ploop device), and
nothing tears it down by itself when a call is killed. So:

- the calls for one image are serialised on this host by a flock on CLAIM_DIR/<image id> (the
  image's device and inode, as nbd.server names its server), held from before anything is
  attached until the volume is mounted or torn down, and released by the kernel when a driver
  is killed. The claim file stays: it marks the image as one a driver call has handled, whose
  servers and devices collect() may tear down (not a volume attached by hand);
- every NBD device carries a backend identifier ``<prefix><image id>`` (sysfs ``backend``),
  from which a later call finds its image and server again: no state files;
- leftovers of killed calls (a server without a device, a device nobody mounts) are torn down
  under the claim: by the next mount of the same image, and by every unmount (collect()).
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable

import nbd
from nbd import server

from ..errors import DriverError
from ..mounts import MountEntry, mounts_of

CLAIM_DIR = "/run/flexblock/volumes"
# A concurrent call for the same image may be formatting a large volume: wait for it this long.
CLAIM_TIMEOUT = 90.0
NBD_MAJOR = 43


def claim(ident: str, *, wait: bool = True) -> int | None:
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


def was_claimed(ident: str) -> bool:
    """Has a driver call on this host (since boot: CLAIM_DIR is on a tmpfs) handled *ident*?"""
    return os.path.exists(os.path.join(CLAIM_DIR, ident))


class Handle:
    """A device a backend attached for a volume, as volume.py uses it: its path, an fd opened
    on first use, and this call's claim on the image (None when found from a mount)."""

    def __init__(self, path: str, ident: str, claim_fd: int | None):
        self.path = path
        self.ident = ident
        self._claim_fd = claim_fd
        self._fd = -1

    @property
    def size(self) -> int:
        """The device's size in bytes, as the kernel has it (sysfs counts 512-byte sectors)."""
        name = os.path.basename(os.path.realpath(self.path))
        with open(f"/sys/class/block/{name}/size", encoding="ascii") as f:
            return int(f.read()) * 512

    def fileno(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def relinquish(self) -> None:
        """Keep the device attached; drop our fd and this call's claim on the image."""
        self._close()
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None

    def detach(self) -> None:
        """Tear the device down under the image's claim (waiting for a running call)."""
        self._close()
        if self._claim_fd is None:
            self._claim_fd = claim(self.ident)
        try:
            self.tear_down()
        finally:
            self.relinquish()

    def tear_down(self) -> None:
        """The backend's own teardown of this device, called under the claim."""
        raise NotImplementedError


def nbd_device(mount: MountEntry) -> tuple[int, str] | None:
    """The NBD device a mount lives on and its backend identifier, if it is one."""
    if os.major(mount.devno) != NBD_MAJOR:
        return None
    try:
        name = os.path.basename(os.readlink(
            f"/sys/dev/block/{os.major(mount.devno)}:{os.minor(mount.devno)}"))
        index = int(name[len("nbd"):])
        return index, nbd.info(index).backend or ""
    except (OSError, ValueError):
        return None


def _connected() -> dict[int, str]:
    """index -> backend identifier of every connected NBD device."""
    try:
        devices = nbd.connected()
    except nbd.NotSupported:
        return {}  # no nbd driver in this kernel: no device of ours either
    return {d.index: d.backend or "" for d in devices}


def _image_of(backend: str) -> str:
    return backend.rpartition(":")[2]


def nbd_devices(prefix: str, ident: str | None = None) -> dict[int, str]:
    """index -> image id of every NBD device connected with backend identifier
    ``<prefix><image id>`` (for image *ident* only, if given)."""
    found = {i: b[len(prefix):] for i, b in _connected().items() if b.startswith(prefix)}
    return {i: owner for i, owner in found.items() if ident is None or owner == ident}


def is_mounted(index: int) -> bool:
    with open(f"/sys/block/nbd{index}/dev", encoding="ascii") as f:
        major, minor = f.read().split(":")
    return bool(mounts_of(os.makedev(int(major), int(minor))))


def tear_down(ident: str, indexes) -> None:
    """Disconnect NBD devices *indexes* and stop the server of image *ident*, if running."""
    for index in indexes:
        nbd.disconnect(index)
        nbd.wait_disconnected(index)
    running = server.find_by_id(ident)
    if running is not None:
        server.stop(running)


def collect(prefix: str, tear_down_image: Callable[[str], None],
            extra: tuple[str, ...] = ()) -> None:
    """Tear down what killed calls left on this host: the NBD devices of *prefix* that nothing
    mounts, servers that no NBD device uses, and images in *extra* (devices of the backend's
    own kind, which *tear_down_image* checks itself); only images a driver call handled, and
    never one a running call has claimed. *tear_down_image(ident)* runs under the claim."""
    connected = _connected()
    used = {_image_of(b) for b in connected.values()}
    idents = ({b[len(prefix):] for b in connected.values() if b.startswith(prefix)}
              | {s.image_id for s in server.list_servers() if s.image_id not in used}
              | set(extra))
    for ident in sorted(i for i in idents if was_claimed(i)):
        claim_fd = claim(ident, wait=False)
        if claim_fd is None:
            continue
        try:
            # Checked again under the claim: a call may have mounted it meanwhile, and a
            # server another backend's device uses is not ours to stop.
            theirs = {i: b for i, b in _connected().items() if _image_of(b) == ident}
            if all(b.startswith(prefix) and not is_mounted(i) for i, b in theirs.items()):
                tear_down_image(ident)
        finally:
            os.close(claim_fd)
