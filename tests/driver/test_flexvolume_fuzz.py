"""Hostile input, generated: the options JSON (the pod author's) and argv (kubelet's, with bytes
no UTF-8 decoder accepts), property-based with hypothesis.

Whatever the input, the installed driver, run as kubelet runs it, answers exactly one JSON
document with a valid status, exit code to match and no traceback, and it creates, formats or
opens nothing outside the share: the tree around it (a decoy tree holding a blank image the
driver would happily format, a data file and an ext4 image; the plugin dir) is compared before
and after each call, content included, and inotify reports every open, creation or write in it.
Symlinks into the decoy tree are planted in the share, and one test swaps a directory for such a
symlink (RENAME_EXCHANGE) over and over while the driver walks through it.

Example counts are fixed and the examples derandomized, so a run takes seconds and a failure
reruns as it was. Parsing alone is fuzzed in-process, with many more examples.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexvolume import image as flex_image
from flexvolume import mounts as flex_mounts
from flexvolume import options as flex_options
from flexvolume.errors import DriverError
from kubelet import (MiB, Kubelet, Pod, bound_loops, check_reply, go_json,  # noqa: F401
                     kubelet, loops_under, mounts_under, run, share, snapshot, temp_images,
                     wait_until)

SHARE_SIZE = "64m"  # huge sizes fill it in milliseconds, not gigabytes


def runs(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


# -- inotify (no binding in the stdlib) -----------------------------------------------------------
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
_WATCHED = IN_OPEN | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | \
    IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_libc = ctypes.CDLL(None, use_errno=True)


class Watch:
    """inotify watches on every directory of some trees: what was opened or changed in them."""

    def __init__(self, *roots: Path, ignore: tuple[Path, ...] = ()):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs: dict[int, str] = {}
        self.ignore = {os.fspath(p) for p in ignore}
        for root in roots:
            for dirpath, dirnames, _ in os.walk(root):
                dirnames[:] = [d for d in dirnames
                               if os.path.join(dirpath, d) not in self.ignore]
                wd = _libc.inotify_add_watch(self.fd, os.fsencode(dirpath), _WATCHED)
                assert wd >= 0, os.strerror(ctypes.get_errno())
                self.dirs[wd] = dirpath
        self.events()  # our own walk's

    def events(self) -> list[tuple[str, int]]:
        """(path, mask) of what happened since the last call, ignored paths left out."""
        found = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(buf):
                wd, mask, _, length = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                path = os.path.join(self.dirs.get(wd, "?"), os.fsdecode(name))
                if path not in self.ignore and wd in self.dirs:
                    found.append((path, mask))

    def close(self) -> None:
        os.close(self.fd)


# -- the scene ------------------------------------------------------------------------------------
class Scene:
    """A share holding symlinks out of it, a decoy tree beside it, and the watch on the rest."""

    def __init__(self, kubelet: Kubelet, share: Path, tmp_path: Path):
        self.kubelet, self.share, self.root = kubelet, share, tmp_path.resolve()
        run("mount", "-o", f"remount,size={SHARE_SIZE}", share)
        self.outside = self.root / "outside"
        (self.outside / "dir").mkdir(parents=True)
        (self.outside / "victim.img").write_bytes(os.urandom(MiB))
        with open(self.outside / "zero.img", "xb") as f:
            f.truncate(4 * MiB)
        with open(self.outside / "fs.img", "xb") as f:
            f.truncate(4 * MiB)
        run("mkfs.ext4", "-q", "-F", self.outside / "fs.img")
        self.allowed = self.root / "allowed"  # an operator's allowed root
        self.allowed.mkdir()
        for name, target in (("link-out", self.outside), ("link-dir", self.outside / "dir"),
                             ("link-img", self.outside / "zero.img"),
                             ("link-fs", self.outside / "fs.img")):
            (share / name).symlink_to(target)
            (self.allowed / name).symlink_to(target)
        (share / "kube-volumes").mkdir()
        (share / "kube-volumes" / "link-img").symlink_to(self.outside / "victim.img")
        os.mkfifo(share / "fifo")
        self.share_link = self.root / "share-link"
        self.share_link.symlink_to(share)
        kubelet.env["FLEXBLOCK_ALLOWED_ROOTS"] = f"{share}:{self.allowed}"
        self.excluded = (share, self.allowed, kubelet.root, kubelet.log_file)
        self.before = snapshot(self.root, exclude=self.excluded)
        # The kernel and the interpreter open the driver's executable to run it.
        self.watch = Watch(self.root, ignore=(*self.excluded, kubelet.plugin_dir))
        self.calls = 0
        self.statuses: dict[str, int] = {}

    def check_untouched(self, what) -> None:
        events = self.watch.events()
        assert events == [], f"{what} touched outside the share: {events}"
        after = snapshot(self.root, exclude=self.excluded)
        self.watch.events()  # the snapshot's own reads
        assert after == self.before, f"{what} changed outside the share"

    def call(self, argv: list[bytes]):
        """One driver call with raw argv bytes; the reply checked like any kubelet call."""
        full = [os.fsencode(self.kubelet.executable())] + argv
        p = subprocess.run(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, cwd="/", env=self.kubelet.env, timeout=60)
        self.calls += 1
        reply = check_reply([os.fsdecode(a) for a in full], p.returncode, p.stdout, 0.0)
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        assert "internal error" not in reply.message, f"an unforeseen exception: {reply}"
        return reply

    def release(self) -> None:
        """Unmount what a call mounted (through the driver: it must work), check nothing is
        left bound or mounted under tmp_path but the share."""
        for target in mounts_under(self.kubelet.root):
            reply = self.call([b"unmount", os.fsencode(target)])
            assert reply.status == "Success", reply
        assert mounts_under(self.root) == [str(self.share)]
        assert wait_until(lambda: not loops_under(self.root)), loops_under(self.root)


@pytest.fixture
def scene(kubelet, share, tmp_path):
    s = Scene(kubelet, share, tmp_path)
    yield s
    s.watch.close()
    print(f"{s.calls} driver calls: {s.statuses}")


# -- strategies -----------------------------------------------------------------------------------
# Bytes no UTF-8 decoder accepts; Python hands them to the driver as lone surrogates.
_NON_UTF8 = st.binary(min_size=1, max_size=4).filter(
    lambda b: not _decodes(b)).map(lambda b: b.decode("utf-8", "surrogateescape"))


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_COMPONENT = st.one_of(
    st.sampled_from(["..", ".", "", "kube-volumes", "vol", "link-out", "link-dir", "link-img",
                     "link-fs", "fifo", "dir", "victim.img", "zero.img", "fs.img", "outside",
                     ".vol.flexblock-1-00000000", "a" * 255, "b" * 256, "x\0y", "\0"]),
    st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=8),
    _NON_UTF8)


def _path(absolute: st.SearchStrategy[bool]) -> st.SearchStrategy[str]:
    return st.builds(lambda lead, parts: ("/" if lead else "") + "/".join(parts), absolute,
                     st.lists(_COMPONENT, min_size=0, max_size=5))


def _share_values(scene: Scene) -> st.SearchStrategy[str]:
    share, outside = str(scene.share), str(scene.outside)
    return st.one_of(
        st.sampled_from([share, share + "/", str(scene.share_link), share + "/..",
                         share + "/kube-volumes", share + "/link-out", outside, str(scene.root),
                         str(scene.allowed), "/", "/proc", "/sys", "/dev", "relative", "",
                         share + "\0", share + "/../share", "/nonexistent"]),
        st.builds(lambda p: share + p, _path(st.just(True))))


_SIZES = st.one_of(
    st.sampled_from(["30m", "4Mi", "1m", "1Mi", "1", "0", "-1", "", " 30m", "30 m", "1.5Mi",
                     "30MB", "0x100000", "1e9", "3\u0660m", "\uff13\uff10m", "8Ei", "9Ei",
                     "9223372036854775807", "99999999999999999999999", "1Ti", "1Pi", "nan",
                     "inf", "30m\0"]),
    st.text(max_size=6))
_FS_TYPES = st.sampled_from(["", "ext4", "ext3", "ext2", "xfs", "btrfs", "vfat", "ntfs", "nfs",
                             "tmpfs", "proc", "EXT4", "ext4 ", "../ext4", "ext4\0", "zfs"])
_WORDS = st.sampled_from(["", "noatime", "ro", "rw", "errors=panic", "errors=remount-ro",
                          "data=journal", "journal_path=/etc/passwd", "dev", "suid", "loop",
                          "bind", "remount", "nouuid", "context=system_u:object_r:foo",
                          "commit=5", "commit=x", "x,,y", "a=b=c", "subvol=../../x"])


def _options(scene: Scene) -> st.SearchStrategy[dict[str, str]]:
    """A valid volume's options with up to four of them replaced by hostile values (all of
    them hostile at once would almost never get past the first check)."""
    text = st.text(max_size=8)
    hostile = {
        "file": st.one_of(_path(st.booleans()),
                          st.builds(lambda p: str(scene.allowed) + p, _path(st.just(True))),
                          st.builds(lambda p: str(scene.outside) + p, _path(st.just(True)))),
        "share": _share_values(scene),
        "size": _SIZES,
        "fsType": _FS_TYPES,
        "kubernetes.io/fsType": _FS_TYPES,
        "kubernetes.io/readwrite": st.sampled_from(["rw", "ro", "", "RO", "rw\0"]),
        "mountOptions": st.lists(_WORDS, max_size=3).map(",".join),
        "mount_options": _WORDS,
        "fsckOptions": st.sampled_from(["a", "af", "n", "y", "-y", "a -f", "", "p\0"]),
        "mmp": st.sampled_from(["false", "true", "yes", "2", ""]),
        "mmpUpdateInterval": st.sampled_from(["5", "0", "1", "300", "301", "-1", "1e3"]),
        "fsck": st.sampled_from(["false", "true", "maybe"]),
        "allocate": st.sampled_from(["false", "true", "1", "TRUE", "\u0131"]),
        "lock": st.sampled_from(["true", "false", ""]),
        "kubernetes.io/mounterArgs.FsGroup": st.sampled_from(
            ["1000", "0", "-1", "4294967296", "0x10", "1e3", "", "\u0661"]),
        "kubernetes.io/secret/key": text,
        "kubernetes.io/whatever": text,
        "File": text,
        "file ": text,
    }
    replaced = st.lists(st.sampled_from(sorted(hostile)).flatmap(
        lambda key: hostile[key].map(lambda value: (key, value))), max_size=4)
    valid = {"share": str(scene.share), "file": "/kube-volumes/vol", "size": "4Mi",
             "mmp": "false"}
    return replaced.map(lambda pairs: {**valid, **dict(pairs)})


def _options_argument(scene: Scene) -> st.SearchStrategy[bytes]:
    """What kubelet would send (Go's json.Marshal of the map), or anything at all."""
    return st.one_of(
        _options(scene).map(lambda o: go_json({"kubernetes.io/fsType": "",
                                               "kubernetes.io/readwrite": "rw", **o})
                            .encode("utf-8", "surrogateescape")),
        st.sampled_from([b"", b"{}", b"[]", b"null", b"1e999", b"\"x\"", b"{\"file\": 1}",
                         b"[" * 5000, b"{\"a\":" * 5000, b"{\"file\":\"\xff\"}", b"\xef\xbb\xbf{}",
                         b"{\"file\":\"/a\",\"file\":\"/b\"}"]),
        st.binary(max_size=64).filter(lambda b: b"\0" not in b))


# -- the driver, fuzzed ---------------------------------------------------------------------------
def test_fuzzed_mount_options_never_escape_the_share(scene):
    """Hypothesis drives mount with generated options; each call then gets unmounted."""
    pods = scene.kubelet.pod_dir(Pod("fuzz")).parent
    # Kubelet's dir names are its own, but mountinfo escapes some bytes and others are no UTF-8.
    names = st.sampled_from(["vol", "v o\tl", "v\nl", "v\\040l", "v\\l", "\udcff\udcfe", "é"])

    @runs(70)
    @given(names, _options_argument(scene))
    def mount(name: str, options: bytes) -> None:
        target = pods / name
        Kubelet.prepare_for_mount(target)
        reply = scene.call([b"mount", os.fsencode(target), options])
        scene.check_untouched(f"mount {options!r}")
        scene.release()
        if reply.status == "Success":
            assert options.startswith(b"{")
        for directory in (scene.share, scene.share / "kube-volumes"):
            assert temp_images(directory) == []

    mount()
    assert scene.statuses.get("Success", 0) >= 1, "no generated volume ever mounted"


def test_fuzzed_argv_gets_one_reply(scene):
    """Any command, any number of arguments, any bytes (NUL aside: execve cannot carry it)."""
    # Mount dirs are kubelet's, not the pod author's: below its root, even if odd.
    kubelet_root = os.fsencode(scene.kubelet.root)
    odd_names = st.lists(_COMPONENT.filter(lambda c: ".." not in c and "\0" not in c),
                         min_size=1, max_size=3)
    target = st.one_of(st.builds(lambda parts: kubelet_root + b"/pods/" + os.fsencode(
                                     "/".join(parts)), odd_names),
                       st.sampled_from([b"", b"relative", b"/", kubelet_root + b"/\xff\xfe"]))
    argument = st.one_of(target, _options_argument(scene),
                         st.binary(max_size=24).filter(lambda b: b"\0" not in b))
    command = st.sampled_from([b"init", b"mount", b"unmount", b"expandfs", b"attach",
                               b"getvolumename", b"MOUNT", b"mount\xff", b"", b"--help"])

    @runs(100)
    @given(command, st.lists(argument, max_size=6))
    def call(command: bytes, args: list[bytes]) -> None:
        scene.call([command, *args])
        scene.check_untouched(f"{command!r} {args!r}")
        scene.release()

    call()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), a)


@pytest.mark.parametrize("swapped", ["dir", "image"])
def test_symlink_swapped_in_between_check_and_use(scene, swapped):
    """A directory component (or the image itself) and a symlink out of the share change
    places thousands of times while the driver creates and mounts the volume."""
    share = scene.share
    real, link = share / "race", share / "race-link"
    if swapped == "dir":
        real.mkdir()
        link.symlink_to(scene.outside / "dir")
        file = "/race/vol"
    else:
        link.symlink_to(scene.outside / "zero.img")
        file = "/race"
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            _exchange(real, link)
            swaps += 1
            time.sleep(0.0001)  # lets the driver's process have the CPU too

    pod = Pod("racer")
    target = scene.kubelet.pod_dir(pod)
    raw = go_json(Kubelet.options({"share": str(share), "file": file, "size": "4Mi",
                                   "mmp": "false"}, pod=pod)).encode()
    if swapped == "image":
        with open(real, "xb") as f:
            f.truncate(4 * MiB)
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(12):
            Kubelet.prepare_for_mount(target)
            reply = scene.call([b"mount", os.fsencode(target), raw])
            if reply.status == "Success":
                # The kernel's path of the open file: no symlink in it, whatever was swapped.
                backing = set(_backing_files_under(scene.root))
                assert backing and all(b.startswith(str(share) + "/") for b in backing), backing
            else:
                os.rmdir(target)
            scene.release()
    finally:
        stop.set()
        swapper.join()
    scene.check_untouched("the swapped-symlink mounts")
    print(f"{swaps} swaps, {scene.statuses}")
    assert swaps > 100


def _backing_files_under(root: Path) -> list[str]:
    return [b for n, b in bound_loops().items() if n in loops_under(root)]


# -- parsing alone, in-process --------------------------------------------------------------------
@runs(1000)
@given(st.one_of(
    st.dictionaries(st.sampled_from(["file", "share", "size", "fsType", "kubernetes.io/fsType",
                                     "kubernetes.io/readwrite", "mountOptions", "mount_options",
                                     "fsckOptions", "fsck_options", "mmp", "mmpUpdateInterval",
                                     "fsck", "allocate", "lock", "kubernetes.io/fsGroup",
                                     "kubernetes.io/mounterArgs.FsGroup", "other"]),
                    st.one_of(_SIZES, _FS_TYPES, _WORDS, st.text(max_size=10), st.integers(),
                              st.none(), st.lists(st.text(max_size=2), max_size=2)))
    .map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(["[" * 100000, "{\"a\":" * 100000, "1" * 5000, "{\"file\": \"\\ud800\"}"])))
def test_options_parse_to_valid_values_or_a_named_refusal(raw):
    try:
        opts = flex_options.parse(raw)
    except DriverError as e:
        assert str(e).startswith("option ")
        return
    assert opts.file
    assert opts.size is None or (opts.size % 4096 == 0 and MiB <= opts.size < 2**63)
    assert opts.fs_type in (None, *flex_options.FS_TYPES)
    assert 1 <= opts.mmp_update_interval <= flex_options.MMP_INTERVAL_MAX
    assert opts.fs_group is None or 0 <= opts.fs_group < 2**31
    assert set(opts.fsck_options) <= set("apnyf") and opts.fsck_options
    for fs_type in ("ext4", "xfs", "btrfs"):
        try:
            flags, data = flex_mounts.mount_arguments(fs_type, opts.mount_options, opts.read_only)
        except DriverError:
            continue
        assert flags & flex_mounts.lib.MS_NODEV
        for word in filter(None, data.split(",")):
            assert word.partition("=")[0] in flex_mounts._FS_OPTIONS[fs_type], word
    assert flex_options.redacted(raw)


@runs(1000)
@given(_path(st.booleans()))
def test_file_resolves_below_its_allowed_root_or_is_refused(monkeypatch, file):
    monkeypatch.setenv(flex_image.ALLOWED_ROOTS_ENV, "/srv/volumes:/data/a/")
    try:
        root, parts = flex_image.resolve(file, None)
    except DriverError:
        return
    assert root in ("/srv/volumes", "/data/a")
    assert parts and all(p not in ("", ".", "..") and "/" not in p and "\0" not in p
                         for p in parts)
    assert ".flexblock-" not in parts[-1]
    assert os.path.normpath(os.path.join(root, *parts)).startswith(root + "/")
