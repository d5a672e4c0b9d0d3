"""The share misbehaving: full while an image is allocated or formatted, read-only, and images
truncated or damaged behind the driver's back. Each must end in a Failure that says what is
wrong, with nothing half-made, mounted or bound left behind, and no data lost."""

import os
from pathlib import Path

import pytest

from kubelet import (MIN_SIZE, MiB, Pod, assert_data_kept, assert_released,  # noqa: F401
                     checksum, df_size, image_path, kubelet, loops_for, make_volume,
                     new_volume, run, share, temp_images, wait_until, write_data)


def fill(share, leave: int) -> Path:
    """A file taking all of the share's free space but *leave* bytes (the share keeps its
    capacity, so sizes are judged against it, not against what is free)."""
    st = os.statvfs(share)
    filler = share / "filler"
    with open(filler, "xb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


def used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def refused(kubelet, share, options, *, read_only=False):
    """A mount that must fail and leave the share as it found it (but for directories)."""
    before = used(share)
    pod = Pod("web")
    reply = kubelet.mount(pod, options, read_only=read_only)
    assert reply.status == "Failure", reply
    assert not kubelet.pod_dir(pod).exists()
    image = image_path(share)
    if image.parent.exists():
        assert temp_images(image.parent) == []
    assert used(share) <= before + 64 * 1024, "the failed call left space in use"
    assert_released(kubelet, share)
    return reply


@pytest.fixture
def small_share(share):
    """The share, shrunk to 16 MiB (tmpfs sizes can change while mounted)."""
    run("mount", "-o", "remount,size=16m", share)
    return share


# -- full -----------------------------------------------------------------------------------------
def test_share_full_while_allocating(kubelet, small_share):
    fill(small_share, 8 * MiB)
    reply = refused(kubelet, small_share, new_volume(small_share, size="12Mi", allocate="true"))
    assert "No space left on device" in reply.message and "allocate" in reply.message, reply
    assert not image_path(small_share).exists()


def test_share_full_while_formatting_a_sparse_image(kubelet, small_share):
    fill(small_share, 16 * 1024)  # mkfs.ext4 writes ~52 KiB for 16 MiB (4 KiB blocks)
    reply = refused(kubelet, small_share, new_volume(small_share, size="16Mi", mmp="false"))
    assert "mkfs" in reply.message and "No space left on device" in reply.message, reply
    assert not image_path(small_share).exists()


def test_volume_larger_than_the_whole_share_is_refused(kubelet, small_share):
    """It could never be filled, and tools go wild on such sizes (xfs_growfs to 4 EiB ran the
    node out of memory)."""
    reply = refused(kubelet, small_share, new_volume(small_share, size="17Mi"))
    assert "more than the whole filesystem" in reply.message, reply
    assert not image_path(small_share).exists()


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_growth_beyond_the_whole_share_is_refused(kubelet, share, fs_type):
    size = MIN_SIZE[fs_type]
    pod = Pod("web")
    options = new_volume(share, size=f"{size // MiB}Mi")
    reply = kubelet.mount(pod, options, fs_type=fs_type)
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    before = df_size(reply.target)
    capacity = os.statvfs(share).f_blocks * os.statvfs(share).f_frsize
    reply = kubelet.expandfs(reply.target, options, capacity + MiB, size, fs_type=fs_type)
    assert reply.status == "Failure" and "more than the whole filesystem" in reply.message, reply
    assert image_path(share).stat().st_size == size
    assert df_size(kubelet.pod_dir(pod)) == before
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert_data_kept(kubelet, share, pod, options, digest, fs_type=fs_type)


def test_share_out_of_inodes(kubelet, share):
    image_path(share).parent.mkdir()
    st = os.statvfs(share)
    run("mount", "-o", f"remount,nr_inodes={st.f_files - st.f_ffree}", share)  # no more files
    reply = refused(kubelet, share, new_volume(share))
    assert str(image_path(share)) in reply.message, reply
    assert "No space left on device" in reply.message, reply


def test_share_full_when_growing_a_preallocated_volume(kubelet, share):
    pod = Pod("web")
    options = new_volume(share, mmp="false", allocate="true")
    reply = kubelet.mount(pod, options, fs_type="ext4")
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    fill(share, 4 * MiB)
    reply = kubelet.expandfs(reply.target, options, 64 * MiB, 30 * MiB)
    assert reply.status == "Failure" and "No space left on device" in reply.message, reply
    assert image_path(share).stat().st_size == 30 * MiB
    assert checksum(kubelet.pod_dir(pod) / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert run("e2fsck", "-fn", image_path(share), check=False).returncode == 0


def test_share_full_while_a_pod_writes_to_a_thin_volume(kubelet, share):
    """A sparse image promised more than the share holds: the pod's writes fail (the loop
    device gets ENOSPC from the share, ext4 sees EIO), but what it had synced stays, and the
    volume mounts again, checked clean."""
    pod = Pod("web")
    options = new_volume(share, size="64Mi", mmp="false")
    reply = kubelet.mount(pod, options, fs_type="ext4")
    assert reply.status == "Success", reply
    digest = write_data(reply.target, size=4 * MiB)
    fill(share, 8 * MiB)
    with pytest.raises(OSError):
        write_data(reply.target, "fill.bin", size=32 * MiB)  # fsync'd: the error shows
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert_data_kept(kubelet, share, pod, options, digest)
    assert run("e2fsck", "-fn", image_path(share), check=False).returncode == 0


def test_share_full_when_growing_a_thin_volume_then_retried(kubelet, share):
    """xfs_growfs writes the new space's headers through the loop device, which the full share
    refuses: a Failure, the filesystem still whole and at its old size; with space again,
    kubelet's retry grows it."""
    size = MIN_SIZE["xfs"]
    pod = Pod("web")
    options = new_volume(share, size=f"{size // MiB}Mi")
    reply = kubelet.mount(pod, options, fs_type="xfs")
    assert reply.status == "Success", reply
    target = reply.target
    digest = write_data(target)
    before = df_size(target)
    filler = fill(share, 256 * 1024)
    reply = kubelet.expandfs(target, options, 4 * size, size, fs_type="xfs")
    assert reply.status == "Failure" and "No space left on device" in reply.message, reply
    assert df_size(target) == before
    assert checksum(target / "data.bin") == digest
    filler.unlink()
    reply = kubelet.expandfs(target, options, 4 * size, size, fs_type="xfs")
    assert reply.status == "Success", reply
    assert df_size(target) > 3 * before
    assert checksum(target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert run("xfs_repair", "-n", image_path(share), check=False).returncode == 0


# -- read-only ------------------------------------------------------------------------------------
def test_read_only_share(kubelet, share):
    digest = make_volume(kubelet, share, mmp="false")
    run("mount", "-o", "remount,ro", share)
    reply = refused(kubelet, share, new_volume(share, "other"))
    assert reply.message == f"cannot create {image_path(share, 'other')}: Read-only file system"
    reply = refused(kubelet, share, {"share": str(share), "file": "/new/vol", "size": "30m"})
    assert "Read-only file system" in reply.message and f"{share}/new/vol" in reply.message
    reply = refused(kubelet, share, new_volume(share, mmp="false"))
    assert "Read-only file system" in reply.message, reply
    pod = Pod("reader")
    reply = kubelet.mount(pod, new_volume(share, mmp="false"), read_only=True)
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


# -- truncated or damaged -------------------------------------------------------------------------
@pytest.mark.parametrize("length", [0, 4096, MiB, 15 * MiB])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_truncated_image_is_refused_and_kept(kubelet, share, length, read_only):
    make_volume(kubelet, share, mmp="false")
    image = image_path(share)
    os.truncate(image, length)
    before = checksum(image)
    reply = refused(kubelet, share, {"share": str(share), "file": "/kube-volumes/test"},
                    read_only=read_only)
    if length > 0:
        assert f"has {length} bytes" in reply.message and "truncated" in reply.message, reply
    assert checksum(image) == before, "the driver wrote to a truncated image"


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs"])
def test_truncated_image_of_other_filesystems_is_refused(kubelet, share, fs_type):
    pod = Pod("creator")
    size = MIN_SIZE[fs_type]
    reply = kubelet.mount(pod, new_volume(share, size=f"{size // MiB}Mi"), fs_type=fs_type)
    assert reply.status == "Success", reply
    assert kubelet.unmount(pod).status == "Success"
    assert wait_until(lambda: not loops_for(image_path(share)))
    os.truncate(image_path(share), size // 2)
    reply = refused(kubelet, share, {"share": str(share), "file": "/kube-volumes/test"})
    assert "truncated" in reply.message, reply


def test_image_with_a_damaged_superblock_is_never_formatted(kubelet, share):
    make_volume(kubelet, share, mmp="false")
    image = image_path(share)
    with open(image, "r+b") as f:
        f.seek(1024)
        f.write(os.urandom(1024))
    before = checksum(image)
    reply = refused(kubelet, share, {"share": str(share), "file": "/kube-volumes/test"})
    assert "refusing to format" in reply.message, reply
    assert checksum(image) == before
