"""Many processes attaching at the same moment.

Each child imports loopctl, says "ready", then blocks on stdin; once all are ready the parent
releases them together, so their attaches overlap as much as the machine allows.
"""

import concurrent.futures
import contextlib
import errno
import json
import multiprocessing
import subprocess

import pytest

import loopctl

from helpers import MiB, bound_to, python_child

CHILD = """
import json, sys
import loopctl
print("ready", flush=True)
sys.stdin.readline()
try:
    dev = loopctl.attach(sys.argv[1], **json.loads(sys.argv[2]))
except loopctl.LoopError as e:
    print(json.dumps({"error": type(e).__name__, "errno": e.errno, "filename": e.filename,
                      "holder": getattr(e, "holder", None)}))
else:
    dev.relinquish()
    print(json.dumps({"number": dev.number}))
"""


def attach_all_at_once(images, **options) -> list[dict]:
    """Attach images[i] in child i, all released at once; each child's result."""
    children = []
    try:
        for img in images:
            children.append(python_child(CHILD, str(img), json.dumps(options),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for child in children:
            assert child.stdout.readline() == "ready\n"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0
            results.append(json.loads(out))
        return results
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()


def test_32_processes_attach_32_images_to_32_distinct_devices(image):
    images = [image(1 * MiB) for _ in range(32)]
    results = attach_all_at_once(images)

    assert [r for r in results if "error" in r] == []
    numbers = [r["number"] for r in results]
    assert len(set(numbers)) == 32
    for img, number in zip(images, numbers):
        assert bound_to(img) == {number}
        assert [d.number for d in loopctl.find(img)] == [number]

    for number in numbers:
        loopctl.detach(number, wait=True)
    assert all(not bound_to(img) for img in images)


def test_8_processes_locking_the_same_image_exactly_one_wins(image):
    img = image(4 * MiB)
    results = attach_all_at_once([img] * 8, lock=True)

    winners = [r for r in results if "number" in r]
    losers = [r for r in results if "error" in r]
    assert len(winners) == 1
    assert len(losers) == 7
    for loser in losers:
        assert (loser["error"], loser["errno"], loser["filename"]) == (
            "ImageBusy", errno.EBUSY, str(img))
    assert bound_to(img) == {winners[0]["number"]}
    loopctl.detach(winners[0]["number"], wait=True)
    assert not bound_to(img)


def attach_locked(path: str) -> int:
    """Run in a spawned worker (so it lives at module level, where pickle finds it)."""
    dev = loopctl.attach(path, lock=True)
    dev.relinquish()
    return dev.number


def test_image_busy_in_a_spawned_worker_reaches_the_parent_intact(image):
    img = image(4 * MiB)
    with loopctl.attach(img, lock=True) as dev:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            with pytest.raises(loopctl.ImageBusy) as excinfo:
                pool.submit(attach_locked, str(img)).result(timeout=120)
        err = excinfo.value
        assert (err.errno, err.filename, err.holder) == (errno.EBUSY, str(img),
                                                         f"attached as {dev.path}")
        assert bound_to(img) == {dev.number}
