"""fsck before a read-write mount, and multi-mount protection (MMP) on ext4.

e2fsck on an MMP filesystem always waits 2 x interval + 1 s (11 s at the minimum interval), so
the fsck tests use ``mmp: "false"`` volumes unless they are marked slow.
"""

import re
import subprocess

import pytest

from kubelet import (KiB, Pod, assert_released, checksum, dumpe2fs, findmnt, image_path,
                     kubelet, loops_for, make_volume, new_volume, run, share,  # noqa: F401
                     wait_until, write_data)


def mark_not_clean(image):
    run("debugfs", "-w", "-R", "ssv state 0", image)
    assert dumpe2fs(image)["Filesystem state"] == "not clean"


def test_clean_volume_with_mmp_mounts_without_the_fsck_wait(kubelet, share):
    make_volume(kubelet, share, fsck="true")
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, fsck="true"), fs_type="ext4")
    print(f"mount of a clean MMP volume with fsck on took {reply.seconds * 1000:.0f} ms")
    assert reply.status == "Success", reply
    assert reply.seconds < 5.0  # e2fsck on an MMP volume would take 11 s
    assert kubelet.unmount(pod).status == "Success"


@pytest.mark.parametrize("fsck", ["true", "false"])
def test_volume_not_cleanly_unmounted_is_checked(kubelet, share, fsck):
    image = image_path(share)
    digest = make_volume(kubelet, share, mmp="false")
    mark_not_clean(image)
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, mmp="false", fsck=fsck), fs_type="ext4")
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    # ext4 writes back at unmount the state it found at mount: only e2fsck makes it clean.
    expected = "clean" if fsck == "true" else "not clean"
    assert dumpe2fs(image)["Filesystem state"] == expected


def test_fsck_options_f_forces_a_check(kubelet, share):
    image = image_path(share)
    make_volume(kubelet, share, mmp="false")
    checked = dumpe2fs(image)["Last checked"]
    run("debugfs", "-w", "-R", "ssv lastcheck 20200101000000", image)
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, mmp="false", fsckOptions="af"))
    assert reply.status == "Success", reply
    assert kubelet.unmount(pod).status == "Success"
    assert "2020" not in dumpe2fs(image)["Last checked"], checked


def zero_inode_table(image):
    """Zero group 0's inode table (root dir, journal): beyond what e2fsck -a may repair."""
    out = run("dumpe2fs", image).stdout
    block_size = int(dumpe2fs(image)["Block size"])
    first, last = map(int, re.search(r"Inode table at (\d+)-(\d+)", out).groups())
    with open(image, "r+b") as f:
        f.seek(first * block_size)
        f.write(bytes((last - first + 1) * block_size))


def test_badly_corrupted_volume_fails_with_fscks_output(kubelet, share):
    image = image_path(share)
    make_volume(kubelet, share, mmp="false")
    mark_not_clean(image)
    zero_inode_table(image)
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, mmp="false"), fs_type="ext4")
    assert reply.status == "Failure"
    assert "fsck" in reply.message
    assert "UNEXPECTED INCONSISTENCY" in reply.message
    assert not kubelet.pod_dir(pod).exists()
    assert wait_until(lambda: not loops_for(image))
    assert_released(kubelet, share)


def test_corrupted_volume_without_fsck_fails_to_mount_cleanly(kubelet, share):
    image = image_path(share)
    make_volume(kubelet, share, mmp="false")
    zero_inode_table(image)  # superblock still says clean: no fsck, the kernel refuses it
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, mmp="false"), fs_type="ext4")
    assert reply.status == "Failure"
    assert findmnt(kubelet.pod_dir(pod)) is None
    assert wait_until(lambda: not loops_for(image))
    assert_released(kubelet, share)


# -- MMP ------------------------------------------------------------------------------------------
def test_mmp_false_makes_a_volume_without_mmp(kubelet, share):
    make_volume(kubelet, share, mmp="false")
    assert "mmp" not in dumpe2fs(image_path(share))["Filesystem features"].split()


def test_mmp_update_interval_is_applied(kubelet, share):
    make_volume(kubelet, share, mmpUpdateInterval="7")
    sb = dumpe2fs(image_path(share))
    assert "mmp" in sb["Filesystem features"].split()
    assert sb["MMP update interval"] == "7"


@pytest.mark.slow
def test_fsck_of_a_volume_with_mmp(kubelet, share):
    image = image_path(share)
    digest = make_volume(kubelet, share)
    run("debugfs", "-w", "-R", "ssv state 0", image)  # debugfs -w waits out MMP itself
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share), fs_type="ext4")
    print(f"mount with fsck of an MMP volume took {reply.seconds:.1f} s")
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    assert dumpe2fs(image)["Filesystem state"] == "clean"


@pytest.mark.slow
def test_mmp_protects_a_mounted_volume_when_the_lock_is_off(kubelet, share):
    """As on a share whose locks do not reach the other node: the second mount must fail
    (MMP sees the first node's heartbeat) and leave nothing behind."""
    image = image_path(share)
    a = Pod("node-a")
    reply = kubelet.mount(a, new_volume(share), fs_type="ext4")
    assert reply.status == "Success", reply
    digest = write_data(reply.target, size=64 * KiB)
    b = Pod("node-b")
    reply = kubelet.mount(b, new_volume(share, lock="false"), fs_type="ext4")
    print(f"second mount without lock refused after {reply.seconds:.1f} s: {reply.message}")
    assert reply.status == "Failure"
    assert findmnt(kubelet.pod_dir(b)) is None
    assert wait_until(lambda: len(loops_for(image)) == 1)
    assert checksum(kubelet.pod_dir(a) / "data.bin") == digest
    assert kubelet.unmount(a).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    result = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
