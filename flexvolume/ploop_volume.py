"""mount, unmount and expandfs of a ploop volume: the directory <volumePath>/<volumeId> holding
a ploop disk, created on first mount when a size is given (the virtuozzo/ploop seed's options).

The filesystem checks, the mount itself and unmount are volume.py's; only finding, creating and
attaching the volume differ from the image-file backends.
"""

from __future__ import annotations

import collections
import os
from types import ModuleType

import ploop
from ploop import image as ploop_image

from . import _faultpoint, filesystem, image, mounts, options, volume
from .errors import DriverError, OptionError

# option -> attribute of `vstorage set-attr` ("vzsEencoding": the seed README's spelling)
VZS_ATTRIBUTES = {"vzsReplicas": "replicas", "vzsEncoding": "encoding",
                  "vzsEencoding": "encoding", "vzsFailureDomain": "failure-domain",
                  "vzsTier": "tier"}
_USER_KEYS = frozenset({"volumePath", "volumeId", "volumeID", "size", "mountOptions",
                        *VZS_ATTRIBUTES})

PloopOptions = collections.namedtuple(
    "PloopOptions", "volume_path volume_id size fs_type read_only mount_options fs_group vzs "
                    "mmp mmp_update_interval fsck fsck_options")



class Source(collections.namedtuple("Source", "path blank")):
    """A ploop volume as volume.prepare_filesystem sees its image: blank when no cluster of
    its image is allocated (the device's zeros cannot be told from data cheaply)."""

    def is_blank(self) -> bool:
        return self.blank

    def mark_formatting(self, on: bool) -> None:
        image.mark_formatting(self.path, on, self.path)

    def formatting_interrupted(self) -> bool:
        return image.formatting_interrupted(self.path)


def parse(raw: str) -> PloopOptions:
    data = options.load(raw)
    unknown = sorted(k for k in data if k not in _USER_KEYS and not k.startswith("kubernetes.io/"))
    if unknown:
        raise OptionError(unknown[0], f"unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}")
    ids = {data[k] for k in ("volumeId", "volumeID") if k in data}
    if len(ids) > 1:
        raise OptionError("volumeID", "differs from volumeId")
    volume_id = ids.pop() if ids else ""
    if not volume_id:
        raise OptionError("volumeId", "is required")
    if not data.get("volumePath"):
        raise OptionError("volumePath", "is required")
    vzs: dict[str, str] = {}
    for key, attribute in VZS_ATTRIBUTES.items():
        if key in data:
            if attribute in vzs and vzs[attribute] != data[key]:
                raise OptionError(key, f"contradicts the other {attribute} option")
            if not data[key] or not data[key].isprintable() or " " in data[key]:
                raise OptionError(key, f"{data[key]!r} is not a {attribute} value")
            vzs[attribute] = data[key]
    readwrite = data.get("kubernetes.io/readwrite", "rw")
    if readwrite not in ("rw", "ro"):
        raise OptionError("kubernetes.io/readwrite", f"{readwrite!r} is neither rw nor ro")
    mount_options = options.parse_mount_options("mountOptions", data.get("mountOptions", ""))
    fs_group = data.get("kubernetes.io/mounterArgs.FsGroup", data.get("kubernetes.io/fsGroup"))
    return PloopOptions(
        volume_path=data["volumePath"],
        volume_id=volume_id,
        size=options.parse_size("size", data["size"]) if data.get("size") else None,
        fs_type=options.parse_fs_type("kubernetes.io/fsType", data.get("kubernetes.io/fsType", "")),
        read_only=readwrite == "ro" or "ro" in mount_options,
        mount_options=mount_options,
        fs_group=(options.parse_int("kubernetes.io/mounterArgs.FsGroup", fs_group, 0, 2**31 - 1)
                  if fs_group else None),
        vzs=vzs,
        mmp=True, mmp_update_interval=5, fsck=True, fsck_options="a",
    )


def _set_vzs_attributes(tool: str, directory: str, attributes: dict[str, str]) -> None:
    for attribute, value in attributes.items():
        filesystem.run([tool, "set-attr", "-R", directory, f"{attribute}={value}"],
                       f"vstorage set-attr {attribute} on {directory}")


def _is_blank(vol: ploop.Volume) -> bool:
    if vol.format == "raw":
        fd = os.open(vol.image_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return filesystem.is_blank(fd)
        finally:
            os.close(fd)
    return ploop_image.info(vol.image_path).allocated_clusters == 0


def mount(target: str, raw_options: str, backend: ModuleType) -> str:
    opts = parse(raw_options)
    target = volume.check_target(target)
    directory = image.volume_directory("volumePath", opts.volume_path, "volumeId", opts.volume_id)
    current = mounts.mount_at(target)
    if current is not None:
        device = backend.device_for(current)
        if device is None or device.directory != directory:
            raise DriverError(f"{target} already has another filesystem mounted")
        return f"{directory} already mounted at {target}"
    tool = backend.vstorage() if opts.vzs else None  # refused before anything changes
    try:
        vol = ploop.create_or_open(directory, None if opts.read_only else opts.size)
    except ploop.SizeMismatch:
        raise DriverError(f"{directory} is smaller than size {opts.size}; ploop volumes grow "
                          "only offline (ploop grow), or ask for its current size") from None
    except ploop.PloopError as e:
        raise DriverError(f"{directory}: {e.strerror}") from None
    if tool is not None and not opts.read_only:
        _set_vzs_attributes(tool, directory, opts.vzs)
    source = Source(vol.image_path, _is_blank(vol))
    device = backend.attach(directory, read_only=opts.read_only)
    _faultpoint.reached("attach")
    try:
        fs_type = volume.prepare_filesystem(device, source, opts)
        _faultpoint.reached("prepare")
        volume.mount_device(device.path, fs_type, target, opts, directory)
    except BaseException:
        device.detach()
        raise
    device.relinquish()
    return f"{directory} ({fs_type}) on {device.path} mounted at {target}"


def unmount(target: str, backend: ModuleType) -> str:
    return volume.unmount(target, backend)


def expandfs(raw_options: str, target: str, new_size_text: str, backend: ModuleType) -> str:
    raise DriverError("a ploop volume cannot grow while mounted (qemu-nbd serves a fixed size); "
                      "unmount it, grow it offline (python -m ploop grow), and mount it again")
