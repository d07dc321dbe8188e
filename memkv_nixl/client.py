"""The memkv client: batched put/get/exists/delete/pin/unpin of many blocks over a pool of servers.

Blocks come from and land in caller memory (buffer-protocol objects, CPU torch tensors, or raw
(address, length) pairs) without a copy in Python. Each key is placed on one server by rendezvous
hashing over the endpoint list; a batch fans out to all its servers at once. A server that cannot
be reached turns into misses (get/exists) or Status.UNREACHABLE (put, delete, pin) for its keys,
with one warning, and is retried with exponential backoff; it never fails the whole batch.
"""
import collections
import errno
import logging
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor

from . import native
from .errors import ConnectionFailed, InvalidArgument, ProtocolError, ServerError
from .protocol import MAX_KEY, MAX_NAMESPACE, Op, Status, endpoint_name
from .transport.connection import Connection

log = logging.getLogger("memkv.client")

DEFAULT_PORT = 9900
UNIX_SCHEME = "memkv+unix://"
FULL_RETRIES = (0.05, 0.2, 0.8)  # back-off (s) before re-sending puts refused with FULL
DEDUP_CHECK_BYTES = 4 << 20      # puts at least this large ask which keys exist first
_STATUS = tuple(Status)          # wire code -> Status without an enum call per key
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


def parse_endpoint(ep: str) -> tuple[str, int]:
    """'memkv://host:port', 'host:port' or 'host' -> (host, port); 'memkv+unix:///path' ->
    (path, 0): a server on this host, reached through its unix socket (and cma where allowed)."""
    if ep.startswith(UNIX_SCHEME):
        path = ep[len(UNIX_SCHEME):]
        if not path.startswith("/"):
            raise InvalidArgument(f"endpoint {ep!r}: expected memkv+unix:///absolute/path.sock")
        return path, 0
    rest = ep[len("memkv://"):] if ep.startswith("memkv://") else ep
    if "://" in rest or not rest:
        raise InvalidArgument(f"endpoint {ep!r}: expected memkv://host:port")
    if rest.startswith("["):  # [v6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise InvalidArgument(f"endpoint {ep!r}: port {port!r} is not a number") from None


class _Endpoint:
    """Connection pool and health of one server."""

    def __init__(self, client: "Client", host: str, port: int):
        self.client = client
        self.host, self.port = host, port
        self.name = endpoint_name(host, port)  # placement seed; the NIXL plugin's too
        self.idle: list[Connection] = []
        self.lock = threading.Lock()
        self.down_until = 0.0
        self.backoff = BACKOFF_MIN
        self.warned = False
        self.cma_warned = False
        self.limits = None

    def acquire(self) -> Connection:
        with self.lock:
            if self.idle:
                return self.idle.pop()
            if time.monotonic() < self.down_until:
                raise ConnectionFailed(f"memkv server {self.name} is marked down (retry in "
                                       f"{self.down_until - time.monotonic():.1f} s)")
        c = self.client
        try:
            conn = Connection(self.host, self.port, c.namespace_bytes, c.secret, c.timeout, c.same_host)
        except ConnectionFailed as e:
            self.mark_down(e)
            raise
        self.limits = conn.limits
        if not self.port and not conn.cma and not self.cma_warned:
            self.cma_warned = True
            log.warning("memkv server %s did not grant same-host copies (cma) to this process: "
                        "blocks go through its unix socket; the server log says why", self.name)
        self.up()
        return conn

    def release(self, conn: Connection) -> None:
        with self.lock:
            if len(self.idle) < self.client.connections_per_server:
                self.idle.append(conn)
                return
        conn.close()

    def up(self) -> None:
        with self.lock:
            if self.warned:
                log.warning("memkv server %s is reachable again", self.name)
            self.down_until, self.backoff, self.warned = 0.0, BACKOFF_MIN, False

    def mark_down(self, err) -> None:
        with self.lock:
            for conn in self.idle:
                conn.close()
            self.idle.clear()
            self.down_until = time.monotonic() + self.backoff
            if not self.warned:
                log.warning("memkv server %s unreachable (%s); its keys read as misses, retrying "
                            "with backoff", self.name, err)
                self.warned = True
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def call(self, fn):
        """Run fn(conn) on a pooled connection; one fresh retry if a pooled one turned out stale."""
        for attempt in (0, 1):
            conn = self.acquire()
            try:
                result = fn(conn)
            except (OSError, ProtocolError) as e:
                conn.close()
                if isinstance(e, OSError) and e.errno == errno.EFAULT:
                    # the caller's memory, not the server: the stream is broken, the server is fine
                    raise InvalidArgument("a buffer (address, length) pair names memory this "
                                          "process cannot read or write") from e
                if attempt == 0 and isinstance(e, OSError):
                    continue  # a pooled connection may have been closed by a restarted server
                self.mark_down(e)
                raise ConnectionFailed(f"memkv server {self.name}: {e}") from e
            except ServerError:
                conn.close()
                raise
            self.release(conn)
            return result


class _Batch:
    """A call's keys and buffers, normalised into C-ready arrays (no payload copy)."""

    def __init__(self, keys, bufs=None, *, writable=False):
        keys = list(keys)
        problems = []
        if all(type(k) is bytes and 0 < len(k) <= MAX_KEY for k in keys):
            self.keys = keys  # the common case, checked in one pass
        else:
            for i, k in enumerate(keys):
                if not isinstance(k, (bytes, bytearray, memoryview)):
                    problems.append(f"key #{i} is {type(k).__name__}, not bytes")
                elif not 1 <= len(k) <= MAX_KEY:
                    problems.append(f"key #{i} has {len(k)} bytes (allowed 1..{MAX_KEY})")
            self.keys = [bytes(k) for k in keys] if not problems else keys
        self.n = len(keys)
        self.keep = []
        if bufs is not None:
            bufs = list(bufs)
            if len(bufs) != self.n:
                problems.append(f"{self.n} keys but {len(bufs)} buffers")
            else:
                self.ptrs = array("Q", bytes(8 * self.n))
                self.lens = array("Q", bytes(8 * self.n))
                for i, b in enumerate(bufs):
                    err = self._take(i, b, writable)
                    if err:
                        problems.append(f"buffer #{i}: {err}")
        if problems:
            raise InvalidArgument("; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)"
                                                               if len(problems) > 10 else ""))

    def _take(self, i: int, b, writable: bool):
        if isinstance(b, tuple):
            if len(b) != 2 or not all(isinstance(v, int) and v >= 0 for v in b) or not b[0]:
                return "an (address, length) pair needs two non-negative ints and a non-null address"
            self.ptrs[i], self.lens[i] = b
            return None
        if hasattr(b, "data_ptr") and hasattr(b, "element_size"):  # torch.Tensor, without importing torch
            if b.device.type != "cpu":
                return f"tensor on {b.device}; memkv's TCP path takes CPU memory"
            if not b.is_contiguous():
                return "tensor is not contiguous"
            self.ptrs[i], self.lens[i] = b.data_ptr(), b.numel() * b.element_size()
            self.keep.append(b)
            return None
        try:
            mv = memoryview(b)
        except TypeError:
            return f"{type(b).__name__} is neither a buffer, a tensor nor an (address, length) pair"
        if not mv.c_contiguous:
            return "buffer is not C-contiguous"
        if writable and mv.readonly:
            return f"{type(b).__name__} is read-only; get needs writable memory (e.g. bytearray)"
        self.lens[i] = mv.nbytes
        self.ptrs[i] = native.address_of(mv) if mv.nbytes else 0
        self.keep.append(mv)
        return None

    def subset(self, idx: list[int]):
        keys = [self.keys[i] for i in idx]
        blob = b"".join(keys)
        key_lens = array("H", map(len, keys))
        return blob, key_lens


class Client:
    """Batched access to one namespace on a pool of memkv servers (thread-safe)."""

    def __init__(self, endpoints, namespace: str, secret_file: str | None = None, *,
                 timeout: float = 30.0, connections_per_server: int = 4, verify: bool = True,
                 same_host: bool = True):
        """same_host: a memkv:// server on this host that also listens on a unix socket is reached
        through it, with cma (the server copies blocks from and into this process's memory)."""
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.replace(",", " ").split() if e]
        problems = []
        if not endpoints:
            problems.append("no endpoints given (e.g. ['memkv://127.0.0.1:9900'])")
        ns = namespace.encode() if isinstance(namespace, str) else b""
        if not 1 <= len(ns) <= MAX_NAMESPACE:
            problems.append(f"namespace must be a non-empty str of at most {MAX_NAMESPACE} UTF-8 bytes")
        if problems:
            raise InvalidArgument("; ".join(problems))
        self.namespace = namespace
        self.namespace_bytes = ns
        self.secret = None
        if secret_file:
            try:
                with open(secret_file, "rb") as f:
                    self.secret = f.read().strip()
            except OSError as e:
                raise InvalidArgument(f"secret file {secret_file}: {e.strerror}") from e
        self.timeout = timeout
        self.connections_per_server = connections_per_server
        self.verify = verify
        self.same_host = same_host
        self._servers = [_Endpoint(self, *parse_endpoint(e)) for e in endpoints]
        names = [s.name for s in self._servers]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate endpoints in {names}")
        self._seeds = array("Q", [native.xxh3(s.name.encode()) for s in self._servers])
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._servers)),
                                        thread_name_prefix="memkv-client")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for s in self._servers:
            with s.lock:
                for c in s.idle:
                    c.close()
                s.idle.clear()

    @property
    def endpoints(self) -> list[str]:
        return [s.name for s in self._servers]

    # ---- placement and fan-out ---------------------------------------------------------------
    def _groups(self, batch: _Batch) -> dict[int, list[int]]:
        if len(self._servers) == 1:
            return {0: list(range(batch.n))} if batch.n else {}
        blob = b"".join(batch.keys)
        place = native.rendezvous(blob, array("H", map(len, batch.keys)), self._seeds)
        groups = collections.defaultdict(list)
        for i, s in enumerate(place):
            groups[s].append(i)
        return groups

    def server_of(self, key: bytes) -> str:
        """The endpoint that owns key (rendezvous hashing)."""
        (server_idx, _), = self._groups(_Batch([key])).items()
        return self._servers[server_idx].name

    def _fan_out(self, batch: _Batch, work, on_unreachable: Status) -> list[Status]:
        """Run work(endpoint, idx) -> status bytes for each server's keys, concurrently."""
        groups = self._groups(batch)
        results = {}

        def one(server_idx, idx):
            try:
                results[server_idx] = work(self._servers[server_idx], idx)
            except ConnectionFailed:
                pass

        if len(groups) == 1:
            (s, idx), = groups.items()
            one(s, idx)
            if s in results:  # the common case: keys in order, no scatter needed
                return list(map(_STATUS.__getitem__, results[s]))
        else:
            for f in [self._pool.submit(one, s, idx) for s, idx in groups.items()]:
                f.result()
        out = [on_unreachable] * batch.n
        for s, idx in groups.items():
            if s in results:
                for i, st in zip(idx, results[s]):
                    out[i] = _STATUS[st]
        return out

    @staticmethod
    def _chunks(ep: _Endpoint, idx: list[int]):
        step = ep.limits.max_batch if ep.limits else 1024
        for k in range(0, len(idx), step):
            yield idx[k:k + step]

    # ---- the API ---------------------------------------------------------------------------------
    def put(self, keys, bufs) -> list[Status]:
        """Store each buffer under its key. A key already stored is left as it is (OK)."""
        batch = _Batch(keys, bufs)

        def work(ep: _Endpoint, idx):
            statuses = bytearray(len(idx))
            pending = list(range(len(idx)))
            for delay in (0.0, *FULL_RETRIES):
                if delay:
                    time.sleep(delay)
                statuses_now = self._put_on(ep, batch, [idx[p] for p in pending])
                for p, st in zip(pending, statuses_now):
                    statuses[p] = st
                pending = [p for p, st in zip(pending, statuses_now) if st == Status.FULL]
                if not pending:
                    break
            return statuses

        return self._fan_out(batch, work, Status.UNREACHABLE)

    def _put_on(self, ep: _Endpoint, batch: _Batch, idx: list[int]) -> bytes:
        # block lengths are checked against the server's announced range before sending
        if ep.limits is None:
            ep.release(ep.acquire())
        lo, hi = ep.limits.min_block, ep.limits.max_block
        out = bytearray(len(idx))
        send = []
        for j, i in enumerate(idx):
            if lo <= batch.lens[i] <= hi:
                send.append(j)
            else:
                out[j] = Status.BAD_LENGTH
                log.warning("put %r: %d bytes is outside server %s's block range %d..%d",
                            batch.keys[i][:16], batch.lens[i], ep.name, lo, hi)
        for chunk in self._chunks(ep, send):
            ids = [idx[j] for j in chunk]
            if sum(batch.lens[i] for i in ids) >= DEDUP_CHECK_BYTES:
                # content-addressed blocks are often stored already (shared prefixes): one
                # EXISTS round trip saves sending them again
                blob, key_lens = batch.subset(ids)
                present = ep.call(lambda conn: conn.keyed(Op.EXISTS, blob, key_lens))
                chunk = [j for j, p in zip(chunk, present) if p != Status.OK]
                ids = [idx[j] for j in chunk]
                if not ids:
                    continue
            blob, key_lens = batch.subset(ids)
            ptrs = array("Q", [batch.ptrs[i] for i in ids])
            lens = array("Q", [batch.lens[i] for i in ids])
            res = ep.call(lambda conn: conn.put(blob, key_lens, ptrs, lens))
            for j, st in zip(chunk, res):
                out[j] = st
        return out

    def get(self, keys, bufs, *, lengths: list | None = None) -> list[Status]:
        """Load each key's block into its buffer. Status.OK, MISS, or why not (per key).
        When `lengths` is a list it receives each block's size (0 where not loaded)."""
        batch = _Batch(keys, bufs, writable=True)
        got = array("Q", bytes(8 * batch.n))

        def work(ep: _Endpoint, idx):
            out = bytearray(len(idx))
            pos = 0
            for chunk in self._chunks(ep, idx):
                blob, key_lens = batch.subset(chunk)
                ptrs = array("Q", [batch.ptrs[i] for i in chunk])
                caps = array("Q", [batch.lens[i] for i in chunk])
                st, lens = ep.call(lambda conn: conn.get(blob, key_lens, ptrs, caps, self.verify))
                out[pos:pos + len(chunk)] = st
                for i, n in zip(chunk, lens):
                    got[i] = n
                pos += len(chunk)
            return out

        out = self._fan_out(batch, work, Status.MISS)
        if lengths is not None:
            lengths[:] = got.tolist()
        if Status.CHECKSUM_MISMATCH in out:
            log.warning("%d block(s) failed the client's checksum check and read as errors",
                        out.count(Status.CHECKSUM_MISMATCH))
        return out

    def _keyed(self, op: Op, keys, on_unreachable: Status) -> list[Status]:
        batch = _Batch(keys)

        def work(ep, idx):
            out = bytearray()
            for chunk in self._chunks(ep, idx):
                blob, key_lens = batch.subset(chunk)
                out += ep.call(lambda conn: conn.keyed(op, blob, key_lens))
            return out

        return self._fan_out(batch, work, on_unreachable)

    def exists(self, keys) -> list[bool]:
        """Whether each key is stored (an unreachable server answers False)."""
        return [s == Status.OK for s in self._keyed(Op.EXISTS, keys, Status.MISS)]

    def delete(self, keys) -> list[Status]:
        return self._keyed(Op.DELETE, keys, Status.UNREACHABLE)

    def pin(self, keys) -> list[Status]:
        """Protect blocks from eviction until unpinned (survives restarts)."""
        return self._keyed(Op.PIN, keys, Status.UNREACHABLE)

    def unpin(self, keys) -> list[Status]:
        return self._keyed(Op.UNPIN, keys, Status.UNREACHABLE)

    def stats(self) -> dict:
        """Per endpoint: the server's statistics, or {"error": why} when it cannot answer."""
        out = {}
        for ep in self._servers:
            try:
                out[ep.name] = ep.call(lambda conn: conn.stats())
            except (ConnectionFailed, ServerError) as e:
                out[ep.name] = {"error": str(e)}
        return out

