"""Typed errors of the ploop package.

Every error is an OSError: ``errno`` says what kind of failure it is and ``filename`` names the
image, descriptor or volume directory concerned, so callers can branch on either.
"""

from __future__ import annotations

import errno
import os


class PloopError(OSError):
    """Base class: an operation on a ploop image, descriptor or volume failed."""

    def __init__(self, err: int, message: str | None = None, path: str | None = None):
        super().__init__(err, message or os.strerror(err), path)


class InvalidArgument(PloopError, ValueError):
    """A parameter was refused before anything was changed (EINVAL)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.EINVAL, message, path)

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


class CorruptImage(PloopError):
    """The image breaks a rule of the format (EUCLEAN): a bad header, a BAT entry outside
    the file, a file size that is not a multiple of the cluster."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.EUCLEAN, message, path)

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


class UnsupportedImage(PloopError):
    """A valid image this package does not handle, or not this way (EOPNOTSUPP): a format
    extension on grow, a snapshot chain on the NBD path."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.EOPNOTSUPP, message, path)

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


class DescriptorError(PloopError):
    """DiskDescriptor.xml is malformed or breaks ploop's rules (EBADMSG); ``element`` is the
    path of the offending element, e.g. ``StorageData/Storage/Blocksize``."""

    def __init__(self, path: str | None, element: str, problem: str):
        super().__init__(errno.EBADMSG, f"{element}: {problem}", path)
        self.element = element
        self.problem = problem

    def __reduce__(self):
        return type(self), (self.filename, self.element, self.problem)


class ImageBusy(PloopError):
    """The image is in use: attached, being created, or locked by another process or host
    (EBUSY)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.EBUSY, message, path)

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


class SizeMismatch(PloopError):
    """An existing volume is smaller than required, or a grow would shrink it (ERANGE)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.ERANGE, message, path)

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


class ToolError(PloopError):
    """An external tool (qemu-img, ploop) failed; the message carries its own output."""
