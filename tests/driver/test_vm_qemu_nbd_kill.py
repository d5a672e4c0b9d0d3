"""The qemu-nbd driver SIGKILLed at each step of mount and unmount, then called again as kubelet
does, on the real kernel NBD of the lane's VM: the retry must succeed, the data written before
the kill must be intact, and once the volume is unmounted nothing may be left: no NBD device
connected, no server or its files, no mount, no temporary image on the share.

Unlike a loop device, what the killed call made (a server, a connected device) outlives it by
design; the next call for the image, or any unmount, must tear it down. The kills come right
after a named step (flexvolume/_faultpoint.py) or as a tool the driver runs starts (a PATH
stand-in that kills its parent, the driver): kubelet.call_killed, as in
test_flexvolume_kill.py, which covers the steps that are the same for every backend on the
host; MOUNT_STEPS says which steps run here.
"""

from __future__ import annotations

import os
import signal

import pytest

import nbd
from nbd import server

from kubelet import (Pod, assert_released, call_killed, checksum, image_path,  # noqa: F401
                     kill_mount, kubelet, make_volume, new_volume, retry_mount, run, share,
                     temp_images, wait_until, write_data)
from nbd_volumes import (DRIVER, assert_nothing_left, nbd_kubelet, ours,  # noqa: F401
                         server_files, server_pids)
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]


def connected() -> set[int]:
    return {d.index for d in nbd.connected()}


@pytest.fixture
def node(nbd_kubelet, share):
    """No NBD device connected and no server running after the test that were not before it
    (the lane runs one test at a time, so what is new is the test's). No spare server either,
    before or after: a test that wants one makes it."""
    server.stop_spares()
    devices, pids = connected(), server_pids()
    yield
    server.stop_spares()
    assert connected() - devices == set(), "an NBD device is left connected"
    assert server_pids() - pids == set(), "a server is left running"


_templates: dict[str, tuple[str, str]] = {}


def existing_volume(kubelet, share, tmp_path_factory, image_format: str) -> str:
    """Volume "test" holding data.bin, made by the driver (once per format, then copied); the
    data's sha256."""
    image = image_path(share)
    if image_format not in _templates:
        digest = make_volume(kubelet, share, driver=DRIVER, mmp="false", format=image_format)
        assert_nothing_left(share)
        copy = tmp_path_factory.mktemp("nbd-volumes") / image_format
        run("cp", "--sparse=always", image, copy)
        _templates[image_format] = (str(copy), digest)
        return digest
    copy, digest = _templates[image_format]
    image.parent.mkdir()
    run("cp", "--sparse=always", copy, image)
    return digest


def check_image(share, image_format: str) -> None:
    """The image, unmounted, is a consistent ext4 (raw) or a consistent qcow2."""
    if image_format == "raw":
        run("e2fsck", "-fn", image_path(share))
    else:
        run("qemu-img", "check", "-q", "-f", "qcow2", image_path(share))


# (format, volume) -> the steps a mount of it is killed at. Each case costs 15-30 s under TCG,
# so the steps a backend does not change run with the loop driver on the host only
# (test_flexvolume_kill.py: create, allocate, mkfs, publish-link of a new image; the blkid
# probe of a blank one), and so do "prepare" and "fs-group" of a new volume, which leave the
# same device, server and mount as "attach" and "mount" here. Every step that starts, connects
# or tears down a server or device runs here, raw; qcow2 adds the tools only it runs.
MOUNT_STEPS = {
    ("raw", "new"): ["tool:mkfs.ext4", "publish", "tool:qemu-nbd", "serve", "attach", "mount"],
    ("raw", "existing"): ["tool:fsck.ext4", "prepare", "fs-group"],
    ("raw", "blank"): ["tool:mkfs.ext4"],  # on the device, with the formatting mark set
    ("qcow2", "new"): ["tool:qemu-img:convert", "mkfs", "tool:qemu-img:info"],
    ("qcow2", "existing"): ["attach"],
}


# The steps that differ when the mount takes a spare server (nbd.server.keep_spare) instead
# of starting a qemu-nbd: its server is configured over QMP ("serve"), then connected.
SPARE_STEPS = ["serve", "attach"]


@pytest.mark.parametrize("image_format,volume,fault,spare",
                         [(*key, f, False) for key, steps in MOUNT_STEPS.items() for f in steps]
                         + [("raw", "new", f, True) for f in SPARE_STEPS])
def test_mount_killed_at_each_step_then_retried(nbd_kubelet, share, node, tmp_path,
                                                tmp_path_factory, image_format, volume, fault,
                                                spare):
    options = new_volume(share, mmp="false", format=image_format)
    if spare:
        server.keep_spare()
        assert wait_until(server.spare_ready)
    if fault == "tool:fsck.ext4":
        options["fsckOptions"] = "pf"  # e2fsck runs on a clean volume too
    digest = None
    if volume == "existing":
        digest = existing_volume(nbd_kubelet, share, tmp_path_factory, image_format)
    elif volume == "blank":
        image_path(share).parent.mkdir()
        with open(image_path(share), "xb") as f:
            f.truncate(30 << 20)
    pod = Pod("web")
    kill_mount(nbd_kubelet, tmp_path, pod, options, fault, driver=DRIVER)
    if spare:
        assert os.listdir(os.path.join(server.RUN_DIR, "spares")) == [], \
            "the killed mount did not take the spare"
    reply = retry_mount(nbd_kubelet, pod, options, fault, digest, driver=DRIVER,
                        device="/dev/nbd")
    assert len(ours(share)[0]) == 1, f"after a kill at {fault}: {ours(share)}"
    if digest is None:
        digest = write_data(reply.target)
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)
    assert_released(nbd_kubelet, share)
    assert temp_images(image_path(share).parent) == []
    check_image(share, image_format)


@pytest.mark.parametrize("image_format,fault",
                         [("raw", "unmount"), ("raw", "disconnect"), ("qcow2", "disconnect")])
def test_unmount_killed_at_each_step_then_retried(nbd_kubelet, share, node, tmp_path,
                                                  tmp_path_factory, image_format, fault):
    digest = existing_volume(nbd_kubelet, share, tmp_path_factory, image_format)
    options = new_volume(share, mmp="false", format=image_format)
    pod = Pod("web")
    reply = nbd_kubelet.mount(pod, options, driver=DRIVER)
    assert reply.status == "Success", reply
    target = reply.target
    call_killed(nbd_kubelet, tmp_path, fault, "unmount", target, driver=DRIVER)
    # kubelet retries a failed unmount until it answers Success
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)
    assert_released(nbd_kubelet, share)
    check_image(share, image_format)
    reply = nbd_kubelet.mount(pod, options, driver=DRIVER)
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_server_files_of_a_stop_killed_half_way_are_removed(nbd_kubelet, share, node, tmp_path,
                                                              tmp_path_factory):
    """server.stop() SIGTERMs the server, waits for it to end, then removes its socket, pid
    file and log. An unmount killed in between leaves the files of a dead server: this is that
    state (the device disconnected by an unmount killed at "disconnect", then its server
    stopped as that unmount did)."""
    existing_volume(nbd_kubelet, share, tmp_path_factory, "raw")
    pod = Pod("web")
    reply = nbd_kubelet.mount(pod, new_volume(share, mmp="false"), driver=DRIVER)
    assert reply.status == "Success", reply
    target = reply.target
    call_killed(nbd_kubelet, tmp_path, "disconnect", "unmount", target, driver=DRIVER)
    devices, servers = ours(share)
    assert devices == {} and len(servers) == 1
    os.kill(servers[0].pid, signal.SIGTERM)
    assert wait_until(lambda: not os.path.exists(f"/proc/{servers[0].pid}"))
    assert server_files(share), "the state under test: a dead server's files"
    assert nbd_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)

