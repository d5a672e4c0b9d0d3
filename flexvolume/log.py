"""Where the driver's log goes: journald if it runs, else syslog, else a file; never stdout
or stderr, which kubelet parses as the reply. Logging never fails a call."""

from __future__ import annotations

import os
import struct
import time

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
LOG_FILE = "/var/log/flexblock.log"
LOG_FILE_ENV = "FLEXBLOCK_LOG_FILE"  # set: always log to this file (tests, containers)

ERROR, WARNING, INFO = 3, 4, 6  # syslog priorities


def _journal_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        # Native protocol: a value with newlines is sent as its length and raw bytes.
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def _send(path: str, payload: bytes) -> None:
    import socket  # only when a log socket exists: it costs every call milliseconds

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, path)


def log(identifier: str, priority: int, message: str, **fields: str) -> None:
    try:
        log_file = os.environ.get(LOG_FILE_ENV)
        if not log_file and os.path.exists(JOURNAL_SOCKET):
            payload = _journal_field("MESSAGE", message) + _journal_field(
                "PRIORITY", str(priority)) + _journal_field("SYSLOG_IDENTIFIER", identifier)
            for key, value in fields.items():
                payload += _journal_field(f"FLEXBLOCK_{key.upper()}", value)
            _send(JOURNAL_SOCKET, payload)
            return
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{identifier}[{os.getpid()}]: {message}" + (f" ({extra})" if extra else "")
        if not log_file and os.path.exists(SYSLOG_SOCKET):
            _send(SYSLOG_SOCKET, f"<{8 + priority}>{line}".encode("utf-8", "replace"))
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        fd = os.open(log_file or LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o640)
        try:
            os.write(fd, f"{stamp} {line}\n".encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except Exception:
        pass
