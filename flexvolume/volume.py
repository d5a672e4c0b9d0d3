"""mount, unmount and expandfs of one pod volume, for any backend.

State is read from the kernel every time (mount table -> device -> its backing file), never from
files of ours, so it cannot go stale across reboots or killed calls. Every step that changes the
system is undone when a later step fails.
"""

from __future__ import annotations

import os
from types import ModuleType

import loopctl

from . import _faultpoint, filesystem, image, mounts, options
from .errors import DriverError, OptionError

EXT_FAMILY = ("ext2", "ext3", "ext4")
MOUNTABLE = EXT_FAMILY + ("xfs", "btrfs")


def check_target(target: str) -> str:
    """Kubelet's mount dir, as the mount table will name it: kubelet's root is often reached
    through a symlink (/var/lib/kubelet -> /data/kubelet), mountinfo shows the real path."""
    if "\0" in target or not target.startswith("/"):
        raise DriverError(f"mount dir {target!r} is not an absolute path")
    return os.path.realpath(target)


def _same_image(device, image_fd: int) -> bool:
    st = os.fstat(image_fd)
    return (device.backing_devno, device.backing_inode) == (st.st_dev, st.st_ino)


def mount(target: str, raw_options: str, backend: ModuleType) -> str:
    """Attach the volume's image (creating and formatting it if needed) and mount it at
    *target*. Returns a line for the log."""
    opts = options.parse(raw_options)
    target = check_target(target)
    root, parts = image.resolve(opts.file, opts.share)
    current = mounts.mount_at(target)
    if current is not None:
        with image.open_image(root, parts, read_only=True, size=None, allocate=False) as img:
            device = backend.device_for(current)
            if device is None or not _same_image(device, img.fd):
                raise DriverError(f"{target} already has another filesystem mounted")
        # A driver killed between mount(2) and the fsGroup step left it mounted: finish that.
        apply_fs_group(target, opts)
        return f"{img.path} already mounted at {target}"

    if opts.image_format not in backend.IMAGE_FORMATS:
        raise DriverError(f"this driver serves {' and '.join(backend.IMAGE_FORMATS)} images, "
                          f"not {opts.image_format} (the qemu-nbd driver serves qcow2)")
    with image.open_image(root, parts, read_only=opts.read_only, size=opts.size,
                          allocate=opts.allocate) as img:
        created = "created " if img.created else ""
        if created:
            fs_type = opts.fs_type or options.DEFAULT_FS_TYPE
            mounts.mount_arguments(fs_type, opts.mount_options, opts.read_only)  # refuse early
            filesystem.mkfs(img.fd_path, fs_type, mmp=opts.mmp,
                            mmp_interval=opts.mmp_update_interval, pass_fds=(img.fd,))
            if opts.image_format != "raw":
                img.convert(opts.image_format, allocate=opts.allocate)
            elif opts.allocate:
                # mke2fs discards (punches holes in) the file it formats: allocate again.
                os.posix_fallocate(img.fd, 0, opts.size)
            _faultpoint.reached("mkfs")
            img.publish(lock=backend.lock_image if opts.lock else None)
            _faultpoint.reached("publish")
        elif opts.size and not opts.read_only and image.virtual_size(img.fd) < opts.size:
            raise DriverError(f"{img.path} is smaller than size {opts.size}; grow it by resizing "
                              "the volume (expandfs), or ask for its current size")
        try:
            device = backend.attach(img.fd, read_only=opts.read_only, lock=opts.lock,
                                    image_format=opts.image_format, path=img.path)
        except loopctl.ImageBusy as e:
            raise DriverError(f"{img.path} is in use ({e.holder}); a volume can be mounted "
                              "read-write by one pod at a time") from None
        fs_type = mount_attached(device, img, target, opts, img.path)
        return f"{created}{img.path} ({fs_type}) on {device.path} mounted at {target}"


def mount_device(device: str, fs_type: str, target: str, opts, what: str) -> None:
    """Mount *device* (holding volume *what*) at *target* and give the fsGroup its root;
    nothing stays mounted if that fails."""
    os.makedirs(target, 0o750, exist_ok=True)
    flags, data = mounts.mount_arguments(fs_type, opts.mount_options, opts.read_only)
    try:
        mounts.mount(device, target, fs_type, flags, data)
    except OSError as e:
        raise DriverError(f"mounting {what} ({fs_type}) at {target}: {e.strerror}") from None
    _faultpoint.reached("mount")
    try:
        apply_fs_group(target, opts)
    except BaseException:
        mounts.unmount(target)
        raise
    _faultpoint.reached("fs-group")


def mount_attached(device, source, target: str, opts, what: str) -> str:
    """Prepare the filesystem of the attached *device* (whose image *source* is, for
    prepare_filesystem) and mount it at *target*; the device is detached if that fails, let go
    of (left attached) if not. Returns the filesystem's type."""
    _faultpoint.reached("attach")
    try:
        fs_type = prepare_filesystem(device, source, opts)
        _faultpoint.reached("prepare")
        mount_device(device.path, fs_type, target, opts, what)
    except BaseException:
        device.detach()
        raise
    device.relinquish()
    return fs_type


def prepare_filesystem(device, img: image.Image, opts: options.VolumeOptions) -> str:
    """Make sure *device* holds a filesystem we may mount; returns its type."""
    # What an image marked as being formatted holds is our own half-made filesystem, never
    # mounted (a mount killed in mkfs): it is made again.
    redo = not opts.read_only and img.formatting_interrupted()
    fs_type, found = None, {}
    if not redo:
        fs_type = filesystem.signature(device.fileno())
        if fs_type is None:
            found = filesystem.probe(device.path)
            fs_type = found.get("TYPE")
    if fs_type is None:
        if found:
            what = found.get("PTTYPE", "data") + (" partition table" if "PTTYPE" in found else "")
            raise DriverError(f"{img.path} holds a {what}, not a filesystem; refusing to format it")
        if opts.read_only:
            raise DriverError(f"{img.path} holds no filesystem and is to be mounted read-only")
        if not redo and not img.is_blank():
            raise DriverError(f"{img.path} holds data but no recognised filesystem; refusing to "
                              "format it")
        fs_type = opts.fs_type or options.DEFAULT_FS_TYPE
        img.mark_formatting(True)
        filesystem.mkfs(device.path, fs_type, mmp=opts.mmp, mmp_interval=opts.mmp_update_interval)
        img.mark_formatting(False)
        return fs_type
    if fs_type not in MOUNTABLE:
        raise DriverError(f"{img.path} holds {fs_type}, which this driver does not mount")
    requested = opts.fs_type
    if requested and requested != fs_type and not (requested == "ext4" and fs_type in EXT_FAMILY):
        raise DriverError(f"{img.path} holds {fs_type}, not the requested {requested}")
    needed = filesystem.declared_size(device.fileno(), fs_type)
    if needed > device.size:
        raise DriverError(f"{img.path} has {device.size} bytes, less than the {needed} of the "
                          f"{fs_type} filesystem it holds: truncated or damaged; not touching it")
    if fs_type in EXT_FAMILY and not opts.read_only:
        state = filesystem.ext_state(device.fileno())
        # e2fsck -p checks nothing on a clean filesystem either, but with MMP it first waits
        # 2 x interval + 1 s; reading the superblock ourselves skips that wait on clean volumes.
        if opts.fsck and (not state.clean or "f" in opts.fsck_options):
            filesystem.fsck(device.path, fs_type, opts.fsck_options)
        if opts.mmp and fs_type == "ext4" and not state.mmp:
            filesystem.enable_mmp(device.path, opts.mmp_update_interval)
    return fs_type


def apply_fs_group(target: str, opts: options.VolumeOptions) -> None:
    """Give the pod's fsGroup the volume's root directory (group-owned, setgid, writable).

    Kubelet's own fsGroup handling (capability fsGroup) would chown every file recursively at
    every mount, which on volumes of millions of small files is exactly the cost this driver
    exists to avoid; files created below inherit the group through the setgid bit.
    """
    if opts.fs_group is None or opts.read_only:
        return
    st = os.stat(target)
    if st.st_gid != opts.fs_group:
        os.chown(target, -1, opts.fs_group)
    if st.st_mode & 0o2070 != 0o2070:
        os.chmod(target, st.st_mode & 0o7777 | 0o2070)


def unmount(target: str, backend: ModuleType) -> str:
    target = check_target(target)
    current = mounts.mount_at(target)
    if current is None:
        backend.collect()
        return f"{target} is not mounted"
    device = backend.device_for(current)
    try:
        mounts.unmount(target)
    except OSError as e:
        raise DriverError(f"unmounting {target}: {e.strerror}") from None
    _faultpoint.reached("unmount")
    # Loop devices with autoclear unbind at the last close; this covers devices bound without it
    # (by older drivers, or by hand) and NBD devices, once nothing else mounts them.
    if device is not None and not mounts.mounts_of(current.devno):
        try:
            device.detach()
        except loopctl.NotBound:
            pass
    backend.collect()
    where = f" from {device.path}" if device is not None else ""
    return f"unmounted {target}{where}"


def expandfs(raw_options: str, target: str, new_size_text: str, backend: ModuleType) -> str:
    """Grow the image file to *new_size* bytes, then the device, then the mounted filesystem."""
    if not (new_size_text.isascii() and new_size_text.isdigit()):
        raise DriverError(f"new size {new_size_text!r} is not a byte count")
    new_size = int(new_size_text)
    target = check_target(target)
    current = mounts.mount_at(target)
    device = backend.device_for(current) if current is not None else None
    if device is None:
        raise DriverError(f"{target} is not a mounted flexblock volume")
    refusal = getattr(backend, "GROWTH_REFUSAL", None)
    if refusal is not None:
        raise DriverError(refusal)  # before the image grows: a Failure changes nothing
    try:
        opts = options.parse(raw_options)
    except OptionError as e:
        if e.option != "file":
            raise
        opts = None  # kubelet rebuilt the spec after a restart and sent no user options
    if opts is not None:
        root, parts = image.resolve(opts.file, opts.share)
        img = image.open_image(root, parts, read_only=False, size=None, allocate=False)
        allocate = opts.allocate
    else:
        img, allocate = _open_backing(device), False
    with img:
        if not _same_image(device, img.fd):
            raise DriverError(f"{target} is not mounted from {img.path}")
        image.check_capacity(img.fd, new_size, img.path)
        if os.fstat(img.fd).st_size < new_size:
            try:
                if allocate:
                    os.posix_fallocate(img.fd, 0, new_size)
                else:
                    os.ftruncate(img.fd, new_size)
            except OSError as e:
                raise DriverError(f"growing {img.path} to {new_size} bytes: {e.strerror}") \
                    from None
            _faultpoint.reached("grow-image")
        device.resize()
        _faultpoint.reached("grow-device")
    filesystem.grow(current.fs_type, device.path, target)
    _faultpoint.reached("grow-fs")
    return f"grew {target} on {device.path} to {device.size} bytes"


def _open_backing(device) -> image.Image:
    """The image behind *device*, by the path the kernel keeps (checked by inode afterwards)."""
    path = device.backing_file
    if path is None or path.endswith(" (deleted)"):
        raise DriverError(f"{device.path} has no backing file any more")
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    return image.Image(fd, -1, os.path.basename(path), path, None)
