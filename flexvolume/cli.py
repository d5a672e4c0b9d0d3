"""The `flexvolume` command for operators: install, uninstall and check the kubelet driver."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from . import install

# The DaemonSet names the plugin dir once, in the environment, for its command and its probe.
PLUGIN_DIR_ENV = "FLEXVOLUME_PLUGIN_DIR"


def _wait_for_termination() -> None:
    """Stay up until SIGTERM or SIGINT (a DaemonSet pod's life), leaving the driver installed:
    a rollout or a deleted pod must not pull the driver from under mounted volumes."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexvolume", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "install": "install this version under every registered driver name and make it current",
        "uninstall": "remove every driver of ours and all installed versions",
        "status": "show the installed versions and each driver's init reply; exit 0 when the "
                  "current version is this one and every driver runs and answers init",
    }
    for verb, helptext in commands.items():
        p = sub.add_parser(verb, help=helptext, description=helptext)
        p.add_argument("--plugin-dir",
                       default=os.environ.get(PLUGIN_DIR_ENV) or install.DEFAULT_PLUGIN_DIR,
                       help=f"kubelet's --volume-plugin-dir (default: ${PLUGIN_DIR_ENV}, else "
                            f"{install.DEFAULT_PLUGIN_DIR})")
    sub.choices["install"].add_argument(
        "--keep-running", action="store_true",
        help="after installing, stay up until SIGTERM (the DaemonSet's container)")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            installed = install.install(args.plugin_dir)
            print(f"installed {installed.version.name} in {installed.version.path}")
            for driver, path in installed.drivers.items():
                print(f"  {driver}: {path}")
            sys.stdout.flush()
            if args.keep_running:
                _wait_for_termination()
        elif args.command == "uninstall":
            # Imported first: the uninstall removes the installed code this runs from.
            from .backends import qemu_nbd

            for path in install.uninstall(args.plugin_dir):
                print(f"removed {path}")
            qemu_nbd.release_ready()  # no driver is left to take a spare server
        else:
            state = install.status(args.plugin_dir)
            print(f"current: {state.current}\nprevious: {state.previous}")
            for driver, reply in state.drivers.items():
                print(f"  {driver}: {reply}")
            return 0 if state.ok else 1
    except (OSError, ValueError) as e:
        print(f"flexvolume: {e}", file=sys.stderr)
        return 1
    return 0
