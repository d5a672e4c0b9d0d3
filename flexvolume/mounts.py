"""The mount table (/proc/self/mountinfo) and mount(2)/umount2(2) through the binding.

mountinfo, unlike /proc/mounts, gives each mount's device number, so a mount point leads to
its loop device without parsing device paths.
"""

from __future__ import annotations

import collections
import errno
import os
import re

from ._ffi import ffi, lib
from .errors import DriverError

MOUNTINFO = "/proc/self/mountinfo"
# Kernel pseudo-filesystems: never a share, whatever a pod spec says.
PSEUDO_FS_TYPES = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
    "tracefs", "bpf", "configfs", "pstore", "mqueue", "hugetlbfs", "fusectl", "binfmt_misc",
    "autofs", "efivarfs", "rpc_pipefs", "nsfs", "nfsd", "selinuxfs"})

_ESCAPE = re.compile(r"\\([0-7]{3})")

# Flag-like mount options and their MS_* bits; "ro" is handled as a read-only volume.
_FLAG_OPTIONS = {
    "noatime": lib.MS_NOATIME, "nodiratime": lib.MS_NODIRATIME, "relatime": lib.MS_RELATIME,
    "strictatime": lib.MS_STRICTATIME, "lazytime": lib.MS_LAZYTIME,
    "sync": lib.MS_SYNCHRONOUS, "dirsync": lib.MS_DIRSYNC, "noexec": lib.MS_NOEXEC,
    "nosuid": lib.MS_NOSUID, "ro": 0, "rw": 0, "exec": 0, "suid": 0, "async": 0, "defaults": 0,
}
# Filesystem options a pod spec may pass: value pattern, or None for a bare word. Anything
# else is refused: some options are node-wide hazards (errors=panic, journal_path=...).
_NUMBER = r"\d+"
_EXT_OPTIONS = {
    "discard": None, "nodiscard": None, "data": r"ordered|writeback|journal", "barrier": r"[01]",
    "nobarrier": None, "commit": _NUMBER, "delalloc": None, "nodelalloc": None,
    "auto_da_alloc": None, "noauto_da_alloc": None, "user_xattr": None, "acl": None,
    "noacl": None, "errors": r"remount-ro|continue", "dioread_nolock": None,
    "dioread_lock": None, "journal_checksum": None, "nojournal_checksum": None,
    "inode_readahead_blks": _NUMBER, "stripe": _NUMBER, "max_batch_time": _NUMBER,
    "min_batch_time": _NUMBER, "init_itable": _NUMBER, "noinit_itable": None, "grpid": None,
    "bsdgroups": None, "nogrpid": None, "sysvgroups": None, "quota": None, "noquota": None,
    "usrquota": None, "grpquota": None, "prjquota": None,
}
_FS_OPTIONS = {
    "ext4": _EXT_OPTIONS,
    "ext3": _EXT_OPTIONS,
    # ext2 has no journal: no data= modes, no journal checksums
    "ext2": {k: v for k, v in _EXT_OPTIONS.items() if "journal" not in k and k != "data"},
    "xfs": {
        "discard": None, "nodiscard": None, "inode32": None, "inode64": None, "largeio": None,
        "nolargeio": None, "nouuid": None, "noalign": None, "swalloc": None,
        "logbufs": _NUMBER, "logbsize": r"\d+[kKmM]?", "allocsize": r"\d+[kKmMgG]?",
        "grpid": None, "nogrpid": None, "bsdgroups": None, "sysvgroups": None,
        "filestreams": None, "ikeep": None, "noikeep": None, "wsync": None, "uquota": None,
        "usrquota": None, "gquota": None, "grpquota": None, "pquota": None, "prjquota": None,
        "noquota": None, "sunit": _NUMBER, "swidth": _NUMBER,
    },
    "btrfs": {
        "compress": r"[a-z]+(:\d+)?", "compress-force": r"[a-z]+(:\d+)?", "discard": r"sync|async",
        "nodiscard": None, "ssd": None, "nossd": None, "ssd_spread": None, "autodefrag": None,
        "noautodefrag": None, "space_cache": r"v[12]", "nospace_cache": None, "commit": _NUMBER,
        "flushoncommit": None, "noflushoncommit": None, "datacow": None, "nodatacow": None,
        "datasum": None, "nodatasum": None, "barrier": None, "nobarrier": None, "acl": None,
        "noacl": None, "subvol": r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", "subvolid": _NUMBER,
        "thread_pool": _NUMBER, "max_inline": _NUMBER,
    },
}


# mount_table(): one line of mountinfo; devno is the mounted filesystem's st_dev
MountEntry = collections.namedtuple("MountEntry", "mount_id devno root mount_point fs_type source")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    entries = []
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            # id parent major:minor root mount-point options [optional...] - type source super
            fields = line.split()
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entries.append(MountEntry(int(fields[0]), os.makedev(int(major), int(minor)),
                                      _unescape(fields[3]), _unescape(fields[4]),
                                      fields[sep + 1], _unescape(fields[sep + 2])))
    return entries


def mount_at(path: str) -> MountEntry | None:
    """The mount visible at *path* (the last one mounted there), if *path* is a mount point."""
    found = None
    for entry in mount_table():
        if entry.mount_point == path:
            found = entry
    return found


def mounts_of(devno: int) -> list[MountEntry]:
    return [entry for entry in mount_table() if entry.devno == devno]


def mount_arguments(fs_type: str, words: tuple[str, ...], read_only: bool) -> tuple[int, str]:
    """mount(2) flags and data for a pod volume: always nodev, since the filesystem's content
    is the pod author's; read-only when asked; the rest from the pod's mountOptions."""
    flags = lib.MS_NODEV | (lib.MS_RDONLY if read_only else 0)
    data = []
    allowed = _FS_OPTIONS[fs_type]
    for word in words:
        name, _, value = word.partition("=")
        if word in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[word]
        elif name in allowed and (allowed[name] is None) == (value == "") and (
                not value or re.fullmatch(allowed[name], value)):
            data.append(word)
        else:
            raise DriverError(f"option 'mountOptions': {word!r} is not allowed for {fs_type}")
    if fs_type == "xfs" and read_only and "nouuid" not in data:
        # Two pods sharing an image read-only get two loop devices with one XFS UUID, and XFS
        # refuses to mount a UUID twice without nouuid.
        data.append("nouuid")
    return flags, ",".join(data)


def mount(source: str, target: str, fs_type: str, flags: int, data: str) -> None:
    # fsencode: paths are bytes to the kernel; kubelet's may hold any (Python's surrogates).
    r = lib.fb_mount(os.fsencode(source), os.fsencode(target), fs_type.encode(),
                     flags | lib.MS_SILENT, data.encode() if data else ffi.NULL)
    if r < 0:
        raise OSError(-r, os.strerror(-r), target)


def unmount(target: str) -> None:
    """umount2 without following a symlink planted at *target*; EINVAL means not mounted."""
    r = lib.fb_umount(os.fsencode(target), lib.UMOUNT_NOFOLLOW)
    if r < 0 and r != -errno.EINVAL:
        raise OSError(-r, os.strerror(-r), target)
