"""attach(lock=True): an OFD lock on the image that lives exactly as long as the binding."""

import errno
import fcntl
import json
import os
import subprocess

import pytest

import loopctl

from helpers import MiB, bound_to, python_child

ATTACH_AND_RELINQUISH = """
import json, sys
import loopctl
dev = loopctl.attach(sys.argv[1], lock=True)
dev.relinquish()
print(json.dumps({"number": dev.number}))
"""


def assert_image_busy(img, holder_device: str | None = None) -> loopctl.ImageBusy:
    with pytest.raises(loopctl.ImageBusy) as excinfo:
        loopctl.attach(img, lock=True)
    err = excinfo.value
    assert isinstance(err, loopctl.LoopError)
    assert (err.errno, err.filename) == (errno.EBUSY, str(img))
    if holder_device is not None:
        assert holder_device in err.holder
    return err


def test_second_locked_attach_is_refused_while_the_first_is_bound(image):
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True) as dev:
        err = assert_image_busy(img, holder_device=dev.path)
        assert err.holder == f"attached as {dev.path}"
        assert bound_to(img) == {dev.number}


def test_lock_outlives_the_process_that_attached(image):
    img = image(4 * MiB)
    child = python_child(ATTACH_AND_RELINQUISH, str(img), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    number = json.loads(out)["number"]
    assert bound_to(img) == {number}
    assert_image_busy(img, holder_device=f"/dev/loop{number}")
    loopctl.detach(number, wait=True)
    with loopctl.attach(img, lock=True) as dev:
        assert bound_to(img) == {dev.number}


def test_locked_attach_is_allowed_again_after_detach(image):
    img = image(4 * MiB)
    first = loopctl.attach(img, lock=True)
    first.detach(wait=True)
    with loopctl.attach(img, lock=True) as second:
        assert bound_to(img) == {second.number}


def test_two_read_only_locked_attaches_share_the_image(image):
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True, read_only=True) as a, \
            loopctl.attach(img, lock=True, read_only=True) as b:
        assert a.read_only and b.read_only
        assert bound_to(img) == {a.number, b.number}


def test_read_write_locked_attach_is_refused_while_a_read_only_one_exists(image):
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True, read_only=True) as dev:
        assert_image_busy(img, holder_device=dev.path)
        assert bound_to(img) == {dev.number}


def test_read_only_locked_attach_is_refused_while_a_read_write_one_exists(image):
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True) as dev:
        with pytest.raises(loopctl.ImageBusy):
            loopctl.attach(img, lock=True, read_only=True)
        assert bound_to(img) == {dev.number}


def test_attach_without_lock_is_not_blocked_by_a_lock(image):
    # The lock is advisory: only attaches that ask for it take part (attach's docstring).
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True) as locked:
        with loopctl.attach(img) as unlocked:
            assert bound_to(img) == {locked.number, unlocked.number}
        assert_image_busy(img, holder_device=locked.path)


def test_locked_attach_next_to_a_lock_less_one_is_allowed(image):
    img = image(4 * MiB)
    with loopctl.attach(img) as unlocked:
        with loopctl.attach(img, lock=True) as locked:
            assert bound_to(img) == {unlocked.number, locked.number}


def test_holder_names_a_process_holding_a_posix_lock(image):
    img = image(4 * MiB)
    with open(img, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        err = assert_image_busy(img)
        assert err.holder == f"locked by process {os.getpid()}"
    assert not bound_to(img)
