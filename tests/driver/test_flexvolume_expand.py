"""expandfs: kubelet growing a mounted volume online (PVC resize)."""

import pytest

from kubelet import (MIN_SIZE, MiB, Pod, checksum, df_size, image_path, kubelet,  # noqa: F401
                     loop_of_mount, needs_ext_online_resize, new_volume, run, share, write_data)


def grow_and_check(kubelet, share, fs_type, user, *, old, new):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size=f"{old // MiB}Mi"), fs_type=fs_type)
    assert reply.status == "Success", reply
    target = reply.target
    digest = write_data(target)
    before = df_size(target)
    reply = kubelet.expandfs(target, user, new, old, fs_type=fs_type)
    assert reply.status == "Success", reply
    after = df_size(target)
    print(f"{fs_type}: df size {before} -> {after}")
    assert after >= before + 0.9 * (new - old)
    assert image_path(share).stat().st_size == new
    assert int(run("blockdev", "--getsize64", loop_of_mount(target)).stdout) == new
    assert checksum(target / "data.bin") == digest
    write_data(target, "after.bin", size=2 * MiB)
    assert kubelet.unmount(pod).status == "Success"
    # Mounted again, the volume keeps its new size.
    reply = kubelet.mount(pod, new_volume(share), fs_type=fs_type)
    assert reply.status == "Success", reply
    assert df_size(reply.target) == after
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"


@pytest.mark.parametrize("fs_type", [pytest.param("ext4", marks=needs_ext_online_resize),
                                     "xfs", "btrfs"])
@pytest.mark.parametrize("with_file", [True, False], ids=["spec", "after-restart"])
def test_online_expandfs(kubelet, share, fs_type, with_file):
    old = 64 * MiB if fs_type == "ext4" else MIN_SIZE[fs_type]
    # After a kubelet restart the spec is rebuilt from the dir names: no user options at all.
    user = new_volume(share, size=f"{old // MiB}Mi") if with_file else {}
    grow_and_check(kubelet, share, fs_type, user, old=old, new=2 * old)


@needs_ext_online_resize
@pytest.mark.parametrize("fs_type", ["ext2", "ext3"])
def test_expandfs_of_an_existing_image_made_by_another_tool(kubelet, share, fs_type):
    # e.g. the kvaps seed, which passed fsType straight to mkfs -t.
    image = image_path(share)
    image.parent.mkdir()
    with open(image, "xb") as f:
        f.truncate(64 * MiB)
    run(f"mkfs.{fs_type}", "-q", "-F", image)
    pod = Pod("web")
    reply = kubelet.mount(pod, {"share": str(share), "file": "/kube-volumes/test"})
    assert reply.status == "Success", reply
    before = df_size(reply.target)
    reply = kubelet.expandfs(reply.target, {}, 128 * MiB, 64 * MiB)
    assert reply.status == "Success", reply
    assert df_size(kubelet.pod_dir(pod)) > before
    assert kubelet.unmount(pod).status == "Success"


def test_expandfs_to_a_smaller_size_changes_nothing(kubelet, share):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size="320Mi"), fs_type="xfs")
    assert reply.status == "Success", reply
    before = df_size(reply.target)
    reply = kubelet.expandfs(reply.target, new_volume(share), 32 * MiB, 320 * MiB)
    assert reply.status == "Success", reply
    assert df_size(kubelet.pod_dir(pod)) == before
    assert image_path(share).stat().st_size == 320 * MiB
    assert kubelet.unmount(pod).status == "Success"


def test_expandfs_of_a_dir_that_is_not_mounted_fails(kubelet, tmp_path):
    target = tmp_path / "not-mounted"
    target.mkdir()
    reply = kubelet.expandfs(target, {}, 128 * MiB, 64 * MiB)
    assert reply.status == "Failure"
    assert "not a mounted" in reply.message


@pytest.mark.parametrize("size", ["12x", "-5", "²", ""])
def test_expandfs_with_a_malformed_size_fails(kubelet, share, size):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size="64Mi"))
    assert reply.status == "Success", reply
    reply = kubelet.call("expandfs", "{}", "", kubelet.pod_dir(pod), size, str(64 * MiB))
    assert reply.status == "Failure"
    assert "internal error" not in reply.message
    assert image_path(share).stat().st_size == 64 * MiB
    assert kubelet.unmount(pod).status == "Success"


def test_expandfs_with_options_naming_another_image_fails(kubelet, share):
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share, "one", size="64Mi")).status == "Success"
    other = Pod("other")
    assert kubelet.mount(other, new_volume(share, "two", size="64Mi"), volume="two"
                         ).status == "Success"
    reply = kubelet.expandfs(kubelet.pod_dir(pod), new_volume(share, "two"), 128 * MiB, 64 * MiB)
    assert reply.status == "Failure"
    assert image_path(share, "one").stat().st_size == 64 * MiB
    assert image_path(share, "two").stat().st_size == 64 * MiB
    assert kubelet.unmount(pod).status == "Success"
    assert kubelet.unmount(other, volume="two").status == "Success"
