"""kvcr's G3 tier on the MEMKV backend, end to end: kvcr from the installed wheel, a real memkv
server, the same engine-like workload on backend="POSIX" as the reference.

kvcr only writes G3 when its local DRAM tier is full (G3LRUPolicy: evicting a DRAM block is a
MOVE_TO G3, a NIXL WRITE DRAM slot -> (file fd, slot offset)); it reads G3 on deliver (READ into the
engine's buffer) and on fetch (READ into its own DRAM). So the driver gives kvcr a 2-block DRAM tier
and a 6-slot G3 (2 files x 3 slots, striped round robin) and deposits 10 blocks one at a time:
blocks 0-7 spill to G3, 0-1 then fall out of G3 (their slots are reused by 6-7: MEMKV's
region mode must replace), 8-9 stay in DRAM. It then delivers every resident block, fetches block 2
back into DRAM (which spills block 8 into the slot of evicted block 3), and reports digests.

kvcr runs in a child process: NIXL reads its plugin directory once per process, and kvcr's
`from nixl import nixl_agent` must pick the flavour (nixl_cu13 on CPU) before MEMKV is activated
for it; this process's conftest activated the cu12 directory, so the child's environment drops it.
"""
import hashlib
import json
import os
import random
import socket
import subprocess
import sys

from conftest import ROOT

KiB = 1 << 10
BLOCK = 64 * KiB  # kvcr needs page-aligned G3 slots
N = 10            # blocks the "engine" deposits
DRAM_SLOTS = 2    # kvcr's local DRAM tier: tiny, so blocks go to G3
G3_FILES = 2
G3_SLOTS_PER_FILE = 3
SEED = 7
NAMESPACE = "kvcr-g3"

# What both backends must show after the deposits: FIFO spill (deposits leave no access time, so
# LRU ties fall back to insertion order), blocks 0-1 dropped from the full G3.
EXPECTED_QUERY = [["MISS", None]] * 2 + [["FETCHABLE", "G3"]] * 6 + [["HIT", "DRAM"]] * 2
G3_STORES = 9  # 8 spills while depositing + block 8 spilled by the fetch of block 2
G3_READS = 7   # deliver of blocks 2-7 + the fill of block 2

DRIVER = r'''
import ctypes, hashlib, json, mmap, os, random, sys, time

cfg = json.loads(sys.argv[1])
import nixl  # noqa: F401  (what kvcr imports: fixes the NIXL flavour, nixl_cu13 on CPU)
if cfg["backend"] == "MEMKV":
    import memkv_nixl.nixl as memkv_backend
    memkv_backend.activate()  # before kvcr's progress thread creates the agent

from pathlib import Path
from kvcr import KVCR, KVCRBindings
from kvcr.config import G3Options, KVCRBackendConfigs, KVCRConfig, LocalDramOptions
from kvcr.types import BlockKey, MemoryRef, PinRequestId, RegionDescriptor

BLOCK, N, SLOTS, POOL = cfg["block"], cfg["n"], cfg["dram_slots"], "kv"


def buffer(nbytes):
    m = mmap.mmap(-1, nbytes)  # page aligned: kvcr hands NIXL O_DIRECT fds
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


fw, fw_addr = buffer(2 * N * BLOCK)      # the engine's CPU KV buffer: N sources, N destinations
dram, dram_addr = buffer(SLOTS * BLOCK)  # kvcr's local DRAM tier
rng = random.Random(cfg["seed"])
payload = [rng.randbytes(BLOCK) for _ in range(N)]
for i, p in enumerate(payload):
    fw[i * BLOCK:(i + 1) * BLOCK] = p

name = f"kvcr-g3-{cfg['backend']}-{os.getpid()}"
kv = KVCR(
    KVCRConfig(nixl_agent_name=name, pool_layouts=[(POOL, BLOCK)], nixl_listen_port=0,
               operation_timeout_ms=10000, abandon_timeout_ms=20000),
    KVCRBindings(request_pin=lambda keys: PinRequestId(0), poll_pin_results=lambda: (),
                 release_pin=lambda handle: False),
    KVCRBackendConfigs(
        framework_regions=[RegionDescriptor(addr=fw_addr, size=BLOCK, count=2 * N, label=POOL)],
        local_dram=LocalDramOptions(pools=[(POOL, dram_addr, SLOTS * BLOCK)], backend="UCX"),
        g3=G3Options(paths=tuple(Path(p) for p in cfg["paths"]),
                     capacity_bytes_per_file=cfg["capacity"], backend=cfg["backend"],
                     backend_options=cfg["options"]),
    ),
)


def ref(i):
    return MemoryRef(end_point_name=name, label=POOL, element_index=i)


def wait(handle, deadline_s=30.0):
    end = time.time() + deadline_s
    while time.time() < end:
        for h, entries in kv.poll_completed():
            if h == handle:
                return entries
        time.sleep(0.001)
    raise TimeoutError(f"kvcr op {handle} did not complete in {deadline_s}s")


def query(keys):
    return [[s.value, t.value if t else None] for s, t in kv.query(keys)]


def digest(b):
    return hashlib.sha256(b).hexdigest()


keys = [BlockKey(f"block-{i}".encode()) for i in range(N)]
out = {"flavours": [m for m in ("nixl_cu12", "nixl_cu13") if m in sys.modules],
       "plugin_dir": os.environ.get("NIXL_PLUGIN_DIR"), "payload": [digest(p) for p in payload]}
try:
    # one block at a time, as an engine offloads: a full DRAM tier spills its LRU block to G3
    out["deposit"] = [wait(kv.deposit({k: [ref(i)]}))[k].status.value for i, k in enumerate(keys)]
    out["query"] = query(keys)
    # deliver every resident block into the destination half (G3 blocks: READ from the tier)
    want = [i for i, (s, _) in enumerate(out["query"]) if s != "MISS"]
    res = wait(kv.deliver({keys[i]: [ref(N + i)] for i in want}))
    out["deliver"] = {str(i): res[keys[i]].status.value for i in want}
    out["delivered"] = {str(i): digest(fw[(N + i) * BLOCK:(N + i + 1) * BLOCK]) for i in want}
    # fetch the oldest G3 block back into kvcr's own DRAM (G3 -> local DRAM fill)
    first = next(i for i, (s, t) in enumerate(out["query"]) if t == "G3")
    r = wait(kv.fetch([keys[first]], expected_layout=[POOL]))[keys[first]]
    out["fetch"] = {"index": first, "status": r.status.value}
    if r.success:
        slot = r.descriptors[0].element_index
        out["fetch"]["digest"] = digest(dram[slot * BLOCK:(slot + 1) * BLOCK])
        kv.release([r.release_handle])
    out["query_end"] = query(keys)
    # where kvcr keeps each G3-resident block: its own slot -> (fd, file offset) mapping
    # (private state of kvcr 0.1.1; the only record of which slot holds which block)
    core = kv._core
    out["g3_slots"] = {}
    for i, k in enumerate(keys):
        record = core._block_record_map.get(k)
        if record is not None and record.g3 is not None:
            d = core._g3._descriptor(record.g3.slot)
            out["g3_slots"][str(i)] = [os.readlink(f"/proc/self/fd/{d.device_Id}"), d.addr]
finally:
    kv.close()
print("RESULT " + json.dumps(out), flush=True)
'''


def payloads():
    rng = random.Random(SEED)
    return [rng.randbytes(BLOCK) for _ in range(N)]


def start_kvcr(backend, options, g3_dir):
    g3_dir.mkdir(parents=True)
    cfg = {"backend": backend, "options": options, "block": BLOCK, "n": N,
           "dram_slots": DRAM_SLOTS, "seed": SEED, "capacity": G3_SLOTS_PER_FILE * BLOCK,
           "paths": [str(g3_dir / f"g3-{f}") for f in range(G3_FILES)]}
    env = {k: v for k, v in os.environ.items() if k != "NIXL_PLUGIN_DIR"}
    env["UCX_MODULES"] = "^efa"
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc, backend):
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"kvcr on {backend} failed (rc {proc.returncode})\n"
        f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):]), stderr


def check_round_trip(res, backend):
    digests = [hashlib.sha256(p).hexdigest() for p in payloads()]
    assert res["flavours"] == ["nixl_cu13"], backend
    assert res["payload"] == digests, backend
    assert res["deposit"] == ["SUCCESS"] * N, backend
    assert res["query"] == EXPECTED_QUERY, backend
    resident = [str(i) for i in range(2, N)]
    assert res["deliver"] == {i: "SUCCESS" for i in resident}, backend
    bad = [i for i in resident if res["delivered"][i] != digests[int(i)]]
    assert not bad, f"{backend}: blocks {bad} came back different"
    assert res["fetch"] == {"index": 2, "status": "SUCCESS", "digest": digests[2]}, backend
    assert len(res["g3_slots"]) == G3_FILES * G3_SLOTS_PER_FILE, backend  # G3 full, slots reused


def test_kvcr_g3_on_memkv_round_trips_like_posix(server, tmp_path):
    mk = start_kvcr("MEMKV", {"endpoints": server.endpoint, "namespace": NAMESPACE},
                    tmp_path / "g3-memkv")
    px = start_kvcr("POSIX", {}, tmp_path / "g3-posix")
    memkv, memkv_err = result_of(mk, "MEMKV")
    posix, _ = result_of(px, "POSIX")

    check_round_trip(posix, "POSIX")
    check_round_trip(memkv, "MEMKV")
    assert "nixl_cu13" in memkv["plugin_dir"] and posix["plugin_dir"] is None
    # MEMKV behaves exactly as the reference: same statuses, same bytes, same slot placement
    same = {k: v for k, v in memkv.items() if k not in ("plugin_dir", "g3_slots")}
    assert same == {k: v for k, v in posix.items() if k not in ("plugin_dir", "g3_slots")}
    place = {k: (os.path.basename(p), off) for k, (p, off) in memkv["g3_slots"].items()}
    assert place == {k: (os.path.basename(p), off) for k, (p, off) in posix["g3_slots"].items()}
    problems = [line for line in memkv_err.splitlines()
                if "memkv-nixl:" in line and "VRAM_SEG is not offered" not in line]
    assert not problems, memkv_err  # the plugin logged no error or warning

    data = payloads()
    capacity = G3_SLOTS_PER_FILE * BLOCK
    # POSIX: the blocks are in kvcr's files at their slot offsets
    for i, (path, off) in posix["g3_slots"].items():
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(BLOCK) == data[int(i)], f"POSIX block {i} at {path}@{off}"

    # MEMKV: the blocks are memkv blocks "file:<host>:<realpath>@<hex offset>" ...
    host = socket.gethostname()
    with server.client(NAMESPACE) as c:
        ns = c.stats()[server.address]["namespaces"][NAMESPACE]  # before our own reads count
        for i, (path, off) in memkv["g3_slots"].items():
            key = f"file:{host}:{os.path.realpath(path)}@{off:x}".encode()
            buf = bytearray(BLOCK)
            assert [s.name for s in c.get([key], [buf])] == ["OK"], key
            assert bytes(buf) == data[int(i)], f"memkv block {key!r} is not block {i}"
    # one block per G3 slot (reused slots were replaced, not added), every store and load went
    # through memkv
    assert ns["blocks"] == G3_FILES * G3_SLOTS_PER_FILE, ns
    assert ns["bytes"] == G3_FILES * G3_SLOTS_PER_FILE * BLOCK, ns
    assert ns["puts"] == G3_STORES and ns["hits"] == G3_READS and ns["misses"] == 0, ns
    # ... and kvcr's own files stayed as it preallocated them: all zeros
    for f in range(G3_FILES):
        path = tmp_path / "g3-memkv" / f"g3-{f}"
        assert path.stat().st_size == capacity
        assert path.read_bytes() == bytes(capacity), f"{path} was written"
