"""NBD connect latency, in the real-kernel lane (the host has no NBD), side by side in one run.

- Library connect (handshake + netlink CONNECT + device ready) against `nbd-client -u`, both to
  one qemu-nbd server. Target: <= 0.3x nbd-client.
- Full backend attach (the FlexVolume qemu-nbd backend's attach: per-image claim, leftover
  check, image lock, server start, library connect) against `qemu-nbd -c`.
  Target: <= 0.7x qemu-nbd -c. Timed with a spare server ready, as every mount of the driver
  leaves one for the next (nbd.server.keep_spare), and cold, without one (a node's first
  mount, or mounts closer together than a spare's start).

Disconnects and server stops are not timed. Rounds are interleaved, medians reported; under TCG
every figure is inflated, only the ratios mean something.

    .venv/bin/python tests/vm/run.py --script bench/nbd_connect.py [--rounds N]   (as root)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import nbd
from flexvolume.backends import qemu_nbd
from nbd import control, server


def _free_index() -> int:
    return next(s.index for s in control.status() if not s.connected)


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if os.environ.get("FLEXBLOCK_VM_LANE") != "1":
        print("run this in the VM lane: tests/vm/run.py --script bench/nbd_connect.py")
        return 2
    work = tempfile.mkdtemp(prefix="nbd-bench-")
    server.RUN_DIR = os.path.join(work, "run")
    image = os.path.join(work, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, "256M"], check=True)
    fd = os.open(image, os.O_RDWR)
    shared = server.start(fd)
    samples: dict[str, list[float]] = {
        k: [] for k in ("lib", "nbd-client", "backend", "backend-cold", "qemu-c")}
    try:
        for _ in range(args.rounds):
            connected: list[nbd.DeviceInfo] = []
            samples["lib"].append(_timed(
                lambda: connected.append(nbd.attach(shared.socket_path)[0])))
            nbd.disconnect(connected[0].index)
            nbd.wait_disconnected(connected[0].index)

            device = f"/dev/nbd{_free_index()}"
            samples["nbd-client"].append(_timed(lambda: subprocess.run(
                ["nbd-client", "-u", shared.socket_path, device, "-b", "512"], check=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            subprocess.run(["nbd-client", "-d", device], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            nbd.wait_disconnected(int(device.removeprefix("/dev/nbd")))

            server.stop(shared)
            server.keep_spare()
            deadline = time.monotonic() + 30
            while not server.spare_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            for kind in ("backend", "backend-cold"):
                started: list = []
                samples[kind].append(_timed(lambda: started.append(
                    qemu_nbd.attach(fd, read_only=False, lock=True))))
                started[0].detach()
                server.stop_spares()

            device = f"/dev/nbd{_free_index()}"
            samples["qemu-c"].append(_timed(lambda: subprocess.run(
                ["qemu-nbd", "-c", device, "-f", "raw", image], check=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            subprocess.run(["qemu-nbd", "-d", device], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            index = int(device.removeprefix("/dev/nbd"))
            deadline = time.monotonic() + 30
            while control.info(index).pid is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            shared = server.start(fd)
    finally:
        found = server.find(fd)
        if found is not None:
            server.stop(found)
        server.stop_spares()
        os.close(fd)
        subprocess.run(["rm", "-rf", work])
    median = {k: statistics.median(v) for k, v in samples.items()}
    print(f"NBD connect latency under TCG, median of {args.rounds} interleaved rounds (ms)")
    print(f"  library connect        {median['lib']:8.1f}   "
          f"{median['lib'] / median['nbd-client']:.2f}x nbd-client (target <= 0.3x)")
    print(f"  nbd-client -u          {median['nbd-client']:8.1f}")
    print(f"  qemu-nbd backend       {median['backend']:8.1f}   "  # a spare server ready
          f"{median['backend'] / median['qemu-c']:.2f}x qemu-nbd -c (target <= 0.7x)")
    print(f"  qemu-nbd backend, cold {median['backend-cold']:8.1f}   "
          f"{median['backend-cold'] / median['qemu-c']:.2f}x qemu-nbd -c (no spare server)")
    print(f"  qemu-nbd -c            {median['qemu-c']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
