"""Typed errors of the nbd package."""

from __future__ import annotations

import errno
import os


class NbdError(OSError):
    """Base class: an NBD operation failed; errno and the device or server are kept."""

    def __init__(self, err: int, message: str | None = None, path: str | None = None):
        super().__init__(err, message or os.strerror(err), path)


class HandshakeError(NbdError):
    """The server broke the protocol, or the connection, during the handshake."""

    def __init__(self, message: str):
        super().__init__(errno.EPROTO, message)


class ServerError(NbdError):
    """The server refused the export; ``reply`` is its error (e.g. ERR_UNKNOWN) and the
    message its own text."""

    def __init__(self, reply: str, text: str):
        super().__init__(errno.EREMOTEIO, f"server answered {reply}: {text or 'no reason given'}")
        self.reply = reply


class NetlinkError(NbdError):
    """The kernel refused a netlink request; errno is the kernel's."""
