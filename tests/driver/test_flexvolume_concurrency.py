"""Kubelet runs operations on different (volume, pod) pairs in parallel: concurrent calls must
neither both win a volume nor leave half-made images behind."""

import os

import pytest

from kubelet import (MIN_SIZE, Kubelet, MiB, Pod, assert_released, check_reply, checksum, go_json,
                     image_path, kubelet, loops_for, new_volume, run, share,  # noqa: F401
                     make_volume, start_creating_with_slow_mkfs, temp_images,
                     wait_until, write_data)


def start_mounts(kubelet, pods, options_for):
    calls = []
    for pod in pods:
        target = kubelet.pod_dir(pod)
        kubelet.prepare_for_mount(target)
        raw = go_json(Kubelet.options(options_for(pod), fs_type="ext4", pod=pod))
        calls.append((pod, kubelet.argv("mount", target, raw),
                      kubelet.spawn("mount", target, raw)))
    replies = {}
    for pod, argv, proc in calls:
        output, _ = proc.communicate(timeout=120)
        reply = check_reply(argv, proc.returncode, output, 0.0)
        reply.target = kubelet.pod_dir(pod)
        if reply.status != "Success":
            os.rmdir(reply.target)
        replies[pod] = reply
    return replies


def test_two_pods_creating_one_new_volume_at_once(kubelet, share):
    image = image_path(share)
    pods = [Pod(f"pod-{i}") for i in range(2)]
    replies = start_mounts(kubelet, pods, lambda pod: new_volume(share))
    winners = [pod for pod, r in replies.items() if r.status == "Success"]
    assert len(winners) == 1, replies
    loser = next(pod for pod in pods if pod not in winners)
    message = replies[loser].message
    assert "in use" in message or "concurrently" in message, message
    assert temp_images(image.parent) == []
    assert len(loops_for(image)) == 1
    digest = write_data(kubelet.pod_dir(winners[0]))
    assert kubelet.unmount(winners[0]).status == "Success"
    assert wait_until(lambda: not loops_for(image))
    reply = kubelet.mount(loser, new_volume(share))  # kubelet's retry
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(loser).status == "Success"
    assert image.stat().st_size == 30 * MiB
    assert_released(kubelet, share)


def test_pods_creating_different_volumes_at_once(kubelet, share):
    pods = [Pod(f"pod-{i}") for i in range(6)]
    replies = start_mounts(kubelet, pods, lambda pod: new_volume(share, pod.name))
    assert all(r.status == "Success" for r in replies.values()), replies
    devices = {os.stat(kubelet.pod_dir(pod)).st_dev for pod in pods}
    assert len(devices) == len(pods)
    for pod in pods:
        assert loops_for(image_path(share, pod.name)) != []
        assert kubelet.unmount(pod).status == "Success"
    assert temp_images(image_path(share).parent) == []
    assert_released(kubelet, share)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs"])
def test_allocate_preallocates_the_image(kubelet, share, fs_type):
    """allocate: the image's blocks are reserved on the share up front (no ENOSPC later)."""
    size = MIN_SIZE[fs_type] * 2 if fs_type == "ext4" else MIN_SIZE[fs_type]
    pod = Pod("web")
    reply = kubelet.mount(pod, new_volume(share, size=f"{size // MiB}Mi", allocate="true"),
                          fs_type=fs_type)
    assert reply.status == "Success", reply
    st = image_path(share).stat()
    assert st.st_size == size
    print(f"{fs_type}: {st.st_blocks * 512} of {size} bytes allocated")
    assert st.st_blocks * 512 >= size, "mkfs discarded (punched out) the preallocated blocks"
    assert kubelet.unmount(pod).status == "Success"


def busy_or_raced(message: str) -> bool:
    return "in use" in message or "concurrently" in message


def test_32_pods_mounting_32_new_volumes_at_once(kubelet, share):
    """A node starting 32 pods at once: every volume is created, formatted and mounted on a
    device of its own, and each holds what its pod wrote."""
    pods = [Pod(f"pod-{i}") for i in range(32)]
    replies = start_mounts(kubelet, pods, lambda pod: new_volume(share, pod.name, mmp="false"))
    assert all(r.status == "Success" for r in replies.values()), \
        [r for r in replies.values() if r.status != "Success"]
    assert len({os.stat(kubelet.pod_dir(pod)).st_dev for pod in pods}) == len(pods)
    digests = {pod: write_data(kubelet.pod_dir(pod), seed=i) for i, pod in enumerate(pods)}
    for pod in pods:
        assert len(loops_for(image_path(share, pod.name))) == 1
    unmounts = [(pod, kubelet.argv("unmount", kubelet.pod_dir(pod)),
                 kubelet.spawn("unmount", kubelet.pod_dir(pod))) for pod in pods]
    for pod, argv, proc in unmounts:
        output, _ = proc.communicate(timeout=120)
        assert check_reply(argv, proc.returncode, output, 0.0).status == "Success"
        os.rmdir(kubelet.pod_dir(pod))
    assert_released(kubelet, share)
    assert temp_images(image_path(share).parent) == []
    for pod in pods[::8]:  # the data went to the right images
        reply = kubelet.mount(pod, new_volume(share, pod.name, mmp="false"))
        assert reply.status == "Success", reply
        assert checksum(reply.target / "data.bin") == digests[pod]
        assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


@pytest.mark.parametrize("volume", ["new", "existing"])
def test_8_pods_mounting_one_volume_at_once(kubelet, share, volume):
    """Eight pods on one node asking for one read-write volume: exactly one gets it, the seven
    others a Failure that says why, and nothing of theirs is left behind."""
    image = image_path(share)
    digest = None
    if volume == "existing":
        creator = Pod("creator")
        reply = kubelet.mount(creator, new_volume(share, mmp="false"))
        assert reply.status == "Success", reply
        digest = write_data(reply.target)
        assert kubelet.unmount(creator).status == "Success"
        assert wait_until(lambda: not loops_for(image))
    pods = [Pod(f"pod-{i}") for i in range(8)]
    replies = start_mounts(kubelet, pods, lambda pod: new_volume(share, mmp="false"))
    winners = [pod for pod, r in replies.items() if r.status == "Success"]
    assert len(winners) == 1, replies
    for pod, reply in replies.items():
        if pod not in winners:
            assert busy_or_raced(reply.message), reply
            assert not kubelet.pod_dir(pod).exists()
    assert len(loops_for(image)) == 1
    assert temp_images(image.parent) == []
    winner = kubelet.pod_dir(winners[0])
    if digest:
        assert checksum(winner / "data.bin") == digest
    digest = write_data(winner, "winner.bin")
    assert kubelet.unmount(winners[0]).status == "Success"
    assert_released(kubelet, share)
    reply = kubelet.mount(pods[0], new_volume(share, mmp="false"))  # a loser's retry
    assert reply.status == "Success", reply
    assert checksum(reply.target / "winner.bin") == digest
    assert kubelet.unmount(pods[0]).status == "Success"
    assert_released(kubelet, share)
    assert run("e2fsck", "-fn", image, check=False).returncode == 0


def test_creator_whose_temporary_image_was_taken_for_abandoned_fails_cleanly(kubelet, share,
                                                                              tmp_path):
    """Another creator's clean-up may take a temporary image for a killed one's in the instant
    between its creation and its lock, and remove it: its creator then finds it gone when it
    publishes the image. Here the removal comes during mkfs, when it always can."""
    image = image_path(share)
    pod = Pod("web")
    proc, argv = start_creating_with_slow_mkfs(kubelet, share, tmp_path, pod, 1.0)
    for name in temp_images(image.parent):
        os.unlink(image.parent / name)
    output, _ = proc.communicate(timeout=60)
    reply = check_reply(argv, proc.returncode, output, 0.0)
    assert reply.status == "Failure" and busy_or_raced(reply.message), reply
    os.rmdir(kubelet.pod_dir(pod))
    assert not image.exists() and temp_images(image.parent) == []
    reply = kubelet.mount(pod, new_volume(share))  # kubelet's retry
    assert reply.status == "Success", reply
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


def test_readers_and_a_writer_racing_for_one_volume_never_share_it(kubelet, share):
    """One pod mounting read-write and seven read-only, all at once: the writer excludes the
    readers or the readers the writer (the image lock is shared for read-only attaches),
    never both, and every reader sees the data."""
    digest = make_volume(kubelet, share, mmp="false")
    writer, readers = Pod("writer"), [Pod(f"reader-{i}") for i in range(7)]
    replies = start_mounts(kubelet, [writer, *readers], lambda pod: new_volume(
        share, mmp="false", **({} if pod is writer else {"kubernetes.io/readwrite": "ro"})))
    reading = [pod for pod in readers if replies[pod].status == "Success"]
    if replies[writer].status == "Success":
        assert reading == [], replies
    else:
        assert reading and busy_or_raced(replies[writer].message), replies
    for pod in readers:
        if pod not in reading:
            assert busy_or_raced(replies[pod].message), replies[pod]
    for pod in reading:
        assert checksum(kubelet.pod_dir(pod) / "data.bin") == digest
    for pod, reply in replies.items():
        if reply.status == "Success":
            assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)
    print("writer won" if replies[writer].status == "Success" else f"{len(reading)} readers won")
