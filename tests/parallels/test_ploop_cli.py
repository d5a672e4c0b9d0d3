"""The installed `ploop` command: init, info, check, grow (mount/umount: test_vm_ploop.py)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ploop import image

from helpers import run

MiB = 1 << 20


def ploop_cli(*args) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "ploop"
    return subprocess.run([executable, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_init_info_grow_as_json(tmp_path):
    out = ploop_cli("init", "-s", "64M", "-b", "64", "--json", tmp_path / "v" / "disk.hds")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["version"] == 1
    assert doc["volume"]["size"] == 64 * MiB and doc["volume"]["cluster_size"] == 32 << 10
    assert doc["volume"]["image"] == str(tmp_path / "v" / "disk.hds")
    assert run("qemu-img", "check", "-f", "parallels", tmp_path / "v" / "disk.hds")

    info = json.loads(ploop_cli("info", "--json", tmp_path / "v" / "DiskDescriptor.xml").stdout)
    assert info["volume"]["format"] == "parallels" and info["volume"]["attachment"] is None
    img = json.loads(ploop_cli("info", "--json", tmp_path / "v" / "disk.hds").stdout)["image"]
    assert (img["version"], img["empty"], img["in_use"], img["bat_entries"]) == (
        2, True, False, 2048)

    grown = ploop_cli("grow", "-s", "2097152", tmp_path / "v")  # a bare number: sectors
    assert grown.returncode == 0 and grown.stdout.strip() == str(1 << 30)
    assert image.read_header(tmp_path / "v" / "disk.hds").nb_sectors == 2097152


def test_init_modes_and_refusing_an_existing_volume(tmp_path):
    made = ploop_cli("init", "-s", "8M", "-f", "raw", "--sparse", tmp_path / "r" / "d")
    assert made.returncode == 0, made.stderr
    assert "Plain" in (tmp_path / "r" / "DiskDescriptor.xml").read_text()
    again = ploop_cli("init", "-s", "8M", tmp_path / "r" / "other")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert str(tmp_path / "r") in again.stderr and again.stdout == ""


def test_check_exit_status_and_repair(tmp_path):
    path = tmp_path / "disk.hds"
    image.create(path, 64 * MiB)
    clean = ploop_cli("check", path)
    assert clean.returncode == 0 and "clean" in clean.stdout
    with open(path, "r+b") as f:
        f.seek(44)
        f.write(struct.pack("<I", image.IN_USE))
    dirty = ploop_cli("check", "--json", path)
    assert dirty.returncode == 1
    assert json.loads(dirty.stdout)["check"]["in_use"] is True
    repaired = ploop_cli("check", "--repair", path)
    assert repaired.returncode == 0, repaired.stderr
    assert "repaired with qemu-img check -r all" in repaired.stderr
    assert image.read_header(path).in_use == 0


@pytest.mark.parametrize("args", [["init", "x"], ["init", "-s", "12Q", "x"], ["frobnicate"],
                                  ["mount", "v", "--method", "loop"]])
def test_bad_usage_exits_2(args):
    assert ploop_cli(*args).returncode == 2


def test_errors_name_the_path(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "DiskDescriptor.xml").write_text("<Virtuozzo_disk_image/>")
    out = ploop_cli("info", tmp_path / "v")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"ploop: {tmp_path / 'v' / 'DiskDescriptor.xml'}: "
                                  "Disk_Parameters: missing")
