"""Fixtures: real memkv server processes on loopback with their own data directories and logs."""
import os

os.environ.setdefault("UCX_MODULES", "^efa")  # before anything may load NIXL/UCX

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import memkv_nixl.nixl as memkv_backend
from memkv_nixl import Client

# NIXL reads its plugin directory once per process, before the first agent: activate MEMKV now
NIXL_PLUGIN_DIR = memkv_backend.activate()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_DEADLINE_S = 60


class MemkvServer:
    """One `memkv serve` process. Port 0 is asked for and the real one read from the log, so
    parallel tests never race for ports; a restart reuses the same port and data."""

    def __init__(self, tmp_path, name: str, *, capacity="256MiB", durability="sync", extra=(),
                 unix=False, prefix=(), data=None):
        self.dir = tmp_path / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = data or self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.port = 0
        self.capacity = capacity
        self.durability = durability
        self.extra = list(extra)
        self.prefix = list(prefix)  # e.g. setpriv, to start the server with fewer privileges
        # TCP only unless asked (unix=True: a socket beside the data; "default": the server's own
        # choice): tests of the TCP path must not move to cma on their own
        if unix != "default" and "--listen-unix" not in self.extra:
            self.extra += ["--listen-unix", str(self.dir / "memkv.sock") if unix else "off"]
        self.socket_path = None  # read from the server's log
        self.proc = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"memkv://127.0.0.1:{self.port}"

    @property
    def unix_endpoint(self) -> str:
        """Same host, through the unix socket (cma where the server may reach the client)."""
        return f"memkv+unix://{self.socket_path}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [*self.prefix, sys.executable, "-m", "memkv_nixl.cli", "serve", "--data", str(self.data),
                "--capacity", str(self.capacity), "--listen", f"127.0.0.1:{self.port}",
                "--durability", self.durability, *self.extra,
                # a small DRAM cache: tests run many servers, each faults its cache in at start
                *([] if "--ram-cache" in self.extra else ["--ram-cache", "32MiB"])]
        start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + READY_DEADLINE_S
        while time.time() < deadline:
            text = self.log_path.read_bytes()[start_at:].decode(errors="replace")
            if "memkv serving on" in text:
                self.port = int(text.split("memkv serving on ")[1].split()[0].rsplit(":", 1)[1])
                if "memkv also listening on memkv+unix://" in text:
                    self.socket_path = text.split("memkv also listening on memkv+unix://")[1].split()[0]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"memkv server did not become ready; log:\n{self.log()}")

    def flip_payload_byte(self, offset_in_payload=100) -> None:
        """Flip one payload byte of the first record in the data file (after the superblock)."""
        with open(self.data / "blocks.dat", "r+b") as f:
            pos = 4096 + 256 + offset_in_payload
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, namespace="test", **kw) -> Client:
        return Client([self.endpoint], namespace=namespace, **kw)

    def stop(self) -> int:
        """Clean stop (SIGTERM); returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


def in_threads(worker, n: int, timeout_s: float = 120) -> list[str]:
    """Run worker(0..n-1) on n threads at once; returns what went wrong in any (reprs)."""
    errors = []

    def run(w):
        try:
            worker(w)
        except Exception as e:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return errors


def recv_exactly(sock, n: int) -> bytes:
    """n bytes from a raw socket, or fewer if the server closed it (tests of malformed input)."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@contextlib.contextmanager
def loop_device(image, size: int):
    """A block device backed by the file `image` (a loop device): a raw disk a test may format,
    mount or freeze. Skips where loop devices are not allowed (no root, or a container)."""
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True, timeout=60)
    if made.returncode:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=60)


@pytest.fixture
def memkv_server(tmp_path):
    """Factory: memkv_server(name="s0", capacity=..., durability=..., extra=[...])."""
    servers = []

    def make(name="s0", **kw):
        s = MemkvServer(tmp_path, name, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.kill9()
        # data files are preallocated (hundreds of MiB each): never leave them behind
        shutil.rmtree(s.data, ignore_errors=True)


@pytest.fixture
def server(memkv_server):
    return memkv_server()


class Agent:
    """A real nixl_agent from the installed wheel, with helpers for MEMKV transfers."""

    count = 0

    def __init__(self, **config):
        from nixl_cu12._api import nixl_agent, nixl_agent_config
        Agent.count += 1
        self.name = f"test-agent-{os.getpid()}-{Agent.count}"
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=[], **config))

    def __getattr__(self, item):
        return getattr(self.agent, item)

    def memkv(self, server, **params):
        p = {"endpoints": server.endpoint, "namespace": "nixl-test", **params}
        self.agent.create_backend("MEMKV", {k: str(v) for k, v in p.items()})

    def post(self, op, local, remote, backend="MEMKV"):
        h = self.agent.initialize_xfer(op, local, remote, self.name, backends=[backend])
        return h, self.agent.transfer(h)

    def wait(self, h, state, deadline_s=60.0):
        """Poll to the end: DONE, or ERR with the backend's status kept in self.error (NIXL raises
        it, e.g. nixlNotFoundError for NIXL_ERR_NOT_FOUND)."""
        end = time.time() + deadline_s
        self.error = None
        try:
            while state == "PROC" and time.time() < end:
                time.sleep(0.0005)
                state = self.agent.check_xfer_state(h)
        except Exception as e:  # noqa: BLE001 - the status is the result under test
            self.error, state = e, "ERR"
        return state

    def xfer(self, op, local, remote, backend="MEMKV", deadline_s=60.0):
        """Run one transfer to its end; returns DONE or ERR (PROC if the deadline passed)."""
        h, state = self.post(op, local, remote, backend)
        state = self.wait(h, state, deadline_s)
        self.agent.release_xfer_handle(h)
        return state


@pytest.fixture
def nixl_agent():
    return Agent()
