"""Backing files that limit what attach can promise: direct I/O that does not take, and files
that cannot be opened read-write.

attach() reports what is in effect, not what was asked for; these tests check the report against
sysfs and losetup and check that the device still moves data to the right place.
"""

import errno
import os

import pytest

import loopctl

from helpers import MiB, bound_under, losetup_row, make_image, sysfs_attr


def roundtrip(dev: loopctl.LoopDevice, backing, offset: int) -> None:
    """Write a sector through *dev*, find it in *backing* at *offset*, read it back."""
    data = os.urandom(512)
    fd = os.open(dev.path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        assert os.pread(fd, 512, 0) == data
    finally:
        os.close(fd)
    with open(backing, "rb") as f:
        f.seek(offset)
        assert f.read(512) == data


def assert_direct_io_reported(dev: loopctl.LoopDevice, in_effect: bool) -> None:
    assert dev.direct_io is in_effect
    assert dev.info().direct_io is in_effect
    assert sysfs_attr(dev.number, "loop/dio") == str(int(in_effect))
    assert losetup_row(dev.path)["dio"] is in_effect


def test_direct_io_on_a_filesystem_without_o_direct_is_reported_off(mount, tmp_path):
    # ramfs has no O_DIRECT at all (tmpfs has had it since 6.6, so it would not show this).
    ramfs = mount("-t", "ramfs", "ramfs", name="ramfs")
    img = make_image(ramfs / "disk.img", 4 * MiB)
    with loopctl.attach(img, direct_io=True) as dev:
        assert_direct_io_reported(dev, False)
        roundtrip(dev, img, 0)


def test_direct_io_with_a_misaligned_offset_is_reported_off(image):
    img = image(8 * MiB)
    with loopctl.attach(img, direct_io=True, offset=100) as dev:
        assert dev.offset == 100
        assert_direct_io_reported(dev, False)
        roundtrip(dev, img, 100)


def test_direct_io_on_tmpfs_is_reported_as_the_kernel_decided(mount):
    tmpfs = mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", name="tmpfs")
    img = make_image(tmpfs / "disk.img", 4 * MiB)
    with loopctl.attach(img, direct_io=True) as dev:
        assert_direct_io_reported(dev, sysfs_attr(dev.number, "loop/dio") == "1")
        roundtrip(dev, img, 0)


def test_read_only_file_without_fallback_raises_erofs(read_only_dir, tmp_path):
    img = read_only_dir / "disk.img"
    with pytest.raises(loopctl.LoopError) as excinfo:
        loopctl.attach(img)
    assert (excinfo.value.errno, excinfo.value.filename) == (errno.EROFS, str(img))
    assert not bound_under(tmp_path)


def test_read_only_file_with_fallback_attaches_read_only(read_only_dir):
    img = read_only_dir / "disk.img"
    with loopctl.attach(img, read_only_fallback=True) as dev:
        assert dev.read_only and dev.info().read_only
        assert losetup_row(dev.path)["ro"] is True
        assert dev.info().backing_file == str(img)


def test_read_only_file_attached_read_only_needs_no_fallback(read_only_dir):
    with loopctl.attach(read_only_dir / "disk.img", read_only=True) as dev:
        assert dev.read_only


def test_fallback_is_not_used_when_read_write_works(image):
    with loopctl.attach(image(4 * MiB), read_only_fallback=True) as dev:
        assert not dev.read_only
