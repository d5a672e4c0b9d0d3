"""The ploop backend: a volume is a directory holding a ploop disk (DiskDescriptor.xml and its
image), attached by the ploop package (native ploop where the kernel has it, else qemu-nbd and
NBD). Its mount flow lives in flexvolume.ploop_volume (FLOW): the volume is a directory, not
one image file.

The device behind a mount is found from the kernel: an NBD device's backend identifier
(``ploop:<image id>``) names the image, whose qemu-nbd server holds it open; a native ploop
device is one `ploop list` names, with its base image. Calls for one volume are serialised by
a claim on its top image (in CLAIM_DIR), and what killed calls left is torn down by the next
mount of the volume and by every unmount, as flexvolume.backends.nbd_served describes.
"""

from __future__ import annotations

import os
import shutil

import nbd
import ploop
from nbd import server
from ploop import native
from ploop.volume import BACKEND_PREFIX

from .nbd_served import Family, Handle
from ..errors import DriverError
from ..mounts import MountEntry, mounts_of

FLOW = "flexvolume.ploop_volume"
VSTORAGE = "vstorage"
FAMILY = Family(BACKEND_PREFIX, "/run/flexblock/ploop")


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


class PloopDevice(Handle):
    """The block device a ploop volume is attached as: NBD device *index*, or a native ploop
    device (index None)."""

    def __init__(self, path: str, ident: str, claim_fd: int | None, directory: str | None,
                 index: int | None = None):
        super().__init__(FAMILY, path, ident, claim_fd)
        self.directory = directory
        self.index = index

    def tear_down(self) -> None:
        if self.index is None:
            native.umount_device(self.path)
        else:
            _tear_down(self.ident)


def _is_mounted(device: str) -> bool:
    return bool(mounts_of(os.stat(device).st_rdev))


def _image_id(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return server.image_id(fd)
    finally:
        os.close(fd)


def attach(directory: str, *, read_only: bool) -> PloopDevice:
    """Attach the volume in *directory*, under its claim; one left attached but unmounted by
    a killed call is taken over, one mounted (by another pod) is refused."""
    ident = _image_id(ploop.open_volume(directory).image_path)
    claim_fd = FAMILY.claim(ident)
    try:
        found = ploop.find_attached(directory)
        if found is not None and _is_mounted(found.device):
            raise DriverError(f"{directory} is in use (mounted from {found.device} on this "
                              "host); a volume can be mounted by one pod at a time")
        if found is not None and found.read_only != read_only:
            found.detach()  # a killed call's leftover, attached in the other mode
        try:
            attachment = ploop.attach(directory, read_only=read_only)
        except ploop.ImageBusy as e:
            raise DriverError(f"{directory} is in use ({e.strerror})") from None
        return PloopDevice(attachment.device, ident, claim_fd, directory, attachment.nbd_index)
    except BaseException:
        os.close(claim_fd)
        raise


def _served_directory(ident: str) -> str | None:
    """The directory of image *ident*, from the qemu-nbd serving it (None: none does)."""
    running = server.find_by_id(ident)
    if running is None:
        return None
    fd_dir = f"/proc/{running.pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            st = os.stat(os.path.join(fd_dir, name))
            if f"{st.st_dev:x}-{st.st_ino:x}" == ident:
                return os.path.dirname(os.readlink(os.path.join(fd_dir, name)))
        except OSError:
            continue
    return None


def _tear_down(ident: str) -> None:
    """Detach image *ident*'s NBD devices and stop its server (under its claim): through the
    ploop package while the server says which volume it serves (the device is flushed first
    and the image's flags are set right), and what is left (a device whose qemu-nbd died) by
    hand."""
    directory = _served_directory(ident)
    if directory is not None:
        ploop.detach(directory)
    FAMILY.tear_down(ident, list(FAMILY.devices(ident)))


def _native_devices() -> list[tuple[str, int, str, str]]:
    """(device, its number, image id, volume directory) of every native ploop device."""
    found = []
    for device, image in native.attached():
        directory = os.path.dirname(image)
        try:
            found.append((device, os.stat(device).st_rdev,
                          _image_id(ploop.open_volume(directory).image_path), directory))
        except (OSError, ploop.PloopError):
            continue  # gone meanwhile, or not a volume we can read: not ours to touch
    return found


def _native_device(mount: MountEntry) -> PloopDevice | None:
    """The native ploop device a mount lives on, if it is one."""
    for device, devno, ident, directory in _native_devices():
        if devno == mount.devno:
            return PloopDevice(device, ident, None, directory)
    return None


def device_for(mount: MountEntry) -> PloopDevice | None:
    """The ploop volume's device a mount lives on, if it is one: an NBD device of ours or a
    native ploop device."""
    found = FAMILY.find(mount)
    if found is None:
        return _native_device(mount) if native.available() else None
    index, ident = found
    return PloopDevice(f"/dev/nbd{index}", ident, None, _served_directory(ident), index)


def _unmounted_native() -> dict[str, str]:
    """image id -> device of every native ploop device that nothing mounts."""
    return {ident: device for device, devno, ident, _ in _native_devices()
            if not mounts_of(devno)}


def _collect_image(ident: str, _indexes: list[int]) -> None:
    """collect()'s teardown of image *ident*, under its claim: its native device if nothing
    mounts it, else its NBD devices and server. One held open exclusively is left alone."""
    try:
        device = _unmounted_native().get(ident) if native.available() else None
        if device is not None:
            native.umount_device(device)
        else:
            _tear_down(ident)
    except ploop.ImageBusy:
        pass


def collect() -> None:
    """Tear down what killed calls left on this host: NBD devices of ours and native ploop
    devices that nothing mounts, qemu-nbd servers without a device; never a volume a running
    call has claimed."""
    natives = tuple(_unmounted_native()) if native.available() else ()
    FAMILY.collect(_collect_image, natives)
