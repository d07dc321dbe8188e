"""Mooncake Store as a benchmark peer (PyPI `mooncake-transfer-engine-non-cuda`, TCP).

Mooncake's master, its HTTP metadata server and the client's transfer engine
listen on every interface (0.0.0.0) whatever address they are given, so
everything Mooncake runs in a private network namespace: `unshare -n`, with only
`lo` up and MC_TCP_BIND_ADDRESS=127.0.0.1. The benchmark process cannot reach
into that namespace, and shipping block data over a pipe would measure the pipe,
so this peer does NOT offer put_many/get_many. Instead a worker process (this
file run with --worker) lives in the namespace, runs mooncake_master plus one
MooncakeDistributedStore client that contributes the memory (global segment),
allocates and registers its own source/destination buffers, and times the calls
itself:

    timed_put_get(block_size, n_blocks) -> {"put_s", "get_s", "bytes"}

put_s is one batch_put_from over all blocks, get_s one batch_get_into, both
zero-copy from/into registered buffers; keys are removed afterwards (untimed) and
the data is checked (untimed). Only those numbers cross the pipe. The first call
for a size also pays for faulting in Mooncake's segment pages: treat it as warm-up.
By default MC_STORE_MEMCPY=0, so blocks really cross the TCP transport (verified by
lo byte counters); otherwise a single client would just memcpy into its own segment.

It must never: run Mooncake outside its own network namespace, contact anything
but 127.0.0.1 inside it, write outside its workdir, or leave a process behind
after stop() (the worker and master share one process group that stop() kills).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

_RPC_PORT, _HTTP_PORT, _METRICS_PORT = 50051, 8080, 9003  # private namespace: fixed ports are safe


class MooncakePeer:
    name = "mooncake"

    @classmethod
    def available(cls) -> str | None:
        for tool in ("unshare", "ip"):
            if shutil.which(tool) is None:
                return f"{tool} not found (apt-get install -y util-linux iproute2)"
        probe = "import mooncake.store"
        r = subprocess.run(["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "$0" -c "{probe}"',
                            sys.executable], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"mooncake unusable in unshare -n (pip install mooncake-transfer-engine-non-cuda; " \
                   f"apt-get install -y libibverbs1; needs root/CAP_SYS_ADMIN): {last}"
        return None

    def __init__(self, workdir: str, segment_bytes: int = 1 << 30, memcpy: bool | None = False):
        """segment_bytes: memory the client contributes (a batch may use 80% of it).
        memcpy: MC_STORE_MEMCPY. False (default) makes every block cross the TCP
        transport on lo, like a client/server store; None/True let Mooncake
        memcpy to/from its own local segment (an in-process copy, its auto choice
        when only TCP is available)."""
        self.workdir = workdir
        self.segment_bytes = segment_bytes
        self.memcpy = memcpy
        self.proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 60.0) -> None:
        env = dict(os.environ, MC_TCP_BIND_ADDRESS="127.0.0.1")  # glog goes to stderr = worker log
        if self.memcpy is not None:
            env["MC_STORE_MEMCPY"] = "1" if self.memcpy else "0"
        self._log = open(os.path.join(self.workdir, "mooncake-worker.log"), "wb")
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
             sys.executable, os.path.abspath(__file__), "--worker", self.workdir, str(self.segment_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            start_new_session=True)
        try:
            self._reply(deadline_s)
        except BaseException:
            self.stop()
            raise

    def timed_put_get(self, block_size: int, n_blocks: int, timeout_s: float = 300.0) -> dict:
        self.proc.stdin.write(json.dumps({"block_size": block_size, "n_blocks": n_blocks}).encode() + b"\n")
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()  # EOF: worker closes the store and stops its master
                self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        self._log.close()

    def _reply(self, timeout_s: float) -> dict:
        out = self.proc.stdout
        if not select.select([out], [], [], timeout_s)[0]:
            raise TimeoutError(f"mooncake worker silent for {timeout_s}s\n{self._tail()}")
        line = out.readline()
        if not line:
            raise RuntimeError(f"mooncake worker exited\n{self._tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"mooncake worker: {msg['error']}\n{self._tail()}")
        return msg

    def _tail(self, n: int = 6000) -> str:
        parts = []
        for f in ("mooncake-worker.log", "mooncake-master.log"):
            p = os.path.join(self.workdir, f)
            if os.path.exists(p):
                parts.append(f"--- {f}\n" + open(p, errors="replace").read()[-n:])
        return "\n".join(parts)


# ---------------------------------------------------------------------------
# worker: runs inside `unshare -n`, never imported by the benchmark process
def _wait_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    import socket
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mooncake_master not listening on {port}")
            time.sleep(0.05)


def _worker(workdir: str, segment_bytes: int) -> None:
    import ctypes
    import mmap
    import mooncake
    from mooncake.store import MooncakeDistributedStore

    out = sys.stdout
    sys.stdout = sys.stderr  # keep the reply channel clean

    def reply(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    master = store = None
    try:
        binary = os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")
        master = subprocess.Popen(
            [binary, f"--rpc_port={_RPC_PORT}", "--rpc_address=127.0.0.1",
             "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
             f"--http_metadata_server_port={_HTTP_PORT}", "--metrics_host=127.0.0.1",
             f"--metrics_port={_METRICS_PORT}"],
            stdin=subprocess.DEVNULL, stdout=open(os.path.join(workdir, "mooncake-master.log"), "wb"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        _wait_port(_RPC_PORT, master, deadline)
        _wait_port(_HTTP_PORT, master, deadline)
        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", f"http://127.0.0.1:{_HTTP_PORT}/metadata", segment_bytes,
                         16 << 20, "tcp", "", f"127.0.0.1:{_RPC_PORT}")
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
        reply({"ready": True})

        bufs: dict[int, tuple] = {}  # size -> (src mmap, dst mmap, src ptr, dst ptr), registered once
        seq = 0
        for line in sys.stdin:
            req = json.loads(line)
            bs, n = int(req["block_size"]), int(req["n_blocks"])
            total = bs * n
            if total > segment_bytes * 0.8:
                reply({"error": f"batch {total} B does not fit segment {segment_bytes} B"})
                continue
            if total not in bufs:
                src, dst = mmap.mmap(-1, total), mmap.mmap(-1, total)
                pattern = os.urandom(1 << 20)
                for off in range(0, total, len(pattern)):
                    src[off:off + len(pattern)] = pattern[:total - off]
                dst.write(b"\0" * total)  # fault the pages in, as a caller's buffers would be
                ps = ctypes.addressof(ctypes.c_char.from_buffer(src))
                pd = ctypes.addressof(ctypes.c_char.from_buffer(dst))
                for p in (ps, pd):
                    if store.register_buffer(p, total) != 0:
                        raise RuntimeError("register_buffer failed")
                bufs[total] = (src, dst, ps, pd)
            src, dst, ps, pd = bufs[total]
            for i in range(n):  # distinct first bytes per block catch misplaced blocks
                src[i * bs:i * bs + 8] = (seq * n + i).to_bytes(8, "little")
            seq += 1
            keys = [f"b{seq}:{bs}:{i}" for i in range(n)]
            sizes = [bs] * n
            t0 = time.perf_counter()
            put_rc = store.batch_put_from(keys, [ps + i * bs for i in range(n)], sizes)
            t1 = time.perf_counter()
            get_rc = store.batch_get_into(keys, [pd + i * bs for i in range(n)], sizes)
            t2 = time.perf_counter()
            with memoryview(src) as a, memoryview(dst) as b:
                ok = all(r == 0 for r in put_rc) and list(get_rc) == sizes and a == b
            store.batch_remove(keys, True)
            if not ok:
                bad = [r for r in put_rc if r != 0][:3] or [r for r in get_rc if r != bs][:3]
                reply({"error": f"put/get failed or data mismatch (codes {bad})"})
                continue
            reply({"put_s": t1 - t0, "get_s": t2 - t1, "bytes": total})
    except Exception as e:  # report, then fall through to cleanup
        reply({"error": f"{type(e).__name__}: {e}"})
    finally:
        if store is not None:
            store.close()
        if master is not None:
            master.terminate()
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], int(sys.argv[3]))
