"""Independent views of loop devices for the loopctl tests: sysfs, util-linux and raw ioctls.

Nothing here goes through loopctl, so the tests can check loopctl against what the kernel and
losetup say. The raw LOOP_GET_STATUS64 decoder uses the layout of struct loop_info64 from
<linux/loop.h> (232 bytes, no padding) and the ioctl number from loopctl's compiled binding.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from loopctl._ffi import lib

MiB = 1024 * 1024
SYS_BLOCK = "/sys/block"
# Long enough for udevd to finish probing a device it opened; only reached when a test fails.
WAIT_TIMEOUT = 15.0

LOSETUP_COLUMNS = ("NAME,AUTOCLEAR,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,OFFSET,PARTSCAN,RO,"
                   "SIZELIMIT,DIO,LOG-SEC")

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64).
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
assert _LOOP_INFO64.size == 232


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> bool:
    """Poll *predicate* until it holds; False if it still does not after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def sysfs_backing_file(number: int) -> str | None:
    try:
        with open(f"{SYS_BLOCK}/loop{number}/loop/backing_file", encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise


def sysfs_bound() -> dict[int, str]:
    """Every bound loop device and its backing file, straight from sysfs."""
    bound = {}
    for name in os.listdir(SYS_BLOCK):
        if name.startswith("loop") and name[4:].isdigit():
            backing = sysfs_backing_file(int(name[4:]))
            if backing is not None:
                bound[int(name[4:])] = backing
    return bound


def is_under(path: str, root: str | os.PathLike) -> bool:
    root = os.fspath(root)
    path = path.removesuffix(" (deleted)")
    return path == root or path.startswith(root.rstrip("/") + "/")


def bound_under(root: str | os.PathLike) -> set[int]:
    """Devices backed by a file under *root*, and devices stacked on those (loop on loop)."""
    bound = sysfs_bound()
    ours = {n for n, backing in bound.items() if is_under(backing, root)}
    while True:
        stacked = {n for n, backing in bound.items() if n not in ours and any(
            backing == f"/dev/loop{m}" for m in ours)}
        if not stacked:
            return ours
        ours |= stacked


def bound_to(path: str | os.PathLike) -> set[int]:
    """Devices whose backing file is *path* (deleted or not), by sysfs."""
    path = os.fspath(path)
    return {n for n, backing in sysfs_bound().items()
            if backing.removesuffix(" (deleted)") == path}


def is_bound(number: int) -> bool:
    return sysfs_backing_file(number) is not None


def wait_unbound(number: int) -> bool:
    return wait_until(lambda: not is_bound(number))


def run(*cmd: str | os.PathLike, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(c) for c in cmd], check=check, capture_output=True,
                          text=True, timeout=120, **kwargs)


def losetup_row(device: str) -> dict:
    """What `losetup -J -l` reports for *device*, its maj:min columns stripped of padding."""
    out = run("losetup", "-J", "-l", "-O", LOSETUP_COLUMNS, device).stdout
    rows = json.loads(out)["loopdevices"] if out.strip() else []
    assert len(rows) == 1, f"losetup lists {len(rows)} rows for {device}: {out}"
    row = rows[0]
    for key in ("maj:min", "back-maj:min"):
        row[key] = row[key].strip()
    return row


def losetup_backing_files() -> set[str]:
    """Backing files of the devices `losetup -l` lists."""
    out = run("losetup", "-J", "-l", "-O", "NAME,BACK-FILE").stdout
    return {row["back-file"] for row in json.loads(out)["loopdevices"]} if out.strip() else set()


def losetup_associated(path: str | os.PathLike) -> set[int]:
    """Device numbers `losetup -j FILE` associates with *path*."""
    result = run("losetup", "-j", path, check=False)
    numbers = set()
    for line in result.stdout.splitlines():
        name = line.split(":", 1)[0]
        if name.startswith("/dev/loop") and name[9:].isdigit():
            numbers.add(int(name[9:]))
    return numbers


def expected_losetup_row(info) -> dict:
    """The losetup row matching a loopctl LoopInfo."""
    return {
        "name": info.path,
        "autoclear": info.autoclear,
        "back-file": info.backing_file,
        "back-ino": info.backing_inode,
        "back-maj:min": f"{os.major(info.backing_devno)}:{os.minor(info.backing_devno)}",
        "maj:min": f"{os.major(info.devno)}:{os.minor(info.devno)}",
        "offset": info.offset,
        "partscan": info.partscan,
        "ro": info.read_only,
        "sizelimit": info.sizelimit,
        "dio": info.direct_io,
        "log-sec": info.block_size,
    }


def kernel_status(device: str) -> dict:
    """LOOP_GET_STATUS64 on *device*, issued with the stdlib and decoded by hand."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, lib.LOOP_GET_STATUS64, buf, True)
    finally:
        os.close(fd)
    (device_no, inode, _rdevice, offset, sizelimit, number, _enc_type, _enc_key_size, flags,
     file_name, _crypt_name, _key, _init0, _init1) = _LOOP_INFO64.unpack(buf)
    return {
        "backing_devno": device_no, "backing_inode": inode, "offset": offset,
        "sizelimit": sizelimit, "number": number, "flags": flags,
        "file_name": file_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
    }


def blockdev_size(device: str) -> int:
    return int(run("blockdev", "--getsize64", device).stdout)


def sysfs_attr(number: int, attr: str) -> str:
    with open(f"{SYS_BLOCK}/loop{number}/{attr}", encoding="utf-8") as f:
        return f.read().strip()


def make_image(path: Path, size: int) -> Path:
    """A sparse file of *size* bytes."""
    with open(path, "xb") as f:
        os.ftruncate(f.fileno(), size)
    return path


def write_mbr(path: Path, start_sector: int, sectors: int) -> None:
    """Write a DOS partition table with one Linux partition into image *path*."""
    entry = struct.pack("<B3sB3sII", 0x00, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                        start_sector, sectors)
    with open(path, "r+b") as f:
        f.seek(440)
        f.write(struct.pack("<I", 0x12345678) + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa")


def _kernel_config() -> str:
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


# The partition test needs a kernel that parses DOS tables (some VM kernels ship no parser).
needs_dos_partitions = pytest.mark.skipif(
    bool(_kernel_config()) and "CONFIG_MSDOS_PARTITION=y" not in _kernel_config(),
    reason="this kernel has no DOS partition parser (CONFIG_MSDOS_PARTITION is not set)")


def python_child(code: str, *args: str, **popen_kwargs) -> subprocess.Popen:
    """A Python process running *code* with this interpreter (so with loopctl importable)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True, **popen_kwargs)


def mounts_under(root: str | os.PathLike) -> list[str]:
    """Mount points under *root*, deepest first."""
    targets = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as octal.
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if is_under(target, root):
                targets.append(target)
    return sorted(targets, key=lambda t: t.count("/"), reverse=True)


def qemu_io_reads(path: str | os.PathLike, fmt: str, pattern: int, offset: int,
                  length: int) -> bool:
    """Does qemu (qemu-io) read bytes *pattern* at [offset, offset+length) of the image?"""
    out = subprocess.run(["qemu-io", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}",
                          os.fspath(path)], capture_output=True, text=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def image_id(path: str | os.PathLike) -> str:
    """The image's identity as nbd.server names its server (device and inode)."""
    from nbd import server

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return server.image_id(fd)
    finally:
        os.close(fd)
