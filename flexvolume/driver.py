"""The executable kubelet runs: ``<driver> <command> [args...]``.

Kubelet parses the driver's stdout and stderr *together* as one JSON document, and waits until
every holder of those pipes has closed them. So the very first thing we do is keep a private
copy of stdout for the reply and point fds 0-2 at /dev/null: no warning, traceback or child
process can then add a byte to the reply or hold the pipe open.

The backend is chosen by the name the driver is installed under (``<vendor~name>/<name>``), so
one installation serves ``flexblock/loop`` and its alias ``kvaps/loop``.
"""

from __future__ import annotations

import os
import sys

from .backends import BACKENDS

# kubelet probes every driver with init, repeatedly: answer it without importing anything.
# fsGroup is false on purpose (the driver gives the fsGroup the volume's root itself instead of
# kubelet chowning every file at every mount); selinuxRelabel true (ext4, xfs and btrfs keep
# labels); requiresFSResize true where we implement expandfs (an NBD device cannot grow while
# connected); supportsMetrics true (kubelet statfs's the mount, no driver call). The protocol
# tests check this text against json.dumps of the same.
_INIT = ('{{"status":"Success","capabilities":{{"attach":false,"fsGroup":false,'
         '"requiresFSResize":{},"selinuxRelabel":true,"supportsMetrics":true}}}}')
INIT_REPLIES = {"loop": _INIT.format("true"), "qemu-nbd": _INIT.format("false"),
                "nbd": _INIT.format("false"), "sheepdog": _INIT.format("false"),
                "ploop": _INIT.format("false")}
NOT_SUPPORTED_REPLY = '{"status":"Not supported"}'

# command -> number of arguments after it
_ARITY = {"mount": 2, "unmount": 1, "expandfs": 5}


def _seal_stdio() -> int:
    reply_fd = os.dup(1)  # not inheritable: no child ever sees it
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return reply_fd


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return f"internal error: {type(error).__name__}: {error}"


def _call(driver: str, command: str, args: list[str]) -> tuple[str, int]:
    import importlib
    import json

    from . import backends, log, options, volume
    from .errors import DriverError

    backend = backends.load(driver)
    if backend is None:
        return json.dumps({"status": "Failure", "message": f"unknown driver name {driver!r}; "
                           f"install it as one of: {', '.join(BACKENDS)}"}), 1
    # A backend that cannot work on this node says why at mount, where the pod's events show
    # it; a Failure at init would only unregister the plugin (and kubelet retries it forever).
    check = getattr(backend, "check", None)
    if check is not None and command == "mount":
        try:
            check()
        except DriverError as e:
            return json.dumps({"status": "Failure", "message": str(e)}), 1
    if command not in _ARITY:
        return NOT_SUPPORTED_REPLY, 0
    identifier = f"flexblock-{driver}"
    if len(args) != _ARITY[command]:
        return json.dumps({"status": "Failure", "message": f"{command} takes {_ARITY[command]} "
                           f"arguments, got {len(args)}"}), 1
    raw_options = {"mount": lambda: args[1], "expandfs": lambda: args[0]}.get(command, str)()
    # a backend whose volumes are not one image file brings its own flow (ploop: a directory)
    flow = importlib.import_module(backend.FLOW) if hasattr(backend, "FLOW") else volume
    fields = {"command": command, "options": options.redacted(raw_options) if raw_options else ""}
    try:
        if command == "mount":
            message = flow.mount(args[0], args[1], backend)
        elif command == "unmount":
            message = flow.unmount(args[0], backend)
        else:
            message = flow.expandfs(args[0], args[2], args[3], backend)
    except DriverError as e:
        log.log(identifier, log.ERROR, f"{command} failed: {e}", **fields)
        return json.dumps({"status": "Failure", "message": str(e)}), 1
    except Exception as e:
        import traceback

        log.log(identifier, log.ERROR, f"{command} failed: {traceback.format_exc()}", **fields)
        return json.dumps({"status": "Failure", "message": _describe(e)}), 1
    log.log(identifier, log.INFO, message, **fields)
    keep_ready = getattr(backend, "keep_ready", None)
    if command == "mount" and keep_ready is not None:
        # What makes the next mount faster (a spare server), prepared after this one is done;
        # failing here fails no mount: the next one does without.
        try:
            keep_ready()
        except OSError as e:
            log.log(identifier, log.WARNING, f"after mount: {e}", **fields)
    return json.dumps({"status": "Success", "message": message}), 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    reply_fd = _seal_stdio()
    driver = os.path.basename(argv[0])
    command = argv[1] if len(argv) > 1 else ""
    if command == "init" and driver in INIT_REPLIES:
        reply, code = INIT_REPLIES[driver], 0
    else:
        reply, code = _call(driver, command, list(argv[2:]))
    os.write(reply_fd, reply.encode() + b"\n")
    sys.exit(code)
