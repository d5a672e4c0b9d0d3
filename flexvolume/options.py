"""The options kubelet passes (one JSON object of strings), parsed and validated.

User options keep the seed drivers' names (kvaps/loop, kvaps/flexvolume-qemu-nbd), so pod specs
written for them work unchanged; every value is checked, and an unknown key is a Failure that
names it. Keys in kubelet's own ``kubernetes.io/`` namespace are kubelet's to extend and are
ignored unless we use them.
"""

from __future__ import annotations

import collections
import json
import re

from .errors import OptionError

FS_TYPES = ("ext4", "ext3", "xfs", "btrfs")
IMAGE_FORMATS = ("raw", "qcow2")
DEFAULT_FS_TYPE = "ext4"
SECRET_PREFIX = "kubernetes.io/secret/"
MIN_SIZE = 1 << 20
SIZE_ALIGN = 4096
MMP_INTERVAL_MAX = 300  # EXT4_MMP_MAX_UPDATE_INTERVAL

# Single-letter suffixes are binary in either case: the seeds passed "30m" and "1g" to
# truncate(1), where they mean MiB and GiB. "Ki".."Ei" are Kubernetes' binary units and
# "KB".."EB" truncate's decimal ones. Kubernetes' own "M"/"G" (decimal) therefore read as MiB/GiB.
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(?:([KMGTPE])(i|B)?)?", re.IGNORECASE)
_UNITS = "KMGTPE"
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_MOUNT_WORD = re.compile(r"[a-z_][a-z0-9_-]*(=[A-Za-z0-9._:/-]+)?")


# parse(). fs_type None: use what the image holds, or DEFAULT_FS_TYPE for a new one; size in
# bytes; image_format the image file's format (raw or qcow2, qemu-nbd backend only);
# mount_options the words of mountOptions; pod "namespace/name" when kubelet says.
VolumeOptions = collections.namedtuple(
    "VolumeOptions", "file share size fs_type image_format read_only allocate mmp "
    "mmp_update_interval fsck fsck_options mount_options lock fs_group volume_name pod")


def parse_size(name: str, text: str) -> int:
    """Bytes, rounded up to a multiple of 4096."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise OptionError(name, f"{text!r} is not a size (examples: 1Gi, 500Mi, 30m, 10G)")
    number, unit, suffix = match.groups()
    value = float(number) if "." in number else int(number)
    if unit:
        base = 1000 if suffix and suffix.upper() == "B" else 1024
        value *= base ** (_UNITS.index(unit.upper()) + 1)
    size = -(-int(value) // SIZE_ALIGN) * SIZE_ALIGN
    if size < MIN_SIZE:
        raise OptionError(name, f"{text!r} is below the minimum of 1Mi")
    if size >= 2**63:
        raise OptionError(name, f"{text!r} is too large")
    return size


def parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OptionError(name, f"{text!r} is not a boolean (true or false)")


def parse_int(name: str, text: str, low: int, high: int) -> int:
    text = text.strip()
    # isdigit() alone accepts digits int() refuses, such as "²".
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise OptionError(name, f"{text!r} is not a whole number from {low} to {high}")
    return int(text)


def parse_fs_type(name: str, text: str) -> str | None:
    if text == "":
        return None  # kubelet sends "" when the pod spec names no fsType
    if text not in FS_TYPES:
        raise OptionError(name, f"{text!r} is not supported (use one of {', '.join(FS_TYPES)})")
    return text


def _parse_fsck_options(name: str, text: str) -> str:
    # e2fsck's single-letter modes only: the value becomes one "-xyz" argument.
    if not re.fullmatch(r"[apnyf]+", text):
        raise OptionError(name, f"{text!r}: use letters from a, p, n, y, f (as in e2fsck -p)")
    return text


def parse_mount_options(name: str, text: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in text.split(",") if w.strip())
    for word in words:
        if not _MOUNT_WORD.fullmatch(word):
            raise OptionError(name, f"{word!r} is not a mount option")
    return words


# user option -> accepted aliases (the qemu-nbd seed's spellings)
_ALIASES = {"mount_options": "mountOptions", "fsck_options": "fsckOptions"}
_USER_KEYS = frozenset({"file", "share", "size", "fsType", "format", "allocate", "mmp",
                        "mmpUpdateInterval", "fsck", "fsckOptions", "mountOptions", "lock"})


def load(raw: str) -> dict[str, str]:
    """The options JSON kubelet passes: an object of strings."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise OptionError("<json>", f"not valid JSON ({e})") from None
    except RecursionError:
        raise OptionError("<json>", "nested too deeply to be the options object") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise OptionError("<json>", "must be an object whose values are strings")
    return data


def user_options(data: dict[str, str], keys: frozenset[str]) -> dict[str, str]:
    """The user's options among *data* (under their canonical names), which must be *keys*
    or their aliases; kubelet's own keys are left out."""
    user: dict[str, str] = {}
    for key, value in data.items():
        canonical = _ALIASES.get(key, key)
        if canonical in keys:
            if canonical in user:
                raise OptionError(key, f"given twice (as {canonical!r} too)")
            user[canonical] = value
        elif not key.startswith("kubernetes.io/"):
            raise OptionError(key, "unknown option")
    return user


def filesystem_options(data: dict[str, str], user: dict[str, str]) -> dict[str, object]:
    """The fields every volume's filesystem takes (fs_type read_only mount_options fs_group
    mmp mmp_update_interval fsck fsck_options), from kubelet's keys and the user's options."""
    fs_type = parse_fs_type("kubernetes.io/fsType", data.get("kubernetes.io/fsType", ""))
    if "fsType" in user:
        option_fs_type = parse_fs_type("fsType", user["fsType"])
        if fs_type and option_fs_type and fs_type != option_fs_type:
            raise OptionError("fsType", f"{option_fs_type!r} contradicts the volume's fsType "
                              f"{fs_type!r}")
        fs_type = option_fs_type or fs_type
    readwrite = data.get("kubernetes.io/readwrite", "rw")
    if readwrite not in ("rw", "ro"):
        raise OptionError("kubernetes.io/readwrite", f"{readwrite!r} is neither rw nor ro")
    mount_options = parse_mount_options("mountOptions", user.get("mountOptions", ""))
    fs_group_text = data.get("kubernetes.io/mounterArgs.FsGroup",
                             data.get("kubernetes.io/fsGroup"))
    return dict(
        fs_type=fs_type,
        read_only=readwrite == "ro" or "ro" in mount_options,
        mount_options=mount_options,
        fs_group=(parse_int("kubernetes.io/mounterArgs.FsGroup", fs_group_text, 0, 2**31 - 1)
                  if fs_group_text else None),
        mmp=parse_bool("mmp", user.get("mmp", "true")),
        mmp_update_interval=parse_int("mmpUpdateInterval", user.get("mmpUpdateInterval", "5"),
                                      1, MMP_INTERVAL_MAX),
        fsck=parse_bool("fsck", user.get("fsck", "true")),
        fsck_options=_parse_fsck_options("fsckOptions", user.get("fsckOptions", "a")),
    )


def parse(raw: str) -> VolumeOptions:
    data = load(raw)
    user = user_options(data, _USER_KEYS)
    file = user.get("file", "")
    if not file:
        raise OptionError("file", "is required")
    image_format = user.get("format") or "raw"
    if image_format not in IMAGE_FORMATS:
        raise OptionError("format", f"{image_format!r} is not supported (use one of "
                          f"{', '.join(IMAGE_FORMATS)})")
    namespace, pod = data.get("kubernetes.io/pod.namespace"), data.get("kubernetes.io/pod.name")
    return VolumeOptions(
        file=file,
        share=user.get("share") or None,
        size=parse_size("size", user["size"]) if user.get("size") else None,
        image_format=image_format,
        allocate=parse_bool("allocate", user.get("allocate", "false")),
        lock=parse_bool("lock", user.get("lock", "true")),
        volume_name=data.get("kubernetes.io/pvOrVolumeName"),
        pod=f"{namespace}/{pod}" if namespace and pod else None,
        **filesystem_options(data, user),
    )


def redacted(raw: str) -> str:
    """The options JSON for a log line, with every secret's value replaced."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return "<options not valid JSON>"
    if isinstance(data, dict):
        data = {k: "<redacted>" if str(k).startswith(SECRET_PREFIX) else v
                for k, v in data.items()}
    return json.dumps(data, sort_keys=True)
