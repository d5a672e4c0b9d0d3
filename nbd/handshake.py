"""The NBD handshake, client side, from the greeting to the transmission phase.

Fixed newstyle (doc/proto.md of the NBD project): NBD_OPT_GO asking for the block-size
constraints, falling back to NBD_OPT_EXPORT_NAME on servers without GO. The socket is meant for
the kernel, which speaks only simple replies: structured replies, extended headers and meta
contexts are never negotiated, and nothing is read beyond the handshake, so no byte of the
transmission phase is left in a userspace buffer.

It needs nothing but a connected stream socket, so it is tested against real servers on the
host; handing the socket to the kernel is nbd.control's business.
"""

from __future__ import annotations

import collections
import socket
import struct

from .errors import HandshakeError, ServerError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
# proto.md's error replies, by their low bits; UNSUP makes us fall back to EXPORT_NAME.
ERR_UNSUP = REP_ERROR_BIT | 1
ERROR_NAMES = {REP_ERROR_BIT | n: name for n, name in enumerate(
    ("", "ERR_UNSUP", "ERR_POLICY", "ERR_INVALID", "ERR_PLATFORM", "ERR_TLS_REQD",
     "ERR_UNKNOWN", "ERR_SHUTDOWN", "ERR_BLOCK_SIZE_REQD", "ERR_TOO_BIG",
     "ERR_EXT_HEADER_REQD")) if name}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3
_INFO_LENGTHS = {INFO_EXPORT: 12, INFO_BLOCK_SIZE: 14}
_MAX_REPLY = 1 << 20  # a reply to GO is a few dozen bytes; anything huge is a broken server
_ZEROES = 124
# Block-size constraints a server states when it states none (proto.md): clients should use
# 512 as the minimum.
DEFAULT_MIN_BLOCK = 512
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 1 << 25

# handshake(): what the server told us about the export. flags are the transmission flags
# (NBD_FLAG_* of <linux/nbd.h>), which the kernel needs as NBD_ATTR_SERVER_FLAGS.
Export = collections.namedtuple(
    "Export", "name size flags min_block preferred_block max_block description")


def _recv_exact(sock: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise HandshakeError(f"server closed the connection after {len(data)} of "
                                 f"{length} expected bytes")
        data += chunk
    return bytes(data)


def _send_option(sock: socket.socket, option: int, payload: bytes) -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload)


def handshake(sock: socket.socket, export_name: str = "") -> Export:
    """Negotiate *export_name* on a freshly connected socket; returns the export's facts."""
    magic, second = struct.unpack(">QQ", _recv_exact(sock, 16))
    if magic != NBDMAGIC:
        raise HandshakeError(f"not an NBD server (greeting {magic:#x})")
    if second == OLDSTYLE_MAGIC:
        raise HandshakeError("server speaks the oldstyle protocol, which is not supported")
    if second != IHAVEOPT:
        raise HandshakeError(f"unexpected newstyle magic {second:#x}")
    server_flags, = struct.unpack(">H", _recv_exact(sock, 2))
    client_flags = server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    sock.sendall(struct.pack(">I", client_flags))
    name = export_name.encode()
    if client_flags & FLAG_FIXED_NEWSTYLE:
        export = _go(sock, name)
        if export is not None:
            return export
    return _export_name(sock, name, no_zeroes=bool(client_flags & FLAG_NO_ZEROES))


def _go(sock: socket.socket, name: bytes) -> Export | None:
    """NBD_OPT_GO; None if the server does not know the option."""
    _send_option(sock, OPT_GO, struct.pack(">I", len(name)) + name +
                 struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    size = flags = None
    blocks = (DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_BLOCK)
    info_name, description = name.decode(errors="replace"), ""
    while True:
        magic, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
        if magic != REPLY_MAGIC:
            raise HandshakeError(f"bad option reply magic {magic:#x}")
        if option != OPT_GO:
            raise HandshakeError(f"reply for option {option}, expected {OPT_GO} (GO)")
        if length > _MAX_REPLY:
            raise HandshakeError(f"option reply of {length} bytes")
        data = _recv_exact(sock, length)  # always consume exactly length bytes
        if reply == ERR_UNSUP:
            return None
        if reply & REP_ERROR_BIT:
            raise ServerError(ERROR_NAMES.get(reply, f"error {reply:#x}"),
                              data.decode("utf-8", "replace"))
        if reply == REP_ACK:
            if size is None:
                raise HandshakeError("server acknowledged GO without describing the export")
            return Export(info_name, size, flags, *blocks, description)
        if reply != REP_INFO or len(data) < 2:
            raise HandshakeError(f"unexpected reply {reply} to GO")
        info, = struct.unpack_from(">H", data)
        expected = _INFO_LENGTHS.get(info)
        if expected is not None and len(data) != expected:
            raise HandshakeError(f"info {info} has {len(data)} bytes, expected {expected}")
        if info == INFO_EXPORT:
            size, flags = struct.unpack_from(">QH", data, 2)
        elif info == INFO_BLOCK_SIZE:
            blocks = struct.unpack_from(">III", data, 2)
        elif info == INFO_NAME:
            info_name = data[2:].decode("utf-8", "replace")
        elif info == INFO_DESCRIPTION:
            description = data[2:].decode("utf-8", "replace")
        # other info types are the server's to add; ignoring them is the protocol's rule


def _export_name(sock: socket.socket, name: bytes, *, no_zeroes: bool) -> Export:
    _send_option(sock, OPT_EXPORT_NAME, name)
    # A server that refuses the name can only drop the connection (proto.md).
    try:
        size, flags = struct.unpack(">QH", _recv_exact(sock, 10))
    except HandshakeError:
        raise HandshakeError(f"server closed the connection: no export named "
                             f"{name.decode(errors='replace')!r}?") from None
    if not no_zeroes:
        _recv_exact(sock, _ZEROES)
    return Export(name.decode(errors="replace"), size, flags, DEFAULT_MIN_BLOCK,
                  DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_BLOCK, "")

