"""The image's runtime on a node that has no Python: installed as the DaemonSet installs it, then
called as kubelet calls it, through an upgrade and a rollback (fixtures: node.py here)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from driver.kubelet import Pod, checksum, findmnt, loops_under, write_data
from flexvolume import install

from node import (IMAGE_PREFIX, PLUGIN_DIR, Node, NodeKubelet, image_tree, node,  # noqa: F401
                  node_image)

STORE = Path(PLUGIN_DIR) / "flexblock~loop" / install.STORE


def volume(share: str, name: str) -> dict[str, str]:
    return {"share": share, "file": f"/kube-volumes/{name}", "size": "30m"}


def mount_cycle(kubelet: NodeKubelet, pod: Pod, options: dict[str, str]) -> str:
    """mount, write, unmount, mount again, read back, unmount; the data's checksum."""
    assert kubelet.mount(pod, options).status == "Success", kubelet.calls[-1]
    target = kubelet.pod_dir(pod)
    assert findmnt(target)["fstype"] == "ext4"
    digest = write_data(target)
    assert kubelet.unmount(pod).status == "Success", kubelet.calls[-1]
    assert kubelet.mount(pod, options).status == "Success", kubelet.calls[-1]
    assert checksum(target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success", kubelet.calls[-1]
    assert findmnt(target) is None and not target.exists()
    return digest


@contextlib.contextmanager
def unreachable(path: Path) -> Iterator[None]:
    """*path* renamed away meanwhile: whatever still runs cannot be using it."""
    hidden = path.with_name(f".hidden-{path.name}")
    os.rename(path, hidden)
    try:
        yield
    finally:
        os.rename(hidden, path)


def newer_image(tree: Path, directory: Path) -> Path:
    """Another image: the same tree with one more file, named by its own content."""
    newer = directory / "newer"
    shutil.copytree(tree, newer, symlinks=True)
    (newer / install.SITE / "flexblock-upgrade-test.txt").write_text("the newer image\n")
    name = install.version_name(install.tree_digest(newer, exclude=[install.MANIFEST]))
    (newer / install.MANIFEST).write_text(f'{{"version": "{name}"}}')
    return newer


def test_the_image_installs_a_driver_that_serves_a_node_without_python(node: Node, image_tree):
    assert node.pythons() == [], "the node image is meant to have no Python"
    output = node.install(image_tree)
    assert "flexblock/loop" in output
    # The image is gone again (its tree was bound at /opt/flexblock only for the install):
    # everything the driver runs is below the plugin dir.
    assert not any(node.path(IMAGE_PREFIX).iterdir())
    assert node.pythons() == []
    kubelet = NodeKubelet(node)
    for driver in install.driver_names():
        kubelet.init(driver)   # answers by the protocol (sheepdog's is a Failure on purpose)
    assert kubelet.init("flexblock/loop").status == "Success"
    share = node.share()
    mount_cycle(kubelet, Pod("web"), volume(share, "web"))
    assert loops_under(node.root) == []
    assert "mount" in kubelet.log()


def test_upgrade_swaps_every_driver_at_once_and_rollback_is_one_rename(node: Node, image_tree,
                                                                        tmp_path_factory):
    node.install(image_tree)
    store = node.path(str(STORE))
    first = os.readlink(store / install.CURRENT)
    kubelet = NodeKubelet(node)
    share = node.share()
    old_pod = Pod("mounted-before-the-upgrade")
    assert kubelet.mount(old_pod, volume(share, "old")).status == "Success", kubelet.calls[-1]

    node.install(newer_image(image_tree, tmp_path_factory.mktemp("newer-image")))
    second = os.readlink(store / install.CURRENT)
    assert second != first and os.readlink(store / install.PREVIOUS) == first
    for driver in install.driver_names():
        entry = node.path(PLUGIN_DIR) / install.driver_path("", driver)
        assert os.path.realpath(entry).startswith(str(store / second) + os.sep)
    with unreachable(store / first):
        assert kubelet.init().status == "Success"
        # The volume the first version mounted is released by the second.
        assert kubelet.unmount(old_pod).status == "Success", kubelet.calls[-1]
        mount_cycle(kubelet, Pod("after-the-upgrade"), volume(share, "new"))

    os.rename(store / install.PREVIOUS, store / install.CURRENT)   # the rollback
    assert os.readlink(store / install.CURRENT) == first
    with unreachable(store / second):
        assert kubelet.init().status == "Success"
        mount_cycle(kubelet, Pod("after-the-rollback"), volume(share, "new"))

    # The installed copy uninstalls itself; nothing of ours is left in the plugin dir.
    node.run(f"{STORE}/{install.CURRENT}/{install.CLI_SCRIPT}", "uninstall",
             "--plugin-dir", PLUGIN_DIR)
    assert os.listdir(node.path(PLUGIN_DIR)) == []
    assert loops_under(node.root) == []
