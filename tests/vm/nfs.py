"""A kernel NFS server and NFSv4.2 client "nodes" in network namespaces, inside the lane's VM.

    from vm import nfs

    with nfs.cluster(tmp_path, nodes=("node-a", "node-b"), delay_us=250) as c:
        a, b = c.nodes
        a.mount                  # node A's NFSv4.2 mount of the export, a directory
        a.rpc_calls()            # RPCs node A's NFS client has sent (/proc/net/rpc/nfs)
        c.server_io()            # bytes read and written by the server (/proc/net/rpc/nfsd)
        with a.cut():            # node A's cable pulled: no packet in or out until the block ends
            ...

The recipe of shared/reference/two-nodes-on-nfs.md, with each step undone on the way out:
the server (nfsd, rpcbind, rpc.mountd) runs in the VM's own network namespace and exports a
tmpfs; each node is a network namespace joined to it by a veth pair (10.77.N.2 <-> 10.77.N.1),
whose NFS client mounts the export from inside that namespace **under a hostname of its own**
(two clients with one hostname are one NFSv4 client to the server, and their locks do not
exclude each other). The mounts are made in the VM's mount namespace (only the network one is
entered), so every process here sees every node's mount, each at its own path, and I/O through
a node's path goes through that node's client. `delay_us` puts netem on both ends of each veth.

One cluster at a time: the kernel has one NFS server per network namespace. Everything here
runs as root, in the lane only (the host kernel has neither NFS nor veth).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, NamedTuple

NFSD = Path("/proc/fs/nfsd")
STATE = Path("/var/lib/nfs")
PIPEFS = STATE / "rpc_pipefs"
SUBNET = "10.77"
NFS_PORT = 2049
TIMEOUT = 60.0
# rw, root may write (the driver runs as root), fsid=0: the export is the NFSv4 pseudo-root, so
# nodes mount "<server>:/". sync: the server commits before answering, as real servers do.
EXPORT_OPTIONS = "rw,no_root_squash,fsid=0,insecure,no_subtree_check,sync"


class NfsError(RuntimeError):
    pass


class RpcStats(NamedTuple):
    calls: int       # RPCs sent ("rpc" line of /proc/net/rpc/nfs)
    retrans: int


class ServerIO(NamedTuple):
    read: int        # bytes the server read for clients ("io" line of /proc/net/rpc/nfsd)
    written: int     # bytes clients wrote to the server


def run(*cmd: str | os.PathLike, check: bool = True, timeout: float = TIMEOUT
        ) -> subprocess.CompletedProcess:
    result = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise NfsError(f"{' '.join(map(os.fspath, cmd))}: exit {result.returncode}: "
                       f"{(result.stderr or result.stdout).strip()}")
    return result


def _wait(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise NfsError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def is_mount_point(path: os.PathLike | str) -> bool:
    path = os.fspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[4] == path for line in f)


def drop_caches() -> None:
    """Write back everything dirty, then drop clean page, dentry and inode caches, in the whole
    VM: an NFS client then knows no file until it asks the server again. (The server's export
    is a tmpfs, whose pages are not caches and stay.)"""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Node:
    """One NFS client in a network namespace of its own, joined to the server by a veth pair."""

    def __init__(self, name: str, index: int, mount: Path):
        self.name = name                    # also its hostname, so its NFSv4 client identity
        self.netns = f"fbnfs-{name}"
        self.host_veth = f"fbnfs{index}h"   # the server's end
        self.node_veth = f"fbnfs{index}n"
        self.server_address = f"{SUBNET}.{index}.1"
        self.address = f"{SUBNET}.{index}.2"
        self.mount = mount
        self._cut = False

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.address}, mount={str(self.mount)!r})"

    def command(self, *cmd: str | os.PathLike) -> list[str]:
        """*cmd* run in this node's network namespace (and the VM's mount namespace)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", *map(os.fspath, cmd)]

    def run(self, *cmd: str | os.PathLike, check: bool = True, timeout: float = TIMEOUT
            ) -> subprocess.CompletedProcess:
        return run(*self.command(*cmd), check=check, timeout=timeout)

    def rpc_stats(self) -> RpcStats:
        """The NFS client's RPC counters, read in this node's namespace. (Before Linux 6.9 the
        NFS client's counters are one set for the whole kernel, whatever the namespace.)"""
        text = self.run("cat", "/proc/net/rpc/nfs").stdout
        fields = next(line.split() for line in text.splitlines() if line.startswith("rpc "))
        return RpcStats(int(fields[1]), int(fields[2]))

    def rpc_calls(self) -> int:
        return self.rpc_stats().calls

    def op_counts(self) -> dict[str, int]:
        """Operations sent through this node's mount, by name (/proc/self/mountstats)."""
        counts: dict[str, int] = {}
        mine = False
        with open("/proc/self/mountstats", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("device "):
                    mine = f" mounted on {self.mount} with fstype nfs" in line
                elif mine and re.match(r"\s+[A-Z_0-9]+: \d+ ", line):
                    name, numbers = line.split(":", 1)
                    if int(numbers.split()[0]):
                        counts[name.strip()] = int(numbers.split()[0])
        return counts

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """Pull this node's cable (its veth down at the server's end) until the block ends."""
        run("ip", "link", "set", self.host_veth, "down")
        self._cut = True
        try:
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        if self._cut:
            run("ip", "link", "set", self.host_veth, "up")
            self._cut = False


class Cluster(NamedTuple):
    export: Path         # the exported tmpfs, as the server sees it
    nodes: tuple[Node, ...]

    @staticmethod
    def server_io() -> ServerIO:
        text = (Path("/proc/net/rpc/nfsd")).read_text()
        fields = next(line.split() for line in text.splitlines() if line.startswith("io "))
        return ServerIO(int(fields[1]), int(fields[2]))


# -- the server -----------------------------------------------------------------------------
def _mount_once(stack: contextlib.ExitStack, fs_type: str, source: str, target: Path) -> None:
    """Mount *fs_type* at *target* unless something is mounted there; unmounted on exit if we
    mounted it."""
    if is_mount_point(target):
        return
    target.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", fs_type, source, target)
    stack.callback(run, "umount", target, check=False)


def _set_nfsd_value(stack: contextlib.ExitStack, name: str, value: int) -> None:
    """A tunable of the (stopped) server, its old value restored on exit."""
    path = NFSD / name
    old = path.read_text().strip()
    path.write_text(f"{value}\n")
    stack.callback(path.write_text, f"{old}\n")


def _daemon(stack: contextlib.ExitStack, log: Path, *cmd: str) -> None:
    """Start a server daemon in the foreground, as our child; SIGTERM (then SIGKILL) on exit."""
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    out.close()

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    time.sleep(0.05)
    if proc.poll() is not None:
        raise NfsError(f"{cmd[0]} exited at once ({proc.returncode}); see {log}")


def _serve(stack: contextlib.ExitStack, export: Path, log: Path, lease_seconds: int | None,
           max_block_size: int | None) -> None:
    run("modprobe", "-a", "nfsd", "nfsv4", "veth")
    _mount_once(stack, "nfsd", "nfsd", NFSD)
    if int((NFSD / "threads").read_text() or "0") != 0:
        raise NfsError("an NFS server is already running in this VM (one cluster at a time)")
    for sub in ("v4recovery", "rpc_pipefs"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    for table in ("etab", "rmtab", "xtab"):
        (STATE / table).touch()
    _mount_once(stack, "rpc_pipefs", "sunrpc", PIPEFS)
    if lease_seconds is not None:
        # The server holds a dead client's locks this long; settable only while it is stopped.
        _set_nfsd_value(stack, "nfsv4leasetime", lease_seconds)
        _set_nfsd_value(stack, "nfsv4gracetime", lease_seconds)
    if max_block_size is not None:
        # The largest READ/WRITE the server offers (the clients' rsize and wsize): nfsd picks
        # 1/4096 of the RAM, 256 KiB in this VM; 1 MiB, the most, from 4 GiB up.
        _set_nfsd_value(stack, "max_block_size", max_block_size)

    export.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "flexblock-nfs-export", export)
    stack.callback(run, "umount", export, check=False)
    client = f"{SUBNET}.0.0/16:{export}"
    run("exportfs", "-o", EXPORT_OPTIONS, client)
    stack.callback(run, "exportfs", "-u", client, check=False)

    _daemon(stack, log, "rpcbind", "-f")
    _wait(lambda: run("rpcinfo", "-p", "127.0.0.1", check=False).returncode == 0, "rpcbind")
    _daemon(stack, log, "rpc.mountd", "-F")
    # NFSv4 only: with v3 on, nfsd starts lockd, whose own grace period (50 s) refuses every
    # NFSv4 lock too (NFS4ERR_GRACE), and v4_end_grace does not end it.
    run("rpc.nfsd", "--no-nfs-version", "3", "8")
    # Stopping the threads also drops every client's state (opens, locks) of this server.
    stack.callback(run, "rpc.nfsd", "0", check=False)
    _wait(lambda: f"{NFS_PORT}" in (NFSD / "portlist").read_text(), "nfsd's port")
    # A server that just started refuses new locks for its grace period (reclaims only); none
    # of our clients has state to reclaim.
    (NFSD / "v4_end_grace").write_text("Y\n")


# -- the nodes ------------------------------------------------------------------------------
def _netns(stack: contextlib.ExitStack, node: Node, delay_us: int) -> None:
    run("ip", "netns", "add", node.netns)
    stack.callback(run, "ip", "netns", "delete", node.netns, check=False)
    run("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", node.node_veth,
        "netns", node.netns)
    stack.callback(run, "ip", "link", "delete", node.host_veth, check=False)
    run("ip", "addr", "add", f"{node.server_address}/24", "dev", node.host_veth)
    run("ip", "link", "set", node.host_veth, "up")
    node.run("ip", "addr", "add", f"{node.address}/24", "dev", node.node_veth)
    node.run("ip", "link", "set", node.node_veth, "up")
    node.run("ip", "link", "set", "lo", "up")
    if delay_us:
        run("tc", "qdisc", "add", "dev", node.host_veth, "root", "netem", "delay",
            f"{delay_us}us")
        node.run("tc", "qdisc", "add", "dev", node.node_veth, "root", "netem", "delay",
                 f"{delay_us}us")


def _mount_node(stack: contextlib.ExitStack, node: Node) -> None:
    node.mount.mkdir(parents=True, exist_ok=True)
    # unshare --uts: the client takes its NFSv4 identity from the hostname at mount time.
    node.run("unshare", "--uts", "sh", "-c", 'hostname "$1" && exec mount -t nfs4 -o "$2" '
             '"$3:/" "$4"', "sh", node.name, "vers=4.2", node.server_address, node.mount)
    stack.callback(_unmount_node, node)


def _unmount_node(node: Node) -> None:
    node.restore()
    if not is_mount_point(node.mount):
        return  # a test's own cleanup unmounted it
    if run("umount", node.mount, check=False).returncode != 0:
        # Busy: something of a failed test still holds it. Detach it from the tree so the
        # server can stop; the kernel frees it when the last user lets go.
        run("umount", "-l", node.mount, check=False)
        raise NfsError(f"{node.mount} was busy at teardown (unmounted lazily)")


@contextlib.contextmanager
def cluster(root: Path, nodes: tuple[str, ...] = ("node-a", "node-b"), *, delay_us: int = 0,
            lease_seconds: int | None = None, max_block_size: int | None = None
            ) -> Iterator[Cluster]:
    """A server exporting a tmpfs at root/export and a node per name, each with its NFSv4.2
    mount at root/<name>; all of it torn down on exit, pass or fail.

    delay_us: netem delay on each end of every node's veth (so the round trip gains twice it).
    lease_seconds: the server's NFSv4 lease (and grace) time, 10 or more; None keeps the
    kernel's (90 s).
    max_block_size: the server's largest READ and WRITE in bytes; None keeps nfsd's choice.
    """
    root = Path(root)
    with contextlib.ExitStack() as stack:
        if delay_us:
            run("modprobe", "sch_netem")
        _serve(stack, root / "export", root / "nfs-server.log", lease_seconds, max_block_size)
        members = tuple(Node(name, i, root / name) for i, name in enumerate(nodes, start=1))
        for node in members:
            _netns(stack, node, delay_us)
            _mount_node(stack, node)
        yield Cluster(root / "export", members)


def clients() -> list[str]:
    """The NFSv4 client identities the server knows (/proc/fs/nfsd/clients/*/info)."""
    found = []
    for info in sorted((NFSD / "clients").glob("*/info")):
        match = re.search(r'^name: "(.*)"$', info.read_text(), re.MULTILINE)
        if match:
            found.append(match.group(1))
    return found
