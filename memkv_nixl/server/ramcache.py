"""The server's DRAM read cache: payloads of recently stored and recently read blocks, sent
straight from memory on the next read (a prefix one worker just computed, read by the others,
skips the disk).

The cache is one anonymous mapping used as a ring, like the data files. A stored block is copied
(by C) to the ring's head while it arrives, and a block read from disk once it is verified; a
copy counts only once its put is committed or its read verified. The oldest cached blocks ahead
of the head make room, first in, first out. The mapping is faulted in once by a background thread
at start: on these VMs first-touch page faults run at ~0.6 GB/s, slower than the network, while
copying into touched memory runs at several GB/s. A block that is being sent from the cache, or
copied into it, is never overwritten: when one is in the way the new block is simply not cached.
With async durability the cache is also the write-behind buffer: a put's whole record (header,
payload, padding; 4 KiB aligned for O_DIRECT) is assembled in a slot and written to disk from
there after the put was acknowledged; the slot stays busy until the write is done. When busy
slots fill the ring, puts are written before their reply again: the disk sets the pace.
The store calls all of this under its lock.
"""
import collections
import ctypes
import logging
import mmap
import threading

from ..diskformat import ALIGN, REC_HDR, record_length

log = logging.getLogger("memkv.server")

ROUND = 64  # cache-line aligned placement


class Slot:
    __slots__ = ("entry", "off", "len", "busy", "valid", "record")

    def __init__(self, entry, off: int, length: int, record: bool):
        self.entry, self.off, self.len, self.record = entry, off, length, record
        self.busy = 1       # being filled by the read that reserved it
        self.valid = False  # filled and verified, and still the entry's current bytes


class RamCache:
    def __init__(self, capacity: int):
        self.capacity = capacity // ROUND * ROUND
        self.base = 0          # address of the ring once it is faulted in (0: not yet, or off)
        self.ring: collections.deque[Slot] = collections.deque()  # oldest first
        self.where: dict = {}  # Entry -> valid Slot
        self.head = 0
        self.used = 0
        self._mem = None

    def start(self, lock: threading.Lock) -> None:
        """Fault the ring in on a background thread; the cache serves once it is done."""
        if self.capacity:
            threading.Thread(target=self._populate, args=(lock,), name="memkv-ram-cache",
                             daemon=True).start()

    def _populate(self, lock) -> None:
        try:
            mem = mmap.mmap(-1, self.capacity)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mem.madvise(mmap.MADV_HUGEPAGE)
            view = (ctypes.c_char * self.capacity).from_buffer(mem)
            ctypes.memset(view, 0, self.capacity)  # touch every page (GIL released)
        except (OSError, ValueError) as e:
            log.warning("DRAM read cache of %d bytes unavailable (%s); serving from disk only",
                        self.capacity, e)
            return
        with lock:
            self._mem, self._view = mem, view
            self.base = ctypes.addressof(view)

    def lookup(self, e) -> Slot | None:
        """e's cached payload, held against overwriting until done(slot); None if absent."""
        s = self.where.get(e)
        if s is not None:
            s.busy += 1
        return s

    def reserve(self, e, record: bool = False):
        """A slot for e's payload at the ring's head, to be filled by a read or a put (record:
        room for e's whole disk record, for write-behind); None when the cache is not ready, the
        block does not fit, or a busy block is in the way."""
        n = record_length(e.len) if record else e.len
        if not self.base or not 0 < n <= self.capacity:
            return None
        lo = self.head
        start = -(-lo // ALIGN) * ALIGN if record else lo
        ring = self.ring
        if start + n > self.capacity:  # wrapping: the oldest blocks from the head to the end go first
            while ring and ring[0].off >= lo:
                if not self._drop_oldest():
                    return None
            lo = start = 0
        while ring and lo <= ring[0].off < start + n:
            if not self._drop_oldest():
                return None
        slot = Slot(e, start, n, record)
        ring.append(slot)
        self.head = -(-(start + n) // ROUND) * ROUND
        return slot

    def _drop_oldest(self) -> bool:
        s = self.ring[0]
        if s.busy:
            return False
        self.ring.popleft()
        if s.valid:
            del self.where[s.entry]
            self.used -= s.len
        return True

    def address(self, slot: Slot) -> int:
        """Where slot's payload is."""
        return self.base + slot.off + (REC_HDR if slot.record else 0)

    def record_address(self, slot: Slot) -> int:
        return self.base + slot.off

    def filled(self, slot: Slot, ok: bool) -> None:
        """The read that reserved slot is over: keep the payload if it was verified and the
        block is still current (not evicted, deleted or replaced meanwhile, nor cached twice)."""
        slot.busy -= 1
        e = slot.entry
        if ok and e.live and e not in self.where:
            slot.valid = True
            self.where[e] = slot
            self.used += slot.len

    def done(self, slot: Slot) -> None:
        """A send from the cache (lookup), or the disk write of a record slot, is over."""
        slot.busy -= 1

    def stats(self) -> dict:
        return {"capacity_bytes": self.capacity, "used_bytes": self.used, "blocks": len(self.where),
                "ready": bool(self.base)}
