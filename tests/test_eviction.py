"""Full is normal: puts keep succeeding by evicting, pins are kept, FULL is explicit back-pressure."""
import os

from memkv_nixl import Status

MiB = 1 << 20


def test_filling_capacity_twice_evicts_but_keeps_pins_and_never_fails(memkv_server):
    s = memkv_server(capacity="32MiB", extra=["--max-block", "1MiB"])
    pinned = [f"pin/{i}".encode() for i in range(3)]
    pinned_data = [os.urandom(MiB) for _ in pinned]
    with s.client() as c:
        assert c.put(pinned, pinned_data) == [Status.OK] * 3
        assert c.pin(pinned) == [Status.OK] * 3
        keys = [f"fill/{i}".encode() for i in range(64)]  # 64 MiB through a 32 MiB store
        for k in range(0, 64, 8):
            assert c.put(keys[k:k + 8], [os.urandom(MiB) for _ in range(8)]) == [Status.OK] * 8
        stats = c.stats()[s.address]
        assert stats["counters"]["evictions"] >= 32
        assert stats["used_bytes"] <= stats["capacity_bytes"]
        bufs = [bytearray(MiB) for _ in pinned]
        assert c.get(pinned, bufs) == [Status.OK] * 3
        assert [bytes(b) for b in bufs] == pinned_data
        present = c.exists(keys)
        assert not all(present[:16]), "the oldest unpinned blocks were evicted"
        assert all(present[-8:]), "the newest blocks are kept"


def test_recently_read_blocks_get_a_second_chance(memkv_server):
    s = memkv_server(capacity="16MiB", extra=["--max-block", "1MiB"])
    with s.client() as c:
        keys = [f"a/{i}".encode() for i in range(10)]
        c.put(keys, [os.urandom(MiB)] * 10)
        hot = keys[0]
        c.get([hot], [bytearray(MiB)])  # sets its reference bit
        c.put([f"b/{i}".encode() for i in range(8)], [os.urandom(MiB)] * 8)
        assert c.exists([hot, keys[1]]) == [True, False]


def test_all_pinned_gives_full_back_pressure_then_unpin_frees(memkv_server):
    s = memkv_server(capacity="8MiB", extra=["--max-block", "1MiB"])
    with s.client() as c:
        keys = [f"p/{i}".encode() for i in range(16)]
        assert c.put(keys, [os.urandom(MiB)] * 16) == [Status.OK] * 16
        stored = [k for k, present in zip(keys, c.exists(keys)) if present]
        assert len(stored) >= 6
        assert c.pin(stored) == [Status.OK] * len(stored)
        assert c.put([b"one-more"], [os.urandom(MiB)]) == [Status.FULL]
        c.unpin(stored[:2])
        assert c.put([b"one-more"], [os.urandom(MiB)]) == [Status.OK]
