"""Build the driver's relocatable runtime: the file tree of the image (deploy/Dockerfile).

Run it with the Python of an environment where flexblock is installed (a venv made from the
interpreter to ship; `pip install .`). The tree holds that interpreter's executable, its
standard library, our packages and their dependencies (copied by flexvolume.install, as for a
pip install), and every shared library all of them link to, down to glibc and its own dynamic
loader, taken from the build system:

    bin/python3            the interpreter; RPATH $ORIGIN/../lib; PT_INTERP our loader
    bin/driver             the FlexVolume driver script      (written by flexvolume.install)
    bin/flexvolume         the operators' command            (written by flexvolume.install)
    lib/                   ld-linux-*.so.*, libc.so.6 and the rest of the closure
    lib/pythonX.Y/         the standard library (lib-dynload included), byte-compiled
    site-packages/         flexblock, cffi, pycparser, pyudev, psutil (+ compiled modules)
    flexblock-version.json the version name: <version>-<digest of the tree>

Nothing in it refers to the build system's paths: the interpreter finds its standard library
from its own location, and its libraries through RPATH. Only the loader's path (PT_INTERP) and
the scripts' interpreter lines are absolute; they name --prefix here, and `flexvolume install`
rewrites them for the version's place on the node.

    python deploy/bundle.py --out DIR [--prefix PATH]     (needs patchelf and ldd)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from flexvolume import install

# Parts of the standard library a driver never imports: tests, GUIs and terminal UIs (their
# modules would pull X11, Tk and ncurses into lib/), installers, build files.
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
                  "ensurepip", "lib2to3", "__phello__", "sitecustomize.py", "EXTERNALLY-MANAGED"}
STDLIB_EXCLUDE_PATTERN = re.compile(
    r"^(config-.*|_test.*|_xxtestfuzz.*|xxlimited.*|_ctypes_test.*|.*\.opt-[12]\.pyc"
    r"|(_tkinter|_curses|_curses_panel|readline|nis)\.cpython-.*\.so)$")
# Libraries our dependencies load with ctypes by name, which no ELF link shows (pyudev: libudev).
DLOPENED = ("libudev.so.1",)
# PT_INTERP room reserved for the path of the loader on the node (the kernel allows PATH_MAX).
LOADER_ROOM = 1024


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in STDLIB_EXCLUDE or STDLIB_EXCLUDE_PATTERN.match(n)}


def _is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _dependencies(path: str) -> dict[str, str]:
    """The shared libraries *path* loads (transitively), soname -> file, by the build
    system's loader; the loader itself under its own basename."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise SystemExit(f"bundle: {path}: {line}")
        name, arrow, rest = line.partition(" => ")
        target = rest.split(" (")[0] if arrow else name.split(" (")[0]
        if target.startswith("/"):
            found[name if arrow else os.path.basename(target)] = target
    return found


def _system_library(soname: str) -> str:
    """The file the build system's loader opens for *soname* (loaded here, found in our maps)."""
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError as e:
        raise SystemExit(f"bundle: {soname}: {e}") from None
    stem = soname.split(".so")[0] + ".so"
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip()
            if os.path.basename(path).startswith(stem):
                return path
    raise SystemExit(f"bundle: {soname} loaded, but not found in /proc/self/maps")


def build(out: str, prefix: str) -> str:
    """Assemble the tree in *out* (which must not exist) for use at *prefix*; its version.
    The interpreter is the one this environment was made from (a venv's base)."""
    python = os.path.realpath(sys._base_executable)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stdlib = sysconfig.get_path("stdlib")
    dynload = sysconfig.get_config_var("DESTSHARED")
    lib = os.path.join(out, "lib")
    os.makedirs(os.path.join(out, "bin"))
    shutil.copy2(python, os.path.join(out, install.BUNDLE_PYTHON))
    shutil.copytree(stdlib, os.path.join(lib, f"python{version}"), ignore=_ignore,
                    ignore_dangling_symlinks=True)
    if not os.path.realpath(dynload).startswith(os.path.realpath(stdlib) + os.sep):
        shutil.copytree(dynload, os.path.join(lib, f"python{version}", "lib-dynload"),
                        ignore=_ignore, dirs_exist_ok=True)
    install._copy_packages(os.path.join(out, install.SITE))

    libraries: dict[str, str] = {}
    for soname in DLOPENED:
        libraries[soname] = _system_library(soname)
        libraries.update(_dependencies(libraries[soname]))
    for directory, _, files in os.walk(out):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path) and _is_elf(path):
                libraries.update(_dependencies(path))
    for soname, path in libraries.items():
        if not os.path.realpath(path).startswith(os.path.realpath(out) + os.sep):
            shutil.copy2(os.path.realpath(path), os.path.join(lib, soname))
    loaders = [n for n in libraries if n.startswith("ld-linux")]
    if len(loaders) != 1:
        raise SystemExit(f"bundle: expected one dynamic loader, found {loaders}")
    placeholder = "/" + "_" * (LOADER_ROOM - len(loaders[0]) - 3) + "/" + loaders[0]
    subprocess.run(["patchelf", "--set-interpreter", placeholder, "--force-rpath",
                    "--set-rpath", "$ORIGIN/../lib", os.path.join(out, install.BUNDLE_PYTHON)],
                   check=True)

    for tree in (os.path.join(lib, f"python{version}"), os.path.join(out, install.SITE)):
        install.compile_site(tree)
    name = install.version_name(install.tree_digest(out))
    install.relocate(out, prefix)
    with open(os.path.join(out, install.MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"version": name}, f)
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the tree to create (must not exist)")
    parser.add_argument("--prefix", help="where the tree is seen when it runs (default: --out)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    name = build(out, os.path.abspath(args.prefix or out))
    print(f"bundle {name} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
