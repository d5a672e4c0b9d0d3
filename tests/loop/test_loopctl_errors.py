"""Bad input gives typed errors (class, errno, filename) and leaves nothing attached."""

import errno
import fcntl
import os
import pickle

import pytest

import loopctl
from loopctl._ffi import lib

from helpers import MiB, bound_under, sysfs_bound


@pytest.fixture
def nothing_new_attached(tmp_path):
    """Fails the test if it leaves a device bound to a file under tmp_path that was not
    bound before it ran."""
    before = bound_under(tmp_path)
    yield
    assert bound_under(tmp_path) == before


def assert_error(excinfo, cls, err, filename):
    assert type(excinfo.value) is cls, repr(excinfo.value)
    assert excinfo.value.errno == err
    assert excinfo.value.filename == filename


@pytest.mark.usefixtures("nothing_new_attached")
class TestAttachRefuses:
    def test_missing_file(self, tmp_path):
        missing = tmp_path / "missing.img"
        with pytest.raises(loopctl.LoopError) as excinfo:
            loopctl.attach(missing)
        assert_error(excinfo, loopctl.LoopError, errno.ENOENT, str(missing))

    def test_directory(self, tmp_path):
        with pytest.raises(loopctl.LoopError) as excinfo:
            loopctl.attach(tmp_path)
        assert_error(excinfo, loopctl.LoopError, errno.EISDIR, str(tmp_path))

    def test_directory_read_only(self, tmp_path):
        # A directory opens fine read-only; then it is neither a file nor a block device.
        with pytest.raises(loopctl.InvalidArgument) as excinfo:
            loopctl.attach(tmp_path, read_only=True)
        assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, str(tmp_path))

    def test_character_device(self):
        with pytest.raises(loopctl.InvalidArgument) as excinfo:
            loopctl.attach("/dev/null")
        assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, "/dev/null")

    def test_the_device_being_configured_as_its_own_backing_file(self):
        # The next device LOOP_CTL_GET_FREE hands out, given as the backing file: the kernel
        # refuses a device backed by itself (EBADF, loop_validate_file).
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            node = f"/dev/loop{fcntl.ioctl(ctl, lib.LOOP_CTL_GET_FREE, 0)}"
        finally:
            os.close(ctl)
        before = {n for n, backing in sysfs_bound().items() if backing == node}
        try:
            dev = loopctl.attach(node, read_only=True)
        except loopctl.LoopError as e:
            assert type(e) is loopctl.LoopError
            assert (e.errno, e.filename) == (errno.EBADF, node)
        else:
            # Another allocator bound that device in between, so ours stacked on it: undo.
            dev.detach(wait=True)
            pytest.fail(f"{node} was bound by someone else meanwhile; attach stacked on it")
        assert {n for n, backing in sysfs_bound().items() if backing == node} == before

    def test_offset_beyond_the_end(self, image):
        img = image(1 * MiB)
        for offset in (1 * MiB, 1 * MiB + 1, 2**62):
            with pytest.raises(loopctl.InvalidArgument) as excinfo:
                loopctl.attach(img, offset=offset)
            assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, str(img))

    @pytest.mark.parametrize("option", ["offset", "sizelimit"])
    @pytest.mark.parametrize("value", [-1, -512, 2**63, 1.5])
    def test_out_of_range_offset_or_sizelimit(self, image, option, value):
        img = image(1 * MiB)
        with pytest.raises(loopctl.InvalidArgument) as excinfo:
            loopctl.attach(str(img), **{option: value})
        assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, str(img))

    @pytest.mark.parametrize("block_size", [0, 256, 511, 1000, 1536, 2 * os.sysconf("SC_PAGESIZE")])
    def test_bad_block_size(self, image, block_size):
        img = image(1 * MiB)
        with pytest.raises(loopctl.InvalidArgument) as excinfo:
            loopctl.attach(str(img), block_size=block_size)
        assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, str(img))

    @pytest.mark.parametrize("ref", ["r" * 64, "é" * 32, "r" * 200], ids=["64", "64-utf8", "200"])
    def test_ref_too_long(self, image, ref):
        img = image(1 * MiB)
        with pytest.raises(loopctl.InvalidArgument) as excinfo:
            loopctl.attach(str(img), ref=ref)
        assert_error(excinfo, loopctl.InvalidArgument, errno.EINVAL, str(img))

    def test_invalid_argument_is_also_a_value_error(self, image):
        with pytest.raises(ValueError):
            loopctl.attach(image(1 * MiB), offset=-1)


class TestGetRefuses:
    @pytest.mark.parametrize("path", ["/dev/null", "/dev/loop-control"])
    def test_a_device_that_is_not_a_loop_device(self, path):
        with pytest.raises(loopctl.NotALoopDevice) as excinfo:
            loopctl.get(path)
        assert_error(excinfo, loopctl.NotALoopDevice, errno.ENODEV, path)

    def test_a_regular_file(self, image):
        img = str(image(1 * MiB))
        with pytest.raises(loopctl.NotALoopDevice) as excinfo:
            loopctl.get(img)
        assert_error(excinfo, loopctl.NotALoopDevice, errno.ENODEV, img)

    def test_a_missing_path(self, tmp_path):
        missing = str(tmp_path / "loop-missing")
        with pytest.raises(loopctl.LoopError) as excinfo:
            loopctl.get(missing)
        assert_error(excinfo, loopctl.LoopError, errno.ENOENT, missing)

    def test_a_number_with_no_device(self):
        number = 1 << 19
        assert not os.path.exists(f"/sys/block/loop{number}")
        with pytest.raises(loopctl.NotALoopDevice) as excinfo:
            loopctl.get(number)
        assert_error(excinfo, loopctl.NotALoopDevice, errno.ENODEV, f"/dev/loop{number}")

    @pytest.mark.parametrize("form", ["number", "name", "path"])
    def test_an_unbound_device(self, spare_loop, form):
        device = {"number": spare_loop.number, "name": f"loop{spare_loop.number}",
                  "path": spare_loop.path}[form]
        with pytest.raises(loopctl.NotBound) as excinfo:
            loopctl.get(device)
        assert_error(excinfo, loopctl.NotBound, errno.ENXIO, spare_loop.path)


def test_detach_of_an_unbound_device_raises_not_bound(spare_loop):
    with pytest.raises(loopctl.NotBound) as excinfo:
        loopctl.detach(spare_loop.path)
    assert_error(excinfo, loopctl.NotBound, errno.ENXIO, spare_loop.path)


def test_errors_are_os_errors_with_errno():
    with pytest.raises(OSError) as excinfo:
        loopctl.get("/dev/null")
    assert isinstance(excinfo.value, loopctl.LoopError)
    assert excinfo.value.errno == errno.ENODEV


def real_errors(image, spare_loop) -> dict:
    """One error of each kind, as loopctl raises it against real devices."""
    img = image(1 * MiB)
    errors = {}
    for kind, call in [("LoopError", lambda: loopctl.attach(img.with_name("missing"))),
                       ("InvalidArgument", lambda: loopctl.attach(img, offset=-1)),
                       ("NotALoopDevice", lambda: loopctl.get("/dev/null")),
                       ("NotBound", lambda: loopctl.get(spare_loop.number))]:
        with pytest.raises(loopctl.LoopError) as excinfo:
            call()
        errors[kind] = excinfo.value
    with loopctl.attach(img, lock=True):
        with pytest.raises(loopctl.ImageBusy) as excinfo:
            loopctl.attach(img, lock=True)
    errors["ImageBusy"] = excinfo.value
    return errors


def test_every_error_survives_pickling(image, spare_loop):
    # Errors cross process boundaries (multiprocessing, concurrent.futures) by pickle.
    for kind, err in real_errors(image, spare_loop).items():
        try:
            copy = pickle.loads(pickle.dumps(err))
        except Exception as e:
            pytest.fail(f"{kind} does not survive pickling: {e!r}")
        assert type(copy) is type(err), kind
        assert (copy.errno, copy.strerror, copy.filename) == (err.errno, err.strerror,
                                                               err.filename), kind
        assert getattr(copy, "holder", None) == getattr(err, "holder", None), kind
