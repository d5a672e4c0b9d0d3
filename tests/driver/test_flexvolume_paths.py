"""Hostile paths: the share must be a real mounted filesystem, and the image must stay inside it.

The driver runs as root for any pod author who may name it. Every attempt here must fail
without creating, opening for write or formatting anything outside the share: the whole of
tmp_path (the share's parent, a decoy tree `outside`, kubelet's dirs) is snapshotted before and
compared after, content included.
"""

import os
import random

import pytest

from kubelet import (MiB, Pod, checksum, image_path, kubelet,  # noqa: F401
                     loops_under, mounts_under, new_volume, run, share, snapshot, temp_images)


@pytest.fixture
def outside(tmp_path):
    """A decoy tree next to the share: a directory, and an image-sized file of data."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim.img").write_bytes(random.Random(7).randbytes(4 * MiB))
    with open(path / "zero.img", "xb") as f:
        f.truncate(32 * MiB)  # a blank file the driver would happily format
    return path


@pytest.fixture
def attempt(kubelet, share, tmp_path, outside):
    """attempt(user options, **mount kwargs) -> the Failure reply, checked to have changed
    nothing outside the share and to have left no device or mount behind."""
    pod = Pod("attacker")
    kubelet.pod_dir(pod).parent.mkdir(parents=True)
    watched = (tmp_path, (share, kubelet.log_file))

    def run_attempt(user, **kwargs):
        before = snapshot(watched[0], exclude=watched[1])
        mounts = mounts_under(tmp_path)
        reply = kubelet.mount(pod, user, timeout=20, **kwargs)
        assert reply.status == "Failure", reply
        after = snapshot(watched[0], exclude=watched[1])
        assert after == before, (
            f"changed outside the share: added {sorted(after.keys() - before.keys())}, removed "
            f"{sorted(before.keys() - after.keys())}, modified "
            f"{sorted(k for k in after.keys() & before.keys() if after[k] != before[k])}")
        assert loops_under(tmp_path) == []
        assert mounts_under(tmp_path) == mounts
        return reply

    return run_attempt


# -- the share ------------------------------------------------------------------------------------
def test_share_that_is_not_mounted_is_refused(attempt, tmp_path):
    plain = tmp_path / "not-a-share"
    plain.mkdir()
    reply = attempt({"share": str(plain), "file": "/kube-volumes/test", "size": "30m"})
    assert "is not mounted" in reply.message
    assert str(plain) in reply.message
    assert list(plain.iterdir()) == []


@pytest.mark.parametrize("share_path", ["/", "/proc", "/sys", "/dev", "relative/share"])
def test_root_pseudo_filesystems_and_relative_shares_are_refused(attempt, share_path):
    attempt({"share": share_path, "file": "/kube-volumes/flexblock-test-never", "size": "30m"})
    assert not os.path.exists("/kube-volumes/flexblock-test-never")


def test_share_reached_through_a_symlink_is_accepted(kubelet, share, tmp_path):
    link = tmp_path / "share-link"
    link.symlink_to(share)
    pod = Pod("web")
    reply = kubelet.mount(pod, {"share": str(link), "file": "/kube-volumes/test", "size": "30m"})
    assert reply.status == "Success", reply
    assert image_path(share).exists()
    assert kubelet.unmount(pod).status == "Success"


# -- the file -------------------------------------------------------------------------------------
@pytest.mark.parametrize("file", ["../escape", "/a/../../escape", "/kube-volumes/../../escape",
                                  "..", "/", "", "./", "/kube-volumes/test\0../../x",
                                  "/kube-volumes/.test.flexblock-1-00000000"])
def test_file_that_leaves_the_share_or_names_nothing_is_refused(attempt, share, file):
    attempt({"share": str(share), "file": file, "size": "30m"})
    assert list(share.iterdir()) == []


def test_symlink_as_a_directory_component_is_refused(attempt, share, outside):
    (share / "kube-volumes").symlink_to(outside)
    reply = attempt(new_volume(share))
    assert "symlink" in reply.message


@pytest.mark.parametrize("target", ["victim.img", "zero.img", "missing.img"])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_symlink_as_the_image_is_refused(attempt, share, outside, target, read_only):
    image_path(share).parent.mkdir()
    image_path(share).symlink_to(outside / target)
    reply = attempt(new_volume(share), read_only=read_only)
    assert "symlink" in reply.message


def test_hard_linked_image_is_refused(kubelet, attempt, share, outside):
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share)).status == "Success"
    assert kubelet.unmount(pod).status == "Success"
    # A second name for the image (here inside the share; it could be anywhere on its fs).
    os.link(image_path(share), share / "second-name")
    before = checksum(image_path(share))
    reply = attempt(new_volume(share))
    assert "hard links" in reply.message
    assert checksum(image_path(share)) == before


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_fifo_as_the_image_fails_without_hanging(attempt, share, read_only):
    image_path(share).parent.mkdir()
    os.mkfifo(image_path(share))
    reply = attempt(new_volume(share), read_only=read_only)  # the harness times out at 20 s
    assert "not a regular file" in reply.message


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_directory_as_the_image_is_refused(attempt, share, read_only):
    image_path(share).mkdir(parents=True)
    attempt(new_volume(share), read_only=read_only)
    assert list(image_path(share).iterdir()) == []


def test_filesystem_mounted_inside_the_share_is_not_crossed(attempt, share, tmp_path):
    inner = share / "kube-volumes"
    inner.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64m", "inner-fs", inner)
    try:
        reply = attempt({"share": str(share), "file": "/kube-volumes/sub/test", "size": "30m"})
        assert "another filesystem" in reply.message
        assert list(inner.iterdir()) == []
    finally:
        run("umount", inner)


def test_image_bind_mounted_from_outside_is_refused(attempt, share, outside):
    image_path(share).parent.mkdir()
    image_path(share).touch()
    run("mount", "--bind", outside / "zero.img", image_path(share))
    try:
        reply = attempt(new_volume(share))
        assert "another filesystem" in reply.message
    finally:
        run("umount", image_path(share))


def test_temporary_names_are_not_left_after_a_refusal(attempt, share):
    # mountOptions are checked before mkfs: the half-made image must go again.
    attempt(new_volume(share, mountOptions="errors=panic"))
    assert not image_path(share).exists()
    assert temp_images(image_path(share).parent) == []
