"""LoopDevice, the handle that owns a loop device's fd and identity, and attach().

Identity is the device number plus its diskseq (5.15+), which changes with every binding: a
handle made by get(), find() or list_devices() holds no fd, and re-checks that identity before it
acts, so it never detaches or resizes a device that was re-bound to someone else's file since.
A handle made by attach() holds its fd for as long as it is open; while it does, the binding
cannot go away under it (LOOP_CLR_FD by others is lazy and waits for our close).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import stat
import time

from . import _devnode, _ioctl, _ofdlock, _sysfs
from ._ioctl import LO_NAME_SIZE, LOOP_CONTROL, LoopFlags
from .errors import (CONFIGURE_UNSUPPORTED, LOST_RACE, READ_ONLY_BACKING, DeviceBusy,
                     ImageBusy, InvalidArgument, LoopError, NoFreeDevice, NotALoopDevice,
                     NotBound, NotSupported, SizeMismatch)

_NODE_PREFIX = _devnode.NODE_PREFIX.encode()
# open(2) flags for a device node, read-only and read-write: indexed by writable.
_NODE_FLAGS = (_devnode.open_flags(False), _devnode.open_flags(True))
# Both util-linux and systemd give up after 64 lost races; systemd's jitter grows to 250 ms.
MAX_ATTACH_TRIES = 64
BACKOFF_BASE = 0.010
BACKOFF_CAP = 0.250
# LOOP_SET_STATUS64 answered EAGAIN while the page cache could not be dropped (before 5.0,
# commit 5db470e229e2); util-linux retries 10 x 250 ms.
SET_STATUS_TRIES = 10
SET_STATUS_DELAY = 0.250
DETACH_TIMEOUT = 5.0
_LLONG_MAX = 2**63 - 1

# Plain ints: IntFlag arithmetic costs microseconds per operation on the attach path.
_READ_ONLY, _AUTOCLEAR, _PARTSCAN, _DIRECT_IO = (
    int(f) for f in (LoopFlags.READ_ONLY, LoopFlags.AUTOCLEAR, LoopFlags.PARTSCAN,
                     LoopFlags.DIRECT_IO))

# Set once LOOP_CONFIGURE turned out to be missing and the fallback worked, so later attaches in
# this process go straight to the fallback (systemd's loop_configure_broken).
_configure_unsupported = False


# LoopDevice.info(): the binding's effective state. backing_file is None once unbound, and
# ends in " (deleted)" once unlinked; sizes are bytes; ref is the device's lo_file_name.
LoopInfo = collections.namedtuple(
    "LoopInfo", "name path number devno diskseq backing_file backing_devno backing_inode offset "
    "sizelimit read_only autoclear partscan direct_io block_size size ref")


class LoopDevice:
    """A bound loop device.

    Used as a context manager, a handle returned by attach() detaches its device on exit unless
    relinquish() was called; any other handle only lets go of its fd.
    """

    __slots__ = ("number", "path", "_owned", "_state", "_block_size", "_fd")

    def __init__(self, number: int, fd: int, *, owned: bool, state=None):
        # The binding's state (as _ioctl.read_back returns it) as attach() just verified it, or
        # read through *fd*; the handle keeps *fd* only when it owns it. Its fields are read
        # from that state when asked for: attach has no need of them.
        self.number = number
        self.path = f"{_devnode.NODE_PREFIX}{number}"  # _devnode.node_path, without the call
        self._owned = owned
        self._state = _ioctl.read_back(fd, self.path) if state is None else state
        self._block_size: int | None = None
        self._fd = fd if owned else -1

    # -- identity ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"loop{self.number}"

    @property
    def devno(self) -> int:
        return _sysfs.devno(self.number)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return (f"<LoopDevice {self.path} offset={self.offset} sizelimit={self.sizelimit} "
                f"ro={self.read_only} owned={self._owned}>")

    # -- state as the kernel reported it (refreshed by info() and resize()) --------------------
    size = property(lambda self: self._state.size)
    diskseq = property(lambda self: self._state.diskseq)
    backing_devno = property(lambda self: self._state.status.lo_device)
    backing_inode = property(lambda self: self._state.status.lo_inode)
    offset = property(lambda self: self._state.status.lo_offset)
    sizelimit = property(lambda self: self._state.status.lo_sizelimit)
    ref = property(lambda self: _ioctl.file_name(self._state))
    read_only = property(lambda self: bool(self._state.status.lo_flags & _READ_ONLY))
    autoclear = property(lambda self: bool(self._state.status.lo_flags & _AUTOCLEAR))
    partscan = property(lambda self: bool(self._state.status.lo_flags & _PARTSCAN))
    direct_io = property(lambda self: bool(self._state.status.lo_flags & _DIRECT_IO))

    @property
    def backing_file(self) -> str | None:
        """The backing file's current path; it ends in " (deleted)" once unlinked."""
        return _sysfs.backing_file(self.number)

    @property
    def block_size(self) -> int:
        """The logical sector size (read on first use: attach has no need of it)."""
        if self._block_size is None:
            fd = self._open_checked()
            try:
                self._block_size = _ioctl.logical_block_size(fd, self.path)
            finally:
                self._release(fd)
        return self._block_size

    def _read_state(self, fd: int) -> None:
        self._state = _ioctl.read_back(fd, self.path)
        self._block_size = _ioctl.logical_block_size(fd, self.path)

    # -- acting on the device ---------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.path}: handle holds no fd")
        return self._fd

    def _open_checked(self) -> int:
        """An fd on this very binding: ours, or a fresh one once its identity is re-checked."""
        if self._fd >= 0:
            return self._fd
        try:
            fd = _devnode.open_node(self.number, writable=False, timeout=0)
        except LoopError as e:
            if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                raise NotBound(errno.ENXIO, "device is gone", self.path) from None
            raise
        try:
            state = _ioctl.read_back(fd, self.path)
            if (state.diskseq, state.status.lo_device, state.status.lo_inode) != (
                    self.diskseq, self.backing_devno, self.backing_inode):
                raise NotBound(errno.ENXIO, "device was detached and bound again since", self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _release(self, fd: int) -> None:
        if fd != self._fd:
            os.close(fd)

    def info(self) -> LoopInfo:
        """The binding's effective state, read from the kernel now."""
        fd = self._open_checked()
        try:
            self._read_state(fd)
        finally:
            self._release(fd)
        return LoopInfo(self.name, self.path, self.number, self.devno, self.diskseq,
                        self.backing_file, self.backing_devno, self.backing_inode, self.offset,
                        self.sizelimit, self.read_only, self.autoclear, self.partscan,
                        self.direct_io, self.block_size, self.size, self.ref)

    def resize(self) -> int:
        """Re-read the backing file's size (LOOP_SET_CAPACITY); returns the new size in bytes."""
        fd = self._open_checked()
        try:
            _ioctl.set_capacity(fd, self.path)
            self._read_state(fd)
        finally:
            self._release(fd)
        return self.size

    def detach(self, *, wait: bool = False, timeout: float = DETACH_TIMEOUT,
               sync: bool = False) -> None:
        """Unbind the device (LOOP_CLR_FD), and close the handle.

        The kernel clears the binding at the last close, so while the device is mounted or held
        open elsewhere it stays bound with autoclear set. With *wait*, return only once it is
        really unbound, or raise DeviceBusy after *timeout* seconds.

        What is cached for the device is first written into the backing file (sync_file_range;
        BLKFLSBUF would also drop the cache, at three times the cost): a sole opener's
        LOOP_CLR_FD puts the device in rundown at once, and pages still dirty at the last close
        are then lost with "Buffer I/O error ... lost async page write" (seen on 6.18). *sync*
        also makes the backing file durable (fsync, which the loop driver passes on to it);
        unmounting a filesystem, and releasing the image lock on NFS, do that anyway.
        """
        fd = self._fd if self._fd >= 0 else self._open_checked()
        try:
            _ioctl.write_back_clear_and_close(fd, self.path, durable=sync)
        except BaseException:
            self._release(fd)
            raise
        # Ours or opened for this, the fd is closed now; the handle holds nothing any more.
        self._owned = False
        self._fd = -1
        if wait:
            self._wait_unbound(timeout)

    def _wait_unbound(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _sysfs.backing_file(self.number) is not None and _sysfs.diskseq(
                self.number) == self.diskseq:
            if time.monotonic() >= deadline:
                raise DeviceBusy(errno.EBUSY, f"still in use after {timeout:g} s; it will be "
                                 "detached when its last user closes it", self.path)
            time.sleep(_devnode.POLL_INTERVAL)

    def relinquish(self) -> None:
        """Leave the device bound and let go of it: close our fd, never detach on exit."""
        self._owned = False
        self.close()

    def close(self) -> None:
        """Close our fd (if any). With autoclear set, the last close unbinds the device."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._owned:
            self.close()
            return
        try:
            self.detach()
        except NotBound:
            pass  # somebody detached it already: the outcome we wanted


# -- attach ---------------------------------------------------------------------------------
# ours: we opened fd, so we close it
_Backing = collections.namedtuple("_Backing", "fd ours path read_only size")
# open(2) flags for a backing file, read-write and read-only: indexed by read_only.
_BACKING_FLAGS = (os.O_CLOEXEC | os.O_RDWR, os.O_CLOEXEC | os.O_RDONLY)


def _check_range(name: str, value: int, path: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= _LLONG_MAX:
        raise InvalidArgument(errno.EINVAL, f"{name} must be an integer from 0 to 2^63-1, "
                              f"not {value!r}", path)


def _backing_size(fd: int, path: str) -> int:
    size = _ioctl.backing_size(fd)
    return size if size >= 0 else _backing_size_or_why(fd, path)


def _backing_size_or_why(fd: int, path: str) -> int:
    """The backing size, asked again where _ioctl.backing_size could not tell, or why not."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return _ioctl.size_bytes(fd, path)
    raise InvalidArgument(errno.EINVAL, "not a regular file or block device", path)


def _open_backing(path_or_fd: str | os.PathLike | int, read_only: bool,
                  read_only_fallback: bool, direct_io: bool) -> _Backing:
    if isinstance(path_or_fd, int):
        fd = path_or_fd
        path = os.readlink(f"/proc/self/fd/{fd}")
        mode_ro = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        return _Backing(fd, False, path, read_only or mode_ro, _backing_size(fd, path))
    path = os.fspath(path_or_fd)
    # os.path.abspath costs about as much as the rest of _open_backing: skipped for the
    # absolute paths it would return unchanged (no empty, "." or ".." component).
    if not (path[:1] == "/" and path[-1] != "/" and "//" not in path and "/." not in path):
        path = os.path.abspath(path)
    flags = _BACKING_FLAGS[read_only]
    if direct_io:
        flags |= os.O_DIRECT
    while True:
        try:
            fd = os.open(path, flags)
            break
        except OSError as e:
            if e.errno == errno.EINVAL and flags & os.O_DIRECT:
                flags &= ~os.O_DIRECT  # filesystem without O_DIRECT: buffered, reported later
            elif e.errno in READ_ONLY_BACKING and read_only_fallback and flags & os.O_RDWR:
                flags = flags & ~os.O_RDWR | os.O_RDONLY
            else:
                raise LoopError(e.errno, f"cannot open backing file: {e.strerror}", path) from None
    try:
        size = _backing_size(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return _Backing(fd, True, path, not flags & os.O_RDWR, size)


def lock_image(fd: int, *, exclusive: bool = True, path: str | None = None, offset: int = 0,
               length: int = 0) -> None:
    """Take the image lock that ``attach(lock=True)`` takes, on the open file *fd*.

    The lock belongs to *fd*'s open file description: it lasts until every fd sharing that
    description is closed, or, once the description is bound to a loop device, until detach.
    Raises ImageBusy, naming the holder when it can, if another description holds it.
    *offset* and *length* lock a byte range instead of the whole file, for holders that must
    coexist with the locks of other software on the same file (qemu's, on bytes 100-300); the
    whole-file lock of a loop attach conflicts with any of them.
    """
    path = path or os.readlink(f"/proc/self/fd/{fd}")
    try:
        if _ofdlock.try_lock(fd, exclusive=exclusive, offset=offset, length=length):
            return
    except OSError as e:
        raise LoopError(e.errno, f"cannot lock image: {e.strerror}", path) from None
    pid = _ofdlock.holder_pid(fd, exclusive=exclusive, offset=offset, length=length)
    if pid is not None:
        holder = f"locked by process {pid}"
    else:
        local = [d.path for d in find(path)]
        holder = (f"attached as {', '.join(local)}" if local
                  else "locked by another attach, on this or another host")
    raise ImageBusy(path, holder)


def unlock_image(fd: int) -> None:
    """Drop the lock taken through *fd* (or through attach with *fd*'s description)."""
    try:
        _ofdlock.unlock(fd)
    except OSError as e:
        raise LoopError(e.errno, f"cannot unlock image: {e.strerror}",
                        os.readlink(f"/proc/self/fd/{fd}")) from None


def attach(path_or_fd: str | os.PathLike | int, *, offset: int = 0, sizelimit: int = 0,
           block_size: int | None = None, read_only: bool = False,
           read_only_fallback: bool = False, autoclear: bool = False, partscan: bool = False,
           direct_io: bool = False, ref: str | None = None, lock: bool = False) -> LoopDevice:
    """Bind a free loop device to a file (or an open fd) and return its owning handle.

    read_only_fallback: if the file cannot be opened read-write (EROFS, EACCES), attach it
      read-only instead of failing; ``read_only`` on the result tells which happened.
    direct_io: asked for, not promised; the kernel drops it silently for misaligned offsets or
      filesystems without O_DIRECT, and ``direct_io`` on the result says what is in effect.
    ref: stored as the device's lo_file_name (63 bytes at most); defaults to the file's path.
    lock: take an OFD lock on the backing file (exclusive read-write, shared read-only) that
      lives exactly as long as the binding; raises ImageBusy if another attach holds one.
    """
    # Either negative or 2^63 or more leaves bits at 63 and up; the full check says which,
    # and lets bools through as ints.
    if type(offset) is not int or type(sizelimit) is not int or (offset | sizelimit) >> 63:
        _check_range("offset", offset, str(path_or_fd))
        _check_range("sizelimit", sizelimit, str(path_or_fd))
    if block_size is not None and (block_size < 512 or block_size > os.sysconf("SC_PAGESIZE")
                                   or block_size & (block_size - 1)):
        raise InvalidArgument(errno.EINVAL, "block size must be a power of two from 512 to the "
                              f"page size, not {block_size!r}", str(path_or_fd))
    if ref is not None and len(ref.encode()) >= LO_NAME_SIZE:
        raise InvalidArgument(errno.EINVAL, f"ref must be under {LO_NAME_SIZE} bytes",
                              str(path_or_fd))

    backing = _open_backing(path_or_fd, read_only, read_only_fallback, direct_io)
    try:
        if offset and offset >= backing.size:
            raise InvalidArgument(errno.EINVAL, f"offset {offset} is beyond the end of the file "
                                  f"({backing.size} bytes)", backing.path)
        if lock:
            lock_image(backing.fd, exclusive=not backing.read_only, path=backing.path)
        flags = ((_READ_ONLY if backing.read_only else 0) | (_AUTOCLEAR if autoclear else 0)
                 | (_PARTSCAN if partscan else 0) | (_DIRECT_IO if direct_io else 0))
        file_name = (ref or backing.path).encode("utf-8", "surrogateescape")
        seq, checked = _allocate_and_bind(backing, block_size or 0, offset, sizelimit, flags,
                                          file_name)
        number, dev_fd = seq.number, seq.dev_fd
        try:
            # Unless the sequence checked the binding itself, look at it here.
            state = seq if checked else _verify(seq, backing, block_size, offset, sizelimit,
                                                partscan, file_name)
            return LoopDevice(number, dev_fd, owned=True, state=state)
        except BaseException:
            # We bound it ourselves just now, so clearing cannot hit another process's binding.
            _ioctl.clear_fd(dev_fd, _devnode.node_path(number))
            os.close(dev_fd)
            raise
    finally:
        if backing.ours:
            os.close(backing.fd)


def _jitter(limit: float) -> float:
    """A random delay below *limit*, so that racing allocators do not retry in step."""
    return limit * int.from_bytes(os.urandom(2), "little") / 65536


def _control_error(step: int, err: int) -> LoopError:
    """The typed error for a failed step on /dev/loop-control."""
    if step == _ioctl.OPEN_CONTROL:
        if err == errno.ENOENT:
            return NotSupported(err, "no loop support in this kernel", LOOP_CONTROL)
        return LoopError(err, f"cannot open: {os.strerror(err)}", LOOP_CONTROL)
    return _ioctl.step_error(step, err, LOOP_CONTROL)


def _allocate_and_bind(backing: _Backing, block_size: int, offset: int, sizelimit: int,
                       flags: int, file_name: bytes):
    """Take a free device and bind it; retry lost races with a fresh one.

    The compiled sequence (_ioctl.attach_sequence) takes the device, opens and binds it with
    LOOP_CONFIGURE, reads the binding back and checks it in one call; what it cannot do (wait
    for a late node, the pre-5.8 fallback) is done here. Returns the sequence (its number, its
    dev_fd, ours now, and what it read back if it got that far) and whether it found the binding
    to be what was asked.

    Our own allocators queue on an exclusive flock of /dev/loop-control (lock order: control,
    then device), so races are only with tools that do not take it, such as losetup.
    """
    until = _ioctl.CONFIGURE if _configure_unsupported else _ioctl.DONE
    seq, err = _ioctl.attach_sequence(_NODE_PREFIX, _NODE_FLAGS[not backing.read_only],
                                      _sysfs.part_shift(), backing.fd, backing.size, block_size,
                                      offset, sizelimit, flags, file_name, until)
    if not err and until == _ioctl.DONE:
        return seq, True  # bound, read back and checked; the control device is closed
    try:
        for attempt in range(MAX_ATTACH_TRIES):
            if attempt:
                # Never LOOP_CLR_FD after a lost race: EBUSY means the device is someone else's
                # binding now.
                fcntl.flock(seq.control_fd, fcntl.LOCK_UN)
                time.sleep(_jitter(min(BACKOFF_CAP, BACKOFF_BASE * attempt)))
                seq.step = _ioctl.LOCK_CONTROL
                err = _ioctl.run_steps(seq, until)
            try:
                _bind_free(seq, err, until, backing, block_size, offset, sizelimit, flags,
                           file_name)
                return seq, seq.step == _ioctl.DONE
            except BaseException as e:
                if seq.dev_fd >= 0:
                    os.close(seq.dev_fd)
                    seq.dev_fd = -1
                # A failure on the control device lost no race: its errno is the answer.
                if not isinstance(e, LoopError) or e.errno not in LOST_RACE or (
                        seq.step <= _ioctl.GET_FREE):
                    raise
        raise NoFreeDevice(errno.EBUSY, f"lost the race for a free device {MAX_ATTACH_TRIES} "
                           "times", backing.path)
    finally:
        if seq.control_fd >= 0:
            os.close(seq.control_fd)


def _bind_free(seq, err: int, until: int, backing: _Backing, block_size: int, offset: int,
               sizelimit: int, flags: int, file_name: bytes) -> None:
    """Finish one try of the compiled sequence, which was run up to *until* and returned *err*:
    do the step it handed back (seq.step says which) and resume it.

    A node it could not open or found to be another device goes to open_node, which waits
    for a node not there yet or names what is wrong. Without LOOP_CONFIGURE (or once it is
    known to be missing, when the sequence stops before it) the device is bound the pre-5.8
    way, and the sequence resumed after it. What the sequence could not read back, or found
    to differ from what was asked, is left to _verify, which looks again and reports it.
    """
    global _configure_unsupported
    if err and seq.step <= _ioctl.GET_FREE:
        raise _control_error(seq.step, err)
    if seq.step == _ioctl.OPEN:
        # No node yet, not accessible yet, or a node of another device: open_node waits for
        # the node or says what is wrong with it.
        seq.dev_fd = _devnode.open_node(seq.number, writable=not backing.read_only)
        seq.step = _ioctl.CONFIGURE
        err = _ioctl.run_steps(seq, until)
    if seq.step != _ioctl.CONFIGURE:
        return
    if err and err not in CONFIGURE_UNSUPPORTED:
        raise _ioctl.step_error(seq.step, err, backing.path)
    # Pre-5.8 path, several ioctls: hold the device's BSD lock meanwhile so udev does not
    # probe it half-configured (systemd.io/BLOCK_DEVICE_LOCKING).
    dev_fd = seq.dev_fd
    fcntl.flock(dev_fd, fcntl.LOCK_EX)
    try:
        _ioctl.set_fd(dev_fd, backing.fd, backing.path)
        try:
            _configure_fallback(dev_fd, block_size, offset, sizelimit, flags, file_name,
                                backing.path)
        except BaseException:
            _ioctl.clear_fd(dev_fd, backing.path)
            raise
    finally:
        fcntl.flock(dev_fd, fcntl.LOCK_UN)
    _configure_unsupported = True
    seq.step = _ioctl.RELEASE_CONTROL
    _ioctl.run_steps(seq)


def _configure_fallback(dev_fd: int, block_size: int, offset: int, sizelimit: int, flags: int,
                        file_name: bytes, path: str) -> None:
    if block_size:
        _ioctl.set_block_size(dev_fd, block_size, path)
    for attempt in range(SET_STATUS_TRIES):
        try:
            _ioctl.set_status(dev_fd, offset=offset, sizelimit=sizelimit, flags=flags,
                              file_name=file_name, path=path)
            break
        except LoopError as e:
            if e.errno != errno.EAGAIN or attempt == SET_STATUS_TRIES - 1:
                raise
            time.sleep(SET_STATUS_DELAY)
    if offset or sizelimit:
        _ioctl.flush_buffers(dev_fd, path)
    if flags & _DIRECT_IO:
        try:
            _ioctl.set_direct_io(dev_fd, True, path)
        except LoopError as e:
            if e.errno != errno.EINVAL:  # EINVAL: not possible here; reported as not in effect
                raise


def _verify(seq, backing: _Backing, block_size: int | None, offset: int, sizelimit: int,
            partscan: bool, file_name: bytes):
    """Check the kernel applied what we asked (systemd's loop_configure_verify), where the
    sequence found it did not or could not tell; mend what can be mended, raise for the rest.
    Returns the binding's state."""
    dev_fd = seq.dev_fd
    path = _devnode.node_path(seq.number)
    # Unless the sequence read the binding back, read it now, to report what failed.
    state = seq if seq.step == _ioctl.VERIFY else _ioctl.read_back(dev_fd, path)
    status = state.status
    if (status.lo_offset, status.lo_sizelimit) != (offset, sizelimit):
        raise SizeMismatch(errno.ERANGE, f"kernel set offset {status.lo_offset} and sizelimit "
                           f"{status.lo_sizelimit}, not {offset} and {sizelimit}", path)
    if block_size and _ioctl.logical_block_size(dev_fd, path) != block_size:
        raise SizeMismatch(errno.ERANGE, f"kernel did not apply block size {block_size}", path)
    if partscan and not status.lo_flags & _PARTSCAN:
        # Vanilla 5.8 ignored PARTSCAN in LOOP_CONFIGURE; LOOP_SET_STATUS64 can still set it.
        _ioctl.set_status(dev_fd, offset=offset, sizelimit=sizelimit,
                          flags=status.lo_flags | _PARTSCAN, file_name=file_name, path=path)
        state = _ioctl.read_back(dev_fd, path)
    expected = _ioctl.expected_size(backing.size, offset, sizelimit)
    if state.size != expected:
        # The file may have changed size since we opened it; otherwise the kernel ignored the
        # sizelimit (vanilla 5.8) or did not size the device (before 3.9): recompute, poke it.
        expected = _ioctl.expected_size(_backing_size(backing.fd, backing.path), offset,
                                        sizelimit)
        if state.size != expected:
            _ioctl.set_capacity(dev_fd, path)
            state.size = _ioctl.size_bytes(dev_fd, path)
    if state.size != expected:
        raise SizeMismatch(errno.ERANGE, f"device has {state.size} bytes, expected {expected}",
                           path)
    return state


# -- discovery ------------------------------------------------------------------------------
def _peek(number: int) -> LoopDevice | None:
    """A non-owning handle for device *number*, or None if it is not bound (any more)."""
    try:
        fd = _devnode.open_node(number, writable=False, timeout=0)
    except LoopError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None  # raced an autoclear teardown or a removal
        raise
    try:
        return LoopDevice(number, fd, owned=False)
    except NotBound:
        return None
    finally:
        os.close(fd)


def list_devices() -> list[LoopDevice]:
    """Every bound loop device, as handles that hold no fd."""
    return [dev for number in _sysfs.bound_numbers() if (dev := _peek(number)) is not None]


def find(backing_file: str | os.PathLike, offset: int | None = None) -> list[LoopDevice]:
    """The devices bound to *backing_file* (like ``losetup -j``), matched by device and inode.

    A file that no longer exists is matched by the path the kernel remembers for it.
    """
    path = os.path.abspath(os.fspath(backing_file))
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
    except (FileNotFoundError, NotADirectoryError):
        key = None
    found = []
    for number in _sysfs.bound_numbers():
        if key is None:
            name = _sysfs.backing_file(number)
            if name is None or name.removesuffix(" (deleted)") != path:
                continue
        dev = _peek(number)
        if dev is None or (key is not None and (dev.backing_devno, dev.backing_inode) != key):
            continue
        if offset is None or dev.offset == offset:
            found.append(dev)
    return found


def get(device: str | os.PathLike | int) -> LoopDevice:
    """A handle for a bound device given as a number, ``loopN`` or a path to its node."""
    if isinstance(device, int):
        number = device
    else:
        text = os.fspath(device)
        if text.startswith("loop") and text[4:].isdigit():
            number = int(text[4:])
        else:
            try:
                st = os.stat(text)
            except OSError as e:
                raise LoopError(e.errno, f"cannot stat: {e.strerror}", text) from None
            found = _sysfs.number_from_devno(st.st_rdev) if stat.S_ISBLK(st.st_mode) else None
            if found is None:
                raise NotALoopDevice(errno.ENODEV, "not a loop device", text)
            number = found
    path = _devnode.node_path(number)
    if not _sysfs.exists(number):
        raise NotALoopDevice(errno.ENODEV, "no such loop device", path)
    dev = _peek(number)
    if dev is None:
        raise NotBound(errno.ENXIO, "device is not bound to a file", path)
    return dev


def get_by_devno(devno: int) -> LoopDevice:
    """A handle for the bound device with device number *devno* (e.g. a mount's st_dev)."""
    number = _sysfs.number_from_devno(devno)
    if number is None:
        raise NotALoopDevice(errno.ENODEV, f"{os.major(devno)}:{os.minor(devno)} is not a loop "
                             "device", None)
    return get(number)


def detach(device: str | os.PathLike | int, *, wait: bool = False,
           timeout: float = DETACH_TIMEOUT) -> None:
    """Detach a bound device given as for get()."""
    get(device).detach(wait=wait, timeout=timeout)
