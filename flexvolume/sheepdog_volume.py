"""mount, unmount and expandfs of a sheepdog volume: the VDI `vdiname` of the cluster at
`address`:`port`, created on first mount when a size is given (the kvaps/qemu-nbd seed's
sheepdog options), attached by flexvolume.backends.sheepdog.

The filesystem checks, the mount itself and unmount are volume.py's; only finding, creating and
attaching the volume differ from the image-file backends.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from types import ModuleType

from . import filesystem, mounts, options, volume
from .errors import DriverError, OptionError
from .volume import unmount  # noqa: F401  (the image flow's: nothing in it is sheepdog's)

# qemu's legacy filename splits at ":" and its URI form takes the rest as a path; dog would
# read a leading "-" as an option. SD_MAX_VDI_LEN is 256 with the NUL.
_VDI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# dog/common.c parse_copy: N copies (1..SD_MAX_COPIES, 31), or erasure coding D:P with D data
# strips (2, 4, 8 or 16) and P parity strips (1..15).
_COPIES = re.compile(r"(?:[1-9]|[12][0-9]|3[01])|(?:2|4|8|16):(?:[1-9]|1[0-5])")
BLOCK_SIZE_SHIFT_MIN, BLOCK_SIZE_SHIFT_MAX = 20, 31  # dog/vdi.c: objects of 1 MiB .. 2 GiB
# dog writes every object of a preallocated VDI before it returns.
CREATE_TIMEOUT = 600.0

_USER_KEYS = frozenset({"vdiname", "size", "allocate", "prealloc", "hyper", "copies", "address", "port",
                        "block_size_shift", "fsType", "mmp", "mmpUpdateInterval", "fsck",
                        "fsckOptions", "mountOptions"})

SheepdogOptions = collections.namedtuple(
    "SheepdogOptions", "vdi size prealloc hyper copies block_size_shift fs_type read_only "
                       "mount_options fs_group mmp mmp_update_interval fsck fsck_options")


class Source(collections.namedtuple("Source", "path blank")):
    """A VDI as volume.prepare_filesystem sees its image: blank when none of its objects is
    allocated (sheepdog counts them; the device's zeros cannot be told from data cheaply).

    There is no formatting mark: a mount killed during mkfs of a new VDI leaves objects and no
    filesystem, which is refused as data until an administrator deletes the VDI."""

    def is_blank(self) -> bool:
        return self.blank

    def mark_formatting(self, on: bool) -> None:
        pass  # see the class docstring

    def formatting_interrupted(self) -> bool:
        return False


def parse_address(name: str, text: str) -> str:
    if text == "localhost":
        return "127.0.0.1"  # the seed's default; dog takes IP literals only
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise OptionError(name, f"{text!r} is not an IPv4 address (dog takes IP addresses only, "
                          "and qemu's sheepdog filename cannot hold an IPv6 one)") from None


def parse(raw: str, backend: ModuleType) -> SheepdogOptions:
    data = options.load(raw)
    user = options.user_options(data, _USER_KEYS)
    name = user.get("vdiname", "")
    if not name:
        raise OptionError("vdiname", "is required")
    if not _VDI_NAME.fullmatch(name):
        raise OptionError("vdiname", f"{name!r}: use up to 255 letters, digits, '.', '_' and "
                          "'-', starting with a letter or digit")
    copies = user.get("copies") or None
    if copies is not None and not _COPIES.fullmatch(copies):
        raise OptionError("copies", f"{copies!r} is neither a number of copies (1 to 31) nor "
                          "an erasure code DATA:PARITY (2, 4, 8 or 16 : 1 to 15)")
    # `allocate` is one of the seed's basic options, so sheepdog pod specs may carry it; the
    # seed read it and created a missing VDI from `size` alone, as this driver does.
    options.parse_bool("allocate", user.get("allocate", "false"))
    hyper = options.parse_bool("hyper", user.get("hyper", "false"))
    shift = None
    if user.get("block_size_shift"):
        shift = options.parse_int("block_size_shift", user["block_size_shift"],
                                  BLOCK_SIZE_SHIFT_MIN, BLOCK_SIZE_SHIFT_MAX)
        if hyper:
            raise OptionError("block_size_shift", "cannot be combined with hyper (dog refuses "
                              "-y with -z)")
    address = parse_address("address", user.get("address") or backend.DEFAULT_ADDRESS)
    port = options.parse_int("port", user["port"], 1, 65535) if user.get("port") \
        else backend.DEFAULT_PORT
    return SheepdogOptions(
        vdi=backend.Vdi(name, address, port),
        size=options.parse_size("size", user["size"]) if user.get("size") else None,
        prealloc=options.parse_bool("prealloc", user.get("prealloc", "false")),
        hyper=hyper,
        copies=copies,
        block_size_shift=shift,
        **options.filesystem_options(data, user),
    )


def _describe(vdi: tuple) -> str:
    return f"VDI {vdi.name} on {vdi.address}:{vdi.port}"


def _find(backend: ModuleType, vdi: tuple):
    listing = filesystem.run(backend.vdi_list_argv(vdi), f"listing {_describe(vdi)}")
    return backend.parse_vdi_list(listing.stdout, vdi.name)


def create_argv(opts: SheepdogOptions, backend: ModuleType) -> list[str]:
    """The `dog vdi create` that makes the volume's VDI."""
    return backend.vdi_create_argv(opts.vdi, opts.size, prealloc=opts.prealloc,
                                   hyper=opts.hyper, copies=opts.copies,
                                   block_size_shift=opts.block_size_shift)


def _create(backend: ModuleType, opts: SheepdogOptions) -> bool:
    """Create the VDI: True if this call did, False if another node did meanwhile."""
    try:
        filesystem.run(create_argv(opts, backend), f"creating {_describe(opts.vdi)}",
                       timeout=CREATE_TIMEOUT)
    except DriverError:
        if _find(backend, opts.vdi) is None:
            raise
        return False
    return True


def mount(target: str, raw_options: str, backend: ModuleType) -> str:
    opts = parse(raw_options, backend)
    target = volume.check_target(target)
    what = _describe(opts.vdi)
    current = mounts.mount_at(target)
    if current is not None:
        device = backend.device_for(current)
        if device is None or device.ident != backend.server_ident(opts.vdi):
            raise DriverError(f"{target} already has another filesystem mounted")
        volume.apply_fs_group(target, opts)
        return f"{what} already mounted at {target}"

    state, created = _find(backend, opts.vdi), False
    if state is None:
        if opts.read_only:
            raise DriverError(f"{what} does not exist and is to be mounted read-only")
        if opts.size is None:
            raise OptionError("size", f"is required to create {what}, which does not exist")
        created = _create(backend, opts)
        state = None if created else _find(backend, opts.vdi)
    if state is not None and opts.size and not opts.read_only and state.size < opts.size:
        raise DriverError(f"{what} is smaller than size {opts.size}; grow it with dog vdi "
                          "resize while unmounted, or ask for its current size")
    source = Source(what, state is None or state.used == 0)
    device = backend.attach(opts.vdi, read_only=opts.read_only)
    fs_type = volume.mount_attached(device, source, target, opts, what)
    return (f"{'created ' if created else ''}{what} ({fs_type}) on {device.path} mounted at "
            f"{target}")


def expandfs(raw_options: str, target: str, new_size_text: str, backend: ModuleType) -> str:
    raise DriverError("a sheepdog volume cannot grow while mounted (qemu-nbd serves a fixed "
                      "size); unmount it, grow the VDI with dog vdi resize, and mount it again")
