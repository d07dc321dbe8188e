"""Redis as a benchmark peer: the same put/get workload memkv runs, against Redis.

Starts its own Debian `redis-server` on a free 127.0.0.1 port (no persistence,
noeviction, data/log in the given workdir) and talks RESP2 to it over one TCP
connection. The data path is a minimal pipelined RESP client instead of redis-py:
SET sends the caller's memoryviews with sendmsg (no copy in Python) and GET reads
each bulk reply straight into the caller's buffer with readinto, so the numbers
measure Redis, not a client library's bytes objects. (redis-py pipelines were
measured 2-5x slower on GET here because every value becomes a fresh bytes object.)

It must never: listen on anything but 127.0.0.1, write outside its workdir, touch
a Redis it did not start, or leave its server running after stop().
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

_BIN = "redis-server"
_WINDOW = 4 << 20  # GET bytes in flight: small keeps Redis reply buffers cache-warm (swept 2-128 MiB)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisPeer:
    name = "redis"

    @classmethod
    def available(cls) -> str | None:
        if shutil.which(_BIN) is None:
            return "redis-server not found (apt-get install -y redis-server)"
        return None

    def __init__(self, workdir: str, maxmemory: str = "16gb"):
        self.workdir = workdir
        self.maxmemory = maxmemory
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.rfile = None

    # -- lifecycle -------------------------------------------------------
    def start(self, deadline_s: float = 10.0) -> None:
        self.port = _free_port()
        log = os.path.join(self.workdir, "redis.log")
        out = os.path.join(self.workdir, "redis-server.out")  # errors before the log opens
        args = [_BIN, *self._listen_args(), "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--logfile", log,
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction", "--daemonize", "no"]
        with open(out, "wb") as out_f:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out_f, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline_s
        while True:
            try:
                self._connect()
                if self._command(b"PING") == b"+PONG\r\n":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                text = "".join(open(f, errors="replace").read()[-4000:]
                               for f in (out, log) if os.path.exists(f))
                self.stop()
                raise RuntimeError(f"redis-server did not become ready ({' '.join(self._listen_args())}):\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    # -- data path -------------------------------------------------------
    def put_many(self, keys: list[bytes], bufs: list[memoryview]) -> None:
        if self.sock is None:
            self._connect()
        try:
            for k, b in zip(keys, bufs, strict=True):
                self._send([b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(k), k, len(b)), b, b"\r\n"])
            for k in keys:
                line = self._readline()
                if line != b"+OK\r\n":
                    raise RuntimeError(f"SET {k!r}: {line!r}")
        except BaseException:
            self._close()  # pipeline state unknown: next call reconnects
            raise

    def get_many(self, keys: list[bytes], bufs: list[memoryview]) -> None:
        n, sent, inflight = len(keys), 0, 0
        if len(bufs) != n:
            raise ValueError("keys and bufs differ in length")
        if self.sock is None:
            self._connect()
        try:
            for i in range(n):
                if sent < n and (sent == i or inflight <= _WINDOW // 2):  # refill in batches
                    cmds = []
                    while sent < n and (sent == i or inflight + len(bufs[sent]) <= _WINDOW):
                        k = keys[sent]
                        cmds.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
                        inflight += len(bufs[sent])
                        sent += 1
                    self.sock.sendall(b"".join(cmds))
                buf = bufs[i]
                line = self._readline()
                if line == b"$-1\r\n":
                    raise KeyError(keys[i])
                if line[:1] != b"$" or int(line[1:-2]) != len(buf):
                    raise RuntimeError(f"GET {keys[i]!r}: {line[:200]!r} (want {len(buf)} bytes)")
                if self.rfile.readinto(buf) != len(buf) or self.rfile.read(2) != b"\r\n":
                    raise ConnectionError("short read from redis-server")
                inflight -= len(buf)
        except BaseException:
            self._close()
            raise

    def flush(self) -> None:
        """Drop every key (not timed; lets a harness reuse one server between runs)."""
        if self._command(b"FLUSHALL") != b"+OK\r\n":
            raise RuntimeError("FLUSHALL failed")

    # -- helpers ---------------------------------------------------------
    def _listen_args(self) -> list[str]:
        return ["--bind", "127.0.0.1", "--port", str(self.port)]

    def _open_socket(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _connect(self) -> None:
        self._close()
        s = self._open_socket()
        self.sock, self.rfile = s, s.makefile("rb", buffering=1 << 16)

    def _close(self) -> None:
        if self.sock is not None:
            self.rfile.close()
            self.sock.close()
            self.sock = self.rfile = None

    def _command(self, *args: bytes) -> bytes:
        if self.sock is None:
            self._connect()
        self.sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        return self._readline()

    def _readline(self) -> bytes:
        line = self.rfile.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"redis-server closed the connection ({line[:100]!r})")
        return line

    def _send(self, parts: list) -> None:
        total = sum(len(p) for p in parts)
        done = self.sock.sendmsg(parts)
        if done < total:  # partial scatter send: finish the rest piece by piece
            for p in parts:
                p = memoryview(p).cast("B")
                if done >= len(p):
                    done -= len(p)
                    continue
                self.sock.sendall(p[done:])
                done = 0


class RedisUnixPeer(RedisPeer):
    """The same Redis, reached through a unix socket: its fastest path for a client on the same
    host, to set beside memkv's same-host path (memkv+unix://, cma)."""

    name = "redis-unix"

    def _listen_args(self) -> list[str]:
        return ["--port", "0", "--unixsocket", os.path.join(self.workdir, "redis.sock"),
                "--unixsocketperm", "700"]

    def _open_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.path.join(self.workdir, "redis.sock"))
        return s
