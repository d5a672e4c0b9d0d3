"""Data survives a filesystem round trip through two separate bindings of the same image."""

import os

import loopctl

from helpers import MiB, bound_to, mounts_under, run


def test_ext4_written_through_one_binding_reads_back_through_the_next(image, tmp_path):
    img = image(64 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    payload = os.urandom(3 * MiB + 123)

    with loopctl.attach(img, lock=True) as dev:
        run("mkfs.ext4", "-q", "-F", dev.path)
        run("mount", dev.path, mnt)
        try:
            (mnt / "payload.bin").write_bytes(payload)
        finally:
            run("umount", mnt)
        dev.detach(wait=True)
    assert not bound_to(img)

    with loopctl.attach(img, lock=True) as dev:
        run("mount", dev.path, mnt)
        try:
            assert (mnt / "payload.bin").read_bytes() == payload
        finally:
            run("umount", mnt)
        dev.detach(wait=True)

    assert not bound_to(img)
    assert not mounts_under(tmp_path)
