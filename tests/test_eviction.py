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


def _namespace(c, s, ns="test"):
    return c.stats()[s.address]["namespaces"][ns]


def test_a_namespace_at_its_quota_evicts_its_own_blocks_and_no_one_elses(memkv_server):
    """A tenant that writes 8x its quota keeps within it by evicting its own oldest unpinned
    blocks; another tenant's blocks are untouched; it holds after kill -9 and a restart."""
    s = memkv_server(capacity="128MiB", extra=["--max-block", "4MiB", "--quota", "noisy=8MiB"])
    quiet_keys = [f"quiet/{i}".encode() for i in range(16)]
    quiet_data = [os.urandom(MiB) for _ in quiet_keys]
    noisy_keys = [f"noisy/{i}".encode() for i in range(64)]
    with s.client("quiet") as quiet, s.client("noisy") as noisy:
        assert quiet.put(quiet_keys, quiet_data) == [Status.OK] * 16
        blob = os.urandom(MiB)
        assert noisy.put(noisy_keys[:2], [blob] * 2) == [Status.OK] * 2
        assert noisy.pin(noisy_keys[:2]) == [Status.OK] * 2
        for k in range(2, 64, 6):
            batch = noisy_keys[k:k + 6]
            assert noisy.put(batch, [blob] * len(batch)) == [Status.OK] * len(batch)
            assert _namespace(noisy, s, "noisy")["bytes"] <= 8 * MiB
        ns = _namespace(noisy, s, "noisy")
        assert ns["quota_bytes"] == 8 * MiB and ns["evictions"] >= 50
        assert noisy.stats()[s.address]["counters"]["evictions_quota"] == ns["evictions"]
        assert noisy.exists(noisy_keys[:2]) == [True, True], "pinned blocks are kept"
        assert all(noisy.exists(noisy_keys[-6:])), "the newest are kept"
        assert _namespace(quiet, s, "quiet")["evictions"] == 0
        assert _namespace(quiet, s, "quiet")["quota_bytes"] is None
    s.kill9()
    s.start()
    with s.client("quiet") as quiet, s.client("noisy") as noisy:
        bufs = [bytearray(MiB) for _ in quiet_keys]
        assert quiet.get(quiet_keys, bufs) == [Status.OK] * 16
        assert [bytes(b) for b in bufs] == quiet_data
        more = [f"noisy/after/{i}".encode() for i in range(24)]
        for k in range(0, 24, 6):
            assert noisy.put(more[k:k + 6], [blob] * 6) == [Status.OK] * 6
            assert _namespace(noisy, s, "noisy")["bytes"] <= 8 * MiB
        assert noisy.exists(noisy_keys[:2]) == [True, True]
        assert quiet.exists(quiet_keys) == [True] * 16


def test_a_quota_full_of_pinned_blocks_is_back_pressure_and_a_block_above_it_is_refused(memkv_server):
    s = memkv_server(capacity="64MiB", extra=["--max-block", "8MiB", "--quota", "*=4MiB"])
    with s.client() as c:
        keys = [f"p/{i}".encode() for i in range(4)]
        assert c.put(keys, [os.urandom(MiB)] * 4) == [Status.OK] * 4
        assert c.pin(keys) == [Status.OK] * 4
        assert c.put([b"one-more"], [os.urandom(MiB)]) == [Status.FULL]
        assert c.unpin(keys[:1]) == [Status.OK]
        assert c.put([b"one-more"], [os.urandom(MiB)]) == [Status.OK]
        assert c.exists(keys) == [False, True, True, True]
        big = os.urandom(5 * MiB)  # within the block-size range, above the quota
        assert c.put([b"bigger-than-the-quota"], [big]) == [Status.BAD_LENGTH]
        assert _namespace(c, s)["quota_bytes"] == 4 * MiB


def test_a_batch_larger_than_the_quota_with_nothing_left_to_evict_is_back_pressure(memkv_server):
    """Quota 1 MiB, its only block deleted: a batch of 17 x 64 KiB plans 16 (all puts in flight
    count against the quota) and finds nothing of its own left to evict for the 17th: that one
    gets FULL, the client retries it once the others are stored, and it is stored too."""
    s = memkv_server(extra=["--max-block", "1MiB", "--quota", "*=1MiB"])
    with s.client() as c:
        assert c.put([b"gone"], [os.urandom(64 << 10)]) == [Status.OK]
        assert c.delete([b"gone"]) == [Status.OK]
        keys = [f"q/{i}".encode() for i in range(17)]
        data = [os.urandom(64 << 10) for _ in keys]
        assert c.put(keys, data) == [Status.OK] * 17
        assert _namespace(c, s)["bytes"] <= MiB
        assert sum(c.exists(keys)) >= 16
    assert "internal error" not in s.log()
