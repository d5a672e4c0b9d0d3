"""Stand-ins for what a sheepdog node has and no node here can: the `dog` CLI of a running
cluster, and a qemu (<= 5.2) built with the sheepdog block driver. Sheepdog is in no package
registry any more and qemu 6.0 removed the driver, so the sheepdog driver's tests run against
these, and say so.

- `dog` keeps each VDI as a raw file STORE/<vdiname>: `vdi list -r ... NAME` prints the raw
  line dog prints (size, and the bytes allocated as the VDI's own objects), `vdi create`
  makes the file (fallocated with -P) and fails as dog does when it exists. Every call's
  arguments are appended to STORE/../dog.log as a JSON list.
- `qemu-img --help` lists `sheepdog` among the supported formats; anything else runs the real
  qemu-img.
- `qemu-nbd` replaces the filename ``sheepdog:ADDRESS:PORT:VDI`` by STORE/<VDI> and execs the
  real qemu-nbd, so the real server, kernel NBD device, mkfs and mount do the rest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

_DOG = '''#!{python}
import json, os, sys
store, args = {store!r}, sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["vdi", "list"]:
    path = os.path.join(store, args[-1])
    if os.path.exists(path):
        st = os.stat(path)
        print(f"= {{args[-1]}} 0 {{st.st_size}} {{st.st_blocks * 512}} 0 1700000000 7c2b25 3 ")
    sys.exit(0)
if args[:2] == ["vdi", "create"]:
    name, size = args[-2], int(args[-1])
    try:
        fd = os.open(os.path.join(store, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        sys.exit(f"Failed to create VDI {{name}}: VDI exists already")
    if "-P" in args:
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)
    sys.exit(0)
sys.exit(64)
'''

_QEMU_IMG = '''#!/bin/sh
if [ "$1" = --help ]; then
    echo "Supported formats: file raw qcow2 sheepdog"
    exit 0
fi
exec {real} "$@"
'''

_QEMU_NBD = '''#!{python}
import os, sys
args = sys.argv[1:]
if args and args[-1].startswith("sheepdog:"):
    args[-1] = os.path.join({store!r}, args[-1].split(":")[3])
os.execv({real!r}, ["qemu-nbd"] + args)
'''


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def install(bindir: Path, store: Path, *, dog: bool = True, qemu: bool = True) -> str:
    """Write the stand-ins into *bindir* (VDIs in *store*); returns *bindir* for PATH."""
    bindir.mkdir(exist_ok=True)
    store.mkdir(exist_ok=True)
    real = "/usr/sbin:/usr/bin:/sbin:/bin"
    if dog:
        _write(bindir / "dog", _DOG.format(python=sys.executable, store=str(store),
                                           log=str(dog_log(store))))
    if qemu:
        _write(bindir / "qemu-img", _QEMU_IMG.format(real=shutil.which("qemu-img", path=real)))
        _write(bindir / "qemu-nbd", _QEMU_NBD.format(python=sys.executable, store=str(store),
                                                     real=shutil.which("qemu-nbd", path=real)))
    return str(bindir)


def dog_log(store: Path) -> Path:
    return store.parent / "dog.log"


def dog_calls(store: Path) -> list[list[str]]:
    """The arguments of every `dog` call so far."""
    try:
        lines = dog_log(store).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines]
