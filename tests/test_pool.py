"""Several servers form one pool: rendezvous placement, concurrent fan-out, dead servers = misses."""
import logging
import os

from memkv_nixl import Client, Status


def test_batch_spans_servers_and_a_killed_one_turns_into_misses(memkv_server, caplog):
    servers = [memkv_server(f"s{i}") for i in range(3)]
    keys = [f"pool/{i}".encode() for i in range(90)]
    data = [os.urandom(8192) for _ in keys]
    with Client([s.endpoint for s in servers], namespace="pool", timeout=5) as c:
        assert c.put(keys, data) == [Status.OK] * len(keys)
        owners = [c.server_of(k) for k in keys]
        assert len(set(owners)) == 3, "rendezvous hashing should spread 90 keys over 3 servers"
        per_server = {s.address: s for s in servers}
        for addr, st in c.stats().items():
            assert st["blocks"] == owners.count(addr)

        dead = servers[1]
        dead.kill9()
        bufs = [bytearray(8192) for _ in keys]
        with caplog.at_level(logging.WARNING, logger="memkv.client"):
            st = c.get(keys, bufs)
            c.get(keys, bufs)  # a second batch must not warn again
        for k, o, s, b, d in zip(keys, owners, st, bufs, data):
            if o == dead.address:
                assert s == Status.MISS
            else:
                assert s == Status.OK and bytes(b) == d
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1 and dead.address in warnings[0].getMessage()
        assert c.exists(keys) == [o != dead.address for o in owners]
        put_st = c.put([b"new/" + k for k in keys], data)
        new_owners = [c.server_of(b"new/" + k) for k in keys]
        assert all((s == Status.UNREACHABLE) == (o == dead.address) for s, o in zip(put_st, new_owners))
        assert "error" in c.stats()[dead.address]

        dead.start()  # same port and data: its blocks come back once the backoff allows
        import time
        deadline = time.time() + 40
        while time.time() < deadline:
            st = c.get(keys, bufs)
            if st == [Status.OK] * len(keys):
                break
            time.sleep(0.5)
        assert st == [Status.OK] * len(keys)
        assert [bytes(b) for b in bufs] == data
        assert per_server  # keep reference for clarity


def test_placement_is_deterministic_across_clients(memkv_server):
    servers = [memkv_server(f"p{i}") for i in range(3)]
    eps = [s.endpoint for s in servers]
    keys = [os.urandom(16) for _ in range(50)]
    with Client(eps, namespace="x") as a, Client(list(reversed(eps)), namespace="x") as b:
        assert [a.server_of(k) for k in keys] == [b.server_of(k) for k in keys]
