"""Small files on plain NFS against a flexblock volume on the same NFS, in the real-kernel lane.

Why the project exists, measured: N small files (spread over directories) are created, stat'ed,
read back and walked, once in a plain directory of an NFSv4.2 mount and once inside a volume
whose image lives on that same mount, mounted through the installed driver called as kubelet
calls it. Caches are dropped before every phase, so stat, read and walk start cold. Per phase:
the NFS RPCs the client sent (/proc/net/rpc/nfs, read in the client's network namespace), the
bytes the server was sent to write (/proc/net/rpc/nfsd) and the wall time, with a netem delay on
both ends of the client's veth. Then the cost side: the image's space on the share against the
files' size, and the attach+mount time the driver adds to a pod start.

    make bench-nfs          (the table on stdout; bench/nfs_small_files.{png,json})
    .venv/bin/python tests/vm/run.py --output bench --script bench/nfs_small_files.py \\
        [-- --files N --dirs D --size BYTES --delay-us US --backends loop ...]

RPC counts are the headline; times are indicative only (TCG emulates every instruction).
The server and client are the lane's vm.nfs cluster (tests/vm/nfs.py); the kubelet stand-in is
the driver tests' (tests/driver/kubelet.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

from nbd import server

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "driver")]
from kubelet import Kubelet, Pod, release_everything  # noqa: E402
from vm import nfs  # noqa: E402

PHASES = ("create", "stat", "read", "walk")
WARM_UP_FILES = 300


class Backend(NamedTuple):
    driver: str                  # the name the driver is installed and called under
    options: dict[str, str]      # user options beyond share, file and size


# One column per backend in the report.
BACKENDS = {
    "loop": Backend("flexblock/loop", {}),
    # Without the image lock the driver attaches with direct I/O, so that MMP works across nodes.
    "loop-nolock": Backend("flexblock/loop", {"lock": "false"}),
    "qemu-nbd-raw": Backend("flexblock/qemu-nbd", {"format": "raw"}),
    "qemu-nbd-qcow2": Backend("flexblock/qemu-nbd", {"format": "qcow2"}),
}


class Phase(NamedTuple):
    seconds: float
    rpcs: int
    written: int                 # bytes sent to the server to write
    ops: dict[str, int]          # the RPCs through the mount, by operation


def payload(index: int, size: int) -> bytes:
    stamp = f"{index:08d}".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


def file_paths(top: Path, files: int, dirs: int) -> list[Path]:
    return [top / f"d{i % dirs:04d}" / f"f{i:07d}" for i in range(files)]


def create(top: Path, paths: list[Path], size: int) -> None:
    for d in sorted({p.parent for p in paths}):
        d.mkdir(parents=True)
    for i, path in enumerate(paths):
        with open(path, "wb") as f:
            f.write(payload(i, size))
    os.sync()  # a volume's files count once they are on the share, as a plain NFS file's do


def stat_all(paths: list[Path]) -> None:
    for path in paths:
        os.stat(path)


def read_all(paths: list[Path], size: int) -> None:
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            if f.read() != payload(i, size):
                raise SystemExit(f"{path} does not hold what was written")


def walk(top: Path, files: int) -> None:
    seen = 0
    for directory, _, names in os.walk(top):
        for name in names:
            os.lstat(os.path.join(directory, name))
            seen += 1
    if seen != files:
        raise SystemExit(f"walked {seen} files under {top}, created {files}")


def measure(node: nfs.Node, work: Callable[[], None]) -> Phase:
    rpcs, written, ops = node.rpc_calls(), nfs.Cluster.server_io().written, node.op_counts()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    after = node.op_counts()
    return Phase(seconds, node.rpc_calls() - rpcs, nfs.Cluster.server_io().written - written,
                 {op: n - ops.get(op, 0) for op, n in after.items() if n > ops.get(op, 0)})


def workload(node: nfs.Node, top: Path, args, cold: Callable[[], None]) -> dict[str, Phase]:
    """The four phases; *cold* runs before each but the first, which follows a fresh mount."""
    paths = file_paths(top, args.files, args.dirs)
    work = {"create": lambda: create(top, paths, args.size),
            "stat": lambda: stat_all(paths),
            "read": lambda: read_all(paths, args.size),
            "walk": lambda: walk(top, args.files)}
    phases = {}
    for phase in PHASES:
        if phase != "create":
            cold()
        phases[phase] = measure(node, work[phase])
    return phases


def _devno(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def allocated(path: Path) -> int:
    """Bytes allocated to *path* and everything below it (the server's view: its tmpfs)."""
    total = os.lstat(path).st_blocks * 512
    for directory, dirnames, names in os.walk(path):
        for name in dirnames + names:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def volume_size(files: int, size: int) -> int:
    """Room for the files with ext4's 4 KiB blocks and inodes, twice over; 128 MiB at least."""
    return max(128 << 20, -(-files * (size + 8192) * 2 // (1 << 20)) << 20)


def run_backend(name: str, backend: Backend, kubelet: Kubelet, node: nfs.Node,
                cluster: nfs.Cluster, args) -> dict:
    user = {"share": str(node.mount), "file": f"/kube-volumes/bench-{name}",
            "size": str(volume_size(args.files, args.size)), **backend.options}
    pod = Pod(f"bench-{name}")

    def pod_start() -> Phase:
        reply = []
        phase = measure(node, lambda: reply.append(
            kubelet.mount(pod, user, fs_type="ext4", driver=backend.driver)))
        if reply[0].status != "Success":
            raise SystemExit(f"{name}: mount failed: {reply[0]}")
        return phase

    def pod_stop() -> None:
        reply = kubelet.unmount(pod, driver=backend.driver)
        if reply.status != "Success":
            raise SystemExit(f"{name}: unmount failed: {reply}")

    starts = []

    def restart() -> None:
        # Cold: the volume's caches (jbd2 keeps metadata buffers that drop_caches cannot
        # drop) go with an unmount; the pod starts again, as on another node.
        pod_stop()
        starts.append(pod_start())
        nfs.drop_caches()

    nfs.drop_caches()
    first = pod_start()  # creates and formats the image
    target = kubelet.pod_dir(pod, driver=backend.driver)
    device = os.path.basename(os.path.realpath(f"/sys/dev/block/{_devno(target)}"))
    direct_io = Path(f"/sys/block/{device}/loop/dio").read_text().strip() == "1" \
        if device.startswith("loop") else None
    phases = workload(node, target / "bench", args, restart)
    pod_stop()
    image = cluster.export / "kube-volumes" / f"bench-{name}"
    return {"phases": phases, "first_mount": first, "pod_starts": starts, "device": device,
            "direct_io": direct_io,
            "image_allocated": allocated(image), "image_size": os.stat(image).st_size}


def warm_up(kubelet: Kubelet, node: nfs.Node, cluster: nfs.Cluster, args) -> None:
    """Every path the measured runs take, once, on WARM_UP_FILES files: under TCG the first
    run of kernel code pays for its translation (one run without this: the loop volume,
    measured first, created its files 2x slower than the qcow2 one, measured last)."""
    small = argparse.Namespace(**{**vars(args), "files": WARM_UP_FILES, "dirs": 6})
    top = node.mount / "warm-up"
    top.mkdir()
    workload(node, top, small, nfs.drop_caches)
    for name in args.backends:
        run_backend(f"warm-up-{name}", BACKENDS[name], kubelet, node, cluster, small)


def run_all(root: Path, args) -> dict:
    with nfs.cluster(root, ("node-a",), delay_us=args.delay_us,
                     max_block_size=args.server_block_kb << 10) as cluster:
        node = cluster.nodes[0]
        if args.read_ahead_kb is not None:
            # The mount's backing_dev_info: the image's READs are this readahead at most.
            Path(f"/sys/class/bdi/{_devno(node.mount)}/read_ahead_kb").write_text(
                str(args.read_ahead_kb))
        kubelet = Kubelet(root / "kubelet", root / "plugins", root / "flexblock.log")
        (root / "kubelet").mkdir()
        for name in args.backends:
            kubelet.install(BACKENDS[name].driver)
        try:
            # The floor under every create time: the same files on a local tmpfs, no NFS.
            local = root / "local"
            started = time.perf_counter()
            create(local, file_paths(local, args.files, args.dirs), args.size)
            local_create = time.perf_counter() - started
            shutil.rmtree(local)
            warm_up(kubelet, node, cluster, args)
            plain = node.mount / "plain"
            plain.mkdir()
            nfs.drop_caches()
            results = {"nfs": {"phases": workload(node, plain, args, nfs.drop_caches),
                               "allocated": allocated(cluster.export / "plain")},
                       "local_create_seconds": local_create}
            for name in args.backends:
                results[name] = run_backend(name, BACKENDS[name], kubelet, node, cluster, args)
        finally:
            problems = release_everything(root / "kubelet") + \
                release_everything(node.mount, node.mount)
            server.stop_spares()  # the one the qemu-nbd driver's last mount left
            if problems:
                print("bench: cleanup: " + "; ".join(problems), file=sys.stderr)
    return results


# -- the report -----------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def summary(results: dict, args) -> dict:
    """Ratios of each backend against plain NFS: RPCs over all phases, create+stat time."""
    nfs_phases = results["nfs"]["phases"]
    out = {}
    for name in args.backends:
        phases = results[name]["phases"]
        rpcs = sum(p.rpcs for p in phases.values())
        out[name] = {
            "rpc_ratio": sum(p.rpcs for p in nfs_phases.values()) / max(rpcs, 1),
            "create_stat_speedup": (nfs_phases["create"].seconds + nfs_phases["stat"].seconds)
            / (phases["create"].seconds + phases["stat"].seconds),
            "pod_start_ms": statistics.median(p.seconds for p in results[name]["pod_starts"])
            * 1000,
        }
    return out


def report(results: dict, args) -> str:
    payload_bytes = args.files * args.size
    lines = [f"{args.files} files of {args.size} B in {args.dirs} directories; NFSv4.2, "
             f"rsize/wsize {args.server_block_kb} KiB, netem {args.delay_us} us each way on the "
             f"client's veth; NFS read_ahead_kb {args.read_ahead_kb or 'default'}; caches "
             "dropped before every phase", ""]
    targets = ["nfs", *args.backends]
    head = f"{'phase':8}" + "".join(f" | {t + ': s':>10} {'RPCs':>7} {'MiB wr':>7}"
                                    for t in targets)
    lines += [head, "-" * len(head)]
    for phase in PHASES:
        row = f"{phase:8}"
        for t in targets:
            p = results[t]["phases"][phase]
            row += f" | {p.seconds:10.2f} {p.rpcs:7d} {_mib(p.written):>7}"
        lines.append(row)
    lines += ["", "RPCs by operation, the most frequent four:"]
    for t in targets:
        for phase in PHASES:
            ops = sorted(results[t]["phases"][phase].ops.items(), key=lambda kv: -kv[1])
            lines.append(f"  {t:12} {phase:7} " +
                         (", ".join(f"{op} {n}" for op, n in ops[:4]) or "-"))
    ratios = summary(results, args)
    lines += ["", f"the create phase on a local tmpfs (no NFS: the emulated CPU's cost of the "
              f"same syscalls): {results['local_create_seconds']:.2f} s", ""]
    for name in args.backends:
        r, res = ratios[name], results[name]
        starts = res["pod_starts"]
        lines += [
            f"{name}: {r['rpc_ratio']:.0f}x fewer NFS RPCs (target >= 100x), create+stat "
            f"{r['create_stat_speedup']:.1f}x faster (target >= 10x) than plain NFS",
            f"{name}: {res['device']}, direct I/O {'on' if res['direct_io'] else 'off'}; image "
            f"{_mib(res['image_size'])} MiB, {_mib(res['image_allocated'])} MiB "
            f"allocated on the share for {_mib(payload_bytes)} MiB of file data (plain NFS "
            f"directory: {_mib(results['nfs']['allocated'])} MiB allocated)",
            f"{name}: pod start (attach+mount, kubelet's call) median {r['pod_start_ms']:.0f} ms "
            f"of {len(starts)}, {statistics.median(p.rpcs for p in starts):.0f} RPCs; first "
            f"mount creating the image {results[name]['first_mount'].seconds * 1000:.0f} ms",
        ]
    return "\n".join(lines)


def plot(results: dict, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = ["nfs", *args.backends]
    labels = {"nfs": "plain NFS directory", **{n: f"flexblock volume ({n})" for n in
                                               args.backends}}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(targets)
    for ax, key, title in ((axes[0], "rpcs", "NFS RPCs sent by the client"),
                           (axes[1], "seconds", "wall time (s, under TCG)")):
        for i, t in enumerate(targets):
            values = [max(getattr(results[t]["phases"][p], key), 1e-3 if key == "seconds"
                          else 0.5) for p in PHASES]
            bars = ax.bar([x + i * width for x in range(len(PHASES))], values, width,
                          label=labels[t])
            ax.bar_label(bars, labels=[f"{v:.3g}" if key == "seconds" else f"{v:.0f}"
                                       for v in values], fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(PHASES))],
                      PHASES)
        ax.set_title(title)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(targets), fontsize=8)
    fig.suptitle(f"{args.files} small files ({args.size} B) on NFSv4.2, {args.delay_us} us "
                 "netem each way, cold caches", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--dirs", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="bytes per file")
    parser.add_argument("--delay-us", type=int, default=250,
                        help="netem delay on each end of the client's veth")
    parser.add_argument("--server-block-kb", type=int, default=1024,
                        help="the server's largest READ/WRITE, the mount's rsize and wsize "
                             "(nfsd offers 1/4096 of its RAM: 256 KiB in the lane's VM, 1 MiB, "
                             "the most, on a server with 4 GiB or more)")
    parser.add_argument("--read-ahead-kb", type=int,
                        help="the NFS mount's read_ahead_kb (a node-wide knob of the operator; "
                             "default: the kernel's, 128 KiB)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--out", type=Path, default=os.environ.get("FLEXBLOCK_VM_OUTPUT"),
                        help="directory for nfs_small_files.{json,png} (default: the lane's "
                             "--output directory, if any)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})")
    return args


def main() -> int:
    args = parse_args(sys.argv[1:])
    if os.environ.get("FLEXBLOCK_VM_LANE") != "1":
        print("run this in the VM lane: tests/vm/run.py --script bench/nfs_small_files.py")
        return 2
    root = Path(tempfile.mkdtemp(prefix="nfs-bench-"))
    started = time.monotonic()
    try:
        results = run_all(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(results, args))
    print(f"(bench time in the guest: {time.monotonic() - started:.0f} s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
                  "results": results, "summary": summary(results, args)}
        (args.out / "nfs_small_files.json").write_text(json.dumps(_plain(record), indent=1))
        if not args.no_plot:
            plot(results, args, args.out / "nfs_small_files.png")
        print(f"wrote {args.out}/nfs_small_files.json" +
              ("" if args.no_plot else " and .png"))
    return 0


def _plain(value):
    """*value* for json, phases as objects rather than lists."""
    if isinstance(value, Phase):
        return value._asdict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
