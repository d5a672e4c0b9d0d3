"""The installed `loopctl` command against real devices.

Contract (loopctl/cli.py): exit 0 on success, 1 when the operation failed with one line
"loopctl: PATH: reason" on stderr and nothing on stdout, 2 for bad usage; --json prints one
document {"version": 1, "device": {...}} or {"version": 1, "devices": [...]}.
"""

import contextlib
import ctypes
import json
import os
import select
import threading

import pytest

import loopctl

from helpers import MiB, bound_to, expected_losetup_row, losetup_row, make_image, wait_until

INFO_FIELDS = set(loopctl.LoopInfo._fields)


def ok(result) -> str:
    rc, out, err = result
    assert rc == 0, err
    return out


def failed(result, path: str) -> str:
    """Assert the failure contract; returns the reason."""
    rc, out, err = result
    assert (rc, out) == (1, ""), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    prefix = f"loopctl: {path}: "
    assert err.startswith(prefix), err
    return err[len(prefix):-1]


def device_doc(out: str) -> dict:
    doc = json.loads(out)
    assert set(doc) == {"version", "device"} and doc["version"] == 1
    assert set(doc["device"]) == INFO_FIELDS
    return doc["device"]


def devices_doc(out: str) -> list[dict]:
    doc = json.loads(out)
    assert set(doc) == {"version", "devices"} and doc["version"] == 1
    assert all(set(d) == INFO_FIELDS for d in doc["devices"])
    return doc["devices"]


def attach_json(cli, *args) -> dict:
    return device_doc(ok(cli("attach", "--json", *args)))


# -- attach ------------------------------------------------------------------------------------
def test_attach_prints_the_device_path_and_leaves_it_bound(cli, image):
    img = image(4 * MiB)
    out = ok(cli("attach", img))
    [number] = bound_to(img)
    assert out == f"/dev/loop{number}\n"


def test_attach_json_matches_the_kernel_state(cli, image):
    img = image(8 * MiB)
    dev = attach_json(cli, img)
    info = loopctl.get(dev["path"]).info()
    assert dev == info._asdict()
    assert losetup_row(info.path) == expected_losetup_row(info)
    assert dev["backing_file"] == str(img)


@pytest.mark.parametrize("args, expected", [
    (["-o", "1M"], {"offset": 1 * MiB, "size": 7 * MiB}),
    (["--offset", "4KiB"], {"offset": 4096}),
    (["--sizelimit", "1MB"], {"sizelimit": 10**6, "size": 10**6 // 512 * 512}),
    (["--sizelimit", "2MiB"], {"sizelimit": 2 * MiB, "size": 2 * MiB}),
    (["-b", "4096"], {"block_size": 4096}),
    (["--sector-size", "4KiB"], {"block_size": 4096}),
    (["-r"], {"read_only": True}),
    (["-P"], {"partscan": True}),
    (["--direct-io=on"], {"direct_io": True}),
    (["--direct-io=off"], {"direct_io": False}),
    (["--ref", "cli-ref"], {"ref": "cli-ref"}),
    (["--lock"], {}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_attach_options(cli, image, args, expected):
    dev = attach_json(cli, *args, image(8 * MiB))
    for field, value in expected.items():
        assert dev[field] == value, field
    info = loopctl.get(dev["number"]).info()
    assert losetup_row(info.path) == expected_losetup_row(info)


def test_attach_direct_io_flag_after_the_file(cli, image):
    assert attach_json(cli, image(8 * MiB), "--direct-io")["direct_io"] is True


def test_attach_direct_io_flag_before_the_file(cli, image):
    # `--direct-io[=on|off]` as losetup spells it: a bare --direct-io followed by FILE must not
    # take FILE for its on/off value.
    assert attach_json(cli, "--direct-io", image(8 * MiB))["direct_io"] is True


def test_attach_lock_refuses_a_second_locked_attach(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, "--lock", img)
    reason = failed(cli("attach", "--lock", img), str(img))
    assert reason == f"image is in use (attached as {dev['path']})"
    assert bound_to(img) == {dev["number"]}


def test_attach_direct_io_that_does_not_take_warns_but_succeeds(cli, mount):
    ramfs = mount("-t", "ramfs", "ramfs", name="ramfs")
    img = make_image(ramfs / "disk.img", 4 * MiB)
    rc, out, err = cli("attach", "--direct-io=on", img)
    assert rc == 0, err
    [number] = bound_to(img)
    assert out == f"/dev/loop{number}\n"
    assert err.startswith(f"loopctl: /dev/loop{number}: direct I/O is not in effect")


def test_attach_read_only_file_needs_read_only_fallback(cli, read_only_dir):
    img = read_only_dir / "disk.img"
    assert "Read-only file system" in failed(cli("attach", img), str(img))
    assert not bound_to(img)
    assert attach_json(cli, "--read-only-fallback", img)["read_only"] is True


def test_attach_missing_file_fails(cli, tmp_path):
    missing = tmp_path / "missing.img"
    reason = failed(cli("attach", missing), str(missing))
    assert "No such file or directory" in reason


def test_attach_bad_block_size_fails(cli, image):
    img = image(1 * MiB)
    failed(cli("attach", "-b", "1000", img), str(img))
    assert not bound_to(img)


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["attach"],
    ["attach", "-o", "1X", "IMG"],
    ["attach", "-o", "-1", "IMG"],
    ["attach", "--sizelimit", "1.5M", "IMG"],
    ["attach", "--direct-io=maybe", "IMG"],
    ["detach"],
    ["info"],
    ["find", "IMG", "-o", "lots"],
], ids=lambda v: " ".join(v) or "no-command")
def test_bad_usage_exits_2(cli, image, args):
    img = image(1 * MiB)
    rc, out, err = cli(*[str(img) if a == "IMG" else a for a in args])
    assert (rc, out) == (2, "")
    assert "usage: loopctl" in err
    assert not bound_to(img)


# -- detach ------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["path", "name"])
def test_detach_wait(cli, image, form):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    assert cli("detach", "--wait", dev[form]) == (0, "", "")
    assert not bound_to(img)


def test_detach_without_wait_detaches(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    assert cli("detach", dev["path"]) == (0, "", "")
    assert wait_until(lambda: not bound_to(img))


def test_detach_of_several_devices_goes_on_after_a_failure(cli, image, spare_loop):
    img_a, img_b = image(4 * MiB), image(4 * MiB)
    a, b = attach_json(cli, img_a), attach_json(cli, img_b)
    rc, out, err = cli("detach", "--wait", a["path"], spare_loop.path, b["path"])
    assert (rc, out) == (1, "")
    assert err.startswith(f"loopctl: {spare_loop.path}: ") and err.count("\n") == 1
    assert not bound_to(img_a) and not bound_to(img_b)


def test_detach_of_an_unbound_device_fails(cli, spare_loop):
    assert "not bound" in failed(cli("detach", spare_loop.path), spare_loop.path)


# -- info, find, list, resize ------------------------------------------------------------------
def test_info_json(cli, image):
    dev = attach_json(cli, "-o", "4096", image(4 * MiB))
    assert device_doc(ok(cli("info", "--json", dev["path"]))) == dev
    assert device_doc(ok(cli("info", "--json", dev["name"]))) == dev


def test_info_table(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, "--sizelimit", "2M", "-r", img)
    header, row = ok(cli("info", dev["path"])).splitlines()
    assert header.split() == ["NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "BACK-FILE",
                              "DIO", "LOG-SEC"]
    assert row.split() == [dev["path"], str(2 * MiB), "0", "0", "1", str(img), "0", "512"]


def test_info_of_a_non_loop_device_fails(cli):
    assert failed(cli("info", "/dev/null"), "/dev/null") == "not a loop device"


def test_info_of_an_unbound_device_fails(cli, spare_loop):
    failed(cli("info", spare_loop.path), spare_loop.path)


def test_find_json_with_and_without_offset(cli, image):
    img = image(8 * MiB)
    whole = attach_json(cli, img)
    tail = attach_json(cli, "-o", "1MiB", img)
    found = devices_doc(ok(cli("find", "--json", img)))
    assert sorted(d["number"] for d in found) == sorted([whole["number"], tail["number"]])
    assert devices_doc(ok(cli("find", "--json", "-o", "1M", img))) == [tail]
    assert devices_doc(ok(cli("find", "--json", "-o", "0", img))) == [whole]
    assert devices_doc(ok(cli("find", "--json", "-o", "2M", img))) == []


def test_find_table_and_empty_result(cli, image):
    img = image(4 * MiB)
    assert ok(cli("find", img)) == ""
    dev = attach_json(cli, img)
    lines = ok(cli("find", img)).splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == dev["path"]


def test_find_of_a_deleted_file(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    os.unlink(img)
    [found] = devices_doc(ok(cli("find", "--json", img)))
    assert found["number"] == dev["number"]
    assert found["backing_file"] == f"{img} (deleted)"


def test_find_of_an_impossible_path_fails_cleanly(cli, image):
    # A path through a regular file (ENOTDIR) cannot name a backing file. Finding nothing (as
    # for a missing file, and as `losetup -j` does) and failing with the one-line report are
    # both within the contract; a traceback is not.
    path = f"{image(1 * MiB)}/sub.img"
    rc, out, err = cli("find", path)
    if rc == 0:
        assert (out, err) == ("", "")
    else:
        failed((rc, out, err), path)


def test_list_json_includes_ours(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, "--ref", "listed", img)
    listed = {d["number"]: d for d in devices_doc(ok(cli("list", "--json")))}
    assert listed[dev["number"]] == dev


def test_list_table_includes_ours(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    lines = ok(cli("list")).splitlines()
    assert lines[0].split()[0] == "NAME"
    assert any(line.split()[0] == dev["path"] and str(img) in line for line in lines[1:])


class CloseWatch:
    """Calls *action* once someone closes *device* after being started (inotify
    IN_CLOSE_NOWRITE on the node), from a thread of its own."""

    IN_CLOSE_NOWRITE = 0x10

    def __init__(self, device: str, action):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self._fd < 0 or self._libc.inotify_add_watch(
                self._fd, device.encode(), self.IN_CLOSE_NOWRITE) < 0:
            raise OSError(ctypes.get_errno(), "inotify", device)
        self._stop_r, self._stop_w = os.pipe()
        self._action = action
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        readable, _, _ = select.select([self._fd, self._stop_r], [], [])
        if self._fd in readable:
            self._action()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)


def udev_is_done_with(dev: loopctl.LoopDevice, udev_mode: str) -> bool:
    """With udevd, whether it handled this binding (it links the node by diskseq) and has no
    event queued (binding sends two); its probes open and close the device when they like."""
    return udev_mode != "udevd" or (os.path.lexists(f"/dev/disk/by-diskseq/{dev.diskseq}")
                                    and not os.path.exists("/run/udev/queue"))


def test_list_succeeds_when_a_device_goes_away_while_listing(cli, image, udev_mode):
    # A device that is detached between `list` finding it and reading it must drop out of the
    # listing (as list_devices() drops it), not turn the whole command into a failure.
    # `vanishing` is autoclear and our handle is its only opener, so once `list` has looked at
    # it (and closed it again), closing our handle unbinds it, while `list` is still busy with
    # the eight other devices before it reads `vanishing` again.
    with contextlib.ExitStack() as stack:
        others = [stack.enter_context(loopctl.attach(image(1 * MiB), read_only=True))
                  for _ in range(8)]
        vanishing = stack.enter_context(
            loopctl.attach(image(1 * MiB), autoclear=True, read_only=True))
        wait_until(lambda: udev_is_done_with(vanishing, udev_mode))
        with CloseWatch(vanishing.path, vanishing.close):
            result = cli("list", "--json")
        listed = {d["number"] for d in devices_doc(ok(result))}
        assert {d.number for d in others} <= listed


def test_resize_json(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    os.truncate(img, 12 * MiB)
    resized = device_doc(ok(cli("resize", "--json", dev["path"])))
    assert resized["size"] == 12 * MiB
    assert loopctl.get(dev["path"]).info().size == 12 * MiB


def test_resize_table(cli, image):
    img = image(4 * MiB)
    dev = attach_json(cli, img)
    os.truncate(img, 6 * MiB)
    header, row = ok(cli("resize", dev["name"])).splitlines()
    assert row.split()[0] == dev["path"]
    assert loopctl.get(dev["path"]).info().size == 6 * MiB


def test_resize_of_an_unbound_device_fails(cli, spare_loop):
    failed(cli("resize", spare_loop.path), spare_loop.path)
