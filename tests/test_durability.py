"""Restart keeps the cache; sync puts survive kill -9; corruption is a miss, never wrong bytes."""
import os
import threading
import time

import pytest

from memkv_nixl import Status


def _blocks(prefix, n, size=8192):
    return [f"{prefix}/{i}".encode() for i in range(n)], [os.urandom(size) for _ in range(n)]


def _read_all(client, keys, size):
    bufs = [bytearray(size) for _ in keys]
    st = client.get(keys, bufs)
    return st, [bytes(b) for b in bufs]


def test_clean_restart_serves_every_block_again_with_pins(memkv_server):
    s = memkv_server()
    keys, data = _blocks("clean", 200)
    with s.client() as c:
        assert set(c.put(keys, data)) == {Status.OK}
        c.pin(keys[:10])
        c.delete(keys[-5:])
    assert s.stop() == 0
    assert "checkpoint" in s.log() and "stopped cleanly" in s.log()
    s.start()
    with s.client() as c:
        st, got = _read_all(c, keys, 8192)
        assert st[:-5] == [Status.OK] * 195 and got[:-5] == data[:-5]
        assert st[-5:] == [Status.MISS] * 5
        ns = c.stats()[s.address]["namespaces"]["test"]
        assert ns["pinned"] == 10 and ns["blocks"] == 195
    assert "recovered in" in s.log()


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_kill9_during_put_storm(memkv_server, durability):
    """sync: every acknowledged block is served, equal. async: whatever is served is equal."""
    s = memkv_server(durability=durability, capacity="512MiB")
    acked: dict[bytes, bytes] = {}
    stop = threading.Event()
    errors = []

    def storm(worker):
        from memkv_nixl import Client
        with Client([s.endpoint], namespace="storm", timeout=5) as c:
            i = 0
            while not stop.is_set():
                keys = [f"w{worker}/{i + j}".encode() for j in range(8)]
                data = [os.urandom(16384 + 4096 * j) for j in range(8)]
                try:
                    st = c.put(keys, data)
                except Exception as e:  # noqa: BLE001 - the storm ends with the server
                    errors.append(e)
                    return
                for k, d, x in zip(keys, data, st):
                    if x == Status.OK:
                        acked[k] = d
                i += 8

    threads = [threading.Thread(target=storm, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    if durability == "async":  # most of the storm was acknowledged from DRAM, written behind
        with s.client("storm") as c:
            assert c.stats()[s.address]["counters"].get("put_written_behind", 0) > 0
    s.kill9()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) > 50, "the storm should have stored blocks before the kill"
    s.start()
    with s.client("storm") as c:
        keys = list(acked)
        bufs = [bytearray(16384 + 4096 * 7) for _ in keys]
        lengths = []
        st = c.get(keys, bufs, lengths=lengths)
        served = 0
        for k, x, b, n in zip(keys, st, bufs, lengths):
            if x == Status.OK:
                assert bytes(b[:n]) == acked[k], f"wrong bytes served for {k!r}"
                served += 1
            else:
                assert durability == "async", f"acknowledged {k!r} lost in sync mode: {x!r}"
                assert x == Status.MISS
        if durability == "sync":
            assert served == len(keys)


def test_flipped_byte_on_disk_is_a_miss_counted_and_dropped(memkv_server):
    s = memkv_server(extra=["--ram-cache", "0"])  # reads must reach the disk
    keys, data = _blocks("flip", 4)
    with s.client() as c:
        c.put(keys[:1], data[:1])  # first record in the file
        c.put(keys[1:], data[1:])
    s.flip_payload_byte()
    with s.client() as c:
        st, got = _read_all(c, keys, 8192)
        assert st == [Status.MISS, Status.OK, Status.OK, Status.OK]
        assert got[1:] == data[1:]
        stats = c.stats()[s.address]
        assert stats["counters"]["get_corrupt"] == 1
        assert c.exists(keys[:1]) == [False], "a corrupt slot is dropped from the index"
        # the key can be stored again and is then served
        assert c.put(keys[:1], data[:1]) == [Status.OK]
        st, got = _read_all(c, keys[:1], 8192)
        assert st == [Status.OK] and got == data[:1]
    assert "dropping corrupt block" in s.log()


def test_flipped_byte_stays_a_miss_after_restart(memkv_server):
    s = memkv_server(extra=["--ram-cache", "0"])  # reads must reach the disk
    keys, data = _blocks("flip2", 2)
    with s.client() as c:
        c.put(keys, data)
    s.stop()
    s.flip_payload_byte(5000)
    s.start()
    with s.client() as c:
        st, got = _read_all(c, keys, 8192)
        assert st == [Status.MISS, Status.OK] and got[1] == data[1]


def test_torn_journal_tail_is_ignored(memkv_server):
    s = memkv_server()
    keys, data = _blocks("torn", 20)
    with s.client() as c:
        c.put(keys, data)
    s.kill9()
    with open(s.data / "journal", "ab") as f:
        f.write(os.urandom(100))  # half a record of garbage, as a crash mid-append leaves
    s.start()
    with s.client() as c:
        st, got = _read_all(c, keys, 8192)
        assert st == [Status.OK] * 20 and got == data
    assert "torn tail" in s.log()


def test_two_data_paths_share_the_blocks_and_both_recover(memkv_server, tmp_path):
    second = tmp_path / "second-disk"
    s = memkv_server(capacity="256MiB", extra=["--data", str(second), "--max-block", "1MiB",
                                               "--ram-cache", "0"])  # reads must reach the disk
    keys, data = _blocks("striped", 40, size=65536)
    with s.client() as c:
        assert set(c.put(keys, data)) == {Status.OK}
        paths = c.stats()[s.address]["data_paths"]
    assert paths == [str(s.data / "blocks.dat"), str(second / "blocks.dat")]
    assert os.path.getsize(second / "blocks.dat") == 128 << 20  # capacity split evenly
    s.kill9()
    s.start()
    with s.client() as c:
        st, got = _read_all(c, keys, 65536)
        assert st == [Status.OK] * 40 and got == data
    # both files hold records: flipping the first record of each loses exactly two blocks
    for path in (s.data / "blocks.dat", second / "blocks.dat"):
        with open(path, "r+b") as f:
            f.seek(4096 + 256 + 10)
            b = f.read(1)
            f.seek(4096 + 256 + 10)
            f.write(bytes([b[0] ^ 1]))
    with s.client() as c:
        st, _ = _read_all(c, keys, 65536)
        assert st.count(Status.MISS) == 2
