"""One client connection to one memkv server over TCP: handshake, then batched requests whose
payload bytes move between the socket and the caller's memory in C (GIL released).

A Connection is used by one thread at a time (the client's pool hands it out). Any OSError or
ProtocolError leaves the connection in an unknown state: the caller must close it.
"""
import json
import socket
import struct
from array import array

from .. import native
from ..errors import AuthError, ConnectionFailed, ProtocolError, ServerError
from ..protocol import (CHALLENGE, CSUM, FRAME, HELLO, MAX_ERROR_TEXT, VERSION, Limits, Op, Status,
                        auth_mac, pack_frame, unpack_frame)


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel send/receive timeouts, so the fd stays blocking for the C data path."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class Connection:
    def __init__(self, host: str, port: int, namespace: bytes, secret: bytes | None, timeout: float):
        self.peer = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to memkv server {self.peer}: {e.strerror or e}") from e
        self.sock.settimeout(None)  # blocking fd for C; the kernel timeouts below bound each call
        set_timeouts(self.sock, timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        try:
            self.limits = self._handshake(namespace, secret)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()

    # ---- framing helpers -------------------------------------------------------------------
    def _read_frame(self, expect_op: int):
        f = unpack_frame(native.recv_exact(self.fd, FRAME.size), self.peer)
        if f.op == Op.ERROR:
            text = bytes(native.recv_exact(self.fd, min(f.body_len, MAX_ERROR_TEXT))).decode(errors="replace")
            if f.status == Status.AUTH_FAILED:
                raise AuthError(text)
            raise ServerError(f"memkv server {self.peer}: {text}")
        if f.op != expect_op:
            raise ProtocolError(f"{self.peer}: expected a reply to op {expect_op}, got op {f.op}")
        return f

    def _handshake(self, namespace: bytes, secret: bytes | None) -> Limits:
        native.send_all(self.fd, pack_frame(Op.HELLO, body_len=HELLO.size + len(namespace)) +
                        HELLO.pack(VERSION, len(namespace), 0) + namespace)
        f = self._read_frame(Op.HELLO)
        if f.body_len != CHALLENGE.size:
            raise ProtocolError(f"{self.peer}: challenge of {f.body_len} bytes, expected {CHALLENGE.size}")
        version, auth_required, max_block, min_block, max_batch, nonce = CHALLENGE.unpack(
            native.recv_exact(self.fd, CHALLENGE.size))
        if auth_required and secret is None:
            raise AuthError(f"memkv server {self.peer} requires a shared secret; pass "
                            "secret_file= (the same file as the server's --secret-file)")
        mac = auth_mac(secret, nonce, namespace) if secret is not None else bytes(32)
        native.send_all(self.fd, pack_frame(Op.AUTH, body_len=len(mac)) + mac)
        self._read_frame(Op.AUTH)
        return Limits(max_block, min_block, max_batch)

    # ---- requests --------------------------------------------------------------------------
    def _head(self, op: int, keys_blob: bytes, key_lens: array, lens=None, payload: int = 0) -> bytes:
        descs = native.build_descs(key_lens, lens)
        return pack_frame(op, count=len(key_lens), keys_len=len(keys_blob),
                          body_len=len(descs) + len(keys_blob) + payload) + descs + keys_blob

    def _statuses(self, op: int, count: int) -> bytes:
        f = self._read_frame(op)
        if f.count != count or f.body_len != count:
            raise ProtocolError(f"{self.peer}: reply carries {f.count} statuses for {count} keys")
        return bytes(native.recv_exact(self.fd, count))

    def put(self, keys_blob: bytes, key_lens: array, ptrs: array, lens: array) -> bytes:
        head = self._head(Op.PUT, keys_blob, key_lens, lens,
                          payload=sum(lens) + CSUM.size * len(key_lens))
        native.client_put(self.fd, head, ptrs, lens)
        return self._statuses(Op.PUT, len(key_lens))

    def get(self, keys_blob: bytes, key_lens: array, ptrs: array, caps: array, verify: bool):
        head = self._head(Op.GET, keys_blob, key_lens, caps)
        rep, status, lens, is_error = native.client_get(self.fd, head, ptrs, caps, verify)
        if is_error:
            f = unpack_frame(rep, self.peer)
            text = bytes(native.recv_exact(self.fd, min(f.body_len, MAX_ERROR_TEXT))).decode(errors="replace")
            raise ServerError(f"memkv server {self.peer}: {text}")
        return bytes(status), lens

    def keyed(self, op: int, keys_blob: bytes, key_lens: array) -> bytes:
        """EXISTS, DELETE, PIN, UNPIN: one status per key."""
        native.send_all(self.fd, self._head(op, keys_blob, key_lens))
        return self._statuses(op, len(key_lens))

    def stats(self) -> dict:
        native.send_all(self.fd, pack_frame(Op.STATS))
        f = self._read_frame(Op.STATS)
        return json.loads(bytes(native.recv_exact(self.fd, f.body_len)))
