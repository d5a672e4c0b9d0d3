"""qemu-nbd servers started, found again and stopped by nbd.server, for real, on the host.

The servers run in a private RUN_DIR per test; every qemu-nbd a test started is killed at
teardown, found by the socket path only that test uses.
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


def _qemu_nbd_serving(run_dir: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(run_dir.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = str(tmp_path / "run")
    monkeypatch.setattr(server, "RUN_DIR", path)
    yield path
    for pid in _qemu_nbd_serving(path):
        os.kill(pid, signal.SIGKILL)


def _image(tmp_path, fmt: str, size: str = "64M") -> str:
    path = str(tmp_path / f"disk.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
    return path


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "parallels"])
def test_start_find_handshake_stop(run_dir, tmp_path, fmt):
    fd = os.open(_image(tmp_path, fmt), os.O_RDWR)
    try:
        started = server.start(fd, fmt=fmt)
        assert server.find(fd) == started
        assert started.format == fmt and not started.read_only
        with server.open_socket(started) as sock:
            assert handshake(sock).size == 64 * MiB
        server.stop(started)
        assert server.find(fd) is None
        assert _qemu_nbd_serving(run_dir) == []
        assert os.listdir(run_dir) == []
    finally:
        os.close(fd)


def test_files_of_a_dead_server_are_listed_and_removed(run_dir, tmp_path):
    """A server killed (or a stop() killed between the server's death and the removal of its
    files) leaves its socket, pid file and log: list_ids finds them, stop_by_id removes them."""
    fd = os.open(_image(tmp_path, "raw"), os.O_RDWR)
    try:
        started = server.start(fd)
        assert server.list_ids() == [started.image_id]
        os.kill(started.pid, signal.SIGKILL)
        assert wait_until(lambda: not _qemu_nbd_serving(run_dir))
        assert server.list_servers() == [] and server.list_ids() == [started.image_id]
        assert len(os.listdir(run_dir)) == 3
        server.stop_by_id(started.image_id)
        assert server.list_ids() == [] and os.listdir(run_dir) == []
        # ... and a running one is stopped first.
        started = server.start(fd)
        server.stop_by_id(started.image_id)
        assert _qemu_nbd_serving(run_dir) == [] and os.listdir(run_dir) == []
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


def test_read_only_export(run_dir, tmp_path):
    fd = os.open(_image(tmp_path, "raw"), os.O_RDONLY)
    try:
        started = server.start(fd, read_only=True)
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
        assert _qemu_nbd_serving(run_dir) == []
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
    assert _qemu_nbd_serving(run_dir) == []


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

