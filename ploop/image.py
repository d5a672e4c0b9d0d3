"""The ploop image ("delta") format: create, read, check and grow images.

Facts: shared/reference/ploop-format.md §1 (P = OpenVZ ploop, Q = qemu block/parallels.c).
The 64-byte little-endian header (P include/ploop1_image.h, Q parallels.h) is

    off  size  field            meaning
      0    16  signature        b"WithoutFreeSpace" (v1) or b"WithouFreSpacExt" (v2)
     16     4  version          m_Type, always 2
     20     4  heads            geometry only
     24     4  cylinders        geometry only
     28     4  tracks           the cluster size in 512-byte sectors
     32     4  bat_entries      one BAT entry per virtual cluster
     36     8  nb_sectors       disk size in sectors (v1: the low 32 bits only)
     44     4  in_use           IN_USE while open read-write, 0 (or CLOSED_V21) when closed
     48     4  data_off         start of the data area, in sectors
     52     4  flags            bit 0 CIF_EMPTY, bit 1 CIF_FmtVersionConvert
     56     8  ext_off          format extension cluster, in sectors

and the BAT of u32 entries follows at offset 64: 0 is an unallocated cluster (reads as zeros),
anything else a file offset, in sectors for v1 and in clusters for v2.

New images are v2 and laid out exactly as `qemu-img create -f parallels` lays them out (the
header differs in the flags only): a new expanded image carries CIF_EMPTY as `ploop init`
writes it, and the flag is cleared as soon as a cluster is allocated, because the vz7 kernel
trusts it and would not read the BAT of an "empty" image.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import itertools
import os
import struct
import sys
import time

from .errors import CorruptImage, ImageBusy, InvalidArgument, PloopError, UnsupportedImage

SECTOR = 512
SIGNATURES = {b"WithoutFreeSpace": 1, b"WithouFreSpacExt": 2}
TYPE_COMPRESSED = 2            # m_Type; the only one P and Q accept
IN_USE = 0x746F6E59            # "Ynot": open read-write, or not closed cleanly
CLOSED_V21 = 0x312E3276        # closed, a format extension may be present (ploop with CBT)
CIF_EMPTY = 1 << 0
EXT_MAGIC = 0xAB234CEF23DCEA87  # first u64 of the format extension cluster
HEADER = struct.Struct("<16s5IQ3IQ")
BAT_OFFSET = HEADER.size       # PLOOP_MAP_OFFSET: the header takes the first 16 u32 slots
MIN_CLUSTER = 64 * SECTOR      # P is_valid_blocksize: a power of two from 32 KiB to 64 MiB
MAX_CLUSTER = 131072 * SECTOR
DEFAULT_CLUSTER = 1 << 20      # P default_fmt_version/blocksize: v2, 2048 sectors
DEFAULT_VERSION = 2
HEADS = 16                     # Q parallels_co_create's geometry
SECTORS_PER_TRACK = 32
MODES = ("expanded", "preallocated", "raw")
U32 = 0xFFFFFFFF
LOCK_POLL = 0.05

# read_header(), layout(): the header's fields, named as qemu names them; version is 1 or 2
Header = collections.namedtuple(
    "Header", "version heads cylinders tracks bat_entries nb_sectors in_use data_off flags "
              "ext_off")
# info(): what an image holds; sizes and offsets in bytes
ImageInfo = collections.namedtuple(
    "ImageInfo", "path version size cluster_size bat_entries data_offset in_use flags empty "
                 "ext_offset allocated_clusters file_size")
# Image.map(): a run of clusters, allocated contiguously in the file or not at all
Extent = collections.namedtuple("Extent", "start length allocated file_offset")
# check(): problems are corruptions (qemu-img check counts an unclean image as one); leaked
# clusters are file space past the last cluster in use
CheckResult = collections.namedtuple(
    "CheckResult", "path clean in_use problems leaked_clusters allocated_clusters")


def cluster_size(header: Header) -> int:
    return header.tracks * SECTOR


def disk_size(header: Header) -> int:
    return header.nb_sectors * SECTOR


def layout(size: int, cluster: int = DEFAULT_CLUSTER, version: int = DEFAULT_VERSION) -> Header:
    """The header of a new image of at least *size* bytes (rounded up to whole clusters, as
    ploop does and as its kernel drivers need) with an empty BAT."""
    if cluster < MIN_CLUSTER or cluster > MAX_CLUSTER or cluster & (cluster - 1):
        raise InvalidArgument(f"cluster size {cluster} is not a power of two from "
                              f"{MIN_CLUSTER} to {MAX_CLUSTER}")
    if version not in (1, 2):
        raise InvalidArgument(f"format version {version} is not 1 or 2")
    if size <= 0:
        raise InvalidArgument(f"size {size} is not positive")
    tracks = cluster // SECTOR
    bat_entries = -(-size // cluster)
    nb_sectors = bat_entries * tracks
    data_off = -(-(BAT_OFFSET + 4 * bat_entries) // cluster) * tracks
    # P get_max_ploop_size: a v1 BAT entry is a sector offset, a v2 one a cluster number.
    last = data_off + nb_sectors if version == 1 else data_off // tracks + bat_entries
    if last > U32:
        raise InvalidArgument(f"size {size} is too large for a v{version} image with "
                              f"{cluster}-byte clusters")
    cylinders = (nb_sectors // (HEADS * SECTORS_PER_TRACK)) & U32
    return Header(version, HEADS, cylinders, tracks, bat_entries, nb_sectors, 0, data_off,
                  CIF_EMPTY, 0)


def pack_header(header: Header) -> bytes:
    signature = next(s for s, v in SIGNATURES.items() if v == header.version)
    return HEADER.pack(signature, TYPE_COMPRESSED, header.heads, header.cylinders,
                       header.tracks, header.bat_entries, header.nb_sectors, header.in_use,
                       header.data_off, header.flags, header.ext_off)


def parse_header(data: bytes, path: str | None = None) -> Header:
    """The header in *data*, checked against the rules P enforces when it opens a delta
    (P lib/delta_read.c open_delta, lib/util.c is_valid_blocksize)."""
    if len(data) < HEADER.size:
        raise CorruptImage("too short for a ploop header", path)
    (signature, kind, heads, cylinders, tracks, bat_entries, nb_sectors, in_use, data_off,
     flags, ext_off) = HEADER.unpack_from(data)
    version = SIGNATURES.get(signature)
    if version is None:
        raise CorruptImage(f"not a ploop image (signature {signature!r})", path)
    if kind != TYPE_COMPRESSED:
        raise CorruptImage(f"header version is {kind}, not {TYPE_COMPRESSED}", path)
    if tracks == 0:
        raise CorruptImage("cluster size is 0", path)
    if tracks * SECTOR < MIN_CLUSTER or tracks * SECTOR > MAX_CLUSTER or tracks & (tracks - 1):
        raise UnsupportedImage(f"cluster size {tracks * SECTOR} is not a power of two from "
                               f"{MIN_CLUSTER} to {MAX_CLUSTER}", path)
    if version == 1:
        nb_sectors &= U32  # Q parallels_open; check() reports a non-zero high half
    if data_off == 0 or data_off % tracks:
        raise CorruptImage(f"data offset {data_off} (sectors) is not a non-zero multiple of "
                           f"the cluster", path)
    if data_off * SECTOR < BAT_OFFSET + 4 * bat_entries:
        raise CorruptImage(f"data offset {data_off} (sectors) lies inside the BAT", path)
    if nb_sectors > bat_entries * tracks:
        raise CorruptImage(f"disk size {nb_sectors} sectors exceeds what {bat_entries} BAT "
                           "entries cover", path)
    return Header(version, heads, cylinders, tracks, bat_entries, nb_sectors, in_use, data_off,
                  flags, ext_off)


def _pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptImage(f"file ends before byte {offset + length}", path)
    return data


def lock(fd: int, path: str, *, shared: bool = False, timeout: float = 0.0) -> None:
    """An open-file-description lock on the whole file, waiting up to *timeout* seconds. An
    exclusive one conflicts with the byte locks qemu takes on the images it opens and with
    ploop's (bytes 200-204 and 300-304, P lib/lock.c), here and, on NFSv4/CephFS, on other
    hosts. It lasts until every fd of the description is closed."""
    request = struct.pack("@hhqqi4x", fcntl.F_RDLCK if shared else fcntl.F_WRLCK, os.SEEK_SET,
                          0, 0, 0)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise PloopError(e.errno, f"cannot lock the image: {e.strerror}", path) from None
        if time.monotonic() >= deadline:
            raise ImageBusy("image is open elsewhere (qemu, ploop or another writer)", path)
        time.sleep(LOCK_POLL)


class Image:
    """An open ploop image (v1 or v2).

    Opened writable, it is locked (see lock()) and marked in use, as qemu and ploop do, until
    close(): a crash leaves the in-use flag set, and the next user repairs the image first.
    An image already marked in use, or carrying a format extension, is not opened writable.
    """

    def __init__(self, path: str | os.PathLike, *, writable: bool = False):
        self.path = os.fspath(path)
        self.writable = writable
        self.fd = os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            self.header = parse_header(os.pread(self.fd, HEADER.size, 0), self.path)
            self.bat = self._read_bat()
            if writable:
                self._begin_writing()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_bat(self) -> array.array:
        bat = array.array("I", _pread_exact(self.fd, 4 * self.header.bat_entries, BAT_OFFSET,
                                            self.path))
        if sys.byteorder == "big":
            bat.byteswap()
        return bat

    def _begin_writing(self) -> None:
        lock(self.fd, self.path)
        if self.header.in_use == IN_USE:
            raise ImageBusy("in-use flag is set: open elsewhere, or not closed cleanly "
                            "(repair with check --repair)", self.path)
        if self.header.ext_off:
            raise UnsupportedImage("image has a format extension (CBT); drop it first",
                                   self.path)
        self._write_header(self.header._replace(in_use=IN_USE))

    def _write_header(self, header: Header) -> None:
        os.pwrite(self.fd, pack_header(header), 0)
        os.fsync(self.fd)
        self.header = header

    @property
    def cluster_size(self) -> int:
        return cluster_size(self.header)

    @property
    def size(self) -> int:
        return disk_size(self.header)

    def file_offset(self, entry: int) -> int:
        """The byte offset in the file that a non-zero BAT entry points to."""
        return entry * (SECTOR if self.header.version == 1 else self.cluster_size)

    def _entry_for(self, offset: int) -> int:
        return offset // (SECTOR if self.header.version == 1 else self.cluster_size)

    def file_size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_clusters(self) -> int:
        return len(self.bat) - self.bat.count(0)

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes [offset, offset+length), walking the BAT (unallocated reads as 0)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside the disk "
                                  f"({self.size} bytes)", self.path)
        cluster = self.cluster_size
        parts = []
        while length:
            index, within = divmod(offset, cluster)
            chunk = min(length, cluster - within)
            entry = self.bat[index]
            if entry:
                parts.append(_pread_exact(self.fd, chunk, self.file_offset(entry) + within,
                                          self.path))
            else:
                parts.append(bytes(chunk))
            offset += chunk
            length -= chunk
        return b"".join(parts)

    def _require_writable(self) -> None:
        if not self.writable:
            raise PloopError(errno.EBADF, "image is open read-only", self.path)

    def _append_cluster(self, data: bytes, floor: int = 0) -> int:
        """Write one cluster past the end of the data and past *floor* (the file size stays
        a multiple of the cluster) and return its BAT entry; data first, so no entry points
        at garbage."""
        cluster = self.cluster_size
        end = max(self.file_size(), self.header.data_off * SECTOR, floor)
        end = -(-end // cluster) * cluster
        os.pwrite(self.fd, data, end)
        return self._entry_for(end)

    def _set_entry(self, index: int, entry: int) -> None:
        self.bat[index] = entry
        os.pwrite(self.fd, struct.pack("<I", entry), BAT_OFFSET + 4 * index)

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes, allocating clusters at the end of the file as qemu does."""
        self._require_writable()
        if offset < 0 or offset + len(data) > self.size:
            raise InvalidArgument(f"range {offset}+{len(data)} is outside the disk "
                                  f"({self.size} bytes)", self.path)
        cluster = self.cluster_size
        view = memoryview(data)
        while view:
            index, within = divmod(offset, cluster)
            chunk = min(len(view), cluster - within)
            entry = self.bat[index]
            if entry:
                os.pwrite(self.fd, view[:chunk], self.file_offset(entry) + within)
            else:
                block = bytearray(cluster)
                block[within:within + chunk] = view[:chunk]
                self._set_entry(index, self._append_cluster(bytes(block)))
            offset += chunk
            view = view[chunk:]

    def map(self) -> list[Extent]:
        """Runs of clusters: unallocated, or allocated at contiguous file offsets (the runs
        `qemu-img map` reports)."""
        cluster = self.cluster_size
        extents: list[Extent] = []
        for index, entry in enumerate(self.bat):
            start = index * cluster
            length = min(cluster, self.size - start)
            if length <= 0:
                break
            file_offset = self.file_offset(entry) if entry else None
            if extents:
                last = extents[-1]
                contiguous = (file_offset is None if last.file_offset is None else
                              file_offset == last.file_offset + last.length)
                if contiguous:
                    extents[-1] = last._replace(length=last.length + length)
                    continue
            extents.append(Extent(start, length, entry != 0, file_offset))
        return extents

    def info(self) -> ImageInfo:
        h = self.header
        return ImageInfo(self.path, h.version, self.size, self.cluster_size, h.bat_entries,
                         h.data_off * SECTOR, h.in_use == IN_USE, h.flags,
                         bool(h.flags & CIF_EMPTY), h.ext_off * SECTOR,
                         self.allocated_clusters(), self.file_size())

    def check(self) -> CheckResult:
        """The checks of P lib/check.c and Q parallels_co_check, read-only."""
        h = self.header
        cluster = self.cluster_size
        file_size = self.file_size()
        problems = []
        if h.in_use == IN_USE:
            problems.append("image was not closed cleanly (in-use flag set)")
        elif h.in_use not in (0, CLOSED_V21):
            problems.append(f"unknown in-use value {h.in_use:#x}")
        if h.version == 1 and os.pread(self.fd, 4, 40) != bytes(4):
            problems.append("v1 disk size has a non-zero high half")
        if file_size % cluster:
            problems.append(f"file size {file_size} is not a multiple of the cluster")
        disk_clusters = -(-h.nb_sectors // h.tracks)
        data_start = h.data_off * SECTOR
        seen: dict[int, int] = {}
        high = data_start
        for index in itertools.compress(range(len(self.bat)), self.bat):  # allocated only
            where = self.file_offset(self.bat[index])
            if index >= disk_clusters:
                problems.append(f"BAT entry {index} lies beyond the disk")
            if where % cluster:
                problems.append(f"BAT entry {index} points to unaligned offset {where}")
            if where < data_start:
                problems.append(f"BAT entry {index} points into the header ({where})")
            elif where + cluster > file_size:
                problems.append(f"BAT entry {index} points past the end of the file ({where})")
            if where in seen:
                problems.append(f"BAT entries {seen[where]} and {index} share offset {where}")
            seen.setdefault(where, index)
            high = max(high, where + cluster)
        allocated = self.allocated_clusters()
        if h.flags & CIF_EMPTY and allocated:
            problems.append(f"empty flag set while {allocated} clusters are allocated")
        if h.ext_off:
            ext = os.pread(self.fd, 8, h.ext_off * SECTOR)
            if len(ext) != 8 or struct.unpack("<Q", ext)[0] != EXT_MAGIC:
                problems.append(f"format extension offset {h.ext_off * SECTOR} holds no "
                                "extension")
            else:
                high = max(high, h.ext_off * SECTOR + cluster)
        leaked = max(0, file_size - high) // cluster
        return CheckResult(self.path, not problems and not leaked, h.in_use == IN_USE,
                           tuple(problems), leaked, allocated)

    def clear_empty_flag(self) -> bool:
        """Clear CIF_EMPTY if clusters are allocated (qemu never does); True if it was."""
        self._require_writable()
        if self.header.flags & CIF_EMPTY and self.allocated_clusters():
            self.header = self.header._replace(flags=self.header.flags & ~CIF_EMPTY)
            return True
        return False

    def _preallocate(self, first: int, end: int) -> None:
        """Allocate clusters for BAT entries [first, end) in order at the end of the file."""
        cluster = self.cluster_size
        start = -(-max(self.file_size(), self.header.data_off * SECTOR) // cluster) * cluster
        _allocate(self.fd, start + (end - first) * cluster, False, self.path)
        entries = _sequential_entries(self.header, self._entry_for(start), end - first)
        self.bat[first:end] = entries
        os.pwrite(self.fd, _bat_bytes(entries), BAT_OFFSET + 4 * first)

    def grow(self, size: int, *, preallocate: bool = False) -> None:
        """Grow the disk to *size* bytes (whole clusters), as `ploop grow` does offline:
        clusters in the way of the larger BAT move to the end of the file first, so a crash
        at any step leaves an image that check --repair restores (in use stays set)."""
        self._require_writable()
        h = self.header
        new = layout(size, self.cluster_size, h.version)
        if new.nb_sectors < h.nb_sectors:
            raise InvalidArgument(f"{size} bytes would shrink the disk ({self.size} bytes)",
                                  self.path)
        cluster = self.cluster_size
        new_start = new.data_off * SECTOR
        for index, entry in enumerate(self.bat):
            if entry and self.file_offset(entry) < new_start:
                data = _pread_exact(self.fd, cluster, self.file_offset(entry), self.path)
                moved = self._append_cluster(data, new_start)
                os.fsync(self.fd)
                self._set_entry(index, moved)
        os.fsync(self.fd)
        old_end = BAT_OFFSET + 4 * h.bat_entries
        os.pwrite(self.fd, bytes(new_start - old_end), old_end)
        self.bat.extend([0] * (new.bat_entries - h.bat_entries))
        if self.file_size() < new_start:
            os.ftruncate(self.fd, new_start)
        if preallocate:
            self._preallocate(h.bat_entries, new.bat_entries)
        os.fsync(self.fd)
        flags = h.flags & ~CIF_EMPTY if self.allocated_clusters() else h.flags
        self._write_header(new._replace(in_use=IN_USE, flags=flags))

    def close(self) -> None:
        """Make everything durable and, when writable, mark the image closed."""
        if self.fd < 0:
            return
        try:
            if self.writable:
                self.clear_empty_flag()
                self._write_header(self.header._replace(in_use=0))
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create(path: str | os.PathLike, size: int, *, mode: str = "expanded",
           cluster: int = DEFAULT_CLUSTER, version: int = DEFAULT_VERSION,
           sparse: bool = False) -> Header | None:
    """Create a new image file (never replacing one); see write_new()."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return write_new(fd, size, mode=mode, cluster=cluster, version=version, sparse=sparse,
                         path=path)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def write_new(fd: int, size: int, *, mode: str = "expanded", cluster: int = DEFAULT_CLUSTER,
              version: int = DEFAULT_VERSION, sparse: bool = False,
              path: str | None = None) -> Header | None:
    """Lay out a new image in the empty file *fd* and make it durable; returns its header
    (None for raw).

    expanded: header and an empty BAT, flags CIF_EMPTY (P create_image); the file grows as
    clusters are written. preallocated: every cluster allocated in order behind the BAT, the
    file fallocated. raw: a plain disk image (no header) of *size* bytes rounded up to whole
    clusters, fallocated unless *sparse*.
    """
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r} is not one of {', '.join(MODES)}", path)
    if mode == "raw":
        size = layout(size, cluster, version).nb_sectors * SECTOR  # the same checks, rounding
        _allocate(fd, size, sparse, path)
        os.fsync(fd)
        return None
    header = layout(size, cluster, version)
    start = header.data_off * SECTOR
    bat = b""
    if mode == "preallocated":
        header = header._replace(flags=0)
        first = header.data_off if version == 1 else header.data_off // header.tracks
        bat = _bat_bytes(_sequential_entries(header, first, header.bat_entries))
        _allocate(fd, start + disk_size(header), False, path)
    else:
        os.ftruncate(fd, start)
    os.pwrite(fd, pack_header(header) + bat, 0)
    os.fsync(fd)
    return header


def _sequential_entries(header: Header, first: int, count: int) -> array.array:
    """BAT entries for *count* clusters that follow each other from entry *first* on."""
    step = header.tracks if header.version == 1 else 1
    return array.array("I", range(first, first + step * count, step))


def _bat_bytes(entries: array.array) -> bytes:
    if sys.byteorder == "big":
        entries = array.array("I", entries)
        entries.byteswap()
    return entries.tobytes()


def _allocate(fd: int, size: int, sparse: bool, path: str | None) -> None:
    if sparse:
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise PloopError(e.errno, f"cannot allocate {size} bytes: {e.strerror}", path) from None


def read_header(path: str | os.PathLike) -> Header:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER.size), path)


def is_ploop_image(path: str | os.PathLike) -> bool:
    """Does the file start with a ploop signature (either version)?"""
    with open(path, "rb") as f:
        return f.read(16) in SIGNATURES


def info(path: str | os.PathLike) -> ImageInfo:
    with Image(path) as image:
        return image.info()


def check(path: str | os.PathLike) -> CheckResult:
    """Check an image read-only; an unreadable header is reported as the problem."""
    path = os.fspath(path)
    try:
        image = Image(path)
    except (CorruptImage, UnsupportedImage) as e:
        return CheckResult(path, False, False, (e.strerror,), 0, 0)
    with image:
        return image.check()


def grow(path: str | os.PathLike, size: int, *, preallocate: bool = False) -> Header:
    """Grow a closed image to *size* bytes; returns the new header."""
    with Image(path, writable=True) as image:
        image.grow(size, preallocate=preallocate)
    return read_header(path)


def drop_extension(path: str | os.PathLike) -> bool:
    """Forget a closed image's format extension (CBT), as `ploop check -d` does; True if
    there was one. qemu ignores the extension when it opens an image read-write and cuts it
    off when it truncates the file at close, leaving an offset that then makes every
    read-only open fail."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lock(fd, path)
        header = parse_header(os.pread(fd, HEADER.size, 0), path)
        if not header.ext_off:
            return False
        if header.in_use == IN_USE:
            raise ImageBusy("in-use flag is set: open elsewhere, or not closed cleanly", path)
        os.pwrite(fd, pack_header(header._replace(ext_off=0, in_use=0)), 0)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)
