"""QMP, the QEMU Machine Protocol, as far as nbd.server needs it: one command at a time on a
monitor's unix socket, asynchronous events skipped, qemu's refusals raised with its own text."""

from __future__ import annotations

import errno
import json
import socket

from .errors import NbdError

TIMEOUT = 30.0


class Monitor:
    """A QMP connection, in command mode once constructed."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            self._replies = self._sock.makefile("rb")
            if "QMP" not in self._read():
                raise NbdError(errno.EPROTO, "no QMP greeting", path)
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(self, command: str, arguments: dict | None = None) -> object:
        """Run *command*; its return value, or NbdError(EIO) with qemu's description."""
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode())
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise NbdError(errno.EIO, f"{command}: {reply['error'].get('desc', reply)}",
                               self.path)

    def _read(self) -> dict:
        line = self._replies.readline()
        if not line:
            raise NbdError(errno.ECONNRESET, "qemu closed its monitor", self.path)
        return json.loads(line)

    def close(self) -> None:
        if hasattr(self, "_replies"):
            self._replies.close()
        self._sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
