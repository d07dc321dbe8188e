"""Blocks of many sizes and memory kinds go in and come back byte-identical."""
import ctypes
import os

import pytest

from memkv_nixl import Client, InvalidArgument, Status


@pytest.mark.parametrize("size", [4096, 4097, 65536 + 17, 1 << 20, (2 << 20) + 4095, 16 << 20])
def test_round_trip_is_byte_exact(server, size):
    keys = [f"rt/{size}/{i}".encode() for i in range(3)]
    data = [os.urandom(size) for _ in keys]
    with server.client() as c:
        assert c.put(keys, data) == [Status.OK] * 3
        bufs = [bytearray(size) for _ in keys]
        lengths = []
        assert c.get(keys, bufs, lengths=lengths) == [Status.OK] * 3
        assert lengths == [size] * 3
        assert [bytes(b) for b in bufs] == data


def test_buffer_kinds_memoryview_slices_and_raw_pointers(server):
    arena = bytearray(os.urandom(3 * 8192))
    raw = ctypes.create_string_buffer(os.urandom(8192), 8192)
    addr = ctypes.addressof(raw)
    with server.client() as c:
        mv = memoryview(arena)
        assert c.put([b"a", b"b", b"raw"], [mv[:8192], mv[8192:16384], (addr, 8192)]) == [Status.OK] * 3
        out = bytearray(2 * 8192)
        out_raw = ctypes.create_string_buffer(8192)
        st = c.get([b"a", b"b", b"raw"], [memoryview(out)[:8192], memoryview(out)[8192:],
                                          (ctypes.addressof(out_raw), 8192)])
        assert st == [Status.OK] * 3
        assert bytes(out) == bytes(arena[:16384])
        assert out_raw.raw == raw.raw


def test_torch_cpu_tensors(server):
    torch = pytest.importorskip("torch")
    t = torch.arange(4096 * 4, dtype=torch.int32)
    with server.client() as c:
        assert c.put([b"tensor"], [t]) == [Status.OK]
        out = torch.zeros_like(t)
        assert c.get([b"tensor"], [out]) == [Status.OK]
        assert torch.equal(out, t)


def test_second_put_of_committed_key_is_a_noop_keeping_first_bytes(server):
    first, second = os.urandom(8192), os.urandom(8192)
    with server.client() as c:
        assert c.put([b"k"], [first]) == [Status.OK]
        assert c.put([b"k"], [second]) == [Status.OK]
        out = bytearray(8192)
        c.get([b"k"], [out])
        assert bytes(out) == first
        st = c.stats()[server.address]
        assert st["namespaces"]["test"]["puts"] == 1


def test_block_smaller_than_buffer_reports_its_length(server):
    with server.client() as c:
        c.put([b"small"], [b"x" * 5000])
        out, lengths = bytearray(9000), []
        assert c.get([b"small"], [out], lengths=lengths) == [Status.OK]
        assert lengths == [5000] and bytes(out[:5000]) == b"x" * 5000


def test_miss_and_buffer_too_small_are_per_key_statuses(server):
    with server.client() as c:
        c.put([b"big"], [os.urandom(16384)])
        st = c.get([b"absent", b"big"], [bytearray(16384), bytearray(8192)])
        assert st == [Status.MISS, Status.BUFFER_TOO_SMALL]


def test_exists_delete_pin_unpin(server):
    with server.client() as c:
        c.put([b"a", b"b"], [bytes(4096), bytes(4096)])
        assert c.exists([b"a", b"b", b"c"]) == [True, True, False]
        assert c.pin([b"a", b"c"]) == [Status.OK, Status.MISS]
        assert c.unpin([b"a"]) == [Status.OK]
        assert c.delete([b"a", b"c"]) == [Status.OK, Status.MISS]
        assert c.exists([b"a", b"b"]) == [False, True]
        assert c.get([b"a"], [bytearray(4096)]) == [Status.MISS]


def test_namespaces_isolate_keys(server):
    with server.client("model-a") as a, server.client("model-b") as b:
        a.put([b"same-key"], [b"A" * 4096])
        assert b.exists([b"same-key"]) == [False]
        b.put([b"same-key"], [b"B" * 4096])
        out = bytearray(4096)
        a.get([b"same-key"], [out])
        assert bytes(out) == b"A" * 4096


def test_length_outside_block_range_is_refused_per_key(server):
    with server.client() as c:
        st = c.put([b"tiny", b"ok"], [b"x" * 100, b"y" * 4096])
        assert st == [Status.BAD_LENGTH, Status.OK]


def test_bad_arguments_are_reported_all_at_once(server):
    with server.client() as c:
        with pytest.raises(InvalidArgument) as e:
            c.put([b"", b"k" * 129, "text"], [b"", b"", b""])
        msg = str(e.value)
        assert "key #0 has 0 bytes (allowed 1..128)" in msg
        assert "key #1 has 129 bytes" in msg and "key #2 is str" in msg
        with pytest.raises(InvalidArgument, match="2 keys but 1 buffers"):
            c.put([b"a", b"b"], [b"x" * 4096])
        with pytest.raises(InvalidArgument, match="read-only; get needs writable memory"):
            c.get([b"a"], [b"x" * 4096])


def test_bad_endpoint_and_namespace_are_clear_errors():
    with pytest.raises(InvalidArgument, match="expected memkv://host:port"):
        Client(["http://x:1"], namespace="n")
    with pytest.raises(InvalidArgument, match="namespace must be a non-empty str"):
        Client(["memkv://127.0.0.1:1"], namespace="")


def test_large_batch_is_split_over_the_servers_max_batch(memkv_server):
    s = memkv_server(extra=["--io-threads", "2"])
    keys = [f"many/{i}".encode() for i in range(10000)]
    with s.client() as c:
        assert set(c.put(keys, [bytes(4096)] * len(keys))) == {Status.OK}
        assert all(c.exists(keys))
