"""A node for the deployment tests: a minimal Debian root with no Python, the image's file tree,
and kubelet calling the installed driver inside that root.

- `node_image`: Debian bookworm made by ``debootstrap --variant=minbase`` with the kernel tools
  the driver expects on a node (e2fsprogs, util-linux), cached in
  /var/lib/flexblock-deploy-test (``$FLEXBLOCK_DEPLOY_CACHE``) outside the work tree, built
  once per machine (about a minute) under a lock, in a temporary directory renamed into place.
- `image_tree`: the image's /opt/flexblock, built by deploy/bundle.py as the Dockerfile does,
  without a container engine (none runs here), from this venv; or the tree named by
  ``$FLEXBLOCK_IMAGE_TREE`` (e.g. copied out of a built image with `docker cp`).
- `node`: a fresh root per test: an overlay whose lower layer is the cached image (never
  written) and whose upper layer is under tmp_path, with /dev, /proc and /sys bound in (/dev
  read-only, so that nothing removing tmp_path can ever reach the host's device nodes).
  Teardown unmounts every bind, the shares and the overlay, and detaches the loop devices
  backed by files under tmp_path, pass or fail (tests/conftest.py's leak guard checks after).

Kubelet runs on the node (`NodeKubelet`): each call is ``chroot <root> <driver> <cmd> <args>``
with node paths, the protocol checks of tests/driver/kubelet.py unchanged. The fixtures are
imported by name into the test modules, as tests/driver/kubelet.py's are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from driver.kubelet import DRIVER, LOG_FILE_ENV, Kubelet, release_everything

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLEXBLOCK_DEPLOY_CACHE", "/var/lib/flexblock-deploy-test"))
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
NODE_PACKAGES = ("e2fsprogs", "util-linux")
IMAGE_PREFIX = "/opt/flexblock"                   # the tree's place in the image
PLUGIN_DIR = "/var/lib/kubelet/volumeplugins"     # a distribution's, not kubelet's default
NODE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 300


def run(*argv: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                            timeout=TIMEOUT, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(os.fspath, argv))}: exit {result.returncode}\n"
                             f"{result.stdout}{result.stderr}")
    return result


def _unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the deployment tests chroot and mount, and need root"
    for tool in ("debootstrap", "patchelf", "chroot", "ldd"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (make host-packages)"
    return None


@pytest.fixture(scope="session")
def node_image() -> Path:
    reason = _unusable_reason()
    if reason:
        pytest.skip(reason)
    image = CACHE / f"{SUITE}-minbase"
    if image.is_dir():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.is_dir():
            temp = Path(tempfile.mkdtemp(prefix=".new-", dir=CACHE))
            try:
                run("debootstrap", "--variant=minbase", f"--include={','.join(NODE_PACKAGES)}",
                    SUITE, temp, MIRROR)
                temp.chmod(0o755)
                os.rename(temp, image)
            finally:
                if temp.exists():
                    release_everything(temp)  # debootstrap mounts proc and sys in its target
                    shutil.rmtree(temp, ignore_errors=True)
    return image


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """The image's /opt/flexblock (the Dockerfile's last step, run here)."""
    reason = _unusable_reason()
    if reason:
        pytest.skip(reason)
    if os.environ.get("FLEXBLOCK_IMAGE_TREE"):
        return Path(os.environ["FLEXBLOCK_IMAGE_TREE"])
    tree = tmp_path_factory.mktemp("image") / "flexblock"
    run(sys.executable, REPO / "deploy" / "bundle.py", "--out", tree, "--prefix", IMAGE_PREFIX)
    return tree


def _bind(source: Path, target: Path, *, read_only: bool) -> None:
    target.mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", source, target)
    if read_only:
        run("mount", "-o", "remount,bind,ro", target)


@dataclass
class Node:
    root: Path

    def path(self, node_path: str) -> Path:
        """The host path of *node_path*."""
        return self.root / node_path.lstrip("/")

    def inside(self, host_path: str | os.PathLike) -> str:
        """The node path of *host_path* (which must be below the root)."""
        return "/" + os.path.relpath(host_path, self.root)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return run("chroot", self.root, *argv, env={"PATH": NODE_PATH, "LANG": "C.UTF-8"},
                   cwd="/")

    @contextlib.contextmanager
    def image(self, tree: Path) -> Iterator[None]:
        """The container's view: the image's tree at /opt/flexblock, read-only, while inside."""
        target = self.path(IMAGE_PREFIX)
        _bind(tree, target, read_only=True)
        try:
            yield
        finally:
            run("umount", target)

    def install(self, tree: Path) -> str:
        """What the DaemonSet's container does; its output."""
        with self.image(tree):
            return self.run(f"{IMAGE_PREFIX}/bin/flexvolume", "install",
                            "--plugin-dir", PLUGIN_DIR).stdout

    def share(self, node_path: str = "/srv/share", size: str = "256m") -> str:
        """A tmpfs standing for the shared filesystem; its node path."""
        target = self.path(node_path)
        target.mkdir(parents=True)
        run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "flexblock-node-share", target)
        return node_path

    def pythons(self) -> list[str]:
        """Every file named python* on the node, outside the plugin directory."""
        found = []
        plugins = str(self.path(PLUGIN_DIR))
        for directory, dirs, files in os.walk(self.root):
            if directory == plugins or directory.startswith(plugins + os.sep):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(directory, d))]
            found += [self.inside(os.path.join(directory, f)) for f in files
                      if f.startswith("python")]
        return found


@pytest.fixture
def node(tmp_path, node_image) -> Iterator[Node]:
    base = tmp_path.resolve()
    root, upper, work = base / "node", base / "upper", base / "work"
    for d in (root, upper, work):
        d.mkdir()
    run("mount", "-t", "overlay", "flexblock-node", "-o",
        f"lowerdir={node_image},upperdir={upper},workdir={work}", root)
    try:
        for name, read_only in (("dev", True), ("proc", False), ("sys", False)):
            _bind(Path("/") / name, root / name, read_only=read_only)
        yield Node(root)
    finally:
        problems = release_everything(base)
        assert not problems, f"node teardown: {problems}"
        # The leak guard runs `losetup -j` on every file under tmp_path: spare it the node's.
        for d in (upper, work):
            shutil.rmtree(d)


class NodeKubelet(Kubelet):
    """Kubelet on *node*: the harness's calls, each run as ``chroot <root> <driver> ...`` with
    node paths. Its directories are the node's (/var/lib/kubelet, the plugin dir)."""

    def __init__(self, node: Node):
        super().__init__(node.path("/var/lib/kubelet"), node.path(PLUGIN_DIR),
                         node.path("/var/log/flexblock.log"),
                         env={"PATH": NODE_PATH, LOG_FILE_ENV: "/var/log/flexblock.log"})
        self.node = node

    def argv(self, command: str, *args: str | os.PathLike, driver: str = DRIVER) -> list[str]:
        node_args = [self.node.inside(a) if isinstance(a, Path) else os.fspath(a) for a in args]
        return [shutil.which("chroot", path=NODE_PATH), str(self.node.root),
                self.node.inside(self.executable(driver)), command, *node_args]
