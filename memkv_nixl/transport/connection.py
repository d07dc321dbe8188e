"""One client connection to one memkv server: over TCP, or over the server's unix socket where
it may use cma (the server copies blocks straight from and into this process's memory with
process_vm_readv/writev). The handshake and every batched request run in C
(memkv_nixl/_native/conn.c, shared with the NIXL plugin) with the GIL released; payload bytes
move between the socket (or the server) and the caller's memory without a copy.

A Connection is used by one thread at a time (the client's pool hands it out). An OSError or
ProtocolError leaves it in an unknown state: the caller must close it.
"""
import json
from array import array

from .. import native
from ..errors import ProtocolError, ServerError
from ..protocol import FRAME, MAX_ERROR_TEXT, Limits, Op, pack_frame, unpack_frame


class Connection:
    def __init__(self, host: str, port: int, namespace: bytes, secret: bytes | None, timeout: float,
                 same_host: bool = True):
        self._conn = native.Conn(host, port, namespace, secret, timeout, same_host)
        self.peer = self._conn.name
        self.fd = self._conn.fd
        self.cma = self._conn.cma
        self.limits = Limits(self._conn.max_block, self._conn.min_block, self._conn.max_batch)

    def close(self) -> None:
        self._conn.close()

    def put(self, keys_blob: bytes, key_lens: array, ptrs: array, lens: array, flags: int = 0) -> bytes:
        return self._conn.put(keys_blob, key_lens, ptrs, lens, flags)

    def get(self, keys_blob: bytes, key_lens: array, ptrs: array, caps: array, verify: bool):
        return self._conn.get(keys_blob, key_lens, ptrs, caps, verify)

    def keyed(self, op: int, keys_blob: bytes, key_lens: array) -> bytes:
        """EXISTS, DELETE, PIN, UNPIN: one status per key."""
        return self._conn.keyed(op, keys_blob, key_lens)

    def stats(self) -> dict:
        native.send_all(self.fd, pack_frame(Op.STATS))
        f = unpack_frame(native.recv_exact(self.fd, FRAME.size), self.peer)
        body = bytes(native.recv_exact(self.fd, min(f.body_len, 1 << 24)))
        if f.op == Op.ERROR:
            raise ServerError(f"memkv server {self.peer}: {body[:MAX_ERROR_TEXT].decode(errors='replace')}")
        if f.op != Op.STATS:
            raise ProtocolError(f"{self.peer}: expected a STATS reply, got op {f.op}")
        return json.loads(body)
