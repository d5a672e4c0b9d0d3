"""The loop and block ioctls, one thin function each, over the compiled binding.

Named tuples come from collections, not typing: the driver imports this module on every
kubelet call, and typing alone costs it milliseconds.

Failures raise the typed error for the kernel's errno; callers that must branch on a specific
errno (retries, fallbacks) catch ``LoopError`` and read ``.errno``.
"""

from __future__ import annotations

import collections
import enum
import errno

from ._ffi import ffi, lib
from .errors import error_from_errno

LO_NAME_SIZE: int = lib.LO_NAME_SIZE


class LoopFlags(enum.IntFlag):
    """lo_flags, with the values of <linux/loop.h>."""

    READ_ONLY = lib.LO_FLAGS_READ_ONLY
    AUTOCLEAR = lib.LO_FLAGS_AUTOCLEAR
    PARTSCAN = lib.LO_FLAGS_PARTSCAN
    DIRECT_IO = lib.LO_FLAGS_DIRECT_IO


# get_status(): what LOOP_GET_STATUS64 reports for a bound device
Status = collections.namedtuple(
    "Status", "backing_devno backing_inode offset sizelimit number flags file_name")


def _call_ptr(fd: int, request: int, arg, path: str | None, what: str) -> int:
    r = lib.fb_ioctl_ptr(fd, request, arg)
    if r < 0:
        raise error_from_errno(-r, path, what)
    return r


def _call_int(fd: int, request: int, arg: int, path: str | None, what: str) -> int:
    r = lib.fb_ioctl_int(fd, request, arg)
    if r < 0:
        raise error_from_errno(-r, path, what)
    return r


def get_free(ctl_fd: int) -> int:
    """LOOP_CTL_GET_FREE: the number of an unbound device, created if none is free."""
    return _call_int(ctl_fd, lib.LOOP_CTL_GET_FREE, 0, "/dev/loop-control", "LOOP_CTL_GET_FREE")


def _fill_info(info, offset: int, sizelimit: int, flags: int, file_name: bytes) -> None:
    info.lo_offset = offset
    info.lo_sizelimit = sizelimit
    info.lo_flags = flags
    # The kernel forces the terminating NUL itself; we keep it inside LO_NAME_SIZE anyway.
    ffi.memmove(info.lo_file_name, file_name[: LO_NAME_SIZE - 1], min(len(file_name), LO_NAME_SIZE - 1))


def configure(fd: int, backing_fd: int, *, block_size: int, offset: int, sizelimit: int,
              flags: int, file_name: bytes, path: str) -> None:
    """LOOP_CONFIGURE (5.8+): bind and configure in one call."""
    config = ffi.new("struct loop_config *")
    config.fd = backing_fd
    config.block_size = block_size
    _fill_info(config.info, offset, sizelimit, flags, file_name)
    _call_ptr(fd, lib.LOOP_CONFIGURE, config, path, "LOOP_CONFIGURE")


def set_fd(fd: int, backing_fd: int, path: str) -> None:
    _call_int(fd, lib.LOOP_SET_FD, backing_fd, path, "LOOP_SET_FD")


def set_block_size(fd: int, block_size: int, path: str) -> None:
    _call_int(fd, lib.LOOP_SET_BLOCK_SIZE, block_size, path, "LOOP_SET_BLOCK_SIZE")


def set_direct_io(fd: int, enable: bool, path: str) -> None:
    _call_int(fd, lib.LOOP_SET_DIRECT_IO, int(enable), path, "LOOP_SET_DIRECT_IO")


def set_status(fd: int, *, offset: int, sizelimit: int, flags: int, file_name: bytes,
               path: str) -> None:
    """LOOP_SET_STATUS64. It can set only AUTOCLEAR and PARTSCAN, and clear only AUTOCLEAR."""
    info = ffi.new("struct loop_info64 *")
    _fill_info(info, offset, sizelimit, flags & lib.LOOP_SET_STATUS_SETTABLE_FLAGS, file_name)
    _call_ptr(fd, lib.LOOP_SET_STATUS64, info, path, "LOOP_SET_STATUS64")


def get_status(fd: int, path: str) -> Status:
    """LOOP_GET_STATUS64; raises NotBound (ENXIO) for an unbound device."""
    info = ffi.new("struct loop_info64 *")
    _call_ptr(fd, lib.LOOP_GET_STATUS64, info, path, "LOOP_GET_STATUS64")
    name = ffi.string(info.lo_file_name, LO_NAME_SIZE).decode("utf-8", "surrogateescape")
    return Status(info.lo_device, info.lo_inode, info.lo_offset, info.lo_sizelimit,
                  info.lo_number, info.lo_flags, name)


def clear_fd(fd: int, path: str) -> None:
    """LOOP_CLR_FD. Lazy since 3.7: it only sets AUTOCLEAR while other openers remain."""
    _call_int(fd, lib.LOOP_CLR_FD, 0, path, "LOOP_CLR_FD")


def set_capacity(fd: int, path: str) -> None:
    _call_int(fd, lib.LOOP_SET_CAPACITY, 0, path, "LOOP_SET_CAPACITY")


def size_bytes(fd: int, path: str) -> int:
    """BLKGETSIZE64: the block device's size in bytes."""
    size = ffi.new("uint64_t *")
    _call_ptr(fd, lib.BLKGETSIZE64, size, path, "BLKGETSIZE64")
    return size[0]


def logical_block_size(fd: int, path: str) -> int:
    """BLKSSZGET: the logical sector size."""
    ssz = ffi.new("int *")
    _call_ptr(fd, lib.BLKSSZGET, ssz, path, "BLKSSZGET")
    return ssz[0]


def flush_buffers(fd: int, path: str) -> None:
    """BLKFLSBUF: drop the device's page cache, stale after an offset or size change."""
    _call_int(fd, lib.BLKFLSBUF, 0, path, "BLKFLSBUF")


def write_back(fd: int, path: str) -> None:
    """sync_file_range(2) over the whole device: its dirty cache written out, no flush below."""
    r = lib.fb_write_back(fd)
    if r < 0:
        raise error_from_errno(-r, path, "sync_file_range")


def diskseq(fd: int, path: str) -> int:
    """BLKGETDISKSEQ (5.15+): a number that changes with every binding; 0 where unsupported."""
    seq = ffi.new("uint64_t *")
    r = lib.fb_ioctl_ptr(fd, lib.BLKGETDISKSEQ, seq)
    if r == -errno.ENOTTY:
        return 0
    if r < 0:
        raise error_from_errno(-r, path, "BLKGETDISKSEQ")
    return seq[0]
