"""Restart keeps the cache; sync puts survive kill -9; corruption is a miss, never wrong bytes."""
import contextlib
import os
import subprocess
import threading
import time

import pytest

from memkv_nixl import Status
from memkv_nixl.diskformat import record_length


MiB = 1 << 20


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


@pytest.mark.parametrize("durability,journal_max", [("sync", None), ("async", None),
                                                     ("sync", "16KiB")],
                         ids=["sync", "async", "sync-checkpoints"])
def test_kill9_during_put_storm(memkv_server, durability, journal_max):
    """sync: every acknowledged block is served, equal. async: whatever is served is equal.
    sync-checkpoints: checkpoints are written all through the storm (records go to a new
    journal file meanwhile, covered ones are deleted), and nothing acknowledged is lost."""
    extra = ["--journal-max", journal_max] if journal_max else []
    s = memkv_server(durability=durability, capacity="2GiB", extra=extra)
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
    if journal_max:
        time.sleep(1.5)
        assert s.log().count("checkpoint:") >= 3, "checkpoints while the storm goes on"
        assert len(list(s.data.glob("journal.*"))) <= 2, "covered journals are deleted"
    with s.client("storm") as c:  # nothing may be missing for another reason
        assert "evictions" not in c.stats()[s.address]["counters"]
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
    journal = max(s.data.glob("journal.*"), key=lambda p: int(p.suffix[1:]))  # the open one
    with open(journal, "ab") as f:
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


@contextlib.contextmanager
def _small_meta_dir(tmp_path):
    """A 192 KiB tmpfs for the journal and checkpoint: it fills after ~1000 journal records."""
    meta = tmp_path / "meta"
    meta.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(meta)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield meta
    finally:
        subprocess.run(["umount", "--lazy", str(meta)], capture_output=True)


def _grow(meta):
    assert subprocess.run(["mount", "-o", "remount,size=8m", str(meta)]).returncode == 0


@pytest.mark.parametrize("journal_max", [None, "16KiB"], ids=["one-journal", "checkpoints-fail"])
def test_a_full_meta_dir_refuses_puts_and_loses_nothing_acknowledged(memkv_server, tmp_path,
                                                                     journal_max):
    """The journal's disk fills up (the meta dir on a 192 KiB tmpfs): sync puts, deletes and pins
    get IO_ERROR, with one clear log line, and so does a retry (it finds the block present, but
    not durable). Once there is room again they succeed, and every acknowledged block is there,
    equal, after kill -9; none of the refused ones reads back wrong. checkpoints-fail: a
    checkpoint is due every ~90 records but soon no longer fits, so the journals it would have
    covered pile up, and a restart replays them all."""
    with _small_meta_dir(tmp_path) as meta:
        s = memkv_server(extra=["--meta-dir", str(meta)] +
                         (["--journal-max", journal_max] if journal_max else []))
        acked, refused = {}, {}
        with s.client() as c:
            for b in range(24):  # ~1500 journal records fit
                keys, data = _blocks(f"b{b}", 64, size=4096)
                for k, d, st in zip(keys, data, c.put(keys, data)):
                    assert st in (Status.OK, Status.IO_ERROR), st
                    (acked if st == Status.OK else refused)[k] = d
                if journal_max:
                    time.sleep(0.25)  # the journal flusher writes a due checkpoint each second
            assert acked and refused
            k = next(iter(refused))
            assert c.put([k], [refused[k]]) == [Status.IO_ERROR], "a retry must not find it present"
            gone = next(iter(acked))  # a delete answered IO_ERROR may still take effect later
            assert c.delete([gone]) == [Status.IO_ERROR]
            refused[gone] = acked.pop(gone)
            assert "journal write to" in s.log() and "No space left on device" in s.log()
            if journal_max:
                assert "checkpoint to" in s.log() and len(list(meta.glob("journal.*"))) > 2
            _grow(meta)
            keys, data = _blocks("after", 64, size=4096)
            assert c.put(keys, data) == [Status.OK] * 64
            acked.update(zip(keys, data))
        s.kill9()
        s.start()
        with s.client() as c:
            st, got = _read_all(c, list(acked), 4096)
            assert st == [Status.OK] * len(acked) and got == list(acked.values())
            st, got = _read_all(c, list(refused), 4096)
            assert all(x == Status.MISS or g == d for x, g, d in zip(st, got, refused.values()))
            assert set(st) <= {Status.OK, Status.MISS}
        s.kill9()


def test_async_puts_while_the_meta_dir_is_full_are_journaled_once_it_has_room(memkv_server,
                                                                               tmp_path):
    """async: puts are acknowledged while the journal cannot be written; its records wait (a
    failed write leaves no torn record that would hide later ones) and are written once there is
    room, so after kill -9 every block is there."""
    with _small_meta_dir(tmp_path) as meta:
        s = memkv_server(durability="async", extra=["--meta-dir", str(meta)])
        blocks = {}
        with s.client() as c:
            for b in range(24):
                keys, data = _blocks(f"a{b}", 64, size=4096)
                assert c.put(keys, data) == [Status.OK] * 64
                blocks.update(zip(keys, data))
            time.sleep(1.5)  # a journal flush fails
            assert "No space left on device" in s.log()
            _grow(meta)
            while c.stats()[s.address]["write_behind"]["blocks"]:
                time.sleep(0.05)
            time.sleep(2.5)  # the flush after the growth
        s.kill9()
        s.start()
        with s.client() as c:
            st, got = _read_all(c, list(blocks), 4096)
            assert st == [Status.OK] * len(blocks) and got == list(blocks.values())
        s.kill9()


def test_a_store_from_before_numbered_journals_recovers(memkv_server):
    """Stores written before journal files were numbered have one file named "journal": after a
    kill -9, its records are replayed, and the first checkpoint retires it."""
    s = memkv_server()
    keys, data = _blocks("legacy", 30)
    with s.client() as c:
        assert c.put(keys, data) == [Status.OK] * 30
    s.kill9()
    (journal,) = s.data.glob("journal.*")
    journal.rename(s.data / "journal")
    s.start()
    with s.client() as c:
        assert _read_all(c, keys, 8192) == ([Status.OK] * 30, data)
    assert not (s.data / "journal").exists()


FAILSYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* fdatasync fails with EIO on files whose path holds FAILSYNC_MATCH while the file named by
   FAILSYNC_TRIGGER exists */
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    char link[64], path[4096] = {0};
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const char *trigger = getenv("FAILSYNC_TRIGGER"), *match = getenv("FAILSYNC_MATCH");
    if (readlink(link, path, sizeof path - 1) > 0 && match && strstr(path, match) && trigger &&
        access(trigger, F_OK) == 0) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
"""


def _failing_sync_server(memkv_server, tmp_path, match):
    """A server whose fdatasync of files matching `match` fails while <tmp>/fail-now exists."""
    src, lib = tmp_path / "failsync.c", tmp_path / "libfailsync.so"
    src.write_text(FAILSYNC_C)
    built = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    trigger = tmp_path / "fail-now"
    s = memkv_server(prefix=["env", f"LD_PRELOAD={lib}", f"FAILSYNC_TRIGGER={trigger}",
                             f"FAILSYNC_MATCH={match}"])
    return s, trigger


def test_a_journal_that_cannot_be_flushed_acknowledges_nothing(memkv_server, tmp_path):
    """fdatasync of the journal fails (EIO, injected with an LD_PRELOAD shim): the put gets
    IO_ERROR, and so does its retry, which finds the key present (its record was written but
    is not known to be on disk; a second fdatasync may report success for pages already lost).
    Once flushes work again the retry succeeds, and the block survives kill -9."""
    s, trigger = _failing_sync_server(memkv_server, tmp_path, "/journal.")
    keys, data = _blocks("sync", 4)
    with s.client() as c:
        assert c.put(keys[:2], data[:2]) == [Status.OK] * 2
        trigger.touch()
        assert c.put(keys[2:], data[2:]) == [Status.IO_ERROR] * 2
        assert c.put(keys[2:], data[2:]) == [Status.IO_ERROR] * 2, "acknowledged, not flushed"
        assert c.delete(keys[:1]) == [Status.IO_ERROR]
        trigger.unlink()
        assert c.put(keys[2:], data[2:]) == [Status.OK] * 2
        assert "journal write to" in s.log() and "Input/output error" in s.log()
    s.kill9()
    s.start()
    with s.client() as c:
        st, got = _read_all(c, keys[1:], 8192)
        assert st == [Status.OK] * 3 and got == data[1:]


def test_a_data_disk_that_cannot_flush_acknowledges_nothing_and_recovers(memkv_server, tmp_path):
    """fdatasync of the data file fails (EIO): the batch's puts get IO_ERROR, their places in
    the ring are given back (puts keep working, eviction included, once flushes work again),
    and every block acknowledged before and after is equal after kill -9."""
    s, trigger = _failing_sync_server(memkv_server, tmp_path, "blocks.dat")
    keys, data = _blocks("d", 40, size=MiB)
    with s.client() as c:
        assert c.put(keys[:8], data[:8]) == [Status.OK] * 8
        trigger.touch()
        assert c.put(keys[8:16], data[8:16]) == [Status.IO_ERROR] * 8
        assert "fdatasync of a data path failed" in s.log()
        trigger.unlink()
        for k in range(8, 40, 8):  # 32 MiB more through a 256 MiB store: no slot was leaked
            assert c.put(keys[k:k + 8], data[k:k + 8]) == [Status.OK] * 8
        st = c.stats()[s.address]
        assert st["counters"]["put_sync_errors"] == 1
        assert st["used_bytes"] == 40 * record_length(MiB), "the failed puts' places are free"
    s.kill9()
    s.start()
    with s.client() as c:
        assert _read_all(c, keys, MiB) == ([Status.OK] * 40, data)


def test_a_clean_stop_lets_the_requests_in_progress_finish(memkv_server):
    """SIGTERM while a 384 MiB put is on its way (a rolling restart of a busy server): the put
    is answered OK before the server stops, and the blocks are there after the restart."""
    s = memkv_server(capacity="1GiB", extra=["--max-block", "4MiB"])
    blob = os.urandom(4 * MiB)
    keys = [f"drain/{i}".encode() for i in range(96)]
    got, done_at = [], []

    def put():
        with s.client() as c:
            got.extend(c.put(keys, [blob] * len(keys)))
        done_at.append(time.monotonic())

    t = threading.Thread(target=put)
    t.start()
    time.sleep(0.1)
    stopped_at = time.monotonic()
    s.proc.terminate()
    t.join(60)
    assert got == [Status.OK] * 96
    assert s.proc.wait(60) == 0 and "cut off" not in s.log()
    assert done_at[0] > stopped_at, "the put must still be on its way at the stop"
    s._log.close()
    s.start()
    with s.client() as c:
        assert c.exists(keys) == [True] * 96
        assert _read_all(c, keys[-4:], 4 * MiB) == ([Status.OK] * 4, [blob] * 4)
