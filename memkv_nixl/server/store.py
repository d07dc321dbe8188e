"""The block store: index, placement on disk, eviction, journal, checkpoint and recovery.

Layout: each data path is a ring of records (see memkv_nixl.diskformat). New blocks are written
at the ring's head. Eviction policy (CLOCK on the ring): every block has a reference bit, set when
it is written and each time it is read. When the head reaches a block, the block is evicted unless
it is pinned, its bit is set, or a transfer is using it; such a block keeps its place, its bit is
cleared and the head skips over it. So a new block survives at least one full lap, and a block
read since the head last passed survives another.
A put that finds no room within two laps gets Status.FULL (back-pressure, retried by clients).

Durability: the index is rebuilt at start-up from the last checkpoint plus the journal written
after it. In `sync` mode a put is acknowledged only after its data (O_DIRECT + fdatasync) and its
journal record (fdatasync) are on disk. In `async` mode a put is acknowledged once its record is
in the DRAM cache (write-behind, see ramcache.py) and is served from there until the disk has
it; its journal record is written only then, so after a crash the index never names a block
whose bytes did not reach the disk. The journal is flushed every second. When the cache has no
room (or is off), an async put is written before its reply, without the flushes.
Gets verify each record's header and checksum in C; anything else is a miss, never wrong bytes.

This module moves no block bytes itself: it only decides where they go (struct memkv_io rows)
and keeps the index consistent. Callers hold no lock; every public method takes `self._lock`.
"""
import collections
import errno
import fcntl
import logging
import os
import threading
import time
import uuid

from .. import native
from ..diskformat import (ALIGN, CKPT_FILE, CKPT_HDR, CKPT_MAGIC, CKPT_TRAILER, FLAG_PINNED,
                          FORMAT_VERSION, JOURNAL_HDR, JOURNAL_MAGIC, META_BODY, META_MAGIC,
                          META_REC, SUPERBLOCK, SUPERBLOCK_LEN, SUPERBLOCK_MAGIC, MetaType,
                          record_length)
from ..errors import StoreError
from ..protocol import Status
from .config import is_block_device
from .ramcache import RamCache

log = logging.getLogger("memkv.store")

CHECKPOINT_JOURNAL_BYTES = 32 << 20  # checkpoint once the journal holds this much
SEQ_FENCE = 1 << 32                  # after recovery, new records never reuse a lost record's seq
ASYNC_FLUSH_S = 1.0
CLOSE_WAIT_S = 120  # a clean stop waits this long for write-behind records to reach the disk


class Entry:
    """One block: where it lives and its eviction state."""

    __slots__ = ("ns", "key", "file", "off", "len", "csum", "seq", "pinned", "ref", "busy", "live",
                 "replace", "behind")

    def __init__(self, ns, key, file, off, length, csum, seq, pinned=False):
        self.ns = ns
        self.key = key
        self.file = file
        self.off = off
        self.len = length
        self.csum = csum
        self.seq = seq
        self.pinned = pinned
        self.ref = False
        self.busy = 0      # transfers using the slot (a write in flight, or reads)
        self.live = True   # False once evicted/deleted/dropped; the ring forgets it lazily
        self.replace = False  # a region-mode put that supersedes a committed block
        self.behind = False   # written behind (async): acknowledged, not yet on disk

    @property
    def reclen(self) -> int:
        return record_length(self.len)


class Namespace:
    __slots__ = ("id", "name", "index", "bytes", "pinned", "hits", "misses", "puts", "evictions",
                 "quota", "reserved", "order")

    def __init__(self, ns_id: int, name: str, quota: int = 0):
        self.id = ns_id
        self.name = name
        self.index: dict[bytes, Entry] = {}
        self.bytes = 0   # payload bytes of the blocks in the index
        self.pinned = 0  # pinned blocks in the index
        self.hits = self.misses = self.puts = self.evictions = 0
        self.quota = quota    # most payload bytes it may hold; 0: no quota
        self.reserved = 0     # payload bytes of its puts in flight (counted against the quota)
        # with a quota: its blocks in commit order, the CLOCK it evicts from at its quota (entries
        # evicted, deleted or replaced meanwhile are skipped there lazily)
        self.order: collections.deque[Entry] | None = collections.deque() if quota else None


class DataFile:
    """One data path: a preallocated file or a block device, used as a ring."""

    def __init__(self, number: int, path: str, size: int, fd: int, file_uuid: bytes):
        self.number = number
        self.path = path
        self.size = size
        self.fd = fd
        self.uuid = file_uuid
        self.head = SUPERBLOCK_LEN
        self.ring: collections.deque[Entry] = collections.deque()  # cyclic order from head


# What a block device may already hold (offset, signature, name). memkv never writes over data it
# did not put there: zeroing the device's first MiB is the owner's consent.
_FOREIGN = ((1080, b"\x53\xef", "an ext2/3/4 filesystem"), (0, b"XFSB", "an XFS filesystem"),
            (65600, b"_BHRfS_M", "a btrfs filesystem"), (512, b"EFI PART", "a GPT partition table"),
            (0, b"LUKS\xba\xbe", "a LUKS volume"), (512, b"LABELONE", "an LVM physical volume"),
            (4086, b"SWAPSPACE2", "swap space"), (510, b"\x55\xaa", "a partition table or boot sector"))
_FOREIGN_SCAN = 128 << 10


def _claim(fd: int, what: str) -> None:
    """Hold an exclusive lock on fd for the life of the process (the kernel drops it when the
    process dies, kill -9 included): two servers on one store would each rewrite its journal."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(f"{what} is in use by another memkv server; stop that one first, or give "
                         "this one other --data and --meta-dir paths") from None


def _open_data_path(path: str, size: int) -> tuple[int, int, bytes]:
    """Open (creating/preallocating a regular file) a data path; returns (fd, size, uuid)."""
    is_dev = is_block_device(path)
    # O_EXCL on a block device: refused while it is mounted or opened so by another server
    flags = os.O_RDWR | os.O_DIRECT | (os.O_EXCL if is_dev else os.O_CREAT)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if is_dev and e.errno == errno.EBUSY:
            raise StoreError(f"block device {path} is in use by another memkv server or the system "
                             "(mounted, or part of a RAID or LVM volume); memkv needs it to itself") from e
        raise StoreError(f"cannot open data path {path}: {e.strerror}; check that the directory "
                         "exists, is writable and its filesystem supports O_DIRECT") from e
    try:
        if not is_dev:
            _claim(fd, f"data path {path}")
        actual = os.lseek(fd, 0, os.SEEK_END)
        if is_dev:
            size = min(size, actual) // ALIGN * ALIGN if size else actual // ALIGN * ALIGN
        elif actual and actual > size:
            raise StoreError(f"data file {path} holds {actual} bytes but the configured capacity "
                             f"gives it {size}; shrinking loses blocks: raise --capacity or remove "
                             "the data directory")
        elif actual < size:
            os.posix_fallocate(fd, 0, size)
        head = _read_aligned(fd, 0, _FOREIGN_SCAN if is_dev else SUPERBLOCK_LEN)
        magic, version, _, file_uuid, _, _ = SUPERBLOCK.unpack_from(head)
        if magic != SUPERBLOCK_MAGIC or version != FORMAT_VERSION:
            if magic == SUPERBLOCK_MAGIC:
                raise StoreError(f"data path {path} has format version {version}, this server "
                                 f"reads {FORMAT_VERSION}")
            if is_dev and head.strip(b"\0"):
                held = next((name for at, sig, name in _FOREIGN if head[at:at + len(sig)] == sig),
                            "data that is not a memkv store")
                raise StoreError(f"block device {path} holds {held}; memkv will not overwrite it. "
                                 f"If it may go, erase its start first (wipefs --all {path}, or dd "
                                 f"if=/dev/zero of={path} bs=1M count=1)")
            file_uuid = uuid.uuid4().bytes
            block = bytearray(SUPERBLOCK_LEN)
            SUPERBLOCK.pack_into(block, 0, SUPERBLOCK_MAGIC, FORMAT_VERSION, 0, file_uuid, size,
                                 int(time.time()))
            _write_aligned(fd, 0, block)
            os.fdatasync(fd)
        return fd, size, file_uuid
    except BaseException:
        os.close(fd)
        raise


def _aligned(n: int):
    import mmap  # anonymous mmap memory is page aligned, as O_DIRECT needs
    return mmap.mmap(-1, n)


def _read_aligned(fd: int, off: int, n: int) -> bytes:
    buf = _aligned(n)
    got = os.preadv(fd, [buf], off)
    data = bytes(buf[:got])
    buf.close()
    return data.ljust(n, b"\0")


def _write_aligned(fd: int, off: int, data: bytes) -> None:
    buf = _aligned(len(data))
    buf[:] = data
    os.pwritev(fd, [buf], off)
    buf.close()


class Store:
    def __init__(self, data_paths: list[str], meta_dir: str, capacity: int, *, sync: bool,
                 min_block: int, max_block: int, ram_cache: int = 0, quotas: dict | None = None,
                 journal_max: int = CHECKPOINT_JOURNAL_BYTES):
        self.sync = sync
        self.quotas = dict(quotas or {})
        self.ram = RamCache(ram_cache)
        self.min_block = min_block
        self.max_block = max_block
        self.meta_dir = meta_dir
        self._lock = threading.Lock()
        self._jlock = threading.Lock()  # orders journal writes; held across write + fdatasync
        self._ckpt_lock = threading.Lock()  # one checkpoint at a time
        self._ckpt_due = threading.Event()  # the journal is large: the flusher writes a checkpoint
        self.journal_max = journal_max
        self._jbuf = bytearray()
        self._next_seq = 1
        self.namespaces: dict[int, Namespace] = {}
        self._ns_by_name: dict[str, Namespace] = {}
        self.counters = collections.Counter()
        self.startup_s = 0.0
        self._closed = False
        self._jfd = None
        self._jtorn = False     # the open journal may not be appended to (see _write_records)
        self._unsynced = bytearray()  # records appended to it since its last successful flush
        self._jfailing = False  # the last journal write failed (logged once until one succeeds)
        t0 = time.monotonic()
        os.makedirs(meta_dir, exist_ok=True)
        self._owner_fd = os.open(os.path.join(meta_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.files: list[DataFile] = []
        self._rr = 0
        self._used = 0  # ring bytes of live records (kept as they change: stats must not scan)
        self._ckpt_path = os.path.join(meta_dir, "index.ckpt")
        try:
            _claim(self._owner_fd, f"the store at {meta_dir}")
            share = capacity // len(data_paths) // ALIGN * ALIGN
            for i, path in enumerate(data_paths):
                fd, size, file_uuid = _open_data_path(path, share)
                self.files.append(DataFile(i, path, size, fd, file_uuid))
                if size - SUPERBLOCK_LEN < 2 * record_length(max_block):
                    raise StoreError(f"data path {path} gets {size} bytes, too small for two blocks "
                                     f"of the maximum size {max_block}; raise --capacity or lower "
                                     "--max-block")
            blocks = self._recover()
        except BaseException:  # nothing stays open or locked: the paths may be tried again
            for fd in [f.fd for f in self.files] + [self._jfd, self._owner_fd]:
                if fd is not None:
                    os.close(fd)
            raise
        self.startup_s = time.monotonic() - t0
        log.info("store ready: %d blocks in %d namespaces, %d data path(s), %.1f GiB, recovered in "
                 "%.3f s", blocks, len(self.namespaces), len(self.files),
                 sum(f.size for f in self.files) / 2**30, self.startup_s)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="memkv-journal", daemon=True)
        self._flusher.start()
        self.ram.start(self._lock)
        # write-behind: seq -> (entry, cache slot) of records acknowledged but not yet on disk
        self._behind: dict[int, tuple] = {}
        self._behind_bytes = 0
        self._behind_idle = threading.Condition(self._lock)
        self.write_behind = None if sync else native.WriteBehind()
        if self.write_behind is not None:
            self._behind_thread = threading.Thread(target=self._write_behind_loop,
                                                   name="memkv-write-behind", daemon=True)
            self._behind_thread.start()

    # ---- namespaces ------------------------------------------------------------------------
    def namespace(self, name: str) -> int:
        with self._lock:
            ns = self._ns_by_name.get(name)
            if ns is None:
                ns = self._add_namespace(len(self.namespaces) + 1, name)
                self._journal(MetaType.NAMESPACE, ns.id, name.encode())
        return ns.id

    def _add_namespace(self, ns_id: int, name: str) -> Namespace:
        ns = Namespace(ns_id, name, self.quotas.get(name, self.quotas.get("*", 0)))
        self.namespaces[ns_id] = ns
        self._ns_by_name[name] = ns
        return ns

    # ---- put -------------------------------------------------------------------------------
    def plan_put(self, ns_id: int, keys: list[bytes], lens, key_addrs, *, replace: bool = False
                 ) -> tuple[bytearray, list]:
        """Decide each descriptor's fate: STORE at a fresh slot, or DRAIN (duplicate / FULL).
        With replace, a committed key is stored again and the new block supersedes it.
        Returns the memkv_io rows for C and the plan: the new entries (None where nothing is
        written) and the DRAM cache slots their payloads are copied into as they arrive (fresh
        blocks are the likeliest to be read next: another worker's shared prefix)."""
        n = len(keys)
        ios = bytearray(native.IO.size * n)
        entries: list = [None] * n
        slots: list = [None] * n
        ns = self.namespaces[ns_id]
        with self._lock:
            for i, key in enumerate(keys):
                length = lens[i]
                status = Status.OK
                action = native.ACT_DRAIN
                if replace or key not in ns.index:
                    placed = None
                    if ns.quota and length > ns.quota:
                        status = Status.BAD_LENGTH  # can never fit its namespace
                    elif ns.quota and not self._make_room(ns, length):
                        status = Status.FULL
                    else:
                        placed = self._allocate(record_length(length))
                        if placed is None:
                            status = Status.FULL
                    if placed is not None:
                        f, off = placed
                        e = Entry(ns, key, f, off, length, 0, self._take_seq())
                        e.busy = 1
                        e.ref = True  # CLOCK: a new block is referenced
                        e.replace = replace
                        ns.reserved += length
                        f.ring.append(e)
                        self._used += e.reclen
                        entries[i] = e
                        action, slots[i], fill = self._stage(e)
                e = entries[i]
                native.IO.pack_into(ios, i * native.IO.size, e.file.fd if e else -1, ns_id,
                                    e.off if e else 0, length, 0, e.seq if e else 0, 0,
                                    key_addrs[i], len(key), action, status, native.RES_PRESET,
                                    0, fill if e else 0)
        return ios, (entries, slots)

    def _stage(self, e: Entry):
        """Where a new block's bytes go: (action, cache slot, its address for C). Async: its
        whole record into a cache slot, written behind; else written now, copied to the cache."""
        if self.write_behind is not None:
            slot = self.ram.reserve(e, record=True)
            if slot is not None:
                e.busy += 1  # held by the write until it reports
                slot.busy += 1
                e.behind = True
                self._behind[e.seq] = (e, slot)
                self._behind_bytes += e.len
                self.counters["put_written_behind"] += 1
                return native.ACT_BEHIND, slot, self.ram.record_address(slot)
        slot = self.ram.reserve(e)
        return native.ACT_STORE, slot, self.ram.address(slot) if slot else 0

    def _commit_one(self, e: Entry, result: int, ios: bytearray, i: int) -> bool:
        """Make one written block visible and journal it (a block written behind: once it is on
        disk); False if it does not count."""
        ns = e.ns
        if result != native.RES_OK or not e.live:  # not live: its write-behind already failed
            self._retire(e)
            if result == native.RES_BAD_CSUM:
                self.counters["put_checksum_mismatch"] += 1
            return False
        old = ns.index.get(e.key)
        if old is not None:
            if not e.replace or old.seq > e.seq:
                self._retire(e)  # a put of the same key committed first (or newer)
                return False
            self._retire(old)    # replaced: the journal's PUT supersedes it on replay
            e.pinned = old.pinned  # (the index's pinned count stays)
            ns.bytes -= old.len
        e.csum = native.IO.unpack_from(ios, i * native.IO.size)[4]  # hashed as written
        ns.index[e.key] = e
        ns.bytes += e.len
        ns.puts += 1
        if ns.order is not None:
            ns.order.append(e)
            if len(ns.order) > 2 * len(ns.index) + 1024:  # mostly entries gone by other ways
                ns.order = collections.deque(x for x in ns.order if ns.index.get(x.key) is x)
        if not e.behind:
            self._journal_put(e)
        return True

    def _journal_put(self, e: Entry) -> None:
        self._journal(MetaType.PUT, e.ns.id, e.key, e.file.number, e.seq, e.off, e.len, e.csum,
                      FLAG_PINNED if e.pinned else 0)

    def commit_put(self, plan: tuple, ios: bytearray) -> list[Status]:
        """After C wrote (or started writing) the blocks: make the good ones visible and
        durable, return statuses."""
        entries, slots = plan
        statuses = [Status(s) for s in ios[native.IO_STATUS_AT::native.IO.size]]
        results = ios[native.IO_RESULT_AT::native.IO.size]
        actions = ios[native.IO_ACTION_AT::native.IO.size]
        if self.sync:
            try:
                for fd in {e.file.fd for e in entries if e is not None}:
                    os.fdatasync(fd)
            except OSError as err:  # the disk may not hold them: none of them is stored
                self.counters["put_sync_errors"] += 1
                log.error("fdatasync of a data path failed (%s): %d put(s) answered IO_ERROR",
                          err.strerror, sum(e is not None for e in entries))
                results = bytes(native.RES_IO if e is not None else r for e, r in zip(entries, results))
                statuses = [Status.IO_ERROR if e is not None else st for e, st in zip(entries, statuses)]
        with self._lock:
            for i, e in enumerate(entries):
                if e is None:
                    continue
                e.busy -= 1
                e.ns.reserved -= e.len
                if statuses[i] == Status.OK and not e.live:  # its write-behind failed already
                    statuses[i] = Status.IO_ERROR
                committed = self._commit_one(e, results[i], ios, i)
                if slots[i] is not None:
                    self.ram.filled(slots[i], committed)  # the cache keeps committed bytes only
                if actions[i] == native.ACT_BEHIND and results[i] == native.RES_PRESET:
                    self._written(e.seq, -errno.ECANCELED)  # never started: no report follows
        if self.sync:
            self._flush_durably(statuses)
        return statuses

    def _flush_durably(self, statuses: list) -> None:
        """Sync mode: flush the journal before the reply. If that fails, no OK may be sent: not
        for what this batch changed, nor for a put that found its key present (it is durable only
        once the journal holding it is). Their records stay pending: what a later flush writes
        takes effect, as a write answered with an error may."""
        try:
            self._flush_journal(True)
        except OSError:
            statuses[:] = [Status.IO_ERROR if st == Status.OK else st for st in statuses]

    # ---- write-behind (async) ----------------------------------------------------------------
    def _write_behind_loop(self) -> None:
        while not (self._stop.is_set() and not self._behind):
            done = self.write_behind.wait(0.5)
            if done:
                with self._lock:
                    for seq, err in done:
                        self._written(seq, err)

    def _written(self, seq: int, err: int) -> None:
        """A write-behind record reached the disk (err 0) or did not (caller holds the lock)."""
        e, slot = self._behind.pop(seq)
        self._behind_bytes -= e.len
        e.behind = False
        e.busy -= 1
        self.ram.done(slot)
        current = e.live and e.ns.index.get(e.key) is e
        if err == 0:
            if current:  # (not committed yet: its commit journals it)
                self._journal_put(e)
        elif err != -errno.ECANCELED:  # cancelled: the put itself failed and was not acknowledged
            self.counters["write_behind_errors"] += 1
            log.error("write-behind of block %s/%s to %s+%d failed (%s): %s", e.ns.name, e.key.hex(),
                      e.file.path, e.off, os.strerror(-err), "the acknowledged block is lost"
                      if current else "its put is answered IO_ERROR")
            if current:
                self._drop(e)
            self._retire(e)
        if not self._behind:
            self._behind_idle.notify_all()

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _allocate(self, reclen: int):
        """Place a record of reclen bytes; returns (file, off) or None when nothing is evictable."""
        n = len(self.files)
        for k in range(n):  # round-robin over data paths, falling back to the others when full
            f = self.files[(self._rr + k) % n]
            off = self._allocate_in(f, reclen)
            if off is not None:
                self._rr = (self._rr + k + 1) % n
                return f, off
        return None

    def _allocate_in(self, f: DataFile, reclen: int):
        ring = f.ring
        travelled = 0
        limit = 2 * f.size  # two laps: every reference bit is cleared by the first
        while travelled <= limit:
            if f.head + reclen > f.size:
                travelled += f.size - f.head
                # the tail of the file is skipped this lap; blocks there come last from offset 0
                tail = 0
                for e in ring:
                    if e.off < f.head:
                        break
                    tail += 1
                ring.rotate(-tail)
                f.head = SUPERBLOCK_LEN
                continue
            end = f.head + reclen
            while ring and ring[0].off < end and ring[0].off >= f.head:
                e = ring[0]
                if not e.live and not e.busy:
                    ring.popleft()
                elif e.pinned or e.busy or e.ref:  # busy: a write or read may still be in flight
                    e.ref = False
                    ring.rotate(-1)
                    travelled += e.off + e.reclen - f.head
                    f.head = e.off + e.reclen
                    break
                else:
                    ring.popleft()
                    self._evict(e)
            else:
                off = f.head
                f.head = end
                return off
        return None

    def _make_room(self, ns: Namespace, length: int) -> bool:
        """Below its quota with `length` more bytes, evicting the namespace's own blocks by CLOCK
        (pinned ones, ones in use and ones read since the last pass keep their place)."""
        over = ns.bytes + ns.reserved + length - ns.quota
        order = ns.order
        passes = 2 * len(order)  # the first pass may only clear reference bits
        while over > 0 and passes and order:
            passes -= 1
            e = order.popleft()
            if ns.index.get(e.key) is not e or e.pinned:
                continue  # evicted, deleted or replaced meanwhile; pinned: back when unpinned
            if e.busy or e.ref:
                e.ref = False
                order.append(e)
                continue
            self._evict(e)
            self.counters["evictions_quota"] += 1
            over -= e.len
        return over <= 0

    def _retire(self, e: Entry) -> None:
        """e no longer holds its place in the ring (evicted, deleted, dropped, replaced, or never
        committed); the ring reclaims it when its head gets there."""
        if e.live:
            e.live = False
            self._used -= e.reclen

    def _evict(self, e: Entry) -> None:
        self._retire(e)
        ns = e.ns
        if ns.index.get(e.key) is e:
            del ns.index[e.key]
            ns.bytes -= e.len
            ns.evictions += 1
            self.counters["evictions"] += 1
            self._journal(MetaType.EVICT, ns.id, e.key, e.file.number, e.seq)

    # ---- get -------------------------------------------------------------------------------
    def plan_get(self, ns_id: int, keys: list[bytes], caps, key_addrs) -> tuple[bytearray, tuple]:
        """Per key: send from the DRAM cache, read from disk (filling the cache), or reply a status.
        The plan keeps every buffer C touches alive until finish_get."""
        n = len(keys)
        ios = bytearray(native.IO.size * n)
        entries: list = [None] * n
        slots: list = [None] * n  # DRAM cache slots sent from or filled
        ns = self.namespaces[ns_id]
        with self._lock:
            for i, key in enumerate(keys):
                e = ns.index.get(key)
                action, status, ram, fill = native.ACT_REPLY, Status.MISS, 0, 0
                if e is not None:
                    if e.len > caps[i]:
                        status = Status.BUFFER_TOO_SMALL
                    else:
                        e.ref = True
                        entries[i] = e
                        status = Status.OK
                        slot = self.ram.lookup(e)
                        if slot is not None:
                            action, ram = native.ACT_RAM, self.ram.address(slot)
                        else:
                            e.busy += 1
                            action, slot = native.ACT_LOAD, self.ram.reserve(e)
                            fill = self.ram.address(slot) if slot is not None else 0
                        slots[i] = slot
                native.IO.pack_into(ios, i * native.IO.size, e.file.fd if e else -1, ns_id,
                                    e.off if e else 0, e.len if e else 0, e.csum if e else 0,
                                    e.seq if e else 0, caps[i], key_addrs[i], len(key), action,
                                    status, native.RES_PRESET, ram, fill)
        return ios, (entries, slots)

    def finish_get(self, ns_id: int, plan: tuple, ios: bytearray) -> None:
        entries, slots = plan
        results = ios[native.IO_RESULT_AT::native.IO.size]
        actions = ios[native.IO_ACTION_AT::native.IO.size]
        ns = self.namespaces[ns_id]
        with self._lock:
            for i, e in enumerate(entries):
                r = results[i]
                if e is None:
                    if r == native.RES_PRESET:
                        ns.misses += 1
                    continue
                if actions[i] == native.ACT_RAM:
                    self.ram.done(slots[i])
                    if r == native.RES_OK:
                        ns.hits += 1
                        self.counters["get_from_ram"] += 1
                    continue
                e.busy -= 1
                if slots[i] is not None:
                    self.ram.filled(slots[i], r == native.RES_OK)
                if r == native.RES_OK:
                    ns.hits += 1
                elif r in (native.RES_PRESET, native.RES_FAULT):
                    pass  # the client went away before this one, or named a bad buffer (cma)
                else:
                    ns.misses += 1
                    what = {native.RES_STALE: "stale", native.RES_CORRUPT: "corrupt",
                            native.RES_IO: "io_error"}[r]
                    self.counters[f"get_{what}"] += 1
                    log.warning("dropping %s block %s/%s at %s+%d (seq %d): served as a miss",
                                what, ns.name, e.key.hex(), e.file.path, e.off, e.seq)
                    self._drop(e)

    def _drop(self, e: Entry) -> None:
        if e.live and e.ns.index.get(e.key) is e:
            del e.ns.index[e.key]
            e.ns.bytes -= e.len
            e.ns.pinned -= e.pinned
            self._journal(MetaType.DELETE, e.ns.id, e.key, e.file.number, e.seq)
        self._retire(e)

    # ---- metadata ops ------------------------------------------------------------------------
    def exists(self, ns_id: int, keys: list[bytes]) -> list[int]:
        """Wire status per key: OK when stored, MISS when not."""
        index = self.namespaces[ns_id].index
        ok, miss = int(Status.OK), int(Status.MISS)  # plain ints: no enum lookup per key
        with self._lock:
            return [ok if k in index else miss for k in keys]

    def delete(self, ns_id: int, keys: list[bytes]) -> list[Status]:
        return self._update(ns_id, keys, self._drop)

    def pin(self, ns_id: int, keys: list[bytes], pinned: bool) -> list[Status]:
        kind = MetaType.PIN if pinned else MetaType.UNPIN

        def apply(e):
            if e.pinned != pinned:
                e.pinned = pinned
                e.ns.pinned += 1 if pinned else -1
                if not pinned and e.ns.order is not None:
                    e.ns.order.append(e)  # evictable at its quota again
                self._journal(kind, e.ns.id, e.key, e.file.number, e.seq)
        return self._update(ns_id, keys, apply)

    def _update(self, ns_id, keys, apply) -> list[Status]:
        index = self.namespaces[ns_id].index
        out = []
        with self._lock:
            for k in keys:
                e = index.get(k)
                if e is None:
                    out.append(Status.MISS)
                else:
                    apply(e)
                    out.append(Status.OK)
        if self.sync:
            self._flush_durably(out)
        return out

    def stats(self, ns_id: int | None = None) -> dict:
        with self._lock:
            nss = {ns.name: {"blocks": len(ns.index), "bytes": ns.bytes, "hits": ns.hits,
                             "misses": ns.misses, "puts": ns.puts, "evictions": ns.evictions,
                             "pinned": ns.pinned, "quota_bytes": ns.quota or None}
                   for ns in self.namespaces.values() if ns_id is None or ns.id == ns_id}
            return {"capacity_bytes": sum(f.size - SUPERBLOCK_LEN for f in self.files),
                    "used_bytes": self._used, "blocks": sum(len(ns.index) for ns in self.namespaces.values()),
                    "durability": "sync" if self.sync else "async",
                    "block_size_range": [self.min_block, self.max_block],
                    "startup_seconds": round(self.startup_s, 4), "counters": dict(self.counters),
                    "ram_cache": self.ram.stats(),
                    "write_behind": {"blocks": len(self._behind), "bytes": self._behind_bytes},
                    "data_paths": [f.path for f in self.files], "namespaces": nss}

    # ---- journal -----------------------------------------------------------------------------
    def _journal(self, kind, ns_id, key, file=0, seq=0, off=0, length=0, csum=0, flags=0) -> None:
        """Append one record to the in-memory journal buffer (caller holds self._lock)."""
        _pack_meta(self._jbuf, kind, ns_id, key, file, seq, off, length, csum, flags)

    def _flush_journal(self, durable: bool) -> None:
        """Append the pending records (and flush them to disk when durable). On failure (e.g. the
        meta dir is full) it raises OSError; see _write_records."""
        with self._jlock:
            with self._lock:
                data, self._jbuf = self._jbuf, bytearray()
            try:
                self._write_records(data, durable)
            except OSError as e:
                self.counters["journal_errors"] += 1
                if not self._jfailing:
                    log.error("journal write to %s failed (%s): sync puts, deletes and pins are "
                              "answered IO_ERROR until it succeeds; free space in --meta-dir %s",
                              self._journal_path, e.strerror, self.meta_dir)
                self._jfailing = True
                raise
            if self._jfailing:
                log.warning("journal writes to %s succeed again", self._journal_path)
                self._jfailing = False
            if self._jsize > self.journal_max:
                self._ckpt_due.set()  # the flusher thread writes it: no request waits for it

    def _write_records(self, data: bytearray, durable: bool) -> None:
        """Append records taken from _jbuf to the open journal, and flush it to disk when durable
        (caller holds _jlock). On failure every record not known to be on disk goes back to the
        front of _jbuf and OSError is raised. A journal whose flush failed (its pages may be gone
        even if a later flush says otherwise) or whose torn tail could not be cut is left: the
        records go to a new journal file, which recovery replays after it (a record replayed twice
        in a row changes nothing)."""
        written = False
        try:
            if self._jtorn:
                self._open_journal(self._journal_id + 1)
            if data:
                _seal_meta(data)
                self._append_journal(data)
                self._unsynced += data
            written = True
            if durable and self._unsynced:
                os.fdatasync(self._jfd)
                self._unsynced = bytearray()
        except OSError:
            with self._lock:
                if written:
                    self._jtorn = True
                if self._jtorn:
                    again = self._unsynced if written else self._unsynced + data
                    self._unsynced = bytearray()
                else:
                    again = data
                self._jbuf[:0] = again  # (sealed again before the next write)
            raise

    def _append_journal(self, data: bytearray) -> None:
        """All of data at the journal's end, or nothing: a torn record would hide every record
        after it from recovery."""
        start = JOURNAL_HDR.size + self._jsize
        done = 0
        try:
            with memoryview(data) as view:
                while done < len(data):
                    done += os.write(self._jfd, view[done:])
        except OSError:
            if done:
                try:
                    os.ftruncate(self._jfd, start)
                except OSError:
                    self._jtorn = True  # the next write starts a new journal file
            raise
        self._jsize += len(data)

    def _flush_loop(self) -> None:
        while not self._stop.wait(ASYNC_FLUSH_S):
            try:
                self._flush_journal(True)
            except OSError:
                pass  # logged once by _flush_journal; its records are retried a second later
            if self._ckpt_due.is_set():
                self._ckpt_due.clear()
                try:
                    self.checkpoint()
                except OSError as e:
                    # its journals are kept and replayed; the next try comes once the new
                    # journal is as large
                    log.error("checkpoint to %s failed (%s); free space in --meta-dir %s",
                              self._ckpt_path, e.strerror, self.meta_dir)

    # ---- checkpoint and recovery ----------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the whole index as a new checkpoint. The store lock is held only to list the
        index: records from then on go to a new journal file while the checkpoint is packed and
        written, and the journals it covers are deleted once it is on disk."""
        with self._ckpt_lock:
            with self._jlock:
                with self._lock:
                    pending, self._jbuf = self._jbuf, bytearray()
                    nss = [(ns.id, ns.name) for ns in self.namespaces.values()]
                    entries = [e for ns in self.namespaces.values() for e in ns.index.values()
                               if not e.behind]  # (written behind: journaled once on disk)
                    heads = b"".join(CKPT_FILE.pack(f.uuid, f.head) for f in self.files)
                    next_seq = self._next_seq
                # what happened before the listing goes to the journal the checkpoint covers
                self._write_records(pending, durable=True)
                covered = self._journal_id
                self._open_journal(covered + 1)
            records = bytearray()
            for ns_id, name in nss:
                _pack_meta(records, MetaType.NAMESPACE, ns_id, name.encode())
            for e in entries:
                _pack_meta(records, MetaType.PUT, e.ns.id, e.key, e.file.number, e.seq, e.off,
                           e.len, e.csum, FLAG_PINNED if e.pinned else 0)
            _seal_meta(records)
            body = CKPT_HDR.pack(CKPT_MAGIC, FORMAT_VERSION, 0, covered, next_seq, len(self.files),
                                 len(nss) + len(entries)) + heads + records
            body += CKPT_TRAILER.pack(native.xxh3(body))
            _atomic_write(self._ckpt_path, body)
            for jid, path in self._journal_files():
                if jid <= covered:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass  # recovery skips what the checkpoint covers
            log.info("checkpoint: %d records, %.1f MiB, covers journal %d", len(nss) + len(entries),
                     len(body) / 2**20, covered)

    def _journal_files(self) -> list[tuple[int, str]]:
        """(id, path) of the journal files in the meta dir, oldest first. Each is named by its id;
        "journal" is the one file of stores written before journals were numbered."""
        out = []
        for name in os.listdir(self.meta_dir):
            if name == "journal" or (name.startswith("journal.") and name[8:].isdigit()):
                path = os.path.join(self.meta_dir, name)
                with open(path, "rb") as fh:
                    head = fh.read(JOURNAL_HDR.size)
                if len(head) == JOURNAL_HDR.size:
                    magic, _, _, jid = JOURNAL_HDR.unpack(head)
                    if magic == JOURNAL_MAGIC:
                        out.append((jid, path))
        return sorted(out)

    @property
    def _journal_path(self) -> str:
        return self._journal_file(self._journal_id)

    def _journal_file(self, journal_id: int) -> str:
        return os.path.join(self.meta_dir, f"journal.{journal_id}")

    def _open_journal(self, journal_id: int) -> None:
        """Start appending to a new journal file (the open one is kept if that fails). Callers
        leave no record of the open one unflushed, or put such records in the new one."""
        path = self._journal_file(journal_id)
        _atomic_write(path, JOURNAL_HDR.pack(JOURNAL_MAGIC, FORMAT_VERSION, 0, journal_id))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if self._jfd is not None:
            os.close(self._jfd)
        self._jfd = fd
        self._journal_id = journal_id
        self._jsize = 0
        self._unsynced = bytearray()
        self._jtorn = False

    def _recover(self) -> int:
        by_uuid = {f.uuid: f for f in self.files}
        heads: dict[DataFile, int] = {}
        covered = 0
        self._journal_id = 0
        if os.path.exists(self._ckpt_path):
            with open(self._ckpt_path, "rb") as fh:
                data = fh.read()
            if (len(data) < CKPT_HDR.size + 8 or native.xxh3(data[:-8]) !=
                    CKPT_TRAILER.unpack_from(data, len(data) - 8)[0]):
                raise StoreError(f"checkpoint {self._ckpt_path} is damaged; move it away to start "
                                 "with the journal only (blocks written before it are then lost)")
            magic, version, _, covered, next_seq, n_files, n_rec = CKPT_HDR.unpack_from(data)
            if magic != CKPT_MAGIC or version != FORMAT_VERSION:
                raise StoreError(f"checkpoint {self._ckpt_path} has an unknown format")
            pos = CKPT_HDR.size
            file_map = {}
            for i in range(n_files):
                fu, head = CKPT_FILE.unpack_from(data, pos)
                pos += CKPT_FILE.size
                if fu in by_uuid:
                    file_map[i] = by_uuid[fu]
                    heads[by_uuid[fu]] = head
                else:
                    log.warning("data file #%d of the checkpoint is no longer configured; its "
                                "blocks are dropped", i)
            self._next_seq = next_seq
            self._replay(memoryview(data)[pos:pos + n_rec * META_REC.size], file_map)
            self._journal_id = covered
        file_map = {f.number: f for f in self.files}
        replayed = False
        for jid, path in self._journal_files():
            if jid <= covered:
                continue  # the checkpoint holds it (a crash came before it was deleted)
            with open(path, "rb") as fh:
                body = memoryview(fh.read())[JOURNAL_HDR.size:]
            n = self._replay(body, file_map)
            if n * META_REC.size < len(body):
                log.warning("journal %d: ignored a torn tail of %d bytes", jid,
                            len(body) - n * META_REC.size)
            self._journal_id = jid
            replayed = True
        if replayed:
            self._next_seq += SEQ_FENCE
        for f in self.files:
            self._rebuild_ring(f, heads.get(f))
        for ns in self.namespaces.values():
            ns.pinned = sum(1 for e in ns.index.values() if e.pinned)
            if ns.order is not None:
                ns.order.extend(sorted(ns.index.values(), key=lambda e: e.seq))
        try:
            self.checkpoint()  # the next start reads one compact checkpoint
        except OSError as e:
            raise StoreError(f"cannot write the index checkpoint in {self.meta_dir}: {e.strerror}; "
                             "free space there") from e
        return sum(len(ns.index) for ns in self.namespaces.values())

    def _replay(self, records: memoryview, files: dict) -> int:
        """Apply META records in order; stops at the first damaged one. Returns records applied."""
        count = len(records) // META_REC.size
        sums = native.xxh3_strided(records, count, META_REC.size, META_BODY)
        for i, rec in enumerate(META_REC.iter_unpack(records[:count * META_REC.size])):
            magic, kind, klen, fno, ns_id, flags, seq, off, length, csum, key, crc = rec
            if magic != META_MAGIC or crc != sums[i]:
                return i
            key = key[:klen]
            self._next_seq = max(self._next_seq, seq + 1)
            if kind == MetaType.NAMESPACE:
                if ns_id not in self.namespaces:
                    self._add_namespace(ns_id, key.decode())
                continue
            ns = self.namespaces.get(ns_id)
            if ns is None:
                continue
            cur = ns.index.get(key)
            if kind == MetaType.PUT:
                f = files.get(fno)
                if f is None or off + record_length(length) > f.size:
                    continue
                if cur is not None:
                    ns.bytes -= cur.len
                e = Entry(ns, key, f, off, length, csum, seq, bool(flags & FLAG_PINNED))
                ns.index[key] = e
                ns.bytes += length
            elif cur is not None and kind in (MetaType.EVICT, MetaType.DELETE):
                if kind == MetaType.DELETE or cur.seq == seq:
                    del ns.index[key]
                    ns.bytes -= cur.len
            elif cur is not None and kind in (MetaType.PIN, MetaType.UNPIN):
                cur.pinned = kind == MetaType.PIN
        return count

    def _rebuild_ring(self, f: DataFile, head) -> None:
        entries = sorted((e for ns in self.namespaces.values() for e in ns.index.values()
                          if e.file is f), key=lambda e: e.off)
        if entries:
            newest = max(entries, key=lambda e: e.seq)
            head = newest.off + newest.reclen
        f.head = head if head else SUPERBLOCK_LEN
        after = [e for e in entries if e.off >= f.head]
        before = [e for e in entries if e.off < f.head]
        f.ring = collections.deque(after + before)
        self._used += sum(e.reclen for e in entries)

    def close(self) -> None:
        """Clean stop: flush, checkpoint, close files."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.write_behind is not None:
            with self._lock:
                if not self._behind_idle.wait_for(lambda: not self._behind, CLOSE_WAIT_S):
                    log.error("stopping with %d written-behind blocks still not on disk: they are "
                              "lost", len(self._behind))
            self._behind_thread.join(1)
        self._flusher.join()
        try:
            self._flush_journal(True)
            self.checkpoint()
        except OSError as e:
            log.error("stopping without a final checkpoint (%s): the next start replays the "
                      "journal; records not yet in it are lost", e.strerror)
        os.close(self._jfd)
        for f in self.files:
            os.close(f.fd)
        os.close(self._owner_fd)


def _pack_meta(buf: bytearray, kind, ns_id, key, file=0, seq=0, off=0, length=0, csum=0,
               flags=0) -> None:
    """Append one journal/checkpoint record to buf, its checksum still 0 (see _seal_meta): an
    eviction storm appends thousands of them under the store's lock."""
    buf += META_REC.pack(META_MAGIC, kind, len(key), file, ns_id, flags, seq, off, length, csum, key, 0)


_META_WORDS = META_REC.size // 8  # a whole number of words (184 B), the checksum the last


def _seal_meta(buf: bytearray) -> None:
    """Write each record's checksum (xxh3 of its body, in C for all of them) before it is written."""
    sums = native.xxh3_strided(buf, len(buf) // META_REC.size, META_REC.size, META_BODY)
    with memoryview(buf) as view, view.cast("Q") as words:
        words[_META_WORDS - 1::_META_WORDS] = sums  # the checksum is each record's last word


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # e.g. a full meta dir: leave no partial file taking its space
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
