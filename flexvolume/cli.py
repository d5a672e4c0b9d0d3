"""The `flexvolume` command for operators: install and uninstall the kubelet driver."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import install


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexvolume", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, helptext in (("install", "install the driver (atomically replacing it)"),
                           ("uninstall", "remove the driver")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("--plugin-dir", default=install.DEFAULT_PLUGIN_DIR,
                       help="kubelet's --volume-plugin-dir (default: %(default)s)")
        p.add_argument("--driver", default=install.DEFAULT_DRIVER,
                       help="driver name, vendor/name (default: %(default)s)")
        p.add_argument("--alias", action="append", default=[], metavar="VENDOR/NAME",
                       help="also under this name, e.g. kvaps/loop (repeatable)")
    args = parser.parse_args(argv)
    action = install.install if args.command == "install" else install.uninstall
    try:
        for driver in [args.driver, *args.alias]:
            print(f"{args.command}: {action(args.plugin_dir, driver)}")
    except (OSError, ValueError) as e:
        print(f"flexvolume: {e}", file=sys.stderr)
        return 1
    return 0
