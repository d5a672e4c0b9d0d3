"""Installing the driver into kubelet's plugin directory, and removing it.

The installed executable is a three-line Python script that runs this package with the very
interpreter it was installed from, in isolated mode without site (-IS): kubelet's environment
cannot redirect it, and start-up stays close to the bare interpreter's. Kubelet's prober
watches the directory and ignores names starting with a dot, so the script is written as
``.<driver>`` and renamed into place: kubelet never executes half a file.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import loopctl

import flexvolume

DEFAULT_PLUGIN_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
DEFAULT_DRIVER = "flexblock/loop"


def _import_paths() -> list[str]:
    """Where the driver's imports come from: our packages, then their dependencies."""
    paths = [os.path.dirname(os.path.dirname(flexvolume.__file__)),
             os.path.dirname(os.path.dirname(loopctl.__file__)),
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(paths))


def driver_script() -> str:
    return (f"#!{sys.executable} -IS\n"
            "import sys\n"
            f"sys.path[:0] = {_import_paths()!r}\n"
            "from flexvolume.driver import main\n"
            "main()\n")


def _driver_path(plugin_dir: str, driver: str) -> str:
    vendor, _, name = driver.partition("/")
    if not vendor or not name or "/" in name or "~" in driver or driver.startswith("."):
        raise ValueError(f"driver name {driver!r} is not of the form vendor/name")
    return os.path.join(plugin_dir, f"{vendor}~{name}", name)


def install(plugin_dir: str = DEFAULT_PLUGIN_DIR, driver: str = DEFAULT_DRIVER) -> str:
    """Install (or atomically replace) the driver executable; returns its path."""
    path = _driver_path(plugin_dir, driver)
    directory, name = os.path.split(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    temp = os.path.join(directory, f".{name}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o755)
    try:
        os.write(fd, driver_script().encode())
        os.fchmod(fd, 0o755)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    return path


def uninstall(plugin_dir: str = DEFAULT_PLUGIN_DIR, driver: str = DEFAULT_DRIVER) -> str:
    """Remove the driver executable and its directory (kubelet then unregisters it)."""
    path = _driver_path(plugin_dir, driver)
    for leftover in (path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}")):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(os.path.dirname(path))
    except (FileNotFoundError, OSError):
        pass  # gone already, or holds files that are not ours
    return path
