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


def test_new_blocks_survive_a_lap_and_read_blocks_a_second_one(memkv_server):
    s = memkv_server(capacity="16MiB", extra=["--max-block", "1MiB"])  # 15 records of 1 MiB
    with s.client() as c:
        a = [f"a/{i}".encode() for i in range(15)]
        for k in a:  # one put per block: the client's exists-check would batch them otherwise
            c.put([k], [os.urandom(MiB)])
        # the 16th block wraps the ring: the head clears every new block's bit on its lap, then
        # evicts the oldest, a/0; the newest just written are all still there
        c.put([b"b/0"], [os.urandom(MiB)])
        assert c.exists(a) == [False] + [True] * 14
        hot = a[5]
        c.get([hot], [bytearray(MiB)])  # read since the head passed: a second chance
        for i in range(1, 7):
            c.put([f"b/{i}".encode()], [os.urandom(MiB)])
        assert c.exists([hot]) == [True]
        assert c.exists(a[1:5] + a[6:8]) == [False] * 6


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


def test_usage_and_pin_counts_match_a_recount_after_restart(memkv_server):
    """stats() keeps used bytes and pinned counts as blocks come and go (no scan per call); a
    restart recounts them from the index, and both must agree."""
    s = memkv_server(capacity="24MiB", extra=["--max-block", "1MiB"])
    keys = [f"u/{i}".encode() for i in range(40)]  # 40 MiB through 24: evictions too
    with s.client() as c:
        for k in range(0, 40, 8):
            c.put(keys[k:k + 8], [os.urandom(MiB - 4096 * j) for j in range(8)])
        present = [k for k, p in zip(keys, c.exists(keys)) if p]
        assert c.pin(present[:4]) == [Status.OK] * 4
        c.unpin(present[:1])
        c.delete(present[-3:] + [b"u/none"])
        c.put([b"u/big"], [os.urandom(MiB)])  # replaces nothing, may evict
        before = c.stats()[s.address]
    s.restart()
    with s.client() as c:
        after = c.stats()[s.address]
    assert 0 < before["used_bytes"] == after["used_bytes"] <= before["capacity_bytes"]
    assert before["namespaces"]["test"]["pinned"] == after["namespaces"]["test"]["pinned"] == 3
    assert before["namespaces"]["test"]["blocks"] == after["namespaces"]["test"]["blocks"]
