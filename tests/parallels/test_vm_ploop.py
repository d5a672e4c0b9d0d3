"""ploop volumes attached through qemu-nbd and the kernel's NBD, in the real-kernel lane (the
host has no NBD; no machine here has a ploop kernel, so the native path is not run: see
test_ploop_volume.py for its command lines).

The servers use nbd.server's default run directory: the guest is private to this lane, and
processes started by the tests (the CLI, a second attaching process) must find them there.
Every volume a test makes is detached at teardown, its server stopped, pass or fail.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nbd
import ploop
from nbd import server
from ploop import image
from ploop.errors import ImageBusy
from vm.lane import vm_only

from helpers import blockdev_size, image_id, qemu_io_reads, run

pytestmark = [pytest.mark.vm, vm_only]

MiB = 1 << 20


@pytest.fixture
def volumes(tmp_path):
    """make(name, size) -> Volume under tmp_path; each is detached at teardown."""
    made: list[ploop.Volume] = []

    def make(name: str = "v", size: int = 64 * MiB, **kwargs) -> ploop.Volume:
        vol = ploop.create_or_open(tmp_path / name, size, **kwargs)
        made.append(vol)
        return vol

    yield make
    for vol in made:
        backend = ploop.volume.BACKEND_PREFIX + image_id(vol.image_path)
        for device in nbd.find_by_backend(backend):
            subprocess.run(["umount", device.path], capture_output=True)
            nbd.disconnect(device.index)
            nbd.wait_disconnected(device.index)
        fd = os.open(vol.image_path, os.O_RDONLY)
        try:
            running = server.find(fd)
        finally:
            os.close(fd)
        if running is not None:
            server.stop(running)


def _write_device(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_device(device: str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)  # around the page cache: what the server has
    try:
        import mmap

        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def _assert_closed_clean(path: str) -> None:
    header = image.read_header(path)
    assert header.in_use == 0
    assert not header.flags & image.CIF_EMPTY or not image.info(path).allocated_clusters
    assert image.check(path).clean, image.check(path)
    assert run("qemu-img", "check", "-f", "parallels", path, check=False).returncode == 0


def test_filesystem_on_an_attached_volume(volumes, mount):
    vol = volumes()
    att = ploop.attach(vol.directory)
    assert att.method == "nbd" and att.device.startswith("/dev/nbd")
    assert blockdev_size(att.device) == 64 * MiB
    assert image.read_header(vol.image_path).in_use == image.IN_USE  # qemu has it open
    run("mkfs.ext4", "-q", att.device)
    target = mount(att.device, name="mnt")
    (target / "file").write_bytes(b"ploop" * 1000)
    with pytest.raises(ImageBusy, match="mounted"):
        att.detach()
    run("umount", target)
    att.detach()
    att.detach()  # twice: nothing left to do
    assert ploop.find_attached(vol.directory) is None
    _assert_closed_clean(vol.image_path)
    assert image.read_header(vol.image_path).flags & image.CIF_EMPTY == 0

    ro = ploop.attach(vol.directory, read_only=True)
    try:
        assert ro.read_only and ploop.attach(vol.directory, read_only=True).device == ro.device
        with pytest.raises(ImageBusy, match="read-only"):
            ploop.attach(vol.directory)
        target = mount("-o", "ro", ro.device, name="ro")
        assert (target / "file").read_bytes() == b"ploop" * 1000
        run("umount", target)
    finally:
        ro.detach()
    _assert_closed_clean(vol.image_path)


def test_device_and_bat_walk_read_each_others_writes(volumes):
    vol = volumes()
    att = ploop.attach(vol.directory)
    _write_device(att.device, 3 * MiB + 512, b"\xc3" * (MiB + 4096))
    att.detach()
    with image.Image(vol.image_path) as img:
        assert img.read(3 * MiB, 2 * MiB) == (bytes(512) + b"\xc3" * (MiB + 4096)
                                               + bytes(MiB - 4608))
    with image.Image(vol.image_path, writable=True) as img:
        img.write(40 * MiB, b"\x3c" * 8192)
    att = ploop.attach(vol.directory)
    try:
        assert _read_device(att.device, 40 * MiB, 16384) == b"\x3c" * 8192 + bytes(8192)
        assert _read_device(att.device, 3 * MiB, 4096) == bytes(512) + b"\xc3" * 3584
    finally:
        att.detach()
    _assert_closed_clean(vol.image_path)


def test_found_and_detached_by_later_processes(volumes):
    vol = volumes()
    code = textwrap.dedent("""
        import sys, ploop
        print(ploop.attach(sys.argv[1]).device)
    """)
    device = subprocess.run([sys.executable, "-c", code, vol.directory], capture_output=True,
                            text=True, check=True).stdout.strip()
    found = ploop.find_attached(vol.directory)
    assert found is not None and (found.device, found.method) == (device, "nbd")
    assert ploop.attach(vol.directory).device == device  # attached already: the same device
    ploop_cli = Path(sys.executable).parent / "ploop"
    info = json.loads(run(ploop_cli, "info", "--json", vol.directory).stdout)
    assert info["volume"]["attachment"]["device"] == device
    run(ploop_cli, "umount", vol.directory)
    run(ploop_cli, "umount", vol.descriptor_path)  # twice, and by the descriptor's path
    assert ploop.find_attached(vol.directory) is None
    assert nbd.info(found.nbd_index).pid is None
    _assert_closed_clean(vol.image_path)
    mounted = run(ploop_cli, "mount", "--json", vol.directory)
    attachment = json.loads(mounted.stdout)["attachment"]
    assert attachment["method"] == "nbd" and not attachment["read_only"]
    run(ploop_cli, "umount", vol.directory)


def test_unclean_stop_is_repaired_before_use_and_logged(volumes, caplog):
    vol = volumes()
    att = ploop.attach(vol.directory)
    _write_device(att.device, 5 * MiB, b"\x99" * MiB)
    fd = os.open(vol.image_path, os.O_RDONLY)
    try:
        os.kill(server.find(fd).pid, signal.SIGKILL)
    finally:
        os.close(fd)
    result = image.check(vol.image_path)
    assert result.in_use and not result.clean
    with caplog.at_level(logging.WARNING, logger="ploop"):
        again = ploop.attach(vol.directory)  # the dead device goes, the image is repaired
    try:
        assert "repaired with qemu-img check -r all" in caplog.text
        assert _read_device(again.device, 5 * MiB, MiB) == b"\x99" * MiB
    finally:
        again.detach()
    _assert_closed_clean(vol.image_path)
    assert qemu_io_reads(vol.image_path, "parallels", 0x99, 5 * MiB, MiB)


def test_grow_is_refused_while_attached_and_works_detached(volumes):
    vol = volumes()
    att = ploop.attach(vol.directory)
    with pytest.raises(ImageBusy, match="detach"):
        ploop.grow(vol.directory, 128 * MiB)
    att.detach()
    assert ploop.grow(vol.directory, 128 * MiB).size == 128 * MiB
    att = ploop.attach(vol.directory)
    try:
        assert blockdev_size(att.device) == 128 * MiB
    finally:
        att.detach()


def test_raw_volume_attaches_as_raw(volumes):
    vol = volumes(mode="raw", size=8 * MiB)
    att = ploop.attach(vol.directory)
    try:
        _write_device(att.device, 0, b"\x42" * 4096)
    finally:
        att.detach()
    assert Path(vol.image_path).read_bytes()[:4096] == b"\x42" * 4096
