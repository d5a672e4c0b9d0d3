"""The ploop driver's options, init and what it answers on a host without NBD (this host's
kernel has none: the VM lane, test_vm_ploop.py, mounts for real)."""

from __future__ import annotations

import json
import os

import pytest

from flexvolume import ploop_volume
from flexvolume.backends import ploop as ploop_backend
from flexvolume.errors import DriverError, OptionError

from kubelet import Pod, kubelet, share  # noqa: F401

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
