"""The kubelet calling convention: init, the calls we do not support, arity, and the reply
contract (one JSON document on stdout+stderr, exit code matching the status)."""

import json

import pytest

from flexvolume import driver as flex_driver

from kubelet import ALIAS, DRIVER, Kubelet, Pod, go_json, kubelet, share  # noqa: F401

CAPABILITIES = {"attach": False, "fsGroup": False, "requiresFSResize": True,
                "selinuxRelabel": True, "supportsMetrics": True}


def test_harness_serialises_options_like_go_json_marshal():
    # The exact argument of kubelet-flexvolume-protocol.md §7 (a), rebuilt by the harness.
    pod = Pod("web", uid="7c0a1f7e-1111-4222-8333-944455556666")
    options = Kubelet.options({"share": "/exports/a"}, volume="data", pod=pod, fs_group=2000,
                              secrets={"password": "s3cr3t"})
    assert go_json(options) == (
        '{"kubernetes.io/fsType":"","kubernetes.io/mounterArgs.FsGroup":"2000",'
        '"kubernetes.io/pod.name":"web","kubernetes.io/pod.namespace":"default",'
        '"kubernetes.io/pod.uid":"7c0a1f7e-1111-4222-8333-944455556666",'
        '"kubernetes.io/pvOrVolumeName":"data","kubernetes.io/readwrite":"rw",'
        '"kubernetes.io/secret/password":"czNjcjN0","kubernetes.io/serviceAccount.name":"default",'
        '"share":"/exports/a"}')
    assert go_json({"b": "<&>", "a": "é\n\x01\u2028"}) == \
        '{"a":"é\\n\\u0001\\u2028","b":"\\u003c\\u0026\\u003e"}'
    assert json.loads(go_json({"b": "<&>", "a": "é\n\x01\u2028"})) == \
        {"b": "<&>", "a": "é\n\x01\u2028"}


@pytest.mark.parametrize("driver", [DRIVER, ALIAS])
def test_init_reports_every_capability_as_a_boolean(kubelet, driver):
    reply = kubelet.init(driver)
    assert reply.status == "Success" and reply.code == 0
    assert reply.body["capabilities"] == CAPABILITIES
    assert json.loads(flex_driver.INIT_REPLIES["loop"]) == reply.body
    # The constant is the canonical compact dump of itself: no duplicate keys, nothing extra.
    assert flex_driver.INIT_REPLIES["loop"] == json.dumps(reply.body, separators=(",", ":"))


@pytest.mark.parametrize("driver", ["flexblock/qemu-nbd", "kvaps/qemu-nbd", "kvaps/nbd"])
def test_init_of_the_qemu_nbd_driver_does_not_offer_expandfs(kubelet, driver):
    # An NBD device cannot grow while connected (test_vm_qemu_nbd checks expandfs's Failure).
    kubelet.install(driver)
    reply = kubelet.init(driver)
    assert reply.status == "Success"
    assert reply.body["capabilities"] == {**CAPABILITIES, "requiresFSResize": False}
    assert flex_driver.INIT_REPLIES[driver.split("/")[1]] == \
        json.dumps(reply.body, separators=(",", ":"))


def test_loop_driver_refuses_qcow2_and_names_the_driver_that_serves_it(kubelet, share):
    reply = kubelet.mount(Pod("web"), {"share": str(share), "file": "/v", "size": "30m",
                                       "format": "qcow2"})
    assert reply.status == "Failure" and "qemu-nbd driver serves qcow2" in reply.message
    assert list(share.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["attach", '{"kubernetes.io/fsType":""}', "node-1"],
    ["detach", "pv-1", "node-1"],
    ["waitforattach", "/dev/fake0", '{"kubernetes.io/fsType":""}'],
    ["isattached", '{"kubernetes.io/fsType":""}', "node-1"],
    ["getvolumename", '{"kubernetes.io/fsType":""}'],
    ["mountdevice", "/var/lib/kubelet/plugins/x/mounts/pv-1", "/dev/fake0", "{}"],
    ["unmountdevice", "/var/lib/kubelet/plugins/x/mounts/pv-1"],
    ["expandvolume", "{}", "flexblock/loop/mounts/pv-1", "2147483648", "1073741824"],
    ["frobnicate"],
    [""],
], ids=lambda argv: argv[0] or "empty")
def test_calls_of_attachable_drivers_are_not_supported(kubelet, argv):
    reply = kubelet.call(*argv)
    assert (reply.status, reply.code) == ("Not supported", 0)


def test_no_command_at_all_is_not_supported(kubelet):
    reply = kubelet.call("")
    assert reply.status == "Not supported"


@pytest.mark.parametrize("argv", [
    ["mount", "/var/lib/kubelet/pods/x/volumes/flexblock~loop/test"],
    ["mount"],
    ["unmount"],
    ["unmount", "/a", "/b"],
    ["expandfs", "{}", "", "/a", "2"],
], ids=lambda argv: f"{argv[0]}-{len(argv) - 1}")
def test_wrong_number_of_arguments_is_a_failure(kubelet, argv):
    reply = kubelet.call(*argv)
    assert reply.status == "Failure"
    assert "argument" in reply.message


def test_driver_installed_under_an_unknown_name_fails_init_in_json(kubelet):
    kubelet.install("flexblock/iscsi")
    reply = kubelet.init("flexblock/iscsi")
    assert reply.status == "Failure"
    assert "loop" in reply.message


@pytest.mark.parametrize("raw", ["", "not json", "[]", '{"file": 1}', '{"file": "/x"',
                                 '"string"', "null", "[" * 100000, '{"a":' * 20000],
                         ids=lambda raw: raw[:12])
def test_options_that_are_not_a_json_object_of_strings_fail_cleanly(kubelet, tmp_path, raw):
    reply = kubelet.mount_raw(tmp_path / "pod", raw)
    assert reply.status == "Failure"
    assert not (tmp_path / "pod").exists()


def test_failures_are_logged_without_reaching_the_reply_pipe(kubelet, share, tmp_path):
    reply = kubelet.mount(Pod("web"), {"share": str(share), "file": "/kube-volumes/test"})
    assert reply.status == "Failure"
    log = kubelet.log()
    assert "mount failed" in log and "Traceback" not in log
