"""NBD devices without nbd-client: the handshake (nbd.handshake, pure protocol over any
socket), the kernel's ``nbd`` generic-netlink family (nbd.control), the two together
(nbd.client) and qemu-nbd servers for image files (nbd.server)."""

from .client import attach, reconnect
from .control import (DeviceInfo, DeviceStatus, LinkDeadListener, NotSupported, connect,
                      connected, disconnect, find_by_backend, info, reconfigure, status,
                      wait_connected, wait_disconnected)
from .errors import HandshakeError, NbdError, NetlinkError, ServerError
from .handshake import Export

__all__ = [
    "attach", "reconnect", "connect", "disconnect", "connected", "find_by_backend",
    "reconfigure", "status", "info",
    "wait_connected", "wait_disconnected", "LinkDeadListener", "DeviceInfo", "DeviceStatus",
    "Export", "NbdError", "HandshakeError", "ServerError", "NetlinkError",
    "NotSupported",
]
