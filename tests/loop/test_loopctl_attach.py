"""loopctl.attach() and the LoopDevice handle against real loop devices.

Each option is checked on the handle, in info(), in what `losetup -J -l` reports and, for what
losetup has no column for (the ref), in LOOP_GET_STATUS64 issued without loopctl.
"""

import errno
import os

import pytest

import loopctl
from loopctl import LoopFlags

from helpers import (MiB, blockdev_size, bound_to, expected_losetup_row, kernel_status,
                     losetup_associated, losetup_row, needs_dos_partitions, sysfs_attr, wait_until,
                     write_mbr)


def checked_info(dev: loopctl.LoopDevice) -> loopctl.LoopInfo:
    """dev.info(), after checking it agrees with the handle, losetup and the raw ioctl."""
    info = dev.info()
    assert (info.path, info.number, info.offset, info.sizelimit, info.read_only,
            info.autoclear, info.partscan, info.direct_io, info.block_size, info.size,
            info.ref) == (dev.path, dev.number, dev.offset, dev.sizelimit, dev.read_only,
                          dev.autoclear, dev.partscan, dev.direct_io, dev.block_size, dev.size,
                          dev.ref)
    assert losetup_row(dev.path) == expected_losetup_row(info)
    raw = kernel_status(dev.path)
    assert (raw["offset"], raw["sizelimit"], raw["file_name"], raw["backing_devno"],
            raw["backing_inode"]) == (info.offset, info.sizelimit, info.ref,
                                      info.backing_devno, info.backing_inode)
    assert bool(raw["flags"] & LoopFlags.READ_ONLY) == info.read_only
    assert bool(raw["flags"] & LoopFlags.AUTOCLEAR) == info.autoclear
    assert bool(raw["flags"] & LoopFlags.PARTSCAN) == info.partscan
    assert bool(raw["flags"] & LoopFlags.DIRECT_IO) == info.direct_io
    assert blockdev_size(dev.path) == info.size
    return info


def test_attach_defaults_bind_the_whole_file_read_write(image):
    img = image(16 * MiB)
    with loopctl.attach(img) as dev:
        info = checked_info(dev)
        st = os.stat(img)
        assert info.path == f"/dev/loop{info.number}" and info.name == f"loop{info.number}"
        assert info.devno == os.stat(info.path).st_rdev
        assert info.backing_file == str(img)
        assert (info.backing_devno, info.backing_inode) == (st.st_dev, st.st_ino)
        assert (info.offset, info.sizelimit, info.size, info.block_size) == (0, 0, 16 * MiB, 512)
        assert not (info.read_only or info.autoclear or info.partscan or info.direct_io)


def test_default_ref_is_the_backing_path_cut_to_63_bytes(image):
    img = image(4 * MiB)
    with loopctl.attach(img) as dev:
        assert checked_info(dev).ref == os.fsencode(img)[:63].decode()


def test_offset_shifts_the_device_into_the_file(image):
    img = image(16 * MiB)
    with loopctl.attach(img, offset=1 * MiB) as dev:
        info = checked_info(dev)
        assert (info.offset, info.size) == (1 * MiB, 15 * MiB)
        fd = os.open(dev.path, os.O_RDWR)
        try:
            os.pwrite(fd, b"offset-marker", 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(img, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(13) == b"offset-marker"


@pytest.mark.parametrize("sizelimit, size", [(4 * MiB, 4 * MiB), (4 * MiB + 100, 4 * MiB),
                                             (64 * MiB, 16 * MiB)],
                         ids=["exact", "rounded-down-to-sectors", "beyond-the-file"])
def test_sizelimit_caps_the_device_size(image, sizelimit, size):
    with loopctl.attach(image(16 * MiB), sizelimit=sizelimit) as dev:
        info = checked_info(dev)
        assert (info.sizelimit, info.size) == (sizelimit, size)


def test_offset_and_sizelimit_together(image):
    with loopctl.attach(image(16 * MiB), offset=2 * MiB, sizelimit=8 * MiB) as dev:
        info = checked_info(dev)
        assert (info.offset, info.sizelimit, info.size) == (2 * MiB, 8 * MiB, 8 * MiB)


@pytest.mark.parametrize("block_size", [512, 4096])
def test_block_size_sets_the_logical_sector_size(image, block_size):
    with loopctl.attach(image(16 * MiB), block_size=block_size) as dev:
        info = checked_info(dev)
        assert info.block_size == block_size
        assert sysfs_attr(dev.number, "queue/logical_block_size") == str(block_size)


def test_read_only_device_refuses_writes(image):
    img = image(4 * MiB)
    with loopctl.attach(img, read_only=True) as dev:
        assert checked_info(dev).read_only
        assert sysfs_attr(dev.number, "ro") == "1"
        fd = os.open(dev.path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as excinfo:
                os.pwrite(fd, b"x" * 512, 0)
            assert excinfo.value.errno == errno.EPERM
        finally:
            os.close(fd)


def test_autoclear_is_set_and_the_device_stays_while_the_handle_is_open(image):
    img = image(4 * MiB)
    with loopctl.attach(img, autoclear=True) as dev:
        assert checked_info(dev).autoclear
        assert bound_to(img) == {dev.number}


def test_partscan_sets_the_flag(image):
    with loopctl.attach(image(4 * MiB), partscan=True) as dev:
        assert checked_info(dev).partscan
        assert sysfs_attr(dev.number, "loop/partscan") == "1"


@needs_dos_partitions
def test_partscan_makes_the_partitions_appear(image):
    img = image(4 * MiB)
    write_mbr(img, start_sector=2048, sectors=2048)
    with loopctl.attach(img, partscan=True) as dev:
        assert sysfs_attr(dev.number, f"{dev.name}p1/size") == "2048"
        assert sysfs_attr(dev.number, f"{dev.name}p1/start") == "2048"


@needs_dos_partitions
def test_without_partscan_no_partitions_appear(image):
    img = image(4 * MiB)
    write_mbr(img, start_sector=2048, sectors=2048)
    with loopctl.attach(img) as dev:
        assert not checked_info(dev).partscan
        assert sysfs_attr(dev.number, "loop/partscan") == "0"
        assert not os.path.exists(f"/sys/block/{dev.name}/{dev.name}p1")


def test_direct_io_on_an_aligned_file_is_in_effect(image):
    with loopctl.attach(image(16 * MiB), direct_io=True) as dev:
        assert checked_info(dev).direct_io
        assert sysfs_attr(dev.number, "loop/dio") == "1"


@pytest.mark.parametrize("ref", ["flexblock:test-ref", "r" * 63, "é" * 31],
                         ids=["short", "63-bytes", "utf-8"])
def test_ref_is_stored_as_the_file_name(image, ref):
    img = image(4 * MiB)
    with loopctl.attach(img, ref=ref) as dev:
        info = checked_info(dev)
        assert info.ref == ref == kernel_status(dev.path)["file_name"]
        assert info.backing_file == str(img)  # sysfs still names the real file


def test_lock_takes_an_ofd_lock_on_the_backing_file(image):
    img = image(4 * MiB)
    ino = os.stat(img).st_ino
    with loopctl.attach(img, lock=True) as dev:
        checked_info(dev)
        with open("/proc/locks", encoding="utf-8") as f:
            locks = [line.split() for line in f]
        assert any(fields[1:4] == ["OFDLCK", "ADVISORY", "WRITE"]
                   and fields[5].rsplit(":", 1)[1] == str(ino) for fields in locks)


def test_all_options_at_once(image):
    img = image(16 * MiB)
    write_mbr(img, start_sector=2048, sectors=2048)
    with loopctl.attach(img, offset=0, sizelimit=8 * MiB, block_size=4096, read_only=True,
                        autoclear=True, partscan=True, direct_io=True, ref="all-options",
                        lock=True) as dev:
        info = checked_info(dev)
        assert (info.sizelimit, info.size, info.block_size, info.ref) == (
            8 * MiB, 8 * MiB, 4096, "all-options")
        assert info.read_only and info.autoclear and info.partscan and info.direct_io


def test_attach_by_read_write_fd(image):
    img = image(4 * MiB)
    fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
    try:
        with loopctl.attach(fd) as dev:
            info = checked_info(dev)
            assert info.backing_file == str(img)
            assert not info.read_only
        os.fstat(fd)  # the caller's fd stays the caller's
    finally:
        os.close(fd)


def test_attach_by_read_only_fd_is_read_only(image):
    img = image(4 * MiB)
    fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with loopctl.attach(fd) as dev:
            assert checked_info(dev).read_only
    finally:
        os.close(fd)


def test_context_manager_exit_detaches(image):
    img = image(4 * MiB)
    with loopctl.attach(img) as dev:
        assert bound_to(img) == {dev.number}
    assert wait_until(lambda: not bound_to(img))
    assert loopctl.find(img) == []


def test_context_manager_exit_after_relinquish_keeps_the_binding(image):
    img = image(4 * MiB)
    with loopctl.attach(img) as dev:
        dev.relinquish()
    assert bound_to(img) == {dev.number}
    loopctl.detach(dev.number, wait=True)
    assert not bound_to(img)


def test_relinquish_keeps_the_binding_until_module_detach(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img)
    dev.relinquish()
    with pytest.raises(ValueError):
        dev.fileno()
    found = loopctl.get(dev.path)
    assert (found.number, found.diskseq, found.backing_file) == (dev.number, dev.diskseq, str(img))
    loopctl.detach(dev.path, wait=True)
    assert not bound_to(img)
    assert not losetup_associated(img)


def test_close_is_idempotent_and_keeps_the_binding(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img)
    dev.close()
    dev.close()
    with pytest.raises(ValueError):
        dev.fileno()
    assert bound_to(img) == {dev.number}
    dev.detach(wait=True)
    assert not bound_to(img)


def test_resize_after_growing_the_file(image):
    img = image(8 * MiB)
    with loopctl.attach(img) as dev:
        os.truncate(img, 24 * MiB)
        assert dev.size == 8 * MiB  # the kernel only sees the new size when told
        assert dev.resize() == 24 * MiB
        assert checked_info(dev).size == 24 * MiB


def test_resize_stays_within_the_sizelimit(image):
    img = image(8 * MiB)
    with loopctl.attach(img, sizelimit=12 * MiB) as dev:
        os.truncate(img, 24 * MiB)
        assert dev.resize() == 12 * MiB
        assert checked_info(dev).size == 12 * MiB


def test_resize_through_a_handle_from_get(image):
    img = image(8 * MiB)
    with loopctl.attach(img) as dev:
        os.truncate(img, 16 * MiB)
        assert loopctl.get(dev.number).resize() == 16 * MiB
        assert checked_info(dev).size == 16 * MiB


def test_detach_wait_returns_only_once_unbound(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img)
    dev.detach(wait=True)
    assert not bound_to(img)
    with pytest.raises(ValueError):
        dev.fileno()


@pytest.mark.parametrize("sync", [False, True], ids=["default", "sync"])
def test_detach_keeps_data_written_through_the_handle(image, sync):
    # detach()'s docstring: the kernel writes what is cached for the device into the backing
    # file at the last close; sync only adds durability.
    img = image(4 * MiB)
    data = os.urandom(64 * 1024)
    dev = loopctl.attach(img)
    os.pwrite(dev.fileno(), data, 4096)  # in the device's page cache, not synced
    dev.detach(wait=True, sync=sync)
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data


def test_context_manager_exit_keeps_data_written_through_the_handle(image):
    img = image(4 * MiB)
    data = os.urandom(64 * 1024)
    with loopctl.attach(img) as dev:
        os.pwrite(dev.fileno(), data, 0)
    assert wait_until(lambda: not bound_to(img))
    with open(img, "rb") as f:
        assert f.read(len(data)) == data


def test_detach_wait_raises_device_busy_while_held_open_then_clears_at_last_close(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img)
    holder = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(loopctl.DeviceBusy) as excinfo:
            dev.detach(wait=True, timeout=0.2)
        assert (excinfo.value.errno, excinfo.value.filename) == (errno.EBUSY, dev.path)
        assert losetup_row(dev.path)["autoclear"] is True  # LOOP_CLR_FD is lazy
        assert bound_to(img) == {dev.number}
    finally:
        os.close(holder)
    assert wait_until(lambda: not bound_to(img))


def test_autoclear_device_goes_away_at_last_close_after_relinquish(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img, autoclear=True)
    holder = os.open(dev.path, os.O_RDONLY)
    try:
        dev.relinquish()
        assert bound_to(img) == {dev.number}  # our holder is still an opener
    finally:
        os.close(holder)
    assert wait_until(lambda: not bound_to(img))


def test_autoclear_device_goes_away_when_relinquished(image):
    img = image(4 * MiB)
    dev = loopctl.attach(img, autoclear=True)
    assert bound_to(img) == {dev.number}
    dev.relinquish()  # our fd was the last opener (or udevd's probe is)
    assert wait_until(lambda: not bound_to(img))


def test_stacking_on_our_own_bound_device(image):
    img = image(8 * MiB)
    with loopctl.attach(img) as lower:
        with loopctl.attach(lower.path, read_only=True) as upper:
            info = checked_info(upper)
            assert info.backing_file == lower.path
            assert info.size == 8 * MiB
            assert [d.number for d in loopctl.find(lower.path)] == [upper.number]
