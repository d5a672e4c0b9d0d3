"""The sheepdog driver (kvaps/qemu-nbd's sheepdog mode): its options, the `dog` and qemu
command lines built from them (checked exactly, against sheepdog's dog/vdi.c and qemu 5.2's
block/sheepdog.c), and what it answers on nodes that lack sheepdog.

No sheepdog cluster, `dog` or qemu with the sheepdog driver can exist here (sheepdog is in no
registry, qemu 6.0 removed the driver): detection is tested with and without stand-ins for them
on PATH (sheepdog_standins.py). The whole mount runs on the real kernel NBD in
test_vm_sheepdog.py, against the same stand-ins.
"""

import json
import os

import pytest

import nbd
from nbd import server
from flexvolume import sheepdog_volume
from flexvolume.backends import sheepdog
from flexvolume.errors import DriverError, OptionError

import sheepdog_standins
from kubelet import Kubelet, Pod, go_json, kubelet, share  # noqa: F401

DRIVERS = ["flexblock/sheepdog", "kvaps/sheepdog"]
GiB = 1 << 30


def parse(**user: str) -> sheepdog_volume.SheepdogOptions:
    return sheepdog_volume.parse(go_json(Kubelet.options(user)), sheepdog)


def create_argv(**user: str) -> list[str]:
    return sheepdog_volume.create_argv(parse(**user), sheepdog)


CONNECTION = ["-a", "127.0.0.1", "-p", "7000"]


@pytest.mark.parametrize("user, argv", [
    ({}, ["dog", "vdi", "create", *CONNECTION, "vol1", str(GiB)]),
    ({"prealloc": "true"}, ["dog", "vdi", "create", "-P", *CONNECTION, "vol1", str(GiB)]),
    ({"prealloc": "false", "hyper": "false"}, ["dog", "vdi", "create", *CONNECTION, "vol1",
                                               str(GiB)]),
    ({"hyper": "true"}, ["dog", "vdi", "create", "-y", *CONNECTION, "vol1", str(GiB)]),
    ({"copies": "3"}, ["dog", "vdi", "create", "-c", "3", *CONNECTION, "vol1", str(GiB)]),
    ({"copies": "4:2"}, ["dog", "vdi", "create", "-c", "4:2", *CONNECTION, "vol1", str(GiB)]),
    ({"block_size_shift": "22"}, ["dog", "vdi", "create", "-z", "22", *CONNECTION, "vol1",
                                  str(GiB)]),
    ({"address": "10.0.0.5", "port": "7001"},
     ["dog", "vdi", "create", "-a", "10.0.0.5", "-p", "7001", "vol1", str(GiB)]),
    # The seed's documented default; dog takes IP literals only.
    ({"address": "localhost"}, ["dog", "vdi", "create", *CONNECTION, "vol1", str(GiB)]),
    ({"prealloc": "yes", "hyper": "on", "copies": "16:15", "address": "192.168.1.2",
      "port": "65535"},
     ["dog", "vdi", "create", "-P", "-y", "-c", "16:15", "-a", "192.168.1.2", "-p", "65535",
      "vol1", str(GiB)]),
    ({"prealloc": "1", "copies": "31", "block_size_shift": "31", "size": "1500m"},
     ["dog", "vdi", "create", "-P", "-c", "31", "-z", "31", *CONNECTION, "vol1",
      str(1500 << 20)]),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_create_command_for_each_option(user, argv):
    assert create_argv(**{"vdiname": "vol1", "size": "1Gi", **user}) == argv


def test_list_command_and_qemu_filename():
    opts = parse(vdiname="data.vol-1_a", address="10.1.2.3", port="7002")
    assert sheepdog.vdi_list_argv(opts.vdi) == \
        ["dog", "vdi", "list", "-r", "-a", "10.1.2.3", "-p", "7002", "data.vol-1_a"]
    assert sheepdog.qemu_filename(opts.vdi) == "sheepdog:10.1.2.3:7002:data.vol-1_a"
    assert sheepdog.qemu_filename(parse(vdiname="v").vdi) == "sheepdog:127.0.0.1:7000:v"


def test_server_identity_is_a_short_name_per_vdi_and_cluster():
    idents = {sheepdog.server_ident(parse(vdiname="v", **extra).vdi)
              for extra in ({}, {"port": "7001"}, {"address": "10.0.0.1"})}
    idents.add(sheepdog.server_ident(parse(vdiname="w").vdi))
    assert len(idents) == 4
    idents.add(sheepdog.server_ident(parse(vdiname="x" * 255).vdi))
    for ident in idents:
        assert ident.startswith("sheepdog-") and len(ident) == len("sheepdog-") + 32
        # a unix socket's path has room for 107 bytes
        assert len(os.path.join(server.RUN_DIR, ident + ".sock")) < 108


def test_defaults_and_filesystem_options():
    opts = parse(vdiname="v")
    assert opts.vdi == sheepdog.Vdi("v", "127.0.0.1", 7000)
    assert (opts.size, opts.prealloc, opts.hyper, opts.copies, opts.block_size_shift) == \
        (None, False, False, None, None)
    assert (opts.fs_type, opts.read_only, opts.mmp, opts.mmp_update_interval, opts.fsck,
            opts.fsck_options) == (None, False, True, 5, True, "a")
    opts = parse(vdiname="v", fsType="xfs", mmp="false", fsck="no", fsck_options="p",
                 mount_options="noatime")
    assert (opts.fs_type, opts.mmp, opts.fsck, opts.fsck_options, opts.mount_options) == \
        ("xfs", False, False, "p", ("noatime",))


def test_seed_allocate_option_is_taken_and_changes_nothing():
    # A basic option of the seed, which read it and created missing VDIs from `size` alone.
    assert parse(vdiname="v", size="1Gi", allocate="true") == parse(vdiname="v", size="1Gi")


@pytest.mark.parametrize("option, value", [
    ("vdiname", ""), ("vdiname", "-rf"), ("vdiname", "a:b"), ("vdiname", "a/b"),
    ("vdiname", "a b"), ("vdiname", "a#1"), ("vdiname", "a?socket=x"), ("vdiname", "x" * 256),
    ("vdiname", "vé"), ("vdiname", ".hidden"),
    ("port", "0"), ("port", "65536"), ("port", "70o0"), ("port", "-1"), ("port", "７０００"),
    ("copies", "0"), ("copies", "32"), ("copies", "01"), ("copies", "3:1"), ("copies", "2:0"),
    ("copies", "2:16"), ("copies", "2:1:1"), ("copies", "two"), ("copies", " 2"),
    ("block_size_shift", "19"), ("block_size_shift", "32"), ("block_size_shift", "2^22"),
    ("address", "::1"), ("address", "sheep.example.com"), ("address", "1.2.3.256"),
    ("address", "010.1.1.1"), ("address", "10.0.0.1:7000"),
    ("prealloc", "maybe"), ("prealloc", ""), ("hyper", "2"), ("allocate", "maybe"),
    ("size", "1x"), ("size", "1k"),
    ("file", "/kube-volumes/v"), ("share", "/mnt"),
])
def test_bad_option_is_a_failure_naming_it(option, value):
    user = {"vdiname": "vol1", "size": "1Gi", option: value}
    with pytest.raises(OptionError) as raised:
        parse(**user)
    assert raised.value.option == option


def test_hyper_and_block_size_shift_exclude_each_other():
    with pytest.raises(OptionError) as raised:
        parse(vdiname="v", hyper="true", block_size_shift="22")
    assert raised.value.option == "block_size_shift" and "hyper" in str(raised.value)
    assert create_argv(vdiname="v", size="1Gi", hyper="false", block_size_shift="22") == \
        ["dog", "vdi", "create", "-z", "22", *CONNECTION, "v", str(GiB)]


def test_vdiname_is_required():
    with pytest.raises(OptionError) as raised:
        parse(size="1Gi")
    assert raised.value.option == "vdiname"


def test_vdi_list_output_is_read_by_name_and_kind():
    # dog vdi list -r: KIND NAME SNAPID SIZE USED SHARED CTIME VID COPIES TAG
    output = ("s vol1 1 1073741824 4194304 0 1700000000 7c2b24 3 before\n"
              "= vol1 0 1073741824 8388608 4194304 1700000100 7c2b25 3 \n"
              "= vol10 0 2147483648 0 0 1700000200 7c2b26 2:1 \n")
    assert sheepdog.parse_vdi_list(output, "vol1") == sheepdog.VdiState(GiB, 8 << 20)
    assert sheepdog.parse_vdi_list(output, "vol10") == sheepdog.VdiState(2 * GiB, 0)
    assert sheepdog.parse_vdi_list(output, "vol") is None
    assert sheepdog.parse_vdi_list("", "vol1") is None
    # Only snapshots of the name: no working VDI to mount.
    assert sheepdog.parse_vdi_list(output.splitlines()[0], "vol1") is None
    assert sheepdog.parse_vdi_list("c vol2 0 1048576 0 1048576 1 2 3 \n", "vol2") == \
        sheepdog.VdiState(1 << 20, 0)
    with pytest.raises(DriverError):
        sheepdog.parse_vdi_list("= vol1 0 1.0GB 0 0 1 2 3\n", "vol1")


# -- detection, through the driver as kubelet runs it ---------------------------------------------
def _mount(kubelet, driver, path: str | None = None):
    env = {"PATH": f"{path}:{kubelet.env['PATH']}"} if path else None
    return kubelet.mount(Pod("web"), {"vdiname": "vol1", "size": "1G"}, driver=driver, env=env)


@pytest.mark.parametrize("driver", DRIVERS)
def test_node_without_sheepdog_gets_a_failure_naming_what_it_lacks(kubelet, share, driver):
    kubelet.install(driver)
    # init succeeds so that kubelet registers the plugin and the pod's events show mount's reason
    assert kubelet.init(driver).status == "Success"
    reply = _mount(kubelet, driver)
    assert reply.status == "Failure"
    assert "lacks the sheepdog CLI `dog`" in reply.message
    assert "qemu 6.0 removed it" in reply.message
    assert "no longer packaged" in reply.message
    # A pod that never mounted is still torn down.
    assert kubelet.unmount(Pod("web"), driver=driver).status == "Success"


def test_each_missing_tool_is_named_alone(kubelet, share, tmp_path):
    kubelet.install(DRIVERS[0])
    store = tmp_path / "vdis"
    only_dog = sheepdog_standins.install(tmp_path / "dog-bin", store, qemu=False)
    reply = _mount(kubelet, DRIVERS[0], only_dog)
    assert reply.status == "Failure"
    assert "qemu 6.0 removed it" in reply.message and "`dog`" not in reply.message
    only_qemu = sheepdog_standins.install(tmp_path / "qemu-bin", store, dog=False)
    reply = _mount(kubelet, DRIVERS[0], only_qemu)
    assert reply.status == "Failure"
    assert "lacks the sheepdog CLI `dog`" in reply.message and "qemu 6.0" not in reply.message
    assert sheepdog_standins.dog_calls(store) == []


def _kernel_has_nbd() -> bool:
    try:
        nbd.connected()
    except nbd.NotSupported:
        return False
    return True


@pytest.mark.skipif(_kernel_has_nbd(), reason="this kernel has nbd: test_vm_sheepdog mounts")
@pytest.mark.parametrize("driver", DRIVERS)
def test_with_the_tools_present_a_kernel_without_nbd_is_named(kubelet, share, tmp_path, driver):
    kubelet.install(driver)
    store = tmp_path / "vdis"
    reply = _mount(kubelet, driver, sheepdog_standins.install(tmp_path / "bin", store))
    assert reply.status == "Failure"
    assert "lacks" not in reply.message
    assert "this kernel has no nbd driver" in reply.message
    # Refused before anything changed: no VDI was even looked up.
    assert sheepdog_standins.dog_calls(store) == [] and list(store.iterdir()) == []
