"""mount and unmount as kubelet drives them: new and existing volumes, the seed README's
examples, read-only sharing, fsGroup, secrets, busy images, idempotency."""

import errno
import os
import random
import stat
import struct

import pytest

from kubelet import (ALIAS, ALLOWED_ROOTS_ENV, GiB, MIN_SIZE, MiB, Pod,  # noqa: F401
                     assert_released, checksum, dumpe2fs, findmnt, image_path, is_mount_point,
                     kubelet, loop_of_mount, loops_for, losetup, new_volume, run, share,
                     temp_images, wait_until, write_data)


def check_mounted(reply, image, fs_type, *, read_only=False):
    """The pod dir is a mount of a loop device bound (autoclear) to *image* itself."""
    assert reply.status == "Success", reply
    mount = findmnt(reply.target)
    assert mount is not None, f"{reply.target} is not a mount point after {reply}"
    assert mount["fstype"] == fs_type
    options = mount["options"].split(",")
    assert options[0] == ("ro" if read_only else "rw")
    assert "nodev" in options
    device = loop_of_mount(reply.target)
    info = losetup(device)
    assert info["back-file"] == str(image)
    assert info["autoclear"] is True
    assert info["ro"] is read_only
    return device


def unmount_and_check_gone(kubelet, pod, image, *, volume="test"):
    """Unmount the pod's volume; its dir is gone and its loop device unbound from *image*."""
    target = kubelet.pod_dir(pod, volume)
    number = int(loop_of_mount(target).removeprefix("/dev/loop"))
    reply = kubelet.unmount(pod, volume=volume)
    assert reply.status == "Success", reply
    assert not target.exists()  # the harness removed it, as kubelet does
    assert wait_until(lambda: number not in loops_for(image)), f"loop{number} is still bound"


# -- the life of a volume -------------------------------------------------------------------------
def test_new_ext4_volume_lifecycle(kubelet, share):
    image = image_path(share)
    web = Pod("web")
    reply = kubelet.mount(web, new_volume(share), fs_type="ext4")
    check_mounted(reply, image, "ext4")
    assert "created" in reply.message
    assert image.stat().st_size == 30 * MiB
    assert stat.S_IMODE(image.stat().st_mode) & 0o077 == 0  # not readable by other users
    sb = dumpe2fs(image)
    assert "mmp" in sb["Filesystem features"].split()
    assert sb["MMP update interval"] == "5"
    assert temp_images(image.parent) == []
    digest = write_data(reply.target)
    unmount_and_check_gone(kubelet, web, image)

    # The same pod again, then a second pod: the existing image with its data.
    for pod in (web, Pod("web-2")):
        reply = kubelet.mount(pod, new_volume(share), fs_type="ext4")
        check_mounted(reply, image, "ext4")
        assert "created" not in reply.message
        assert checksum(reply.target / "data.bin") == digest
        unmount_and_check_gone(kubelet, pod, image)
    assert image.stat().st_size == 30 * MiB
    assert_released(kubelet, share)


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs", "ext3"])
def test_new_volume_of_other_filesystems(kubelet, share, fs_type):
    image = image_path(share)
    size = MIN_SIZE[fs_type]
    options = new_volume(share, size=f"{size // MiB}Mi")
    pod = Pod("web")
    reply = kubelet.mount(pod, options, fs_type=fs_type)
    check_mounted(reply, image, fs_type)
    assert image.stat().st_size == size
    digest = write_data(reply.target)
    unmount_and_check_gone(kubelet, pod, image)
    reply = kubelet.mount(pod, options, fs_type=fs_type)
    check_mounted(reply, image, fs_type)
    assert checksum(reply.target / "data.bin") == digest
    unmount_and_check_gone(kubelet, pod, image)


def test_fs_type_option_instead_of_kubelets(kubelet, share):
    # The qemu-nbd seed's spelling: fsType among the user options, kubelet's fsType "".
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size="320Mi", fsType="xfs"))
    check_mounted(reply, image_path(share), "xfs")
    unmount_and_check_gone(kubelet, pod, image_path(share))


def test_seed_readme_shared_filesystem_example_verbatim(kubelet, share):
    pod = Pod("nginx")
    options = {"share": str(share), "file": "/kube-volumes/test", "size": "1g"}
    reply = kubelet.mount(pod, options, fs_type="ext4", driver=ALIAS)
    assert reply.status == "Success", reply
    assert reply.target == kubelet.pod_dir(pod, driver=ALIAS)
    assert "kvaps~loop" in str(reply.target)
    check_mounted(reply, image_path(share), "ext4")
    assert image_path(share).stat().st_size == GiB
    write_data(reply.target)
    reply = kubelet.unmount(pod, driver=ALIAS)
    assert reply.status == "Success", reply
    assert_released(kubelet, share)


def test_seed_readme_simple_example_needs_an_allowed_root(kubelet, share, tmp_path):
    root = tmp_path / "volumes"
    root.mkdir()
    options = {"file": f"{root}/kube-volumes/test", "size": "30m"}
    pod = Pod("nginx")
    reply = kubelet.mount(pod, options, fs_type="ext4", driver=ALIAS)
    assert reply.status == "Failure"
    assert "allowed roots" in reply.message
    assert list(root.iterdir()) == []

    kubelet.env[ALLOWED_ROOTS_ENV] = str(root)
    reply = kubelet.mount(pod, options, fs_type="ext4", driver=ALIAS)
    image = root / "kube-volumes" / "test"
    check_mounted(reply, image, "ext4")
    assert image.stat().st_size == 30 * MiB
    reply = kubelet.unmount(pod, driver=ALIAS)
    assert reply.status == "Success", reply
    assert wait_until(lambda: not loops_for(image))

    # A file outside the configured root is still refused.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    reply = kubelet.mount(Pod("other"), {"file": f"{elsewhere}/test", "size": "30m"})
    assert reply.status == "Failure"
    assert "allowed roots" in reply.message
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("size,expected", [
    ("30m", 30 * MiB), ("500Mi", 500 * MiB), ("1Gi", GiB), ("1g", GiB), ("10G", 10 * GiB),
    ("1GB", 1_000_001_536),  # 10^9, rounded up to a multiple of 4096
])
def test_sizes(kubelet, share, size, expected):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size=size, mmp="false"), fs_type="ext4")
    check_mounted(reply, image_path(share), "ext4")
    assert image_path(share).stat().st_size == expected
    unmount_and_check_gone(kubelet, pod, image_path(share))


# -- read-only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_read_only_mounts_share_an_image(kubelet, share, fs_type):
    image = image_path(share)
    options = new_volume(share, size=f"{MIN_SIZE[fs_type] // MiB}Mi")
    writer = Pod("writer")
    reply = kubelet.mount(writer, options, fs_type=fs_type)
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    unmount_and_check_gone(kubelet, writer, image)
    before = checksum(image)

    readers = [Pod("reader-1"), Pod("reader-2")]
    devices = set()
    for pod in readers:
        reply = kubelet.mount(pod, options, fs_type=fs_type, read_only=True)
        devices.add(check_mounted(reply, image, fs_type, read_only=True))
        assert checksum(reply.target / "data.bin") == digest
        with pytest.raises(OSError) as e:
            write_data(reply.target, "new.bin")
        assert e.value.errno == errno.EROFS
    assert len(devices) == 2

    # While readers hold it, a read-write mount is refused.
    reply = kubelet.mount(Pod("writer-2"), options, fs_type=fs_type)
    assert reply.status == "Failure"
    assert "in use" in reply.message

    for pod in readers:
        unmount_and_check_gone(kubelet, pod, image)
    assert checksum(image) == before  # not a byte written through a read-only mount
    assert_released(kubelet, share)


def test_read_only_through_mount_options(kubelet, share):
    options = new_volume(share)
    pod = Pod("web")
    assert kubelet.mount(pod, options).status == "Success"
    unmount_and_check_gone(kubelet, pod, image_path(share))
    reply = kubelet.mount(pod, {**options, "mountOptions": "ro,noatime"})
    check_mounted(reply, image_path(share), "ext4", read_only=True)
    unmount_and_check_gone(kubelet, pod, image_path(share))


def test_read_only_mount_of_a_missing_image_fails(kubelet, share):
    reply = kubelet.mount(Pod("web"), new_volume(share), read_only=True)
    assert reply.status == "Failure"
    assert not image_path(share).exists()


# -- what kubelet passes besides the user's options -----------------------------------------------
@pytest.mark.parametrize("key", ["kubernetes.io/mounterArgs.FsGroup", "kubernetes.io/fsGroup"])
def test_fs_group_owns_the_volume_root(kubelet, share, key):
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share), fs_group=2000, fs_group_key=key)
    check_mounted(reply, image_path(share), "ext4")
    st = os.stat(reply.target)
    assert st.st_gid == 2000
    assert st.st_mode & 0o2070 == 0o2070  # setgid, group rwx
    write_data(reply.target, "by-root.bin")
    assert os.stat(reply.target / "by-root.bin").st_gid == 2000  # inherited through setgid
    unmount_and_check_gone(kubelet, pod, image_path(share))


def test_secrets_never_reach_the_log(kubelet, share):
    pod = Pod("web")
    secret, encoded = "s3cr3t", "czNjcjN0"
    reply = kubelet.mount(pod, new_volume(share), secrets={"password": secret})
    assert reply.status == "Success", reply
    # A failing call with the same secret, which logs at error level.
    failed = kubelet.mount(Pod("other"), new_volume(share, sizee="1"), secrets={"password": secret})
    assert failed.status == "Failure"
    unmount_and_check_gone(kubelet, pod, image_path(share))
    log = kubelet.log()
    assert "kubernetes.io/secret/password" in log
    assert "<redacted>" in log
    assert secret not in log and encoded not in log
    for r in kubelet.calls:
        assert secret not in r.output and encoded not in r.output


def test_pod_info_and_unknown_kubelet_keys_are_accepted(kubelet, share):
    # Future kubelets may add kubernetes.io/ keys; they must not break mounts.
    pod = Pod("web", namespace="prod", service_account="builder")
    reply = kubelet.mount(pod, {**new_volume(share), "kubernetes.io/some.future.key": "x"})
    assert reply.status == "Success", reply
    unmount_and_check_gone(kubelet, pod, image_path(share))


# -- one writer at a time -------------------------------------------------------------------------
def test_busy_image_is_refused_at_once_and_free_after_unmount(kubelet, share):
    image = image_path(share)
    a, b = Pod("a"), Pod("b")
    reply = kubelet.mount(a, new_volume(share), fs_type="ext4")
    assert reply.status == "Success", reply
    digest = write_data(reply.target)

    reply = kubelet.mount(b, new_volume(share), fs_type="ext4")
    print(f"second read-write mount refused after {reply.seconds * 1000:.0f} ms")
    assert reply.status == "Failure"
    assert "in use" in reply.message
    assert reply.seconds < 2.0  # not MMP's 11 s wait: the image lock answers first
    assert not kubelet.pod_dir(b).exists()  # kubelet removed it after the failure
    assert len(loops_for(image)) == 1

    # Nor may anyone mount it read-only meanwhile: the writer's cache is not on the image yet.
    reply = kubelet.mount(b, new_volume(share), fs_type="ext4", read_only=True)
    assert reply.status == "Failure"
    assert "in use" in reply.message

    unmount_and_check_gone(kubelet, a, image)
    reply = kubelet.mount(b, new_volume(share), fs_type="ext4")
    check_mounted(reply, image, "ext4")
    assert checksum(reply.target / "data.bin") == digest
    unmount_and_check_gone(kubelet, b, image)


# -- images that exist already --------------------------------------------------------------------
def test_existing_image_smaller_than_size_is_refused(kubelet, share):
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share, size="30m")).status == "Success"
    unmount_and_check_gone(kubelet, pod, image_path(share))
    reply = kubelet.mount(pod, new_volume(share, size="64m"))
    assert reply.status == "Failure"
    assert "smaller" in reply.message
    assert image_path(share).stat().st_size == 30 * MiB
    assert_released(kubelet, share)


def test_existing_image_of_random_bytes_is_never_formatted(kubelet, share):
    image = image_path(share)
    image.parent.mkdir()
    image.write_bytes(random.Random(1234).randbytes(8 * MiB))
    before = checksum(image)
    reply = kubelet.mount(Pod("web"), new_volume(share, size="8m"))
    assert reply.status == "Failure"
    assert "refusing to format" in reply.message
    assert checksum(image) == before
    assert_released(kubelet, share)


@pytest.mark.parametrize("content", ["dos", "swap"])
def test_existing_image_holding_something_else_is_never_formatted(kubelet, share, content):
    image = image_path(share)
    image.parent.mkdir()
    with open(image, "xb") as f:
        f.truncate(32 * MiB)
    if content == "dos":  # one Linux partition from sector 2048, as fdisk would write it
        entry = struct.pack("<B3sB3sII", 0, b"\x20\x21\x00", 0x83, b"\xfe\xff\xff", 2048,
                            32 * MiB // 512 - 2048)
        with open(image, "r+b") as f:
            f.seek(440)
            f.write(b"flex\0\0" + entry + bytes(48) + b"\x55\xaa")
    else:
        run("mkswap", image)
    before = checksum(image)
    reply = kubelet.mount(Pod("web"), new_volume(share, size="32m"))
    assert reply.status == "Failure"
    assert content in reply.message
    assert checksum(image) == before
    assert_released(kubelet, share)


def test_existing_zero_sparse_file_is_formatted(kubelet, share):
    image = image_path(share)
    image.parent.mkdir()
    with open(image, "xb") as f:
        f.truncate(32 * MiB)
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size="32m"), fs_type="ext4")
    check_mounted(reply, image, "ext4")
    assert "mmp" in dumpe2fs(image)["Filesystem features"].split()
    unmount_and_check_gone(kubelet, pod, image)


def test_existing_ext4_image_without_mmp_gets_it(kubelet, share):
    image = image_path(share)
    image.parent.mkdir()
    with open(image, "xb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", image)
    assert "mmp" not in dumpe2fs(image)["Filesystem features"].split()
    pod = Pod("web")
    reply = kubelet.mount(pod, {"share": str(share), "file": "/kube-volumes/test"})
    check_mounted(reply, image, "ext4")
    unmount_and_check_gone(kubelet, pod, image)
    assert "mmp" in dumpe2fs(image)["Filesystem features"].split()


@pytest.mark.parametrize("fs_type", ["ext2", "ext3", "ext4"])
def test_existing_ext_images_made_by_other_tools_mount(kubelet, share, fs_type):
    # e.g. by the kvaps seed, which passed fsType straight to mkfs -t; kubelet's fsType "".
    image = image_path(share)
    image.parent.mkdir()
    with open(image, "xb") as f:
        f.truncate(32 * MiB)
    run(f"mkfs.{fs_type}", "-q", "-F", image)
    pod = Pod("web")
    reply = kubelet.mount(pod, {"share": str(share), "file": "/kube-volumes/test"})
    check_mounted(reply, image, fs_type)
    digest = write_data(reply.target)
    unmount_and_check_gone(kubelet, pod, image)
    reply = kubelet.mount(pod, {"share": str(share), "file": "/kube-volumes/test"},
                          fs_type="ext4")  # asking for ext4 accepts the older ext family
    check_mounted(reply, image, fs_type)
    assert checksum(reply.target / "data.bin") == digest
    unmount_and_check_gone(kubelet, pod, image)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_existing_image_of_another_fs_type_than_asked_is_refused(kubelet, share, fs_type):
    other = "xfs" if fs_type == "ext4" else "ext4"
    pod = Pod("web")
    options = new_volume(share, size="320Mi")
    assert kubelet.mount(pod, options, fs_type=fs_type).status == "Success"
    unmount_and_check_gone(kubelet, pod, image_path(share))
    reply = kubelet.mount(pod, options, fs_type=other)
    assert reply.status == "Failure"
    assert fs_type in reply.message
    assert_released(kubelet, share)


# -- idempotency ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs"])
def test_mount_on_a_dir_that_already_has_the_volume_succeeds(kubelet, share, fs_type):
    options = new_volume(share, size=f"{MIN_SIZE[fs_type] // MiB}Mi")
    pod = Pod("web")
    first = kubelet.mount(pod, options, fs_type=fs_type)
    device = check_mounted(first, image_path(share), fs_type)
    again = kubelet.mount(pod, options, fs_type=fs_type)
    assert again.status == "Success", again
    assert loop_of_mount(again.target) == device
    assert loops_for(image_path(share)) == [int(device.removeprefix("/dev/loop"))]
    unmount_and_check_gone(kubelet, pod, image_path(share))


def test_unmount_of_a_dir_that_is_not_mounted_succeeds(kubelet):
    pod = Pod("web")
    target = kubelet.pod_dir(pod)
    target.mkdir(parents=True)
    reply = kubelet.unmount(pod)
    assert reply.status == "Success", reply
    assert not target.exists()


def test_unmount_of_a_dir_that_does_not_exist_succeeds(kubelet):
    reply = kubelet.unmount(Pod("web"))
    assert reply.status == "Success", reply


def test_unmount_twice_succeeds(kubelet, share):
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share)).status == "Success"
    unmount_and_check_gone(kubelet, pod, image_path(share))
    assert kubelet.unmount(pod).status == "Success"


def create_volume(kubelet, share, name="test", **extra):
    """Create volume *name* through a throwaway pod, and unmount it."""
    pod = Pod("creator")
    reply = kubelet.mount(pod, new_volume(share, name, **extra), volume=name)
    assert reply.status == "Success", reply
    unmount_and_check_gone(kubelet, pod, image_path(share, name), volume=name)


def test_mount_dir_holding_another_filesystem_is_refused(kubelet, share):
    create_volume(kubelet, share)
    pod = Pod("web")
    target = kubelet.pod_dir(pod)
    target.mkdir(parents=True)
    run("mount", "-t", "tmpfs", "-o", "size=1m", "someone-elses", target)
    reply = kubelet.mount(pod, new_volume(share))
    assert reply.status == "Failure"
    assert "another filesystem" in reply.message
    assert findmnt(target)["fstype"] == "tmpfs"
    assert loops_for(image_path(share)) == []
    run("umount", target)


def test_mount_dir_holding_another_volume_is_refused(kubelet, share):
    create_volume(kubelet, share, "two")
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share, "one")).status == "Success"
    reply = kubelet.mount(pod, new_volume(share, "two"))
    assert reply.status == "Failure"
    assert "another filesystem" in reply.message
    assert wait_until(lambda: loops_for(image_path(share, "two")) == [])
    unmount_and_check_gone(kubelet, pod, image_path(share, "one"))


def test_kubelet_root_behind_a_symlink(kubelet, share, tmp_path):
    # /var/lib/kubelet -> /data/kubelet is common (kubernetes#24717, #96888; the seed README's
    # own output shows both paths). Kubelet passes the path under its --root-dir as it is.
    real = tmp_path / "data-kubelet"
    real.mkdir()
    link = tmp_path / "var-lib-kubelet"
    link.symlink_to(real)
    kubelet.root = link
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share))
    assert reply.status == "Success", reply
    assert findmnt(real / reply.target.relative_to(link)) is not None
    again = kubelet.mount(pod, new_volume(share))
    assert again.status == "Success", again
    reply = kubelet.unmount(pod)  # the harness raises if the dir is still mounted
    assert reply.status == "Success", reply
    assert wait_until(lambda: not loops_for(image_path(share)))


@pytest.mark.parametrize("name", ["v o\tl", "v\nl", "v\\040l", "\udcff\udcfe", "é"],
                         ids=["blanks", "newline", "backslash", "not-utf8", "utf8"])
def test_mount_dirs_named_with_any_bytes(kubelet, share, name):
    """Names mountinfo escapes, or that no UTF-8 decoder accepts (Python: lone surrogates)."""
    pod = Pod("web")
    target = kubelet.pod_dir(pod).parent / name
    reply = kubelet.mount(pod, new_volume(share), target=target)
    assert reply.status == "Success", reply
    assert is_mount_point(target)
    again = kubelet.mount(pod, new_volume(share), target=target)
    assert again.status == "Success" and "already mounted" in again.message, again
    assert kubelet.unmount(target=target).status == "Success"
    assert_released(kubelet, share)


# -- the image vanishing under a mounted volume ---------------------------------------------------
def test_unmount_after_the_image_was_deleted(kubelet, share):
    image = image_path(share)
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share))
    device = check_mounted(reply, image, "ext4")
    image.unlink()
    assert losetup(device)["back-file"] == f"{image} (deleted)"
    reply = kubelet.unmount(pod)
    assert reply.status == "Success", reply
    assert wait_until(lambda: not loops_for(image))
    assert_released(kubelet, share)


def test_log_names_pod_volume_and_image(kubelet, share):
    pod = Pod("web", namespace="prod")
    reply = kubelet.mount(pod, new_volume(share))
    assert reply.status == "Success", reply
    unmount_and_check_gone(kubelet, pod, image_path(share))
    log = kubelet.log()
    assert str(image_path(share)) in log
    assert str(reply.target) in log
