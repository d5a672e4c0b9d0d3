"""Block-device backends: each turns an open image file into a block device and finds the
device behind a mounted volume again. The driver name it is installed under picks one."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

# driver name (the executable's basename) -> backend module
BACKENDS = {"loop": "flexvolume.backends.loop"}


def load(driver_name: str) -> ModuleType | None:
    module = BACKENDS.get(driver_name)
    return importlib.import_module(module) if module else None
