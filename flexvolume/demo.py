"""`make run`: the driver end to end, called exactly as kubelet calls it.

A tmpfs plays the shared filesystem; the driver is installed into a temporary plugin directory;
two "pods" use one volume in turn; everything is removed at the end, whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import loopctl

from . import install, mounts

DRIVER = "kvaps/loop"  # the seed's name: its pod specs work unchanged
POD_UID = "7c0a1f7e-1111-4222-8333-944455556666"


def kubelet_json(options: dict[str, str]) -> str:
    """Options the way kubelet serialises them (Go's json.Marshal of a map[string]string)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class Kubelet:
    def __init__(self, plugin_dir: str, driver: str, kubelet_root: str):
        vendor, name = driver.split("/")
        self.executable = os.path.join(plugin_dir, f"{vendor}~{name}", name)
        self.driver_dir = f"{vendor}~{name}"
        self.root = kubelet_root

    def call(self, *args: str) -> dict:
        started = time.perf_counter()
        out = subprocess.run([self.executable, *args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
        elapsed = (time.perf_counter() - started) * 1000
        reply = json.loads(out)  # kubelet's rule: the combined output is one JSON value
        shown = " ".join(a if len(a) < 60 else a[:57] + "..." for a in args)
        print(f"  {elapsed:7.1f} ms  {shown}\n             -> {json.dumps(reply)}")
        return reply

    def pod_dir(self, pod: str, volume: str) -> str:
        return os.path.join(self.root, "pods", pod, "volumes", self.driver_dir, volume)

    def mount(self, pod: str, volume: str, user_options: dict[str, str],
              read_only: bool = False) -> str:
        path = self.pod_dir(pod, volume)
        os.makedirs(path, 0o750, exist_ok=True)  # kubelet's prepareForMount
        options = {"kubernetes.io/fsType": "ext4", "kubernetes.io/pod.name": "web",
                   "kubernetes.io/pod.namespace": "default", "kubernetes.io/pod.uid": pod,
                   "kubernetes.io/pvOrVolumeName": volume,
                   "kubernetes.io/readwrite": "ro" if read_only else "rw",
                   "kubernetes.io/serviceAccount.name": "default", **user_options}
        reply = self.call("mount", path, kubelet_json(options))
        if reply["status"] != "Success":
            os.rmdir(path)  # as kubelet does after a failed mount
            raise SystemExit(f"mount failed: {reply.get('message')}")
        return path

    def unmount(self, path: str) -> None:
        if self.call("unmount", path)["status"] != "Success":
            raise SystemExit("unmount failed")
        os.rmdir(path)


CAP_SYS_RESOURCE = 24


def _has_capability(bit: int) -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _write_files(root: str, count: int) -> str:
    digest = hashlib.sha256()
    for i in range(count):
        directory = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(directory, exist_ok=True)
        data = f"file {i}\n".encode() * 10
        with open(os.path.join(directory, f"f{i:05d}"), "wb") as f:
            f.write(data)
        digest.update(data)
    return digest.hexdigest()


def _read_files(root: str, count: int) -> str:
    digest = hashlib.sha256()
    for i in range(count):
        with open(os.path.join(root, f"d{i % 20:02d}", f"f{i:05d}"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def cleanup(work: str) -> None:
    """Undo whatever the demo left: mounts below *work* (deepest first), then loop devices
    whose image lives there, then the work directory."""
    for entry in sorted(mounts.mount_table(), key=lambda e: -len(e.mount_point)):
        if entry.mount_point.startswith(work + "/"):
            mounts.unmount(entry.mount_point)
    for device in loopctl.list_devices():
        if (device.backing_file or "").startswith(work + "/"):
            device.detach()
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo attaches loop devices and mounts filesystems: run it as root")
        return 1
    work = tempfile.mkdtemp(prefix="flexblock-demo-")
    try:
        share = os.path.join(work, "share")
        os.mkdir(share)
        mounts.mount("tmpfs", share, "tmpfs", 0, "size=1g")
        plugin_dir = os.path.join(work, "volume-plugins")
        for path in install.install(plugin_dir, ["flexblock/loop", DRIVER]).drivers.values():
            print(f"installed {path}")
        os.environ["FLEXBLOCK_LOG_FILE"] = os.path.join(work, "flexblock.log")
        kubelet = Kubelet(plugin_dir, DRIVER, os.path.join(work, "kubelet"))
        volume = {"share": share, "file": "/kube-volumes/test", "size": "256Mi"}

        print(f"\nkubelet calls {kubelet.executable}:")
        kubelet.call("init")
        first = kubelet.mount(POD_UID, "data", volume)
        checksum = _write_files(first, 2000)
        print(f"  pod 1 wrote 2000 small files into {first}")
        if _has_capability(CAP_SYS_RESOURCE):
            kubelet.call("expandfs", kubelet_json({**volume, "kubernetes.io/readwrite": "rw"}),
                         "", first, str(512 << 20), str(256 << 20))
        else:
            print("  (expandfs skipped: this machine withholds CAP_SYS_RESOURCE, which ext4's "
                  "online resize needs)")
        kubelet.unmount(first)

        second = kubelet.mount("0b5e2d4c-aaaa-4bbb-8ccc-ddddeeeeffff", "data", volume,
                               read_only=True)
        same = _read_files(second, 2000) == checksum
        print(f"  pod 2 read them back read-only: {'identical' if same else 'DIFFERENT'}")
        kubelet.unmount(second)
        image = os.path.join(share, "kube-volumes", "test")
        used = os.stat(image).st_blocks * 512
        print(f"\nimage {image}: {os.path.getsize(image) >> 20} MiB, {used >> 20} MiB allocated")
        print(f"log ({os.environ['FLEXBLOCK_LOG_FILE']}):")
        with open(os.environ["FLEXBLOCK_LOG_FILE"], encoding="utf-8") as log:
            sys.stdout.write("".join(f"  {line}" for line in log))
        return 0 if same else 1
    finally:
        cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
