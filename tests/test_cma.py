"""Same-host clients through the server's unix socket: cma (the server copies blocks straight from
and into the client's memory) where the kernel lets it, the socket stream where it does not."""
import ctypes
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, Agent, recv_exactly
from memkv_nixl import AuthError, Client, Status
from memkv_nixl.protocol import (CMA_PROBE, FRAME, HELLO, HELLO_CMA, REQ_DESC, VERSION, FrameFlag,
                                 Op, auth_mac, pack_frame)

KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 64 * KiB + 24, 1 * MiB, 5 * MiB + 4096, 16 * MiB]


def payload(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)


def counters(client):
    (st,) = client.stats().values()
    return st["counters"]


@pytest.fixture
def unix_server(memkv_server):
    return memkv_server(unix=True, capacity="512MiB")


def test_round_trips_of_many_sizes_and_buffer_kinds_use_cma(unix_server):
    blocks = [payload(n, n) for n in SIZES]
    keys = [f"cma/{n}".encode() for n in SIZES]
    with Client([unix_server.unix_endpoint], namespace="c") as c:
        assert c.put(keys, blocks) == [Status.OK] * len(SIZES)
        # tensors, bytearrays, mmaps and raw (address, length) pairs all land in place
        outs = [torch.zeros(SIZES[0], dtype=torch.uint8), bytearray(SIZES[1]), mmap.mmap(-1, SIZES[2]),
                torch.zeros(SIZES[3], dtype=torch.uint8)]
        raw = torch.zeros(SIZES[4], dtype=torch.uint8)
        lengths = []
        got = c.get(keys, [*outs, (raw.data_ptr(), raw.numel())], lengths=lengths)
        assert got == [Status.OK] * len(SIZES) and lengths == SIZES
        for want, out in zip(blocks, [*outs, raw]):
            got_bytes = out.numpy().tobytes() if isinstance(out, torch.Tensor) else bytes(out)
            assert got_bytes == want.numpy().tobytes()
        assert counters(c)["cma_connections"] >= 1
        # a buffer larger than the block is fine; a smaller one is refused, untouched
        small = bytearray(b"\x7f" * 100)
        assert c.get([keys[0]], [small]) == [Status.BUFFER_TOO_SMALL] and small == b"\x7f" * 100
        assert c.get([b"cma/none"], [bytearray(10)]) == [Status.MISS]


def test_blocks_are_shared_between_cma_and_tcp_clients(unix_server):
    a, b = payload(3 * MiB, 1), payload(3 * MiB, 2)
    with Client([unix_server.unix_endpoint], namespace="s") as local, \
            Client([unix_server.endpoint], namespace="s") as remote:
        assert local.put([b"from-cma"], [a]) == [Status.OK]
        assert remote.put([b"from-tcp"], [b]) == [Status.OK]
        out = torch.zeros(3 * MiB, dtype=torch.uint8)
        assert remote.get([b"from-cma"], [out]) == [Status.OK] and torch.equal(out, a)
        assert local.get([b"from-tcp"], [out]) == [Status.OK] and torch.equal(out, b)
        assert "cma_connections" not in counters(remote) or counters(remote)["cma_connections"] >= 1


def test_a_buffer_the_client_does_not_have_fails_only_its_key(unix_server):
    good = payload(1 * MiB, 3)
    unmapped = (1 << 46, 1 * MiB)  # no process maps this address
    with Client([unix_server.unix_endpoint], namespace="f") as c:
        assert c.put([b"good", b"bad"], [good, unmapped]) == [Status.OK, Status.BAD_REQUEST]
        assert c.exists([b"good", b"bad"]) == [True, False]  # nothing half-written was committed
        out = torch.zeros(1 * MiB, dtype=torch.uint8)
        assert c.get([b"good", b"good"], [unmapped, out]) == [Status.BAD_REQUEST, Status.OK]
        assert torch.equal(out, good)
        assert c.get([b"good"], [out]) == [Status.OK]  # the block itself is untouched
        # a large block is copied in pieces by several threads: a hole in the middle of the
        # buffer fails that key alone too
        big = payload(16 * MiB, 5)
        assert c.put([b"big"], [big]) == [Status.OK]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        addr = _holey_buffer(libc, 16 * MiB, 6 * MiB, 4 * MiB)
        try:
            assert c.get([b"big"], [(addr, 16 * MiB)]) == [Status.BAD_REQUEST]
        finally:
            libc.munmap(addr, 16 * MiB)
        out = torch.zeros(16 * MiB, dtype=torch.uint8)
        assert c.get([b"big"], [out]) == [Status.OK] and torch.equal(out, big)
    assert "Traceback" not in unix_server.log()


def _holey_buffer(libc, size, hole_at, hole_len):
    """An anonymous mapping of size bytes with [hole_at, hole_at + hole_len) unmapped."""
    addr = libc.mmap(None, size, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value)
    libc.munmap(addr + hole_at, hole_len)
    return addr


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_hole_in_a_large_put_source_fails_only_its_key(memkv_server, durability):
    """Large puts are pulled from the client in pieces by several threads (async: the next
    block's pieces while this one is hashed): a hole in one source fails that key alone."""
    s = memkv_server(unix=True, durability=durability, extra=["--ram-cache", "128MiB"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    a, b = payload(16 * MiB, 7), payload(16 * MiB, 8)
    with Client([s.unix_endpoint], namespace="h") as c:
        while not next(iter(c.stats().values()))["ram_cache"]["ready"]:
            time.sleep(0.05)  # write-behind starts once the cache is faulted in
        addr = _holey_buffer(libc, 16 * MiB, 9 * MiB, 2 * MiB)
        try:
            st = c.put([b"a", b"holey", b"b"], [a, (addr, 16 * MiB), b])
        finally:
            libc.munmap(addr, 16 * MiB)
        assert st == [Status.OK, Status.BAD_REQUEST, Status.OK]
        assert c.exists([b"a", b"holey", b"b"]) == [True, False, True]
        out = [torch.zeros(16 * MiB, dtype=torch.uint8) for _ in range(2)]
        assert c.get([b"a", b"b"], out) == [Status.OK] * 2
        assert torch.equal(out[0], a) and torch.equal(out[1], b)
        if durability == "async":
            assert counters(c)["put_written_behind"] == 3
    s.restart()
    with Client([s.unix_endpoint], namespace="h") as c:
        out = [torch.zeros(16 * MiB, dtype=torch.uint8) for _ in range(3)]
        assert c.get([b"a", b"holey", b"b"], out) == [Status.OK, Status.MISS, Status.OK]
        assert torch.equal(out[0], a) and torch.equal(out[2], b)
    assert "Traceback" not in s.log()


def test_corrupt_record_read_through_cma_is_a_miss(memkv_server):
    s = memkv_server(unix=True, extra=["--ram-cache", "0"])
    block = payload(256 * KiB, 4)
    with Client([s.unix_endpoint], namespace="x") as c:
        assert c.put([b"k"], [block]) == [Status.OK]
    s.flip_payload_byte(1000)
    with Client([s.unix_endpoint], namespace="x") as c:
        out = torch.zeros(256 * KiB, dtype=torch.uint8)
        assert c.get([b"k"], [out]) == [Status.MISS]
        assert counters(c).get("get_corrupt") == 1


REFUSED_CLIENT = r"""
import ctypes, json, logging, sys
logging.basicConfig(level=logging.WARNING)
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: only a CAP_SYS_PTRACE holder may reach us
from memkv_nixl import Client
c = Client([sys.argv[1]], namespace="r")
data = bytes(range(256)) * 4096
st = c.put([b"r"], [data])
out = bytearray(len(data))
st += c.get([b"r"], [out])
print(json.dumps({"status": [s.name for s in st], "equal": bytes(out) == data}))
"""


def test_client_the_server_may_not_reach_falls_back_to_the_socket(memkv_server):
    # without CAP_SYS_PTRACE the server may not read a non-dumpable process: a real refusal
    prefix = ["setpriv", "--bounding-set=-sys_ptrace"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to start the server without CAP_SYS_PTRACE")
    s = memkv_server(unix=True, prefix=prefix)
    r = subprocess.run([sys.executable, "-c", REFUSED_CLIENT, s.unix_endpoint], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"status": ["OK", "OK"], "equal": True}
    assert "did not grant same-host copies (cma)" in r.stderr
    assert "cma refused (Operation not permitted" in s.log()
    with Client([s.endpoint], namespace="r", same_host=False) as c:
        assert counters(c)["cma_refused"] == 1


TURNS_NON_DUMPABLE = r"""
import ctypes, json, logging, sys
logging.basicConfig(level=logging.WARNING)
from memkv_nixl import Client
c = Client([sys.argv[1]], namespace="d")
data = bytes(range(256)) * 4096
first = c.put([b"before"], [data])      # cma granted: the server copies from this process
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # as a setuid exec does: no longer dumpable
second = c.put([b"after"], [data])      # the old grant must not reach this process any more
out = bytearray(len(data))
got = c.get([b"after"], [out])
print(json.dumps({"put": [first[0].name, second[0].name], "get": got[0].name,
                  "equal": bytes(out) == data}))
"""


def test_a_grant_does_not_outlive_what_the_kernel_allows(unix_server):
    # the server runs without CAP_SYS_PTRACE in effect (even as root): once the client is no longer
    # dumpable, as after exec of a setuid program, copies fail and the client goes on over the socket
    r = subprocess.run([sys.executable, "-c", TURNS_NON_DUMPABLE, unix_server.unix_endpoint],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"put": ["OK", "OK"], "get": "OK", "equal": True}
    assert "copy from client: Operation not permitted" in unix_server.log()
    with Client([unix_server.endpoint], namespace="d", same_host=False) as c:
        assert counters(c)["cma_refused"] >= 1


def test_listen_unix_never_replaces_a_file_that_is_not_a_socket(memkv_server, tmp_path):
    keep = tmp_path / "precious"
    keep.write_text("data")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        memkv_server(extra=["--listen-unix", str(keep)])
    assert keep.read_text() == "data"


def _raw_unix_handshake(path, probe_addr, probe_value):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    ns = b"raw"
    body = HELLO.pack(VERSION, len(ns), HELLO_CMA) + ns + CMA_PROBE.pack(probe_addr, probe_value)
    sock.sendall(pack_frame(Op.HELLO, body_len=len(body)) + body)
    hdr = recv_exactly(sock, FRAME.size)
    challenge = recv_exactly(sock, int.from_bytes(hdr[24:32], "little"))
    sock.sendall(pack_frame(Op.AUTH, body_len=32) + auth_mac(b"", challenge[32:64], ns))
    recv_exactly(sock, FRAME.size)
    return sock, challenge[3]


def test_a_probe_that_does_not_match_gets_no_cma_and_cma_frames_are_refused(unix_server):
    # the probe names memory whose value is not what the client claims: no cma for it
    sock, features = _raw_unix_handshake(unix_server.socket_path, 1 << 46, 42)
    assert features == 0
    key = b"x"
    desc = REQ_DESC.pack(4096, 0, 0, len(key), 0)
    body = desc + key + (1 << 46).to_bytes(8, "little")
    sock.sendall(pack_frame(Op.PUT, flags=FrameFlag.CMA, count=1, keys_len=1, body_len=len(body)) + body)
    hdr = recv_exactly(sock, FRAME.size)
    text = recv_exactly(sock, int.from_bytes(hdr[24:32], "little")).decode()
    assert hdr[4] == Op.ERROR and "CMA frame flag on a connection without cma" in text
    sock.close()
    with Client([unix_server.unix_endpoint], namespace="c") as c:  # others are served as before
        assert c.put([b"after"], [bytes(4096)]) == [Status.OK]


def test_nixl_agent_reads_and_writes_through_the_unix_endpoint(unix_server):
    agent = Agent()
    agent.memkv(unix_server, endpoints=unix_server.unix_endpoint)
    n, size = 6, 2 * MiB
    src = torch.stack([payload(size, 10 + i) for i in range(n)])
    dst = torch.zeros(n, size, dtype=torch.uint8)
    keys = [f"nixl-cma/{i}" for i in range(n)]
    agent.register_memory([(t.data_ptr(), t.numel(), 0, "") for t in (src, dst)], "DRAM", backends=["MEMKV"])
    agent.register_memory([(0, size, i, k) for i, k in enumerate(keys)], "OBJ", backends=["MEMKV"])
    remote = agent.get_xfer_descs([(0, size, i) for i in range(n)], "OBJ")
    lsrc = agent.get_xfer_descs([(src[i].data_ptr(), size, 0) for i in range(n)], "DRAM")
    ldst = agent.get_xfer_descs([(dst[i].data_ptr(), size, 0) for i in range(n)], "DRAM")
    assert agent.xfer("WRITE", lsrc, remote) == "DONE"
    assert agent.xfer("READ", ldst, remote) == "DONE"
    assert torch.equal(src, dst)
    with Client([unix_server.unix_endpoint], namespace="nixl-test") as c:
        assert counters(c)["cma_connections"] >= 2  # the plugin's connection and this one


def test_tcp_client_on_the_same_host_moves_to_the_unix_socket(unix_server):
    block = payload(4 * MiB, 7)
    with Client([unix_server.endpoint], namespace="u") as c:  # memkv://127.0.0.1:port
        assert c.put([b"k"], [block]) == [Status.OK]
        out = torch.zeros(4 * MiB, dtype=torch.uint8)
        assert c.get([b"k"], [out]) == [Status.OK] and torch.equal(out, block)
        assert counters(c)["cma_connections"] >= 1
        assert c.endpoints == [unix_server.address]  # placement still names the TCP endpoint
    with Client([unix_server.endpoint], namespace="u", same_host=False) as c:
        before = counters(c).get("cma_connections", 0)
        assert c.get([b"k"], [out]) == [Status.OK] and torch.equal(out, block)
        assert counters(c).get("cma_connections", 0) == before  # stayed on TCP


def test_server_without_a_unix_socket_serves_tcp_only(server):
    with server.client() as c:
        assert c.put([b"k"], [bytes(8192)]) == [Status.OK]
        assert "cma_connections" not in counters(c)


def test_nixl_agent_with_a_tcp_endpoint_moves_to_the_unix_socket(unix_server):
    agent = Agent()
    agent.memkv(unix_server)  # memkv://127.0.0.1:port
    src = payload(1 * MiB, 8).reshape(1, -1)
    dst = torch.zeros_like(src)
    agent.register_memory([(t.data_ptr(), t.numel(), 0, "") for t in (src, dst)], "DRAM", backends=["MEMKV"])
    agent.register_memory([(0, 1 * MiB, 0, "nixl-up")], "OBJ", backends=["MEMKV"])
    remote = agent.get_xfer_descs([(0, 1 * MiB, 0)], "OBJ")
    assert agent.xfer("WRITE", agent.get_xfer_descs([(src.data_ptr(), 1 * MiB, 0)], "DRAM"), remote) == "DONE"
    assert agent.xfer("READ", agent.get_xfer_descs([(dst.data_ptr(), 1 * MiB, 0)], "DRAM"), remote) == "DONE"
    assert torch.equal(src, dst)
    with Client([unix_server.endpoint], namespace="nixl-test", same_host=False) as c:
        assert counters(c)["cma_connections"] >= 1  # the plugin's connection


def test_the_secret_guards_the_unix_socket_too(memkv_server, tmp_path):
    secret, wrong = tmp_path / "secret", tmp_path / "wrong"
    secret.write_text(os.urandom(16).hex())
    wrong.write_text("not-the-secret")
    s = memkv_server(unix=True, extra=["--secret-file", str(secret)])
    with Client([s.unix_endpoint], namespace="a", secret_file=str(wrong)) as c:
        with pytest.raises(AuthError, match="authentication failed"):
            c.put([b"k"], [bytes(4096)])
    with Client([s.endpoint], namespace="a", secret_file=str(secret)) as c:  # moves to the socket
        assert c.put([b"k"], [bytes(4096)]) == [Status.OK]
        assert counters(c)["cma_connections"] >= 1


def test_a_server_listens_beside_its_data_by_default_and_the_cli_uses_it(memkv_server, tmp_path):
    s = memkv_server(unix="default")
    src = tmp_path / "in"
    src.write_bytes(os.urandom(100_000))
    memkv = [sys.executable, "-m", "memkv_nixl.cli"]
    ep = ["--endpoint", s.unix_endpoint]
    for args in (["put", "k", str(src)], ["get", "k", str(tmp_path / "out")]):
        r = subprocess.run([*memkv, *args, *ep], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    with Client([s.unix_endpoint], namespace="default") as c:
        assert counters(c)["cma_connections"] >= 2
