"""Handshake and kernel control put together: an export on a server becomes /dev/nbdN.

An address is a unix socket path (anything containing a "/") or "host:port" for TCP.
"""

from __future__ import annotations

import errno
import os
import socket

from . import control
from .errors import NbdError
from .handshake import Export, handshake

DEFAULT_PORT = 10809


def open_connection(address: str) -> socket.socket:
    """A blocking stream socket to the server, as the kernel needs it."""
    if "/" in address:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target: object = address
    else:
        host, _, port = address.rpartition(":")
        if not host:
            host, port = address, str(DEFAULT_PORT)
        info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = info[4]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(target)
    except OSError as e:
        sock.close()
        raise NbdError(e.errno, f"cannot connect: {e.strerror}", address) from None
    except BaseException:
        sock.close()
        raise
    return sock


def block_size_for(export: Export) -> int:
    """The device's logical block size: 512 (as nbd-client) unless the server's minimum is
    larger; the kernel caps it at the page size."""
    size = 512
    while size < export.min_block:
        size *= 2
    if size > os.sysconf("SC_PAGESIZE") or size > export.max_block:
        raise NbdError(errno.EINVAL, f"server needs blocks of {export.min_block} bytes, more "
                       "than the kernel supports")
    return size


def attach(address: str, export_name: str = "", *, index: int | None = None,
           timeout: float | None = None, dead_conn_timeout: float | None = None,
           client_flags: int = 0, backend: str | None = None,
           ready_timeout: float = control.READY_TIMEOUT) -> tuple[control.DeviceInfo, Export]:
    """Handshake with the server, hand the socket to the kernel, wait until the device is
    connected; returns the device's state and what the server said about the export."""
    sock = open_connection(address)
    try:
        export = handshake(sock, export_name)
        block_size = block_size_for(export)
        size = export.size - export.size % block_size
        index = control.connect([sock], size, index=index, block_size=block_size,
                                server_flags=export.flags, client_flags=client_flags,
                                timeout=timeout, dead_conn_timeout=dead_conn_timeout,
                                backend=backend)
    finally:
        sock.close()  # the kernel holds its own reference from connect on
    try:
        return control.wait_connected(index, ready_timeout), export
    except BaseException:
        control.disconnect(index)
        raise


def reconnect(index: int, address: str, export_name: str, expected: Export) -> Export:
    """After the kernel declared *index*'s connection dead (control.LinkDeadListener), connect
    to the (restarted) server again and give the kernel the new socket. The export must still
    have the size and flags the device was set up with. nbd-client's netlink mode never does
    this: its reconnect code is never called."""
    sock = open_connection(address)
    try:
        export = handshake(sock, export_name)
        if (export.size, export.flags) != (expected.size, expected.flags):
            raise NbdError(errno.ESTALE, f"export changed (size {export.size}, flags "
                           f"{export.flags:#x}; was {expected.size}, {expected.flags:#x})",
                           control.device_path(index))
        control.reconfigure(index, [sock])
    finally:
        sock.close()
    return export
