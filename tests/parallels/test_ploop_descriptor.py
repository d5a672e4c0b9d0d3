"""DiskDescriptor.xml: reading what ploop writes, its validation rules, atomic writes."""

from __future__ import annotations

import errno
import os

import pytest

from ploop import descriptor
from ploop.errors import DescriptorError

TOP = descriptor.TOP_GUID
BASE = "{3f1e2d4c-8a9b-4c7d-9e0f-112233445566}"
ZERO = descriptor.ZERO_GUID

# As ploop writes a disk with one snapshot (P lib/xml.c store_diskdescriptor): the old top got a
# random GUID, the new delta root.hds.{guid} is the top, under TOPDELTA_UUID.
PLOOP_WRITTEN = f"""<?xml version="1.0"?>
<Parallels_disk_image>
  <Disk_Parameters>
    <Disk_size>20971520</Disk_size>
    <Cylinders>40960</Cylinders>
    <Heads>16</Heads>
    <Sectors>32</Sectors>
    <Padding>0</Padding>
    <Max_delta_size>2147483648</Max_delta_size>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>20971520</End>
      <Blocksize>2048</Blocksize>
      <Image>
        <GUID>{BASE}</GUID>
        <Type>Compressed</Type>
        <File>root.hds</File>
      </Image>
      <Image>
        <GUID>{TOP}</GUID>
        <Type>Compressed</Type>
        <File>root.hds.{BASE}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{TOP}</TopGUID>
    <Shot>
      <GUID>{BASE}</GUID>
      <ParentGUID>{ZERO}</ParentGUID>
    </Shot>
    <Shot>
      <GUID>{TOP}</GUID>
      <ParentGUID>{BASE}</ParentGUID>
    </Shot>
  </Snapshots>
</Parallels_disk_image>
"""


def test_reads_a_snapshot_chain_written_by_ploop():
    d = descriptor.parse(PLOOP_WRITTEN.encode())
    assert d.root == "Parallels_disk_image"
    assert (d.disk_size, d.cylinders, d.heads, d.sectors, d.blocksize) == (
        20971520, 40960, 16, 32, 2048)
    assert d.max_delta_size == 2147483648 and not d.preallocated
    assert d.top_guid == TOP
    assert descriptor.top_image(d).file == f"root.hds.{BASE}"
    assert [i.file for i in descriptor.chain(d)] == ["root.hds", f"root.hds.{BASE}"]


def test_write_then_read_round_trip_and_no_temporary_left(tmp_path):
    d = descriptor.for_image("root.hds", 131072, 2048, preallocated=True)
    path = descriptor.write(tmp_path, d)
    assert path == str(tmp_path / "DiskDescriptor.xml")
    assert os.listdir(tmp_path) == ["DiskDescriptor.xml"]
    assert descriptor.read(tmp_path) == d
    text = (tmp_path / "DiskDescriptor.xml").read_text()
    assert text.startswith('<?xml version="1.0"?>\n<Virtuozzo_disk_image>')
    assert "<Preallocated>1</Preallocated>" in text and "<Blocksize>2048</Blocksize>" in text
    # replacing is atomic: a second write leaves the new one, and still no temporary
    bigger = d._replace(disk_size=262144)
    descriptor.write(tmp_path, bigger)
    assert descriptor.read(tmp_path).disk_size == 262144
    assert os.listdir(tmp_path) == ["DiskDescriptor.xml"]


def test_publishing_never_replaces(tmp_path):
    d = descriptor.for_image("root.hds", 131072, 2048)
    descriptor.write(tmp_path, d, replace=False)
    with pytest.raises(FileExistsError):
        descriptor.write(tmp_path, d._replace(disk_size=1), replace=False)
    assert descriptor.read(tmp_path) == d
    assert os.listdir(tmp_path) == ["DiskDescriptor.xml"]


def test_a_chain_written_and_read_keeps_temporary_marks(tmp_path):
    d = descriptor.parse(PLOOP_WRITTEN.encode())
    marked = d._replace(snapshots=(d.snapshots[0]._replace(temporary="TemporaryZero"),
                                   d.snapshots[1]))
    descriptor.write(tmp_path, marked)
    assert descriptor.read(tmp_path) == marked
    assert "<TemporaryZero />" in (tmp_path / "DiskDescriptor.xml").read_text()


def _edit(old: str, new: str) -> bytes:
    assert old in PLOOP_WRITTEN
    return PLOOP_WRITTEN.replace(old, new, 1).encode()


STORAGE = "<Storage>\n      <Start>0</Start>"
SHOT_TOP = f"""<Shot>
      <GUID>{TOP}</GUID>"""


@pytest.mark.parametrize("data,element,problem", [
    (_edit("</StorageData>", f"{STORAGE}<Blocksize>1</Blocksize></Storage></StorageData>"),
     "StorageData/Storage", "exactly one"),
    (_edit(f"<GUID>{BASE}</GUID>", "<GUID>{3f1e2d4c}</GUID>"),
     "StorageData/Storage/Image[1]/GUID", "not a GUID"),
    (_edit("<Disk_size>20971520</Disk_size>", "<Disk_size> 20971520</Disk_size>"),
     "Disk_Parameters/Disk_size", "whitespace"),
    (_edit("<Blocksize>2048</Blocksize>", "<Blocksize>0x800</Blocksize>"),
     "StorageData/Storage/Blocksize", "not a number"),
    (_edit("<Blocksize>2048</Blocksize>", "<Blocksize>2000</Blocksize>"),
     "StorageData/Storage/Blocksize", "power of two"),
    (_edit("<Blocksize>2048</Blocksize>", ""), "StorageData/Storage/Blocksize", "missing"),
    (_edit(f"""    <Shot>
      <GUID>{BASE}</GUID>
      <ParentGUID>{ZERO}</ParentGUID>
    </Shot>
""", ""), "Snapshots/Shot", "1 shots for 2 images"),
    (_edit(f"<TopGUID>{TOP}</TopGUID>", ""), "Snapshots/TopGUID", "missing"),
    (_edit(f"<TopGUID>{TOP}</TopGUID>", f"<TopGUID>{ZERO}</TopGUID>"),
     "Snapshots/TopGUID", "names no shot"),
    (_edit(SHOT_TOP, SHOT_TOP + "<Temporary/>"), "Snapshots/TopGUID", "temporary"),
    (_edit("<Blocksize>2048</Blocksize>", "<Blocksize>2048</Blocksize>"
           "<Preallocated>1</Preallocated>").replace(b"Compressed", b"Plain", 1),
     "StorageData/Storage/Preallocated", "Plain"),
    (_edit("<Type>Compressed</Type>", "<Type>qcow2</Type>"),
     "StorageData/Storage/Image[1]/Type", "not one of"),
    (_edit(f"<ParentGUID>{ZERO}</ParentGUID>", f"<ParentGUID>{TOP}</ParentGUID>"),
     "Snapshots/Shot/ParentGUID", "loops"),
    (_edit("Parallels_disk_image>\n  <Disk", "Parallels_disk_image>\n  <Disk").replace(
        b"Parallels_disk_image", b"Some_disk"), "Some_disk", "root element"),
    (b"<Parallels_disk_image><Disk_Parameters>", "/", "not well-formed"),
])
def test_validation_errors_name_the_element(tmp_path, data, element, problem):
    (tmp_path / "DiskDescriptor.xml").write_bytes(data)
    with pytest.raises(DescriptorError) as caught:
        descriptor.read(tmp_path)
    e = caught.value
    assert (e.element, e.errno, e.filename) == (element, errno.EBADMSG,
                                                str(tmp_path / "DiskDescriptor.xml"))
    assert problem in e.problem and str(e).count(element)


def test_entities_are_never_expanded(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("top secret")
    external = (f'<?xml version="1.0"?>\n<!DOCTYPE d [<!ENTITY x SYSTEM "file://{secret}">]>\n'
                "<Virtuozzo_disk_image>&x;</Virtuozzo_disk_image>").encode()
    laughs = (b'<?xml version="1.0"?>\n<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
              b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
              b"<Virtuozzo_disk_image>&b;</Virtuozzo_disk_image>")
    for data in (external, laughs):
        with pytest.raises(DescriptorError, match="DOCTYPE") as caught:
            descriptor.parse(data)
        assert "secret" not in str(caught.value)


def test_oversized_descriptor_is_refused_before_parsing(tmp_path):
    (tmp_path / "DiskDescriptor.xml").write_bytes(b"<a>" + b" " * descriptor.MAX_SIZE + b"</a>")
    with pytest.raises(DescriptorError, match="larger than"):
        descriptor.read(tmp_path)
