"""memkv store benchmark: put/get GB/s and latency against ceilings measured in the same run.

Ceilings: a raw loopback TCP stream (one connection, the same block size), memcpy, and
sequential O_DIRECT write/read of the data disk at the same block size with several in flight.
memkv is measured over TCP (memkv://, against the socket and disk ceilings) and, for a client on
the same host, through its unix socket with cma (memkv+unix://, against memcpy and the disk).
Peers (when installed): Redis (Debian redis-server) over TCP and over a unix socket, and
Mooncake Store over TCP.
Prints one line per figure with its ratio to the ceiling and to the peers. Not a test: nothing
here asserts on time.

    .venv/bin/python benchmarks/bench_store.py [--sizes 64KiB,1MiB,4MiB,16MiB] [--total 512MiB]
"""
import argparse
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("UCX_MODULES", "^efa")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from memkv_nixl import Client, Status, native  # noqa: E402
from memkv_nixl.server.local import LocalServer  # noqa: E402
from memkv_nixl.units import format_size, parse_size  # noqa: E402

GB = 1e9
SERVER_PIECE = 2 << 20  # PIECE_MIN in storage_io.c: the O_DIRECT request size of large records


# ---- ceilings ----------------------------------------------------------------------------------
def raw_socket_gbps(block: int, total: int) -> float:
    """One loopback TCP stream, sender and receiver threads, no framing: the wire ceiling."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    n = max(1, total // block)
    done = threading.Event()

    def receiver():
        conn, _ = srv.accept()
        buf = bytearray(block)
        mv = memoryview(buf)
        for _ in range(n):
            got = 0
            while got < block:
                got += conn.recv_into(mv[got:], block - got)
        conn.sendall(b"x")
        conn.close()
        done.set()

    t = threading.Thread(target=receiver)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = os.urandom(block)
    t0 = time.perf_counter()
    for _ in range(n):
        c.sendall(data)
    c.recv(1)
    dt = time.perf_counter() - t0
    t.join()
    c.close()
    srv.close()
    return n * block / dt / GB


def memcpy_gbps(block: int, total: int) -> float:
    """memcpy over the benchmark's own footprint (8 source blocks into ~64 MiB of destination
    buffers), so small blocks do not get to run from the CPU cache."""
    src = [aligned(block) for _ in range(8)]
    for b in src:
        b[:] = os.urandom(block)
    dst = [aligned(block) for _ in range(max(1, (64 << 20) // block))]
    n = max(1, total // block)
    t0 = time.perf_counter()
    for i in range(n):
        dst[i % len(dst)][:] = src[i % 8]
    return n * block / (time.perf_counter() - t0) / GB


def aligned(size: int) -> memoryview:
    """Page-aligned memory, as KV caches are (torch aligns to 64 B, pinned buffers to pages):
    process_vm_writev into a destination 16 B off alignment runs 5x slower here. Faulted in
    before use: first-touch faults on these VMs run at ~0.6 GB/s and would be measured instead."""
    mv = memoryview(mmap.mmap(-1, size))
    mv[:] = bytes(size)
    return mv


def disk_gbps(path: str, block: int, total: int, write: bool) -> float:
    total = max(block, total // block * block)
    return total / native.disk_seq(path, block, total, write, 4) / GB


# ---- memkv server ---------------------------------------------------------------------------------
def start_server(workdir: str, capacity: int, durability: str, ram_cache: str) -> LocalServer:
    srv = LocalServer(os.path.join(workdir, "data"), "--capacity", str(capacity),
                      "--durability", durability, "--ram-cache", ram_cache)
    srv.start()
    return srv


def pctl(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def read_all(client: Client, keys, bufs, per_call: int) -> float:
    t0 = time.perf_counter()
    for k in range(0, len(keys), per_call):
        chunk = keys[k:k + per_call]
        st = client.get(chunk, bufs[:len(chunk)])
        assert all(s == Status.OK for s in st), set(st)
    return len(keys) * len(bufs[0]) / (time.perf_counter() - t0) / GB


def write_all(client: Client, keys, src, per_call: int) -> float:
    t0 = time.perf_counter()
    for k in range(0, len(keys), per_call):
        st = client.put(keys[k:k + per_call], [src[i % len(src)] for i in range(k, min(len(keys), k + per_call))])
        assert all(s == Status.OK for s in st), set(st)
    return len(keys) * len(src[0]) / (time.perf_counter() - t0) / GB


def write_behind(client: Client, keys, src, per_call: int) -> tuple[float, float]:
    """Puts into an async server: GB/s as acknowledged (from its DRAM cache), and GB/s until the
    last of them is on disk (the server reports no write-behind block left)."""
    t0 = time.perf_counter()
    acked = write_all(client, keys, src, per_call)
    while any(st["write_behind"]["blocks"] for st in client.stats().values()):
        time.sleep(0.005)
    return acked, len(keys) * len(src[0]) / (time.perf_counter() - t0) / GB


def bench_memkv(transports: dict, block: int, total: int, repeat: int, tag: str, disk_path: str):
    """Put/get GB/s per transport, each set against its ceiling measured right before it (this
    machine drifts by tens of percent within minutes); medians of the per-repeat ratios are
    returned. transports: name -> (client of the server without a DRAM cache: put, then get from
    disk; client of the server with one: the same blocks put, then read from memory; client of
    the async server: the same blocks put, written behind). A transport's wire ceiling is the raw
    socket for tcp and memcpy for cma."""
    n = max(4, total // block)
    per_call = max(1, (64 << 20) // block)  # ~64 MiB per batched call
    src = [aligned(block) for _ in range(min(n, 8))]
    for b in src:
        b[:] = os.urandom(block)
    bufs = [aligned(block) for _ in range(per_call)]
    rows = []
    for r in range(repeat):
        row = {}
        for tr, (client, cached, behind) in transports.items():
            # each figure is set against its ceiling measured just before it: this machine's
            # disk and loopback drift by 2x within minutes
            keys = [f"{tag}/{tr}/{block}/{r}/{i}".encode() for i in range(n)]
            dw = disk_gbps(disk_path, block, total, True)
            put = write_all(client, keys, src, per_call)
            dr = disk_gbps(disk_path, block, total, False)
            os.unlink(disk_path)
            if block > SERVER_PIECE:  # the server moves a large record in pieces of this size
                row[f"{tr}_dwp"] = disk_gbps(disk_path, SERVER_PIECE, total, True)  # a fresh file,
                row[f"{tr}_drp"] = disk_gbps(disk_path, SERVER_PIECE, total, False)  # as above
                os.unlink(disk_path)
            get_disk = read_all(client, keys, bufs, per_call)
            wire = (raw_socket_gbps if tr == "tcp" else memcpy_gbps)(block, total)
            put_cached = write_all(cached, keys, src, per_call)
            get_ram = read_all(cached, keys, bufs, per_call)
            put_wb, on_disk = write_behind(behind, keys, src, per_call)
            row.update({f"{tr}_wire": wire, f"{tr}_dw": dw, f"{tr}_dr": dr,
                        f"{tr}_put": put, f"{tr}_get": get_disk, f"{tr}_get_ram": get_ram,
                        f"{tr}_put_wb": put_wb, f"{tr}_put_wb_ratio": put_wb / wire,
                        f"{tr}_on_disk": on_disk, f"{tr}_on_disk_ratio": on_disk / dw,
                        f"{tr}_put_ratio": put / min(wire, dw),
                        f"{tr}_put_cached_ratio": put_cached / min(wire, dw),
                        f"{tr}_get_ratio": get_disk / min(wire, dr),
                        f"{tr}_get_ram_ratio": get_ram / wire})
        rows.append(row)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    for tr, (client, *_) in transports.items():  # latency of single-block calls
        lat_put, lat_get = [], []
        keys = [f"{tag}/{tr}/lat/{block}/{i}".encode() for i in range(min(64, max(8, (256 << 20) // block)))]
        for i, k in enumerate(keys):
            t0 = time.perf_counter()
            client.put([k], [src[i % len(src)]])
            lat_put.append((time.perf_counter() - t0) * 1e3)
        for k in keys:
            t0 = time.perf_counter()
            client.get([k], bufs[:1])
            lat_get.append((time.perf_counter() - t0) * 1e3)
        med.update({f"{tr}_pp50": pctl(lat_put, .5), f"{tr}_pp99": pctl(lat_put, .99),
                    f"{tr}_gp50": pctl(lat_get, .5), f"{tr}_gp99": pctl(lat_get, .99)})
    return med


def bench_reads_during_burst(fast: Client, reader: Client, burst: int = 768 << 20):
    """Latency of 1 MiB gets that miss the DRAM cache of an async server, idle and while a burst
    of puts is being written behind: the disk pool serves reads ahead of write-behind pieces."""
    mib = 1 << 20
    probes = [f"probe/{i}".encode() for i in range(32)]
    reader.put(probes, [os.urandom(mib) for _ in probes])
    filler = [aligned(16 * mib) for _ in range(4)]
    for b in filler:
        b[:] = os.urandom(len(b))
    cache = next(iter(fast.stats().values()))["ram_cache"]["capacity_bytes"]

    def put_burst(tag: str, total: int):
        keys = [f"{tag}/{i}".encode() for i in range(total // (16 * mib))]
        write_behind(fast, keys, filler, 4)

    put_burst("flush", cache + 256 * mib)  # the probes now live on disk only
    buf = bytearray(mib)

    def timed_get(key) -> float:
        t0 = time.perf_counter()
        assert reader.get([key], [buf]) == [Status.OK]
        return (time.perf_counter() - t0) * 1e3

    idle = [timed_get(k) for k in probes[:16]]
    during = []
    t = threading.Thread(target=put_burst, args=("burst", burst))
    t.start()
    for k in probes[16:]:
        if not t.is_alive():
            break
        during.append(timed_get(k))
        time.sleep(0.005)
    t.join()
    return idle, during


def bench_exists(client: Client, calls: int = 300):
    keys = [f"exists/{i}".encode() for i in range(256)]
    client.put(keys[:128], [bytes(4096)] * 128)
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.exists(keys)
        lat.append((time.perf_counter() - t0) * 1e3)
    return pctl(lat, .5), pctl(lat, .99)


def bench_startup(workdir: str, blocks: int) -> float:
    """Put `blocks` 4 KiB blocks, kill -9 the server, restart: seconds to rebuild the index."""
    srv = start_server(os.path.join(workdir, "startup"), max(blocks * 8192 * 2, 256 << 20), "async",
                       "0")
    try:
        with Client(srv.endpoint, namespace="startup") as c:
            payload = bytes(4096)
            for k in range(0, blocks, 4096):
                c.put([f"s{i}".encode() for i in range(k, min(blocks, k + 4096))],
                      [payload] * (min(blocks, k + 4096) - k))
            time.sleep(1.5)  # async journal flush interval
        srv.stop(kill=True)
        srv.start()
        with Client(srv.endpoint, namespace="startup") as c:
            st = c.stats()[srv.endpoint[len("memkv://"):]]
            assert st["blocks"] >= blocks * 0.99, st["blocks"]
            return st["startup_seconds"]
    finally:
        srv.stop()


def wait_ram_cache(client: Client, deadline_s: float = 120) -> None:
    """The server faults its DRAM cache in at start, on a core the benchmark would share."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        (st,) = client.stats().values()
        if st.get("ram_cache", {}).get("ready"):
            return
        time.sleep(0.2)


def load_peers(skip: bool):
    if skip:
        return []
    sys.path.insert(0, HERE)
    peers = []
    try:
        from peers import PEERS  # noqa
    except ImportError as e:
        print(f"# peers: not loaded ({e})")
        return []
    for cls in PEERS:
        why = cls.available()
        if why:
            print(f"# peer {cls.name}: skipped ({why})")
        else:
            peers.append(cls)
    return peers


def bench_peer(cls, workdir: str, block: int, total: int, repeat: int):
    """(put GB/s, get GB/s) of a peer for the same workload, median of repeats."""
    os.makedirs(os.path.join(workdir, cls.name), exist_ok=True)
    peer = cls(os.path.join(workdir, cls.name))
    peer.start()
    try:
        n = max(4, total // block)
        if hasattr(peer, "timed_put_get"):
            peer.timed_put_get(block, n)  # warm-up: its first pass touches fresh segment memory
            runs = [peer.timed_put_get(block, n) for _ in range(repeat)]
            return (statistics.median(r["bytes"] / r["put_s"] / GB for r in runs),
                    statistics.median(r["bytes"] / r["get_s"] / GB for r in runs))
        per_call = max(1, (64 << 20) // block)
        src = [memoryview(os.urandom(block)) for _ in range(min(n, 8))]
        bufs = [memoryview(bytearray(block)) for _ in range(per_call)]
        puts, gets = [], []
        for r in range(repeat):
            keys = [f"{r}/{block}/{i}".encode() for i in range(n)]
            t0 = time.perf_counter()
            for k in range(0, n, per_call):
                peer.put_many(keys[k:k + per_call], [src[i % len(src)] for i in range(k, min(n, k + per_call))])
            puts.append(n * block / (time.perf_counter() - t0) / GB)
            t0 = time.perf_counter()
            for k in range(0, n, per_call):
                chunk = keys[k:k + per_call]
                peer.get_many(chunk, bufs[:len(chunk)])
            gets.append(n * block / (time.perf_counter() - t0) / GB)
        return statistics.median(puts), statistics.median(gets)
    finally:
        peer.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,1MiB,4MiB,16MiB")
    ap.add_argument("--total", default="512MiB", help="bytes per size and direction")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--durability", choices=["sync", "async"], default="sync")
    ap.add_argument("--startup-blocks", type=int, default=100_000)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--ram-cache", help="DRAM cache of the server for hot reads (default 1GiB)")
    ap.add_argument("--workdir", default=None, help="default: a temp dir under the repository")
    a = ap.parse_args(argv)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    total = parse_size(a.total)
    workdir = tempfile.mkdtemp(prefix="memkv-bench-", dir=a.workdir or ROOT)
    print(f"# memkv bench: sizes {', '.join(map(format_size, sizes))}; {format_size(total)} per size "
          f"and direction; median of {a.repeat}; durability {a.durability}; GB = 1e9 B; "
          f"{os.cpu_count()} cores; workdir {workdir}")
    peers = load_peers(a.no_peers)
    capacity = max(2 * total * a.repeat + (1 << 30), 4 << 30)
    srv = start_server(workdir, capacity, a.durability, "0")
    hot = start_server(os.path.join(workdir, "hot"), capacity, a.durability, a.ram_cache or "1GiB")
    wb = start_server(os.path.join(workdir, "behind"), capacity, "async", a.ram_cache or "1GiB")
    try:
        # same_host=False: the tcp lines must not move to the unix socket on their own
        with Client(srv.endpoint, namespace="bench", same_host=False) as client, \
                Client(hot.endpoint, namespace="bench", same_host=False) as cached, \
                Client(wb.endpoint, namespace="bench", same_host=False) as behind, \
                Client(srv.unix_endpoint, namespace="bench") as client_cma, \
                Client(hot.unix_endpoint, namespace="bench") as cached_cma, \
                Client(wb.unix_endpoint, namespace="bench") as behind_cma:
            transports = {"tcp": (client, cached, behind), "cma": (client_cma, cached_cma, behind_cma)}
            wait_ram_cache(cached)
            wait_ram_cache(behind)
            for block in sizes:
                m = bench_memkv(transports, block, total, a.repeat, "b",
                                os.path.join(workdir, "odirect.bin"))
                peer_res = {}
                for cls in peers:
                    try:
                        peer_res[cls.name] = bench_peer(cls, workdir, block, total, a.repeat)
                    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
                        print(f"# peer {cls.name} failed at {format_size(block)}: "
                              f"{str(e).splitlines()[0][:200]}", flush=True)
                name = format_size(block)
                print(f"ceiling {name:>6}: raw socket {m['tcp_wire']:.2f} GB/s, memcpy "
                      f"{m['cma_wire']:.2f} GB/s, O_DIRECT write {m['tcp_dw']:.2f} / {m['cma_dw']:.2f} "
                      f"GB/s, read {m['tcp_dr']:.2f} / {m['cma_dr']:.2f} GB/s (medians; measured "
                      "right before each figure, before the tcp / the cma passes)" +
                      (f"; in {format_size(SERVER_PIECE)} requests, as the server reads and writes "
                       f"a record this large: write {m['tcp_dwp']:.2f} / {m['cma_dwp']:.2f} GB/s, read "
                       f"{m['tcp_drp']:.2f} / {m['cma_drp']:.2f} GB/s" if block > SERVER_PIECE else ""))
                for tr, wire in (("tcp", "raw socket"), ("cma", "memcpy")):
                    t = f"{tr}_"
                    line_put = (f"put {name:>6} {tr}: {m[t + 'put']:.2f} GB/s = {m[t + 'put_ratio']:.2f} x "
                                f"min({wire}, O_DIRECT write) [{a.durability}, median of per-repeat "
                                f"ratios]; single-block p50 {m[t + 'pp50']:.2f} ms p99 {m[t + 'pp99']:.2f} ms")
                    line_get = (f"get {name:>6} {tr} from disk: {m[t + 'get']:.2f} GB/s = "
                                f"{m[t + 'get_ratio']:.2f} x min({wire}, O_DIRECT read) [server without "
                                f"DRAM cache]; single-block p50 {m[t + 'gp50']:.2f} ms p99 {m[t + 'gp99']:.2f} ms")
                    line_ram = (f"get {name:>6} {tr} hot (DRAM cache): {m[t + 'get_ram']:.2f} GB/s = "
                                f"{m[t + 'get_ram_ratio']:.2f} x {wire} [read after put; that put, filling "
                                f"the cache: {m[t + 'put_cached_ratio']:.2f} x min({wire}, O_DIRECT write)]")
                    line_wb = (f"put {name:>6} {tr} async: {m[t + 'put_wb']:.2f} GB/s acked = "
                               f"{m[t + 'put_wb_ratio']:.2f} x {wire} [written behind from the DRAM "
                               f"cache]; all on disk at {m[t + 'on_disk']:.2f} GB/s = "
                               f"{m[t + 'on_disk_ratio']:.2f} x O_DIRECT write")
                    for pname, (pput, pget) in peer_res.items():
                        line_put += f"; {m[t + 'put'] / pput:.2f} x {pname} ({pput:.2f} GB/s)"
                        line_get += f"; {m[t + 'get'] / pget:.2f} x {pname}"
                        line_ram += f"; {m[t + 'get_ram'] / pget:.2f} x {pname} ({pget:.2f} GB/s, from RAM)"
                        line_wb += f"; acked {m[t + 'put_wb'] / pput:.2f} x {pname} (in RAM only)"
                    print(line_put)
                    print(line_wb)
                    print(line_get)
                    print(line_ram, flush=True)
            idle, during = bench_reads_during_burst(behind_cma, behind)
            print(f"get 1MiB from disk (async server, cache missed): idle p50 {pctl(idle, .5):.1f} ms "
                  f"max {max(idle):.1f} ms; during 768MiB of cma puts being written behind "
                  f"({len(during)} gets): p50 {pctl(during, .5):.1f} ms max {max(during, default=0):.1f} ms")
            p50, p99 = bench_exists(client)
            print(f"exists 256 keys: p50 {p50:.3f} ms, p99 {p99:.3f} ms (target p50 <= 1 ms)")
        srv.stop()
        hot.stop()
        wb.stop()
        if a.startup_blocks:
            s = bench_startup(workdir, a.startup_blocks)
            print(f"startup after kill -9: {a.startup_blocks} blocks indexed in {s:.2f} s "
                  "(target < 5 s)")
    finally:
        srv.stop()
        hot.stop()
        wb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
