"""The kernel's NBD driven by the nbd package, in the real-kernel lane (the host has no NBD).

Servers are real: qemu-nbd (through nbd.server) and nbdkit. Every device a test connects and
every server it starts is disconnected or killed at teardown.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest

import nbd
from nbd import client, control, server
from nbd.errors import NbdError, NetlinkError
from helpers import qemu_io_reads
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]

MiB = 1 << 20


@pytest.fixture
def devices():
    """Indexes a test connected; each is disconnected at teardown."""
    connected: list[int] = []
    yield connected
    for index in connected:
        try:
            control.disconnect(index)
            control.wait_disconnected(index)
        except NbdError:
            pass


@pytest.fixture
def qemu_nbd(tmp_path, monkeypatch):
    """start(path, fmt) -> Server, through nbd.server with a private run dir; all stopped."""
    monkeypatch.setattr(server, "RUN_DIR", str(tmp_path / "run"))
    fds: list[int] = []

    def start(path, fmt="raw"):
        fd = os.open(path, os.O_RDWR)
        fds.append(fd)
        return server.start(fd, fmt=fmt)

    yield start
    for fd in fds:
        found = server.find(fd)
        if found is not None:
            server.stop(found)
        os.close(fd)


def _image(tmp_path, fmt="raw", size="64M"):
    path = str(tmp_path / f"disk.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
    return path


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_write_through_the_device_read_back_after_disconnect(tmp_path, qemu_nbd, devices, fmt):
    path = _image(tmp_path, fmt)
    srv = qemu_nbd(path, fmt)
    info, export = client.attach(srv.socket_path, backend=f"test-{fmt}")
    devices.append(info.index)
    assert info.size == 64 * MiB and info.pid is not None
    assert info.backend == f"test-{fmt}"
    assert nbd.DeviceStatus(info.index, True) in control.status()
    fd = os.open(info.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xab" * MiB, 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    control.disconnect(info.index)
    control.wait_disconnected(info.index)
    assert control.info(info.index).pid is None
    server.stop(srv)
    assert qemu_io_reads(path, fmt, 0xAB, 4 * MiB, MiB)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", path], check=True)


def test_filesystem_on_nbdkit(tmp_path, devices):
    sock = str(tmp_path / "kit.sock")
    kit = subprocess.Popen(["nbdkit", "--foreground", f"--unix={sock}", "memory", "128M"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and kit.poll() is None, "nbdkit did not start"
            time.sleep(0.05)
        info, _ = client.attach(sock)
        devices.append(info.index)
        subprocess.run(["mkfs.ext4", "-q", info.path], check=True)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", info.path, str(mnt)], check=True)
        try:
            (mnt / "f").write_bytes(b"data" * 1000)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["mount", "-o", "ro", info.path, str(mnt)], check=True)
        try:
            assert (mnt / "f").read_bytes() == b"data" * 1000
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        for index in list(devices):
            control.disconnect(index)
            control.wait_disconnected(index)
            devices.remove(index)
        kit.kill()
        kit.wait()


def test_server_killed_link_dead_reconnect_io_continues(tmp_path, qemu_nbd, devices):
    path = _image(tmp_path)
    srv = qemu_nbd(path)
    with control.LinkDeadListener() as listener:
        info, export = client.attach(srv.socket_path, timeout=5, dead_conn_timeout=60)
        devices.append(info.index)
        os.kill(srv.pid, signal.SIGKILL)
        dead = listener.wait(timeout=60)
        assert dead == info.index
    fd = os.open(path, os.O_RDWR)
    try:
        restarted = server.start(fd)  # a new qemu-nbd on the same socket path
        assert client.reconnect(info.index, restarted.socket_path, "", export) == export
        dev = os.open(info.path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
            buf.write(b"\x5a" * 4096)
            os.pwritev(dev, [buf], 8 * MiB)
            os.fsync(dev)
        finally:
            os.close(dev)
        control.disconnect(info.index)
        control.wait_disconnected(info.index)
        server.stop(restarted)
    finally:
        os.close(fd)
    assert qemu_io_reads(path, "raw", 0x5A, 8 * MiB, 4096)


def test_reconnect_refuses_a_changed_export(tmp_path, qemu_nbd, devices):
    path = _image(tmp_path)
    srv = qemu_nbd(path)
    info, export = client.attach(srv.socket_path)
    devices.append(info.index)
    other = qemu_nbd(_other_image(tmp_path))
    with pytest.raises(NbdError, match="export changed"):
        client.reconnect(info.index, other.socket_path, "", export)


def _other_image(tmp_path):
    path = str(tmp_path / "other.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, "32M"], check=True)
    return path


def test_netlink_errors_are_typed():
    with pytest.raises(NetlinkError) as caught:
        control.disconnect(10_000)  # no such device: the kernel answers EINVAL
    assert caught.value.errno == 22
    with pytest.raises(NbdError):
        control.connect([0], 1000, block_size=512)  # not a multiple of the block size


def test_cli_connect_list_status_disconnect(tmp_path, qemu_nbd, devices):
    srv = qemu_nbd(_image(tmp_path))
    nbd_cli = [sys.executable, "-m", "nbd"]
    out = subprocess.run(nbd_cli + ["connect", srv.socket_path, "--json"], capture_output=True,
                         text=True, check=True)
    device = json.loads(out.stdout)["device"]
    devices.append(device["index"])
    assert device["size"] == 64 * MiB
    listed = json.loads(subprocess.run(nbd_cli + ["list", "--json"], capture_output=True,
                                       text=True, check=True).stdout)["devices"]
    assert device["index"] in [d["index"] for d in listed]
    status = subprocess.run(nbd_cli + ["status", device["path"]], capture_output=True,
                            text=True, check=True)
    assert status.stdout.strip() == device["path"]
    subprocess.run(nbd_cli + ["disconnect", "--wait", device["path"]], check=True)
    assert control.info(device["index"]).pid is None
    bad = subprocess.run(nbd_cli + ["connect", str(tmp_path / "absent.sock")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == "" and "absent.sock" in bad.stderr
