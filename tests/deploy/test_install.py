"""`flexvolume install`/`uninstall`/`status` from a pip install (this venv), on the host, and the
one ELF field the installer rewrites."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from driver.kubelet import Kubelet
from flexvolume import elf, install

SEED_SCRIPT = "#!/bin/sh\n# the seed's driver\necho '{\"status\": \"Success\"}'\n"


def flexvolume(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """The `flexvolume` command of this venv."""
    executable = Path(sys.executable).with_name("flexvolume")
    return subprocess.run([executable, *map(os.fspath, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def plugins(tmp_path):
    """A plugin dir, removed at teardown: the leak guard runs `losetup -j` on every file left
    under tmp_path, and a version holds hundreds."""
    path = tmp_path / "plugins"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def kubelet_for(plugin_dir: Path, tmp_path: Path) -> Kubelet:
    return Kubelet(tmp_path / "kubelet", plugin_dir, tmp_path / "flexblock.log")


def test_install_links_every_registered_name_to_one_current_version(tmp_path, plugins):
    installed = install.install(str(plugins))
    assert list(installed.drivers) == install.driver_names()
    store = Path(install.store_dir(str(plugins)))
    assert os.readlink(store / install.CURRENT) == installed.version.name
    assert not (store / install.PREVIOUS).exists()
    kubelet = kubelet_for(plugins, tmp_path)
    for driver, path in installed.drivers.items():
        assert os.path.islink(path)
        assert Path(path).resolve() == store / installed.version.name / install.DRIVER_SCRIPT
        assert kubelet.init(driver).status == "Success"
    # The version is a copy: nothing it runs lies in this venv but the interpreter.
    site = Path(installed.version.path) / install.SITE
    assert (site / "flexvolume" / "driver.py").is_file() and (site / "cffi").is_dir()
    text = (Path(installed.version.path) / install.DRIVER_SCRIPT).read_text()
    assert text.startswith(f"#!{os.path.realpath(sys.executable)} -IS\n")
    assert sys.prefix not in text.replace(os.path.realpath(sys.executable), "")
    # The installed copy's own command knows itself for what is installed.
    result = subprocess.run([Path(installed.version.path) / install.CLI_SCRIPT, "status",
                             "--plugin-dir", plugins], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installs_and_uninstalls_run_concurrently_and_leave_a_consistent_state(plugins):
    verbs = ["install", "uninstall", "install", "install", "uninstall", "install"]
    runs = [subprocess.Popen([Path(sys.executable).with_name("flexvolume"), verb,
                              "--plugin-dir", plugins], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for verb in verbs]
    outputs = [p.communicate(timeout=120)[0].decode() for p in runs]
    assert [p.returncode for p in runs] == [0] * len(verbs), outputs
    store = Path(install.store_dir(str(plugins)))
    if store.exists():   # an install came last: installed, one version, no temporaries
        assert sorted(os.listdir(store)) == sorted([".lock", install.CURRENT,
                                                    os.readlink(store / install.CURRENT)])
        assert install.status(str(plugins)).ok
    else:                # an uninstall came last: nothing of ours
        assert os.listdir(plugins) == []
    result = flexvolume("install", "--plugin-dir", plugins)
    assert result.returncode == 0, result.stderr
    result = flexvolume("status", "--plugin-dir", plugins)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_daemonset_command_installs_stays_up_and_leaves_the_driver_at_sigterm(plugins):
    env = {**os.environ, "FLEXVOLUME_PLUGIN_DIR": str(plugins)}   # as the manifest sets it
    process = subprocess.Popen([Path(sys.executable).with_name("flexvolume"), "install",
                                "--keep-running"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert process.stdout.readline().startswith("installed ")
        assert process.poll() is None
        assert install.status(str(plugins)).ok
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert install.status(str(plugins)).ok


def test_install_over_a_seed_driver_replaces_it_and_keeps_its_other_files(tmp_path, plugins):
    seed = plugins / "kvaps~loop"
    seed.mkdir(parents=True)
    (seed / "loop").write_text(SEED_SCRIPT)
    (seed / "jq").write_text("not ours")
    installed = install.install(str(plugins), [*install.driver_names(), "kvaps/loop"])
    assert os.path.islink(seed / "loop") and (seed / "jq").read_text() == "not ours"
    reply = kubelet_for(plugins, tmp_path).init("kvaps/loop")
    assert reply.status == "Success" and "capabilities" in reply.body
    assert installed.drivers["kvaps/loop"] == str(seed / "loop")


def test_a_full_install_drops_our_names_that_are_no_longer_registered(plugins):
    install.install(str(plugins), [*install.driver_names(), "flexblock/retired"])
    (plugins / "other~thing").mkdir()
    (plugins / "other~thing" / "thing").write_text(SEED_SCRIPT)
    install.install(str(plugins))
    assert not (plugins / "flexblock~retired").exists()
    assert (plugins / "other~thing" / "thing").read_text() == SEED_SCRIPT
    assert all(os.path.islink(install.driver_path(str(plugins), d))
               for d in install.driver_names())


def test_uninstall_removes_ours_only(plugins):
    install.install(str(plugins), [*install.driver_names(), "kvaps/loop"])
    (plugins / "kvaps~loop" / "jq").write_text("not ours")
    legacy = plugins / "flexblock~old" / "old"   # the script of an install before versions
    legacy.parent.mkdir()
    legacy.write_text(f"#!{sys.executable} -IS\nfrom flexvolume.driver import main\nmain()\n")
    (plugins / "other~thing").mkdir()
    (plugins / "other~thing" / "thing").write_text(SEED_SCRIPT)
    result = flexvolume("uninstall", "--plugin-dir", plugins)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(plugins)) == ["kvaps~loop", "other~thing"]
    assert os.listdir(plugins / "kvaps~loop") == ["jq"]
    assert flexvolume("uninstall", "--plugin-dir", plugins).returncode == 0   # twice is fine


def test_status_fails_when_a_driver_is_missing_or_not_this_version(plugins):
    assert flexvolume("status", "--plugin-dir", plugins).returncode == 1   # nothing installed
    installed = install.install(str(plugins))
    assert install.status(str(plugins)).ok
    os.unlink(installed.drivers[install.driver_names()[0]])
    state = install.status(str(plugins))
    assert not state.ok and "cannot run" in state.drivers[install.driver_names()[0]]


def test_set_interpreter_refuses_what_does_not_fit_and_leaves_the_file_unchanged(tmp_path):
    """(Rewriting into the room a bundle reserves is what test_node.py's installs do.)"""
    program = tmp_path / "true"
    shutil.copy2("/bin/true", program)
    loader = elf.interpreter(str(program))
    assert os.path.isfile(loader)
    before = program.read_bytes()
    for path, code in (("/" + "x" * len(loader), errno.ENAMETOOLONG),
                       ("lib64/ld.so", errno.EINVAL)):
        with pytest.raises(elf.ElfError) as failure:
            elf.set_interpreter(str(program), path)
        assert failure.value.errno == code
    assert program.read_bytes() == before
    assert subprocess.run([program]).returncode == 0
    with pytest.raises(elf.ElfError) as failure:
        elf.set_interpreter(__file__, loader)
    assert failure.value.errno == errno.ENOEXEC


def test_an_interpreter_line_old_kernels_would_cut_is_refused(plugins):
    deep = plugins / ("d" * 60) / ("e" * 60)
    with pytest.raises(install.InstallError) as failure:
        install.script(str(deep / "bin" / "python3"), str(deep / "site-packages"), "pass")
    assert failure.value.errno == errno.ENAMETOOLONG
