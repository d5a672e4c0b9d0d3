"""loopctl and util-linux see the same devices: each reads what the other attached."""

import random
import time

import pytest

import loopctl

from helpers import (MiB, bound_to, expected_losetup_row, losetup_associated,
                     losetup_backing_files, losetup_row, run, wait_until)


def losetup_attach(*options: str, image) -> str:
    """`losetup -f --show OPTIONS IMAGE`; the device path.

    losetup 2.38 retries a lost race for a free device only on EBUSY; another allocator cycling
    the lowest free device on this machine also makes it fail with ENXIO (the device was in
    rundown when losetup opened it), so we try again, only if nothing got attached.
    """
    for _ in range(50):
        result = run("losetup", "-f", "--show", *options, image, check=False)
        if result.returncode == 0:
            return result.stdout.strip()
        assert not losetup_associated(image), result.stderr
        time.sleep(random.uniform(0, 0.02))
    pytest.fail(f"losetup kept failing: {result.stderr}")


LOSETUP_OPTIONS = {
    "defaults": ([], {}),
    "offset": (["-o", str(1 * MiB)], {"offset": 1 * MiB}),
    "sizelimit": (["--sizelimit", str(4 * MiB)], {"sizelimit": 4 * MiB}),
    "read-only": (["-r"], {"read_only": True}),
    "offset-sizelimit-ro": (["-o", "4096", "--sizelimit", str(2 * MiB), "-r"],
                            {"offset": 4096, "sizelimit": 2 * MiB, "read_only": True}),
    "sector-size": (["-b", "4096"], {"block_size": 4096}),
    "direct-io": (["--direct-io=on"], {"direct_io": True}),
    "partscan": (["-P"], {"partscan": True}),
}


@pytest.mark.parametrize("options, expected", LOSETUP_OPTIONS.values(),
                         ids=LOSETUP_OPTIONS.keys())
def test_loopctl_reads_and_detaches_what_losetup_attached(image, options, expected):
    img = image(16 * MiB)
    path = losetup_attach(*options, image=img)
    [found] = loopctl.find(img)
    info = found.info()
    assert info.path == path
    assert info == loopctl.get(path).info()
    assert info.backing_file == str(img)
    for field, value in expected.items():
        assert getattr(info, field) == value, field
    assert expected_losetup_row(info) == losetup_row(path)
    assert found.info().ref == str(img)[:63]  # losetup stores the path as lo_file_name too

    loopctl.detach(path, wait=True)
    assert not bound_to(img)
    assert not losetup_associated(img)
    assert str(img) not in losetup_backing_files()


@pytest.mark.parametrize("options", [{}, {"offset": 1 * MiB, "sizelimit": 4 * MiB},
                                     {"read_only": True, "ref": "from-loopctl"},
                                     {"block_size": 4096, "direct_io": True}],
                         ids=["defaults", "offset-sizelimit", "ro-ref", "4k-dio"])
def test_losetup_reads_and_detaches_what_loopctl_attached(image, options):
    img = image(16 * MiB)
    dev = loopctl.attach(img, **options)
    dev.relinquish()
    info = loopctl.get(dev.number).info()
    assert losetup_row(dev.path) == expected_losetup_row(info)
    assert losetup_associated(img) == {dev.number}
    run("losetup", "-d", dev.path)
    assert wait_until(lambda: not bound_to(img))  # losetup -d is as lazy as LOOP_CLR_FD
    assert loopctl.find(img) == []
