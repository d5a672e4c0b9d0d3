"""The ploop backend: a volume is a directory holding a ploop disk (DiskDescriptor.xml and its
image), attached by the ploop package (native ploop where the kernel has it, else qemu-nbd and
NBD). Its mount flow lives in flexvolume.ploop_volume (FLOW): the volume is a directory, not
one image file.

The device behind a mount is found from the kernel: the NBD device's backend identifier
(``ploop:<image id>``) names the image, whose qemu-nbd server holds it open.
"""

from __future__ import annotations

import os
import shutil

import nbd
import ploop
from nbd import server
from ploop import native

from ..errors import DriverError
from ..mounts import MountEntry, mounts_of

FLOW = "flexvolume.ploop_volume"
NBD_MAJOR = 43
BACKEND_PREFIX = "ploop:"
VSTORAGE = "vstorage"


def check() -> None:
    """A ploop volume needs native ploop or the kernel's nbd driver."""
    if native.available():
        return
    try:
        nbd.connected()
    except nbd.NotSupported:
        raise DriverError("this kernel has no nbd driver (modprobe nbd) and there is no native "
                          "ploop: a ploop volume cannot be attached on this node") from None


def vstorage() -> str:
    path = shutil.which(VSTORAGE)
    if path is None:
        raise DriverError("vzs* options need the vstorage CLI (Virtuozzo Storage), which this "
                          "node does not have; remove them or install it")
    return path


class PloopDevice:
    """The block device a ploop volume is attached as."""

    def __init__(self, path: str, attachment: ploop.Attachment | None, index: int | None = None):
        self.path = path
        self.attachment = attachment
        self.directory = attachment.directory if attachment is not None else None
        self._index = index
        self._fd = -1

    @property
    def size(self) -> int:
        """The device's size in bytes, as the kernel has it (sysfs counts 512-byte sectors)."""
        with open(f"/sys/class/block/{os.path.basename(self.path)}/size", encoding="ascii") as f:
            return int(f.read()) * 512

    def fileno(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def relinquish(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def detach(self) -> None:
        self.relinquish()
        if self.attachment is not None:
            self.attachment.detach()
        elif self._index is not None:  # its qemu-nbd is gone: only the dead device is left
            nbd.disconnect(self._index)
            nbd.wait_disconnected(self._index)


def _is_mounted(device: str) -> bool:
    return bool(mounts_of(os.stat(device).st_rdev))


def attach(directory: str, *, read_only: bool) -> PloopDevice:
    """Attach the volume in *directory*; one left attached but unmounted by a killed call is
    taken over, one mounted (by another pod) is refused."""
    found = ploop.find_attached(directory)
    if found is not None and _is_mounted(found.device):
        raise DriverError(f"{directory} is in use (mounted from {found.device} on this host); "
                          "a volume can be mounted by one pod at a time")
    if found is not None and found.read_only != read_only:
        found.detach()  # a killed call's leftover, attached in the other mode
    try:
        attachment = ploop.attach(directory, read_only=read_only)
    except ploop.ImageBusy as e:
        raise DriverError(f"{directory} is in use ({e.strerror})") from None
    return PloopDevice(attachment.device, attachment)


def _image_directory(ident: str, pid: int) -> str | None:
    """The directory of the image with identity *ident* that qemu-nbd *pid* holds open."""
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            st = os.stat(os.path.join(fd_dir, name))
            if f"{st.st_dev:x}-{st.st_ino:x}" == ident:
                return os.path.dirname(os.readlink(os.path.join(fd_dir, name)))
        except OSError:
            continue
    return None


def device_for(mount: MountEntry) -> PloopDevice | None:
    """The ploop volume's NBD device a mount lives on, if it is one (devices of native
    ploop are not found yet: unmount leaves them attached)."""
    try:
        if os.major(mount.devno) != NBD_MAJOR:
            return None
        name = os.path.basename(os.readlink(
            f"/sys/dev/block/{os.major(mount.devno)}:{os.minor(mount.devno)}"))
        index = int(name[len("nbd"):])
        backend = nbd.info(index).backend or ""
    except (OSError, ValueError):
        return None
    if not backend.startswith(BACKEND_PREFIX):
        return None
    ident = backend[len(BACKEND_PREFIX):]
    running = server.find_by_id(ident)
    directory = _image_directory(ident, running.pid) if running is not None else None
    attachment = ploop.find_attached(directory) if directory is not None else None
    return PloopDevice(f"/dev/{name}", attachment, index)


def collect() -> None:
    """Nothing to collect here: a killed mount's attached device is taken over by the next
    mount of the volume (attach), and ploop.attach replaces a device whose server died."""
