"""Two nodes, one share, for real: a kernel NFS server in the lane's VM and two NFSv4.2 clients,
each in a network namespace of its own (vm.nfs), each node's driver calls made as kubelet makes
them with `share` pointing at that node's own NFS mount.

The server's NFSv4 lease is set to its minimum (10 s, the kernel's default is 90 s) so that the
dead-node test waits out one lease in reasonable time; nothing else depends on it.
"""

import os
import subprocess
import time

import pytest

import loopctl
import ploop
from kubelet import (DRIVER, KiB, Kubelet, Pod, checksum, findmnt, image_path, loops_for,
                     new_volume, release_everything, wait_until, write_data)
from test_flexvolume_mount import check_mounted, unmount_and_check_gone
from vm import nfs
from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]

LEASE = 10  # seconds; nfsd's minimum


@pytest.fixture
def nodes(tmp_path):
    """[(node, kubelet)] for node-a and node-b: each kubelet has its own root, the driver is
    installed once. Teardown releases every pod volume and loop device, then the cluster."""
    root = tmp_path.resolve()
    with nfs.cluster(root, lease_seconds=LEASE) as cluster:
        kubelets = [Kubelet(root / "kubelet" / n.name, root / "plugins", root / f"{n.name}.log")
                    for n in cluster.nodes]
        kubelets[0].install(DRIVER)
        for k in kubelets:
            k.root.mkdir(parents=True)
        try:
            yield list(zip(cluster.nodes, kubelets))
        finally:
            for node in cluster.nodes:
                node.restore()
            problems = release_everything(root / "kubelet")
            for node in cluster.nodes:
                problems += release_everything(node.mount, node.mount)
            if problems:
                pytest.fail("teardown could not release: " + "; ".join(problems))


def test_nodes_are_two_nfs_clients(nodes):
    (a, _), (b, _) = nodes
    # Two NFSv4 clients to the server, one identity each (from the node's hostname).
    assert sorted(nfs.clients()) == [f"Linux NFSv4.2 {n.name}" for n in (a, b)]
    for node in (a, b):
        mount = findmnt(node.mount)
        assert mount["fstype"] == "nfs4" and "vers=4.2" in mount["options"]
    (a.mount / "hello").write_text("from a")
    assert (b.mount / "hello").read_text() == "from a"


def test_the_lock_refuses_the_second_node_at_once(nodes):
    (a, ka), (b, kb) = nodes
    pod_a, pod_b = Pod("on-a"), Pod("on-b")
    reply = ka.mount(pod_a, new_volume(a.mount, size="64Mi"), fs_type="ext4")
    check_mounted(reply, image_path(a.mount), "ext4")  # the NFS mount is accepted as a share
    digest = write_data(reply.target)

    reply = kb.mount(pod_b, new_volume(b.mount, size="64Mi"), fs_type="ext4")
    assert reply.status == "Failure", reply
    assert "in use" in reply.message
    assert findmnt(kb.pod_dir(pod_b)) is None and not loops_for(image_path(b.mount))
    # The lock alone, through node B's client: one LOCK round trip to the server.
    fd = os.open(image_path(b.mount), os.O_RDWR | os.O_CLOEXEC)
    try:
        started = time.perf_counter()
        with pytest.raises(loopctl.ImageBusy):
            loopctl.lock_image(fd, path=str(image_path(b.mount)))
        lock_ms = (time.perf_counter() - started) * 1000
    finally:
        os.close(fd)
    print(f"node B refused: driver call {reply.seconds * 1000:.0f} ms (interpreter start "
          f"included), the lock itself {lock_ms:.1f} ms")
    assert lock_ms < 200  # the bound; a LOCK round trip takes a few ms even under TCG

    unmount_and_check_gone(ka, pod_a, image_path(a.mount))
    reply = kb.mount(pod_b, new_volume(b.mount, size="64Mi"), fs_type="ext4")
    check_mounted(reply, image_path(b.mount), "ext4")
    assert checksum(reply.target / "data.bin") == digest
    unmount_and_check_gone(kb, pod_b, image_path(b.mount))


@pytest.mark.slow
def test_mmp_refuses_the_second_node_when_the_lock_is_off(nodes):
    """As on a share whose locks do not reach the other node. MMP's heartbeat must reach the
    server for node B to see it, whatever node A's NFS client caches."""
    (a, ka), (b, kb) = nodes
    pod_a, pod_b = Pod("on-a"), Pod("on-b")
    reply = ka.mount(pod_a, new_volume(a.mount, size="64Mi", lock="false"), fs_type="ext4")
    check_mounted(reply, image_path(a.mount), "ext4")
    digest = write_data(reply.target, size=64 * KiB)

    reply = kb.mount(pod_b, new_volume(b.mount, size="64Mi", lock="false"), fs_type="ext4")
    print(f"node B without the lock refused by MMP after {reply.seconds:.1f} s: "
          f"{reply.message}")
    assert reply.status == "Failure", reply
    assert findmnt(kb.pod_dir(pod_b)) is None
    assert wait_until(lambda: not loops_for(image_path(b.mount)))

    unmount_and_check_gone(ka, pod_a, image_path(a.mount))
    reply = kb.mount(pod_b, new_volume(b.mount, size="64Mi", lock="false"), fs_type="ext4")
    check_mounted(reply, image_path(b.mount), "ext4")
    assert checksum(reply.target / "data.bin") == digest
    unmount_and_check_gone(kb, pod_b, image_path(b.mount))
    result = subprocess.run(["e2fsck", "-fn", image_path(a.mount)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_dead_nodes_lock_is_freed_after_the_lease(nodes):
    """Node A's cable is pulled while it holds the volume's image lock: the server keeps A's
    lock until A's lease runs out, then node B can take the volume over, with A's data.

    Node A holds the image through a bare loop device with the driver's lock, not a mounted
    ext4: once its cable is back, its NFS client finds the lock lost and fails every write
    with EIO, and unmounting an ext4 whose journal then aborts hung Debian's 6.1 kernel
    (a soft lockup in jbd2_journal_abort under ext4_put_super) in one of our runs."""
    (a, ka), (b, kb) = nodes
    pod_a, pod_b = Pod("on-a"), Pod("on-b")
    reply = ka.mount(pod_a, new_volume(a.mount, size="64Mi"), fs_type="ext4")
    check_mounted(reply, image_path(a.mount), "ext4")
    digest = write_data(reply.target)
    unmount_and_check_gone(ka, pod_a, image_path(a.mount))
    held = loopctl.attach(image_path(a.mount), autoclear=True, lock=True)
    try:
        with a.cut():
            cut = time.monotonic()
            fd = os.open(image_path(b.mount), os.O_RDWR | os.O_CLOEXEC)
            try:
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        loopctl.lock_image(fd, path=str(image_path(b.mount)))
                        break
                    except loopctl.ImageBusy:
                        assert time.monotonic() - cut < 4 * LEASE, "the lock outlived 4 leases"
                        time.sleep(0.2)
                delay = time.monotonic() - cut
            finally:
                os.close(fd)  # node B lets go again
            print(f"node A cut off: node B got the lock after {delay:.1f} s ({attempts} "
                  f"attempts; lease {LEASE} s)")
            assert delay >= LEASE * 0.8  # not before the lease ran out

            reply = kb.mount(pod_b, new_volume(b.mount, size="64Mi"), fs_type="ext4")
            print(f"node B took the volume over in {reply.seconds:.1f} s")
            check_mounted(reply, image_path(b.mount), "ext4")
            assert checksum(reply.target / "data.bin") == digest
            unmount_and_check_gone(kb, pod_b, image_path(b.mount))
    finally:
        held.close()  # node A back: autoclear unbinds its device
    assert wait_until(lambda: not loops_for(image_path(a.mount)), 60)


PLOOP = "virtuozzo/ploop"


def test_a_ploop_volume_is_refused_on_the_second_node(nodes):
    """The ploop driver on two nodes: node A's qemu-nbd serves the volume's image; node B's
    mount of the same volume (through its own NFS client) must fail at once, and succeed
    with A's data once A has unmounted."""
    (a, ka), (b, kb) = nodes
    ka.install(PLOOP)
    pod_a, pod_b = Pod("on-a"), Pod("on-b")
    try:
        reply = ka.mount(pod_a, {"volumeId": "vol", "size": "64Mi", "volumePath": str(a.mount)},
                         driver=PLOOP)
        assert reply.status == "Success", reply.message
        digest = write_data(reply.target)

        reply = kb.mount(pod_b, {"volumeId": "vol", "volumePath": str(b.mount)}, driver=PLOOP)
        print(f"node B's ploop mount answered in {reply.seconds:.1f} s: {reply.message}")
        assert reply.status == "Failure", reply
        assert "in use" in reply.message
        assert findmnt(kb.pod_dir(pod_b, driver=PLOOP)) is None
        assert ploop.find_attached(b.mount / "vol") is None
        assert reply.seconds < 20  # refused, not waited out (the interpreter starts under TCG)
        # What refuses it: a lock conflicting with node A's qemu-nbd's, through B's client.
        image = ploop.open_volume(b.mount / "vol").image_path
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            started = time.perf_counter()
            with pytest.raises(ploop.ImageBusy):
                ploop.image.lock(fd, image)
            lock_ms = (time.perf_counter() - started) * 1000
        finally:
            os.close(fd)
        print(f"the lock test itself: {lock_ms:.1f} ms")
        assert lock_ms < 200

        assert ka.unmount(pod_a, driver=PLOOP).status == "Success"
        assert ploop.find_attached(a.mount / "vol") is None
        reply = kb.mount(pod_b, {"volumeId": "vol", "volumePath": str(b.mount)}, driver=PLOOP)
        assert reply.status == "Success", reply.message
        assert checksum(reply.target / "data.bin") == digest
        assert kb.unmount(pod_b, driver=PLOOP).status == "Success"
        assert ploop.find_attached(b.mount / "vol") is None
    finally:
        for kubelet, pod, node in ((ka, pod_a, a), (kb, pod_b, b)):
            subprocess.run(["umount", kubelet.pod_dir(pod, driver=PLOOP)], capture_output=True)
            if (node.mount / "vol" / "DiskDescriptor.xml").exists():
                ploop.detach(node.mount / "vol")
