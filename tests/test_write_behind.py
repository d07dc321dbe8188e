"""Async durability writes behind: a put is acknowledged once its record is in the server's DRAM
cache, served from there at once, and written to disk after; the index (journal, checkpoint)
names it only once the disk has it, so a restart never finds a block that is not there."""
import contextlib
import os
import signal
import subprocess
import time

import pytest

from conftest import loop_device
from memkv_nixl import Status

MiB = 1 << 20


def _async_server(memkv_server, ram_cache, extra=(), **kw):
    s = memkv_server(durability="async", extra=["--ram-cache", ram_cache, *extra], **kw)
    _wait_ready(s)
    return s


def _wait_ready(s):
    """Write-behind starts once the server's DRAM cache is faulted in."""
    with s.client() as c:
        deadline = time.monotonic() + 60
        while not c.stats()[s.address]["ram_cache"]["ready"]:
            assert time.monotonic() < deadline, "DRAM cache never became ready"
            time.sleep(0.05)


def _restart_without_cache(s):
    """Clean stop, then a start whose reads must all come from the disk."""
    assert s.stop() == 0
    s.extra[s.extra.index("--ram-cache") + 1] = "0"
    s.start()


def _get(c, keys, size):
    bufs = [bytearray(size) for _ in keys]
    return c.get(keys, bufs), [bytes(b) for b in bufs]


def test_async_put_is_served_at_once_and_on_disk_after_a_clean_stop(memkv_server):
    s = _async_server(memkv_server, "64MiB")
    keys = [f"wb/{i}".encode() for i in range(40)]
    data = [os.urandom(MiB - 512 * i) for i in range(40)]  # lengths off the 4 KiB grid too
    with s.client() as c:
        assert c.put(keys, data) == [Status.OK] * 40
        c.pin(keys[:5])     # pins and deletes may reach the journal before the blocks do
        c.delete(keys[-5:])
        st, got = _get(c, keys, MiB)
        assert st == [Status.OK] * 35 + [Status.MISS] * 5
        assert [g[:len(d)] for g, d in zip(got, data)][:35] == data[:35]
        stats = c.stats()[s.address]
        assert stats["counters"]["put_written_behind"] == 40  # all fit in the cache
        assert stats["write_behind"]["blocks"] <= 40
    _restart_without_cache(s)
    with s.client() as c:
        st, got = _get(c, keys, MiB)
        assert st == [Status.OK] * 35 + [Status.MISS] * 5
        assert [g[:len(d)] for g, d in zip(got, data)][:35] == data[:35]
        ns = c.stats()[s.address]["namespaces"]["test"]
        assert ns["pinned"] == 5 and ns["blocks"] == 35
    assert "lost" not in s.log()


def test_async_puts_beyond_the_cache_are_written_before_their_reply(memkv_server):
    """The cache holds 7 records of 1 MiB; the rest of a 32-block batch finds the ring busy with
    records not yet received and takes the synchronous path. Both end on disk, equal."""
    s = _async_server(memkv_server, "8MiB")
    keys = [f"big/{i}".encode() for i in range(32)]
    data = [os.urandom(MiB) for _ in keys]
    with s.client() as c:
        assert c.put(keys, data) == [Status.OK] * 32
        behind = c.stats()[s.address]["counters"]["put_written_behind"]
        assert 0 < behind < 32
        assert _get(c, keys, MiB) == ([Status.OK] * 32, data)
    _restart_without_cache(s)
    with s.client() as c:
        assert _get(c, keys, MiB) == ([Status.OK] * 32, data)


def test_async_capacity_filled_twice_over_while_writing_behind(memkv_server):
    """A cache larger than the disk: blocks still being written are never evicted under their
    write; puts that find no room get FULL and are retried by the client; nothing served is
    wrong, before or after a restart."""
    s = _async_server(memkv_server, "64MiB", ["--max-block", "1MiB"], capacity="16MiB")
    size = 512 * 1024
    keys = [f"fill/{i}".encode() for i in range(64)]
    data = [os.urandom(size) for _ in keys]
    with s.client() as c:
        for i in range(0, 64, 8):
            assert c.put(keys[i:i + 8], data[i:i + 8]) == [Status.OK] * 8
        st, got = _get(c, keys, size)
        served = [i for i, x in enumerate(st) if x == Status.OK]
        assert 0 < len(served) <= 16 * MiB // size
        assert all(got[i] == data[i] for i in served)
        assert set(st) <= {Status.OK, Status.MISS}
    _restart_without_cache(s)
    with s.client() as c:
        st, got = _get(c, keys, size)
        assert all(got[i] == data[i] for i, x in enumerate(st) if x == Status.OK)
        counters = c.stats()[s.address]["counters"]
        assert not {"get_corrupt", "get_stale", "get_io_error"} & set(counters)


def test_a_failed_write_behind_loses_only_its_block_and_is_never_indexed(memkv_server):
    """Writes past 16 MiB into the data file fail (a file size limit on the server stands in for
    a failing disk). Those blocks were acknowledged: they are logged and counted as lost, served
    as misses at once, and neither the journal nor the checkpoint names them, so a restart finds
    no block whose bytes are not on disk."""
    s = memkv_server(durability="async", capacity="64MiB", extra=["--ram-cache", "64MiB",
                                                                  "--max-block", "1MiB"])
    s.stop()  # the data file now exists at full size: the limit only stops writes into it
    s.prefix = ["sh", "-c", 'trap "" XFSZ; exec "$@"', "sh", "prlimit", f"--fsize={16 * MiB}"]
    s.start()
    _wait_ready(s)
    keys = [f"eio/{i}".encode() for i in range(30)]
    data = [os.urandom(MiB) for _ in keys]
    with s.client() as c:
        # mostly acknowledged before the disk has them; a write that failed before the reply
        # went out turns that put's status into IO_ERROR
        put = c.put(keys, data)
        assert set(put) <= {Status.OK, Status.IO_ERROR}
        deadline = time.monotonic() + 60
        while c.stats()[s.address]["write_behind"]["blocks"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = c.stats()[s.address]["counters"]["write_behind_errors"]
        assert 0 < failed < 30 and put.count(Status.IO_ERROR) <= failed
        st, got = _get(c, keys, MiB)
        kept = [i for i, x in enumerate(st) if x == Status.OK]
        assert len(kept) == 30 - failed and st.count(Status.MISS) == failed
        assert all(put[i] == Status.OK and got[i] == data[i] for i in kept)
    assert "failed (File too large)" in s.log()
    s.prefix = []
    _restart_without_cache(s)
    with s.client() as c:
        st2, got = _get(c, keys, MiB)
        assert st2 == st and all(got[i] == data[i] for i in kept)
        assert "get_corrupt" not in c.stats()[s.address]["counters"]


@contextlib.contextmanager
def _loop_filesystem(tmp_path):
    """A small ext4 on a loop device, mounted under tmp_path: a disk whose writes a test can hold
    (fsfreeze). Skips where loop devices or mounting are not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def run(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    with loop_device(tmp_path / "fs.img", 256 * MiB) as dev:
        for cmd in (("mkfs.ext4", "-q", dev), ("mount", dev, str(mnt))):
            done = run(*cmd)
            if done.returncode:
                pytest.skip(f"{cmd[0]} failed here: {done.stderr.strip()}")
        try:
            yield mnt
        finally:
            run("fsfreeze", "--unfreeze", str(mnt))
            run("umount", "--lazy", str(mnt))


def test_a_crash_before_the_disk_has_a_written_behind_block_leaves_no_trace(memkv_server, tmp_path):
    """The disk holds its writes (a frozen filesystem), so acknowledged blocks stay in DRAM only;
    the server outlives a journal flush, then dies. After a restart those blocks are plain misses:
    no journal record or checkpoint names them, so nothing reads back as corrupt or stale."""
    with _loop_filesystem(tmp_path) as mnt:
        s = _async_server(memkv_server, "64MiB", ["--meta-dir", str(tmp_path / "meta"),
                                                  "--max-block", "1MiB"],
                          capacity="128MiB", data=mnt / "data")
        before = [f"before/{i}".encode() for i in range(8)]
        held = [f"held/{i}".encode() for i in range(16)]
        data = {k: os.urandom(MiB) for k in before + held}
        with s.client() as c:
            assert c.put(before, [data[k] for k in before]) == [Status.OK] * 8
            while c.stats()[s.address]["write_behind"]["blocks"]:
                time.sleep(0.02)
            time.sleep(1.5)  # their journal records are flushed
            assert subprocess.run(["fsfreeze", "--freeze", str(mnt)]).returncode == 0
            try:
                assert c.put(held, [data[k] for k in held]) == [Status.OK] * 16
                assert _get(c, held, MiB) == ([Status.OK] * 16, [data[k] for k in held])
                assert c.stats()[s.address]["write_behind"]["blocks"] == 16
                time.sleep(1.5)  # a journal flush runs while they are still not on disk
                s.proc.kill()  # its writers sleep in the frozen filesystem until the thaw
            finally:
                subprocess.run(["fsfreeze", "--unfreeze", str(mnt)])
        s.proc.wait(60)
        s._log.close()
        s.start()
        with s.client() as c:
            assert _get(c, before, MiB) == ([Status.OK] * 8, [data[k] for k in before])
            assert _get(c, held, MiB)[0] == [Status.MISS] * 16
            counters = c.stats()[s.address]["counters"]
            assert not {"get_corrupt", "get_stale"} & set(counters), counters
        s.stop()


def test_a_clean_stop_waits_for_written_behind_blocks(memkv_server, tmp_path):
    """SIGTERM while the disk holds the writes: the server finishes them (once the filesystem
    thaws) before its last checkpoint, so every acknowledged block is there after the restart."""
    with _loop_filesystem(tmp_path) as mnt:
        s = _async_server(memkv_server, "64MiB", ["--meta-dir", str(tmp_path / "meta"),
                                                  "--max-block", "1MiB"],
                          capacity="128MiB", data=mnt / "data")
        held = [f"held/{i}".encode() for i in range(16)]
        data = [os.urandom(MiB) for _ in held]
        assert subprocess.run(["fsfreeze", "--freeze", str(mnt)]).returncode == 0
        try:
            with s.client() as c:
                assert c.put(held, data) == [Status.OK] * 16
                assert c.stats()[s.address]["write_behind"]["blocks"] == 16
            s.proc.terminate()
            time.sleep(1.5)  # it is stopping, and waiting on the frozen disk
            assert s.proc.poll() is None, "the server stopped before its blocks were on disk"
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", str(mnt)])
        assert s.proc.wait(60) == 0
        s._log.close()
        s.start()
        with s.client() as c:
            assert _get(c, held, MiB) == ([Status.OK] * 16, data)
        s.stop()


def test_a_hangup_stops_the_server_cleanly_with_every_async_put_on_disk(memkv_server):
    """SIGHUP (the terminal of a `memkv serve` went away) is a clean stop, not a crash: the
    written-behind blocks reach the disk and the index is checkpointed."""
    s = _async_server(memkv_server, "64MiB", ["--max-block", "1MiB"])
    keys = [f"hup/{i}".encode() for i in range(32)]
    data = [os.urandom(MiB) for _ in keys]
    with s.client() as c:
        assert c.put(keys, data) == [Status.OK] * 32
    s.proc.send_signal(signal.SIGHUP)
    assert s.proc.wait(60) == 0 and "stopped cleanly" in s.log()
    s._log.close()
    s.start()
    with s.client() as c:
        assert _get(c, keys, MiB) == ([Status.OK] * 32, data)
