"""The small-files benchmark (bench/nfs_small_files.py), short, as part of the lane: it runs
through (every file read back holds what was written), and even at this size the volume spares
the NFS server most RPCs. The figures are printed; only the RPC ratio, which does not depend on
the machine's speed, is checked."""

import importlib.util
from pathlib import Path

import pytest

from vm.lane import vm_only

pytestmark = [pytest.mark.vm, vm_only]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nfs_small_files.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("nfs_small_files", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_small_files_benchmark(tmp_path):
    bench = load_bench()
    args = bench.parse_args(["--files", "300", "--dirs", "6", "--backends", "loop"])
    results = bench.run_all(tmp_path.resolve(), args)
    print(bench.report(results, args))
    summary = bench.summary(results, args)["loop"]
    assert summary["rpc_ratio"] >= 20  # 38x measured at this size, 68x at 3000 files
