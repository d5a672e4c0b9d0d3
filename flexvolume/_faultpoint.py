"""Named fault points, for the tests that SIGKILL the driver at each step of a call.

A driver killed between any two steps (OOM killer, node shutdown, kubelet restart) must leave
a state that kubelet's retry turns into Success with nothing leaked and no data lost. Killing
after a delay reaches the short steps only by chance; these points let the kill tests
(tests/driver/test_flexvolume_kill.py, test_vm_qemu_nbd_kill.py) kill the driver right after a
named step, every time.
In production the variable is unset and `reached` is one comparison with None.
"""

from __future__ import annotations

import os
import signal

ENV = "FLEXBLOCK_FAULT_POINT"
_ARMED = os.environ.get(ENV) or None


def reached(step: str) -> None:
    """SIGKILL this process if the tests armed *step*."""
    if step == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
