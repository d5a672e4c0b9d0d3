"""The compiled attach sequence (fb_attach in build.py) and the steps it hands back to Python.

attach() binds whichever device LOOP_CTL_GET_FREE answers, which on a machine shared with other
sessions no test can choose in advance. These tests therefore start the sequence at its open
step on a device of their own (spare_loop), whose node they remove or replace first, as a static
/dev filled in late by udev would have it.
"""

import errno
import os
import stat
import threading

import pytest

import loopctl
from loopctl import _devnode, _ioctl, _sysfs, device

from helpers import MiB, is_bound, kernel_status, run, sysfs_attr

REF = b"sequence-test"


def sequence_at_open(spare, backing_fd: int):
    """A sequence that binds *spare* read-write to *backing_fd*, starting at the open step."""
    seq, err = _ioctl.attach_sequence(device._NODE_PREFIX, _devnode.open_flags(True),
                                      _sysfs.part_shift(), backing_fd,
                                      os.fstat(backing_fd).st_size, 0, 0, 0, 0, REF,
                                      until=_ioctl.OPEN_CONTROL)
    assert (err, seq.control_fd, seq.dev_fd) == (0, -1, -1)  # nothing run yet
    seq.number, seq.step = spare.number, _ioctl.OPEN
    return seq


def unbind(seq) -> None:
    try:
        _ioctl.write_back_clear_and_close(seq.dev_fd, _devnode.node_path(seq.number),
                                          durable=False)
    except BaseException:
        os.close(seq.dev_fd)
        raise


def replace_node_with_dev_null(spare) -> None:
    os.unlink(spare.path)
    os.mknod(spare.path, 0o600 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)


def test_the_sequence_binds_and_reads_the_binding_back(spare_loop, image):
    img = image(16 * MiB)
    with open(img, "r+b") as backing:
        seq = sequence_at_open(spare_loop, backing.fileno())
        assert _ioctl.run_steps(seq) == 0
        try:
            assert seq.step == _ioctl.DONE
            raw = kernel_status(spare_loop.path)
            assert (seq.status.lo_device, seq.status.lo_inode, _ioctl.file_name(seq)) == (
                raw["backing_devno"], raw["backing_inode"], raw["file_name"])
            assert (seq.status.lo_inode, _ioctl.file_name(seq)) == (os.stat(img).st_ino,
                                                                    REF.decode())
            assert seq.size == 16 * MiB
            assert seq.diskseq == int(sysfs_attr(spare_loop.number, "diskseq"))
        finally:
            unbind(seq)


def test_the_sequence_stops_at_a_node_of_another_device(spare_loop, image):
    replace_node_with_dev_null(spare_loop)
    with open(image(), "r+b") as backing:
        seq = sequence_at_open(spare_loop, backing.fileno())
        assert _ioctl.run_steps(seq) == errno.ENODEV
    assert (seq.step, seq.dev_fd) == (_ioctl.OPEN, -1)
    assert not is_bound(spare_loop.number)


def test_a_node_of_another_device_is_refused_by_name(spare_loop, image):
    replace_node_with_dev_null(spare_loop)
    backing = device._open_backing(image(), False, False, False)
    try:
        seq = sequence_at_open(spare_loop, backing.fd)
        err = _ioctl.run_steps(seq)
        with pytest.raises(loopctl.NotALoopDevice) as excinfo:
            device._bind_free(seq, err, _ioctl.DONE, backing, 0, 0, 0, 0, REF)
    finally:
        os.close(backing.fd)
    assert (excinfo.value.errno, excinfo.value.filename) == (errno.ENODEV, spare_loop.path)
    assert not is_bound(spare_loop.number)


def test_a_late_node_is_waited_for_and_the_sequence_resumed(spare_loop, image, udev_mode):
    os.unlink(spare_loop.path)

    def node_appears():
        os.mknod(spare_loop.path, 0o600 | stat.S_IFBLK, spare_loop.devno)
        if udev_mode == "udevd":
            run("udevadm", "trigger", "--action=change", f"/sys/block/loop{spare_loop.number}")

    img = image(16 * MiB)
    backing = device._open_backing(img, False, False, False)
    late = threading.Timer(0.2, node_appears)
    late.start()
    try:
        seq = sequence_at_open(spare_loop, backing.fd)
        err = _ioctl.run_steps(seq)
        device._bind_free(seq, err, _ioctl.DONE, backing, 0, 0, 0, 0, REF)
        try:
            assert seq.step == _ioctl.DONE
            assert seq.status.lo_inode == os.stat(img).st_ino
            assert kernel_status(spare_loop.path)["file_name"] == REF.decode()
        finally:
            unbind(seq)
    finally:
        late.join()
        os.close(backing.fd)


def test_read_back_of_an_unbound_device_raises_not_bound(spare_loop):
    fd = os.open(spare_loop.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(loopctl.NotBound) as excinfo:
            _ioctl.read_back(fd, spare_loop.path)
    finally:
        os.close(fd)
    assert excinfo.value.errno == errno.ENXIO
    assert "LOOP_GET_STATUS64" in excinfo.value.strerror
