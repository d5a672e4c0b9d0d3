"""ploop volumes on the host: creating (also concurrently, also after a creator died), opening,
growing; attaching needs NBD or a ploop kernel, which the host has neither of (see
test_vm_ploop.py), except for what can be checked here: the undo of a failed attach, and the
native path's command lines against a stand-in `ploop` tool."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import nbd
import ploop
from nbd import server
from ploop import descriptor, image, native, volume
from ploop.errors import (ImageBusy, InvalidArgument, PloopError, SizeMismatch,
                          UnsupportedImage)

from helpers import qemu_io_reads, run

MiB = 1 << 20


def test_create_makes_the_directory_image_and_descriptor(tmp_path):
    vol = ploop.create_or_open(tmp_path / "v1", 64 * MiB)
    assert sorted(os.listdir(tmp_path / "v1")) == ["DiskDescriptor.xml", "root.hds"]
    assert (vol.format, vol.size, vol.image_path) == (
        "parallels", 64 * MiB, str(tmp_path / "v1" / "root.hds"))
    d = descriptor.read(tmp_path / "v1")
    assert (d.disk_size, d.blocksize, d.top_guid) == (131072, 2048, descriptor.TOP_GUID)
    assert run("qemu-img", "check", "-f", "parallels", vol.image_path).returncode == 0
    assert ploop.create_or_open(tmp_path / "v1", 32 * MiB) == vol  # exists: opened
    assert ploop.create_or_open(tmp_path / "v1") == ploop.open_volume(tmp_path / "v1") == vol
    with pytest.raises(SizeMismatch) as caught:
        ploop.create_or_open(tmp_path / "v1", 65 * MiB)
    assert caught.value.filename == str(tmp_path / "v1")


def test_create_refusals(tmp_path):
    with pytest.raises(PloopError, match="no volume") as caught:
        ploop.create_or_open(tmp_path / "absent")
    assert caught.value.errno == 2
    for name in ("../x", "", "DiskDescriptor.xml"):
        with pytest.raises(InvalidArgument):
            ploop.create_or_open(tmp_path / "v", MiB, image_name=name)
    with pytest.raises(InvalidArgument, match="cluster"):
        ploop.create_or_open(tmp_path / "c", MiB, cluster=1000)
    assert os.listdir(tmp_path / "c") == []  # no temporary image left behind
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "root.hds").write_bytes(b"not ours")
    with pytest.raises(ImageBusy, match="in the way"):
        ploop.create_or_open(tmp_path / "w", MiB)
    assert (tmp_path / "w" / "root.hds").read_bytes() == b"not ours"


@pytest.mark.parametrize("mode,fmt,kind", [("preallocated", "parallels", "Compressed"),
                                           ("raw", "raw", "Plain")])
def test_preallocated_and_raw_volumes(tmp_path, mode, fmt, kind):
    vol = ploop.create_or_open(tmp_path / "v", 10 * MiB + 1, mode=mode, image_name="disk")
    assert (vol.format, vol.size) == (fmt, 11 * MiB)
    assert vol.descriptor.images[0].type == kind
    assert vol.descriptor.preallocated == (mode == "preallocated")
    assert os.stat(vol.image_path).st_blocks * 512 >= 11 * MiB


def test_concurrent_creators_make_one_volume(tmp_path):
    code = textwrap.dedent("""
        import os, sys, ploop
        vol = ploop.create_or_open(sys.argv[1], 256 << 20, mode="preallocated")
        print(os.stat(vol.image_path).st_ino)
    """)
    children = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "v")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(6)]
    results = [c.communicate(timeout=120) for c in children]
    assert [c.returncode for c in children] == [0] * 6, results
    assert len({out.strip() for out, _ in results}) == 1  # everyone has the same image
    assert sorted(os.listdir(tmp_path / "v")) == ["DiskDescriptor.xml", "root.hds"]


def test_an_image_left_without_descriptor_is_described(tmp_path, caplog):
    (tmp_path / "v").mkdir()
    image.create(tmp_path / "v" / "root.hds", 32 * MiB, cluster=64 << 10)
    with caplog.at_level(logging.WARNING, logger="ploop"):
        vol = ploop.create_or_open(tmp_path / "v", 16 * MiB)
    assert vol.size == 32 * MiB and vol.descriptor.blocksize == 128
    assert "descriptor restored" in caplog.text


def test_temporaries_of_dead_creators_are_removed_live_ones_kept(tmp_path, caplog):
    (tmp_path / "v").mkdir()
    dead = tmp_path / "v" / ".root.hds.dead.tmp"
    young = tmp_path / "v" / ".root.hds.young.tmp"
    held = tmp_path / "v" / ".root.hds.held.tmp"
    for path in (dead, young, held):
        path.write_bytes(b"x")
    old = time.time() - 2 * volume.CREATE_TIMEOUT
    os.utime(dead, (old, old))
    os.utime(held, (old, old))
    fd = os.open(held, os.O_RDWR)
    try:
        image.lock(fd, str(held))  # a creator still at work
        with caplog.at_level(logging.WARNING, logger="ploop"):
            ploop.create_or_open(tmp_path / "v", MiB)
    finally:
        os.close(fd)
    assert not dead.exists() and young.exists() and held.exists()
    assert str(dead) in caplog.text


def test_grow_offline_moves_data_and_rewrites_the_descriptor(tmp_path):
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB, cluster=32 << 10)
    with image.Image(vol.image_path, writable=True) as img:
        img.write(0, b"\x61" * (64 << 10))
    grown = ploop.grow(vol.directory, (1 << 30) - 5)
    assert grown.size == 1 << 30 and grown.descriptor.disk_size == (1 << 30) // 512
    assert grown.descriptor.cylinders == (1 << 30) // 512 // (16 * 32)
    assert qemu_io_reads(vol.image_path, "parallels", 0x61, 0, 64 << 10)
    assert run("qemu-img", "check", "-f", "parallels", vol.image_path).returncode == 0
    assert ploop.grow(vol.directory, 1 << 30) == grown  # already that large
    with pytest.raises(SizeMismatch, match="shrink"):
        ploop.grow(vol.directory, 64 * MiB)


def test_grow_completes_after_a_crash_between_image_and_descriptor(tmp_path):
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    image.grow(vol.image_path, 128 * MiB)  # the descriptor still says 64 MiB
    assert ploop.open_volume(vol.directory).descriptor.disk_size == 64 * MiB // 512
    assert ploop.grow(vol.directory, 128 * MiB).descriptor.disk_size == 128 * MiB // 512


def test_grow_raw_keeps_it_allocated(tmp_path):
    vol = ploop.create_or_open(tmp_path / "v", 4 * MiB, mode="raw")
    grown = ploop.grow(vol.directory, 8 * MiB)
    assert grown.size == 8 * MiB == os.path.getsize(vol.image_path)
    assert os.stat(vol.image_path).st_blocks * 512 >= 8 * MiB


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """qemu-nbd servers of this test live in a private RUN_DIR."""
    path = tmp_path / "run"
    monkeypatch.setattr(server, "RUN_DIR", str(path))
    return path


def test_attach_without_nbd_fails_typed_and_leaves_no_server(tmp_path, run_dir):
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has NBD: attaching is tested in test_vm_ploop.py")
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    with pytest.raises(nbd.NotSupported):
        ploop.attach(vol.directory, method="nbd")
    fd = os.open(vol.image_path, os.O_RDONLY)
    try:
        assert server.find(fd) is None
    finally:
        os.close(fd)
    assert not any(run_dir.iterdir())
    assert image.check(vol.image_path).clean  # closed again, in-use flag clear
    assert ploop.find_attached(vol.directory) is None
    assert ploop.detach(vol.directory) is False


def test_an_image_open_elsewhere_is_refused_before_its_in_use_flag_is_read(tmp_path, run_dir,
                                                                            caplog):
    """qemu-io holds the image read-write, as node A's qemu-nbd does over a shared filesystem
    (then this host finds no server of its own for it): the attach is refused at once by the
    lock, rather than taking the in-use flag qemu set for an unclean stop and repairing an
    image in use."""
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    holder = subprocess.Popen(["qemu-io", "-f", "parallels", vol.image_path],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while image.read_header(vol.image_path).in_use != image.IN_USE:
            assert time.monotonic() < deadline and holder.poll() is None, "qemu-io did not open it"
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="ploop"):
            with pytest.raises(ImageBusy, match="open elsewhere") as caught:
                ploop.attach(vol.directory, method="nbd")
        assert caught.value.filename == vol.image_path
        assert not any("repaired" in r.getMessage() for r in caplog.records)
        assert not run_dir.exists() or not any(run_dir.iterdir())  # no server started
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert image.check(vol.image_path).clean


def test_snapshot_chains_do_not_attach_through_nbd(tmp_path):
    directory = tmp_path / "v"
    directory.mkdir()
    base = "{3f1e2d4c-8a9b-4c7d-9e0f-112233445566}"
    image.create(directory / "root.hds", 64 * MiB)
    image.create(directory / f"root.hds.{base}", 64 * MiB)
    d = descriptor.for_image("root.hds", 131072, 2048)
    d = d._replace(
        images=(descriptor.ImageEntry(base, "Compressed", "root.hds"),
                descriptor.ImageEntry(descriptor.TOP_GUID, "Compressed", f"root.hds.{base}")),
        snapshots=(descriptor.Snapshot(base, descriptor.ZERO_GUID, None),
                   descriptor.Snapshot(descriptor.TOP_GUID, base, None)))
    descriptor.write(directory, d)
    assert ploop.open_volume(directory).image_path == str(directory / f"root.hds.{base}")
    with pytest.raises(UnsupportedImage, match="snapshot chain"):
        ploop.attach(directory, method="nbd")
    with pytest.raises(UnsupportedImage, match="snapshot chain"):
        ploop.grow(directory, 128 * MiB)


# The native path needs a ploop kernel, which no machine here has (neither the host nor the
# VM lane's Debian kernel): a stand-in `ploop` tool answers as the real one does (the output
# formats goploop-cli parses) and records its command lines, so what this checks is what we
# ask ploop to do and how we read its answers, not ploop itself.
FAKE_PLOOP = """#!/bin/sh
echo "$*" >> "$FAKE_PLOOP_LOG"
case "$1 $2" in
  "mount "*) echo "[ 0.001] Adding delta dev=/dev/ploop12345 img=x (rw)"
             touch "$FAKE_PLOOP_STATE" ;;
  "-v-1 info") [ -e "$FAKE_PLOOP_STATE" ] && printf 'device:\\t/dev/ploop12345\\n'; true ;;
  "umount "*) rm "$FAKE_PLOOP_STATE" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_native(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "ploop"
    tool.write_text(FAKE_PLOOP)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    marker = tmp_path / "ploop_minor"
    marker.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PLOOP_LOG", str(tmp_path / "ploop.log"))
    monkeypatch.setenv("FAKE_PLOOP_STATE", str(tmp_path / "ploop.mounted"))
    monkeypatch.setattr(native, "KERNEL_MARKERS", (str(marker),))
    return tmp_path / "ploop.log"


def test_native_mount_and_umount_command_lines(tmp_path, fake_native):
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    assert native.available()
    att = ploop.attach(vol.directory, read_only=True)
    assert (att.device, att.method, att.read_only) == ("/dev/ploop12345", "native", True)
    att.detach()
    att.detach()  # not mounted any more: nothing to do
    dd = vol.descriptor_path
    assert fake_native.read_text().splitlines() == [
        f"-v-1 info -d {dd}", f"mount -r {dd}", f"-v-1 info -d {dd}", f"umount {dd}",
        f"-v-1 info -d {dd}"]


@pytest.mark.parametrize("file", ["../outside.hds", "/etc/passwd", "sub/root.hds"])
def test_images_outside_the_volume_directory_are_refused(tmp_path, file):
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    d = vol.descriptor
    descriptor.write(vol.directory, d._replace(images=(d.images[0]._replace(file=file),)))
    with pytest.raises(ploop.DescriptorError, match="not a file in the volume") as caught:
        ploop.open_volume(vol.directory)
    assert caught.value.element == "StorageData/Storage/Image/File"


def test_an_absolute_path_into_the_directory_is_fine_a_symlink_is_not(tmp_path):
    vol = ploop.create_or_open(tmp_path / "v", 64 * MiB)
    d = vol.descriptor
    descriptor.write(vol.directory,
                     d._replace(images=(d.images[0]._replace(file=vol.image_path),)))
    assert ploop.open_volume(vol.directory).image_path == vol.image_path
    os.rename(vol.image_path, tmp_path / "elsewhere.hds")
    os.symlink(tmp_path / "elsewhere.hds", vol.image_path)
    with pytest.raises(PloopError, match="not a regular file") as caught:
        ploop.open_volume(vol.directory)
    assert caught.value.errno == 1 and caught.value.filename == vol.image_path
