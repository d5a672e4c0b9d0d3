"""qemu-nbd servers for image files: started as daemons on a unix socket, found again by a
later process (the driver exits between kubelet's calls), and stopped.

A server is named after its image's identity (device and inode), so every process finds the
same one, and its socket and pid file live under RUN_DIR (a tmpfs: they vanish with a reboot,
as the servers do). Its stdio goes to a log file next to them, never to the caller's: kubelet
waits for EOF on the driver's output, and a daemon holding it would hang the call forever.
qemu's own image locking (OFD locks on the image) keeps a second server, here or on another
host sharing the file, from opening an image that one already serves read-write.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import signal
import socket
import subprocess
import time

from .errors import NbdError

RUN_DIR = "/run/flexblock/qemu-nbd"
FORMATS = ("raw", "qcow2", "parallels")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# start() and find(): a running qemu-nbd and the image it serves
Server = collections.namedtuple("Server", "pid socket_path image_id format read_only")


def image_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev:x}-{st.st_ino:x}"


def _paths(ident: str) -> tuple[str, str, str]:
    base = os.path.join(RUN_DIR, ident)
    return f"{base}.sock", f"{base}.pid", f"{base}.log"


def _alive(pid: int, socket_path: str) -> bool:
    """Is *pid* a qemu-nbd serving *socket_path* (not a recycled pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"qemu-nbd" and \
        socket_path.encode() in argv


def find(fd: int) -> Server | None:
    """The running server for the image open as *fd*, if any."""
    return find_by_id(image_id(fd))


def find_by_id(ident: str) -> Server | None:
    """The running server for the image with identity *ident* (see image_id), if any."""
    socket_path, pid_path, _ = _paths(ident)
    try:
        with open(pid_path, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid, socket_path):
        return None
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    fmt = argv[argv.index("--format") + 1] if "--format" in argv else "raw"
    return Server(pid, socket_path, ident, fmt, "--read-only" in argv)


def list_servers() -> list[Server]:
    """Every server started by start() that is still running."""
    found = (find_by_id(ident) for ident in list_ids())
    return [server for server in found if server is not None]


def list_ids() -> list[str]:
    """The identities of the images that have files in RUN_DIR: their servers' running, or
    dead with nobody to remove the files (killed, or a stop() killed half-way)."""
    try:
        names = os.listdir(RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted({name.rsplit(".", 1)[0] for name in names
                   if name.endswith((".sock", ".pid", ".log"))})


def _check_image(path: str, fmt: str) -> None:
    """Refuse images that would make qemu open other files: a qcow2 backing file or external
    data file could name any file on the node, and the server runs as root."""
    if fmt != "qcow2":
        return
    import json

    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", "-f", fmt, path],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise NbdError(errno.EINVAL, f"qemu-img info: {out.stderr.strip()}", path)
    info = json.loads(out.stdout)
    specific = info.get("format-specific", {}).get("data", {})
    if "backing-filename" in info or "data-file" in specific:
        raise NbdError(errno.EPERM, "image refers to other files (backing or data file); "
                       "refusing to serve it", path)


def _check_settings(fmt: str, cache: str) -> None:
    if fmt not in FORMATS:
        raise NbdError(errno.EINVAL, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if cache not in CACHE_MODES:
        raise NbdError(errno.EINVAL, f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")


def start(fd: int, *, fmt: str = "raw", cache: str = "writeback",
          read_only: bool = False) -> Server:
    """Serve the image open as *fd* (the server opens it through /proc/self/fd, so a path
    checked by the caller cannot be swapped) with discards passed down to the file."""
    _check_settings(fmt, cache)
    _check_image(f"/proc/{os.getpid()}/fd/{fd}", fmt)
    return _launch(image_id(fd), f"/proc/self/fd/{fd}", fmt, cache, read_only, (fd,))


def start_named(ident: str, filename: str, *, fmt: str = "raw", cache: str = "writeback",
                read_only: bool = False) -> Server:
    """Serve what qemu opens by *filename*, a protocol filename naming no local file (such as
    ``sheepdog:HOST:PORT:VDI``), as the server *ident* (letters, digits, ``._-``: it names
    the server's files, and the socket path must stay under 108 bytes)."""
    if not _IDENT.fullmatch(ident):
        raise NbdError(errno.EINVAL, f"server identity {ident!r} is not a short file name")
    if filename.startswith("-") or "\0" in filename:
        raise NbdError(errno.EINVAL, f"{filename!r} is not a qemu filename")
    _check_settings(fmt, cache)
    _check_image(filename, fmt)
    return _launch(ident, filename, fmt, cache, read_only, ())


def _launch(ident: str, image: str, fmt: str, cache: str, read_only: bool,
            pass_fds: tuple[int, ...]) -> Server:
    running = find_by_id(ident)
    if running is not None:
        raise NbdError(errno.EBUSY, f"already served by qemu-nbd {running.pid}",
                       running.socket_path)
    socket_path, pid_path, log_path = _paths(ident)
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    for stale in (socket_path, pid_path):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    argv = ["qemu-nbd", "--fork", "--persistent", "--socket", socket_path,
            "--pid-file", pid_path, "--format", fmt, f"--cache={cache}", "--discard=unmap"]
    if read_only:
        argv.append("--read-only")
    with open(log_path, "ab") as log:
        try:
            result = subprocess.run(argv + [image], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, pass_fds=pass_fds, timeout=START_TIMEOUT)
        except FileNotFoundError:
            raise NbdError(errno.ENOENT, "qemu-nbd is not installed (Debian: qemu-utils)") \
                from None
    if result.returncode != 0:
        raise NbdError(errno.EIO, f"qemu-nbd failed: {_tail(log_path)}", socket_path)
    server = find_by_id(ident)
    if server is None:
        raise NbdError(errno.ESRCH, f"qemu-nbd exited right after starting: {_tail(log_path)}",
                       socket_path)
    return server


def _tail(path: str, size: int = 1000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - size))
        return f.read().decode(errors="replace").strip()


def open_socket(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(server.socket_path)
    except BaseException:
        sock.close()
        raise
    return sock


def stop(server: Server, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the server (SIGTERM, SIGKILL after *timeout*) and remove its files."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(server.pid, server.socket_path):
            break
        os.kill(server.pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(server.pid, server.socket_path) and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        if _alive(server.pid, server.socket_path):
            raise NbdError(errno.EBUSY, f"qemu-nbd {server.pid} survived SIGKILL",
                           server.socket_path)
    _remove_files(server.image_id)


def stop_by_id(ident: str) -> None:
    """Stop image *ident*'s server if it runs, and remove its files either way. The caller
    makes sure nobody is starting a server for that image meanwhile (its files would go)."""
    running = find_by_id(ident)
    if running is not None:
        stop(running)
    else:
        _remove_files(ident)


def _remove_files(ident: str) -> None:
    for path in _paths(ident):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
