"""Native ploop: the `ploop` tool with a ploop kernel (vz7's /dev/ploopN driver or
dm-ploop). Used when both are present; the tool then checks, locks and attaches the deltas
itself (P lib/ploop.c ploop_mount_image), and grows attached disks online.

Output formats relied on (goploop-cli): `ploop mount` prints "Adding delta dev=/dev/ploopN
..." (maybe after a timestamp), `ploop -v-1 info -d DD.xml` prints "device:\t/dev/ploopN";
`ploop list` (P tools/ploop.c plooptool_list) prints a line per attached device: its name
under /dev, its base delta's path, then (maybe) a mount point and a cookie.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess

from .errors import PloopError, ToolError

# /proc/vz/ploop_minor: the vz7 driver (P7 ploop_getdevice); /sys/module/ploop: either driver
KERNEL_MARKERS = ("/proc/vz/ploop_minor", "/sys/module/ploop")
TIMEOUT = 600.0  # mount checks every delta first; ploop's own lock wait is 60 s
_ADDED = re.compile(r"^(?:\[[0-9. ]+\] )*Adding delta dev=(/dev/\S*ploop\d+) ", re.MULTILINE)
_DEVICE = re.compile(r"^device:\s+(/dev/\S*ploop\d+)\s*$", re.MULTILINE)
_LISTED = re.compile(r"^(\S+)\s+(/\S+)", re.MULTILINE)


def available() -> bool:
    """Are the ploop tool and a ploop kernel driver both present?"""
    return shutil.which("ploop") is not None and any(os.path.exists(m) for m in KERNEL_MARKERS)


def _run(*args: str, path: str) -> str:
    try:
        result = subprocess.run(["ploop", *args], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise PloopError(errno.ENOENT, "the ploop tool is not installed", path) from None
    if result.returncode != 0:
        raise ToolError(errno.EIO, f"ploop {args[0] if args[0] != '-v-1' else args[1]} "
                        f"failed: {(result.stderr or result.stdout).strip()}", path)
    return result.stdout


def mount(descriptor_path: str, *, read_only: bool = False) -> str:
    """`ploop mount [-r] DD.xml`: attach the disk; returns its device."""
    out = _run("mount", *(["-r"] if read_only else []), descriptor_path, path=descriptor_path)
    found = _ADDED.search(out)
    if found is None:
        raise ToolError(errno.EPROTO, f"cannot find the device in ploop mount's output: {out}",
                        descriptor_path)
    return found.group(1)


def device(descriptor_path: str) -> str | None:
    """The device the disk is attached as, if it is."""
    found = _DEVICE.search(_run("-v-1", "info", "-d", descriptor_path, path=descriptor_path))
    return found.group(1) if found else None


def attached() -> list[tuple[str, str]]:
    """(device, base image) of every disk attached on this host."""
    return [(f"/dev/{name}", image)
            for name, image in _LISTED.findall(_run("list", path="ploop list"))]


def umount_device(device: str) -> None:
    """`ploop umount -d DEV`: detach that very device (ploop clears the in-use flag)."""
    _run("umount", "-d", device, path=device)


def umount(descriptor_path: str) -> None:
    """`ploop umount DD.xml`: detach the disk (ploop clears the top delta's in-use flag)."""
    _run("umount", descriptor_path, path=descriptor_path)


def resize(descriptor_path: str, size: int) -> None:
    """`ploop resize -s SIZE DD.xml`: grow the disk, online when it is attached."""
    _run("resize", "-s", f"{size // 1024}K", descriptor_path, path=descriptor_path)
