"""Open-file-description locks (F_OFD_SETLK) on backing files.

An OFD lock belongs to the open file description, not to a process. The loop driver keeps the
description it was handed alive for as long as the device is bound, so a lock taken on it before
LOOP_CONFIGURE lasts exactly as long as the binding and is dropped by the kernel at detach. NFSv4,
CephFS and GlusterFS forward such locks to the server, so other hosts see them too.
"""

from __future__ import annotations

import errno
import os

from ._ffi import ffi, lib


def _request(exclusive: bool, offset: int, length: int):
    lock = ffi.new("struct flock *")
    lock.l_type = lib.F_WRLCK if exclusive else lib.F_RDLCK
    lock.l_whence = os.SEEK_SET
    lock.l_start = offset
    lock.l_len = length  # 0: to the end of the file, however far it grows
    return lock


def try_lock(fd: int, *, exclusive: bool, offset: int = 0, length: int = 0) -> bool:
    """Lock bytes *offset* .. *offset*+*length* (by default the whole file) through *fd*;
    False if a conflicting lock is held elsewhere."""
    r = lib.fb_fcntl_lock(fd, lib.F_OFD_SETLK, _request(exclusive, offset, length))
    # POSIX allows either errno for "conflicting lock"; Linux answers EAGAIN.
    if r in (-errno.EAGAIN, -errno.EACCES):
        return False
    if r < 0:
        raise OSError(-r, f"F_OFD_SETLK: {os.strerror(-r)}")
    return True


def unlock(fd: int) -> None:
    lock = _request(True, 0, 0)
    lock.l_type = lib.F_UNLCK
    r = lib.fb_fcntl_lock(fd, lib.F_OFD_SETLK, lock)
    if r < 0:
        raise OSError(-r, f"F_OFD_SETLK: {os.strerror(-r)}")


def holder_pid(fd: int, *, exclusive: bool, offset: int = 0, length: int = 0) -> int | None:
    """The pid owning a conflicting lock, when it is a process-owned (POSIX) lock.

    OFD locks, ours included, have no owning process: the kernel reports -1 for them.
    """
    lock = _request(exclusive, offset, length)
    r = lib.fb_fcntl_lock(fd, lib.F_OFD_GETLK, lock)
    if r < 0 or lock.l_type == lib.F_UNLCK or lock.l_pid <= 0:
        return None
    return lock.l_pid
