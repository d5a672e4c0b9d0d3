"""The sheepdog driver name of kvaps/qemu-nbd, kept so that its pod specs get a clear answer.

Sheepdog is gone from every package registry, and qemu removed its sheepdog block driver in
6.0, so attaching a VDI needs the `dog` CLI and an old qemu-nbd built with that driver. Every
mount answers a Failure that names what this node lacks; on a node that has both it says that
flexblock itself does not attach VDIs (it serves image files only). unmount works as the
qemu-nbd driver's, which also leaves alone devices it did not connect.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

from ..errors import DriverError
from .qemu_nbd import GROWTH_REFUSAL, collect, device_for  # noqa: F401  (unmount, expandfs)

IMAGE_FORMATS = ()


@functools.cache
def missing_tools() -> list[str]:
    """What this node lacks to attach sheepdog VDIs."""
    missing = []
    if shutil.which("dog") is None:
        missing.append("the sheepdog CLI `dog`")
    try:
        out = subprocess.run(["qemu-img", "--help"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        missing.append("qemu-img")
    else:
        if "sheepdog" not in out.partition("Supported formats:")[2].split():
            missing.append("a qemu with the sheepdog block driver (qemu 6.0 removed it; this "
                           "qemu-img lists no 'sheepdog' among its formats)")
    return missing


def check() -> None:
    """Raise DriverError saying why this node cannot serve sheepdog volumes."""
    missing = missing_tools()
    if missing:
        raise DriverError("sheepdog volumes cannot be attached on this node: it lacks "
                          + "; ".join(missing) + ". Sheepdog is unmaintained and no longer "
                          "packaged; move the volumes to the loop or qemu-nbd driver")
    raise DriverError("this node has the sheepdog tools, but flexblock serves image files "
                      "only and does not attach sheepdog VDIs; use kvaps/qemu-nbd here")
