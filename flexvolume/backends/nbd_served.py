"""NBD devices each served by a qemu-nbd daemon of its own (nbd.server) and connected through
netlink (nbd.client): what the qemu-nbd, sheepdog and ploop backends make, each as a Family
(ploop's native devices are handled through the same claims and collection).

Unlike a loop device with autoclear, an NBD device and its server outlive the driver call that
made them, and nothing tears them down by itself. So:

- every device carries the backend identifier ``<prefix><ident>`` (sysfs ``backend``), and its
  server is named *ident*: a later call finds both again from the kernel, no state files;
- the calls for one ident are serialised on this host by a flock on <claim dir>/<ident>, held
  until the volume is mounted or torn down, and released by the kernel when a driver is
  killed;
- leftovers of killed calls (a server without a device, a device nobody mounts) are torn down
  under that flock: by the next mount of the same ident, and by every unmount (collect()).

Each family has a claim directory of its own, and the claim files stay: collect() takes a
server (or a backend's device of another kind) for its family's only if its claim file is
there, so one backend never stops another's servers, nor what an administrator attached by
hand.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

import nbd
from nbd import server

from .. import _faultpoint
from ..errors import DriverError
from ..mounts import MountEntry, mounts_of

NBD_MAJOR = 43
# A concurrent call for the same volume may be formatting a large one: wait for it this long.
CLAIM_TIMEOUT = 90.0


def is_mounted(index: int) -> bool:
    with open(f"/sys/block/nbd{index}/dev", encoding="ascii") as f:
        major, minor = f.read().split(":")
    return bool(mounts_of(os.makedev(int(major), int(minor))))


class Family:
    """The devices one backend connected: identifiers ``prefix + ident``, claims in
    *claim_dir*."""

    def __init__(self, prefix: str, claim_dir: str):
        self.prefix = prefix
        self.claim_dir = claim_dir

    def claim(self, ident: str, *, wait: bool = True) -> int | None:
        """This host's flock for calls on *ident*; None if busy and not *wait*ing."""
        os.makedirs(self.claim_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.claim_dir, ident),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
                    raise DriverError(f"another driver call for volume {ident} has been running "
                                      f"for {CLAIM_TIMEOUT:.0f} s; try again later") from None
                time.sleep(0.05)

    def was_claimed(self, ident: str) -> bool:
        """Has a call of this family on this host (since boot: /run is a tmpfs) claimed
        *ident*?"""
        return os.path.exists(os.path.join(self.claim_dir, ident))

    def devices(self, ident: str | None = None) -> dict[int, str]:
        """index -> ident of every NBD device of this family (for *ident* only, if given)."""
        try:
            connected = nbd.connected()
        except nbd.NotSupported:
            return {}  # no nbd driver in this kernel: no device of ours either
        found = {d.index: d.backend[len(self.prefix):] for d in connected
                 if d.backend and d.backend.startswith(self.prefix)}
        return {i: owner for i, owner in found.items() if ident is None or owner == ident}

    @staticmethod
    def tear_down(ident: str, indexes) -> None:
        """Disconnect *indexes*, stop the server *ident*, if running, and remove its files.
        Called under the claim."""
        for index in indexes:
            nbd.disconnect(index)
            nbd.wait_disconnected(index)
        _faultpoint.reached("disconnect")
        server.stop_by_id(ident)

    def connect(self, ident: str, start: Callable[[], server.Server], what: str) \
            -> tuple[int, int]:
        """Serve *ident* (*start* launches its server) and connect a device to it, after
        tearing down what a killed call left of it; a device of it that is mounted is refused.
        Returns the device's index and the claim, held until the caller lets go of it."""
        claim_fd = self.claim(ident)
        try:
            devices = self.devices(ident)
            mounted = [index for index in devices if is_mounted(index)]
            if mounted:
                raise DriverError(f"{what} is in use (mounted from "
                                  f"{nbd.control.device_path(mounted[0])} on this host); a "
                                  "volume can be mounted by one pod at a time")
            # A killed call's leftovers: its claim died with it, so nobody is using them.
            self.tear_down(ident, devices)
            running = start()
            _faultpoint.reached("serve")
            try:
                device, _ = nbd.attach(running.socket_path, backend=self.prefix + ident)
            except BaseException:
                server.stop(running)
                raise
            return device.index, claim_fd
        except BaseException:
            os.close(claim_fd)
            raise

    def find(self, mount: MountEntry) -> tuple[int, str] | None:
        """The index and ident of this family's device a mount lives on, if it is one."""
        if os.major(mount.devno) != NBD_MAJOR:
            return None
        try:
            name = os.path.basename(os.readlink(
                f"/sys/dev/block/{os.major(mount.devno)}:{os.minor(mount.devno)}"))
            index = int(name[len("nbd"):])
            backend = nbd.info(index).backend or ""
        except (OSError, ValueError):
            return None
        if not backend.startswith(self.prefix):
            return None
        return index, backend[len(self.prefix):]

    def collect(self, tear_down: Callable[[str, list[int]], None] | None = None,
                extra: tuple[str, ...] = ()) -> None:
        """Tear down what killed calls left behind on this host: devices of this family that
        nothing mounts, its servers without a device and the files of its dead servers,
        skipping idents a running call has claimed. *tear_down(ident, indexes)*, run under the claim, replaces the plain teardown
        of a backend whose devices need more; *extra* names idents with devices of the
        backend's own kind, which that function checks itself."""
        devices = self.devices()
        idents = set(devices.values()) | {
            ident for ident in (*server.list_ids(), *extra)
            if self.was_claimed(ident)}
        for ident in sorted(idents):
            indexes = [i for i, owner in devices.items() if owner == ident]
            if any(is_mounted(i) for i in indexes):
                continue
            claim_fd = self.claim(ident, wait=False)
            if claim_fd is None:
                continue
            try:
                # Checked again under the claim: a call may have mounted it meanwhile.
                indexes = list(self.devices(ident))
                if not any(is_mounted(i) for i in indexes):
                    (tear_down or self.tear_down)(ident, indexes)
            finally:
                os.close(claim_fd)


class Handle:
    """A device a backend attached for a volume, as volume.py uses it: its path, an fd opened
    on first use, and this call's claim (None when found from a mount)."""

    def __init__(self, family: Family, path: str, ident: str, claim_fd: int | None):
        self.family = family
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

    def relinquish(self) -> None:
        """Keep the device attached; drop our fd and this call's claim."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None

    def detach(self) -> None:
        """Tear the device down under the claim (waiting for a running call)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._claim_fd is None:
            self._claim_fd = self.family.claim(self.ident)
        try:
            self.tear_down()
        finally:
            self.relinquish()

    def tear_down(self) -> None:
        """The backend's own teardown of this device, called under the claim."""
        raise NotImplementedError


class NbdVolume(Handle):
    """The NBD device a volume is connected to, with its server."""

    def __init__(self, family: Family, index: int, ident: str, claim_fd: int | None):
        super().__init__(family, nbd.control.device_path(index), ident, claim_fd)
        self.index = index

    def tear_down(self) -> None:
        self.family.tear_down(self.ident, [self.index])
