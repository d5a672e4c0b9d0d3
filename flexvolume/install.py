"""Installing the driver into kubelet's plugin directory, upgrading, and removing it.

Every install is a *version*: a directory holding our packages and their dependencies (copied,
so a later ``pip install -U`` or image change does not alter what runs), the driver script,
and, when installed from the bundle (deploy/), the interpreter itself with its loader and
libraries. Versions are named ``<version>-<digest of their content>`` and never change once
published. ``current`` and ``previous`` are symlinks to versions; every driver name is a symlink
``<vendor~name>/<name> -> .../.flexblock/current/bin/driver``, so:

- an upgrade publishes the new version under a temporary dot-name and renames it into place,
  then swaps ``current`` with one rename: every driver name changes version at once, and a
  driver already running keeps the files of its own version (everything below the script is
  reached through absolute, versioned paths);
- a rollback is one rename: ``previous`` onto ``current``.

The store lives in the first registered driver's directory (``flexblock~loop/.flexblock``),
not in a dot-directory of its own: kubelet watches everything below the plugin directory once
it has (re)started, and a change below a top-level directory that holds no driver queues a
probe that fails on every later plugin look-up. Below a driver's directory a change only
makes kubelet run that driver's ``init`` again. Kubelet's prober ignores names starting with a
dot, so temporaries are dot-names. The executable is a Python script run by an absolute
interpreter path in isolated mode without site (-IS): kubelet's environment cannot redirect
it, and start-up stays that of the bare interpreter.
"""

from __future__ import annotations

import compileall
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from . import elf
from .backends import BACKENDS, SEED_ALIASES

DEFAULT_PLUGIN_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
VENDOR = "flexblock"
DISTRIBUTION = "flexblock"
STORE = ".flexblock"
CURRENT, PREVIOUS = "current", "previous"
MANIFEST = "flexblock-version.json"   # in a version and in a bundle
DRIVER_SCRIPT = os.path.join("bin", "driver")
CLI_SCRIPT = os.path.join("bin", "flexvolume")
BUNDLE_PYTHON = os.path.join("bin", "python3")
SITE = "site-packages"
# Kernels before 5.1 read only the first 127 bytes of a "#!" line.
SHEBANG_MAX = 127
# Our own scripts' signature, to recognise the executables of earlier installs.
_SIGNATURE = "from flexvolume.driver import main"


class InstallError(OSError):
    """An install, uninstall or status check that cannot be done; errno and the path."""


class Version(NamedTuple):
    name: str        # <version>-<digest>
    path: str        # the version's directory
    python: str      # the interpreter its scripts run


class Installed(NamedTuple):
    version: Version
    drivers: dict[str, str]   # driver name -> executable path in the plugin dir


class Status(NamedTuple):
    current: str | None       # version names, None when absent
    previous: str | None
    drivers: dict[str, str]   # driver name -> its init reply (or the error)
    ok: bool                  # current is this copy, and every driver runs and answers init


# -- names and places -------------------------------------------------------------------------
def driver_names() -> list[str]:
    """The driver names to install: each registered backend under our vendor, and the seeds'
    names (e.g. ``kvaps/loop``)."""
    return [f"{VENDOR}/{name}" for name in BACKENDS] + list(SEED_ALIASES)


def driver_path(plugin_dir: str, driver: str) -> str:
    vendor, _, name = driver.partition("/")
    if not vendor or not name or "/" in name or "~" in driver or driver.startswith("."):
        raise ValueError(f"driver name {driver!r} is not of the form vendor/name")
    return os.path.join(plugin_dir, f"{vendor}~{name}", name)


def store_dir(plugin_dir: str) -> str:
    return os.path.join(os.path.dirname(driver_path(plugin_dir, driver_names()[0])), STORE)


def _link_target(plugin_dir: str, driver: str) -> str:
    """Where the symlink of *driver* points, relative to its directory."""
    entry_dir = os.path.dirname(driver_path(plugin_dir, driver))
    return os.path.relpath(os.path.join(store_dir(plugin_dir), CURRENT, DRIVER_SCRIPT), entry_dir)


# -- what this copy of the code installs ---------------------------------------------------------
def bundle_root() -> str | None:
    """The bundle this interpreter runs from (deploy/bundle.py), or None for a pip install."""
    return sys.prefix if os.path.isfile(os.path.join(sys.prefix, MANIFEST)) else None


def _distributions() -> list[importlib.metadata.Distribution]:
    """Our distribution and the closure of its requirements (extras and absent optional
    requirements left out)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = [DISTRIBUTION]
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name == DISTRIBUTION:
                raise InstallError(errno.ENOENT, f"the {DISTRIBUTION} distribution is not "
                                   "installed (pip install it)", name) from None
            continue
        seen[key] = dist
        for requirement in dist.requires or []:
            if "extra ==" not in requirement.partition(";")[2]:
                pending.append(re.match(r"[A-Za-z0-9._-]+", requirement)[0])
    return list(seen.values())


def _copy_file(source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(source, target)


def _write_metadata(site: str, dist: importlib.metadata.Distribution) -> None:
    """Our own metadata (name, version, requirements, packages), whatever format the source
    install keeps it in, so that the copy can install and check itself."""
    info = os.path.join(site, f"{DISTRIBUTION}-{dist.version}.dist-info")
    os.makedirs(info)
    requires = "".join(f"Requires-Dist: {r}\n" for r in dist.requires or [])
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {dist.version}\n{requires}")
    with open(os.path.join(info, "top_level.txt"), "w", encoding="utf-8") as f:
        f.write(dist.read_text("top_level.txt") or "")


def _copy_packages(site: str) -> None:
    """Our packages and their dependencies' files into *site*. Ours are copied from wherever
    the import system finds them (an editable install included)."""
    for dist in _distributions():
        if dist.metadata["Name"].lower() != DISTRIBUTION:
            for file in dist.files or []:
                if file.parts[0] != "..":
                    _copy_file(str(dist.locate_file(file)), os.path.join(site, *file.parts))
            continue
        _write_metadata(site, dist)
        for top in (dist.read_text("top_level.txt") or "").split():
            spec = importlib.util.find_spec(top)
            if spec is None:
                raise InstallError(errno.ENOENT, f"package {top} of {DISTRIBUTION} is not "
                                   "importable", top)
            if spec.submodule_search_locations:
                shutil.copytree(list(spec.submodule_search_locations)[0],
                                os.path.join(site, top), dirs_exist_ok=True)
            else:
                _copy_file(spec.origin, os.path.join(site, os.path.basename(spec.origin)))


def tree_digest(root: str, exclude: Iterable[str] = ()) -> str:
    """A digest of the files below *root* (names, content, executable bit); compiled caches
    and the paths in *exclude* (relative) left out."""
    skip = set(exclude)
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if rel in skip:
                continue
            st = os.lstat(path)
            digest.update(f"{rel}\0{st.st_mode & 0o111:o}\0".encode("utf-8", "surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            else:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def version_name(digest: str) -> str:
    return f"{importlib.metadata.version(DISTRIBUTION)}-{digest[:12]}"


def _pip_version(root: str, python: str) -> str:
    """The name of a pip install's version: its packages and the interpreter that runs them."""
    return version_name(hashlib.sha256(f"{tree_digest(root)}\0{python}".encode()).hexdigest())


def _read_manifest(root: str) -> dict:
    with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def script(python: str, site: str, call: str) -> str:
    """A script run by *python* in isolated mode, importing from *site* only (and the
    interpreter's standard library)."""
    shebang = f"#!{python} -IS"
    if len(shebang) > SHEBANG_MAX:
        raise InstallError(errno.ENAMETOOLONG, f"the interpreter line {shebang!r} is longer "
                           f"than the {SHEBANG_MAX} bytes kernels before 5.1 read; use a "
                           "shorter plugin directory", python)
    return f"{shebang}\nimport sys\nsys.path[:0] = [{site!r}]\n{call}\n"


def relocate(root: str, final: str, python: str | None = None) -> None:
    """Make the version (or bundle) in *root* runnable once it is at *final*: the bundled
    interpreter's loader (when *python* is None) and the scripts' interpreter lines."""
    if python is None:
        python = os.path.join(final, BUNDLE_PYTHON)
        loader = os.path.join(final, "lib", os.path.basename(elf.interpreter(
            os.path.join(root, BUNDLE_PYTHON))))
        elf.set_interpreter(os.path.join(root, BUNDLE_PYTHON), loader)
    site = os.path.join(final, SITE)
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    _write(os.path.join(root, DRIVER_SCRIPT),
           script(python, site, "from flexvolume.driver import main\nmain()"), 0o755)
    _write(os.path.join(root, CLI_SCRIPT),
           script(python, site, "from flexvolume.cli import main\nsys.exit(main())"), 0o755)


def compile_site(site: str) -> None:
    """Byte-compile *site*, with paths relative to it in tracebacks (the import path resolves
    them wherever the version is), so imports never write below a published version."""
    compileall.compile_dir(site, quiet=2, stripdir=site, workers=1)


# -- the store ---------------------------------------------------------------------------------
def _sync(path: str) -> None:
    """Make everything written below *path* durable (syncfs: one call for the whole tree)."""
    from ._ffi import lib

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        r = lib.fb_syncfs(fd)
    finally:
        os.close(fd)
    if r < 0:
        raise InstallError(-r, os.strerror(-r), path)


def _symlink(target: str, path: str) -> None:
    """Point *path* at *target* with one rename (a dot-named temporary first)."""
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new")
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    os.symlink(target, temp)
    os.rename(temp, path)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:   # absent, or not a link
        return None


class _Lock:
    """An exclusive lock on the store, so that installs and uninstalls run one at a time. An
    uninstall removes the store, lock file included: a waiter then locks the new one."""

    def __init__(self, store: str):
        self.store = store
        self.fd = -1

    def __enter__(self) -> _Lock:
        path = os.path.join(self.store, ".lock")
        while True:
            os.makedirs(self.store, mode=0o755, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                    return self
            except FileNotFoundError:
                pass
            os.close(self.fd)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _publish(store: str) -> Version:
    """Build this copy's version in the store (unless it is there already); return it."""
    bundle = bundle_root()
    temp = tempfile.mkdtemp(prefix=".new-", dir=store)
    try:
        if bundle is not None:
            name = _read_manifest(bundle)["version"]
            final, python = os.path.join(store, name), None
            if not os.path.isdir(final):
                shutil.copytree(bundle, temp, symlinks=True, dirs_exist_ok=True)
        else:
            python = os.path.realpath(sys.executable)
            _copy_packages(os.path.join(temp, SITE))
            name = _pip_version(temp, python)
            final = os.path.join(store, name)
        if not os.path.isdir(final):
            relocate(temp, final, python)
            if python is not None:
                compile_site(os.path.join(temp, SITE))
                with open(os.path.join(temp, MANIFEST), "w", encoding="utf-8") as f:
                    json.dump({"version": name, "python": python}, f)
            _sync(temp)
            os.chmod(temp, 0o755)
            os.rename(temp, final)
        return Version(name, final, python or os.path.join(final, BUNDLE_PYTHON))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _ours(path: str, store: str) -> bool:
    """Whether the driver executable at *path* is ours: a link into our store, or the script of
    an install made before versions existed."""
    target = _readlink(path)
    if target is not None:
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        return resolved.startswith(store + os.sep)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _SIGNATURE in f.read(4096)
    except OSError:
        return False


def _entries(plugin_dir: str, store: str) -> dict[str, str]:
    """Our driver executables in *plugin_dir*: driver name -> path."""
    found = {}
    try:
        vendors = os.listdir(plugin_dir)
    except FileNotFoundError:
        return found
    for entry in vendors:
        if entry.startswith(".") or "~" not in entry:
            continue
        vendor, _, name = entry.rpartition("~")
        path = os.path.join(plugin_dir, entry, name)
        if os.path.lexists(path) and _ours(path, store):
            found[f"{vendor}/{name}"] = path
    return found


def _remove_entry(path: str) -> None:
    for leftover in (path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new")):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # holds files that are not ours (or the store)


def _collect_garbage(store: str) -> None:
    """Remove versions neither current nor previous, and temporaries of killed installs (the
    lock is held, so no install is writing them)."""
    keep = {_readlink(os.path.join(store, CURRENT)), _readlink(os.path.join(store, PREVIOUS))}
    for name in os.listdir(store):
        path = os.path.join(store, name)
        if name in keep or name in (CURRENT, PREVIOUS, ".lock") or not os.path.isdir(path) \
                or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)


def install(plugin_dir: str = DEFAULT_PLUGIN_DIR, names: Sequence[str] | None = None) -> Installed:
    """Install this copy as the current version and link *names* (default: every registered
    driver name; the store's own driver is always linked). A full install also removes links of
    ours under names no longer registered. Safe to run again and concurrently."""
    registered = driver_names()
    wanted = list(dict.fromkeys([registered[0], *(registered if names is None else names)]))
    for driver in wanted:
        driver_path(plugin_dir, driver)  # validates the name before anything changes
    store = store_dir(plugin_dir)
    with _Lock(store):
        version = _publish(store)
        current = os.path.join(store, CURRENT)
        previous = _readlink(current)
        if previous is not None and previous != version.name:
            _symlink(previous, os.path.join(store, PREVIOUS))
        if previous != version.name:
            _symlink(version.name, current)
        drivers = {}
        for driver in wanted:
            path = driver_path(plugin_dir, driver)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            # Replaced even when unchanged: the rename makes kubelet probe (init) it again.
            _symlink(_link_target(plugin_dir, driver), path)
            drivers[driver] = path
        if names is None:
            for driver, path in _entries(plugin_dir, store).items():
                if driver not in drivers:
                    _remove_entry(path)
        _collect_garbage(store)
    return Installed(version, drivers)


def uninstall(plugin_dir: str = DEFAULT_PLUGIN_DIR) -> list[str]:
    """Remove every driver executable of ours (whatever name it was installed under), then the
    store; returns the executables removed. Files that are not ours are left alone."""
    store = store_dir(plugin_dir)
    if not os.path.isdir(store):
        entries = _entries(plugin_dir, store)   # only scripts of installs made before versions
        for path in entries.values():
            _remove_entry(path)
        return sorted(entries.values())
    with _Lock(store):
        entries = _entries(plugin_dir, store)
        host = driver_path(plugin_dir, driver_names()[0])
        for path in entries.values():
            if path != host:
                _remove_entry(path)
        for name in os.listdir(store):
            if name != ".lock":
                path = os.path.join(store, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        os.unlink(os.path.join(store, ".lock"))
        os.rmdir(store)
        if host in entries.values():
            # Last: kubelet's final event for this directory is then the driver's removal.
            _remove_entry(host)
    return sorted(entries.values())


def own_version() -> str:
    """The version name this copy installs as."""
    bundle = bundle_root()
    if bundle is not None:
        return _read_manifest(bundle)["version"]
    with tempfile.TemporaryDirectory(prefix="flexblock-version-") as temp:
        _copy_packages(os.path.join(temp, SITE))
        return _pip_version(temp, os.path.realpath(sys.executable))


def _answers(reply: str) -> bool:
    """Whether *reply* is a driver's answer (a Failure included: a backend may answer init
    with what this node lacks, e.g. sheepdog) rather than the output of a driver that does not
    run."""
    try:
        return json.loads(reply).get("status") in ("Success", "Failure", "Not supported")
    except (ValueError, AttributeError):
        return False


def status(plugin_dir: str = DEFAULT_PLUGIN_DIR, timeout: float = 10.0) -> Status:
    """The installed versions, and every registered driver's ``init`` reply, run as kubelet
    runs it. ``ok`` when the current version is this copy and every driver answers."""
    store = store_dir(plugin_dir)
    current = _readlink(os.path.join(store, CURRENT))
    replies = {}
    for driver in driver_names():
        path = driver_path(plugin_dir, driver)
        try:
            p = subprocess.run([path, "init"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, cwd="/", timeout=timeout)
            replies[driver] = p.stdout.decode("utf-8", "replace").strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            replies[driver] = f"cannot run {path}: {e}"
    ok = current == own_version() and all(map(_answers, replies.values()))
    return Status(current, _readlink(os.path.join(store, PREVIOUS)), replies, ok)
