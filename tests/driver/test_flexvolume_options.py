"""Option validation: an unknown key or a malformed value is a Failure that names the option,
before anything is created or attached."""

import pytest

from kubelet import (Pod, image_path, kubelet, loops_under, new_volume, share,  # noqa: F401
                     temp_images)


def refused(kubelet, share, tmp_path, user, **kwargs):
    reply = kubelet.mount(Pod("web"), user, **kwargs)
    assert reply.status == "Failure", reply
    assert not image_path(share).exists()
    if image_path(share).parent.exists():
        assert temp_images(image_path(share).parent) == []
    assert loops_under(tmp_path) == []
    return reply


@pytest.mark.parametrize("key", ["sizee", "fstype", "readOnly", "mount-options", "options"])
def test_unknown_option_is_named(kubelet, share, tmp_path, key):
    reply = refused(kubelet, share, tmp_path, {**new_volume(share), key: "x"})
    assert repr(key) in reply.message and "unknown" in reply.message


def test_seed_aliases_are_accepted_but_not_twice(kubelet, share, tmp_path):
    reply = refused(kubelet, share, tmp_path,
                    {**new_volume(share), "mountOptions": "noatime", "mount_options": "noatime"})
    assert "mount_options" in reply.message or "mountOptions" in reply.message
    pod = Pod("web")
    reply = kubelet.mount(pod, {**new_volume(share), "mount_options": "noatime",
                                "fsck_options": "a"})
    assert reply.status == "Success", reply
    assert kubelet.unmount(pod).status == "Success"


@pytest.mark.parametrize("option,value", [
    ("size", "big"), ("size", "1.5.3G"), ("size", "-1G"), ("size", "0"), ("size", "1Ki"),
    ("size", "1 G"), ("size", "1e9"), ("size", "9Ei"), ("size", "30mb1"),
    ("mmp", "maybe"), ("mmp", "2"), ("fsck", "sure"), ("allocate", "yes please"),
    ("lock", "nope"), ("format", "vmdk"), ("format", "QCOW2"), ("format", "parallels"),
    ("fsType", "vfat"), ("fsType", "ext4 "), ("fsType", "ext2"),
    ("mmpUpdateInterval", "0"), ("mmpUpdateInterval", "301"), ("mmpUpdateInterval", "5s"),
    ("mmpUpdateInterval", "-5"), ("mmpUpdateInterval", "x"), ("mmpUpdateInterval", "²"),
    ("fsckOptions", "-y"), ("fsckOptions", "a b"), ("fsckOptions", "r"), ("fsckOptions", ""),
    ("fsckOptions", "a;reboot"),
    ("mountOptions", "errors=panic"), ("mountOptions", "journal_path=/dev/sda"),
    ("mountOptions", "a b"), ("mountOptions", "x=$(id)"), ("mountOptions", "noatime,dev"),
    ("mountOptions", "suid,errors=panic"), ("mountOptions", "context=system_u:object_r:x"),
])
def test_malformed_value_is_named(kubelet, share, tmp_path, option, value):
    reply = refused(kubelet, share, tmp_path, {**new_volume(share), option: value})
    assert f"'{option}'" in reply.message, reply.message
    assert "internal error" not in reply.message


@pytest.mark.parametrize("key,value", [
    ("kubernetes.io/fsType", "ntfs"), ("kubernetes.io/readwrite", "rwx"),
    ("kubernetes.io/mounterArgs.FsGroup", "staff"), ("kubernetes.io/mounterArgs.FsGroup", "-1"),
    ("kubernetes.io/mounterArgs.FsGroup", "²"),
])
def test_malformed_kubelet_value_is_named(kubelet, share, tmp_path, key, value):
    reply = refused(kubelet, share, tmp_path, {**new_volume(share), key: value})
    assert f"'{key}'" in reply.message, reply.message
    assert "internal error" not in reply.message


def test_contradicting_fs_types_are_refused(kubelet, share, tmp_path):
    reply = refused(kubelet, share, tmp_path, new_volume(share, fsType="xfs"), fs_type="ext4")
    assert "'fsType'" in reply.message


def test_missing_file_is_named(kubelet, share, tmp_path):
    reply = refused(kubelet, share, tmp_path, {"share": str(share), "size": "30m"})
    assert "'file'" in reply.message


@pytest.mark.parametrize("value", ["", "1.5Gi", "31457280"])
def test_odd_but_valid_sizes(kubelet, share, value):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size=value))
    if value == "":
        # No size: an existing image only.
        assert reply.status == "Failure" and "does not exist" in reply.message
        return
    assert reply.status == "Success", reply
    assert image_path(share).stat().st_size % 4096 == 0
    assert kubelet.unmount(pod).status == "Success"
