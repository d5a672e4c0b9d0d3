"""The sheepdog driver driven exactly as kubelet calls it, on the real kernel NBD of the lane's
VM, with the real qemu-nbd server, mkfs and mount.

What cannot exist here is mocked, and only that: a sheepdog cluster, its `dog` CLI and a qemu
built with the sheepdog block driver (sheepdog is in no registry, qemu 6.0 removed the
driver). The stand-ins of sheepdog_standins.py take their place: `dog` keeps each VDI as a raw
file, and `qemu-nbd` turns the driver's ``sheepdog:ADDRESS:PORT:VDI`` into that file before
exec'ing the real qemu-nbd. So these tests check the driver's commands, its device and server
lifecycle and its filesystem flow, not sheepdog's or qemu's sheepdog code.

Teardown unmounts what a test mounted from NBD under its tmp_path, disconnects the devices of
the test's VDIs and stops their servers: nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

import nbd
from flexvolume.backends import sheepdog
from nbd import server

import sheepdog_standins
from kubelet import (MiB, Pod, checksum, findmnt, kubelet, run, share,  # noqa: F401
                     wait_until, write_data)
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]

DRIVER = "flexblock/sheepdog"
ALIAS = "kvaps/sheepdog"
PREFIX = sheepdog.FAMILY.prefix


class Cluster:
    """The stand-in cluster of one test: its VDIs' files, the PATH that finds the stand-ins."""

    def __init__(self, tmp_path):
        self.store = tmp_path / "vdis"
        self.path = sheepdog_standins.install(tmp_path / "sheepdog-bin", self.store)
        self.names: list[str] = []

    def new_name(self) -> str:
        self.names.append(f"vol-{uuid.uuid4().hex[:8]}")
        return self.names[-1]

    def idents(self) -> set[str]:
        return {sheepdog.server_ident(sheepdog.Vdi(n, sheepdog.DEFAULT_ADDRESS,
                                                   sheepdog.DEFAULT_PORT))
                for n in self.names}

    def ours(self) -> tuple[dict[int, str], list[server.Server]]:
        """Connected devices (index -> ident) and running servers of this test's VDIs."""
        idents = self.idents()
        devices = {d.index: d.backend[len(PREFIX):] for d in nbd.connected()
                   if d.backend and d.backend.startswith(PREFIX)}
        return ({i: ident for i, ident in devices.items() if ident in idents},
                [s for s in server.list_servers() if s.image_id in idents])

    def assert_nothing_left(self) -> None:
        assert wait_until(lambda: self.ours() == ({}, [])), f"left behind: {self.ours()}"

    def creates(self) -> list[list[str]]:
        return [c for c in sheepdog_standins.dog_calls(self.store) if c[:2] == ["vdi", "create"]]


@pytest.fixture
def cluster(kubelet, tmp_path):
    kubelet.install(DRIVER, ALIAS, "flexblock/qemu-nbd")
    kubelet.env["PATH"] = f"{tmp_path / 'sheepdog-bin'}:{kubelet.env['PATH']}"
    c = Cluster(tmp_path)
    yield c
    out = run("findmnt", "-J", "-l", "-o", "TARGET,SOURCE", check=False).stdout
    for m in sorted(json.loads(out or '{"filesystems": []}')["filesystems"],
                    key=lambda m: len(m["target"]), reverse=True):
        if m["source"].startswith("/dev/nbd") and m["target"].startswith(str(tmp_path)):
            subprocess.run(["umount", m["target"]], capture_output=True)
    devices, servers = c.ours()
    for index in devices:
        nbd.disconnect(index)
        nbd.wait_disconnected(index)
    for srv in servers:
        server.stop(srv)


def test_create_write_unmount_remount(kubelet, cluster):
    pod, name = Pod("web"), cluster.new_name()
    user = {"vdiname": name, "size": "64Mi", "copies": "2:1", "prealloc": "false"}
    reply = kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert reply.message.startswith(f"created VDI {name} on 127.0.0.1:7000 (ext4) on /dev/nbd")
    assert findmnt(reply.target)["source"].startswith("/dev/nbd")
    assert findmnt(reply.target)["fstype"] == "ext4"
    assert cluster.creates() == [["vdi", "create", "-c", "2:1", "-a", "127.0.0.1", "-p", "7000",
                                  name, str(64 * MiB)]]
    before = write_data(reply.target, size=4 * MiB)
    devices, servers = cluster.ours()
    assert len(devices) == 1 and len(servers) == 1
    # The server was handed the sheepdog filename (the stand-in turned it into the file).
    with open(f"/proc/{servers[0].pid}/cmdline", "rb") as f:
        assert str(cluster.store / name).encode() in f.read().split(b"\0")

    again = kubelet.mount(pod, user, driver=DRIVER)
    assert again.status == "Success" and "already mounted" in again.message
    assert len(cluster.ours()[0]) == 1

    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    assert run("blkid", "-p", "-o", "value", "-s", "TYPE", str(cluster.store / name)).stdout \
        .strip() == "ext4"

    # kvaps/sheepdog's spelling finds the same VDI with its data, and creates nothing.
    reply = kubelet.mount(pod, user, driver=ALIAS)
    assert reply.status == "Success", reply.message
    assert not reply.message.startswith("created")
    assert checksum(reply.target / "data.bin") == before
    assert len(cluster.creates()) == 1
    assert kubelet.unmount(pod, driver=ALIAS).status == "Success"
    cluster.assert_nothing_left()


def test_second_pod_is_refused_and_read_only_mount(kubelet, cluster):
    first, second, name = Pod("first"), Pod("second"), cluster.new_name()
    user = {"vdiname": name, "size": "32Mi", "prealloc": "true"}
    assert kubelet.mount(first, user, driver=DRIVER).status == "Success"
    assert cluster.creates()[0][:4] == ["vdi", "create", "-P", "-a"]
    before = write_data(kubelet.pod_dir(first, driver=DRIVER))
    refused = kubelet.mount(second, user, driver=DRIVER)
    assert refused.status == "Failure" and "in use" in refused.message
    assert kubelet.unmount(first, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()

    reply = kubelet.mount(second, {"vdiname": name}, driver=DRIVER, read_only=True)
    assert reply.status == "Success", reply.message
    assert "ro" in findmnt(reply.target)["options"].split(",")
    assert cluster.ours()[1][0].read_only
    assert checksum(reply.target / "data.bin") == before
    assert kubelet.unmount(second, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()


def test_refusals_change_nothing(kubelet, cluster):
    pod, name = Pod("web"), cluster.new_name()
    missing = kubelet.mount(pod, {"vdiname": name}, driver=DRIVER)
    assert missing.status == "Failure" and "option 'size'" in missing.message
    read_only = kubelet.mount(pod, {"vdiname": name, "size": "32Mi"}, driver=DRIVER,
                              read_only=True)
    assert read_only.status == "Failure" and "does not exist" in read_only.message
    bad = kubelet.mount(pod, {"vdiname": name, "size": "32Mi", "copies": "3:1"}, driver=DRIVER)
    assert bad.status == "Failure" and "option 'copies'" in bad.message
    assert cluster.creates() == [] and not (cluster.store / name).exists()

    # A VDI smaller than asked for is not touched.
    assert kubelet.mount(pod, {"vdiname": name, "size": "32Mi"}, driver=DRIVER).status == \
        "Success"
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    small = kubelet.mount(pod, {"vdiname": name, "size": "64Mi"}, driver=DRIVER)
    assert small.status == "Failure" and "smaller than size" in small.message

    # expandfs is refused with the way to grow (init offers no expandfs).
    assert kubelet.init(DRIVER).body["capabilities"]["requiresFSResize"] is False
    reply = kubelet.mount(pod, {"vdiname": name}, driver=DRIVER)
    assert reply.status == "Success", reply.message
    refused = kubelet.expandfs(reply.target, {"vdiname": name}, 64 * MiB, 32 * MiB,
                               driver=DRIVER)
    assert refused.status == "Failure" and "dog vdi resize" in refused.message
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()


_ORPHAN = """
import sys
from flexvolume.backends import sheepdog
sheepdog.attach(sheepdog.Vdi(sys.argv[1], "127.0.0.1", 7000), read_only=False)
import os; os.kill(os.getpid(), 9)  # killed between attach and mount: device and server stay
"""


def test_leftovers_of_a_killed_call_are_recovered(kubelet, cluster):
    pod, name = Pod("web"), cluster.new_name()
    user = {"vdiname": name, "size": "32Mi"}
    assert kubelet.mount(pod, user, driver=DRIVER).status == "Success"
    before = write_data(kubelet.pod_dir(pod, driver=DRIVER))
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"

    def leave_orphan() -> None:
        child = subprocess.run([sys.executable, "-c", _ORPHAN, name], capture_output=True,
                               env={**os.environ, "PATH": kubelet.env["PATH"]})
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert len(cluster.ours()[0]) == 1

    # The next mount of the same VDI takes over a killed call's device and server.
    leave_orphan()
    reply = kubelet.mount(pod, user, driver=DRIVER)
    assert reply.status == "Success", reply.message
    assert checksum(reply.target / "data.bin") == before
    assert len(cluster.ours()[0]) == 1
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()
    # Any unmount collects them when the VDI is never mounted again...
    leave_orphan()
    assert kubelet.unmount(pod, driver=DRIVER).status == "Success"
    cluster.assert_nothing_left()
    # ...but the qemu-nbd driver's unmount leaves the sheepdog driver's alone.
    leave_orphan()
    assert kubelet.unmount(pod, driver="flexblock/qemu-nbd").status == "Success"
    assert len(cluster.ours()[0]) == 1 and len(cluster.ours()[1]) == 1
