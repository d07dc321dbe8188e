"""The server's DRAM read cache: hot blocks come from memory, never stale, bounded in size."""
import os
import time

from memkv_nixl import Status


def _get(c, keys, size):
    bufs = [bytearray(size) for _ in keys]
    st = c.get(keys, bufs)
    return st, [bytes(b) for b in bufs]


def _stats(s, c):
    return c.stats()[s.address]


def _cached_server(memkv_server, size: str):
    """A server whose DRAM cache is serving: its memory is faulted in by a thread at start."""
    s = memkv_server(extra=["--ram-cache", size])
    end = time.time() + 30
    with s.client() as c:
        while not _stats(s, c)["ram_cache"]["ready"]:
            assert time.time() < end, "DRAM cache never became ready"
            time.sleep(0.02)
    return s


def _blocks(prefix: str, n: int):
    keys = [f"{prefix}/{i}".encode() for i in range(n)]
    return keys, [os.urandom(1 << 20) for _ in keys]


def test_fresh_and_read_blocks_come_from_memory_byte_exact(memkv_server):
    s = _cached_server(memkv_server, "64MiB")
    keys, data = _blocks("hot", 4)
    with s.client() as c:
        c.put(keys, data)  # copied into the cache as they arrive
        assert _get(c, keys, 1 << 20) == ([Status.OK] * 4, data)
        assert _get(c, keys, 1 << 20) == ([Status.OK] * 4, data)
        st = _stats(s, c)
        assert st["counters"]["get_from_ram"] == 8
        assert st["ram_cache"] == {"capacity_bytes": 64 << 20, "used_bytes": 4 << 20, "blocks": 4,
                                   "ready": True}


def test_deleted_or_replaced_blocks_are_never_served_from_memory(memkv_server):
    s = _cached_server(memkv_server, "64MiB")
    with s.client() as c:
        c.put([b"k", b"gone"], [b"1" * 8192, b"2" * 8192])
        _get(c, [b"k", b"gone"], 8192)  # both cached now
        assert c.delete([b"gone"]) == [Status.OK]
        assert _get(c, [b"gone"], 8192)[0] == [Status.MISS]
        assert c.put([b"gone"], [b"3" * 8192]) == [Status.OK]
        assert _get(c, [b"gone"], 8192) == ([Status.OK], [b"3" * 8192])


def test_cache_stays_within_its_size_oldest_out_first(memkv_server):
    s = _cached_server(memkv_server, "3MiB")
    keys, data = _blocks("fifo", 5)
    with s.client() as c:
        for k, d in zip(keys, data):  # one at a time: each fresh block takes the oldest's place
            c.put([k], [d])
        cache = _stats(s, c)["ram_cache"]
        assert cache["used_bytes"] == 3 << 20 and cache["blocks"] == 3
        assert _get(c, keys[2:], 1 << 20) == ([Status.OK] * 3, data[2:])
        assert _stats(s, c)["counters"]["get_from_ram"] == 3
        assert _get(c, keys[:2], 1 << 20) == ([Status.OK] * 2, data[:2])  # from disk
        assert _stats(s, c)["counters"]["get_from_ram"] == 3


def test_blocks_evicted_from_the_cache_are_cached_again_when_read(memkv_server):
    s = _cached_server(memkv_server, "2MiB")
    keys, data = _blocks("back", 3)
    with s.client() as c:
        for k, d in zip(keys, data):
            c.put([k], [d])  # the cache ends with blocks 1 and 2
        assert _get(c, keys[:1], 1 << 20) == ([Status.OK], data[:1])  # disk; replaces block 1
        assert _get(c, keys[:1], 1 << 20) == ([Status.OK], data[:1])  # memory
        assert _stats(s, c)["counters"]["get_from_ram"] == 1


def test_ram_cache_off(memkv_server):
    s = memkv_server(extra=["--ram-cache", "0"])
    with s.client() as c:
        c.put([b"x"], [b"y" * 4096])
        for _ in range(2):
            assert _get(c, [b"x"], 4096) == ([Status.OK], [b"y" * 4096])
        st = _stats(s, c)
        assert st["ram_cache"]["blocks"] == 0 and "get_from_ram" not in st["counters"]
