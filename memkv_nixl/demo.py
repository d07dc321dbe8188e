"""`memkv demo`: the store end to end on the embedded default, in one command.

Starts a memkv server on the default data directory (MEMKV_DATA or ~/.local/share/memkv), stores
the KV blocks of a simulated 8K-token prompt (Llama-3-8B geometry: 2 MiB per 16-token page)
under content-addressed keys, loads them back, then restarts the server (clean stop, then kill -9)
and shows the blocks are still served, byte-identical. Run it twice: the second run finds the
blocks of the first one already stored.
"""
import time

from . import Client, Status, native
from .server.config import default_data_dir
from .server.local import LocalServer

PAGE_TOKENS = 16
BLOCK_BYTES = 2 << 20  # Llama-3-8B, bf16, TP1: 32 layers x 2 x 16 tokens x 8 heads x 128 x 2 B
PROMPT_TOKENS = 8192
MODEL_FINGERPRINT = b"llama3-8b/bf16/p16/tp0"


def _block_keys(tokens: list[int]) -> list[bytes]:
    """Chained content hashes, one per full page: equal prefixes give equal keys in any process."""
    keys, prev = [], 0
    for start in range(0, len(tokens) - PAGE_TOKENS + 1, PAGE_TOKENS):
        page = b"".join(t.to_bytes(4, "little") for t in tokens[start:start + PAGE_TOKENS])
        prev = native.xxh3(prev.to_bytes(8, "little") + page, seed=native.xxh3(MODEL_FINGERPRINT))
        keys.append(MODEL_FINGERPRINT + b"/" + prev.to_bytes(8, "big").hex().encode())
    return keys


def _block_bytes(key: bytes) -> bytes:
    """Deterministic stand-in for a KV block (the real ones come from the engine)."""
    seed = native.xxh3(key).to_bytes(8, "little")
    return (seed * (BLOCK_BYTES // 8))


def main(args) -> None:
    data = args.data or default_data_dir()
    srv = LocalServer(data)
    print(f"memkv demo: data directory {data}")
    t = srv.start()
    print(f"  server up on {srv.endpoint} in {t:.2f} s")
    tokens = [(i * 7919) % 128256 for i in range(PROMPT_TOKENS)]
    keys = _block_keys(tokens)
    blocks = [_block_bytes(k) for k in keys]
    total = len(blocks) * BLOCK_BYTES
    try:
        with Client([srv.endpoint], namespace=MODEL_FINGERPRINT.decode()) as c:
            already = sum(c.exists(keys))
            if already:
                print(f"  {already}/{len(keys)} blocks already stored by an earlier run "
                      "(the cache survived)")
            t0 = time.perf_counter()
            st = c.put(keys, blocks)
            dt = time.perf_counter() - t0
            assert st == [Status.OK] * len(keys), set(st)
            print(f"  put {len(keys)} KV blocks of {BLOCK_BYTES >> 20} MiB ({PROMPT_TOKENS} tokens, "
                  f"{total / 1e9:.2f} GB) in {dt:.2f} s: {total / dt / 1e9:.2f} GB/s (durability sync)")
            _check(c, keys, blocks, "get")
        for how in ("clean stop", "kill -9"):
            srv.stop(kill=how == "kill -9")
            t = srv.start()
            with Client([srv.endpoint], namespace=MODEL_FINGERPRINT.decode()) as c:
                _check(c, keys, blocks, f"after {how} + restart ({t:.2f} s)")
                stats = c.stats()[srv.endpoint[len("memkv://"):]]
        print(f"  server: {stats['blocks']} blocks, {stats['used_bytes'] / 2**30:.2f} of "
              f"{stats['capacity_bytes'] / 2**30:.1f} GiB used, index recovered in "
              f"{stats['startup_seconds']:.3f} s")
        via = ("same-host copies (cma) through the server's unix socket"
               if stats["counters"].get("cma_connections") else "TCP")
        print(f"  blocks moved by {via}")
        print("memkv demo: OK")
    finally:
        srv.stop()


def _check(c: Client, keys, blocks, what: str) -> None:
    bufs = [bytearray(BLOCK_BYTES) for _ in keys]
    t0 = time.perf_counter()
    st = c.get(keys, bufs)
    dt = time.perf_counter() - t0
    ok = sum(s == Status.OK and bytes(b) == d for s, b, d in zip(st, bufs, blocks))
    if ok != len(keys):
        raise SystemExit(f"  {what}: only {ok}/{len(keys)} blocks came back equal")
    print(f"  {what}: {ok}/{len(keys)} blocks served byte-identical, "
          f"{len(keys) * BLOCK_BYTES / dt / 1e9:.2f} GB/s")
