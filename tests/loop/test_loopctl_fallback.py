"""The pre-5.8 attach path (LOOP_SET_FD, LOOP_SET_BLOCK_SIZE, LOOP_SET_STATUS64,
LOOP_SET_DIRECT_IO) gives the same devices as LOOP_CONFIGURE.

The running kernel has LOOP_CONFIGURE, so the fallback is forced by setting the switch loopctl
itself sets after seeing LOOP_CONFIGURE fail as unsupported. That switch is the only thing these
tests change; every ioctl still goes to the real kernel.
"""

import pytest

import loopctl
import loopctl.device

from helpers import MiB, expected_losetup_row, losetup_row

# Everything but identity, which differs between two bindings.
COMPARED = ("backing_file", "backing_devno", "backing_inode", "offset", "sizelimit", "read_only",
            "autoclear", "partscan", "direct_io", "block_size", "size", "ref")

OPTIONS = {
    "defaults": {},
    "offset": {"offset": 1 * MiB},
    "sizelimit": {"sizelimit": 4 * MiB + 100},
    "block-size-512": {"block_size": 512},
    "block-size-4096": {"block_size": 4096},
    "read-only": {"read_only": True},
    "autoclear": {"autoclear": True},
    "partscan": {"partscan": True},
    "direct-io": {"direct_io": True},
    "direct-io-misaligned": {"direct_io": True, "offset": 100},
    "ref": {"ref": "fallback-ref"},
    "everything": {"offset": 4096, "sizelimit": 8 * MiB, "block_size": 4096, "read_only": True,
                   "autoclear": True, "partscan": True, "direct_io": True, "ref": "all"},
}


def attached_state(img, options) -> tuple:
    with loopctl.attach(img, **options) as dev:
        info = dev.info()
        assert losetup_row(dev.path) == expected_losetup_row(info)
        dev.detach(wait=True)
    return tuple(getattr(info, field) for field in COMPARED)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_fallback_attach_matches_loop_configure(image, monkeypatch, options):
    img = image(16 * MiB)
    configured = attached_state(img, options)
    # Force the pre-5.8 path: this kernel has LOOP_CONFIGURE, everything else stays real.
    monkeypatch.setattr(loopctl.device, "_configure_unsupported", True)
    assert attached_state(img, options) == configured


def test_fallback_attach_with_lock_refuses_a_second_locked_attach(image, monkeypatch):
    monkeypatch.setattr(loopctl.device, "_configure_unsupported", True)
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True) as dev:
        with pytest.raises(loopctl.ImageBusy) as excinfo:
            loopctl.attach(img, lock=True)
        assert dev.path in excinfo.value.holder
