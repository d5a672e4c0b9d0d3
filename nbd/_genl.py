"""Generic netlink over a plain AF_NETLINK socket: messages, attributes, family lookup.

Header layouts (nlmsghdr, genlmsghdr, nlattr, nlmsgerr) and every constant come from the
kernel headers through nbd._ffi. Requests always carry NLM_F_ACK and are read until the
kernel's NLMSG_ERROR, since some commands (nbd's DISCONNECT, RECONFIGURE) send no reply of
their own; a non-zero error there is raised with the extended-ACK text when the kernel gives one.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import struct

from ._ffi import ffi, lib
from .errors import NetlinkError

_NLMSG_HDRLEN = ffi.sizeof("struct nlmsghdr")
_GENL_HDRLEN = ffi.sizeof("struct genlmsghdr")
_NLA_HDRLEN = ffi.sizeof("struct nlattr")
_NLA_TYPE_MASK = ~lib.NLA_F_NESTED & 0xFFFF
_RECV_SIZE = 65536

# resolve(): a generic netlink family's id and its multicast groups by name
Family = collections.namedtuple("Family", "name id groups")


def _align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    header = ffi.new("struct nlattr *")
    header.nla_len = _NLA_HDRLEN + len(payload)
    header.nla_type = kind
    data = bytes(ffi.buffer(header)) + payload
    return data + b"\0" * (_align(len(data)) - len(data))


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def attr_string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | lib.NLA_F_NESTED, b"".join(attrs))


def parse_list(data: bytes) -> list[tuple[int, bytes]]:
    """Attributes in order, as (type without flags, payload)."""
    found = []
    offset = 0
    while offset + _NLA_HDRLEN <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < _NLA_HDRLEN or offset + length > len(data):
            raise NetlinkError(errno.EPROTO, f"malformed netlink attribute at offset {offset}")
        found.append((kind & _NLA_TYPE_MASK, data[offset + _NLA_HDRLEN:offset + length]))
        offset += _align(length)
    return found


def parse(data: bytes) -> dict[int, bytes]:
    return dict(parse_list(data))


def split_genl(payload: bytes) -> tuple[int, bytes]:
    """(command, attributes) of a generic netlink message, as receive() returns it."""
    genl = ffi.from_buffer("struct genlmsghdr *", payload)
    return genl.cmd, payload[_GENL_HDRLEN:]


def u32(payload: bytes) -> int:
    return struct.unpack("=I", payload[:4])[0]


class Socket:
    """A generic netlink socket; a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   lib.NETLINK_GENERIC)
        self._sock.bind((0, 0))
        # Extended ACKs carry the kernel's own words for a refused request; capped ACKs leave
        # our request out of the error message, so those words start right after nlmsgerr.
        self._sock.setsockopt(lib.SOL_NETLINK, lib.NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(lib.SOL_NETLINK, lib.NETLINK_CAP_ACK, 1)
        self._seq = int.from_bytes(os.urandom(3), "little")

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def join(self, group: int) -> None:
        self._sock.setsockopt(lib.SOL_NETLINK, lib.NETLINK_ADD_MEMBERSHIP, group)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def request(self, family: int, command: int, version: int, attrs: bytes = b"",
                *, what: str = "request") -> list[bytes]:
        """Send one request; returns the attribute payloads of the kernel's replies."""
        self._seq += 1
        header = ffi.new("struct nlmsghdr *")
        header.nlmsg_len = _NLMSG_HDRLEN + _GENL_HDRLEN + len(attrs)
        header.nlmsg_type = family
        header.nlmsg_flags = lib.NLM_F_REQUEST | lib.NLM_F_ACK
        header.nlmsg_seq = self._seq
        genl = ffi.new("struct genlmsghdr *")
        genl.cmd = command
        genl.version = version
        self._sock.send(bytes(ffi.buffer(header)) + bytes(ffi.buffer(genl)) + attrs)
        replies = []
        while True:
            for kind, seq, payload in self.receive():
                if seq != self._seq:
                    continue  # a multicast event, or a late answer to an earlier request
                if kind == lib.NLMSG_ERROR:
                    self._check_ack(payload, what)
                    return replies
                if kind != lib.NLMSG_DONE:
                    replies.append(payload[_GENL_HDRLEN:])

    def receive(self) -> list[tuple[int, int, bytes]]:
        """One datagram's messages as (type, seq, payload after the nlmsghdr)."""
        data = self._sock.recv(_RECV_SIZE)
        messages = []
        offset = 0
        while offset + _NLMSG_HDRLEN <= len(data):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
            if length < _NLMSG_HDRLEN:
                break
            messages.append((kind, seq, data[offset + _NLMSG_HDRLEN:offset + length]))
            offset += _align(length)
        return messages

    @staticmethod
    def _check_ack(payload: bytes, what: str) -> None:
        error, = struct.unpack_from("=i", payload)
        if error == 0:
            return
        err = -error
        message = f"{what}: {os.strerror(err)}"
        echoed = ffi.sizeof("struct nlmsgerr")
        extra = parse(payload[echoed:]) if len(payload) > echoed else {}
        text = extra.get(lib.NLMSGERR_ATTR_MSG, b"").rstrip(b"\0").decode(errors="replace")
        if text:
            message += f" ({text})"
        raise NetlinkError(err, message)


def resolve(sock: Socket, name: str) -> Family:
    """The id and multicast groups of family *name* (CTRL_CMD_GETFAMILY). Looking a family up
    makes the kernel load its module when it can (net-pf-16-proto-16-family-<name>)."""
    replies = sock.request(lib.GENL_ID_CTRL, lib.CTRL_CMD_GETFAMILY, 1,
                           attr_string(lib.CTRL_ATTR_FAMILY_NAME, name),
                           what=f"looking up generic netlink family {name!r}")
    attrs = parse(replies[0])
    family_id, = struct.unpack("=H", attrs[lib.CTRL_ATTR_FAMILY_ID][:2])
    groups = {}
    for _, group in parse_list(attrs.get(lib.CTRL_ATTR_MCAST_GROUPS, b"")):
        fields = parse(group)
        groups[fields[lib.CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()] = u32(
            fields[lib.CTRL_ATTR_MCAST_GRP_ID])
    return Family(name, family_id, groups)
