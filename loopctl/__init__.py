"""loopctl: Linux loop devices through the kernel's own interface, no losetup.

    with loopctl.attach("disk.img", lock=True) as dev:
        subprocess.run(["mkfs.ext4", "-q", dev.path], check=True)
    # leaving the block detached the device

Errors are OSError subclasses carrying errno and the path concerned (see loopctl.errors).
"""

from ._ioctl import LoopFlags
from .device import (LoopDevice, LoopInfo, attach, detach, find, get, get_by_devno, list_devices,
                     lock_image, unlock_image)
from .errors import (DeviceBusy, ImageBusy, InvalidArgument, LoopError, NoFreeDevice,
                     NotALoopDevice, NotBound, NotSupported, SizeMismatch)

__all__ = [
    "LoopDevice", "LoopFlags", "LoopInfo", "attach", "detach", "find", "get", "get_by_devno",
    "list_devices", "lock_image", "unlock_image",
    "LoopError", "DeviceBusy", "ImageBusy", "InvalidArgument", "NoFreeDevice", "NotALoopDevice",
    "NotBound", "NotSupported", "SizeMismatch",
]
