"""A kubelet stand-in for the FlexVolume driver tests, and the fixtures those tests share.

`Kubelet` replays what kubelet does around the driver (kubelet-flexvolume-protocol.md):

- the driver is installed with ``flexvolume.install.install`` into a plugin dir of the
  session, as ``flexblock/loop`` and as its alias ``kvaps/loop``, and the *installed*
  executable is run:
  execve of ``<plugindir>/<vendor~driver>/<driver>`` with argv ``[that path, cmd, args...]``,
  no stdin, cwd ``/``, a kubelet-like minimal environment, and stdout and stderr on ONE pipe
  (Go's ``CombinedOutput``), read to EOF;
- the options argument is built like ``NewOptionsForDriver`` (fsType, readwrite and
  pvOrVolumeName always; pod info, secrets and fsGroup for mount only; the user's options last,
  overriding) and serialised like Go's ``json.Marshal`` of a ``map[string]string``;
- the pod dir is created like ``prepareForMount`` (``MkdirAll(dir, 0750)``) before mount,
  removed after a failed mount (errors ignored, as kubelet does) and after a successful
  unmount (an error there is a kubelet teardown failure, so the harness raises);
- every reply is checked against the contract: the combined output is exactly one JSON value
  that ``json.loads`` accepts, its fields have the types kubelet's ``DriverStatus`` decodes,
  ``status`` is Success, Failure or Not supported, the exit code is 0 for Success and Not
  supported and 1 for Failure, and a Failure never carries a Python traceback.

Unlike kubelet, the harness calls ``mount`` on a dir that is already a mount point and
``unmount`` on a dir that does not exist (kubelet skips both): the tests use that to check
that the driver is idempotent.

The fixtures (`share`, `kubelet`) are imported by name into each test module. Whatever a test
does, teardown unmounts everything mounted under its tmp_path (deepest first), detaches the
loop devices whose backing file is under it, and unmounts the share. Devices, mounts and
processes that are not the test's own are never touched.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import loopctl
from flexvolume import _faultpoint
from flexvolume import install as flex_install

from helpers import wait_until  # noqa: F401  (tests/helpers.py; re-exported to the tests)

DRIVER = "flexblock/loop"
ALIAS = "kvaps/loop"
STATUSES = ("Success", "Failure", "Not supported")
LOG_FILE_ENV = "FLEXBLOCK_LOG_FILE"
ALLOWED_ROOTS_ENV = "FLEXBLOCK_ALLOWED_ROOTS"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SHARE_SIZE = "16g"  # a limit, not memory (tmpfs holds what is written); no volume may exceed it
CALL_TIMEOUT = 120.0   # a hung driver fails the test instead of wedging it (kubelet waits forever)
WAIT_TIMEOUT = 15.0    # udevd may hold a device open a while after its last real user is gone
LOOP_CLR_FD = 0x4C01   # <linux/loop.h>; only used when loopctl itself cannot detach

TOOL_DIRS = "/usr/sbin:/sbin:/usr/bin:/bin"  # where the real tools are, for the stand-ins

# Minimum sizes mkfs accepts (xfsprogs 5.19+: 300 MB; btrfs-progs: 114294784 bytes).
MIN_SIZE = {"ext4": 30 * MiB, "ext3": 30 * MiB, "xfs": 320 * MiB, "btrfs": 128 * MiB}


# -- Go's json.Marshal of a map[string]string -----------------------------------------------------
def _go_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t\b\f":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}[ch])
        elif code < 0x20 or ch in "<>&\u2028\u2029":
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)  # Go writes everything else as raw UTF-8
    out.append('"')
    return "".join(out)


def go_json(options: dict[str, str]) -> str:
    """What json.Marshal makes of a map[string]string: compact, keys sorted bytewise (code
    point order is UTF-8 byte order), ``<>&`` and U+2028/9 escaped, no other non-ASCII escapes."""
    return "{" + ",".join(f"{_go_string(k)}:{_go_string(v)}"
                          for k, v in sorted(options.items())) + "}"


# -- the kubelet side -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"


@dataclass(repr=False)
class Reply:
    """One driver call as kubelet saw it."""
    argv: list[str]
    code: int
    output: str
    body: dict
    seconds: float
    target: Path | None = None

    @property
    def status(self) -> str:
        return self.body["status"]

    @property
    def message(self) -> str:
        return self.body.get("message", "")

    def __str__(self) -> str:
        return f"{self.argv[1]} -> exit {self.code}: {self.output.strip()}"

    __repr__ = __str__


def check_reply(argv: list[str], code: int, raw: bytes, seconds: float) -> Reply:
    """The reply contract (kubelet's handleCmdResponse, plus our exit codes); AssertionError
    naming the call if it is broken."""
    call = " ".join(argv[1:2])
    output = raw.decode("utf-8")  # Go would replace bad UTF-8; we want to know about it
    try:
        body = json.loads(output)
    except ValueError as e:
        raise AssertionError(f"{call}: output is not one JSON document ({e}): {output!r}") from None
    assert isinstance(body, dict), f"{call}: reply is not a JSON object: {output!r}"
    status = body.get("status")
    assert status in STATUSES, f"{call}: bad status {status!r}: {output!r}"
    for key in ("message", "device", "volumeName"):
        assert isinstance(body.get(key, ""), str), f"{call}: {key} is not a string: {output!r}"
    assert isinstance(body.get("attached", False), bool), f"{call}: attached is not a bool"
    caps = body.get("capabilities", {})
    assert isinstance(caps, dict), f"{call}: capabilities is not an object: {output!r}"
    assert all(isinstance(v, bool) for v in caps.values()), \
        f"{call}: capabilities must be JSON booleans: {output!r}"
    expected_code = 1 if status == "Failure" else 0
    assert code == expected_code, f"{call}: status {status} with exit code {code}: {output!r}"
    if status == "Failure":
        assert "Traceback" not in output, f"{call}: a traceback reached kubelet: {output}"
        assert body.get("message"), f"{call}: Failure without a message: {output!r}"
    return Reply(list(argv), code, output, body, seconds)


class Kubelet:
    """Runs the installed driver the way kubelet does; see the module docstring."""

    def __init__(self, root: Path, plugin_dir: Path, log_file: Path, *,
                 env: dict[str, str] | None = None):
        self.root = Path(root)              # kubelet --root-dir
        self.plugin_dir = Path(plugin_dir)  # kubelet --volume-plugin-dir
        self.log_file = Path(log_file)
        path = os.environ.get("PATH", "") or "/usr/bin:/bin"
        for sbin in ("/usr/sbin", "/sbin"):
            if sbin not in path.split(":"):
                path += ":" + sbin
        # kubelet's own (systemd-given) environment is small; the driver inherits it.
        self.env = {"PATH": path, "LANG": "C.UTF-8", LOG_FILE_ENV: str(self.log_file),
                    ALLOWED_ROOTS_ENV: ""}  # "": no operator roots (ignore /etc/flexblock)
        self.env.update(env or {})
        self.calls: list[Reply] = []

    # -- installation and raw calls ------------------------------------------------------------
    def install(self, *drivers: str) -> None:
        flex_install.install(str(self.plugin_dir), list(drivers or (DRIVER, ALIAS)))

    def executable(self, driver: str = DRIVER) -> Path:
        vendor, name = driver.split("/")
        return self.plugin_dir / f"{vendor}~{name}" / name

    def argv(self, command: str, *args: str | os.PathLike, driver: str = DRIVER) -> list[str]:
        return [str(self.executable(driver)), command, *map(os.fspath, args)]

    def spawn(self, command: str, *args: str | os.PathLike, driver: str = DRIVER,
              env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start a call without waiting (for the kill tests); output on one pipe as ever."""
        return subprocess.Popen(self.argv(command, *args, driver=driver),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd="/", env={**self.env, **(env or {})},
                                **popen)

    def call(self, command: str, *args: str | os.PathLike, driver: str = DRIVER,
             env: dict[str, str] | None = None, timeout: float = CALL_TIMEOUT) -> Reply:
        argv = self.argv(command, *args, driver=driver)
        start = time.monotonic()
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, cwd="/", env={**self.env, **(env or {})},
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{command}: the driver (or a process holding its output "
                                 f"pipe) did not finish within {timeout:g} s; kubelet would "
                                 f"wait forever. Output so far: {e.output!r}") from None
        reply = check_reply(argv, p.returncode, p.stdout, time.monotonic() - start)
        self.calls.append(reply)
        return reply

    # -- the calls kubelet makes ---------------------------------------------------------------
    def init(self, driver: str = DRIVER) -> Reply:
        return self.call("init", driver=driver)

    def pod_dir(self, pod: Pod, volume: str = "test", driver: str = DRIVER) -> Path:
        vendor, name = driver.split("/")
        return self.root / "pods" / pod.uid / "volumes" / f"{vendor}~{name}" / volume

    @staticmethod
    def options(user: dict[str, str], *, volume: str = "test", fs_type: str = "",
                read_only: bool = False, pod: Pod | None = None, fs_group: int | None = None,
                fs_group_key: str = "kubernetes.io/mounterArgs.FsGroup",
                secrets: dict[str, str] | None = None) -> dict[str, str]:
        """NewOptionsForDriver: kubelet's keys, the mount-only extras when *pod* is given, then
        the user's options, overriding."""
        options = {"kubernetes.io/fsType": fs_type,
                   "kubernetes.io/readwrite": "ro" if read_only else "rw",
                   "kubernetes.io/pvOrVolumeName": volume}
        if pod is not None:
            options.update({"kubernetes.io/pod.name": pod.name,
                            "kubernetes.io/pod.namespace": pod.namespace,
                            "kubernetes.io/pod.uid": pod.uid,
                            "kubernetes.io/serviceAccount.name": pod.service_account})
            for key, value in (secrets or {}).items():
                options[f"kubernetes.io/secret/{key}"] = base64.b64encode(value.encode()).decode()
            if fs_group is not None:
                options[fs_group_key] = str(fs_group)
        options.update(user)
        return options

    @staticmethod
    def prepare_for_mount(target: Path) -> None:
        if not os.path.lexists(target):
            os.makedirs(target, 0o750)

    def mount(self, pod: Pod, user: dict[str, str], *, volume: str = "test", fs_type: str = "",
              read_only: bool = False, fs_group: int | None = None,
              fs_group_key: str = "kubernetes.io/mounterArgs.FsGroup",
              secrets: dict[str, str] | None = None, driver: str = DRIVER,
              target: Path | None = None, env: dict[str, str] | None = None,
              timeout: float = CALL_TIMEOUT) -> Reply:
        target = Path(target) if target is not None else self.pod_dir(pod, volume, driver)
        self.prepare_for_mount(target)
        options = self.options(user, volume=volume, fs_type=fs_type, read_only=read_only, pod=pod,
                               fs_group=fs_group, fs_group_key=fs_group_key, secrets=secrets)
        reply = self.mount_raw(target, go_json(options), driver=driver, env=env, timeout=timeout)
        return reply

    def mount_raw(self, target: Path, options_json: str, *, driver: str = DRIVER,
                  env: dict[str, str] | None = None, timeout: float = CALL_TIMEOUT) -> Reply:
        self.prepare_for_mount(target)
        reply = self.call("mount", target, options_json, driver=driver, env=env, timeout=timeout)
        reply.target = target
        if reply.status != "Success":
            try:
                os.rmdir(target)  # kubelet: os.Remove(dir), error ignored
            except OSError:
                pass
        return reply

    def unmount(self, pod: Pod | None = None, *, volume: str = "test", driver: str = DRIVER,
                target: Path | None = None, timeout: float = CALL_TIMEOUT) -> Reply:
        target = Path(target) if target is not None else self.pod_dir(pod, volume, driver)
        reply = self.call("unmount", target, driver=driver, timeout=timeout)
        reply.target = target
        if reply.status == "Success":
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise AssertionError(f"unmount of {target} answered Success, but kubelet cannot "
                                     f"remove the dir ({e.strerror}): teardown fails and "
                                     f"retries forever; still mounted: {findmnt(target)}") from None
        return reply

    def expandfs(self, target: Path, user: dict[str, str], new_size: int, old_size: int, *,
                 volume: str = "test", fs_type: str = "", read_only: bool = False,
                 device_path: str = "", driver: str = DRIVER) -> Reply:
        options = self.options(user, volume=volume, fs_type=fs_type, read_only=read_only)
        return self.call("expandfs", go_json(options), device_path, target, str(new_size),
                         str(old_size), driver=driver)

    def log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


# -- what the kernel and util-linux say -----------------------------------------------------------
_OCTAL = re.compile(r"\\([0-7]{3})")


def run(*cmd: str | os.PathLike, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(c) for c in cmd], check=check, capture_output=True,
                          text=True, timeout=CALL_TIMEOUT, **kwargs)


def is_under(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    path, root = os.fspath(path).removesuffix(" (deleted)"), os.fspath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            points.append(_OCTAL.sub(lambda m: chr(int(m[1], 8)), line.split()[4]))
    return points


def mounts_under(root: str | os.PathLike) -> list[str]:
    """Mount points under *root* (root included), deepest first."""
    found = {p for p in mount_points() if is_under(p, root)}
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def is_mount_point(path: str | os.PathLike) -> bool:
    return os.fspath(path) in mount_points()


def findmnt(path: str | os.PathLike) -> dict | None:
    """findmnt's view of the mount at *path* (None if it is no mount point): target, source,
    fstype, options, maj:min."""
    result = run("findmnt", "-J", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS,MAJ:MIN", "--mountpoint",
                 path, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    return json.loads(result.stdout)["filesystems"][-1]


def bound_loops() -> dict[int, str]:
    """Every bound loop device and its backing file, by sysfs."""
    bound = {}
    for name in os.listdir("/sys/block"):
        if name.startswith("loop") and name[4:].isdigit():
            try:
                with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8",
                          errors="surrogateescape") as f:
                    bound[int(name[4:])] = f.read().rstrip("\n")
            except OSError:
                pass
    return bound


def loops_for(image: str | os.PathLike) -> list[int]:
    """Devices bound to *image* (unlinked or not)."""
    image = os.fspath(image)
    return sorted(n for n, b in bound_loops().items() if b.removesuffix(" (deleted)") == image)


def loops_under(root: str | os.PathLike) -> list[int]:
    return sorted(n for n, b in bound_loops().items() if is_under(b, root))


def losetup(device: str) -> dict:
    """losetup's view of *device*: name, autoclear, ro, back-file."""
    out = run("losetup", "-J", "-l", "-O", "NAME,AUTOCLEAR,RO,BACK-FILE", device).stdout
    rows = json.loads(out)["loopdevices"]
    assert len(rows) == 1, f"losetup lists {rows} for {device}"
    return rows[0]


def loop_of_mount(path: str | os.PathLike) -> str:
    """The loop device mounted at *path* (AssertionError if there is none)."""
    mount = findmnt(path)
    assert mount is not None, f"{path} is not a mount point"
    source = mount["source"]
    assert re.fullmatch(r"/dev/loop\d+", source), f"{path} is mounted from {source}, not a loop"
    return source


def dumpe2fs(image: str | os.PathLike) -> dict[str, str]:
    """The superblock fields `dumpe2fs -h` prints, as text."""
    out = run("dumpe2fs", "-h", image).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


CAP_SYS_RESOURCE = 24  # <linux/capability.h>; ext4 online resize needs it (ext4_resize_begin)


def has_capability(number: int) -> bool:
    """Whether this process (so the driver it starts as root) has capability *number*."""
    with open("/proc/self/status", encoding="utf-8") as f:
        effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(effective >> number & 1)


needs_ext_online_resize = pytest.mark.skipif(
    not has_capability(CAP_SYS_RESOURCE),
    reason="no CAP_SYS_RESOURCE here (a sandbox dropped it); ext2/3/4 online resize needs it")


def df_size(path: str | os.PathLike) -> int:
    """Total size of the filesystem at *path* as df reports it, in bytes."""
    lines = run("df", "-B1", "--output=size", path).stdout.split()
    return int(lines[-1])


def write_data(directory: str | os.PathLike, name: str = "data.bin", size: int = 256 * KiB,
               seed: int = 1) -> str:
    """Write *size* deterministic bytes into directory/name (fsync'd); their sha256."""
    data = hashlib.shake_256(f"{seed}:{name}".encode()).digest(size)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def checksum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> dict:
    """Every entry under *root* (not crossing into *exclude*): type, and the content of files
    (sha256) and symlinks. Directory times are left out: only what exists and holds what."""
    excluded = {os.fspath(e) for e in exclude}
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in excluded]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path in excluded:
                continue
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                state[path] = ("file", st.st_size, st.st_nlink, checksum(path))
            elif stat.S_ISLNK(st.st_mode):
                state[path] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[path] = ("dir",)
            else:
                state[path] = ("other", stat.S_IFMT(st.st_mode))
    return state


def temp_images(directory: str | os.PathLike) -> list[str]:
    """The driver's temporary images (``.<name>.flexblock-*``) in *directory*."""
    return sorted(n for n in os.listdir(directory) if ".flexblock-" in n)


# -- processes (the kill tests start drivers in sessions of their own) ----------------------------
def session_members(sid: int) -> list[int]:
    """Live processes of session *sid*: a killed driver's children, reparented."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state), fields[3] field 6 (session)
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def wait_for_session(sid: int, timeout: float = WAIT_TIMEOUT) -> None:
    """Wait for the processes of session *sid* (all started by the test) to end; SIGKILL the
    ones still there after *timeout*, by pid."""
    if not wait_until(lambda: not session_members(sid), timeout):
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not session_members(sid), 5.0)


# -- cleanup --------------------------------------------------------------------------------------
def _detach_if_under(number: int, root: str) -> None:
    """Detach /dev/loopN if it is (still) bound to a file under *root*; loopctl re-checks the
    binding's identity before it clears, and the raw fallback holds an fd while it checks."""
    try:
        dev = loopctl.get(number)
        backing = dev.backing_file
        if backing is not None and is_under(backing, root):
            dev.detach()
        return
    except (loopctl.NotBound, loopctl.NotALoopDevice):
        return
    except Exception:  # loopctl is someone's work in progress: fall back to the raw ioctl
        pass
    try:
        fd = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if number in loops_under(root):
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
    finally:
        os.close(fd)


def release_everything(root: Path, share: Path | None = None) -> list[str]:
    """Unmount everything under *root* but *share* (deepest first), detach every loop device
    backed by a file under *root*, then unmount *share*; what could not be, as messages."""
    root_text, share_text = str(root), str(share) if share else None
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        mounts = [m for m in mounts_under(root_text) if m != share_text]
        loops = loops_under(root_text)
        if (not mounts and not loops) or time.monotonic() >= deadline:
            break
        for target in mounts:
            subprocess.run(["umount", target], capture_output=True)
        for number in loops:
            _detach_if_under(number, root_text)
        time.sleep(0.02)
    problems = []
    for target in [m for m in mounts_under(root_text) if m != share_text]:
        subprocess.run(["umount", "-l", target], capture_output=True)
        problems.append(f"{target} was still mounted (unmounted lazily)")
    for number in loops_under(root_text):
        problems.append(f"/dev/loop{number} is still bound to {bound_loops().get(number)}")
    if share_text and is_mount_point(share_text):
        if not wait_until(lambda: subprocess.run(["umount", share_text], capture_output=True
                                                 ).returncode == 0 or
                          not is_mount_point(share_text), WAIT_TIMEOUT):
            subprocess.run(["umount", "-l", share_text], capture_output=True)
            problems.append(f"share {share_text} was busy (unmounted lazily)")
    return problems


# -- fixtures -------------------------------------------------------------------------------------
def _unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the driver tests mount real loop devices and need root"
    for tool in ("mkfs.ext4", "dumpe2fs", "debugfs", "findmnt", "losetup"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def share(tmp_path):
    """A tmpfs mounted at tmp_path/share: the shared filesystem images live on. Teardown
    releases every mount and loop device under tmp_path, then unmounts it."""
    reason = _unusable_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path.resolve()
    path = root / "share"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={SHARE_SIZE},mode=0755", "flexblock-test-share", path)
    try:
        yield path
    finally:
        problems = release_everything(root, path)
        if problems:
            pytest.fail("teardown could not release: " + "; ".join(problems))


_session_plugins: list[Path] = []


def session_plugin_dir(tmp_path_factory) -> Path:
    """A plugin dir with the driver installed under both names, once per session: an install
    copies our packages into a version of its own (about 0.25 s)."""
    if not _session_plugins:
        path = tmp_path_factory.mktemp("plugins").resolve()
        flex_install.install(str(path), [DRIVER, ALIAS])
        _session_plugins.append(path)
    return _session_plugins[0]


@pytest.fixture
def kubelet(tmp_path, tmp_path_factory, share):
    """A Kubelet with root tmp_path/kubelet, the session's plugin dir (the driver installed
    under both names) and its log in tmp_path/flexblock.log."""
    root = tmp_path.resolve()
    k = Kubelet(root / "kubelet", session_plugin_dir(tmp_path_factory), root / "flexblock.log")
    (root / "kubelet").mkdir()
    return k


def new_volume(share: Path, name: str = "test", size: str = "30m", **extra: str) -> dict:
    """The user options of the seed README's share example, for volume *name*."""
    return {"share": str(share), "file": f"/kube-volumes/{name}", "size": size, **extra}


def image_path(share: Path, name: str = "test") -> Path:
    return share / "kube-volumes" / name


def assert_released(kubelet: Kubelet, share: Path) -> None:
    """Nothing of the test's is left: no loop device backed by a file under tmp_path (after
    udevd lets go), no mount under tmp_path but the share."""
    root = kubelet.root.parent
    assert wait_until(lambda: not loops_under(root)), \
        f"loop devices left: {[(n, bound_loops().get(n)) for n in loops_under(root)]}"
    assert [m for m in mounts_under(root) if m != str(share)] == []



def make_volume(kubelet: Kubelet, share: Path, *, fs_type: str = "ext4", driver: str = DRIVER,
                **extra: str) -> str:
    """Create volume "test" (new_volume's options and *extra*) holding data.bin, unmount it;
    the data's sha256."""
    pod = Pod("creator")
    reply = kubelet.mount(pod, new_volume(share, **extra), fs_type=fs_type, driver=driver)
    assert reply.status == "Success", reply
    digest = write_data(reply.target)
    assert kubelet.unmount(pod, driver=driver).status == "Success"
    assert wait_until(lambda: not loops_for(image_path(share)))
    return digest


def assert_data_kept(kubelet: Kubelet, share: Path, pod: Pod, options: dict[str, str],
                     digest: str, *, fs_type: str = "ext4") -> None:
    """The volume mounts, holds data.bin as written (*digest*), unmounts, and nothing is left."""
    reply = kubelet.mount(pod, options, fs_type=fs_type)
    assert reply.status == "Success", reply
    assert checksum(reply.target / "data.bin") == digest
    assert kubelet.unmount(pod).status == "Success"
    assert_released(kubelet, share)


def _stand_in(bindir: Path, tool: str, before: str) -> None:
    """bindir/*tool*: a shell script that runs *before*, then execs the real *tool*."""
    bindir.mkdir(exist_ok=True)
    real = shutil.which(tool, path=TOOL_DIRS)
    (bindir / tool).write_text(f"#!/bin/sh\n{before}\nexec {real} \"$@\"\n")
    (bindir / tool).chmod(0o755)


def slow_tool(tmp_path: Path, tool: str, seconds: float) -> str:
    """A PATH entry where *tool* sleeps first: a big volume's mkfs, at a 30 MiB one's cost."""
    _stand_in(tmp_path / "slow-bin", tool, f"sleep {seconds}")
    return str(tmp_path / "slow-bin")


def start_creating_with_slow_mkfs(kubelet: Kubelet, share: Path, tmp_path: Path, pod: Pod,
                                  seconds: float, **popen) -> tuple[subprocess.Popen, list[str]]:
    """Start a mount that creates volume "test" with an mkfs that sleeps *seconds* first; the
    call and its argv, once its temporary image exists."""
    image = image_path(share)
    target = kubelet.pod_dir(pod)
    kubelet.prepare_for_mount(target)
    raw = go_json(Kubelet.options(new_volume(share), fs_type="ext4", pod=pod))
    path = slow_tool(tmp_path, "mkfs.ext4", seconds) + ":" + kubelet.env["PATH"]
    proc = kubelet.spawn("mount", target, raw, env={"PATH": path}, **popen)
    if not wait_until(lambda: image.parent.exists() and temp_images(image.parent), 10):
        proc.kill()
        proc.communicate()
        raise AssertionError("the driver never created its temporary image")
    return proc, kubelet.argv("mount", target, raw)


# -- a kill at a named step (the kill tests) -----------------------------------------------------
def killing_tool(tmp_path: Path, tool: str, first_arg: str = "") -> str:
    """A PATH entry where *tool* (when its first argument is *first_arg*, if given) SIGKILLs its
    parent, the driver, then runs the real one. Tools the driver runs die with it, so the real
    tool is killed too, wherever it got to; a daemon it starts (qemu-nbd) outlives it."""
    kill = "kill -KILL $PPID"
    if first_arg:
        kill = f'[ "$1" = {first_arg} ] && {kill}'
    _stand_in(tmp_path / f"kill-{tool}-{first_arg}", tool, kill)
    return f"{tmp_path / f'kill-{tool}-{first_arg}'}:{TOOL_DIRS}"


def fault_env(tmp_path: Path, fault: str) -> dict[str, str]:
    """The environment that kills the driver at *fault*: a fault point, or "tool:NAME" (and
    "tool:NAME:ARG", only the call of NAME whose first argument is ARG)."""
    kind, _, tool = fault.partition(":")
    if kind == "tool":
        return {"PATH": killing_tool(tmp_path, *tool.split(":", 1))}
    return {_faultpoint.ENV: fault}


def call_killed(kubelet: Kubelet, tmp_path: Path, fault: str, command: str,
                *args: str | os.PathLike, driver: str = DRIVER) -> None:
    """Run one call that must die of SIGKILL at *fault*, and leave no process of its session
    (its tools) behind."""
    argv = kubelet.argv(command, *args, driver=driver)
    proc = kubelet.spawn(command, *args, driver=driver, env=fault_env(tmp_path, fault),
                         start_new_session=True)
    output, _ = proc.communicate(timeout=CALL_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, \
        f"{fault} was never reached: {check_reply(argv, proc.returncode, output, 0.0)}"
    assert output == b"", "a killed driver answered anyway"
    left = wait_until(lambda: not session_members(proc.pid), 10)
    wait_for_session(proc.pid)
    assert left, f"processes outlived the driver killed at {fault}"


FS_GROUP = 4321  # the pod's fsGroup in the kill tests: the last step of a mount gives it the root


def kill_mount(kubelet: Kubelet, tmp_path: Path, pod: Pod, options: dict[str, str], fault: str,
               driver: str = DRIVER) -> None:
    """A mount killed at *fault*, then kubelet's clean-up of the pod dir."""
    target = kubelet.pod_dir(pod, driver=driver)
    kubelet.prepare_for_mount(target)
    raw = go_json(Kubelet.options(options, fs_type="ext4", pod=pod, fs_group=FS_GROUP))
    call_killed(kubelet, tmp_path, fault, "mount", target, raw, driver=driver)
    if not is_mount_point(target):
        os.rmdir(target)  # kubelet after a failed mount
        image = image_path(Path(options["share"]))
        assert wait_until(lambda: not loops_for(image)), f"{image} still bound after the kill"


def retry_mount(kubelet: Kubelet, pod: Pod, options: dict[str, str], fault: str,
                digest: str | None, driver: str = DRIVER, device: str = "/dev/loop") -> Reply:
    """Kubelet's retry: Success on a *device* (its path's prefix), the volume whole (data,
    fsGroup), no temporary image left."""
    reply = kubelet.mount(pod, options, fs_type="ext4", fs_group=FS_GROUP, driver=driver)
    assert reply.status == "Success", f"retry after a kill at {fault}: {reply}"
    assert findmnt(reply.target)["source"].startswith(device)
    st = os.stat(reply.target)
    assert (st.st_gid, st.st_mode & 0o2070) == (FS_GROUP, 0o2070), \
        f"after a kill at {fault} the volume root is not the fsGroup's"
    if digest:
        assert checksum(reply.target / "data.bin") == digest
    assert temp_images(image_path(Path(options["share"])).parent) == []
    return reply
