"""ploop image operations against qemu-img's, side by side in one run (host; no devices).

- create: `ploop init -s 1T` (our command, which also writes DiskDescriptor.xml) against
  `qemu-img create -f parallels ... 1T`.
- check: `ploop check` against `qemu-img check -f parallels` on a 1 TiB image with 4096
  clusters allocated all over it (a 4 MiB BAT), and our check in-process.

Rounds are interleaved, medians reported; only the ratios mean anything across machines.

    .venv/bin/python bench/ploop_format.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ploop import image

TiB = 1 << 40
MiB = 1 << 20


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _populated(path: str) -> None:
    """A 1 TiB image with 4096 clusters written at random places (qemu's allocation order)."""
    image.create(path, TiB)
    rng = random.Random(5)
    with image.Image(path, writable=True) as img:
        for index in rng.sample(range(TiB // MiB), 4096):
            img.write(index * MiB, b"\x01" * 512)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    ploop_cli = os.path.join(os.path.dirname(sys.executable), "ploop")
    work = tempfile.mkdtemp(prefix="ploop-bench-")
    try:
        times: dict[str, list[float]] = {k: [] for k in (
            "ploop init", "qemu-img create", "ploop check", "qemu-img check", "image.check()")}
        checked = os.path.join(work, "checked.hds")
        _populated(checked)
        for n in range(args.rounds):
            ours, theirs = os.path.join(work, f"v{n}", "root.hds"), os.path.join(work, f"q{n}")
            times["ploop init"].append(_timed(lambda: _run(ploop_cli, "init", "-s", "1T", ours)))
            times["qemu-img create"].append(_timed(lambda: _run(
                "qemu-img", "create", "-q", "-f", "parallels", theirs, "1T")))
            times["ploop check"].append(_timed(lambda: _run(ploop_cli, "check", checked)))
            times["qemu-img check"].append(_timed(lambda: _run(
                "qemu-img", "check", "-f", "parallels", checked)))
            times["image.check()"].append(_timed(lambda: image.check(checked)))
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'operation':<18} {'median ms':>10}  ratio")
        for ours, theirs in (("ploop init", "qemu-img create"), ("ploop check", "qemu-img check"),
                             ("image.check()", "qemu-img check")):
            print(f"{theirs:<18} {median[theirs]:>10.1f}  1.00x")
            print(f"{ours:<18} {median[ours]:>10.1f}  {median[ours] / median[theirs]:.2f}x")
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
