"""Many clients at once, in threads and in separate processes, each gets its own bytes back."""
import os
import subprocess
import sys
import threading

from conftest import in_threads
from memkv_nixl import Client, Status

CHILD = r"""
import os, sys
from memkv_nixl import Client, Status
ep, worker = sys.argv[1], int(sys.argv[2])
with Client([ep], namespace="conc") as c:
    for r in range(5):
        keys = [f"p{worker}/{r}/{i}".encode() for i in range(16)]
        data = [os.urandom(8192 + 4096 * (i % 4)) for i in range(16)]
        assert c.put(keys, data) == [Status.OK] * 16
        bufs = [bytearray(len(d)) for d in data]
        assert c.get(keys, bufs) == [Status.OK] * 16
        assert [bytes(b) for b in bufs] == data
print("ok")
"""


def test_many_concurrent_clients_threads_and_processes(server):
    def worker(w):
        with Client([server.endpoint], namespace="conc") as c:
            for r in range(10):
                keys = [f"t{w}/{r}/{i}".encode() for i in range(8)]
                data = [os.urandom(65536) for _ in keys]
                assert c.put(keys, data) == [Status.OK] * 8
                bufs = [bytearray(65536) for _ in keys]
                assert c.get(keys, bufs) == [Status.OK] * 8
                assert [bytes(b) for b in bufs] == data

    procs = [subprocess.Popen([sys.executable, "-c", CHILD, server.endpoint, str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in range(6)]
    errors = in_threads(worker, 16)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == b"ok", err.decode()[-2000:]
    assert not errors, errors[:3]


def test_one_client_shared_by_threads(server):
    with Client([server.endpoint], namespace="shared") as c:
        results = []

        def worker(w):
            data = os.urandom(4096)
            c.put([f"s{w}".encode()], [data])
            out = bytearray(4096)
            results.append(c.get([f"s{w}".encode()], [out]) == [Status.OK] and bytes(out) == data)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 24


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_idle_connections_hold_no_staging_memory(memkv_server):
    """16 connections each put and get 32 MiB batches at once, then stay open, idle: the server
    keeps at most --staging-memory of staging buffers (before, each connection kept its own,
    16 x 32 MiB here), and every byte comes back equal."""
    s = memkv_server(capacity="1GiB", extra=["--staging-memory", "64MiB"])
    base = _rss_mib(s.proc.pid)
    MiB = 1 << 20
    clients = [Client([s.endpoint], namespace="idle") for _ in range(16)]

    def worker(w):
        keys = [f"i{w}/{j}".encode() for j in range(4)]
        data = [os.urandom(8 * MiB) for _ in keys]
        assert clients[w].put(keys, data) == [Status.OK] * 4
        bufs = [bytearray(8 * MiB) for _ in keys]
        assert clients[w].get(keys, bufs) == [Status.OK] * 4
        assert [bytes(b) for b in bufs] == data

    errors = in_threads(worker, 16)
    assert not errors, errors[:3]
    staging = clients[0].stats()[s.address]["staging"]
    assert staging["allocated_bytes"] == staging["kept_bytes"] <= 64 * MiB, staging
    assert _rss_mib(s.proc.pid) - base < 64 + 96, "the idle connections kept their buffers"
    for c in clients:
        c.close()
