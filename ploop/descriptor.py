"""DiskDescriptor.xml: the XML that names a ploop disk's images and their snapshot chain.

Facts: shared/reference/ploop-format.md §2 (P lib/xml.c parse_xml, validate_disk_descriptor).
Read with the stdlib's expat, refusing any DOCTYPE (so no entity, internal or external, is ever
expanded); written atomically (a temporary file, fsync, rename, fsync of the directory), as P
saves it, so a reader sees the old descriptor or the new one, never a mix.
"""

from __future__ import annotations

import collections
import os
import re
import xml.etree.ElementTree as ET
from xml.parsers import expat

from .errors import DescriptorError

FILENAME = "DiskDescriptor.xml"
ROOTS = ("Virtuozzo_disk_image", "Parallels_disk_image")  # ploop since 2020, and before
TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"        # P TOPDELTA_UUID: the top delta
ZERO_GUID = "{00000000-0000-0000-0000-000000000000}"       # the base's parent
TEMPORARY = ("Temporary", "TemporaryZero", "TemporaryZeroSwap")
TYPES = ("Compressed", "Plain")  # a ploop1 image, a raw one
MAX_SIZE = 1 << 20  # P's own descriptors are a few KiB; refuse anything absurd before parsing
_GUID = re.compile(r"\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}\}")
_NUMBER = re.compile(r"[0-9]+")

# Descriptor.images: one Storage/Image; type is "Compressed" (ploop1) or "Plain" (raw)
ImageEntry = collections.namedtuple("ImageEntry", "guid type file")
# Descriptor.snapshots: one Snapshots/Shot; temporary is None or one of TEMPORARY
Snapshot = collections.namedtuple("Snapshot", "guid parent_guid temporary")
# read(), for_image(): sizes in 512-byte sectors, as the XML has them
Descriptor = collections.namedtuple(
    "Descriptor", "disk_size cylinders heads sectors blocksize preallocated images snapshots "
                  "top_guid max_delta_size encryption_key_id root")


def geometry(disk_size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors) for *disk_size* sectors: the header's geometry (qemu's),
    with Sectors written as Disk_size/(Cylinders*Heads) as P writes it."""
    heads = 16
    cylinders = disk_size // (heads * 32)
    return cylinders, heads, disk_size // (cylinders * heads) if cylinders else 32


def for_image(file: str, disk_size: int, blocksize: int, *, raw: bool = False,
              preallocated: bool = False) -> Descriptor:
    """The descriptor of a disk made of one image, as `ploop init` writes it."""
    cylinders, heads, sectors = geometry(disk_size)
    return Descriptor(disk_size, cylinders, heads, sectors, blocksize, preallocated,
                      (ImageEntry(TOP_GUID, "Plain" if raw else "Compressed", file),),
                      (Snapshot(TOP_GUID, ZERO_GUID, None),), TOP_GUID, None, None,
                      ROOTS[0])


def top_image(descriptor: Descriptor) -> ImageEntry:
    return next(i for i in descriptor.images if i.guid == descriptor.top_guid)


def chain(descriptor: Descriptor) -> list[ImageEntry]:
    """The images from the base delta up to the top one."""
    by_guid = {i.guid: i for i in descriptor.images}
    parents = {s.guid: s.parent_guid for s in descriptor.snapshots}
    found, guid = [], descriptor.top_guid
    while guid != ZERO_GUID:
        found.append(by_guid[guid])
        guid = parents[guid]
    return found[::-1]


def image_path(directory: str | os.PathLike, entry: ImageEntry) -> str:
    """An image's file, which must lie in the descriptor's directory: named relative to it
    (as ploop names them) or by an absolute path into it. Anything else could make whoever
    can write a descriptor attach any file of the host."""
    directory = os.path.abspath(directory)
    name = entry.file
    if os.path.isabs(name) and os.path.dirname(os.path.normpath(name)) == directory:
        name = os.path.basename(os.path.normpath(name))
    if "/" in name or name in ("", ".", "..", FILENAME):
        raise DescriptorError(os.path.join(directory, FILENAME), "StorageData/Storage/Image/File",
                              f"{entry.file!r} is not a file in the volume's directory")
    return os.path.join(directory, name)


# -- reading -----------------------------------------------------------------------------------
def _no_doctype(*_args) -> None:
    raise ValueError("DOCTYPE declarations are not allowed")


def _parse_tree(data: bytes) -> ET.Element:
    """Expat into an ElementTree, with DTDs (and with them every entity) refused outright."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _no_doctype
    parser.EntityDeclHandler = _no_doctype
    parser.ExternalEntityRefHandler = _no_doctype
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    parser.Parse(data, True)
    return builder.close()


class _Reader:
    """Element lookups that name the element in every error."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, element: str, problem: str) -> DescriptorError:
        return DescriptorError(self.path, element, problem)

    def only(self, parent: ET.Element, name: str, where: str,
             required: bool = True) -> ET.Element | None:
        found = parent.findall(name)
        element = f"{where}/{name}" if where else name
        if len(found) > 1:
            raise self.fail(element, "appears more than once")
        if not found and required:
            raise self.fail(element, "missing")
        return found[0] if found else None

    def text(self, parent: ET.Element, name: str, where: str, required: bool = True) -> str | None:
        node = self.only(parent, name, where, required)
        if node is None:
            return None
        value = node.text or ""
        if not value:
            raise self.fail(f"{where}/{name}", "empty")
        if value != value.strip():
            raise self.fail(f"{where}/{name}", f"value {value!r} has surrounding whitespace")
        return value

    def number(self, parent: ET.Element, name: str, where: str,
               required: bool = True) -> int | None:
        value = self.text(parent, name, where, required)
        if value is None:
            return None
        if not _NUMBER.fullmatch(value):
            raise self.fail(f"{where}/{name}", f"{value!r} is not a number")
        return int(value)

    def guid(self, parent: ET.Element, name: str, where: str) -> str:
        value = self.text(parent, name, where)
        if len(value) != 38 or not _GUID.fullmatch(value):
            raise self.fail(f"{where}/{name}", f"{value!r} is not a GUID like {ZERO_GUID}")
        return value


def parse(data: bytes, path: str = FILENAME) -> Descriptor:
    """The descriptor in *data*, validated by P's rules; DescriptorError names the element."""
    r = _Reader(path)
    try:
        root = _parse_tree(data)
    except (expat.ExpatError, ValueError) as e:
        raise r.fail("/", f"not well-formed XML: {e}") from None
    if root.tag not in ROOTS:
        raise r.fail(root.tag, f"root element is not one of {', '.join(ROOTS)}")
    params = r.only(root, "Disk_Parameters", "")
    where = "Disk_Parameters"
    disk_size = r.number(params, "Disk_size", where)
    cylinders = r.number(params, "Cylinders", where, required=False) or 0
    heads = r.number(params, "Heads", where, required=False) or 0
    sectors = r.number(params, "Sectors", where, required=False) or 0
    max_delta = r.number(params, "Max_delta_size", where, required=False)
    encryption = r.only(params, "Encryption", where, required=False)
    key_id = (r.text(encryption, "KeyId", f"{where}/Encryption") if encryption is not None
              else None)

    storage_data = r.only(root, "StorageData", "")
    storages = storage_data.findall("Storage")
    if len(storages) != 1:
        raise r.fail("StorageData/Storage", f"{len(storages)} found; exactly one is supported "
                     "(split disks are not)")
    storage, where = storages[0], "StorageData/Storage"
    blocksize = r.number(storage, "Blocksize", where)
    if blocksize == 0 or blocksize & (blocksize - 1):
        raise r.fail(f"{where}/Blocksize", f"{blocksize} is not a power of two")
    preallocated = bool(r.number(storage, "Preallocated", where, required=False))
    images = []
    for node in storage.findall("Image"):
        at = f"{where}/Image[{len(images) + 1}]"
        kind = r.text(node, "Type", at)
        if kind not in TYPES:
            raise r.fail(f"{at}/Type", f"{kind!r} is not one of {', '.join(TYPES)}")
        images.append(ImageEntry(r.guid(node, "GUID", at), kind, r.text(node, "File", at)))
    if not images:
        raise r.fail(f"{where}/Image", "missing")
    if preallocated and any(i.type == "Plain" for i in images):
        raise r.fail(f"{where}/Preallocated", "a Plain (raw) image cannot be preallocated")

    snapshots_node = r.only(root, "Snapshots", "")
    top_guid = r.guid(snapshots_node, "TopGUID", "Snapshots")
    shots = []
    for node in snapshots_node.findall("Shot"):
        at = f"Snapshots/Shot[{len(shots) + 1}]"
        temporary = [t for t in TEMPORARY if node.find(t) is not None]
        shots.append(Snapshot(r.guid(node, "GUID", at), r.guid(node, "ParentGUID", at),
                              temporary[0] if temporary else None))
    descriptor = Descriptor(disk_size, cylinders, heads, sectors, blocksize, preallocated,
                            tuple(images), tuple(shots), top_guid, max_delta, key_id, root.tag)
    _validate_chain(r, descriptor)
    return descriptor


def _validate_chain(r: _Reader, d: Descriptor) -> None:
    if len(d.images) != len(d.snapshots):
        raise r.fail("Snapshots/Shot", f"{len(d.snapshots)} shots for {len(d.images)} images")
    guids = [i.guid for i in d.images]
    if len(set(guids)) != len(guids):
        raise r.fail("StorageData/Storage/Image/GUID", "two images share a GUID")
    shots = {s.guid: s for s in d.snapshots}
    if len(shots) != len(d.snapshots):
        raise r.fail("Snapshots/Shot/GUID", "two shots share a GUID")
    for guid in shots:
        if guid not in guids:
            raise r.fail("Snapshots/Shot/GUID", f"{guid} names no image")
    top = shots.get(d.top_guid)
    if top is None:
        raise r.fail("Snapshots/TopGUID", f"{d.top_guid} names no shot")
    if top.temporary:
        raise r.fail("Snapshots/TopGUID", f"{d.top_guid} is a temporary snapshot")
    seen, guid = set(), d.top_guid
    while guid != ZERO_GUID:
        if guid in seen:
            raise r.fail("Snapshots/Shot/ParentGUID", f"the chain loops at {guid}")
        if guid not in shots:
            raise r.fail("Snapshots/Shot/ParentGUID", f"parent {guid} names no shot")
        seen.add(guid)
        guid = shots[guid].parent_guid


def read(directory: str | os.PathLike) -> Descriptor:
    """The descriptor of the volume in *directory*."""
    path = os.path.join(os.fspath(directory), FILENAME)
    with open(path, "rb") as f:
        data = f.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise DescriptorError(path, "/", f"larger than {MAX_SIZE} bytes")
    return parse(data, path)


# -- writing -----------------------------------------------------------------------------------
def _sub(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
    node = ET.SubElement(parent, name)
    if text is not None:
        node.text = str(text)
    return node


def serialize(d: Descriptor) -> bytes:
    root = ET.Element(d.root)
    params = _sub(root, "Disk_Parameters")
    for name, value in (("Disk_size", d.disk_size), ("Cylinders", d.cylinders),
                        ("Heads", d.heads), ("Sectors", d.sectors), ("Padding", 0)):
        _sub(params, name, value)
    if d.max_delta_size is not None:
        _sub(params, "Max_delta_size", d.max_delta_size)
    if d.encryption_key_id is not None:
        _sub(_sub(params, "Encryption"), "KeyId", d.encryption_key_id)
    storage = _sub(_sub(root, "StorageData"), "Storage")
    _sub(storage, "Start", 0)
    _sub(storage, "End", d.disk_size)
    _sub(storage, "Blocksize", d.blocksize)
    if d.preallocated:
        _sub(storage, "Preallocated", 1)
    for image in d.images:
        node = _sub(storage, "Image")
        _sub(node, "GUID", image.guid)
        _sub(node, "Type", image.type)
        _sub(node, "File", image.file)
    snapshots = _sub(root, "Snapshots")
    _sub(snapshots, "TopGUID", d.top_guid)
    for shot in d.snapshots:
        node = _sub(snapshots, "Shot")
        _sub(node, "GUID", shot.guid)
        _sub(node, "ParentGUID", shot.parent_guid)
        if shot.temporary:
            _sub(node, shot.temporary)
    ET.indent(root, "  ")
    return b'<?xml version="1.0"?>\n' + ET.tostring(root, encoding="utf-8",
                                                     xml_declaration=False) + b"\n"


def write(directory: str | os.PathLike, descriptor: Descriptor, *,
          replace: bool = True) -> str:
    """Write the descriptor of the volume in *directory* atomically; returns its path.

    replace=False publishes it with link(2), which never replaces an existing descriptor
    (FileExistsError): of two creators exactly one wins.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, FILENAME)
    temp = os.path.join(directory, f".{FILENAME}.{os.urandom(8).hex()}.tmp")
    data = serialize(descriptor)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(temp, path)
        else:
            os.link(temp, path)
            os.unlink(temp)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)
    return path


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
