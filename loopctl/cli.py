"""The `loopctl` command: losetup's everyday verbs over the loopctl library.

Exit status: 0 success, 1 the operation failed (message on stderr), 2 bad usage.
``--json`` prints one document with a schema version, for scripts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from . import device as loop
from .errors import LoopError, NotBound

JSON_SCHEMA_VERSION = 1
_SIZE = re.compile(r"(\d+)\s*(?:([KMGTPE])(iB|B)?)?", re.IGNORECASE)
_POWERS = "KMGTPE"


def parse_size(text: str) -> int:
    """A byte count as losetup takes it: 1M and 1MiB are 2^20, 1MB is 10^6."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    number, unit, suffix = match.groups()
    if not unit:
        return int(number)
    base = 1000 if suffix and suffix.upper() == "B" else 1024
    return int(number) * base ** (_POWERS.index(unit.upper()) + 1)


def _columns(info: loop.LoopInfo) -> list[str]:
    return [info.path, str(info.sizelimit), str(info.offset), str(int(info.autoclear)),
            str(int(info.read_only)), info.backing_file or "", str(int(info.direct_io)),
            str(info.block_size)]


_HEADER = ["NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "BACK-FILE", "DIO", "LOG-SEC"]


def _print_table(infos: list[loop.LoopInfo]) -> None:
    rows = [_HEADER] + [_columns(i) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(_HEADER))]
    for row in rows:
        print(" ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _emit(args: argparse.Namespace, infos: list[loop.LoopInfo], *, single: bool,
          path_only: bool = False) -> None:
    """One device ("device" in JSON) or several ("devices"); as text, its path or a table."""
    if args.json:
        if single:
            doc = {"version": JSON_SCHEMA_VERSION, "device": infos[0]._asdict()}
        else:
            doc = {"version": JSON_SCHEMA_VERSION, "devices": [i._asdict() for i in infos]}
        print(json.dumps(doc, indent=2))
    elif path_only:
        print(infos[0].path)
    elif infos:
        _print_table(infos)


def _cmd_attach(args: argparse.Namespace) -> int:
    dev = loop.attach(args.file, offset=args.offset, sizelimit=args.sizelimit,
                      block_size=args.sector_size, read_only=args.read_only,
                      read_only_fallback=args.read_only_fallback, partscan=args.partscan,
                      direct_io=args.direct_io == "on", ref=args.ref, lock=args.lock)
    info = dev.info()
    dev.relinquish()  # the binding outlives this command, as with losetup
    if args.direct_io == "on" and not info.direct_io:
        print(f"loopctl: {info.path}: direct I/O is not in effect (backing filesystem or "
              "alignment does not allow it)", file=sys.stderr)
    _emit(args, [info], single=True, path_only=True)
    return 0


def _cmd_detach(args: argparse.Namespace) -> int:
    status = 0
    for name in args.devices:
        try:
            loop.detach(name, wait=args.wait)
        except LoopError as e:
            _report(e)
            status = 1
    return status


def _infos(devices: list[loop.LoopDevice]) -> list[loop.LoopInfo]:
    """Their current state, leaving out those unbound meanwhile (autoclear, other tools)."""
    infos = []
    for device in devices:
        try:
            infos.append(device.info())
        except NotBound:
            pass
    return infos


def _cmd_list(args: argparse.Namespace) -> int:
    _emit(args, _infos(loop.list_devices()), single=False)
    return 0


def _cmd_find(args: argparse.Namespace) -> int:
    _emit(args, _infos(loop.find(args.file, offset=args.offset)), single=False)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    _emit(args, [loop.get(args.device).info()], single=True)
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    dev = loop.get(args.device)
    dev.resize()
    _emit(args, [dev.info()], single=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("attach", parents=[json_flag], help="bind a free device to FILE")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--offset", type=parse_size, default=0, help="start at this byte")
    p.add_argument("--sizelimit", type=parse_size, default=0, help="use at most this many bytes")
    p.add_argument("-b", "--sector-size", type=parse_size, help="logical sector size")
    p.add_argument("-r", "--read-only", action="store_true", help="attach read-only")
    p.add_argument("--read-only-fallback", action="store_true",
                   help="attach read-only if FILE cannot be opened read-write")
    p.add_argument("-P", "--partscan", action="store_true", help="scan for partitions")
    p.add_argument("--direct-io", default="off", choices=["on", "off"],
                   help="bypass the backing file's page cache (a bare --direct-io means on)")
    p.add_argument("--ref", help="reference stored as the device's file name (63 bytes)")
    p.add_argument("--lock", action="store_true",
                   help="lock FILE for as long as it is attached (refuse a second attach)")
    p.set_defaults(func=_cmd_attach)

    p = sub.add_parser("detach", help="detach devices")
    p.add_argument("devices", nargs="+", metavar="DEVICE")
    p.add_argument("--wait", action="store_true", help="wait until really unbound")
    p.set_defaults(func=_cmd_detach)

    p = sub.add_parser("list", parents=[json_flag], help="list bound devices")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("find", parents=[json_flag], help="devices bound to FILE (losetup -j)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--offset", type=parse_size, help="only at this offset")
    p.set_defaults(func=_cmd_find)

    p = sub.add_parser("info", parents=[json_flag], help="state of one device")
    p.add_argument("device", metavar="DEVICE")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("resize", parents=[json_flag],
                       help="re-read the backing file's size (losetup -c)")
    p.add_argument("device", metavar="DEVICE")
    p.set_defaults(func=_cmd_resize)
    return parser


def _report(error: OSError) -> None:
    where = f"{error.filename}: " if error.filename else ""
    print(f"loopctl: {where}{error.strerror}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # losetup's --direct-io[=on|off]: a bare flag means on. argparse's optional values would
    # swallow a FILE that follows, so the bare form is spelled out before parsing.
    argv = ["--direct-io=on" if a == "--direct-io" else a
            for a in (sys.argv[1:] if argv is None else argv)]
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except OSError as e:  # LoopError, and the OS's own answers about the paths given
        _report(e)
        return 1
