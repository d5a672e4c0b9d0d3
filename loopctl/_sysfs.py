"""What /sys/block says about loop devices, read without opening them.

Opening a device makes us one of its openers, which delays an autoclear teardown until we close;
discovery and waiting therefore read sysfs where they can.
"""

from __future__ import annotations

import errno
import functools
import os

from ._ffi import lib

SYS_BLOCK = "/sys/block"
LOOP_MAJOR: int = lib.LOOP_MAJOR


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError as e:
        # The device went away, or was unbound, while we looked: sysfs answers ENOENT or ENXIO.
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise


@functools.cache
def part_shift() -> int:
    """Bits reserved for partitions in a loop device's minor (loop.max_part > 0, 2.6.26+)."""
    max_part = _read("/sys/module/loop/parameters/max_part")
    return int(max_part).bit_length() if max_part and int(max_part) > 0 else 0


def devno(number: int) -> int:
    return os.makedev(LOOP_MAJOR, number << part_shift())


def number_from_devno(dev: int) -> int | None:
    if os.major(dev) != LOOP_MAJOR:
        return None
    return os.minor(dev) >> part_shift()


def bound_numbers() -> list[int]:
    """Numbers of the loop devices that have a backing file, in order."""
    numbers = []
    with os.scandir(SYS_BLOCK) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("loop") and name[4:].isdigit() and os.path.exists(
                    f"{SYS_BLOCK}/{name}/loop/backing_file"):
                numbers.append(int(name[4:]))
    return sorted(numbers)


def backing_file(number: int) -> str | None:
    """The backing file's full path (" (deleted)" appended by the kernel once unlinked)."""
    return _read(f"{SYS_BLOCK}/loop{number}/loop/backing_file")


def diskseq(number: int) -> int | None:
    value = _read(f"{SYS_BLOCK}/loop{number}/diskseq")
    return int(value) if value else None


def exists(number: int) -> bool:
    return os.path.exists(f"{SYS_BLOCK}/loop{number}")
