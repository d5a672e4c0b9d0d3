"""The kernel's NBD devices, through the ``nbd`` generic-netlink family (Linux 4.12+).

Sockets handed to connect() must already be in the transmission phase (see nbd.handshake);
the kernel takes its own reference to each, so the caller may close its copies afterwards.
Facts: shared/reference/loop-and-nbd-kernel-interfaces.md §2 B.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import time
from collections.abc import Sequence

from . import _genl
from ._ffi import ffi, lib
from .errors import NbdError, NetlinkError

FAMILY_NAME = ffi.string(lib.NBD_FAMILY).decode()
MCAST_GROUP = ffi.string(lib.NBD_MCAST_GROUP).decode()
SYS_BLOCK = "/sys/block"
READY_TIMEOUT = 10.0
POLL_INTERVAL = 0.01

# status(): CONNECTED is the kernel's "config refcount != 0", so a device merely held open
# shows as connected too.
DeviceStatus = collections.namedtuple("DeviceStatus", "index connected")
# info(): what sysfs says about a device; pid is the connecting process, None when unconnected
DeviceInfo = collections.namedtuple("DeviceInfo", "index path size pid backend")


class NotSupported(NbdError):
    """The running kernel has no nbd driver (or no way to load it)."""


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def _family(sock: _genl.Socket) -> _genl.Family:
    try:
        return _genl.resolve(sock, FAMILY_NAME)
    except NetlinkError as e:
        if e.errno == errno.ENOENT:
            raise NotSupported(errno.ENOENT, "this kernel has no nbd driver (modprobe nbd)") \
                from None
        raise


def _request(command: int, attrs: bytes, what: str) -> list[bytes]:
    with _genl.Socket() as sock:
        family = _family(sock)
        return sock.request(family.id, command, lib.NBD_GENL_VERSION, attrs, what=what)


def _fd(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _sockets_attr(socks: Sequence[socket.socket | int]) -> bytes:
    return _genl.attr_nested(lib.NBD_ATTR_SOCKETS, *(
        _genl.attr_nested(lib.NBD_SOCK_ITEM, _genl.attr_u32(lib.NBD_SOCK_FD, _fd(s)))
        for s in socks))


def _optional_attrs(timeout: float | None, dead_conn_timeout: float | None,
                    client_flags: int | None, backend: str | None) -> bytes:
    attrs = b""
    if timeout is not None:
        attrs += _genl.attr_u64(lib.NBD_ATTR_TIMEOUT, int(timeout))
    if dead_conn_timeout is not None:
        attrs += _genl.attr_u64(lib.NBD_ATTR_DEAD_CONN_TIMEOUT, int(dead_conn_timeout))
    if client_flags is not None:
        attrs += _genl.attr_u64(lib.NBD_ATTR_CLIENT_FLAGS, client_flags)
    if backend is not None:
        attrs += _genl.attr_string(lib.NBD_ATTR_BACKEND_IDENTIFIER, backend)
    return attrs


def connect(socks: Sequence[socket.socket | int], size: int, *, index: int | None = None,
            block_size: int = 512, server_flags: int = 0, client_flags: int = 0,
            timeout: float | None = None, dead_conn_timeout: float | None = None,
            backend: str | None = None) -> int:
    """NBD_CMD_CONNECT; returns the device index the kernel used.

    index None lets the kernel pick any unconfigured device, or create one; an explicit index
    fails with EBUSY while anyone (udev, blkid) merely holds that device open.
    server_flags are the export's transmission flags from the handshake; block_size must be a
    power of two from 512 to the page size and divide size. timeout (s) marks a stalled
    connection dead; dead_conn_timeout (s) is how long the kernel then waits for reconfigure().
    """
    if block_size < 512 or block_size > os.sysconf("SC_PAGESIZE") or block_size & (block_size - 1):
        raise NbdError(errno.EINVAL, f"block size {block_size} is not a power of two from 512 to "
                       "the page size")
    if size <= 0 or size % block_size:
        raise NbdError(errno.EINVAL, f"size {size} is not a positive multiple of the block "
                       f"size {block_size}")
    if len(socks) > 1 and not server_flags & lib.NBD_FLAG_CAN_MULTI_CONN:
        raise NbdError(errno.EINVAL, "several connections need a server that allows them "
                       "(NBD_FLAG_CAN_MULTI_CONN)")
    attrs = (_genl.attr_u64(lib.NBD_ATTR_SIZE_BYTES, size)
             + _genl.attr_u64(lib.NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
             + _genl.attr_u64(lib.NBD_ATTR_SERVER_FLAGS, server_flags)
             + _optional_attrs(timeout, dead_conn_timeout, client_flags, backend)
             + _sockets_attr(socks))
    if index is not None:
        attrs += _genl.attr_u32(lib.NBD_ATTR_INDEX, index)
    replies = _request(lib.NBD_CMD_CONNECT, attrs, "NBD connect")
    for reply in replies:
        found = _genl.parse(reply).get(lib.NBD_ATTR_INDEX)
        if found is not None:
            return _genl.u32(found)
    raise NbdError(errno.EPROTO, "the kernel connected a device but did not say which")


def disconnect(index: int) -> None:
    """NBD_CMD_DISCONNECT. The kernel answers 0 even for an unconnected device; the device's
    state lives until its last opener closes it (see wait_disconnected)."""
    _request(lib.NBD_CMD_DISCONNECT, _genl.attr_u32(lib.NBD_ATTR_INDEX, index),
             f"NBD disconnect of {device_path(index)}")


def reconfigure(index: int, socks: Sequence[socket.socket | int] = (), *,
                client_flags: int | None = None, timeout: float | None = None,
                dead_conn_timeout: float | None = None, backend: str | None = None) -> None:
    """NBD_CMD_RECONFIGURE: new sockets replace *dead* ones only (a socket offered while none is
    dead is silently dropped by the kernel); backend must match the one given at connect."""
    attrs = _genl.attr_u32(lib.NBD_ATTR_INDEX, index) + _optional_attrs(
        timeout, dead_conn_timeout, client_flags, backend)
    if socks:
        attrs += _sockets_attr(socks)
    _request(lib.NBD_CMD_RECONFIGURE, attrs, f"NBD reconfigure of {device_path(index)}")


def status(index: int | None = None) -> list[DeviceStatus]:
    """NBD_CMD_STATUS for one device or all, sorted by index."""
    attrs = _genl.attr_u32(lib.NBD_ATTR_INDEX, index) if index is not None else b""
    found = []
    for reply in _request(lib.NBD_CMD_STATUS, attrs, "NBD status"):
        for _, item in _genl.parse_list(_genl.parse(reply).get(lib.NBD_ATTR_DEVICE_LIST, b"")):
            fields = _genl.parse(item)
            found.append(DeviceStatus(_genl.u32(fields[lib.NBD_DEVICE_INDEX]),
                                      bool(fields[lib.NBD_DEVICE_CONNECTED][0])))
    return sorted(found)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise


def info(index: int) -> DeviceInfo:
    """The device's state from sysfs (readable by anyone, no netlink needed)."""
    base = f"{SYS_BLOCK}/nbd{index}"
    if not os.path.isdir(base):
        raise NbdError(errno.ENODEV, "no such nbd device", device_path(index))
    sectors = _read(f"{base}/size")
    pid = _read(f"{base}/pid")
    return DeviceInfo(index, device_path(index), int(sectors or 0) * 512,
                      int(pid) if pid else None, _read(f"{base}/backend") or None)


def connected() -> list[DeviceInfo]:
    """Every device connected to a server (a pid in sysfs), with its backend identifier."""
    found = []
    for state in status():
        if state.connected:
            try:
                device = info(state.index)
            except OSError:
                continue  # removed meanwhile
            if device.pid is not None:
                found.append(device)
    return found


def find_by_backend(backend: str) -> list[DeviceInfo]:
    """Connected devices whose backend identifier (given at connect) is *backend*: how a
    later process finds the device it connected for an export."""
    return [device for device in connected() if device.backend == backend]


def wait_connected(index: int, timeout: float = READY_TIMEOUT) -> DeviceInfo:
    """Wait until the kernel shows the device connected (a pid, a size): I/O may start."""
    deadline = time.monotonic() + timeout
    while True:
        state = info(index)
        if state.pid is not None and state.size > 0:
            return state
        if time.monotonic() >= deadline:
            raise NbdError(errno.ETIMEDOUT, f"not connected after {timeout:g} s",
                           device_path(index))
        time.sleep(POLL_INTERVAL)


def wait_disconnected(index: int, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the device's connection is gone (its pid attribute disappears)."""
    deadline = time.monotonic() + timeout
    while info(index).pid is not None:
        if time.monotonic() >= deadline:
            raise NbdError(errno.EBUSY, f"still connected {timeout:g} s after disconnect "
                           "(held open?)", device_path(index))
        time.sleep(POLL_INTERVAL)


class LinkDeadListener:
    """Announcements that the kernel declared a device's connection dead (NBD_CMD_LINK_DEAD).

    They come on the family's multicast group only, and never after a requested disconnect.
    The listener subscribes when it is made, so no event between subscribing and wait() is lost.
    """

    def __init__(self) -> None:
        self._sock = _genl.Socket()
        try:
            self._family = _family(self._sock)
            self._sock.join(self._family.groups[MCAST_GROUP])
        except BaseException:
            self._sock.close()
            raise
        self._pending: list[int] = []

    def wait(self, timeout: float | None = None) -> int | None:
        """The index of the next device declared dead, or None after *timeout* seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                messages = self._sock.receive()
            except TimeoutError:
                return None
            for kind, _seq, payload in messages:
                if kind != self._family.id:
                    continue
                command, attrs = _genl.split_genl(payload)
                index = _genl.parse(attrs).get(lib.NBD_ATTR_INDEX)
                if command == lib.NBD_CMD_LINK_DEAD and index is not None:
                    self._pending.append(_genl.u32(index))
        return self._pending.pop(0)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkDeadListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
