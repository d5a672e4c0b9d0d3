"""The sheepdog backend (kvaps/qemu-nbd's sheepdog mode): a volume is a VDI of a sheepdog
cluster, created with the `dog` CLI and served by qemu-nbd's sheepdog block driver, connected
to a kernel NBD device like the qemu-nbd backend's images (nbd_served). Its mount flow lives in
flexvolume.sheepdog_volume (FLOW): the volume is a VDI, not an image file.

Sheepdog is gone from every package registry, and qemu removed its sheepdog block driver in
6.0, so most nodes lack what this needs: check() names what is missing, and every mount there
answers that Failure. The command lines are built by the pure functions below (vdi_create_argv,
vdi_list_argv, qemu_filename), which follow sheepdog's dog/vdi.c and qemu 5.2's
block/sheepdog.c:

- `dog vdi create [-P] [-y] [-c COPIES] [-z SHIFT] -a ADDRESS -p PORT VDI SIZE`: -P (prealloc)
  and -y (hyper) take no value; -y and -z exclude each other; -a takes an IP literal only
  (dog's str_to_addr is inet_pton), so the seed's default `localhost` is passed as 127.0.0.1;
- qemu's legacy filename ``sheepdog:ADDRESS:PORT:VDI``: qemu splits it at colons (an IPv6
  address cannot be written there, and a further colon would name a snapshot), so the VDI name
  is limited to letters, digits and ``._-``.

The server's identity is a digest of that filename (socket paths are short), and its device's
backend identifier ``flexblock-sheepdog:<digest>``.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import shutil
import subprocess

import nbd
from nbd import server

from ..errors import DriverError
from ..mounts import MountEntry
from .nbd_served import Family, NbdVolume

FLOW = "flexvolume.sheepdog_volume"
DOG = "dog"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 7000  # SD_LISTEN_PORT
FAMILY = Family("flexblock-sheepdog:", "/run/flexblock/sheepdog")

# A VDI on a cluster, as qemu and dog address it.
Vdi = collections.namedtuple("Vdi", "name address port")
# One line of `dog vdi list -r`: the VDI's size and the bytes of its own objects, in bytes.
VdiState = collections.namedtuple("VdiState", "size used")


@functools.cache
def missing_tools() -> list[str]:
    """What this node lacks to attach sheepdog VDIs."""
    missing = []
    if shutil.which(DOG) is None:
        missing.append("the sheepdog CLI `dog`")
    try:
        out = subprocess.run(["qemu-img", "--help"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        missing.append("qemu-img")
    else:
        if "sheepdog" not in out.partition("Supported formats:")[2].split():
            missing.append("a qemu with the sheepdog block driver (qemu 6.0 removed it; this "
                           "qemu-img lists no 'sheepdog' among its formats)")
    if shutil.which("qemu-nbd") is None:
        missing.append("qemu-nbd")
    return missing


def check() -> None:
    """Raise DriverError saying why this node cannot serve sheepdog volumes, if it cannot."""
    missing = missing_tools()
    if missing:
        raise DriverError("sheepdog volumes cannot be attached on this node: it lacks "
                          + "; ".join(missing) + ". Sheepdog is unmaintained and no longer "
                          "packaged; move the volumes to the loop or qemu-nbd driver")
    try:
        nbd.connected()
    except nbd.NotSupported:
        raise DriverError("this kernel has no nbd driver (modprobe nbd): a sheepdog volume "
                          "cannot be attached on this node") from None


def _connection(vdi: Vdi) -> list[str]:
    return ["-a", vdi.address, "-p", str(vdi.port)]


def vdi_create_argv(vdi: Vdi, size: int, *, prealloc: bool = False, hyper: bool = False,
                    copies: str | None = None, block_size_shift: int | None = None) -> list[str]:
    """`dog vdi create` for *vdi* of *size* bytes (dog reads a bare number as bytes)."""
    argv = [DOG, "vdi", "create"]
    if prealloc:
        argv.append("-P")
    if hyper:
        argv.append("-y")
    if copies is not None:
        argv += ["-c", copies]
    if block_size_shift is not None:
        argv += ["-z", str(block_size_shift)]
    return argv + _connection(vdi) + [vdi.name, str(size)]


def vdi_list_argv(vdi: Vdi) -> list[str]:
    """`dog vdi list` of *vdi* alone, raw: one line per VDI or snapshot of that name."""
    return [DOG, "vdi", "list", "-r"] + _connection(vdi) + [vdi.name]


def parse_vdi_list(output: str, name: str) -> VdiState | None:
    """The working VDI *name* in `dog vdi list -r` output, if listed. Its lines read
    ``KIND NAME SNAPID SIZE USED SHARED CTIME VID COPIES TAG...``, KIND ``=`` for a VDI,
    ``c`` for a clone, ``s`` for a snapshot (never mounted here)."""
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] in ("=", "c") and fields[1] == name:
            try:
                return VdiState(int(fields[3]), int(fields[4]))
            except ValueError:
                raise DriverError(f"dog vdi list: unexpected line {line!r}") from None
    return None


def qemu_filename(vdi: Vdi) -> str:
    """What qemu (<= 5.2) opens *vdi* by."""
    return f"sheepdog:{vdi.address}:{vdi.port}:{vdi.name}"


def server_ident(vdi: Vdi) -> str:
    return "sheepdog-" + hashlib.sha256(qemu_filename(vdi).encode()).hexdigest()[:32]


def attach(vdi: Vdi, *, read_only: bool) -> NbdVolume:
    """Serve *vdi* with qemu-nbd and connect an NBD device to it; a device of it that is
    mounted on this host is refused, a killed call's leftovers are taken down first. (A VDI
    open on another host is refused by sheepdog itself: qemu locks it.)"""
    ident = server_ident(vdi)

    def start() -> server.Server:
        try:
            return server.start_named(ident, qemu_filename(vdi), read_only=read_only)
        except nbd.NbdError as e:
            raise DriverError(f"serving VDI {vdi.name}: {e.strerror}") from None

    index, claim_fd = FAMILY.connect(ident, start, f"VDI {vdi.name}")
    return NbdVolume(FAMILY, index, ident, claim_fd)


def device_for(mount: MountEntry) -> NbdVolume | None:
    """The sheepdog device a mount lives on, if it is one."""
    found = FAMILY.find(mount)
    return NbdVolume(FAMILY, *found, None) if found is not None else None


def collect() -> None:
    """Tear down what killed calls left behind on this host (nbd_served.Family.collect)."""
    FAMILY.collect()
