"""NBD servers (qemu-storage-daemon, and qemu-nbd for named servers) started, found again and
stopped by nbd.server, for real, on the host; spare daemons kept and taken.

The servers run in a private RUN_DIR per test; every server a test started is killed at
teardown, found by the paths only that test uses.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nbd import server
from nbd.errors import NbdError
from nbd.handshake import handshake

from helpers import wait_until

MiB = 1 << 20


SERVER_PROGRAMS = (b"qemu-nbd", b"qemu-storage-daemon")


def _serving(run_dir: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) in SERVER_PROGRAMS and \
                any(run_dir.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = str(tmp_path / "run")
    monkeypatch.setattr(server, "RUN_DIR", path)
    yield path
    for pid in _serving(path):
        os.kill(pid, signal.SIGKILL)
    for pid in _serving(path):  # a spare's first process may have started its daemon since
        os.kill(pid, signal.SIGKILL)


def _image(tmp_path, fmt: str, size: str = "64M") -> str:
    path = str(tmp_path / f"disk.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
    return path


@pytest.fixture(params=["qemu-storage-daemon", "qemu-nbd"])
def program(request, run_dir) -> str:
    """What the next start() serves the image with: the spare qemu-storage-daemon made ready
    here, or, with no spare ready, a qemu-nbd of its own."""
    if request.param == "qemu-storage-daemon":
        server.keep_spare()
        assert wait_until(server.spare_ready)
    return request.param


def _assert_runs(started: server.Server, program: str) -> None:
    assert started.program == program
    with open(f"/proc/{started.pid}/comm", encoding="utf-8") as f:
        assert f.read().strip() == program[:15]  # the kernel keeps 15 characters


def _files(run_dir: str) -> list[str]:
    """What the servers left in RUN_DIR (the spares' directory aside)."""
    return sorted(name for name in os.listdir(run_dir) if name != "spares")


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "parallels"])
def test_start_find_handshake_stop(run_dir, tmp_path, fmt, program):
    fd = os.open(_image(tmp_path, fmt), os.O_RDWR)
    try:
        started = server.start(fd, fmt=fmt)
        _assert_runs(started, program)
        assert server.find(fd) == started
        assert started.format == fmt and not started.read_only
        with server.open_socket(started) as sock:
            assert handshake(sock).size == 64 * MiB
        server.stop(started)
        assert server.find(fd) is None
        assert _serving(run_dir) == []
        assert _files(run_dir) == []
    finally:
        os.close(fd)


def test_files_of_a_dead_server_are_listed_and_removed(run_dir, tmp_path):
    """A server killed (or a stop() killed between the server's death and the removal of its
    files) leaves its sockets, pid file and log: list_ids finds them, stop_by_id removes them."""
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        started = server.start(fd)
        assert server.list_ids() == [started.image_id]
        os.kill(started.pid, signal.SIGKILL)
        assert wait_until(lambda: not _serving(run_dir))
        assert server.list_servers() == [] and server.list_ids() == [started.image_id]
        assert len(os.listdir(run_dir)) == 3
        server.stop_by_id(started.image_id)
        assert server.list_ids() == [] and os.listdir(run_dir) == []
        # ... and a running one is stopped first.
        started = server.start(fd)
        server.stop_by_id(started.image_id)
        assert _serving(run_dir) == [] and os.listdir(run_dir) == []
    finally:
        os.close(fd)


def test_second_server_for_one_image_is_refused(run_dir, tmp_path):
    path = _image(tmp_path, "raw")
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)
    try:
        started = server.start(fd)
        with pytest.raises(NbdError, match="already served"):
            server.start(other)
        server.stop(started)
    finally:
        os.close(fd)
        os.close(other)


def test_read_only_export(run_dir, tmp_path, program):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDONLY)
    try:
        started = server.start(fd, read_only=True)
        _assert_runs(started, program)
        assert server.find(fd).read_only
        with server.open_socket(started) as sock:
            assert handshake(sock).flags & 2  # NBD_FLAG_READ_ONLY
        server.stop(started)
    finally:
        os.close(fd)


def test_qcow2_naming_another_file_is_refused(run_dir, tmp_path):
    # A pod author controls the image's content: a backing file could be any file on the node.
    secret = tmp_path / "secret"
    secret.write_bytes(b"node secret\n" * 100)
    path = str(tmp_path / "evil.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    path], check=True)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(NbdError, match="refers to other files"):
            server.start(fd, fmt="qcow2")
        assert _serving(run_dir) == []
    finally:
        os.close(fd)


def test_named_server_for_a_qemu_filename(run_dir, tmp_path):
    # A protocol filename (the sheepdog driver's sheepdog:HOST:PORT:VDI) names no local file:
    # the server is named by the caller. A json: filename stands in for it here.
    path = _image(tmp_path, "raw", "16M")
    filename = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "%s"}}' % path
    started = server.start_named("vdi-1", filename, read_only=True)
    try:
        assert server.find_by_id("vdi-1") == started and started.read_only
        assert started.socket_path == os.path.join(run_dir, "vdi-1.sock")
        with server.open_socket(started) as sock:
            assert handshake(sock).size == 16 * MiB
        with pytest.raises(NbdError, match="already served"):
            server.start_named("vdi-1", filename)
    finally:
        server.stop(started)
    assert server.find_by_id("vdi-1") is None and os.listdir(run_dir) == []


@pytest.mark.parametrize("ident, filename", [
    ("../x", "sheepdog:v"), ("a/b", "sheepdog:v"), ("", "sheepdog:v"), ("x" * 65, "sheepdog:v"),
    (".x", "sheepdog:v"), ("ok", "--fork"), ("ok", "sheepdog:v\0"),
])
def test_named_server_refuses_unsafe_names(run_dir, ident, filename):
    with pytest.raises(NbdError) as raised:
        server.start_named(ident, filename)
    assert raised.value.errno == errno.EINVAL
    assert _serving(run_dir) == []


def test_found_again_by_another_process_and_stdio_released(run_dir, tmp_path):
    """The starter (like the driver) exits; its stdout pipe must reach EOF at once although the
    daemon lives on (kubelet waits for EOF), and a later process finds the server."""
    path = _image(tmp_path, "raw")
    starter = textwrap.dedent(f"""
        import os
        from nbd import server
        server.RUN_DIR = {run_dir!r}
        fd = os.open({path!r}, os.O_RDWR)
        print(server.start(fd).pid, flush=True)
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", starter], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert result.returncode == 0, result.stdout
    assert time.monotonic() - started < 20
    pid = int(result.stdout.split()[-1])
    fd = os.open(path, os.O_RDONLY)
    try:
        found = server.find(fd)
        assert found is not None and found.pid == pid
        with server.open_socket(found) as sock:
            export = handshake(sock)
        assert export.size == 64 * MiB
        server.stop(found)
        assert server.find(fd) is None
    finally:
        os.close(fd)


def test_bad_format_and_cache_mode(run_dir, tmp_path):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        with pytest.raises(NbdError, match="format"):
            server.start(fd, fmt="vmdk")
        with pytest.raises(NbdError, match="cache mode"):
            server.start(fd, cache="sometimes")
    finally:
        os.close(fd)


def test_start_takes_a_spare_and_keep_spare_starts_one_at_a_time(run_dir, tmp_path):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        server.keep_spare()
        server.keep_spare()  # one is starting: no second
        assert wait_until(server.spare_ready)
        server.keep_spare()  # one is ready: no second
        assert len(_serving(run_dir)) == 1
        spare_pid = _serving(run_dir)[0]
        started = server.start(fd)
        assert started.pid == spare_pid and server.find(fd) == started
        assert os.listdir(os.path.join(run_dir, "spares")) == []
        with server.open_socket(started) as sock:
            assert handshake(sock).size == 64 * MiB
        server.stop(started)
        assert _serving(run_dir) == [] and os.listdir(run_dir) == ["spares"]
    finally:
        os.close(fd)


def test_dead_spare_is_skipped_and_stop_spares_stops_them(run_dir, tmp_path):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        server.keep_spare()
        assert wait_until(server.spare_ready)
        os.kill(_serving(run_dir)[0], signal.SIGKILL)
        assert wait_until(lambda: not _serving(run_dir))
        started = server.start(fd)  # the dead spare's files stay behind: a qemu-nbd
        assert server.find(fd) == started
        server.stop(started)
        server.keep_spare()  # the dead spare's files go, a new one starts
        assert wait_until(server.spare_ready) and len(_serving(run_dir)) == 1
        server.stop_spares()
        assert _serving(run_dir) == [] and os.listdir(os.path.join(run_dir, "spares")) == []
    finally:
        os.close(fd)


def test_concurrent_starts_share_out_one_spare(run_dir, tmp_path):
    """Two processes start servers for two images while one spare is ready: one takes it, the
    other starts a daemon of its own; both serve their own image."""
    paths = []
    for name, size in (("a", "16M"), ("b", "32M")):
        (tmp_path / name).mkdir()
        paths.append(_image(tmp_path / name, "raw", size))
    server.keep_spare()
    assert wait_until(server.spare_ready)
    starter = textwrap.dedent(f"""
        import os, sys
        from nbd import server
        server.RUN_DIR = {run_dir!r}
        fd = os.open(sys.argv[1], os.O_RDWR)
        print(server.start(fd).pid, flush=True)
    """)
    starters = [subprocess.Popen([sys.executable, "-c", starter, path], stdout=subprocess.PIPE)
                for path in paths]
    pids = [int(p.communicate(timeout=60)[0]) for p in starters]
    assert len(set(pids)) == 2
    for path, size in zip(paths, (16, 32)):
        fd = os.open(path, os.O_RDONLY)
        try:
            found = server.find(fd)
            with server.open_socket(found) as sock:
                assert handshake(sock).size == size * MiB
            server.stop(found)
        finally:
            os.close(fd)
    assert _serving(run_dir) == []


@pytest.mark.parametrize("cache", ["none", "writethrough", "directsync", "unsafe"])
def test_cache_modes(run_dir, tmp_path, cache, program):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        started = server.start(fd, cache=cache)
        _assert_runs(started, program)
        with server.open_socket(started) as sock:
            assert handshake(sock).size == 64 * MiB
        server.stop(started)
    finally:
        os.close(fd)


def test_a_lock_on_the_servers_open_image_lasts_as_long_as_the_server(run_dir, tmp_path,
                                                                      program):
    import loopctl

    path = _image(tmp_path, "raw")
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)
    try:
        started = server.start(fd)
        assert server.find(fd) == started and _serving(run_dir) == [started.pid]
        _assert_runs(started, program)
        held = server.open_image(started)
        try:
            assert os.fstat(held).st_ino == os.fstat(fd).st_ino
            loopctl.lock_image(held, offset=1 << 62, length=1)
        finally:
            os.close(held)
        # Our copy is closed: the server's open file still holds the lock.
        with pytest.raises(loopctl.ImageBusy):
            loopctl.lock_image(other, offset=1 << 62, length=1)
        server.stop(started)
        loopctl.lock_image(other, offset=1 << 62, length=1)
        with pytest.raises(NbdError) as raised:
            server.open_image(started)
        assert raised.value.errno in (errno.ESRCH, errno.ENOENT)
        assert _serving(run_dir) == [] and _files(run_dir) == []
    finally:
        os.close(fd)
        os.close(other)


def test_no_spare_without_qemu_storage_daemon(run_dir, tmp_path, monkeypatch):
    """A node with qemu-utils only (all the seed driver needed): nothing to keep ready, and
    every start() runs a qemu-nbd."""
    import shutil

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("qemu-nbd", "qemu-img"):
        (bindir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bindir))
    server.keep_spare()
    assert not os.path.exists(run_dir) and _serving(run_dir) == []


def test_a_spare_taken_but_not_configured_is_found_and_stopped(run_dir, tmp_path):
    """A start() killed after it took the spare, before the daemon was configured, leaves the
    daemon under the image's name without a record: find() reports it with format None (so
    that a caller replaces it rather than connecting to it), stop() ends it."""
    server.keep_spare()
    assert wait_until(server.spare_ready)
    spare_pid = _serving(run_dir)[0]
    path = _image(tmp_path, "raw")
    # The starter stops in the configuration, where a kill is to land (a test seam).
    starter = textwrap.dedent(f"""
        import os, time
        from nbd import server
        server.RUN_DIR = {run_dir!r}
        server._export = lambda *args: (print("configuring", flush=True), time.sleep(60))
        server.start(os.open({path!r}, os.O_RDWR))
    """)
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"configuring\n"
    finally:
        proc.kill()
        proc.communicate()
    fd = os.open(path, os.O_RDWR)
    try:
        found = server.find(fd)
        assert found is not None and found.pid == spare_pid and found.format is None
        with pytest.raises(NbdError, match="already served"):
            server.start(fd)
        server.stop(found)
        assert _serving(run_dir) == [] and _files(run_dir) == []
        started = server.start(fd)
        assert started.format == "raw" and server.find(fd) == started
        server.stop(started)
    finally:
        os.close(fd)
