"""qemu-img, which repairs ploop images: an unclean stop (qemu-nbd killed, a host lost) leaves
the in-use flag set and, from qemu's preallocation, leaked clusters past the data; `qemu-img
check -r all` clears both and fixes what else Q parallels_co_check knows (a bad data offset,
clusters outside the image, duplicates). Its own OFD locks keep it off an image that qemu or
ploop has open, here or on another host sharing the file."""

from __future__ import annotations

import errno
import subprocess

from . import image
from .errors import PloopError, ToolError

TIMEOUT = 600.0  # a check reads the whole BAT and may move clusters


def repair(path: str) -> str:
    """Run `qemu-img check -r all` on the image, then clear a stale empty flag (which qemu
    does not know); returns qemu-img's report."""
    try:
        result = subprocess.run(["qemu-img", "check", "-f", "parallels", "-r", "all", path],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=TIMEOUT)
    except FileNotFoundError:
        raise PloopError(errno.ENOENT, "qemu-img is not installed (Debian: qemu-utils)",
                         path) from None
    report = (result.stdout + result.stderr).strip()
    # Exit status 0: clean after repair; 1: check failed; 2: corruptions left; 3: leaks left.
    if result.returncode not in (0, 3):
        raise ToolError(errno.EIO, f"qemu-img check -r all failed: {report}", path)
    with image.Image(path, writable=True):
        pass  # close() clears the empty flag when clusters are allocated
    return report
