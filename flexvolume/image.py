"""A volume's image file: found, or created, strictly inside its root.

The driver runs as root for any pod author, so the options' paths are hostile input. The image
is reached one component at a time from an fd on the root, each component opened with
O_NOFOLLOW and required to stay on the root's filesystem: no "..", no symlink, no mount
crossed. The fd opened that way is the one handed to the kernel, so nothing can be swapped
between the check and the use.

A new image is built under a private temporary name (sized, locked and formatted there) and
published with link(2), which refuses to replace an existing name: other nodes and processes
only ever see a complete image under the final name, and two creators cannot both win.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import loopctl

from . import _faultpoint, filesystem, mounts
from .errors import DriverError

ALLOWED_ROOTS_ENV = "FLEXBLOCK_ALLOWED_ROOTS"
ALLOWED_ROOTS_FILE = "/etc/flexblock/allowed-roots"
_TEMP_MARK = ".flexblock-"
_FORMATTING_XATTR = "user.flexblock.formatting"
_QCOW2_MAGIC = b"QFI\xfb"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def allowed_roots() -> list[str]:
    """Operator-configured roots for images named without a share (colon- or line-separated)."""
    text = os.environ.get(ALLOWED_ROOTS_ENV)
    if text is None:
        try:
            with open(ALLOWED_ROOTS_FILE, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return []
    roots = (r.strip() for r in text.replace(":", "\n").splitlines())
    return [os.path.normpath(r) for r in roots if r.startswith("/")]


def _components(option: str, path: str) -> list[str]:
    if "\0" in path:
        raise DriverError(f"option {option!r}: contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DriverError(f"option {option!r}: {path!r} may not contain '..'")
    return parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(file: str, share: str | None) -> tuple[str, list[str]]:
    """The root directory an image must stay inside, and the image's components below it."""
    parts = _components("file", file)
    if share is not None:
        _components("share", share)
        if not share.startswith("/"):
            raise DriverError(f"option 'share': {share!r} is not an absolute path")
        root = os.path.realpath(share)
        entry = mounts.mount_at(root)
        if entry is None or root == "/":
            raise DriverError(f"share {share} is not mounted")
        if entry.fs_type in mounts.PSEUDO_FS_TYPES:
            raise DriverError(f"share {share} is a {entry.fs_type} pseudo-filesystem")
        configured = allowed_roots()
        if configured and not any(_inside(root, os.path.realpath(r)) for r in configured):
            raise DriverError(f"share {share} is outside the allowed roots")
    else:
        if not file.startswith("/"):
            raise DriverError(f"option 'file': {file!r} must be absolute when no share is given")
        for configured in allowed_roots():
            root_parts = _components("allowed root", configured)
            if parts[:len(root_parts)] == root_parts and len(parts) > len(root_parts):
                root, parts = os.path.realpath(configured), parts[len(root_parts):]
                break
        else:
            raise DriverError(f"file {file} is outside the allowed roots (give a share, or "
                              f"configure {ALLOWED_ROOTS_FILE} or {ALLOWED_ROOTS_ENV})")
    if not parts:
        raise DriverError(f"option 'file': {file!r} names no file")
    if _TEMP_MARK in parts[-1]:
        raise DriverError(f"option 'file': {file!r} looks like a flexblock temporary file")
    return root, parts


def volume_directory(root_option: str, root: str, name_option: str, name: str) -> str:
    """The directory <root>/<name> of a volume kept in a directory of its own (ploop): *root*
    an absolute path to an existing directory on a mounted, real filesystem, *name* one plain
    component that, if it exists, is a directory on the same filesystem (not a symlink)."""
    _components(root_option, root)
    if not root.startswith("/"):
        raise DriverError(f"option {root_option!r}: {root!r} is not an absolute path")
    if "/" in name or name in ("", ".", "..") or _components(name_option, name) != [name]:
        raise DriverError(f"option {name_option!r}: {name!r} is not a single path component")
    real = os.path.realpath(root)
    if real == "/":
        raise DriverError(f"option {root_option!r}: {root!r} is the root directory")
    try:
        root_fd = os.open(real, _DIR_FLAGS)
    except OSError as e:
        raise DriverError(f"option {root_option!r}: {root}: {e.strerror}") from None
    try:
        entry = max((m for m in mounts.mount_table() if _inside(real, m.mount_point)),
                    key=lambda m: len(m.mount_point))
        if entry.fs_type in mounts.PSEUDO_FS_TYPES:
            raise DriverError(f"{root} is on a {entry.fs_type} pseudo-filesystem")
        try:
            st = os.lstat(name, dir_fd=root_fd)
        except FileNotFoundError:
            return os.path.join(real, name)
        if not stat.S_ISDIR(st.st_mode):
            raise DriverError(f"{os.path.join(root, name)} is a symlink or not a directory")
        if st.st_dev != os.fstat(root_fd).st_dev:
            raise DriverError(f"{os.path.join(root, name)} is another filesystem mounted "
                              "inside the volume path")
        return os.path.join(real, name)
    finally:
        os.close(root_fd)


class Image:
    """An open image file, its directory, and whether this call is creating it."""

    def __init__(self, fd: int, dir_fd: int, name: str, path: str, temp_name: str | None):
        self.fd = fd
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.temp_name = temp_name  # set while a new image is still unpublished

    def is_blank(self) -> bool:
        """Nothing but zeros in it: a filesystem may be made on it."""
        return filesystem.is_blank(self.fd)

    @property
    def created(self) -> bool:
        return self.temp_name is not None

    @property
    def fd_path(self) -> str:
        """A path to the open image for tools run with ``pass_fds=(image.fd,)``."""
        return f"/proc/self/fd/{self.fd}"

    def publish(self, *, lock: Callable[..., None] | None) -> None:
        """Give a new image its final name; DriverError if another creator got there first.

        The image is then reopened by that name, so that the kernel (and losetup, and sysfs)
        know it by it rather than by the unlinked temporary name. With *lock* (the backend's
        image lock), the image lock moves to the new open file description; someone may take it
        in between, and then that one wins the volume and we answer that it is in use.
        """
        try:
            os.link(self.temp_name, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            raise DriverError(f"{self.path} was created concurrently by another mount; "
                              "retrying will use it") from None
        except FileNotFoundError:
            # Another creator took our temporary image for a killed one's: it took it in the
            # instant between its creation and its lock (_create), and is creating its own.
            self.temp_name = None
            raise DriverError(f"{self.path} is being created concurrently by another mount; "
                              "retrying will use it") from None
        _faultpoint.reached("publish-link")
        os.unlink(self.temp_name, dir_fd=self.dir_fd)
        self.temp_name = None
        fd = os.open(self.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        old = os.fstat(self.fd)
        new = os.fstat(fd)
        os.close(self.fd)  # drops the lock held since creation
        self.fd = fd
        if (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
            raise DriverError(f"{self.path} was replaced while it was being created")
        if lock is not None:
            try:
                lock(fd, read_only=False, path=self.path)
            except loopctl.ImageBusy as e:
                raise DriverError(f"{self.path} is in use ({e.holder})") from None

    def mark_formatting(self, on: bool) -> None:
        mark_formatting(self.fd, on, self.path)

    def formatting_interrupted(self) -> bool:
        return formatting_interrupted(self.fd)

    def convert(self, image_format: str, *, allocate: bool) -> None:
        """Rewrite the new (raw, formatted, unpublished) image in *image_format*: qemu-img
        writes a second temporary image, which then replaces the first. qemu-img copies only
        what the filesystem wrote (it skips holes and zeros)."""
        temp = _temp_name(self.name)
        # Paths through our fds: the image and its directory are the ones already checked.
        # locking=off: qemu's shared lock on the source would conflict with our own lock.
        argv = ["qemu-img", "convert", "-q", "--image-opts",
                f"driver=raw,file.driver=file,file.filename=/proc/self/fd/{self.fd},"
                "file.locking=off", "-O", image_format]
        if allocate:
            argv += ["-o", "preallocation=falloc"]
        elif image_format == "qcow2":
            # Every cluster mapped up front (the file stays sparse): a cluster qemu allocates
            # while the volume is in use costs a punch-hole and an fallocate of the file, each
            # a round trip on NFS that also flushes the file's dirty pages first.
            argv += ["-o", "preallocation=metadata"]
        argv.append(f"/proc/self/fd/{self.dir_fd}/{temp}")
        try:
            filesystem.run(argv, f"converting {self.path} to {image_format}",
                           pass_fds=(self.fd, self.dir_fd))
            fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except BaseException:
            _unlink_quietly(temp, self.dir_fd)
            raise
        try:
            loopctl.lock_image(fd, path=self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp, self.dir_fd)
            raise
        self.discard()
        os.close(self.fd)
        self.fd, self.temp_name = fd, temp

    def discard(self) -> None:
        """Remove a new image that was never published."""
        if self.temp_name is not None:
            os.unlink(self.temp_name, dir_fd=self.dir_fd)
            self.temp_name = None

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.discard()
        finally:
            self.close()


def _open_dir(name: str, dir_fd: int, root_dev: int, display: str) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DriverError(f"{display}: {name!r} is a symlink or not a directory") from None
        raise
    if os.fstat(fd).st_dev != root_dev:
        os.close(fd)
        raise DriverError(f"{display}: {name!r} is another filesystem mounted inside the root")
    return fd


def _check_file(fd: int, root_dev: int, display: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DriverError(f"{display} is not a regular file")
    if st.st_dev != root_dev:
        raise DriverError(f"{display} is on another filesystem than its root")
    if st.st_nlink != 1:
        # A second name could be anywhere on the filesystem, outside the root.
        raise DriverError(f"{display} has {st.st_nlink} hard links; refusing it")


def open_image(root: str, parts: list[str], *, read_only: bool, size: int | None,
               allocate: bool) -> Image:
    """Open the image at *parts* below *root*, creating it (and its directories) when it is
    missing and *size* is given."""
    display = os.path.join(root, *parts)
    dir_fd = os.open(root, _DIR_FLAGS)
    try:
        root_dev = os.fstat(dir_fd).st_dev
        for part in parts[:-1]:
            try:
                next_fd = _open_dir(part, dir_fd, root_dev, display)
            except FileNotFoundError:
                if size is None or read_only:
                    raise DriverError(f"{display} does not exist") from None
                try:
                    os.mkdir(part, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise DriverError(f"cannot create the directories of {display}: "
                                      f"{e.strerror}") from None
                next_fd = _open_dir(part, dir_fd, root_dev, display)
            os.close(dir_fd)
            dir_fd = next_fd
        name = parts[-1]
        # O_NONBLOCK: a FIFO planted under the image's name must not hang the driver.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC | \
            os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            if size is None or read_only:
                raise DriverError(f"{display} does not exist and no size was given to create it")\
                    from None
            return _create(dir_fd, name, display, size, allocate)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DriverError(f"{display} is a symlink; refusing it") from None
            raise DriverError(f"cannot open {display}: {e.strerror}") from None
        try:
            # Creators killed mid-way leave temporary images behind (one killed between
            # publishing and dropping its temporary name, a second name of this very image):
            # remove those nobody holds any more before judging the image.
            _remove_abandoned_temps(dir_fd, name)
            _check_file(fd, root_dev, display)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return Image(fd, dir_fd, name, display, None)
    except BaseException:
        os.close(dir_fd)
        raise


def mark_formatting(image: int | str, on: bool, display: str) -> None:
    """Mark (or unmark) an existing image (an fd or a path) as being formatted in place.

    mkfs writes the superblock last: killed half-way, it leaves data and no signature, which
    the driver must not take for a blank image again (it could be anyone's data) and would
    refuse for ever. The mark, an extended attribute of the image file, is set before mkfs
    and removed after it, before anything mounts the volume. Where the share refuses user
    extended attributes there is no mark, and such an image needs an administrator; a mark
    that cannot be removed fails the mount, since a mounted volume holds data.
    """
    try:
        if on:
            os.setxattr(image, _FORMATTING_XATTR, b"1")
        else:
            os.removexattr(image, _FORMATTING_XATTR)
    except OSError as e:
        if not on and e.errno not in (errno.ENOTSUP, errno.ENODATA):
            raise DriverError(f"cannot unmark {display} as being formatted: "
                              f"{e.strerror}") from None


def formatting_interrupted(image: int | str) -> bool:
    """Whether a format of this image (an fd or a path) in place was killed before it ended."""
    try:
        os.getxattr(image, _FORMATTING_XATTR)
    except OSError:
        return False
    return True


def virtual_size(fd: int) -> int:
    """The size of the disk an image file holds: its own size, or a qcow2 header's."""
    header = os.pread(fd, 32, 0)  # magic, version, backing file offset and length, size
    if header.startswith(_QCOW2_MAGIC) and len(header) == 32:
        return int.from_bytes(header[24:32], "big")
    return os.fstat(fd).st_size


def _temp_name(name: str) -> str:
    return f".{name}{_TEMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _remove_abandoned_temps(dir_fd: int, name: str) -> None:
    """Unlink earlier creators' temporary images that no live process holds (killed drivers)."""
    prefix = f".{name}{_TEMP_MARK}"
    with os.scandir(dir_fd) as entries:
        stale = [e.name for e in entries if e.name.startswith(prefix)]
    for temp in stale:
        try:
            fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dir_fd)
        except OSError:
            continue
        try:
            loopctl.lock_image(fd, path=temp)
            os.unlink(temp, dir_fd=dir_fd)
        except (loopctl.ImageBusy, OSError):
            pass  # alive, or gone meanwhile
        finally:
            os.close(fd)


def check_capacity(fd: int, size: int, display: str) -> None:
    """Refuse a size beyond the capacity of the whole filesystem that holds the image (*fd*).

    Nothing could ever fill such an image, and the tools go wild on one (the size is the pod
    author's, or the PVC's): xfs_growfs of a 320 MiB volume to 4 EiB keeps a CPU busy for
    minutes and exhausts the node's memory; mkfs writes until the share is full.
    """
    st = os.fstatvfs(fd)
    capacity = st.f_blocks * st.f_frsize
    if size > capacity:
        raise DriverError(f"{display}: {size} bytes is more than the whole filesystem holding "
                          f"it ({capacity} bytes)")


def _create(dir_fd: int, name: str, display: str, size: int, allocate: bool) -> Image:
    check_capacity(dir_fd, size, display)
    _remove_abandoned_temps(dir_fd, name)
    temp = _temp_name(name)
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
    except OSError as e:  # a full or read-only share: name the volume, not our temporary
        raise DriverError(f"cannot create {display}: {e.strerror}") from None
    image = Image(fd, dir_fd, name, display, temp)
    try:
        # Locked from birth, so that _remove_abandoned_temps can tell it is alive.
        loopctl.lock_image(fd, path=display)
        _faultpoint.reached("create")
        if allocate:
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as e:
        image.discard()
        os.close(fd)
        raise DriverError(f"cannot allocate {size} bytes for {display}: {e.strerror}") from None
    _faultpoint.reached("allocate")
    return image
