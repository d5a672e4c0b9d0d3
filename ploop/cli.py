"""The `ploop` command: ploop's everyday verbs over the ploop package.

Exit status: 0 success, 1 the operation failed or the image is not clean (message on
stderr), 2 bad usage. ``--json`` prints one document with a schema version, for scripts.
A VOLUME is a directory holding DiskDescriptor.xml, or the descriptor's own path.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from . import descriptor, image, qemu, volume
from .errors import PloopError

JSON_SCHEMA_VERSION = 1
_SIZE = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A size as `ploop init -s` takes it: K/M/G/T are powers of 1024, a bare number counts
    512-byte sectors (P tools/common.c)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    number, unit = match.groups()
    if not unit:
        return int(number) * image.SECTOR
    return int(number) << (10 * ("KMGT".index(unit.upper()) + 1))


def _volume_dir(text: str) -> str:
    if os.path.basename(text) == descriptor.FILENAME:
        return os.path.dirname(text) or "."
    return text


def _emit(args: argparse.Namespace, key: str, value: dict, text: str) -> None:
    if args.json:
        print(json.dumps({"version": JSON_SCHEMA_VERSION, key: value}, indent=2))
    else:
        print(text)


def _volume_doc(vol: volume.Volume) -> dict:
    return {"directory": vol.directory, "descriptor": vol.descriptor_path,
            "image": vol.image_path, "format": vol.format, "size": vol.size,
            "cluster_size": vol.descriptor.blocksize * image.SECTOR,
            "preallocated": vol.descriptor.preallocated,
            "images": len(vol.descriptor.images)}


def _attachment_doc(att: volume.Attachment | None) -> dict | None:
    return None if att is None else {"device": att.device, "method": att.method,
                                     "read_only": att.read_only, "directory": att.directory}


def _cmd_init(args: argparse.Namespace) -> int:
    directory, name = os.path.split(os.path.abspath(args.file))
    if os.path.exists(os.path.join(directory, descriptor.FILENAME)):
        raise PloopError(errno.EEXIST, "a volume already exists here", directory)
    vol = volume.create_or_open(directory, args.size, mode=args.format,
                                cluster=args.blocksize * image.SECTOR, image_name=name,
                                sparse=args.sparse)
    _emit(args, "volume", _volume_doc(vol), vol.descriptor_path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    target = args.target
    if os.path.isfile(target) and os.path.basename(target) != descriptor.FILENAME:
        info = image.info(target)
        _emit(args, "image", info._asdict(),
              "\n".join(f"{k}: {v}" for k, v in info._asdict().items()))
        return 0
    vol = volume.open_volume(_volume_dir(target))
    doc = _volume_doc(vol)
    doc["attachment"] = _attachment_doc(volume.find_attached(vol.directory))
    text = "\n".join(f"{k}: {v}" for k, v in doc.items() if k != "attachment")
    if doc["attachment"]:
        text += f"\ndevice: {doc['attachment']['device']}"
    _emit(args, "volume", doc, text)
    return 0


def _image_of(target: str) -> str:
    if os.path.isfile(target) and os.path.basename(target) != descriptor.FILENAME:
        return target
    return volume.open_volume(_volume_dir(target)).image_path


def _cmd_check(args: argparse.Namespace) -> int:
    path = _image_of(args.target)
    result = image.check(path)
    if args.repair and not result.clean:
        logging.getLogger("ploop").warning(
            "%s: repaired with qemu-img check -r all: %s", path, qemu.repair(path))
        result = image.check(path)
    if args.json:
        _emit(args, "check", result._asdict(), "")
    else:
        for problem in result.problems:
            print(f"ploop: {path}: {problem}", file=sys.stderr)
        if result.leaked_clusters:
            print(f"ploop: {path}: {result.leaked_clusters} leaked clusters", file=sys.stderr)
        if result.clean:
            print(f"{path}: clean")
    return 0 if result.clean else 1


def _cmd_grow(args: argparse.Namespace) -> int:
    vol = volume.grow(_volume_dir(args.volume), args.size)
    _emit(args, "volume", _volume_doc(vol), str(vol.size))
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    att = volume.attach(_volume_dir(args.volume), read_only=args.read_only, method=args.method)
    _emit(args, "attachment", _attachment_doc(att), att.device)
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    volume.detach(_volume_dir(args.volume))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ploop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("init", parents=[json_flag],
                       help="create an image and its DiskDescriptor.xml next to it")
    p.add_argument("file", metavar="FILE", help="the image to create")
    p.add_argument("-s", "--size", type=parse_size, required=True,
                   help="size: K/M/G/T, or a bare number of 512-byte sectors")
    p.add_argument("-f", "--format", choices=image.MODES, default="expanded",
                   help="image mode (default: expanded)")
    p.add_argument("-b", "--blocksize", type=int, default=image.DEFAULT_CLUSTER // image.SECTOR,
                   help="cluster size in 512-byte sectors (default 2048: 1 MiB)")
    p.add_argument("--sparse", action="store_true", help="raw only: leave the file sparse")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("info", parents=[json_flag], help="describe an image or a volume")
    p.add_argument("target", metavar="IMAGE|VOLUME")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("check", parents=[json_flag], help="check an image (exit 1 if unclean)")
    p.add_argument("target", metavar="IMAGE|VOLUME")
    p.add_argument("-r", "--repair", action="store_true",
                   help="repair with qemu-img check -r all, then check again")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("grow", parents=[json_flag], help="grow a volume")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("-s", "--size", type=parse_size, required=True, help="the new size")
    p.set_defaults(func=_cmd_grow)

    p = sub.add_parser("mount", parents=[json_flag],
                       help="attach a volume as a block device; prints the device")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("-r", "--read-only", action="store_true", help="attach read-only")
    p.add_argument("--method", choices=volume.METHODS,
                   help="native ploop or qemu-nbd (default: native when available)")
    p.set_defaults(func=_cmd_mount)

    p = sub.add_parser("umount", help="detach a volume (nothing to do if it is not attached)")
    p.add_argument("volume", metavar="VOLUME")
    p.set_defaults(func=_cmd_umount)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="ploop: %(message)s", level=logging.WARNING)
    try:
        return args.func(args)
    except OSError as e:  # PloopError, NbdError, and the OS's own answers about the paths
        where = f"{e.filename}: " if e.filename else ""
        print(f"ploop: {where}{e.strerror or e}", file=sys.stderr)
        return 1
