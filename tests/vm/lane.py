"""What a test of the real-kernel lane (pytest marker `vm`) needs to know about where it runs.

A vm test module starts with

    from vm.lane import vm_only
    pytestmark = [pytest.mark.vm, vm_only]

so that it runs inside the lane's VM (tests/vm/run.py) and is skipped, with a reason saying so,
anywhere else. The lane runner fails when every test it ran was skipped, and when any test was
skipped for this reason inside the VM (the lane's environment did not reach the test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set by tests/vm/run.py on the guest command line; never set on the host.
LANE_ENV = "FLEXBLOCK_VM_LANE"
HOST_KERNEL_ENV = "FLEXBLOCK_HOST_KERNEL"  # `uname -r` of the host that booted the VM
SCRATCH_ENV = "FLEXBLOCK_VM_SCRATCH"  # a tmpfs of the guest's own, writable, empty at boot

# Loaded by the guest before pytest starts (a lane that cannot load one of them fails loudly).
MODULES = ("loop", "nbd", "dm_mod", "veth", "nfsd", "nfs", "nfsv4")

NOT_IN_LANE = ("needs the real-kernel VM lane (run `tests/vm/run.py`): "
               f"{LANE_ENV}=1 is not set, so this is not the lane's guest")


def in_lane() -> bool:
    return os.environ.get(LANE_ENV) == "1"


vm_only = pytest.mark.skipif(not in_lane(), reason=NOT_IN_LANE)


def host_kernel() -> str:
    """The release of the host kernel that started the VM."""
    return os.environ[HOST_KERNEL_ENV]


def scratch() -> Path:
    """The guest's scratch tmpfs (pytest's --basetemp lives under it; prefer tmp_path)."""
    return Path(os.environ[SCRATCH_ENV])
