"""The ploop driver's options, init and what it answers on a host without NBD (this host's
kernel has none: the VM lane, test_vm_ploop.py, mounts for real)."""

from __future__ import annotations

import json
import os

import pytest

import loopctl
import ploop
from flexvolume import ploop_volume
from flexvolume.backends import ploop as ploop_backend
from flexvolume.errors import DriverError, OptionError
from ploop import native

from helpers import image_id
from kubelet import MiB, Pod, checksum, findmnt, kubelet, run, share, write_data  # noqa: F401

DRIVER = "virtuozzo/ploop"
SEED = {"volumeId": "golang-ploop-test", "size": "10G",
        "volumePath": "/vstorage/storage_pool/kubernetes"}


def _raw(**extra: str) -> str:
    return json.dumps({"kubernetes.io/fsType": "", "kubernetes.io/readwrite": "rw", **SEED,
                       **extra})


def test_seed_options_parse():
    opts = ploop_volume.parse(_raw())
    assert (opts.volume_path, opts.volume_id, opts.size) == (SEED["volumePath"],
                                                             SEED["volumeId"], 10 << 30)
    assert (opts.fs_type, opts.read_only, opts.vzs) == (None, False, {})


def test_volume_id_spellings():
    assert ploop_volume.parse(_raw(volumeID="golang-ploop-test")).volume_id == "golang-ploop-test"
    raw = json.dumps({**SEED, "volumeId": "", "volumeID": "other"})
    with pytest.raises(OptionError, match="differs"):
        ploop_volume.parse(raw)
    with pytest.raises(OptionError, match="differs"):
        ploop_volume.parse(_raw(volumeID="other"))


def test_vzs_options_and_the_readme_typo():
    opts = ploop_volume.parse(_raw(vzsReplicas="3:2", vzsEencoding="5+2/1",
                                   vzsFailureDomain="host", vzsTier="1"))
    assert opts.vzs == {"replicas": "3:2", "encoding": "5+2/1", "failure-domain": "host",
                        "tier": "1"}
    with pytest.raises(OptionError, match="contradicts"):
        ploop_volume.parse(_raw(vzsEncoding="5+2", vzsEencoding="3+1"))


@pytest.mark.parametrize("extra, option", [
    ({"volumeId": ""}, "volumeId"),
    ({"volumePath": ""}, "volumePath"),
    ({"size": "lots"}, "size"),
    ({"kubernetes.io/readwrite": "maybe"}, "kubernetes.io/readwrite"),
    ({"kubernetes.io/fsType": "ntfs"}, "kubernetes.io/fsType"),
    ({"file": "/x", "share": "/y"}, "file"),
])
def test_bad_options_are_named(extra, option):
    with pytest.raises(OptionError) as raised:
        ploop_volume.parse(_raw(**extra))
    assert raised.value.option == option
    if option == "file":
        assert "file, share" in str(raised.value)


def test_read_only(tmp_path):
    assert ploop_volume.parse(_raw(**{"kubernetes.io/readwrite": "ro"})).read_only


@pytest.mark.parametrize("volume_id", ["..", "a/b", "link", "."])
def test_volume_id_must_be_one_plain_component(share, volume_id):
    (share / "elsewhere").mkdir()
    (share / "link").symlink_to(share / "elsewhere")
    with pytest.raises(DriverError):
        ploop_volume.image.volume_directory("volumePath", str(share), "volumeId", volume_id)


def test_volume_path_must_exist_and_be_absolute(share):
    for path in ("relative/dir", str(share / "missing"), "/proc", "/"):
        with pytest.raises(DriverError):
            ploop_volume.image.volume_directory("volumePath", path, "volumeId", "v")
    assert ploop_volume.image.volume_directory(
        "volumePath", str(share), "volumeId", "v") == str(share / "v")


def test_vzs_without_vstorage_fails_and_changes_nothing(share, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    target = tmp_path / "pod"
    raw = json.dumps({"volumePath": str(share), "volumeId": "v", "size": "64Mi",
                      "vzsReplicas": "3"})
    with pytest.raises(DriverError, match="vstorage"):
        ploop_volume.mount(str(target), raw, ploop_backend)
    assert os.listdir(share) == [] and not target.exists()


def test_init_answers_no_resize(kubelet):
    kubelet.install(DRIVER, "flexblock/ploop")
    for driver in (DRIVER, "flexblock/ploop"):
        reply = kubelet.init(driver)
        assert reply.status == "Success"
        assert reply.body["capabilities"]["requiresFSResize"] is False


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="this kernel has nbd")
def test_mount_without_nbd_fails_cleanly(kubelet, share):
    kubelet.install(DRIVER)
    reply = kubelet.mount(Pod("web"), {"volumePath": str(share), "volumeId": "v",
                                       "size": "64Mi"}, driver=DRIVER)
    assert reply.status == "Failure" and "no nbd" in reply.message
    assert os.listdir(share) == []


# -- natively attached volumes ---------------------------------------------------------------------
# Native ploop needs a ploop kernel, which no machine here has (neither the host nor the VM
# lane's Debian kernel). So a stand-in `ploop` tool answers `list` and `umount -d` as the real
# one does (P tools/ploop.c), and a loop device on a raw ploop volume's image stands in for
# /dev/ploopN: the mount, the unmount and the detach are real, what is not checked is ploop.
STAND_IN = """#!/bin/sh
echo "$*" >> "$FAKE_PLOOP_LOG"
case "$1 $2" in
  "list ") cat "$FAKE_PLOOP_STATE" ;;
  "umount -d") grep -q "^${3#/dev/} " "$FAKE_PLOOP_STATE" || { echo "$3: not ploop" >&2; exit 1; }
               losetup -d "$3" && : > "$FAKE_PLOOP_STATE" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def native_ploop(tmp_path, monkeypatch):
    """The stand-in tool on PATH; returns attach(volume) -> /dev/loopN "natively attached"."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ploop").write_text(STAND_IN)
    (bindir / "ploop").chmod(0o755)
    marker = tmp_path / "ploop_minor"
    marker.write_text("")
    state = tmp_path / "ploop.attached"
    state.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PLOOP_LOG", str(tmp_path / "ploop.log"))
    monkeypatch.setenv("FAKE_PLOOP_STATE", str(state))
    monkeypatch.setattr(native, "KERNEL_MARKERS", (str(marker),))
    made = []

    def attach(vol: ploop.Volume) -> str:
        dev = loopctl.attach(vol.image_path)
        dev.relinquish()
        state.write_text(f"{dev.name}       {vol.image_path}  \n")  # as ploop prints it
        made.append(image_id(vol.image_path))
        return dev.path

    yield attach
    for ident in made:  # the claim files our volumes got
        try:
            os.unlink(os.path.join(ploop_backend.FAMILY.claim_dir, ident))
        except FileNotFoundError:
            pass


def _ploop_log(tmp_path) -> list[str]:
    return (tmp_path / "ploop.log").read_text().splitlines()


def test_unmount_detaches_a_natively_attached_volume(share, tmp_path, native_ploop):
    vol = ploop.create_or_open(share / "v", 64 * MiB, mode="raw")
    device = native_ploop(vol)
    run("mkfs.ext4", "-q", device)
    target = tmp_path / "pod"
    target.mkdir()
    run("mount", device, target)
    digest = write_data(target)
    raw = json.dumps({"volumePath": str(share), "volumeId": "v"})
    assert "already mounted" in ploop_volume.mount(str(target), raw, ploop_backend)
    ploop.create_or_open(share / "w", 64 * MiB)
    with pytest.raises(DriverError, match="another filesystem"):
        ploop_volume.mount(str(target), json.dumps({"volumePath": str(share), "volumeId": "w"}),
                           ploop_backend)

    assert ploop_volume.unmount(str(target), ploop_backend) == f"unmounted {target} from {device}"
    assert findmnt(target) is None
    assert f"umount -d {device}" in _ploop_log(tmp_path)
    assert loopctl.find(vol.image_path) == []
    # the data went to the image: attached again, it is there
    dev = loopctl.attach(vol.image_path, read_only=True)
    try:
        run("mount", "-o", "ro", dev.path, target)
        try:
            assert checksum(target / "data.bin") == digest
        finally:
            run("umount", target)
    finally:
        dev.detach()


def test_collect_detaches_native_leftovers_nobody_claims(share, tmp_path, native_ploop):
    vol = ploop.create_or_open(share / "v", 64 * MiB, mode="raw")
    device = native_ploop(vol)
    ident = image_id(vol.image_path)
    ploop_backend.collect()  # no driver call ever handled it: attached by hand, left alone
    assert loopctl.find(vol.image_path) != []
    claim = ploop_backend.FAMILY.claim(ident)  # a running call's
    try:
        ploop_backend.collect()
        assert loopctl.find(vol.image_path) != []
    finally:
        os.close(claim)
    ploop_backend.collect()  # the call was killed: its claim went with it
    assert loopctl.find(vol.image_path) == []
    assert _ploop_log(tmp_path).count(f"umount -d {device}") == 1
