"""ploop volumes: a directory holding DiskDescriptor.xml and its image(s), created, attached
as a block device, found again by a later process, grown and detached.

Attaching uses native ploop (`ploop mount`) when the tool and a ploop kernel are present,
otherwise it serves the top image with qemu-nbd (`-f parallels`) and connects it to the
kernel's NBD driver. An NBD device carries a backend identifier naming the image's identity
(device and inode), which is how find_attached() recognises it after the attaching process has
exited; the qemu-nbd server is found the same way (nbd.server names it after that identity).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import time

import nbd
from nbd import server

from . import descriptor, image, native, qemu
from .errors import (CorruptImage, ImageBusy, InvalidArgument, PloopError, SizeMismatch,
                     UnsupportedImage)

DEFAULT_IMAGE = "root.hds"
BACKEND_PREFIX = "ploop:"
CREATE_TIMEOUT = 60.0  # how long a second creator waits for the first (P's lock wait, too)
METHODS = ("native", "nbd")

# open_volume(), create_or_open(), grow(): a volume; size in bytes, image_path the top image
Volume = collections.namedtuple("Volume", "directory descriptor_path image_path format size "
                                          "descriptor")


def _log_warning(message: str) -> None:
    import logging  # only on this rare path: the driver's calls pay for every import

    logging.getLogger("ploop").warning(message)


def open_volume(directory: str | os.PathLike) -> Volume:
    """The volume in *directory*, its descriptor validated against its top image."""
    directory = os.path.abspath(directory)
    desc = descriptor.read(directory)
    for entry in desc.images:
        descriptor.image_path(directory, entry)  # every image in the directory
    top = descriptor.top_image(desc)
    path = descriptor.image_path(directory, top)
    dd_path = os.path.join(directory, descriptor.FILENAME)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise PloopError(errno.EPERM, "image is not a regular file (symlinks are refused)", path)
    if top.type == "Plain":
        return Volume(directory, dd_path, path, "raw", st.st_size, desc)
    header = image.read_header(path)
    if header.tracks != desc.blocksize:
        raise CorruptImage(f"cluster of {header.tracks} sectors, but the descriptor's "
                                 f"Blocksize is {desc.blocksize}", path)
    return Volume(directory, dd_path, path, "parallels", image.disk_size(header), desc)


def create_or_open(directory: str | os.PathLike, size: int | None = None, *,
                   mode: str = "expanded", cluster: int = image.DEFAULT_CLUSTER,
                   image_name: str = DEFAULT_IMAGE, sparse: bool = False) -> Volume:
    """The volume in *directory*, created (and the directory made) when it has none.

    An existing volume smaller than *size* is refused (SizeMismatch); without *size* a missing
    one is an error. Safe to run concurrently, on one host or several sharing the directory:
    the image is made under a temporary name and published with link(2) under an exclusive
    lock, so exactly one creator wins and the others wait for it, then open its volume.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, descriptor.FILENAME)):
        return _existing(directory, size)
    if size is None:
        raise PloopError(errno.ENOENT, "no volume here (no DiskDescriptor.xml)", directory)
    if "/" in image_name or image_name in ("", ".", "..", descriptor.FILENAME):
        raise InvalidArgument(f"image name {image_name!r} is not a plain file name", directory)
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    _remove_stale_temporaries(directory, image_name)
    path = os.path.join(directory, image_name)
    temp = os.path.join(directory, f".{image_name}.{os.urandom(8).hex()}.tmp")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            image.lock(fd, temp)
            header = image.write_new(fd, size, mode=mode, cluster=cluster, sparse=sparse,
                                     path=path)
            os.link(temp, path)
            won = True
        except FileExistsError:
            won = False  # another creator won, or one died before writing the descriptor
        finally:
            os.unlink(temp)
        if won:
            if header is None:
                desc = descriptor.for_image(image_name, os.fstat(fd).st_size // image.SECTOR,
                                            cluster // image.SECTOR, raw=True)
            else:
                desc = descriptor.for_image(image_name, header.nb_sectors, header.tracks,
                                            preallocated=mode == "preallocated")
            _publish(directory, desc)
            return _existing(directory, size)
    finally:
        os.close(fd)
    return _wait_for_creator(directory, path, size)


def _remove_stale_temporaries(directory: str, image_name: str) -> None:
    """Remove images a killed creator left under their temporary names: unlocked (no creator
    holds them) and older than CREATE_TIMEOUT (so not one whose creator is just starting)."""
    prefix = f".{image_name}."
    for name in os.listdir(directory):
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        temp = os.path.join(directory, name)
        try:
            fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < CREATE_TIMEOUT:
                continue
            image.lock(fd, temp)
            os.unlink(temp)
            _log_warning(f"{temp}: removed, left by a creator that died")
        except (ImageBusy, FileNotFoundError):
            pass  # a creator holds it, or another cleaner was first
        finally:
            os.close(fd)


def _publish(directory: str, desc: descriptor.Descriptor) -> None:
    try:
        descriptor.write(directory, desc, replace=False)
    except FileExistsError:
        pass  # restored by a waiting creator (see _wait_for_creator): the same volume


def _wait_for_creator(directory: str, path: str, size: int) -> Volume:
    """The image exists: wait until its creator (who holds its lock) is done. A creator that
    died between publishing the image and its descriptor left a complete image: describe it,
    as `ploop restore-descriptor` would. Anything else in the way is not ours to touch."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        image.lock(fd, path, shared=True, timeout=CREATE_TIMEOUT)
        if not os.path.exists(os.path.join(directory, descriptor.FILENAME)):
            if not image.is_ploop_image(path):
                raise ImageBusy("a file without DiskDescriptor.xml is in the way", path)
            header = image.read_header(path)
            _log_warning(f"{path}: an image without descriptor (its creator died); "
                         "descriptor restored")
            _publish(directory, descriptor.for_image(os.path.basename(path),
                                                     header.nb_sectors, header.tracks))
    finally:
        os.close(fd)
    return _existing(directory, size)


def _existing(directory: str, size: int | None) -> Volume:
    volume = open_volume(directory)
    if size is not None and volume.size < size:
        raise SizeMismatch(f"volume has {volume.size} bytes, fewer than the {size} asked for",
                           directory)
    return volume


def grow(directory: str | os.PathLike, size: int) -> Volume:
    """Grow the volume to *size* bytes (rounded up to whole clusters); a volume already that
    large is left alone. Attached natively, `ploop resize` grows it online; attached through
    NBD it cannot grow (qemu cannot resize parallels images, nor the kernel NBD devices), so
    that is refused (ImageBusy). The image grows first, then the descriptor: a crash between
    the two leaves a larger image, and running grow again completes it."""
    volume = open_volume(directory)
    desc = volume.descriptor
    cluster = desc.blocksize * image.SECTOR
    new_size = -(-size // cluster) * cluster
    if new_size < volume.size:
        raise SizeMismatch(f"volume has {volume.size} bytes; it cannot shrink to {new_size}",
                           volume.directory)
    if new_size == volume.size == desc.disk_size * image.SECTOR:
        return volume
    if len(desc.images) > 1:
        raise UnsupportedImage("growing a snapshot chain needs native ploop",
                               volume.descriptor_path)
    attached = find_attached(volume.directory)
    if attached is not None:
        if attached.method != "native":
            raise ImageBusy(f"attached through NBD as {attached.device}, which cannot grow "
                            "online; detach it first", volume.directory)
        native.resize(volume.descriptor_path, new_size)
        return open_volume(volume.directory)
    if volume.format == "raw":
        _grow_raw(volume.image_path, new_size)
    else:
        image.grow(volume.image_path, new_size, preallocate=desc.preallocated)
    cylinders, heads, sectors = descriptor.geometry(new_size // image.SECTOR)
    descriptor.write(volume.directory, desc._replace(
        disk_size=new_size // image.SECTOR, cylinders=cylinders, heads=heads, sectors=sectors))
    return open_volume(volume.directory)


def _grow_raw(path: str, size: int) -> None:
    """Extend a raw image, allocated as it was made: fully, or sparse."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        image.lock(fd, path)
        st = os.fstat(fd)
        if st.st_blocks * 512 >= st.st_size:
            os.posix_fallocate(fd, st.st_size, size - st.st_size)
        else:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- attaching ---------------------------------------------------------------------------------
class Attachment:
    """A volume attached as a block device: ``device`` is its path (/dev/nbdN, /dev/ploopN),
    ``method`` "native" or "nbd". detach() undoes the attach; it is safe to call again, and
    from another process (after find_attached())."""

    def __init__(self, volume: Volume, device: str, method: str, read_only: bool,
                 nbd_index: int | None = None):
        self.volume = volume
        self.directory = volume.directory
        self.device = device
        self.method = method
        self.read_only = read_only
        self.nbd_index = nbd_index

    def __repr__(self) -> str:
        return (f"Attachment(directory={self.directory!r}, device={self.device!r}, "
                f"method={self.method!r}, read_only={self.read_only})")

    def detach(self) -> None:
        """Detach the device (refused with ImageBusy while it is mounted or held
        exclusively), stop its server and mark the image closed."""
        if self.method == "native":
            if native.device(self.volume.descriptor_path) is not None:
                native.umount(self.volume.descriptor_path)
            return
        running = _server(self.volume)
        if self.nbd_index is not None and _still_ours(self.nbd_index, self.volume):
            _disconnect(self.nbd_index, self.device, flush=running is not None)
        if running is not None:
            server.stop(running)
        path = self.volume.image_path
        # qemu leaves the empty flag set on an image it wrote to; close() clears it. An image
        # still marked in use was not closed by its server (killed): the next attach repairs it.
        if (self.volume.format == "parallels" and not self.read_only
                and image.read_header(path).in_use != image.IN_USE):
            with image.Image(path, writable=True):
                pass


def _backend(volume: Volume) -> str:
    fd = os.open(volume.image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return BACKEND_PREFIX + server.image_id(fd)
    finally:
        os.close(fd)


def _still_ours(index: int, volume: Volume) -> bool:
    """Is NBD device *index* still connected for this volume's image (not re-used)?"""
    try:
        state = nbd.info(index)
    except nbd.NbdError:
        return False
    return state.pid is not None and state.backend == _backend(volume)


def _disconnect(index: int, device: str, *, flush: bool) -> None:
    # An exclusive open fails while the device is mounted or claimed (EBUSY); holding it, no
    # one can mount it before the disconnect. fsync sends the device's cache to qemu-nbd,
    # which writes it to the image before answering the flush (pointless, and EIO, when the
    # server is dead).
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ImageBusy("device is in use (mounted?)", device) from None
        raise PloopError(e.errno, f"cannot open the device: {e.strerror}", device) from None
    try:
        if flush:
            os.fsync(fd)
        nbd.disconnect(index)
    finally:
        os.close(fd)
    nbd.wait_disconnected(index)


def _server(volume: Volume) -> server.Server | None:
    fd = os.open(volume.image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return server.find(fd)
    finally:
        os.close(fd)


def _stop_server(volume: Volume) -> None:
    running = _server(volume)
    if running is not None:
        server.stop(running)


def _read_only(device: str) -> bool:
    name = os.path.basename(os.path.realpath(device))
    with open(f"/sys/block/{name}/ro", encoding="ascii") as f:
        return f.read().strip() == "1"


def find_attached(directory: str | os.PathLike) -> Attachment | None:
    """The attachment of the volume in *directory*, found from the kernel's state (and the
    ploop tool's): works in any process, after the one that attached has exited."""
    volume = open_volume(directory)
    if native.available():
        device = native.device(volume.descriptor_path)
        if device is not None:
            return Attachment(volume, device, "native", _read_only(device))
    try:
        devices = nbd.find_by_backend(_backend(volume))
    except nbd.NotSupported:
        return None  # no NBD driver in this kernel: nothing can be attached through it
    if not devices:
        return None
    found = devices[0]
    return Attachment(volume, found.path, "nbd", _read_only(found.path), found.index)


def attach(directory: str | os.PathLike, *, read_only: bool = False, method: str | None = None,
           timeout: float | None = None, dead_conn_timeout: float | None = None) -> Attachment:
    """Attach the volume in *directory* as a block device; an attached one is returned as it
    is (ImageBusy if attached in the other mode).

    method None picks "native" when the ploop tool and a ploop kernel are present, else "nbd":
    the top image served by qemu-nbd and connected to /dev/nbdN (timeout, dead_conn_timeout:
    see nbd.connect). An image not closed cleanly (in-use flag set) is first repaired with
    `qemu-img check -r all`, which is logged (logger "ploop").
    """
    if method not in (None, *METHODS):
        raise InvalidArgument(f"method {method!r} is not one of {', '.join(METHODS)}")
    found = find_attached(directory)
    if found is not None and found.method == "nbd" and _server(found.volume) is None:
        found.detach()  # its qemu-nbd died: a dead device (refused while mounted), then anew
        found = None
    if found is not None:
        if found.read_only != read_only:
            raise ImageBusy(f"already attached {'read-only' if found.read_only else 'read-write'}"
                            f" as {found.device}", found.directory)
        return found
    volume = open_volume(directory)
    method = method or ("native" if native.available() else "nbd")
    if method == "native":
        device = native.mount(volume.descriptor_path, read_only=read_only)
        return Attachment(volume, device, "native", read_only)
    if len(volume.descriptor.images) > 1:
        raise UnsupportedImage("a snapshot chain attaches with native ploop only (qemu-nbd "
                               "serves one image)", volume.descriptor_path)
    fd = os.open(volume.image_path,
                 (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since open_volume looked
            raise PloopError(errno.EPERM, "image is not a regular file", volume.image_path)
        running = server.find(fd)  # left by an attach that died before connecting
        # (format None: killed before the server was configured)
        if running is not None and (running.format is None or running.read_only != read_only):
            server.stop(running)
            running = None
        if running is None:
            _refuse_if_open(volume.image_path, read_only)
            if volume.format == "parallels":
                _prepare(volume.image_path, read_only)
            running = server.start(fd, fmt=volume.format, read_only=read_only)
        try:
            state, _ = nbd.attach(running.socket_path, backend=BACKEND_PREFIX + running.image_id,
                                  timeout=timeout, dead_conn_timeout=dead_conn_timeout)
        except BaseException:
            server.stop(running)
            raise
    finally:
        os.close(fd)
    return Attachment(volume, state.path, "nbd", read_only, state.index)


def _refuse_if_open(path: str, read_only: bool) -> None:
    """ImageBusy at once if qemu, ploop or a writer of ours has the image open (a conflicting
    lock), on this host or another sharing the file. Checked before anything reads the
    in-use flag, which a user elsewhere has set: only an image nobody has open is repaired.
    The lock is dropped again (qemu-nbd takes its own); a second host slipping in between
    is refused by qemu's locks when it starts its server."""
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        image.lock(fd, path, shared=read_only)
    finally:
        os.close(fd)


def _prepare(path: str, read_only: bool) -> None:
    """Make the image fit for qemu: repaired after an unclean stop; read-write, without a
    format extension (see image.drop_extension) and without a stale empty flag."""
    header = image.read_header(path)
    if header.in_use == image.IN_USE:
        report = qemu.repair(path)
        _log_warning(f"{path}: not closed cleanly (in-use flag set); repaired with "
                     f"qemu-img check -r all: {report}")
    if read_only:
        return
    if header.ext_off and image.drop_extension(path):
        _log_warning(f"{path}: format extension (CBT) dropped; qemu cannot keep it")
    with image.Image(path, writable=True):
        pass  # takes and releases the lock: nobody else has the image open


def detach(directory: str | os.PathLike) -> bool:
    """Detach the volume in *directory* if it is attached; True if it was. A qemu-nbd left
    without a device (an attach that died half-way) is stopped too."""
    found = find_attached(directory)
    if found is not None:
        found.detach()
        return True
    _stop_server(open_volume(directory))
    return False
