"""A driver killed at any point of mount, unmount or expandfs (OOM killer, node shutdown,
kubelet restart) must leave a state that kubelet's retry turns into Success, with nothing
leaked and the data written before the kill intact.

The sweeps SIGKILL the driver after increasing delays until a call completes before the kill.
The step tests kill it at each named step instead, every time: right after a Python step
(flexvolume/_faultpoint.py, armed by an environment variable), or as a tool it runs starts (a
PATH entry whose tool kills its parent, the driver, and then runs the real one, which dies with
it). Each driver runs in a session of its own, so that what it started (mkfs, blkid, e2fsck) can
be found after its death: none may outlive it.
"""

import os
import shutil
import signal
import time

import pytest

from kubelet import (MIN_SIZE, TOOL_DIRS, GiB, Kubelet, MiB, Pod,  # noqa: F401
                     assert_data_kept, assert_released, call_killed, check_reply, checksum,
                     df_size, findmnt, go_json, image_path, is_mount_point, kill_mount, kubelet,
                     loops_for, make_volume, needs_ext_online_resize, new_volume, retry_mount,
                     run, session_members, share, start_creating_with_slow_mkfs, temp_images,
                     wait_for_session, wait_until, write_data)

STEP = 0.002       # s between kill delays (mount)
UNMOUNT_STEP = 0.001
MAX_DELAY = 1.0    # a call slower than this on a 30 MiB volume is a bug of its own


def kill_after(proc, delay: float) -> bool:
    """SIGKILL *proc* after *delay* seconds unless it finished; True if it was killed. Then
    wait for whatever it started (its session) to end."""
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.kill()
    proc.wait()
    wait_for_session(proc.pid)
    return killed


def finish(proc, argv):
    """The reply of a call that completed before its kill; checked like any other."""
    output = proc.stdout.read()
    proc.stdout.close()
    return check_reply(argv, proc.returncode, output, 0.0)


def wait_image_free(kubelet, pod, image):
    """What a killed mount left bound goes away once its fds are closed (udevd may hold the
    device a moment longer); a completed kernel mount of course stays."""
    if not is_mount_point(kubelet.pod_dir(pod)):
        assert wait_until(lambda: not loops_for(image)), f"{image} still bound after the kill"


@pytest.mark.parametrize("mmp", ["false", pytest.param("true", marks=pytest.mark.slow)],
                         ids=["no-mmp", "mmp"])
@pytest.mark.parametrize("phase", ["new", "existing"])
def test_kill_during_mount_then_retry(kubelet, share, phase, mmp):
    """With MMP (slow): a kill inside mount(2) can fail the kernel mount after it wrote its
    MMP sequence (creating kmmpd is a killable wait); the next mount then waits 2 x 11 s for
    a heartbeat that never comes. That is MMP doing its job, not a driver bug."""
    image = image_path(share)
    options = new_volume(share, fsck="true", mmp=mmp)
    pod = Pod("web")
    digest = None
    if phase == "existing":
        reply = kubelet.mount(pod, options, fs_type="ext4")
        assert reply.status == "Success", reply
        digest = write_data(reply.target)
        assert kubelet.unmount(pod).status == "Success"

    target = kubelet.pod_dir(pod)
    raw = go_json(Kubelet.options(options, fs_type="ext4", pod=pod))
    delay, kills = 0.0, 0
    while delay <= MAX_DELAY:
        kubelet.prepare_for_mount(target)
        argv = kubelet.argv("mount", target, raw)
        proc = kubelet.spawn("mount", target, raw, start_new_session=True)
        if not kill_after(proc, delay):
            reply = finish(proc, argv)
            assert reply.status == "Success", reply
            break
        kills += 1
        proc.stdout.close()
        try:
            os.rmdir(target)  # kubelet after a failed mount; EBUSY if the kernel mount happened
        except OSError:
            pass
        wait_image_free(kubelet, pod, image)
        reply = kubelet.mount(pod, options, fs_type="ext4")
        assert reply.status == "Success", f"retry after a kill at {delay * 1000:.0f} ms: {reply}"
        assert findmnt(target)["source"].startswith("/dev/loop")
        assert temp_images(image.parent) == [], f"after a kill at {delay * 1000:.0f} ms"
        if digest:
            assert checksum(target / "data.bin") == digest
        assert kubelet.unmount(pod).status == "Success"
        assert wait_until(lambda: not loops_for(image))
        if phase == "new":
            image.unlink()
        delay += STEP
    else:
        pytest.fail(f"mount did not complete within {MAX_DELAY} s")
    print(f"{phase}: killed {kills} mounts, the one started with {delay * 1000:.0f} ms completed")
    assert kills >= 3  # else the sweep tested next to nothing
    assert temp_images(image.parent) == []
    if digest:
        assert checksum(target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


def test_kill_during_unmount_then_retry(kubelet, share):
    image = image_path(share)
    options = new_volume(share)
    pod = Pod("web")
    target = kubelet.pod_dir(pod)
    reply = kubelet.mount(pod, options)
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    delay, kills = 0.0, 0
    while delay <= MAX_DELAY:
        argv = kubelet.argv("unmount", target)
        proc = kubelet.spawn("unmount", target, start_new_session=True)
        killed = kill_after(proc, delay)
        if not killed:
            reply = finish(proc, argv)
            assert reply.status == "Success", reply
        else:
            kills += 1
            proc.stdout.close()
        # kubelet: retry a failed unmount; after a Success, remove the dir (the harness does).
        reply = kubelet.unmount(pod)
        assert reply.status == "Success", f"retry after a kill at {delay * 1000:.0f} ms: {reply}"
        assert wait_until(lambda: not loops_for(image))
        reply = kubelet.mount(pod, options)
        assert reply.status == "Success", reply
        assert checksum(target / "data.bin") == digest
        if not killed:
            break
        delay += UNMOUNT_STEP
    else:
        pytest.fail(f"unmount did not complete within {MAX_DELAY} s")
    print(f"killed {kills} unmounts, the one started with {delay * 1000:.0f} ms completed")
    assert kills >= 2  # else the sweep tested next to nothing
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


def test_kill_during_mkfs_of_a_new_volume_leaks_no_temporary_image(kubelet, share, tmp_path):
    image = image_path(share)
    pod = Pod("web")
    target = kubelet.pod_dir(pod)
    proc, _ = start_creating_with_slow_mkfs(kubelet, share, tmp_path, pod, 2.0,
                                            start_new_session=True)
    try:
        time.sleep(0.2)  # mkfs (the slow one) is running now
        proc.send_signal(signal.SIGKILL)  # the driver only, as the OOM killer would
        proc.wait()
        proc.stdout.close()
        try:
            os.rmdir(target)
        except OSError:
            pass
        time.sleep(0.5)  # kubelet's first backoff
        reply = kubelet.mount(pod, new_volume(share), fs_type="ext4")
        assert reply.status == "Success", reply
    finally:
        wait_for_session(proc.pid)  # the orphaned mkfs finishes on its temporary image
    assert kubelet.unmount(pod).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    reply = kubelet.mount(pod, new_volume(share), fs_type="ext4")
    assert reply.status == "Success", reply
    assert kubelet.unmount(pod).status == "Success"
    assert temp_images(image.parent) == [], "a killed creator's temporary image stays forever"


def test_kill_between_publishing_link_and_unlink_is_recovered(kubelet, share):
    """Image.publish() links the temporary image to its final name, then unlinks the temporary
    name. A kill between the two leaves both names on one inode: this is that state."""
    image = image_path(share)
    pod = Pod("web")
    assert kubelet.mount(pod, new_volume(share)).status == "Success"
    digest = write_data(kubelet.pod_dir(pod))
    assert kubelet.unmount(pod).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    leftover = image.parent / ".test.flexblock-4242-0badf00d"
    os.link(image, leftover)
    reply = kubelet.mount(pod, new_volume(share))
    assert reply.status == "Success", reply
    assert checksum(kubelet.pod_dir(pod) / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert temp_images(image.parent) == []


# -- a kill at each step --------------------------------------------------------------------------
MOUNT_STEPS = {
    # volume -> the steps a mount of it goes through
    "new": ["create", "allocate", "tool:mkfs.ext4", "mkfs", "publish-link", "publish", "attach",
            "prepare", "mount", "fs-group"],
    "existing": ["attach", "prepare", "mount", "fs-group"],
    "unclean": ["tool:fsck.ext4", "prepare"],
    "without-mmp": ["tool:tune2fs", "prepare"],
    "blank": ["tool:blkid", "tool:mkfs.ext4", "prepare"],
}


@pytest.mark.parametrize("volume,fault", [(v, f) for v, steps in MOUNT_STEPS.items()
                                          for f in steps])
def test_mount_killed_at_each_step_then_retried(kubelet, share, tmp_path, volume, fault):
    options = new_volume(share, mmp="false", allocate="true")
    digest = None
    if volume == "blank":
        image_path(share).parent.mkdir()
        with open(image_path(share), "xb") as f:
            f.truncate(30 * MiB)
    elif volume != "new":
        digest = make_volume(kubelet, share, mmp="false", allocate="true")
    if volume == "unclean":
        run("debugfs", "-w", "-R", "ssv state 0", image_path(share))
    if volume == "without-mmp":
        options["mmp"] = "true"
    pod = Pod("web")
    kill_mount(kubelet, tmp_path, pod, options, fault)
    retry_mount(kubelet, pod, options, fault, digest)
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    # ... and the volume mounts again as it was left.
    reply = retry_mount(kubelet, pod, options, fault, digest)
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert image_path(share).stat().st_size == 30 * MiB
    assert reply.status == "Success"


def test_unmount_killed_after_umount_then_retried(kubelet, share, tmp_path):
    options = new_volume(share, mmp="false")
    pod = Pod("web")
    reply = kubelet.mount(pod, options, fs_type="ext4")
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    call_killed(kubelet, tmp_path, "unmount", "unmount", reply.target)
    assert not is_mount_point(reply.target)
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert_data_kept(kubelet, share, pod, options, digest)


GROW_TOOL = {"ext4": "resize2fs", "xfs": "xfs_growfs"}


@pytest.mark.parametrize("fault", ["grow-image", "grow-device", "tool", "grow-fs"])
@pytest.mark.parametrize("fs_type", [pytest.param("ext4", marks=needs_ext_online_resize), "xfs"])
def test_expandfs_killed_at_each_step_then_retried(kubelet, share, tmp_path, fs_type, fault):
    expandfs_killed_then_retried(kubelet, share, tmp_path, fs_type, fault)


def expandfs_killed_then_retried(kubelet, share, tmp_path, fs_type, fault):
    """Also run in the VM lane for ext4 (tests/driver/test_vm_expand.py)."""
    old = MIN_SIZE[fs_type]
    new = old + 64 * MiB
    options = new_volume(share, size=f"{old // MiB}Mi", mmp="false")
    pod = Pod("web")
    reply = kubelet.mount(pod, options, fs_type=fs_type)
    assert reply.status == "Success", reply
    target = reply.target
    digest = write_data(target)
    before = df_size(target)
    if fault == "tool":
        fault = f"tool:{GROW_TOOL[fs_type]}"
    raw = go_json(Kubelet.options(options, fs_type=fs_type))
    call_killed(kubelet, tmp_path, fault, "expandfs", raw, "", target, str(new), str(old))
    assert checksum(target / "data.bin") == digest
    reply = kubelet.expandfs(target, options, new, old, fs_type=fs_type)
    assert reply.status == "Success", f"retry after a kill at {fault}: {reply}"
    assert df_size(target) >= before + 0.9 * (new - old)
    assert image_path(share).stat().st_size == new
    assert checksum(target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert_data_kept(kubelet, share, pod, options, digest, fs_type=fs_type)


def test_kill_half_way_through_formatting_a_blank_image_then_retried(kubelet, share, tmp_path):
    """mkfs writes the superblock last: killed half-way, it leaves data and no signature, which
    must not make the driver refuse the volume for ever as "data it does not recognise"."""
    image = image_path(share)
    image.parent.mkdir()
    # The kill comes as soon as anything mkfs wrote reached the image: usually before the
    # superblock (mkfs.ext4 writes ~30 MiB on 1 GiB), but the device's writeback decides.
    bindir = tmp_path / "half-mkfs"
    bindir.mkdir()
    real = shutil.which("mkfs.ext4", path=TOOL_DIRS)
    (bindir / "mkfs.ext4").write_text(
        f"#!/bin/sh\n(while [ \"$(stat -c %b {image})\" = 0 ]; do :; done; kill -KILL $PPID) &\n"
        f"exec {real} \"$@\"\n")
    (bindir / "mkfs.ext4").chmod(0o755)
    options = new_volume(share, mmp="false")
    pod = Pod("web")
    target = kubelet.pod_dir(pod)
    for attempt in range(10):
        image.unlink(missing_ok=True)
        with open(image, "xb") as f:
            f.truncate(GiB)
        kubelet.prepare_for_mount(target)
        raw = go_json(Kubelet.options(options, fs_type="ext4", pod=pod))
        proc = kubelet.spawn("mount", target, raw, env={"PATH": f"{bindir}:{TOOL_DIRS}"},
                             start_new_session=True)
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        assert wait_until(lambda: not session_members(proc.pid), 10), "mkfs outlived the driver"
        os.rmdir(target)
        assert wait_until(lambda: not loops_for(image))
        if run("blkid", "-p", image, check=False).returncode == 2:
            break  # data, no signature: the state under test
    else:
        pytest.fail("mkfs finished before the kill 10 times: this test tested nothing")
    assert image.stat().st_blocks > 0
    print(f"mkfs killed half-way at attempt {attempt + 1}")
    reply = kubelet.mount(pod, options, fs_type="ext4")
    assert reply.status == "Success", reply
    assert findmnt(reply.target)["fstype"] == "ext4"
    write_data(reply.target)
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    assert run("e2fsck", "-fn", image, check=False).returncode == 0
    # Formatted and mounted once, the image is data: a lost superblock is refused, not formatted.
    with open(image, "r+b") as f:
        f.seek(1024)
        f.write(bytes(1024))
    reply = kubelet.mount(pod, options, fs_type="ext4")
    assert reply.status == "Failure" and "refusing to format" in reply.message, reply
