"""Typed wrappers around the C data path. The only module that touches the cffi `lib`.

Every call here runs in C with the GIL released; arguments are validated by the callers
(client, server) before they get here. Negative errno results become OSError.
"""
import os
import struct
from array import array

from ._version import __version__
from .errors import AuthError, MemkvError, ProtocolError, ServerError
from .protocol import endpoint_name

try:
    from ._native._memkv import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MemkvError(
        "memkv's native module is not built; run the set-up command from the README "
        f"(scripts/setup.sh) to build it ({exc})") from exc

_built = ffi.string(lib.memkv_native_version()).decode()
if _built != __version__:  # pragma: no cover - a stale build must fail loudly
    raise MemkvError(f"memkv native module is version {_built} but the package is {__version__}; "
                     "rebuild with scripts/setup.sh")

# struct memkv_io, as a Python struct (offsets are checked against C in tests/test_formats.py)
IO = struct.Struct("<iIQQQQQQHBBB3xQQ")
IO_ACTION_AT = 58
IO_STATUS_AT = 59
IO_RESULT_AT = 60
ACT_STORE, ACT_DRAIN, ACT_LOAD, ACT_REPLY, ACT_RAM, ACT_BEHIND = (
    lib.MEMKV_ACT_STORE, lib.MEMKV_ACT_DRAIN, lib.MEMKV_ACT_LOAD, lib.MEMKV_ACT_REPLY,
    lib.MEMKV_ACT_RAM, lib.MEMKV_ACT_BEHIND)
RES_OK, RES_BAD_CSUM, RES_IO, RES_STALE, RES_CORRUPT, RES_PRESET, RES_FAULT = (
    lib.MEMKV_RES_OK, lib.MEMKV_RES_BAD_CSUM, lib.MEMKV_RES_IO, lib.MEMKV_RES_STALE,
    lib.MEMKV_RES_CORRUPT, lib.MEMKV_RES_PRESET, lib.MEMKV_RES_FAULT)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def address_of(buf) -> int:
    """Address of a writable-or-readonly buffer-protocol object (kept alive by the caller)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def xxh3(data, seed: int = 0) -> int:
    return lib.memkv_xxh3(ffi.from_buffer(data), len(memoryview(data).cast("B")), seed)


def xxh3_strided(buf, count: int, stride: int, length: int) -> array:
    """xxh3 of `count` records of `length` bytes placed every `stride` bytes of buf."""
    base = address_of(buf)
    ptrs = array("Q", range(base, base + count * stride, stride))
    lens = array("Q", [length]) * count
    return checksums(ptrs, lens)


def checksums(ptrs: array, lens: array) -> array:
    out = array("Q", bytes(8 * len(ptrs)))
    lib.memkv_xxh3_many(len(ptrs), ffi.from_buffer("uint64_t[]", ptrs),
                        ffi.from_buffer("uint64_t[]", lens), ffi.from_buffer("uint64_t[]", out))
    return out


def rendezvous(keys_blob: bytes, key_lens: array, seeds: array) -> array:
    out = array("I", bytes(4 * len(key_lens)))
    lib.memkv_rendezvous(len(key_lens), ffi.from_buffer(keys_blob), ffi.from_buffer("uint16_t[]", key_lens),
                         len(seeds), ffi.from_buffer("uint64_t[]", seeds), ffi.from_buffer("uint32_t[]", out))
    return out


def build_descs(key_lens: array, lens: array | None = None) -> bytes:
    n = len(key_lens)
    out = bytearray(24 * n)
    lib.memkv_build_descs(n, ffi.from_buffer("uint16_t[]", key_lens),
                          ffi.from_buffer("uint64_t[]", lens) if lens is not None else ffi.NULL,
                          ffi.NULL, ffi.from_buffer("struct memkv_req_desc[]", out))
    return bytes(out)


def check_descs(table, count: int, keys_len: int, min_len: int, max_len: int) -> int:
    """Validate a received descriptor table; returns the payload total or raises ProtocolError."""
    err = ffi.new("char[256]")
    total = ffi.new("uint64_t *")
    rc = lib.memkv_check_descs(ffi.from_buffer("struct memkv_req_desc[]", table), count, keys_len,
                               min_len, max_len, total, err, 256)
    if rc:
        raise ProtocolError(ffi.string(err).decode())
    return total[0]


def send_all(fd: int, data) -> None:
    _check(lib.memkv_send_all(fd, ffi.from_buffer(data), len(data)), "send")


def recv_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    if n:
        _check(lib.memkv_recv_all(fd, ffi.from_buffer(buf), n), "receive")
    return buf


class Conn:
    """One authenticated connection (C: struct memkv_conn). Errors: OSError when the connection
    broke (close it), AuthError / ServerError when the server refused (their text is the server's)."""

    def __init__(self, host: str, port: int, namespace: bytes, secret: bytes | None, timeout: float,
                 same_host: bool = True):
        from .errors import AuthError, ConnectionFailed
        self.name = endpoint_name(host, port)
        self._c = ffi.new("struct memkv_conn *")
        err = ffi.new("char[1024]")
        secret = secret or b""
        rc = lib.memkv_conn_open(self._c, host.encode(), port, namespace, len(namespace), secret,
                                 len(secret), max(1, int(timeout * 1000)), int(same_host), err, 1024)
        if rc == 1:
            cls = AuthError if self._c.last_status == lib.MEMKV_ST_AUTH_FAILED else ServerError
            raise cls(ffi.string(err).decode(errors="replace"))
        if rc < 0:
            text = ffi.string(err).decode(errors="replace") or f"no answer from memkv server {self.name}"
            raise ConnectionFailed(f"{text}: {os.strerror(-rc)}")
        self.fd = self._c.fd
        self.cma = bool(self._c.cma)
        self.max_block, self.min_block, self.max_batch = self._c.max_block, self._c.min_block, self._c.max_batch

    def close(self) -> None:
        lib.memkv_conn_close(self._c)

    def _result(self, rc: int, err, what: str) -> None:
        if rc == 1:
            cls = AuthError if self._c.last_status == lib.MEMKV_ST_AUTH_FAILED else ServerError
            raise cls(ffi.string(err).decode(errors="replace"))
        if rc == -71:  # EPROTO
            raise ProtocolError("server sent a malformed reply (wrong magic, count, or a block larger "
                                "than the buffer asked for)")
        _check(rc, what)

    def put(self, keys_blob: bytes, key_lens: array, ptrs: array, lens: array, flags: int = 0) -> bytes:
        n = len(key_lens)
        status, err = bytearray(n), ffi.new("char[1024]")
        rc = lib.memkv_conn_put(self._c, n, keys_blob, ffi.from_buffer("uint16_t[]", key_lens),
                                ffi.from_buffer("uint64_t[]", ptrs), ffi.from_buffer("uint64_t[]", lens),
                                flags, ffi.from_buffer(status), err, 1024)
        self._result(rc, err, "put")
        return bytes(status)

    def get(self, keys_blob: bytes, key_lens: array, ptrs: array, caps: array, verify: bool):
        n = len(key_lens)
        status, lens, err = bytearray(n), array("Q", bytes(8 * n)), ffi.new("char[1024]")
        rc = lib.memkv_conn_get(self._c, n, keys_blob, ffi.from_buffer("uint16_t[]", key_lens),
                                ffi.from_buffer("uint64_t[]", ptrs), ffi.from_buffer("uint64_t[]", caps),
                                int(verify), ffi.from_buffer(status), ffi.from_buffer("uint64_t[]", lens),
                                err, 1024)
        self._result(rc, err, "get")
        return bytes(status), lens

    def keyed(self, op: int, keys_blob: bytes, key_lens: array) -> bytes:
        n = len(key_lens)
        status, err = bytearray(n), ffi.new("char[1024]")
        rc = lib.memkv_conn_keyed(self._c, op, n, keys_blob, ffi.from_buffer("uint16_t[]", key_lens),
                                  ffi.from_buffer(status), err, 1024)
        self._result(rc, err, "request")
        return bytes(status)


def io_start(threads: int) -> None:
    _check(lib.memkv_io_start(threads), "start I/O threads")


def staging_limit(nbytes: int) -> None:
    """Staging buffers of all connections: kept for reuse while at most nbytes are allocated."""
    lib.memkv_staging_limit(nbytes)


def staging_stats() -> dict:
    allocated, kept = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.memkv_staging_stats(allocated, kept)
    return {"allocated_bytes": allocated[0], "kept_bytes": kept[0]}


class Arena:
    """Aligned staging buffers of one server connection."""

    def __init__(self, budget: int):
        self._ptr = ffi.gc(lib.memkv_arena_new(budget), lib.memkv_arena_free)
        if self._ptr == ffi.NULL:
            raise MemoryError("memkv arena")

    def server_put(self, sock_fd: int, ios: bytearray, n: int, cma_pid: int = 0, peer=None,
                   behind: "WriteBehind | None" = None) -> None:
        """peer: with cma, the client's buffer addresses (n little-endian u64) in process cma_pid.
        behind: where BEHIND records report once written (async durability)."""
        _check(lib.memkv_server_put(sock_fd, self._ptr, ffi.from_buffer("struct memkv_io[]", ios), n,
                                    cma_pid, _peer(peer), behind._ptr if behind else ffi.NULL),
               "copy from client" if cma_pid else "receive")

    def server_get(self, sock_fd: int, ios: bytearray, n: int, cma_pid: int = 0, peer=None) -> None:
        _check(lib.memkv_server_get(sock_fd, self._ptr, ffi.from_buffer("struct memkv_io[]", ios), n,
                                    cma_pid, _peer(peer)), "copy to client" if cma_pid else "send")


class WriteBehind:
    """One store's queue of write-behind records that reached the disk (or failed to)."""

    def __init__(self):
        self._ptr = ffi.gc(lib.memkv_behind_new(), lib.memkv_behind_free)
        if self._ptr == ffi.NULL:
            raise MemoryError("memkv write-behind queue")
        self._seqs = ffi.new("uint64_t[]", 256)
        self._errs = ffi.new("int32_t[]", 256)

    def wait(self, timeout_s: float) -> list[tuple[int, int]]:
        """Finished records as (seq, 0 or a negative errno); [] after timeout_s without any.
        One thread calls this."""
        n = lib.memkv_behind_wait(self._ptr, self._seqs, self._errs, 256, int(timeout_s * 1000))
        return [(self._seqs[i], self._errs[i]) for i in range(n)]


def _peer(table):
    return ffi.NULL if table is None else ffi.cast("const uint64_t *", ffi.from_buffer(table))


def cma_harden() -> int:
    """Drop CAP_SYS_PTRACE from the effective set of this thread and those it starts later."""
    return lib.memkv_cma_harden()


def cma_probe(pid: int, addr: int, expect: int) -> int:
    """0 when this process can read `expect` at addr in process pid, else a negative errno."""
    return lib.memkv_cma_probe(pid, addr, expect)


def disk_seq(path: str, block: int, total: int, write: bool, depth: int) -> float:
    """Seconds for a sequential O_DIRECT pass over `path` (the disk ceiling of the benchmarks)."""
    r = lib.memkv_disk_seq(path.encode(), block, total, int(write), depth)
    if r < 0:
        _check(int(r), f"O_DIRECT {'write' if write else 'read'} of {path}")
    return r
