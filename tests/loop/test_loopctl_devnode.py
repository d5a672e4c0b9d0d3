"""_devnode.open_node: waiting for a /dev/loopN node that is not there yet.

The device is our own (LOOP_CTL_ADD at a number >= 100, see the spare_loop fixture); its node is
removed and re-created by the tests, as a static /dev filled in late by udev would behave.
"""

import errno
import os
import stat
import threading
import time

import pytest

import loopctl
from loopctl import _devnode

from helpers import run


def open_node_in_thread(number: int, timeout: float):
    result = {}

    def target():
        try:
            result["fd"] = _devnode.open_node(number, writable=False, timeout=timeout)
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def assert_is_node_of(fd: int, devno: int) -> None:
    try:
        st = os.fstat(fd)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == devno
    finally:
        os.close(fd)


def test_open_node_opens_a_present_node(spare_loop):
    assert_is_node_of(_devnode.open_node(spare_loop.number, writable=False), spare_loop.devno)


def test_open_node_waits_for_the_node_to_appear(spare_loop, udev_mode):
    os.unlink(spare_loop.path)
    thread, result = open_node_in_thread(spare_loop.number, timeout=3)
    time.sleep(0.2)  # let open_node find no node and start waiting
    assert thread.is_alive(), result
    os.mknod(spare_loop.path, 0o600 | stat.S_IFBLK, spare_loop.devno)
    if udev_mode == "udevd":
        run("udevadm", "trigger", "--action=change", f"/sys/block/loop{spare_loop.number}")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in result, result["error"]
    assert_is_node_of(result["fd"], spare_loop.devno)


def test_open_node_gives_up_with_enoent_after_the_timeout(spare_loop):
    os.unlink(spare_loop.path)
    with pytest.raises(loopctl.LoopError) as excinfo:
        _devnode.open_node(spare_loop.number, writable=False, timeout=0.5)
    assert (excinfo.value.errno, excinfo.value.filename) == (errno.ENOENT, spare_loop.path)


def test_open_node_without_timeout_fails_at_once(spare_loop):
    os.unlink(spare_loop.path)
    with pytest.raises(loopctl.LoopError) as excinfo:
        _devnode.open_node(spare_loop.number, writable=False, timeout=0)
    assert excinfo.value.errno == errno.ENOENT


def test_open_node_refuses_a_node_of_another_device(spare_loop):
    os.unlink(spare_loop.path)
    os.mknod(spare_loop.path, 0o600 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    with pytest.raises(loopctl.NotALoopDevice) as excinfo:
        _devnode.open_node(spare_loop.number, writable=False, timeout=0)
    assert (excinfo.value.errno, excinfo.value.filename) == (errno.ENODEV, spare_loop.path)


def test_udevd_running_matches_the_mode(udev_mode):
    assert _devnode.udevd_running() is (udev_mode == "udevd")
