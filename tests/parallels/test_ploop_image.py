"""The ploop image format against qemu's own implementation (qemu-img, qemu-io, qemu-nbd).

Byte compatibility is the bar: our new images have qemu-img's header (flags aside), qemu-img
check finds them clean, qemu-made and qemu-written images read back through our BAT walk, and
what we write qemu reads back.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import time

import pytest

from ploop import image, qemu
from ploop.errors import CorruptImage, ImageBusy, InvalidArgument, UnsupportedImage

from helpers import qemu_io_reads, run

MiB = 1 << 20
KiB = 1 << 10


def qemu_create(path, size, cluster=MiB):
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}", path,
        str(size))


def qemu_check(path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", "-f", "parallels", "--output=json", path, check=False)


def qemu_map(path) -> list[tuple]:
    out = run("qemu-img", "map", "-f", "parallels", "--output=json", path).stdout
    return [(e["start"], e["length"], e["data"], e.get("offset")) for e in json.loads(out)]


def qemu_io(path, *commands, fmt="parallels"):
    args = []
    for c in commands:
        args += ["-c", c]
    run("qemu-io", "-f", fmt, *args, path)


def ours_map(path) -> list[tuple]:
    with image.Image(path) as img:
        return [(e.start, e.length, e.allocated, e.file_offset) for e in img.map()]


def header_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def without_flags(header: bytes) -> bytes:
    return header[:52] + header[56:]


@pytest.mark.parametrize("size,cluster", [
    (10 << 30, MiB),            # the format notes' example: 16 heads, 40960 cylinders
    (700 * MiB, MiB),           # where ploop's own CHS would pick 63 sectors; qemu's wins
    (3 << 30, 64 * KiB),        # a BAT of four clusters
    (64 * MiB, 32 * KiB),       # the smallest cluster
    (300 << 30, MiB),           # a BAT of two 1 MiB clusters
    (256 * MiB, 64 * MiB),      # the largest cluster
])
def test_new_header_and_bat_equal_qemu_img_create(tmp_path, size, cluster):
    ours, theirs = tmp_path / "ours.hds", tmp_path / "qemu.hds"
    header = image.create(ours, size, cluster=cluster)
    qemu_create(theirs, size, cluster)
    assert without_flags(header_bytes(ours)) == without_flags(header_bytes(theirs))
    assert header.flags == image.CIF_EMPTY and header_bytes(theirs)[52:56] == bytes(4)
    assert os.path.getsize(ours) == os.path.getsize(theirs) == header.data_off * 512
    assert ours.read_bytes()[64:] == theirs.read_bytes()[64:]  # the empty BAT and padding


def test_size_is_rounded_up_to_whole_clusters(tmp_path):
    ours, theirs = tmp_path / "ours.hds", tmp_path / "qemu.hds"
    header = image.create(ours, 5 * MiB + 7)
    qemu_create(theirs, 6 * MiB)
    assert header.nb_sectors == header.bat_entries * header.tracks == 6 * MiB // 512
    assert without_flags(header_bytes(ours)) == without_flags(header_bytes(theirs))


@pytest.mark.parametrize("mode", ["expanded", "preallocated"])
def test_qemu_img_finds_new_images_clean(tmp_path, mode):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB, mode=mode)
    result = qemu_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    info = json.loads(run("qemu-img", "info", "-f", "parallels", "--output=json", path).stdout)
    assert info["virtual-size"] == 64 * MiB
    assert image.check(path).clean


def test_preallocated_maps_every_cluster_in_order(tmp_path):
    path = tmp_path / "disk.hds"
    header = image.create(path, 64 * MiB, mode="preallocated")
    assert header.flags == 0  # not empty: every cluster is allocated
    assert os.path.getsize(path) == MiB + 64 * MiB
    assert qemu_map(path) == ours_map(path) == [(0, 64 * MiB, True, MiB)]
    assert qemu_io_reads(path, "parallels", 0, 0, 64 * MiB)


def test_raw_mode_is_a_plain_file(tmp_path):
    path = tmp_path / "disk.raw"
    assert image.create(path, 10 * MiB + 1, mode="raw") is None
    assert os.path.getsize(path) == 11 * MiB
    assert os.stat(path).st_blocks * 512 >= 11 * MiB  # allocated, not sparse
    sparse = tmp_path / "sparse.raw"
    image.create(sparse, 10 * MiB, mode="raw", sparse=True)
    assert os.stat(sparse).st_blocks == 0
    assert not image.is_ploop_image(path)


def test_qemu_written_image_reads_back_through_our_bat_walk(tmp_path):
    path = tmp_path / "disk.hds"
    qemu_create(path, 64 * MiB)
    qemu_io(path, "write -P 0xab 3M 1M", "write -P 0xcd 0 4k", "write -P 0x11 40M 12k")
    with image.Image(path) as img:
        assert img.read(3 * MiB, MiB) == b"\xab" * MiB
        assert img.read(0, 8 * KiB) == b"\xcd" * 4 * KiB + bytes(4 * KiB)
        assert img.read(40 * MiB - 512, 12 * KiB + 1024) == (
            bytes(512) + b"\x11" * 12 * KiB + bytes(512))
        assert img.read(10 * MiB, MiB) == bytes(MiB)
        assert img.allocated_clusters() == 3
    assert ours_map(path) == qemu_map(path)
    assert image.check(path).clean


def test_what_we_write_qemu_reads_back(tmp_path):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    with image.Image(path, writable=True) as img:
        assert img.header.in_use == image.IN_USE
        assert image.read_header(path).in_use == image.IN_USE  # on disk while open
        img.write(5 * MiB + 100, b"\x5a" * (2 * MiB))
        img.write(0, b"\x77" * 512)
    header = image.read_header(path)
    assert header.in_use == 0 and header.flags & image.CIF_EMPTY == 0
    assert qemu_io_reads(path, "parallels", 0x5A, 5 * MiB + 100, 2 * MiB)
    assert qemu_io_reads(path, "parallels", 0x77, 0, 512)
    assert qemu_io_reads(path, "parallels", 0, 512, 5 * MiB - 412)
    assert qemu_check(path).returncode == 0
    assert ours_map(path) == qemu_map(path)


def test_v1_images_bat_in_sectors_read_and_written_by_both(tmp_path):
    path = tmp_path / "v1.hds"
    header = image.create(path, 64 * MiB, version=1)
    assert header_bytes(path)[:16] == b"WithoutFreeSpace"
    qemu_io(path, "write -P 0x42 0 1M")
    with image.Image(path) as img:
        assert img.bat[0] == 2048  # the first data cluster, in sectors [format notes, tested]
        assert img.read(0, MiB) == b"\x42" * MiB
    with image.Image(path, writable=True) as img:
        img.write(7 * MiB, b"\x24" * 4096)
    assert qemu_io_reads(path, "parallels", 0x24, 7 * MiB, 4096)
    assert qemu_check(path).returncode == 0 and image.check(path).clean
    assert ours_map(path) == qemu_map(path)


def test_check_agrees_with_qemu_on_an_unclean_stop(tmp_path):
    """qemu-nbd killed while writing leaves the in-use flag set and its preallocation leaked
    (format notes §4, tested); qemu-img check -r all repairs both, data intact."""
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-f", "parallels", "-k", sock, "-t", path],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and server.poll() is None, "qemu-nbd did not start"
            time.sleep(0.05)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x66 2M 1M", f"nbd+unix:///?socket={sock}")
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    result = image.check(path)
    assert not result.clean and result.in_use
    assert any("in-use" in p for p in result.problems)
    assert result.leaked_clusters > 0
    assert qemu_check(path).returncode != 0
    report = qemu.repair(path)
    assert "repaired" in report
    after = image.check(path)
    assert after.clean, after
    assert qemu_io_reads(path, "parallels", 0x66, 2 * MiB, MiB)
    assert image.read_header(path).flags & image.CIF_EMPTY == 0


def _poke(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def test_check_finds_bad_bat_entries_and_a_stale_empty_flag(tmp_path):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    with image.Image(path, writable=True) as img:
        img.write(0, b"\x01" * MiB)
        img.write(MiB, b"\x02" * MiB)
    _poke(path, 64 + 4 * 2, "<I", 1)     # entry 2 duplicates entry 0's cluster
    _poke(path, 64 + 4 * 3, "<I", 500)   # entry 3 points past the end of the file
    _poke(path, 64 + 4 * 4, "<I", 0)     # (unchanged)
    _poke(path, 52, "<I", image.CIF_EMPTY)
    problems = " | ".join(image.check(path).problems)
    assert "share offset" in problems
    assert "past the end of the file" in problems
    assert "empty flag set while 4 clusters" in problems
    assert qemu_check(path).returncode == 2  # qemu counts corruptions too


def test_check_finds_header_and_leak_problems(tmp_path):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    with open(path, "r+b") as f:
        f.truncate(4 * MiB)  # three clusters nobody references
    result = image.check(path)
    assert result.problems == () and result.leaked_clusters == 3 and not result.clean
    _poke(path, 48, "<I", 0)  # data offset 0
    broken = image.check(path)
    assert not broken.clean and "data offset" in broken.problems[0]


@pytest.mark.parametrize("offset,fmt,value,error,text", [
    (0, "16s", b"NotAPloopImage!!", CorruptImage, "signature"),
    (16, "<I", 1, CorruptImage, "header version"),
    (28, "<I", 100, UnsupportedImage, "cluster size"),
    (48, "<I", 2047, CorruptImage, "data offset"),
    (36, "<Q", 1 << 40, CorruptImage, "disk size"),
])
def test_bad_headers_raise_typed_errors_naming_the_image(tmp_path, offset, fmt, value, error,
                                                         text):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    _poke(path, offset, fmt, value)
    with pytest.raises(error, match=text) as caught:
        image.info(path)
    assert caught.value.filename == str(path)
    assert caught.value.errno in (errno.EUCLEAN, errno.EOPNOTSUPP)


def test_layout_refuses_bad_parameters():
    with pytest.raises(InvalidArgument, match="cluster size"):
        image.layout(MiB, 48 * KiB)
    with pytest.raises(InvalidArgument, match="too large"):
        image.layout(4 << 40, version=1)  # v1 BAT entries are 32-bit sector offsets
    with pytest.raises(InvalidArgument):
        image.layout(0)
    assert image.layout(4 << 40).bat_entries == 4 << 20  # fine for v2


def test_create_never_replaces(tmp_path):
    path = tmp_path / "disk.hds"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        image.create(path, 64 * MiB)
    assert path.read_bytes() == b"precious"


def test_writable_open_is_exclusive_and_refuses_an_unclean_image(tmp_path):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    with image.Image(path, writable=True):
        with pytest.raises(ImageBusy):
            image.Image(path, writable=True)  # our lock
        denied = run("qemu-io", "-f", "parallels", "-c", "write 0 512", path, check=False)
        assert denied.returncode != 0 and "lock" in denied.stderr  # qemu sees it too
    _poke(path, 44, "<I", image.IN_USE)
    with pytest.raises(ImageBusy, match="in-use"):
        image.Image(path, writable=True)
    with image.Image(path) as img:  # reading is fine
        assert img.info().in_use


def test_grow_moves_clusters_out_of_the_larger_bat(tmp_path):
    path = tmp_path / "disk.hds"
    qemu_create(path, 64 * MiB, 32 * KiB)  # 2048 entries: the BAT takes one cluster
    qemu_io(path, "write -P 0x31 0 32k", "write -P 0x32 1M 64k", "write -P 0x33 63M 32k")
    before = image.read_header(path)
    header = image.grow(path, 1 << 30)  # 32768 entries: the BAT takes five clusters now
    assert header.data_off == 5 * 64 and before.data_off == 64
    assert header.nb_sectors == (1 << 30) // 512 and header.in_use == 0
    assert qemu_check(path).returncode == 0, qemu_check(path).stdout
    for pattern, offset, length in ((0x31, 0, 32 * KiB), (0x32, MiB, 64 * KiB),
                                    (0x33, 63 * MiB, 32 * KiB), (0, 64 * MiB, MiB)):
        assert qemu_io_reads(path, "parallels", pattern, offset, length)
    with image.Image(path) as img:
        assert all(e == 0 or e >= 5 for e in img.bat)  # no data left inside the BAT's clusters
        assert img.read(63 * MiB, 32 * KiB) == b"\x33" * 32 * KiB
    assert ours_map(path) == qemu_map(path)
    qemu_create(tmp_path / "fresh.hds", 1 << 30, 32 * KiB)
    assert without_flags(header_bytes(path)) == without_flags(header_bytes(tmp_path / "fresh.hds"))


@pytest.mark.parametrize("version", [1, 2])
def test_grow_preallocated_and_refusals(tmp_path, version):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB, mode="preallocated", version=version)
    image.grow(path, 96 * MiB, preallocate=True)
    assert ours_map(path) == qemu_map(path) == [(0, 96 * MiB, True, MiB)]
    assert qemu_check(path).returncode == 0
    with pytest.raises(InvalidArgument, match="shrink"):
        image.grow(path, 32 * MiB)
