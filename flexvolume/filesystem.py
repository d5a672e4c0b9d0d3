"""What lives on a volume's block device: probing, mkfs, MMP, fsck and online growth.

The tools are e2fsprogs, xfsprogs and btrfs-progs, run with no access to the driver's stdout
or stderr (kubelet reads those as the reply) and each with a time bound, since kubelet waits
forever on a hung driver.
"""

from __future__ import annotations

import os
import struct

from .errors import DriverError

MKFS_TIMEOUT = 600.0
FSCK_TIMEOUT = 1800.0
TOOL_TIMEOUT = 120.0
_OUTPUT_TAIL = 2000
# How much of an image's allocated data we read before calling it blank; past that we assume
# it holds data (and refuse to format it).
_BLANK_SCAN_LIMIT = 64 << 20

# ext2/3/4 superblock: 1024 bytes into the device; fields at their offsets in struct
# ext4_super_block (fs/ext4/ext4.h).
_EXT_SB_OFFSET = 1024
_EXT_MAGIC = 0xEF53          # s_magic, 0x38
_EXT_VALID_FS = 0x0001       # s_state (0x3A): cleanly unmounted
_EXT_ERROR_FS = 0x0002       # s_state: errors detected
_EXT_COMPAT_HAS_JOURNAL = 0x0004         # s_feature_compat, 0x5C
_EXT_INCOMPAT_RECOVER = 0x0004           # s_feature_incompat (0x60): journal needs replay
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008       # an external journal, not a filesystem
_EXT_INCOMPAT_MMP = 0x0100
_EXT_INCOMPAT_64BIT = 0x0080             # s_blocks_count_hi (0x150) is in use
_EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # FILETYPE, RECOVER, META_BG
_EXT3_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # s_feature_ro_compat (0x64): SPARSE_SUPER,
#                                             LARGE_FILE, BTREE_DIR
_XFS_MAGIC = b"XFSB"          # xfs_dsb.sb_magicnum, at 0
_BTRFS_MAGIC = b"_BHRfS_M"    # btrfs_super_block.magic, at 64 KiB + 0x40
_BTRFS_SB_OFFSET = 0x10000


def signature(fd: int) -> str | None:
    """The filesystem a device holds, among those we mount, from its superblock magic.

    This spares the common mount a blkid process; anything it does not recognise goes to
    probe(), and only probe() decides that a device holds nothing and may be formatted.
    """
    head = os.pread(fd, 2048, 0)
    if head[:4] == _XFS_MAGIC:
        return "xfs"
    if len(head) >= 2048:
        magic, = struct.unpack_from("<H", head, _EXT_SB_OFFSET + 0x38)
        if magic == _EXT_MAGIC:
            compat, incompat, ro_compat = struct.unpack_from("<III", head, _EXT_SB_OFFSET + 0x5C)
            if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
                return None
            # blkid's rule: features beyond ext3's make ext4; a journal makes ext3.
            if incompat & ~_EXT3_INCOMPAT or ro_compat & ~_EXT3_RO_COMPAT:
                return "ext4"
            return "ext3" if compat & _EXT_COMPAT_HAS_JOURNAL else "ext2"
    if os.pread(fd, 8, _BTRFS_SB_OFFSET + 0x40) == _BTRFS_MAGIC:
        return "btrfs"
    return None


def declared_size(fd: int, fs_type: str) -> int:
    """The bytes the filesystem on *fd* spans by its own superblock: more than the device has
    means the image was truncated (or the superblock is damaged)."""
    if fs_type in ("ext2", "ext3", "ext4"):
        sb = os.pread(fd, 1024, _EXT_SB_OFFSET)
        # s_blocks_count_lo, s_log_block_size, s_feature_incompat, s_blocks_count_hi
        blocks, = struct.unpack_from("<I", sb, 0x04)
        log_block_size, = struct.unpack_from("<I", sb, 0x18)
        incompat, = struct.unpack_from("<I", sb, 0x60)
        if incompat & _EXT_INCOMPAT_64BIT:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        return blocks * (1024 << min(log_block_size, 16))
    if fs_type == "xfs":
        block_size, data_blocks = struct.unpack_from(">IQ", os.pread(fd, 16, 0), 4)
        return block_size * data_blocks  # sb_blocksize, sb_dblocks
    total, = struct.unpack_from("<Q", os.pread(fd, 8, _BTRFS_SB_OFFSET + 0x70))  # total_bytes
    return total


def run(argv: list[str], what: str, *, timeout: float = TOOL_TIMEOUT,
        ok_codes: tuple[int, ...] = (0,), pass_fds: tuple[int, ...] = ()
        ):
    """Run a tool with no access to our stdio; DriverError with its output if it fails."""
    import subprocess  # unmount and init never run a tool; spare them the import

    from ._ffi import lib

    parent = os.getpid()
    try:
        # A tool outliving a killed driver would keep the image (and its lock) busy, and a
        # kubelet retry would race it: tools die with the driver.
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                errors="replace", timeout=timeout, pass_fds=pass_fds,
                                preexec_fn=lambda: lib.fb_die_with_parent(parent))
    except FileNotFoundError:
        raise DriverError(f"{what}: {argv[0]} is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise DriverError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if result.returncode not in ok_codes:
        output = (result.stderr.strip() or result.stdout.strip())[-_OUTPUT_TAIL:]
        raise DriverError(f"{what} failed (exit {result.returncode}): {output}")
    return result


def probe(device: str) -> dict[str, str]:
    """blkid's low-level probe of *device*: {} when it finds no signature at all."""
    result = run(["blkid", "-p", "-o", "export", device], f"probing {device}", ok_codes=(0, 2))
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def is_blank(fd: int) -> bool:
    """True if the file holds nothing but zeros (holes count as zeros)."""
    size = os.fstat(fd).st_size
    offset = scanned = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return True  # ENXIO: no data after offset
        end = os.lseek(fd, start, os.SEEK_HOLE)
        while start < end:
            chunk = os.pread(fd, min(1 << 20, end - start), start)
            if not chunk:
                break  # the file shrank meanwhile
            if chunk.count(0) != len(chunk):
                return False
            start += len(chunk)
            scanned += len(chunk)
            if scanned > _BLANK_SCAN_LIMIT:
                return False
        offset = end
    return True


def mkfs(target: str, fs_type: str, *, mmp: bool, mmp_interval: int,
         pass_fds: tuple[int, ...] = ()) -> None:
    """Format *target*, a block device or an image file."""
    if fs_type in ("ext4", "ext3"):
        # 4 KiB blocks whatever the size: below 512 MiB mke2fs picks 1 KiB ones, and each
        # write of one is a partial page of the image file, which an NFS client must first
        # READ from the server (3000 small files: 1189 READs instead of none).
        argv = [f"mkfs.{fs_type}", "-q", "-F", "-b", "4096"]
        if mmp and fs_type == "ext4":
            argv += ["-O", "mmp", "-E", f"mmp_update_interval={mmp_interval}"]
    elif fs_type == "xfs":
        argv = ["mkfs.xfs", "-q", "-f"]
    else:
        argv = ["mkfs.btrfs", "-q", "-f"]
    run(argv + [target], f"mkfs.{fs_type}", timeout=MKFS_TIMEOUT, pass_fds=pass_fds)


class ExtState:
    """The few ext superblock facts the driver decides on."""

    def __init__(self, raw: bytes):
        (magic, state) = struct.unpack_from("<HH", raw, 0x38)
        if magic != _EXT_MAGIC:
            raise DriverError("not an ext2/3/4 superblock")
        (incompat,) = struct.unpack_from("<I", raw, 0x60)
        self.clean = bool(state & _EXT_VALID_FS) and not state & _EXT_ERROR_FS and \
            not incompat & _EXT_INCOMPAT_RECOVER
        self.mmp = bool(incompat & _EXT_INCOMPAT_MMP)


def ext_state(device_fd: int) -> ExtState:
    return ExtState(os.pread(device_fd, 1024, _EXT_SB_OFFSET))


def enable_mmp(device: str, interval: int) -> None:
    """Turn on multi-mount protection in an existing ext4 filesystem (unmounted, ours)."""
    run(["tune2fs", "-O", "mmp", "-E", f"mmp_update_interval={interval}", device],
        f"enabling MMP on {device}")


def fsck(device: str, fs_type: str, options: str) -> None:
    """Check and repair: exit 1 means errors were corrected, 2 corrected but the system "should
    be rebooted" (a root-filesystem notion, meaningless for a volume); 4 and up are failures."""
    run([f"fsck.{fs_type}", f"-{options}", device], f"fsck of {device}",
        timeout=FSCK_TIMEOUT, ok_codes=(0, 1, 2))


def grow(fs_type: str, device: str, mount_point: str) -> None:
    """Grow a mounted filesystem to the size of its device."""
    if fs_type in ("ext4", "ext3", "ext2"):
        argv = ["resize2fs", device]
    elif fs_type == "xfs":
        argv = ["xfs_growfs", mount_point]
    else:
        argv = ["btrfs", "filesystem", "resize", "max", mount_point]
    run(argv, f"growing {fs_type} on {device}", timeout=MKFS_TIMEOUT)
