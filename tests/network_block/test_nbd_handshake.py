"""The NBD handshake against real servers on the host (qemu-nbd, nbdkit), and against a
scripted server for what no packaged server does on request (refusing NBD_OPT_GO, breaking the
protocol). No kernel NBD is involved: the host has none (see the VM lane for that)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from nbd import client, handshake
from nbd.errors import HandshakeError, NbdError, ServerError
from nbd.handshake import (ERR_UNSUP, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC,
                           OPT_EXPORT_NAME, OPT_GO, REP_ACK, REP_INFO, REPLY_MAGIC)
from nbd._ffi import lib

MiB = 1 << 20


def _wait_for_socket(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"server socket {path} never appeared")


@pytest.fixture
def serve(tmp_path):
    """Start a server (argv with {sock} for its unix socket path) for one test; always killed."""
    procs = []

    def start(*argv: str) -> str:
        sock = str(tmp_path / f"s{len(procs)}.sock")
        if shutil.which(argv[0]) is None:
            pytest.fail(f"{argv[0]} is not installed (make test installs it)")
        proc = subprocess.Popen([a.format(sock=sock) for a in argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        _wait_for_socket(sock, proc)
        return sock

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _connect(path: str) -> socket.socket:
    return client.open_connection(path)


def test_go_with_qemu_nbd(serve, tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    sock_path = serve("qemu-nbd", "--persistent", "--socket={sock}", "--format=qcow2",
                      "--export-name=vol", str(image))
    with _connect(sock_path) as sock:
        export = handshake.handshake(sock, "vol")
    assert export.name == "vol"
    assert export.size == 64 * MiB
    assert export.flags & lib.NBD_FLAG_HAS_FLAGS
    assert export.flags & lib.NBD_FLAG_SEND_FLUSH
    assert export.flags & lib.NBD_FLAG_SEND_TRIM  # qemu-nbd advertises trim with discard
    assert export.min_block <= 512 and export.max_block >= 4096
    assert client.block_size_for(export) == 512


def test_unknown_export_surfaces_the_servers_words(serve, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * MiB)
    sock_path = serve("qemu-nbd", "--persistent", "--socket={sock}", "--format=raw",
                      "--export-name=vol", str(image))
    with _connect(sock_path) as sock, pytest.raises(ServerError) as caught:
        handshake.handshake(sock, "nope")
    assert caught.value.reply == "ERR_UNKNOWN"
    assert "nope" in str(caught.value)  # qemu-nbd's own text names the export


# nbdkit's --mask-handshake clears handshake flags: without FIXED_NEWSTYLE (0, 2) a client may
# only send NBD_OPT_EXPORT_NAME, whose reply carries 124 zero bytes unless both sides agreed on
# NO_ZEROES (2, 3); with it (1, 3) we use NBD_OPT_GO.
@pytest.mark.parametrize("mask", ["0", "1", "2", "3"], ids=[
    "newstyle", "fixed-newstyle", "newstyle+no-zeroes", "fixed-newstyle+no-zeroes"])
def test_every_newstyle_variant_of_nbdkit(serve, mask):
    sock_path = serve("nbdkit", "--foreground", "--unix={sock}", f"--mask-handshake={mask}",
                      "memory", "32M")
    with _connect(sock_path) as sock:
        export = handshake.handshake(sock)
        assert export.size == 32 * MiB
        # Nothing of the transmission phase may be left unread: the server is silent now.
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_oldstyle_server_is_refused(serve):
    sock_path = serve("nbdkit", "--foreground", "--unix={sock}", "--oldstyle", "memory", "1M")
    with _connect(sock_path) as sock, pytest.raises(HandshakeError, match="oldstyle"):
        handshake.handshake(sock)


# -- a scripted server: only for behaviour no packaged server shows on request ---------------
def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "client closed early"
        data += chunk
    return data


def _reply(option, kind, payload=b""):
    return struct.pack(">QIII", REPLY_MAGIC, option, kind, len(payload)) + payload


def _scripted(script):
    """A socketpair whose far end greets as a fixed-newstyle server and then runs *script*."""
    ours, theirs = socket.socketpair()

    def run():
        with theirs:
            theirs.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
            _recv_exact(theirs, 4)  # client flags
            script(theirs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return ours, thread


def _read_option(sock):
    magic, option, length = struct.unpack(">QII", _recv_exact(sock, 16))
    assert magic == IHAVEOPT
    return option, _recv_exact(sock, length)


def test_falls_back_to_export_name_on_err_unsup():
    seen = []

    def old_server(sock):
        option, _ = _read_option(sock)
        seen.append(option)
        sock.sendall(_reply(option, ERR_UNSUP))
        option, name = _read_option(sock)
        seen.append((option, name))
        sock.sendall(struct.pack(">QH", 8 * MiB, 1))  # NO_ZEROES was agreed: no padding

    sock, thread = _scripted(old_server)
    with sock:
        export = handshake.handshake(sock, "disk")
    thread.join(5)
    assert seen == [OPT_GO, (OPT_EXPORT_NAME, b"disk")]
    assert export.size == 8 * MiB and export.name == "disk"


def test_go_asks_for_block_size_and_ignores_unknown_info():
    def server(sock):
        option, payload = _read_option(sock)
        assert option == OPT_GO
        name_len, = struct.unpack_from(">I", payload)
        count, info = struct.unpack_from(">HH", payload, 4 + name_len)
        assert (count, info) == (1, INFO_BLOCK_SIZE)
        # A large info of a type we do not know: nbd-client skips payloads >= 4096 bytes and
        # loses sync; we must consume it exactly.
        sock.sendall(_reply(OPT_GO, REP_INFO, struct.pack(">H", 99) + b"x" * 5000))
        sock.sendall(_reply(OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, 4 * MiB, 1)))
        sock.sendall(_reply(OPT_GO, REP_INFO,
                            struct.pack(">HIII", INFO_BLOCK_SIZE, 4096, 4096, 1 << 20)))
        sock.sendall(_reply(OPT_GO, REP_ACK))

    sock, thread = _scripted(server)
    with sock:
        export = handshake.handshake(sock)
    thread.join(5)
    assert (export.size, export.min_block, export.preferred_block) == (4 * MiB, 4096, 4096)
    assert client.block_size_for(export) == 4096


@pytest.mark.parametrize("bad", ["magic", "option", "export-length", "ack-without-export"])
def test_strict_reply_parsing(bad):
    def server(sock):
        _read_option(sock)
        if bad == "magic":
            sock.sendall(struct.pack(">QIII", 0x1234, OPT_GO, REP_ACK, 0))
        elif bad == "option":
            sock.sendall(_reply(OPT_EXPORT_NAME, REP_ACK))
        elif bad == "export-length":
            sock.sendall(_reply(OPT_GO, REP_INFO, struct.pack(">HQ", INFO_EXPORT, 1)))
        else:
            sock.sendall(_reply(OPT_GO, REP_ACK))

    sock, thread = _scripted(server)
    with sock, pytest.raises(HandshakeError):
        handshake.handshake(sock)
    thread.join(5)


def test_not_an_nbd_server():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        with pytest.raises(HandshakeError, match="not an NBD server"):
            handshake.handshake(ours)


def test_connection_to_nothing_is_a_typed_error(tmp_path):
    with pytest.raises(NbdError) as caught:
        client.open_connection(str(tmp_path / "absent.sock"))
    assert caught.value.filename == str(tmp_path / "absent.sock")
