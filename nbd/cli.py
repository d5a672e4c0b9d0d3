"""The `nbd` command: connect an NBD export to /dev/nbdN through netlink, and more.

Exit status: 0 success, 1 the operation failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import client, control
from .errors import NbdError

JSON_SCHEMA_VERSION = 1


def _index(text: str) -> int:
    name = text.removeprefix("/dev/").removeprefix("nbd")
    if not name.isdigit():
        raise argparse.ArgumentTypeError(f"not an nbd device: {text!r}")
    return int(name)


def _emit(args: argparse.Namespace, infos: list[control.DeviceInfo], *, single: bool) -> None:
    if args.json:
        key, value = ("device", infos[0]._asdict()) if single else (
            "devices", [i._asdict() for i in infos])
        print(json.dumps({"version": JSON_SCHEMA_VERSION, key: value}, indent=2))
    elif single:
        print(infos[0].path)
    else:
        for i in infos:
            print(f"{i.path} {i.size} pid={i.pid or '-'} {i.backend or ''}".rstrip())


def _cmd_connect(args: argparse.Namespace) -> int:
    info, _ = client.attach(args.address, args.export, index=args.index, timeout=args.timeout,
                            dead_conn_timeout=args.dead_conn_timeout, backend=args.backend)
    _emit(args, [info], single=True)
    return 0


def _cmd_disconnect(args: argparse.Namespace) -> int:
    for index in args.devices:
        control.disconnect(index)
        if args.wait:
            control.wait_disconnected(index)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    _emit(args, [control.info(s.index) for s in control.status() if s.connected], single=False)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    _emit(args, [control.info(args.device)], single=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("connect", parents=[json_flag], help="connect an export")
    p.add_argument("address", metavar="ADDRESS", help="unix socket path, or host[:port]")
    p.add_argument("--export", "-N", default="", help="export name (default: the default)")
    p.add_argument("--index", type=_index, help="use this device (default: any free one)")
    p.add_argument("--timeout", type=float, help="seconds before a stalled connection is dead")
    p.add_argument("--dead-conn-timeout", type=float,
                   help="seconds to wait for a reconnect once the connection is dead")
    p.add_argument("--backend", help="identifier shown in /sys/block/nbdN/backend")
    p.set_defaults(func=_cmd_connect)

    p = sub.add_parser("disconnect", help="disconnect devices")
    p.add_argument("devices", nargs="+", type=_index, metavar="DEVICE")
    p.add_argument("--wait", action="store_true", help="wait until the connection is gone")
    p.set_defaults(func=_cmd_disconnect)

    p = sub.add_parser("list", parents=[json_flag], help="connected devices")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("status", parents=[json_flag], help="state of one device")
    p.add_argument("device", type=_index, metavar="DEVICE")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (NbdError, OSError) as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"nbd: {where}{e.strerror or e}", file=sys.stderr)
        return 1
