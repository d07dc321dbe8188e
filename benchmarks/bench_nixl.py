"""NIXL backend benchmark: MEMKV WRITE/READ through nixl_agent against the raw memkv client on
the same server and NIXL's POSIX backend on a local file, in one run. Not a test.

    .venv/bin/python benchmarks/bench_nixl.py [--sizes 2MiB,4MiB,16MiB] [--total 512MiB]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import memkv_nixl.nixl as mk  # noqa: E402

mk.activate()  # before the first agent

import torch  # noqa: E402
from nixl_cu12._api import nixl_agent, nixl_agent_config  # noqa: E402

from bench_store import GB, ROOT, start_server  # noqa: E402
from memkv_nixl import Client, Status  # noqa: E402
from memkv_nixl.units import format_size, parse_size  # noqa: E402

BATCH_BYTES = 64 << 20


def run_batches(agent, name, handles) -> float:
    """Post each prepared transfer in turn, waiting for each; returns seconds."""
    t0 = time.perf_counter()
    for h in handles:
        state = agent.transfer(h)
        while state == "PROC":  # poll as a progress thread would; a busy loop would steal a core
            time.sleep(0.0001)
            state = agent.check_xfer_state(h)
        if state != "DONE":
            raise RuntimeError(f"{name}: transfer ended {state}")
    return time.perf_counter() - t0


def bench_size(agent, server, tmpdir, block, total, repeat, tag):
    n = max(4, total // block)
    per = max(1, BATCH_BYTES // block)
    src = torch.randint(0, 256, (n, block), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    agent.register_memory([(src.data_ptr(), src.numel(), 0, ""), (dst.data_ptr(), dst.numel(), 0, "")],
                          "DRAM", backends=["MEMKV", "POSIX"])
    fd = os.open(os.path.join(tmpdir, f"posix-{block}.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, n * block)
    agent.register_memory([(0, n * block, fd, "")], "FILE", backends=["POSIX"])
    res = {"memkv_w": [], "memkv_r": [], "raw_w": [], "raw_r": [], "posix_w": [], "posix_r": []}
    with Client([server.endpoint], namespace="bench-nixl") as client:
        for r in range(repeat):
            keys = [f"{tag}/{block}/{r}/{i}" for i in range(n)]
            agent.register_memory([(0, block, i, k) for i, k in enumerate(keys)], "OBJ", backends=["MEMKV"])
            handles = {}
            for op, t in (("WRITE", src), ("READ", dst)):
                handles[op] = [agent.initialize_xfer(
                    op, agent.get_xfer_descs([(t[i].data_ptr(), block, 0) for i in range(k, min(n, k + per))], "DRAM"),
                    agent.get_xfer_descs([(0, block, i) for i in range(k, min(n, k + per))], "OBJ"),
                    agent.name, backends=["MEMKV"]) for k in range(0, n, per)]
            res["memkv_w"].append(n * block / run_batches(agent, "MEMKV WRITE", handles["WRITE"]) / GB)
            res["memkv_r"].append(n * block / run_batches(agent, "MEMKV READ", handles["READ"]) / GB)
            assert torch.equal(src, dst)
            for hs in handles.values():
                for h in hs:
                    agent.release_xfer_handle(h)
            # the raw client, same server, same bytes, fresh keys
            rkeys = [f"{tag}/raw/{block}/{r}/{i}".encode() for i in range(n)]
            bufs = [memoryview(src[i].numpy()) for i in range(n)]
            outs = [memoryview(dst[i].numpy()) for i in range(n)]
            t0 = time.perf_counter()
            for k in range(0, n, per):
                assert set(client.put(rkeys[k:k + per], bufs[k:k + per])) == {Status.OK}
            res["raw_w"].append(n * block / (time.perf_counter() - t0) / GB)
            t0 = time.perf_counter()
            for k in range(0, n, per):
                assert set(client.get(rkeys[k:k + per], outs[k:k + per])) == {Status.OK}
            res["raw_r"].append(n * block / (time.perf_counter() - t0) / GB)
            # NIXL POSIX on a local file
            handles = {op: [agent.initialize_xfer(
                op, agent.get_xfer_descs([(t[i].data_ptr(), block, 0) for i in range(k, min(n, k + per))], "DRAM"),
                agent.get_xfer_descs([(i * block, block, fd) for i in range(k, min(n, k + per))], "FILE"),
                agent.name, backends=["POSIX"]) for k in range(0, n, per)] for op, t in (("WRITE", src), ("READ", dst))}
            res["posix_w"].append(n * block / run_batches(agent, "POSIX WRITE", handles["WRITE"]) / GB)
            res["posix_r"].append(n * block / run_batches(agent, "POSIX READ", handles["READ"]) / GB)
            for hs in handles.values():
                for h in hs:
                    agent.release_xfer_handle(h)
    os.close(fd)
    out = {k: statistics.median(v) for k, v in res.items()}
    # each repeat ran MEMKV and the raw client back to back: their ratio is robust to drift
    out["ratio_w"] = statistics.median(m / r for m, r in zip(res["memkv_w"], res["raw_w"]))
    out["ratio_r"] = statistics.median(m / r for m, r in zip(res["memkv_r"], res["raw_r"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2MiB,4MiB,16MiB")
    ap.add_argument("--total", default="512MiB")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    total = parse_size(a.total)
    workdir = tempfile.mkdtemp(prefix="memkv-bench-nixl-", dir=ROOT)
    print(f"# NIXL MEMKV bench: sizes {', '.join(map(format_size, sizes))}; {format_size(total)} per "
          f"size and direction; batches of {format_size(BATCH_BYTES)}; median of {a.repeat}; GB = 1e9 B")
    # no DRAM cache: MEMKV and the raw client both read what they wrote back from disk
    server = start_server(workdir, max(4 << 30, 3 * total * a.repeat * 2), "sync", "0")
    agent = nixl_agent("bench", nixl_agent_config(backends=[]))
    agent.name = "bench"
    agent.create_backend("MEMKV", {"endpoints": server.endpoint, "namespace": "bench-nixl"})
    agent.create_backend("POSIX", {})
    try:
        for block in sizes:
            r = bench_size(agent, server, workdir, block, total, a.repeat, "n")
            name = format_size(block)
            for op, m, raw, ratio, px in (("WRITE", r["memkv_w"], r["raw_w"], r["ratio_w"], r["posix_w"]),
                                          ("READ", r["memkv_r"], r["raw_r"], r["ratio_r"], r["posix_r"])):
                print(f"MEMKV {op:5} {name:>6}: {m:.2f} GB/s = {ratio:.2f} x raw memkv client "
                      f"({raw:.2f} GB/s) [median of per-repeat ratios]; NIXL POSIX local file "
                      f"{px:.2f} GB/s (page cache, not O_DIRECT) (target >= 0.90 x raw)", flush=True)
    finally:
        server.stop()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
