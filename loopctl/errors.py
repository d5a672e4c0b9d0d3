"""Typed errors of loopctl, and the errno families the kernel's loop driver answers with.

Every error is an OSError: ``errno`` is the kernel's (or our own, documented) errno and
``filename`` the device or backing file it concerns, so callers can branch on either.
"""

from __future__ import annotations

import errno
import os

# LOOP_CONFIGURE (5.8+) is missing: EINVAL on older 64-bit kernels (unknown loop ioctls fall
# through to EINVAL), ENOTTY through the 32-bit compat path (util-linux 583990d25), ENOSYS under
# qemu-user (util-linux f6385a6ad). Every other errno is a real answer and is propagated.
CONFIGURE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTTY, errno.ENOSYS})

# Another allocator took the device between LOOP_CTL_GET_FREE and our configure (EBUSY), or the
# device went away under us (ENXIO, ENODEV): harmless, take a fresh free device.
LOST_RACE = frozenset({errno.EBUSY, errno.ENXIO, errno.ENODEV})

# Opening the backing file read-write was refused by the filesystem or its permissions.
READ_ONLY_BACKING = frozenset({errno.EROFS, errno.EACCES})


class LoopError(OSError):
    """Base class: an operation on a loop device or its backing file failed."""

    def __init__(self, err: int, message: str | None = None, path: str | None = None):
        super().__init__(err, message or os.strerror(err), path)


class InvalidArgument(LoopError, ValueError):
    """A parameter was refused before anything was changed (EINVAL)."""


class NoFreeDevice(LoopError):
    """No loop device could be allocated (every try lost its race, or the kernel has none)."""


class DeviceBusy(LoopError):
    """The loop device is bound or held open by someone else (EBUSY)."""


class NotBound(LoopError):
    """The loop device has no backing file (ENXIO), or was re-bound since we looked at it."""


class NotALoopDevice(LoopError):
    """The path or number does not name a loop device node (ENODEV)."""


class NotSupported(LoopError):
    """The running kernel lacks an interface this call needs."""


class ImageBusy(LoopError):
    """The image is locked by another attach, on this host or another one sharing the file.

    ``holder`` says who holds it when the kernel can tell (a local loop device or process),
    otherwise it names the lock only.
    """

    def __init__(self, path: str, holder: str):
        super().__init__(errno.EBUSY, f"image is in use ({holder})", path)
        self.holder = holder

    def __reduce__(self):
        # OSError pickles its (errno, strerror, filename) args, which this __init__ does not
        # take: without this, an ImageBusy from a worker process arrives as a broken pool.
        return type(self), (self.filename, self.holder)


class SizeMismatch(LoopError):
    """The kernel did not honour the requested size or block size (ERANGE)."""


_BY_ERRNO: dict[int, type[LoopError]] = {
    errno.EBUSY: DeviceBusy,
    errno.ENXIO: NotBound,
    errno.ENODEV: NotALoopDevice,
    errno.ENOTBLK: NotALoopDevice,
}


def error_from_errno(err: int, path: str | None, what: str) -> LoopError:
    """The typed error for errno *err* raised by step *what* on *path*."""
    return _BY_ERRNO.get(err, LoopError)(err, f"{what}: {os.strerror(err)}", path)
