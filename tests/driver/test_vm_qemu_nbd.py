"""The qemu-nbd driver (drop-in for kvaps/qemu-nbd) driven exactly as kubelet calls it, on the
real kernel NBD of the lane's VM (the host kernel has none). Teardown: nbd_volumes.nbd_kubelet.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from kubelet import (MiB, Pod, checksum, findmnt, image_path, kubelet, new_volume,  # noqa: F401
                     run, share, write_data)
from nbd_volumes import ALIAS, DRIVER, assert_nothing_left, nbd_kubelet, ours  # noqa: F401
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]


def _qemu_img_info(path) -> dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_create_write_unmount_remount(nbd_kubelet, share, image_format):
    pod = Pod("web")
    user = new_volume(share, size="64Mi", format=image_format)
    reply = nbd_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    target = reply.target
    assert findmnt(target)["source"].startswith("/dev/nbd")
    assert findmnt(target)["fstype"] == "ext4"
    before = write_data(target, size=4 * MiB)
    info = _qemu_img_info(image_path(share))
    assert (info["format"], info["virtual-size"]) == (image_format, 64 * MiB)
    devices, servers = ours(share)
    assert len(devices) == 1 and len(servers) == 1 and servers[0].format == image_format

    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)
    if image_format == "qcow2":
        run("qemu-img", "check", "-q", "-f", "qcow2", str(image_path(share)))
    # kvaps/qemu-nbd's spelling of the same driver finds the same volume with its data.
    reply = nbd_kubelet.mount(pod, user, driver=ALIAS)
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert nbd_kubelet.unmount(pod, driver=ALIAS).status == "Success"
    assert_nothing_left(share)


def test_mount_and_unmount_are_idempotent(nbd_kubelet, share):
    pod, user = Pod("web"), new_volume(share)
    assert nbd_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    again = nbd_kubelet.mount(pod, user, driver=DRIVER)
    assert again.status == "Success" and "already mounted" in again.message
    assert len(ours(share)[0]) == 1
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_second_pod_and_loop_driver_are_refused(nbd_kubelet, share):
    first, second = Pod("first"), Pod("second")
    user = new_volume(share)
    assert nbd_kubelet.mount(first, user, driver=DRIVER).status == "Success"
    refused = nbd_kubelet.mount(second, user, driver=DRIVER)
    assert refused.status == "Failure" and "in use" in refused.message
    # The loop driver's whole-file lock conflicts with the byte the server's lock holds.
    by_loop = nbd_kubelet.mount(second, user, driver="flexblock/loop")
    assert by_loop.status == "Failure" and "in use" in by_loop.message
    assert nbd_kubelet.unmount(first, driver=DRIVER).status == "Success"
    assert_nothing_left(share)
    assert nbd_kubelet.mount(second, user, driver="flexblock/loop").status == "Success"
    assert nbd_kubelet.unmount(second, driver="flexblock/loop").status == "Success"


def test_read_only_mount(nbd_kubelet, share):
    pod, user = Pod("web"), new_volume(share)
    assert nbd_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(nbd_kubelet.pod_dir(pod, driver=DRIVER))
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    reply = nbd_kubelet.mount(pod, user, driver=DRIVER, read_only=True)
    assert reply.status == "Success", reply.message
    assert "ro" in findmnt(reply.target)["options"].split(",")
    assert ours(share)[1][0].read_only
    assert checksum(reply.target / "data.bin") == before
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


_ORPHAN = """
import os, sys
from flexvolume.backends import qemu_nbd
fd = os.open(sys.argv[1], os.O_RDWR)
qemu_nbd.attach(fd, read_only=False, lock=True)
os.kill(os.getpid(), 9)  # killed between attach and mount: device, server and lock stay
"""


def _leave_orphan(path) -> None:
    child = subprocess.run([sys.executable, "-c", _ORPHAN, str(path)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr


def test_leftovers_of_a_killed_call_are_recovered(nbd_kubelet, share):
    pod, user = Pod("web"), new_volume(share)
    assert nbd_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(nbd_kubelet.pod_dir(pod, driver=DRIVER))
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"

    # The next mount of the same image takes over a killed call's device and server.
    _leave_orphan(image_path(share))
    assert len(ours(share)[0]) == 1
    reply = nbd_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert len(ours(share)[0]) == 1
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)

    # Any unmount collects them when the pod is gone and that image is never mounted again.
    _leave_orphan(image_path(share))
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_expandfs_is_refused_with_the_way_to_grow(nbd_kubelet, share, image_format):
    assert nbd_kubelet.init(DRIVER).body["capabilities"]["requiresFSResize"] is False
    pod, user = Pod("web"), new_volume(share, format=image_format)
    reply = nbd_kubelet.mount(pod, user, driver=DRIVER)
    size = image_path(share).stat().st_size
    refused = nbd_kubelet.expandfs(reply.target, user, 64 * MiB, 30 * MiB, driver=DRIVER)
    assert refused.status == "Failure" and "qemu-img resize" in refused.message
    # A refused call changes nothing: the image keeps its size (and, raw, its volume's).
    assert image_path(share).stat().st_size == size
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_image_with_a_backing_file_is_refused(nbd_kubelet, share, tmp_path):
    # A qcow2 backing file could name any file of the node; the server runs as root.
    secret = tmp_path / "node-secret"
    secret.write_bytes(b"x" * MiB)
    path = image_path(share)
    path.parent.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(path))
    reply = nbd_kubelet.mount(Pod("web"), new_volume(share, format="qcow2"), driver=DRIVER)
    assert reply.status == "Failure" and "backing" in reply.message
    assert_nothing_left(share)

