"""The memkv server: accepts connections, authenticates them, and serves descriptor batches.

It listens on TCP and, when asked (--listen-unix), on a unix socket for clients on the same host,
which may then use cma: the server copies their blocks straight from and into their memory. One
thread per connection; each request is parsed and planned in Python once per batch, and its
bytes move in C (memkv_server_put/get) with the GIL released. A client that sends anything
malformed gets an ERROR frame and is disconnected; no other client notices, and nothing that was
acknowledged is lost.
"""
import errno
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
from array import array

from .. import native
from ..errors import ConfigError, MemkvError, ProtocolError
from ..protocol import (CHALLENGE, CMA_PROBE, CSUM, FEATURE_CMA, FRAME, HELLO, HELLO_CMA, MAC_LEN,
                        MAX_KEY, MAX_NAMESPACE, NONCE_LEN, REQ_DESC, SERVER_ID_LEN, VERSION,
                        FrameFlag, Op, Status, auth_mac, error_frame, pack_frame, unpack_frame)
from .config import ServerConfig
from .store import Store

log = logging.getLogger("memkv.server")

ARENA_BUDGET = 64 << 20  # staging bytes a request may use: keeps several blocks in flight
HANDSHAKE_TIMEOUT_S = 10
DRAIN_S = 10  # a clean stop lets requests in progress finish for this long
BATCH_OPS = {Op.PUT, Op.GET, Op.EXISTS, Op.DELETE, Op.PIN, Op.UNPIN}


class _Refused(Exception):
    """Ends a connection after an error frame was sent."""


class Server:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.secret = cfg.secret()
        # before any thread starts: cma must reach only what the server's own user may reach
        rc = native.cma_harden()
        self.cma_allowed = rc == 0
        if rc:
            log.warning("cannot drop CAP_SYS_PTRACE (%s): same-host copies (cma) are off",
                        os.strerror(-rc))
        native.io_start(cfg.io_threads)
        native.staging_limit(cfg.staging_memory)
        self.store = Store(cfg.data_files(), cfg.meta_dir, cfg.capacity,
                           sync=cfg.durability == "sync", min_block=cfg.min_block,
                           max_block=cfg.max_block, ram_cache=cfg.ram_cache, quotas=cfg.quota,
                           journal_max=cfg.journal_max)
        host, port = cfg.host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.unix_sock = _unix_listener(cfg.listen_unix) if cfg.listen_unix else None
        # announced with the unix socket: a TCP client on this host checks that the server behind
        # the socket is this one before it moves there
        self.server_id = os.urandom(SERVER_ID_LEN)
        self._announce = self.server_id + (cfg.listen_unix or "").encode()
        self._conns: set[socket.socket] = set()
        self._busy: set[socket.socket] = set()  # connections serving a request right now
        self._conns_lock = threading.Lock()
        self._drained = threading.Condition(self._conns_lock)
        self._stopping = threading.Event()

    # ---- lifecycle ---------------------------------------------------------------------------
    def serve_forever(self) -> None:
        if self.unix_sock is not None:
            log.info("memkv also listening on memkv+unix://%s (same-host clients; cma)",
                     self.cfg.listen_unix)
            threading.Thread(target=self._accept_loop, args=(self.unix_sock,), daemon=True,
                             name="memkv-accept-unix").start()
        else:
            log.info("no unix socket (--listen-unix off, or the default path is longer than a "
                     "socket path may be): same-host clients use TCP")
        log.info("memkv serving on %s (durability %s, auth %s)", self.address, self.cfg.durability,
                 "on" if self.secret else "off")
        if self.secret is None and not _loopback(self.cfg.host_port[0]):
            log.warning("listening on %s without --secret-file: anyone who can reach this address "
                        "may read, overwrite and delete blocks", self.address)
        self._accept_loop(self.sock)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn, addr), daemon=True,
                             name="memkv-conn").start()

    def shutdown(self) -> None:
        """Clean stop: no new connections, let the requests in progress finish (up to DRAIN_S),
        close every connection, checkpoint the index."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.unix_sock is not None:
            self.unix_sock.close()
            try:
                os.unlink(self.cfg.listen_unix)
            except OSError:
                pass
        with self._conns_lock:
            idle = [c for c in self._conns if c not in self._busy]
        _shut(idle)  # a busy one ends after its reply: its loop sees _stopping
        with self._conns_lock:
            if not self._drained.wait_for(lambda: not self._busy, DRAIN_S):
                log.warning("stopping: %d request(s) still in progress after %d s are cut off",
                            len(self._busy), DRAIN_S)
            rest = list(self._conns)
        _shut(rest)
        self.store.close()
        log.info("memkv stopped cleanly")

    # ---- one connection ----------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket, addr) -> None:
        fd = conn.fileno()
        cma = None
        if conn.family == socket.AF_UNIX:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            peer = f"pid {pid} (uid {uid}, unix socket)"
        else:
            peer = f"{addr[0]}:{addr[1]}"
            pid = 0
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            set_timeouts(conn, HANDSHAKE_TIMEOUT_S)  # a silent stranger must not hold a thread
            ns_id, cma = self._handshake(conn, fd, peer, pid)
            set_timeouts(conn, self.cfg.idle_timeout)
            arena = native.Arena(ARENA_BUDGET)
            while not self._stopping.is_set():
                try:
                    head = native.recv_exact(fd, FRAME.size)
                except OSError:
                    return  # closed or idle past the timeout between requests
                with self._conns_lock:
                    self._busy.add(conn)
                try:
                    self._serve_request(fd, ns_id, arena, unpack_frame(head, peer), peer, cma)
                finally:
                    with self._conns_lock:
                        self._busy.discard(conn)
                        self._drained.notify_all()
        except ProtocolError as e:
            self.store.counters["bad_requests"] += 1
            log.warning("client %s: %s; closing its connection", peer, e)
            try:
                native.send_all(fd, error_frame(Status.BAD_REQUEST, str(e)))
            except OSError:
                pass
        except _Refused:
            pass
        except OSError as e:
            log.info("client %s disconnected: %s", peer, e)
        except Exception:  # a bug must not take the server down with it
            log.exception("client %s: internal error; closing its connection", peer)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            if cma is not None:
                cma.close()

    def _refuse(self, fd: int, status: Status, message: str) -> None:
        try:
            native.send_all(fd, error_frame(status, message))
        except OSError:
            pass
        raise _Refused(message)

    def _handshake(self, conn, fd: int, peer: str, pid: int):
        """Returns the namespace id and, when cma was granted, the client's _CmaPeer."""
        f = unpack_frame(native.recv_exact(fd, FRAME.size), peer)
        most = HELLO.size + MAX_NAMESPACE + CMA_PROBE.size
        if f.op != Op.HELLO or not HELLO.size <= f.body_len <= most:
            raise ProtocolError(f"expected HELLO with a body of {HELLO.size}..{most} bytes, got op "
                                f"{f.op} with {f.body_len}")
        body = native.recv_exact(fd, f.body_len)
        version, ns_len, flags = HELLO.unpack_from(body)
        if version != VERSION:
            self._refuse(fd, Status.VERSION_MISMATCH, f"client speaks wire version {version}, server "
                         f"{self.address} speaks {VERSION}; upgrade the older side")
        ns_raw = bytes(body[HELLO.size:HELLO.size + ns_len])
        probe = CMA_PROBE.size if flags & HELLO_CMA else 0
        if ns_len != f.body_len - HELLO.size - probe or not ns_raw:
            raise ProtocolError(f"HELLO namespace length {ns_len} does not match its frame")
        cma = None
        if probe and pid and self.cma_allowed:
            cma = _CmaPeer.probe(pid, *CMA_PROBE.unpack_from(body, HELLO.size + ns_len), peer)
            self.store.counters["cma_connections" if cma else "cma_refused"] += 1
        try:
            return self._authenticate(fd, peer, ns_raw, cma), cma
        except BaseException:
            if cma is not None:
                cma.close()  # its pidfd: a failed handshake must not leak descriptors
            raise

    def _authenticate(self, fd: int, peer: str, ns_raw: bytes, cma) -> int:
        """CHALLENGE -> AUTH -> reply; returns the namespace id."""
        try:
            ns = ns_raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError("namespace is not UTF-8") from None
        nonce = os.urandom(NONCE_LEN)
        cfg = self.cfg
        native.send_all(fd, pack_frame(Op.HELLO, body_len=CHALLENGE.size + len(self._announce)) +
                        CHALLENGE.pack(VERSION, int(self.secret is not None),
                                       FEATURE_CMA if cma else 0, cfg.max_block, cfg.min_block,
                                       cfg.max_batch, nonce) + self._announce)
        f = unpack_frame(native.recv_exact(fd, FRAME.size), peer)
        if f.op != Op.AUTH or f.body_len != MAC_LEN:
            raise ProtocolError(f"expected AUTH with a {MAC_LEN}-byte body, got op {f.op}")
        mac = bytes(native.recv_exact(fd, MAC_LEN))
        if self.secret is not None and not hmac.compare_digest(mac, auth_mac(self.secret, nonce, ns_raw)):
            self.store.counters["auth_failures"] += 1
            log.warning("client %s: authentication failed for namespace %r", peer, ns)
            self._refuse(fd, Status.AUTH_FAILED, f"authentication failed at {self.address}: the "
                         "shared secret does not match the server's --secret-file")
        native.send_all(fd, pack_frame(Op.AUTH))
        return self.store.namespace(ns)

    def _serve_request(self, fd: int, ns_id: int, arena, f, peer: str, cma) -> None:
        if f.op == Op.STATS:
            body = json.dumps({"server": self.address, **self.store.stats(),
                               "staging": {**native.staging_stats(),
                                           "limit_bytes": self.cfg.staging_memory}}).encode()
            native.send_all(fd, pack_frame(Op.STATS, req_id=f.req_id, body_len=len(body)) + body)
            return
        if f.op not in BATCH_OPS:
            raise ProtocolError(f"unknown or unexpected op {f.op}")
        if f.count > self.cfg.max_batch:
            raise ProtocolError(f"batch of {f.count} descriptors exceeds the server's max batch "
                                f"{self.cfg.max_batch}; split it")
        if f.keys_len > f.count * MAX_KEY:
            raise ProtocolError(f"keys blob of {f.keys_len} bytes is larger than {f.count} keys "
                                f"of at most {MAX_KEY} bytes")
        fixed = f.count * REQ_DESC.size + f.keys_len
        if f.op == Op.PUT:
            lo, hi = self.cfg.min_block, self.cfg.max_block
        elif f.op == Op.GET:
            lo, hi = 0, (1 << 64) - 1
        else:
            lo, hi = 0, 0
        via_cma = bool(f.flags & FrameFlag.CMA)
        if via_cma:
            if f.op not in (Op.PUT, Op.GET) or cma is None:
                raise ProtocolError("CMA frame flag on a connection without cma (it is granted only "
                                    "on a unix socket, to a client the server can reach)")
            cma.check_alive()
            addrs = fixed
            fixed += 8 * f.count  # the table of the client's buffer addresses
        if f.body_len < fixed or ((f.op != Op.PUT or via_cma) and f.body_len != fixed):
            raise ProtocolError(f"frame body of {f.body_len} bytes does not match {f.count} "
                                f"descriptors and {f.keys_len} key bytes")
        table = native.recv_exact(fd, fixed)
        payload = native.check_descs(table, f.count, f.keys_len, lo, hi)
        peer_addrs = array("Q", bytes(table[addrs:])) if via_cma else None  # aligned for C
        cma_pid = cma.pid if via_cma else 0
        if f.op == Op.PUT and not via_cma and f.body_len != fixed + payload + CSUM.size * f.count:
            raise ProtocolError(f"PUT body of {f.body_len} bytes does not match its descriptors "
                                f"({fixed} + {payload} payload + {CSUM.size * f.count} checksum bytes)")
        base = f.count * REQ_DESC.size
        whole = bytes(table)  # slicing bytes makes each key in one step
        descs = list(REQ_DESC.iter_unpack(whole[:base]))
        keys = [whole[base + d[2]:base + d[2] + d[3]] for d in descs]
        store = self.store
        if f.op == Op.PUT:
            addr = native.address_of(table) + base
            ios, plan = store.plan_put(ns_id, keys, [d[0] for d in descs],
                                          [addr + d[2] for d in descs],
                                          replace=bool(f.flags & FrameFlag.REPLACE))
            try:
                arena.server_put(fd, ios, f.count, cma_pid, peer_addrs, store.write_behind)
            finally:
                statuses = store.commit_put(plan, ios)
            native.send_all(fd, pack_frame(Op.PUT, req_id=f.req_id, count=f.count,
                                           body_len=f.count) + bytes(statuses))
        elif f.op == Op.GET:
            addr = native.address_of(table) + base
            ios, plan = store.plan_get(ns_id, keys, [d[0] for d in descs],
                                          [addr + d[2] for d in descs])
            try:
                native.send_all(fd, pack_frame(Op.GET, req_id=f.req_id, count=f.count))
                arena.server_get(fd, ios, f.count, cma_pid, peer_addrs)
            finally:
                store.finish_get(ns_id, plan, ios)
        else:
            if f.op == Op.EXISTS:
                statuses = store.exists(ns_id, keys)
            elif f.op == Op.DELETE:
                statuses = store.delete(ns_id, keys)
            else:
                statuses = store.pin(ns_id, keys, f.op == Op.PIN)
            native.send_all(fd, pack_frame(f.op, req_id=f.req_id, count=f.count,
                                           body_len=f.count) + bytes(statuses))


class _CmaPeer:
    """A client process whose memory this server may copy to and from (granted by the kernel,
    whose ptrace rules process_vm_readv/writev follow, and proven by the HELLO probe). A pidfd pins
    the identity: if the process that connected has exited, its pid may now name another one."""

    _refusals_logged: set = set()

    def __init__(self, pid: int, pidfd: int):
        self.pid, self.pidfd = pid, pidfd

    @classmethod
    def probe(cls, pid: int, addr: int, expect: int, peer: str):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None  # gone already (or a kernel without pidfds): the socket path still works
        rc = native.cma_probe(pid, addr, expect)
        if rc == 0:
            return cls(pid, pidfd)
        os.close(pidfd)
        why = os.strerror(-rc) if rc != -errno.EACCES else "the probe read back other bytes"
        if rc not in cls._refusals_logged:  # one line per kind of refusal, not per connection
            cls._refusals_logged.add(rc)
            log.warning("client %s: cma refused (%s: this server may not read its memory, e.g. "
                        "another user or ptrace restrictions); its blocks go through the socket",
                        peer, why)
        return None

    def check_alive(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            raise ProtocolError(f"cma client process {self.pid} has exited; its connection is "
                                "held by another process, which must connect itself") from None
        except PermissionError:
            raise ProtocolError(f"cma client process {self.pid} changed its credentials; "
                                "connect again") from None

    def close(self) -> None:
        os.close(self.pidfd)


def _shut(conns) -> None:
    for c in conns:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _unix_listener(path: str) -> socket.socket:
    """Bind a unix socket at path, replacing a stale socket file left by a killed server."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"--listen-unix {path}: exists and is not a socket; choose another path")
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens there: a leftover
        except OSError:
            pass
        else:
            raise ConfigError(f"--listen-unix {path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--listen-unix {path}: {e.strerror}") from e
    sock.listen(128)
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel send/receive timeouts, so the fd stays blocking for the C data path."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def run(cfg: ServerConfig) -> None:
    """Run a server in the foreground until SIGTERM/SIGINT, then stop cleanly."""
    try:
        server = Server(cfg)
    except MemkvError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        stop.set()

    # SIGHUP too: a server started from a terminal that goes away stops cleanly (the default
    # would end it like kill -9, dropping async puts not yet on disk)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    acceptor = threading.Thread(target=server.serve_forever, name="memkv-accept", daemon=True)
    acceptor.start()
    while not stop.wait(0.5) and acceptor.is_alive():
        pass
    server.shutdown()
