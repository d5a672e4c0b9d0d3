"""NBD servers for image files, one process per image: started as daemons on a unix socket,
found again by a later process (the driver exits between kubelet's calls), and stopped.

Starting the server process is most of what serving an image costs: about 250 ms of exec and
dynamic linking of qemu-nbd under TCG, nearly as much as the whole of ``qemu-nbd -c``. So
keep_spare() has an idle qemu-storage-daemon started in the background, and the next start()
takes it and only sends it the image's configuration over QMP; with no spare ready, start()
runs a qemu-nbd, which costs less than starting a daemon and then configuring it. A server for
a qemu protocol filename (start_named, e.g. sheepdog) is a qemu-nbd.

A server is named after its image's identity (device and inode), so every process finds the
same one, and its sockets and pid file live under RUN_DIR (a tmpfs: they vanish with a reboot,
as the servers do); spares live in RUN_DIR/spares until taken. Its stdio goes to a log file
next to them, never to the caller's: kubelet waits for EOF on the driver's output, and a
daemon holding it would hang the call forever. qemu's own image locking (OFD locks on the
image) keeps a second server, here or on another host sharing the file, from opening an image
that one already serves read-write.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from . import qmp
from .errors import NbdError

RUN_DIR = "/run/flexblock/qemu-nbd"
DAEMON = "qemu-storage-daemon"
FORMATS = ("raw", "qcow2", "parallels")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# start() and find(): a running server and the image it serves (format None: a daemon taken
# for the image by a start() that has not recorded its settings yet); program: "qemu-nbd"
# (which inherited the caller's open file of the image) or DAEMON
Server = collections.namedtuple("Server", "pid socket_path image_id format read_only program")
# Spares live this long without a pid file before keep_spare() takes them for failed starts.
SPARE_START_TIMEOUT = START_TIMEOUT
_spawned: list[subprocess.Popen] = []  # spares started by keep_spare(), reaped later


def image_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev:x}-{st.st_ino:x}"


def _paths(ident: str) -> tuple[str, str, str, str]:
    """The server's NBD socket, pid file (for a daemon: our record of it), log and, for a
    daemon, its QMP socket."""
    base = os.path.join(RUN_DIR, ident)
    return f"{base}.sock", f"{base}.pid", f"{base}.log", f"{base}.qmp"


def _spare_dir() -> str:
    return os.path.join(RUN_DIR, "spares")


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _monitor_of(argv: list[bytes]) -> str | None:
    """The QMP socket a qemu-storage-daemon started by this module listens on (its name is
    the daemon's token: a recycled pid has another command line)."""
    if not argv or os.path.basename(argv[0]) != DAEMON.encode():
        return None
    prefix = b"socket,id=monitor,path="
    for arg in argv:
        if arg.startswith(prefix):
            return arg[len(prefix):].split(b",")[0].decode(errors="replace")
    return None


def find(fd: int) -> Server | None:
    """The running server for the image open as *fd*, if any."""
    return find_by_id(image_id(fd))


def find_by_id(ident: str) -> Server | None:
    """The running server for the image with identity *ident* (see image_id), if any."""
    socket_path, pid_path, _, _ = _paths(ident)
    try:
        with open(pid_path, encoding="ascii") as f:
            fields = f.read().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    argv = _cmdline(pid)
    monitor = _monitor_of(argv)
    if len(fields) == 4:  # a daemon's record: pid, token, format, rw/ro
        if monitor is None or os.path.basename(monitor) != fields[1] + ".qmp":
            return None
        return Server(pid, socket_path, ident, fields[2], fields[3] == "ro", DAEMON)
    if monitor is not None:  # qemu wrote it: a spare taken for ident, not configured yet
        taken = os.path.dirname(monitor) == _spare_dir()
        return Server(pid, socket_path, ident, None, False, DAEMON) if taken else None
    if not argv or os.path.basename(argv[0]) != b"qemu-nbd" or socket_path.encode() not in argv:
        return None
    args = [a.decode(errors="replace") for a in argv]
    fmt = args[args.index("--format") + 1] if "--format" in args else "raw"
    return Server(pid, socket_path, ident, fmt, "--read-only" in args, "qemu-nbd")


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
                   if name.endswith((".sock", ".pid", ".log", ".qmp"))})


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
    """Serve the image open as *fd* (the server opens it through /proc/PID/fd of this
    process, so a path checked by the caller cannot be swapped) with discards passed down to
    the file: by a spare daemon (keep_spare) if one is ready, else by a qemu-nbd started now
    (which costs less than starting a daemon, then configuring it)."""
    _check_settings(fmt, cache)
    filename = f"/proc/{os.getpid()}/fd/{fd}"
    _check_image(filename, fmt)
    ident = image_id(fd)
    _check_free(ident)
    taken = _take_spare(ident)
    if taken is None:
        return _launch(ident, f"/proc/self/fd/{fd}", fmt, cache, read_only, (fd,))
    pid, token = taken
    socket_path, pid_path, _, qmp_path = _paths(ident)
    try:
        with qmp.Monitor(qmp_path) as monitor:
            _export(monitor, filename, fmt, cache, read_only, socket_path)
        # Recorded once configured: until then find() reports the daemon with format None.
        _write_record(pid_path, f"{pid} {token} {fmt} {'ro' if read_only else 'rw'}\n")
    except BaseException as e:
        stop_by_id(ident)
        if isinstance(e, NbdError) and e.errno == errno.EIO:
            raise NbdError(errno.EIO, f"qemu-storage-daemon refused the image: {e.strerror}",
                           socket_path) from None
        raise
    return Server(pid, socket_path, ident, fmt, read_only, DAEMON)


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
    _check_free(ident)
    return _launch(ident, filename, fmt, cache, read_only, ())


def _check_free(ident: str) -> None:
    """Refuse a second server for *ident*; clear what a dead one left."""
    running = find_by_id(ident)
    if running is not None:
        raise NbdError(errno.EBUSY, f"already served by process {running.pid}",
                       running.socket_path)
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    _remove_files(ident)


def _write_record(pid_path: str, record: str) -> None:
    temp = pid_path + ".new"
    with open(temp, "w", encoding="ascii") as f:
        f.write(record)
    os.replace(temp, pid_path)


def _cache_options(cache: str) -> tuple[dict, bool]:
    """qemu-nbd's --cache modes as blockdev cache options and the export's writethrough."""
    return ({"direct": cache in ("none", "directsync"), "no-flush": cache == "unsafe"},
            cache in ("writethrough", "directsync"))


def _export(monitor: qmp.Monitor, filename: str, fmt: str, cache: str, read_only: bool,
            socket_path: str) -> None:
    """What qemu-nbd --persistent --discard=unmap --cache=CACHE -f FMT serves, over QMP."""
    cache_opts, writethrough = _cache_options(cache)
    common = {"discard": "unmap", "read-only": read_only, "cache": cache_opts}
    monitor.execute("blockdev-add", {"driver": "file", "node-name": "file",
                                     "filename": filename, **common})
    image = {"driver": fmt, "node-name": "image", "file": "file", **common}
    if fmt == "qcow2":
        image["backing"] = None  # never open a file the image names (also checked before)
    monitor.execute("blockdev-add", image)
    # One client at a time, like qemu-nbd's default: a second device on one image would be a
    # second writer.
    monitor.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket_path}},
                                         "max-connections": 1})
    monitor.execute("block-export-add", {"type": "nbd", "id": "image", "node-name": "image",
                                         "name": "", "writable": not read_only,
                                         "writethrough": writethrough})


def _spawn_daemon(qmp_path: str, pid_path: str, log_path: str) -> subprocess.Popen:
    """An idle qemu-storage-daemon with a QMP socket; its first process exits once the
    daemon is up (pid file written)."""
    argv = [DAEMON, "--chardev",
            f"socket,id=monitor,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=monitor", "--daemonize", "--pidfile", pid_path]
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        except FileNotFoundError:
            os.unlink(log_path)
            raise NbdError(errno.ENOENT, "qemu-storage-daemon is not installed "
                           "(Debian: qemu-system-common)") from None


def _take_spare(ident: str) -> tuple[int, str] | None:
    """Take a ready spare for *ident*, its pid and token: its QMP socket is renamed first,
    which only one caller can do, then its log and pid file."""
    spare_dir = _spare_dir()
    try:
        names = sorted(os.listdir(spare_dir))
    except FileNotFoundError:
        return None
    _, pid_path, log_path, qmp_path = _paths(ident)
    for name in names:
        if not name.endswith(".pid"):
            continue
        token = name[:-len(".pid")]
        base = os.path.join(spare_dir, token)
        try:
            os.rename(base + ".qmp", qmp_path)
        except FileNotFoundError:
            continue  # taken by another caller, or not a complete spare
        for suffix, path in ((".log", log_path), (".pid", pid_path)):
            try:
                os.rename(base + suffix, path)
            except FileNotFoundError:
                pass
        taken = find_by_id(ident)
        if taken is not None:
            return taken.pid, token
        _remove_files(ident)  # the spare had died
    return None


def keep_spare() -> None:
    """Have a spare daemon ready, or starting, for the next start() on this host: one is
    started in the background if there is none (this returns at once). The spare stays
    until a start() takes it, stop_spares(), or a reboot."""
    _spawned[:] = [process for process in _spawned if process.poll() is None]
    if shutil.which(DAEMON) is None or not _can_copy_fds():
        return  # start() runs qemu-nbd
    if "," in RUN_DIR:  # qemu's option syntax would split the daemon's socket path there
        raise NbdError(errno.EINVAL, "RUN_DIR must not contain a comma", RUN_DIR)
    spare_dir = _spare_dir()
    os.makedirs(spare_dir, mode=0o700, exist_ok=True)
    states = _spare_states()
    if "ready" in states.values() or "starting" in states.values():
        return
    for base, state in states.items():
        if state in ("failed", "died"):
            _remove_spare_files(base)
    token = os.path.join(spare_dir, os.urandom(8).hex())
    _spawned.append(_spawn_daemon(token + ".qmp", token + ".pid", token + ".log"))


def spare_ready() -> bool:
    """Is a spare daemon ready for the next start() on this host?"""
    return "ready" in _spare_states().values()


def _spare_states() -> dict[str, str]:
    """Each spare's files' base path -> "ready", "starting", "failed" (never came up: no pid
    file SPARE_START_TIMEOUT after its start; a taken spare loses its pid file last) or
    "died"."""
    try:
        names = os.listdir(_spare_dir())
    except FileNotFoundError:
        return {}
    states = {}
    now = time.time()
    for base in sorted({os.path.join(_spare_dir(), name.rsplit(".", 1)[0]) for name in names}):
        try:
            with open(base + ".pid", encoding="ascii") as f:
                pid = int(f.read().split()[0])
        except FileNotFoundError:
            try:
                young = now - os.stat(base + ".log").st_mtime < SPARE_START_TIMEOUT
            except FileNotFoundError:
                young = False
            states[base] = "starting" if young else "failed"
            continue
        except (ValueError, IndexError):
            states[base] = "starting"  # qemu is writing it
            continue
        states[base] = "ready" if _monitor_of(_cmdline(pid)) == base + ".qmp" else "died"
    return states


def _can_copy_fds() -> bool:
    """Has the kernel pidfd_getfd (Linux 5.6), which open_image() needs for a daemon that did
    not inherit the caller's file? Probed with an invalid pidfd: EBADF if it has."""
    from ._ffi import lib

    return lib.fb_pidfd_getfd(-1, 0) != -errno.ENOSYS


def stop_spares() -> None:
    """Stop every spare daemon (ready or starting) and remove their files."""
    spare_dir = _spare_dir()
    if not os.path.isdir(spare_dir):
        return  # keep_spare() never ran here since boot
    for process in _spawned:
        try:
            process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()  # its daemon, if it forked one, is found below
            process.wait()
    _spawned.clear()
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        monitor = _monitor_of(_cmdline(pid))
        if monitor is not None and os.path.dirname(monitor) == spare_dir:
            _kill(pid, lambda pid=pid, monitor=monitor: _monitor_of(_cmdline(pid)) == monitor)
    for base in {os.path.join(spare_dir, name.rsplit(".", 1)[0])
                 for name in os.listdir(spare_dir)}:
        _remove_spare_files(base)


def _remove_spare_files(base: str) -> None:
    for suffix in (".qmp", ".pid", ".log"):
        try:
            os.unlink(base + suffix)
        except FileNotFoundError:
            pass


def _launch(ident: str, image: str, fmt: str, cache: str, read_only: bool,
            pass_fds: tuple[int, ...]) -> Server:
    """A qemu-nbd serving *image* as *ident*, started now."""
    socket_path, pid_path, log_path, _ = _paths(ident)
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


def open_image(server: Server) -> int:
    """A new fd on the server's own open file of its image (pidfd_getfd, Linux 5.6): an OFD
    lock taken through it lasts exactly as long as the server keeps the image open. (A
    qemu-nbd also holds the caller's own open file, which it inherited.)"""
    from ._ffi import lib

    try:
        pidfd = os.pidfd_open(server.pid)
    except OSError as e:
        raise NbdError(e.errno, f"server process {server.pid}: {e.strerror}",
                       server.socket_path) from None
    try:
        if getattr(find_by_id(server.image_id), "pid", None) != server.pid:
            raise NbdError(errno.ESRCH, f"server process {server.pid} is gone",
                           server.socket_path)
        fd_dir = f"/proc/{server.pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                st = os.stat(os.path.join(fd_dir, name))
            except OSError:
                continue
            if f"{st.st_dev:x}-{st.st_ino:x}" == server.image_id:
                fd = lib.fb_pidfd_getfd(pidfd, int(name))
                if fd < 0:
                    raise NbdError(-fd, f"pidfd_getfd: {os.strerror(-fd)}", server.socket_path)
                return fd
        raise NbdError(errno.ENOENT, f"server process {server.pid} has no image open",
                       server.socket_path)
    finally:
        os.close(pidfd)


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
    _kill(server.pid, lambda: getattr(find_by_id(server.image_id), "pid", None) == server.pid,
          timeout)
    _remove_files(server.image_id)


def _kill(pid: int, is_ours: Callable[[], bool], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM process *pid*, SIGKILL after *timeout*, and wait until it has ended (its files
    closed, its image locks gone), if *is_ours()* says it is the process meant. Through a
    pidfd, so that once checked the pid cannot be another process's."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not is_ours():
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if select.select([pidfd], [], [], timeout)[0]:  # readable once it has ended
                return
        raise NbdError(errno.EBUSY, f"server process {pid} survived SIGKILL")
    finally:
        os.close(pidfd)


def stop_by_id(ident: str) -> None:
    """Stop image *ident*'s server if it runs, and remove its files either way. The caller
    makes sure nobody is starting a server for that image meanwhile (its files would go)."""
    running = find_by_id(ident)
    if running is not None:
        stop(running)
    else:
        _remove_files(ident)


def _remove_files(ident: str) -> None:
    socket_path, pid_path, log_path, qmp_path = _paths(ident)
    for path in (socket_path, pid_path, log_path, qmp_path, pid_path + ".new"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
