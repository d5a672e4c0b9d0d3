"""The ploop driver (drop-in for virtuozzo/ploop) driven exactly as kubelet calls it, on the
real kernel NBD of the lane's VM (no native ploop there: volumes attach through qemu-nbd).

Teardown unmounts what a test mounted and detaches every ploop volume under the test's share
(device and server): nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

import nbd
import ploop
from nbd import server
from flexvolume import _faultpoint

from helpers import image_id
from kubelet import (MiB, Kubelet, Pod, checksum, findmnt, go_json, kubelet, run,  # noqa: F401
                     share, write_data)
from nbd_volumes import nbd_mounts
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]

DRIVER = "virtuozzo/ploop"
ALIAS = "flexblock/ploop"


def _volumes(share) -> list:
    return [p for p in share.iterdir() if (p / "DiskDescriptor.xml").exists()]


def attached(share) -> list[ploop.Attachment]:
    return [a for a in map(ploop.find_attached, _volumes(share)) if a is not None]


def assert_nothing_left(share) -> None:
    assert attached(share) == []


@pytest.fixture
def ploop_kubelet(kubelet, share):
    kubelet.install(DRIVER, ALIAS)
    # A spare server another driver's mount left (in the VM every one is a test's) would serve
    # instead of the qemu-nbd the kills here wait for.
    server.stop_spares()
    yield kubelet
    for target in sorted((m["target"] for m in nbd_mounts()), key=len, reverse=True):
        if target.startswith(str(share.parent)):
            subprocess.run(["umount", target], capture_output=True)
    for directory in _volumes(share):
        ploop.detach(directory)


def seed_volume(share, name: str = "golang-ploop-test", size: str = "64M") -> dict[str, str]:
    """The seed README's pod spec options, unchanged but for the place and size."""
    return {"volumeId": name, "size": size, "volumePath": str(share)}


def test_seed_spec_create_write_unmount_remount(ploop_kubelet, share):
    pod, user = Pod("nginx-ploop"), seed_volume(share)
    reply = ploop_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert findmnt(reply.target)["source"].startswith("/dev/nbd")
    assert findmnt(reply.target)["fstype"] == "ext4"
    assert ploop.open_volume(share / "golang-ploop-test").size == 64 * MiB
    before = write_data(reply.target, size=4 * MiB)
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)
    assert ploop.image.check(ploop.open_volume(share / "golang-ploop-test").image_path).clean
    # the other name, with the seed's volumeID spelling, finds the same volume and its data
    user = {"volumeID": "golang-ploop-test", "volumePath": str(share)}
    reply = ploop_kubelet.mount(pod, user, driver=ALIAS, fs_type="ext4")
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert ploop_kubelet.unmount(pod, driver=ALIAS).status == "Success"
    assert_nothing_left(share)


def test_mount_and_unmount_are_idempotent(ploop_kubelet, share):
    pod, user = Pod("web"), seed_volume(share)
    assert ploop_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    again = ploop_kubelet.mount(pod, user, driver=DRIVER)
    assert again.status == "Success" and "already mounted" in again.message
    assert len(attached(share)) == 1
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_second_pod_is_refused(ploop_kubelet, share):
    first, second, user = Pod("first"), Pod("second"), seed_volume(share)
    assert ploop_kubelet.mount(first, user, driver=DRIVER).status == "Success"
    refused = ploop_kubelet.mount(second, user, driver=DRIVER)
    assert refused.status == "Failure" and "in use" in refused.message
    assert findmnt(ploop_kubelet.pod_dir(first, driver=DRIVER)) is not None
    assert ploop_kubelet.unmount(first, driver=DRIVER).status == "Success"
    assert ploop_kubelet.mount(second, user, driver=DRIVER).status == "Success"
    assert ploop_kubelet.unmount(second, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_read_only_mount(ploop_kubelet, share):
    pod, user = Pod("web"), seed_volume(share)
    assert ploop_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(ploop_kubelet.pod_dir(pod, driver=DRIVER))
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    reply = ploop_kubelet.mount(pod, user, driver=DRIVER, read_only=True)
    assert reply.status == "Success", reply.message
    assert "ro" in findmnt(reply.target)["options"].split(",")
    assert attached(share)[0].read_only
    assert checksum(reply.target / "data.bin") == before
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_vzs_options_without_vstorage_change_nothing(ploop_kubelet, share):
    reply = ploop_kubelet.mount(Pod("web"), {**seed_volume(share), "vzsTier": "1"},
                                driver=DRIVER)
    assert reply.status == "Failure" and "vstorage" in reply.message
    assert list(share.iterdir()) == []


_ORPHAN = """
import sys, os, ploop
ploop.create_or_open(sys.argv[1], 64 << 20)
ploop.attach(sys.argv[1])
os.kill(os.getpid(), 9)  # killed between attach and mount: device and server stay
"""


def test_leftovers_of_a_killed_call_are_recovered(ploop_kubelet, share):
    pod, user = Pod("web"), seed_volume(share)
    assert ploop_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(ploop_kubelet.pod_dir(pod, driver=DRIVER))
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"

    child = subprocess.run([sys.executable, "-c", _ORPHAN, str(share / user["volumeId"])],
                           capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(attached(share)) == 1
    reply = ploop_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert len(attached(share)) == 1
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


def test_expandfs_is_refused(ploop_kubelet, share):
    pod, user = Pod("web"), seed_volume(share)
    reply = ploop_kubelet.mount(pod, user, driver=DRIVER)
    refused = ploop_kubelet.expandfs(reply.target, user, 128 * MiB, 64 * MiB, driver=DRIVER)
    assert refused.status == "Failure" and "offline" in refused.message
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert_nothing_left(share)


# -- killed between server start, connect and mount --------------------------------------------
def qemu_nbds(ident: str) -> list[int]:
    """Every qemu-nbd process serving image *ident* (found by its socket's name), whatever
    its pid file says."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"qemu-nbd" and any(ident.encode() in a for a in argv):
            found.append(int(pid))
    return found


def nbd_devices(ident: str) -> list[int]:
    return [d.index for d in nbd.connected() if (d.backend or "").endswith(ident)]


def after_tool(tmp_path, tool: str) -> str:
    """A PATH entry where *tool* runs to its end, then SIGKILLs its parent (the driver): for
    qemu-nbd --fork, the driver dies with the server started and nothing connected to it."""
    bindir = tmp_path / f"after-{tool}"
    bindir.mkdir()
    real = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    (bindir / tool).write_text(f'#!/bin/sh\n{real} "$@"\nstatus=$?\nkill -KILL $PPID\n'
                               'exit $status\n')
    (bindir / tool).chmod(0o755)
    return f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"


def kill_mount(kubelet, tmp_path, pod, user, point: str) -> None:
    """A mount SIGKILLed at *point*: after qemu-nbd started ("qemu-nbd"), after the device
    was connected ("attach"), after the filesystem was checked, before mount(2) ("prepare")."""
    env = ({"PATH": after_tool(tmp_path, "qemu-nbd")} if point == "qemu-nbd"
           else {_faultpoint.ENV: point})
    target = kubelet.pod_dir(pod, driver=DRIVER)
    kubelet.prepare_for_mount(target)
    raw = go_json(Kubelet.options(user, pod=pod))
    proc = kubelet.spawn("mount", target, raw, driver=DRIVER, env=env)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"{point} was never reached: {output!r}"
    assert findmnt(target) is None
    os.rmdir(target)  # kubelet after a failed mount


KILL_POINTS = ["qemu-nbd", "attach", "prepare"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_unmount_of_another_volume_collects_a_killed_mounts_leftovers(ploop_kubelet, share,
                                                                      tmp_path, point):
    pod, user = Pod("web"), seed_volume(share)
    assert ploop_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(ploop_kubelet.pod_dir(pod, driver=DRIVER))
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    other, other_user = Pod("other"), seed_volume(share, "other-volume")
    assert ploop_kubelet.mount(other, other_user, driver=DRIVER).status == "Success"
    ident = image_id(ploop.open_volume(share / user["volumeId"]).image_path)

    kill_mount(ploop_kubelet, tmp_path, pod, user, point)
    assert qemu_nbds(ident), "the kill left no server: it missed its window"
    assert bool(nbd_devices(ident)) == (point != "qemu-nbd")

    assert ploop_kubelet.unmount(other, driver=DRIVER).status == "Success"
    assert qemu_nbds(ident) == [] and nbd_devices(ident) == []
    assert_nothing_left(share)
    assert ploop.image.check(ploop.open_volume(share / user["volumeId"]).image_path).clean

    reply = ploop_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert qemu_nbds(ident) == [] and nbd_devices(ident) == []
    assert_nothing_left(share)


def test_a_retry_takes_over_the_server_of_a_killed_mount(ploop_kubelet, share, tmp_path):
    pod, user = Pod("web"), seed_volume(share)
    assert ploop_kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(ploop_kubelet.pod_dir(pod, driver=DRIVER))
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    ident = image_id(ploop.open_volume(share / user["volumeId"]).image_path)
    kill_mount(ploop_kubelet, tmp_path, pod, user, "qemu-nbd")
    left = qemu_nbds(ident)
    assert len(left) == 1 and nbd_devices(ident) == []

    reply = ploop_kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert qemu_nbds(ident) == left and len(nbd_devices(ident)) == 1
    assert checksum(reply.target / "data.bin") == before
    assert ploop_kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert qemu_nbds(ident) == [] and nbd_devices(ident) == []
    assert_nothing_left(share)
