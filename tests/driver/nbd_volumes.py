"""What the qemu-nbd driver's VM-lane tests share: the driver installed under its names, and
the views of what it leaves on the node (connected NBD devices, qemu-nbd servers and their
files) that tell whether a test's volumes are all released.

The `nbd_kubelet` fixture's teardown unmounts what a test mounted from an NBD device,
disconnects every device whose backend identifier names an image under the test's share, and
stops those images' servers and, in the VM lane, the spare servers mounts left: nothing else on
the machine is touched.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import nbd
from nbd import server

from kubelet import kubelet, run, share, wait_until  # noqa: F401

DRIVER = "flexblock/qemu-nbd"
ALIAS = "kvaps/qemu-nbd"


def idents_under(root) -> set[str]:
    """The image identities (server.image_id) of every file under *root*."""
    idents = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            idents.add(f"{st.st_dev:x}-{st.st_ino:x}")
    return idents


def ours(share) -> tuple[dict[int, str], list[server.Server]]:
    """Connected devices (index -> backend) and running servers of the images under *share*."""
    idents = idents_under(share)
    devices = {d.index: d.backend for d in nbd.connected()}
    devices = {i: b for i, b in devices.items() if b and b.startswith("flexblock:")
               and b.split(":", 1)[1] in idents}
    return devices, [s for s in server.list_servers() if s.image_id in idents]


def server_files(share) -> list[str]:
    """Files in server.RUN_DIR (socket, pid file, log) of the images under *share*."""
    idents = idents_under(share)
    try:
        names = os.listdir(server.RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.rsplit(".", 1)[0] in idents)


def server_pids() -> set[int]:
    """Every NBD server process on the machine: qemu-nbd and qemu-storage-daemon (whose comm
    the kernel cuts to 15 characters), spares included."""
    pids = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8") as f:
                if f.read().strip() in ("qemu-nbd", "qemu-storage-da"):
                    pids.add(int(entry))
        except OSError:
            pass
    return pids


def assert_nothing_left(share) -> None:
    assert wait_until(lambda: ours(share) == ({}, [])), f"left behind: {ours(share)}"
    assert server_files(share) == [], f"files of stopped servers left in {server.RUN_DIR}"


def nbd_mounts() -> list[dict]:
    out = run("findmnt", "-J", "-l", "-o", "TARGET,SOURCE", check=False).stdout
    return [m for m in json.loads(out or '{"filesystems": []}')["filesystems"]
            if m["source"].startswith("/dev/nbd")]


@pytest.fixture
def nbd_kubelet(kubelet, share):
    # The session's plugin dir keeps the names once linked; an install hashes every module of
    # ours again (some 10-30 s under TCG), so only the first test pays for it.
    if not all(kubelet.executable(name).exists() for name in (DRIVER, ALIAS)):
        kubelet.install(DRIVER, ALIAS)
    yield kubelet
    for target in sorted((m["target"] for m in nbd_mounts()), key=len, reverse=True):
        if target.startswith(str(share.parent)):
            subprocess.run(["umount", target], capture_output=True)
    devices, servers = ours(share)
    for index in devices:
        nbd.disconnect(index)
        nbd.wait_disconnected(index)
    for srv in servers:
        server.stop(srv)
    if os.environ.get("FLEXBLOCK_VM_LANE") == "1":
        # The spare server a mount leaves for the next one (server.keep_spare): in the VM
        # every one of them is a test's.
        server.stop_spares()
