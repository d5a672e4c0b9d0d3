"""Driver call latency, side by side with its references in one run (not a test).

- `init` against the bare interpreter start (`python -I -S -c pass`, the same interpreter).
  Target: init <= 1.5x the bare start.
- `init` of the image's runtime (deploy/bundle.py: its own interpreter, loader and libraries,
  installed into a plugin dir of its own), against the pip-installed driver's `init`.
- A mount+unmount cycle of an existing 1 GiB ext4 volume through the installed driver, called
  as kubelet does, against the seed driver's command sequence (bench/seed_reference.sh: the jq
  reads, checks and `mount -o loop` kvaps/loop runs). Target: <= 0.35x the seed (which measured
  222 ms per cycle on this machine kind).

Calls are interleaved round by round so that machine noise hits every method alike; medians
are reported. Run as root: `make bench`, or `.venv/bin/python bench/driver_latency.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from flexvolume import install, mounts
from flexvolume.demo import cleanup

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_REFERENCE = os.path.join(HERE, "seed_reference.sh")
SEED_MEASURED_MS = 222.0


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0 or b'"Success"' not in result.stdout and argv[-1] != "pass":
        raise SystemExit(f"{' '.join(argv[:2])} failed: {result.stdout.decode()}")
    return elapsed


def _install_bundle(work: str) -> str | None:
    """The image's runtime, built and installed under work; its flexblock/loop executable."""
    if shutil.which("patchelf") is None:
        return None
    tree = os.path.join(work, "image")
    subprocess.run([sys.executable, os.path.join(HERE, "..", "deploy", "bundle.py"),
                    "--out", tree], check=True, stdout=subprocess.DEVNULL)
    plugins = os.path.join(work, "plugins-image")
    subprocess.run([os.path.join(tree, install.CLI_SCRIPT), "install", "--plugin-dir", plugins],
                   check=True, stdout=subprocess.DEVNULL)
    return install.driver_path(plugins, "flexblock/loop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="flexblock-bench-driver-")
    try:
        share = os.path.join(work, "share")
        pod = os.path.join(work, "pod")
        os.makedirs(share)
        os.makedirs(pod, 0o750)
        mounts.mount("tmpfs", share, "tmpfs", 0, "size=1200m")
        installed = install.install(os.path.join(work, "plugins"), ["kvaps/loop"])
        driver = installed.drivers["kvaps/loop"]
        bundled = _install_bundle(work)
        env = {**os.environ, "FLEXBLOCK_LOG_FILE": os.path.join(work, "driver.log")}
        options = json.dumps({"file": "/kube-volumes/bench", "kubernetes.io/fsType": "ext4",
                              "kubernetes.io/readwrite": "rw", "share": share, "size": "1Gi"},
                             sort_keys=True, separators=(",", ":"))
        _timed([driver, "mount", pod, options], env)  # creates and formats the volume
        _timed([driver, "unmount", pod], env)

        samples: dict[str, list[float]] = {"bare": [], "init": [], "bundled": [], "cycle": [],
                                           "seed": []}
        have_jq = shutil.which("jq") is not None
        for _ in range(args.rounds):
            samples["bare"].append(_timed([sys.executable, "-I", "-S", "-c", "pass"]))
            samples["init"].append(_timed([driver, "init"], env))
            if bundled:
                samples["bundled"].append(_timed([bundled, "init"], env))
            samples["cycle"].append(_timed([driver, "mount", pod, options], env)
                                    + _timed([driver, "unmount", pod], env))
            if have_jq:
                samples["seed"].append(_timed([SEED_REFERENCE, "mount", pod, options])
                                       + _timed([SEED_REFERENCE, "unmount", pod]))
        median = {k: statistics.median(v) for k, v in samples.items() if v}
    finally:
        cleanup(work)

    print(f"driver call latency, median of {args.rounds} interleaved rounds (ms)")
    print(f"  bare interpreter start   {median['bare']:8.1f}")
    print(f"  init                     {median['init']:8.1f}   "
          f"{median['init'] / median['bare']:.2f}x bare (target <= 1.5x)")
    if "bundled" in median:
        print(f"  init, image's runtime    {median['bundled']:8.1f}   "
              f"{median['bundled'] / median['init']:.2f}x the pip install's init")
    else:
        print("  init, image's runtime: patchelf is not installed, skipped")
    print(f"  mount+unmount, 1 GiB     {median['cycle']:8.1f}")
    if "seed" in median:
        print(f"  seed's commands, same    {median['seed']:8.1f}   driver = "
              f"{median['cycle'] / median['seed']:.2f}x seed (target <= 0.35x)")
    else:
        print("  seed's commands: jq is not installed, reference skipped")
    print(f"  vs the seed's measured {SEED_MEASURED_MS:.0f} ms: "
          f"{median['cycle'] / SEED_MEASURED_MS:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"median_ms": median, "rounds": args.rounds}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
