"""The loop and block ioctls over the compiled binding: one thin function each, and the attach
and detach sequences that run several of them in one call (fb_attach, fb_detach in build.py).

Failures raise the typed error for the kernel's errno; callers that must branch on a specific
errno (retries, fallbacks) catch ``LoopError`` and read ``.errno``.
"""

from __future__ import annotations

import enum

from ._ffi import ffi, lib
from .errors import LoopError, error_from_errno

LO_NAME_SIZE: int = lib.LO_NAME_SIZE


class LoopFlags(enum.IntFlag):
    """lo_flags, with the values of <linux/loop.h>."""

    READ_ONLY = lib.LO_FLAGS_READ_ONLY
    AUTOCLEAR = lib.LO_FLAGS_AUTOCLEAR
    PARTSCAN = lib.LO_FLAGS_PARTSCAN
    DIRECT_IO = lib.LO_FLAGS_DIRECT_IO


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


def _fill_info(info, offset: int, sizelimit: int, flags: int, file_name: bytes) -> None:
    info.lo_offset = offset
    info.lo_sizelimit = sizelimit
    info.lo_flags = flags
    # The kernel forces the terminating NUL itself; we keep it inside LO_NAME_SIZE anyway.
    ffi.memmove(info.lo_file_name, file_name[: LO_NAME_SIZE - 1], min(len(file_name), LO_NAME_SIZE - 1))


# The steps of the compiled attach sequence, in their order (fb_attach in build.py).
(OPEN_CONTROL, LOCK_CONTROL, GET_FREE, OPEN, CONFIGURE, RELEASE_CONTROL, GET_STATUS, VERIFY,
 DONE) = (lib.FB_OPEN_CONTROL, lib.FB_LOCK_CONTROL, lib.FB_GET_FREE, lib.FB_OPEN,
          lib.FB_CONFIGURE, lib.FB_RELEASE_CONTROL, lib.FB_GET_STATUS, lib.FB_VERIFY, lib.FB_DONE)
LOOP_CONTROL: str = ffi.string(lib.FB_LOOP_CONTROL).decode()
# What each step of the sequences calls, for error messages.
_STEP_NAMES = {
    lib.FB_OPEN_CONTROL: "open",
    lib.FB_LOCK_CONTROL: "flock",
    lib.FB_GET_FREE: "LOOP_CTL_GET_FREE",
    lib.FB_OPEN: "open",
    lib.FB_CONFIGURE: "LOOP_CONFIGURE",
    lib.FB_GET_STATUS: "LOOP_GET_STATUS64",
    lib.FB_GET_SIZE: "BLKGETSIZE64",
    lib.FB_GET_DISKSEQ: "BLKGETDISKSEQ",
    lib.FB_WRITE_BACK: "sync_file_range",
    lib.FB_FSYNC: "fsync",
    lib.FB_CLR_FD: "LOOP_CLR_FD",
}


_SEQUENCE = ffi.typeof("struct fb_attach *")


def attach_sequence(node_prefix: bytes, node_flags: int, part_shift: int, backing_fd: int,
                    backing_size: int, block_size: int, offset: int, sizelimit: int, flags: int,
                    file_name: bytes, until: int = DONE):
    """A sequence that opens /dev/loop-control and queues on its flock, takes a free device
    (LOOP_CTL_GET_FREE), opens its node (*node_prefix* and the number, with *node_flags*; its
    minor is the number << *part_shift*), binds it (LOOP_CONFIGURE), lets go of the control
    device, reads the binding back and checks it against what was asked and *backing_size*.

    Returns the sequence, already run up to *until*, and what run_steps() would have answered.
    The sequence is also the binding's state as read back: ``status`` (struct loop_info64),
    ``size`` and ``diskseq``, as read_back() returns it."""
    seq = ffi.new(_SEQUENCE)
    return seq, -lib.fb_attach_start(seq, node_prefix, node_flags, part_shift, backing_fd,
                                     backing_size, block_size, offset, sizelimit, flags,
                                     file_name, len(file_name), until)


def run_steps(seq, until: int = DONE) -> int:
    """Run *seq* from seq.step up to, not including, step *until*.

    Returns 0, or the errno of the step that failed, which seq.step then names (ERANGE from
    VERIFY: the binding is not what was asked). The caller may do that step its own way, set
    seq.step to the next one and run the rest. seq.number and seq.dev_fd (-1 until OPEN) are
    the device, seq.control_fd (-1 but from OPEN_CONTROL to RELEASE_CONTROL) the control
    device; both fds are the caller's to close.
    """
    return -lib.fb_attach(seq, until)


def step_error(step: int, err: int, path: str | None) -> LoopError:
    """The typed error for *err* from *step* of a sequence."""
    return error_from_errno(err, path, _STEP_NAMES[step])


def file_name(state) -> str:
    """The lo_file_name a read-back state holds."""
    return ffi.string(state.status.lo_file_name, LO_NAME_SIZE).decode("utf-8",
                                                                      "surrogateescape")


def read_back(fd: int, path: str):
    """A bound device's state: its ``status`` (LOOP_GET_STATUS64: NotBound if unbound),
    ``size`` in bytes (BLKGETSIZE64) and ``diskseq`` (BLKGETDISKSEQ; 0 before 5.15), read by
    the sequence's last steps."""
    seq = ffi.new(_SEQUENCE)
    seq.dev_fd = fd
    seq.step = GET_STATUS
    err = run_steps(seq, VERIFY)
    if err:
        raise step_error(seq.step, err, path)
    return seq


def expected_size(backing_size: int, offset: int, sizelimit: int) -> int:
    """The size the kernel gives a binding of a file of *backing_size* bytes (get_size())."""
    return lib.fb_expected_size(backing_size, offset, sizelimit)


# backing_size(fd): the size of the regular file or block device *fd*, or -1 if it is neither
# or a call failed (the caller finds out which). The C function itself: a wrapper would cost
# as much as the call.
backing_size = lib.fb_backing_size


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


def write_back_clear_and_close(fd: int, path: str, *, durable: bool) -> None:
    """Write the device's dirty cache into the backing file, LOOP_CLR_FD, and close *fd*
    (left open if a step failed).

    Write-back is sync_file_range(2) over the whole device, which asks the storage below for
    no cache flush; *durable* makes it fsync(2), which the loop driver passes on to the file.
    """
    r = lib.fb_detach(fd, durable)
    if r:
        raise step_error(-r >> 16, -r & 0xFFFF, path)
