"""The real-kernel lane works: Debian's kernel, its modules, loop and NFS server support.

These run only inside the lane's VM (tests/vm/run.py) and are skipped elsewhere. They use the
system's tools, not flexblock's library, so that a broken library cannot break the proof that the
lane itself works.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

from vm.lane import MODULES, host_kernel, scratch, vm_only

pytestmark = [pytest.mark.vm, vm_only]


def run(*args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True,
                          **kwargs)


def test_guest_runs_debian_kernel_not_the_hosts():
    release = platform.release()
    assert release != host_kernel(), "the lane runs the host's own kernel"
    assert "Debian" in Path("/proc/version").read_text()
    modules = Path("/lib/modules") / release
    assert (modules / "modules.dep").is_file(), f"no module tree for {release} in the guest"


def test_nbd_module_loads_and_creates_devices():
    run("modprobe", "nbd")
    assert Path("/sys/module/nbd").is_dir()
    assert Path("/sys/block/nbd0").is_dir()
    assert Path("/dev/nbd0").exists()


@pytest.mark.parametrize("module", MODULES)
def test_lane_modules_are_loaded(module):
    # guest.py loaded them before pytest; modprobe again is a no-op that must succeed.
    run("modprobe", module)
    assert Path("/sys/module", module).is_dir()


def test_nfs_server_module_and_filesystem():
    run("modprobe", "nfsd")
    assert "nfsd" in Path("/proc/filesystems").read_text()
    assert Path("/proc/fs/nfsd").is_dir()


def test_scratch_is_the_guests_tmpfs(tmp_path):
    # Whether the repository is writable in the guest depends on where it lives (virtme-ng
    # overlays /tmp, where a CI clone may be): tests write only to the scratch tmpfs.
    assert tmp_path.is_relative_to(scratch())
    (tmp_path / "f").write_text("x")
    assert os.stat(scratch()).st_dev != os.stat("/").st_dev


def test_loop_device_with_ext4_roundtrip(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = run("losetup", "--find", "--show", image).stdout.strip()
    try:
        assert dev.startswith("/dev/loop")
        name = Path(dev).name
        assert Path(f"/sys/block/{name}/loop/backing_file").read_text().strip() == str(image)
        payload = os.urandom(256 * 1024)
        run("mkfs.ext4", "-q", "-F", dev)
        run("mount", "-t", "ext4", dev, mnt)
        try:
            (mnt / "data").write_bytes(payload)
            os.sync()
            run("umount", mnt)
            run("mount", "-t", "ext4", "-o", "ro", dev, mnt)  # read back from the device
            assert (mnt / "data").read_bytes() == payload
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    finally:
        run("losetup", "--detach", dev)
    # A detach is immediate unless someone (a udevd probing the device) still holds it open.
    deadline = time.monotonic() + 15
    while Path(f"/sys/block/{name}/loop/backing_file").exists():
        assert time.monotonic() < deadline, f"{dev} still bound after detach"
        time.sleep(0.05)
    assert str(mnt) not in Path("/proc/mounts").read_text()
    # And the data went through the loop device into the image file itself.
    assert payload in image.read_bytes()
