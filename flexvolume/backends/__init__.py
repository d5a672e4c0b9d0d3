"""Block-device backends: each turns an open image file into a block device and finds the
device behind a mounted volume again. The driver name it is installed under picks one.

Kept free of imports beyond importlib: `init` reads BACKENDS on every plugin probe."""

import importlib

# driver name (the executable's basename) -> backend module. "nbd" and "sheepdog" are names
# the kvaps/qemu-nbd seed answered to (as kvaps/nbd and kvaps/sheepdog).
BACKENDS = {
    "loop": "flexvolume.backends.loop",
    "qemu-nbd": "flexvolume.backends.qemu_nbd",
    "nbd": "flexvolume.backends.qemu_nbd",
    "sheepdog": "flexvolume.backends.sheepdog",
    "ploop": "flexvolume.backends.ploop",
}

# The seeds' driver names, installed too so that their pod specs work unchanged; each is served
# by the backend of its basename (kvaps~loop/loop -> "loop").
SEED_ALIASES = ("kvaps/loop", "kvaps/qemu-nbd", "kvaps/nbd", "kvaps/sheepdog", "virtuozzo/ploop")


def load(driver_name: str):
    """The backend module for *driver_name*, or None."""
    module = BACKENDS.get(driver_name)
    return importlib.import_module(module) if module else None
