"""The NIXL backend MEMKV, driven through real nixl_agent objects of the installed wheel."""
import os
import signal
import time
import tomllib

import pytest
import torch

from conftest import ROOT, Agent, in_threads
from memkv_nixl import Client, Status

KiB, MiB = 1 << 10, 1 << 20


def manifest():
    with open(os.path.join(ROOT, "plugin.toml"), "rb") as f:
        return tomllib.load(f)


def blocks(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=g)


def obj_setup(agent, keys, size, *tensors):
    """Register DRAM tensors and OBJ keys with MEMKV; returns (remote, [local per tensor])."""
    agent.register_memory([(t.data_ptr(), t.numel(), 0, "") for t in tensors], "DRAM", backends=["MEMKV"])
    agent.register_memory([(0, size, i, k) for i, k in enumerate(keys)], "OBJ", backends=["MEMKV"])
    remote = agent.get_xfer_descs([(0, size, i) for i in range(len(keys))], "OBJ")
    locals_ = [agent.get_xfer_descs([(t[i].data_ptr(), size, 0) for i in range(len(keys))], "DRAM")
               for t in tensors]
    return remote, locals_


def test_memkv_is_listed_beside_the_wheels_plugins_with_manifest_params(nixl_agent):
    m = manifest()
    plugins = nixl_agent.get_plugin_list()
    assert {"MEMKV", "UCX", "POSIX"} <= set(plugins)
    assert nixl_agent.get_plugin_params("MEMKV") == {k: v["default"] for k, v in m["params"].items()}
    assert nixl_agent.get_plugin_mem_types("MEMKV") == m["plugin"]["mems"]


def test_readme_documents_every_plugin_parameter():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name, p in manifest()["params"].items():
        assert f"| `{name}` | `{p['default']}` |" in readme, name


@pytest.mark.parametrize("size,n", [(4 * KiB, 64), (256 * KiB, 16), (2 * MiB, 8), (16 * MiB, 3)])
def test_write_read_round_trip_in_batches(server, nixl_agent, size, n):
    nixl_agent.memkv(server)
    src, dst = blocks(n, size, seed=size), torch.zeros(n, size, dtype=torch.uint8)
    keys = [f"rt/{size}/{i}" for i in range(n)]
    remote, (lsrc, ldst) = obj_setup(nixl_agent, keys, size, src, dst)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    assert nixl_agent.xfer("READ", ldst, remote) == "DONE"
    assert torch.equal(src, dst)
    # the blocks are ordinary memkv blocks: the Python client sees the same bytes
    with server.client("nixl-test") as c:
        out = bytearray(size)
        assert c.get([keys[0].encode()], [out]) == [Status.OK]
        assert bytes(out) == src[0].numpy().tobytes()


def test_key_is_devid_when_metainfo_is_empty(server, nixl_agent):
    nixl_agent.memkv(server)
    src = blocks(1, 8 * KiB)
    nixl_agent.register_memory([(src.data_ptr(), src.numel(), 0, "")], "DRAM", backends=["MEMKV"])
    nixl_agent.register_memory([(0, 8 * KiB, 4242, "")], "OBJ", backends=["MEMKV"])
    remote = nixl_agent.get_xfer_descs([(0, 8 * KiB, 4242)], "OBJ")
    local = nixl_agent.get_xfer_descs([(src.data_ptr(), 8 * KiB, 0)], "DRAM")
    assert nixl_agent.xfer("WRITE", local, remote) == "DONE"
    with server.client("nixl-test") as c:
        assert c.exists([b"4242"]) == [True]


def test_query_memory_answers_present_absent_and_evicted(memkv_server, nixl_agent):
    s = memkv_server(capacity="16MiB", extra=["--max-block", "1MiB"])
    nixl_agent.memkv(s)
    src = blocks(2, MiB)
    remote, (lsrc,) = obj_setup(nixl_agent, ["q/0", "q/1"], MiB, src)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    query = [(0, MiB, 0, "q/0"), (0, MiB, 1, "q/1"), (0, MiB, 2, "q/absent")]
    assert nixl_agent.query_memory(query, "MEMKV", "OBJ") == [{}, {}, None]
    with s.client("nixl-test") as c:  # push q/* out of the 16 MiB ring
        for k in range(0, 32, 8):
            c.put([f"fill/{i}".encode() for i in range(k, k + 8)], [bytes(MiB)] * 8)
    assert nixl_agent.query_memory(query, "MEMKV", "OBJ") == [None, None, None]


def test_a_pool_of_servers_places_keys_as_the_python_client_does(memkv_server, nixl_agent):
    """Three servers: one transfer fans out to all of them at once; each block lands on the server
    the Python client names for its key (one placement for every client), and reads back equal.
    A killed server fails the transfers that need it, and only those."""
    servers = [memkv_server(f"s{i}") for i in range(3)]
    nixl_agent.memkv(servers[0], endpoints=",".join(s.endpoint for s in servers), timeout_ms=3000)
    n, size = 24, 512 * KiB
    src, dst = blocks(n, size, seed=9), torch.zeros(n, size, dtype=torch.uint8)
    keys = [f"pool/{i}" for i in range(n)]
    remote, (lsrc, ldst) = obj_setup(nixl_agent, keys, size, src, dst)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    assert nixl_agent.xfer("READ", ldst, remote) == "DONE" and torch.equal(src, dst)
    with Client([s.endpoint for s in servers], namespace="nixl-test") as c:
        owner = {k: c.server_of(k.encode()) for k in keys}
    for s in servers:
        with s.client("nixl-test") as c:
            mine = [k for k in keys if owner[k] == s.address]
            assert mine and c.exists([k.encode() for k in keys]) == [k in mine for k in keys]
    # a server that hangs fails the transfer, and meanwhile the others take their blocks
    stalled = [f"pool/stalled/{i}" for i in range(n)]
    nixl_agent.register_memory([(0, size, 100 + i, k) for i, k in enumerate(stalled)], "OBJ",
                               backends=["MEMKV"])
    remote_stalled = nixl_agent.get_xfer_descs([(0, size, 100 + i) for i in range(n)], "OBJ")
    with Client([s.endpoint for s in servers], namespace="nixl-test") as c:
        owner.update({k: c.server_of(k.encode()) for k in stalled})
    os.kill(servers[1].proc.pid, signal.SIGSTOP)
    try:
        assert nixl_agent.xfer("WRITE", lsrc, remote_stalled) == "ERR"
    finally:
        os.kill(servers[1].proc.pid, signal.SIGCONT)
    for s in (servers[0], servers[2]):
        with s.client("nixl-test") as c:
            mine = [k.encode() for k in stalled if owner[k] == s.address]
            assert c.exists(mine) == [True] * len(mine)
    servers[1].kill9()
    alive = [i for i, k in enumerate(keys) if owner[k] != servers[1].address]
    remote_alive = nixl_agent.get_xfer_descs([(0, size, i) for i in alive], "OBJ")
    local_alive = nixl_agent.get_xfer_descs([(dst[i].data_ptr(), size, 0) for i in alive], "DRAM")
    dst.zero_()
    assert nixl_agent.xfer("READ", ldst, remote) == "ERR"
    assert nixl_agent.xfer("READ", local_alive, remote_alive) == "DONE"
    assert all(torch.equal(src[i], dst[i]) for i in alive)


def test_read_of_a_missing_key_fails_the_transfer_without_touching_the_buffer(server, nixl_agent):
    nixl_agent.memkv(server)
    dst = torch.full((1, 64 * KiB), 7, dtype=torch.uint8)
    remote, (ldst,) = obj_setup(nixl_agent, ["never-written"], 64 * KiB, dst)
    assert nixl_agent.xfer("READ", ldst, remote) == "ERR"
    assert type(nixl_agent.error).__name__ == "nixlNotFoundError"
    assert bool((dst == 7).all())


def test_region_mode_file_registrations_store_remotely_and_rewrite(server, nixl_agent, tmp_path):
    """A tier that thinks it writes a local file (kvcr G3) writes memkv instead; rewriting a slot
    replaces it, as a file write would, and a fresh agent in another process reads it back."""
    nixl_agent.memkv(server)
    path = tmp_path / "g3.bin"
    slot, nslots = 256 * KiB, 4
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, slot * nslots)
    src = blocks(nslots, slot, seed=1)
    dst = torch.zeros_like(src)
    nixl_agent.register_memory([(src.data_ptr(), src.numel(), 0, ""), (dst.data_ptr(), dst.numel(), 0, "")],
                               "DRAM", backends=["MEMKV"])
    nixl_agent.register_memory([(0, slot * nslots, fd, "")], "FILE", backends=["MEMKV"])
    remote = nixl_agent.get_xfer_descs([(i * slot, slot, fd) for i in range(nslots)], "FILE")
    lsrc = nixl_agent.get_xfer_descs([(src[i].data_ptr(), slot, 0) for i in range(nslots)], "DRAM")
    ldst = nixl_agent.get_xfer_descs([(dst[i].data_ptr(), slot, 0) for i in range(nslots)], "DRAM")
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    assert os.pread(fd, 16, 0) == bytes(16), "the local file is not written: the bytes live in memkv"
    assert nixl_agent.xfer("READ", ldst, remote) == "DONE" and torch.equal(src, dst)
    src[0] = 9  # rewrite slot 0
    one = nixl_agent.get_xfer_descs([(0, slot, fd)], "FILE")
    assert nixl_agent.xfer("WRITE", nixl_agent.get_xfer_descs([(src[0].data_ptr(), slot, 0)], "DRAM"), one) == "DONE"
    assert nixl_agent.xfer("READ", ldst, remote) == "DONE" and torch.equal(src, dst)
    os.close(fd)
    # a new process opening the same file reads the same region
    code = f"""
import os, torch, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from conftest import Agent
class S: endpoint = {server.endpoint!r}
a = Agent(); a.memkv(S)
fd = os.open({str(path)!r}, os.O_RDWR)
buf = torch.zeros({slot}, dtype=torch.uint8)
a.register_memory([(buf.data_ptr(), {slot}, 0, "")], "DRAM", backends=["MEMKV"])
a.register_memory([(0, {slot * nslots}, fd, "")], "FILE", backends=["MEMKV"])
st = a.xfer("READ", a.get_xfer_descs([(buf.data_ptr(), {slot}, 0)], "DRAM"), a.get_xfer_descs([({slot}, {slot}, fd)], "FILE"))
print(st, int(buf.sum()))
"""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert last.split() == ["DONE", str(int(src[1].sum()))], r.stdout[-1000:] + r.stderr[-2000:]


def test_server_killed_mid_transfer_errors_within_timeout_then_recovers(server, nixl_agent):
    nixl_agent.memkv(server, timeout_ms=2000)
    n, size = 48, 4 * MiB
    src = blocks(n, size, seed=3)
    remote, (lsrc,) = obj_setup(nixl_agent, [f"kill/{i}" for i in range(n)], size, src)
    h, state = nixl_agent.post("WRITE", lsrc, remote)
    time.sleep(0.05)
    server.kill9()
    t0 = time.time()
    state = nixl_agent.wait(h, state, deadline_s=30)
    assert state == "ERR" and time.time() - t0 < 10
    nixl_agent.release_xfer_handle(h)
    server.start()
    time.sleep(1.2)  # the engine retries a down server after 1 s
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"


def test_handle_released_while_in_flight_is_safe(server, nixl_agent):
    nixl_agent.memkv(server)
    n, size = 32, 4 * MiB
    src, dst = blocks(n, size, seed=4), torch.zeros(n, size, dtype=torch.uint8)
    remote, (lsrc, ldst) = obj_setup(nixl_agent, [f"rel/{i}" for i in range(n)], size, src, dst)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    for _ in range(3):
        h, _ = nixl_agent.post("READ", ldst, remote)
        t0 = time.time()
        nixl_agent.release_xfer_handle(h)
        assert time.time() - t0 < 2.0, "release must not wait for the transfer to finish"
    dst.zero_()
    assert nixl_agent.xfer("READ", ldst, remote) == "DONE" and torch.equal(src, dst)


def test_transfers_from_several_threads_at_once(server):
    def worker(w):
        a = Agent()
        a.memkv(server)
        src, dst = blocks(8, 256 * KiB, seed=w), torch.zeros(8, 256 * KiB, dtype=torch.uint8)
        remote, (lsrc, ldst) = obj_setup(a, [f"t{w}/{i}" for i in range(8)], 256 * KiB, src, dst)
        for _ in range(5):
            assert a.xfer("WRITE", lsrc, remote) == "DONE"
            dst.zero_()
            assert a.xfer("READ", ldst, remote) == "DONE" and torch.equal(src, dst)

    errors = in_threads(worker, 4)
    assert not errors, errors


def test_one_agent_with_transfers_in_flight_from_threads(server, nixl_agent):
    nixl_agent.memkv(server)
    n, size = 16, 256 * KiB
    src = blocks(n, size, seed=5)
    dst = torch.zeros(n, size, dtype=torch.uint8)
    keys = [f"shared/{i}" for i in range(n)]
    remote, (lsrc, ldst) = obj_setup(nixl_agent, keys, size, src, dst)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    handles = []
    for i in range(n):  # many handles posted before any completes
        r = nixl_agent.get_xfer_descs([(0, size, i)], "OBJ")
        loc = nixl_agent.get_xfer_descs([(dst[i].data_ptr(), size, 0)], "DRAM")
        handles.append(nixl_agent.post("READ", loc, r))
    assert [nixl_agent.wait(h, st) for h, st in handles] == ["DONE"] * n
    assert torch.equal(src, dst)


@pytest.mark.parametrize("params,names", [
    ({"endpoint": "memkv://x:1"}, "unknown parameter 'endpoint'"),
    ({"endpoints": "memkv://127.0.0.1:notaport"}, "parameter 'endpoints': bad port"),
    ({"timeout_ms": "soon"}, "parameter 'timeout_ms' must be 1..3600000"),
    ({"verify": "maybe"}, "parameter 'verify' must be true or false"),
    ({"secret_file": "/nonexistent/secret"}, "parameter 'secret_file': cannot read"),
])
def test_bad_parameters_fail_creation_naming_the_parameter(nixl_agent, capfd, params, names):
    with pytest.raises(Exception):
        nixl_agent.create_backend("MEMKV", params)
    assert names in capfd.readouterr().err


def test_ucx_and_posix_still_work_beside_memkv(server, tmp_path):
    a = Agent()
    a.memkv(server)
    a.create_backend("UCX", {})
    a.create_backend("POSIX", {})
    assert {"MEMKV", "UCX", "POSIX"} <= set(a.backends)
    src, dst = blocks(1, MiB, seed=6), torch.zeros(1, MiB, dtype=torch.uint8)
    fd = os.open(tmp_path / "posix.bin", os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, MiB)
    a.register_memory([(src.data_ptr(), MiB, 0, ""), (dst.data_ptr(), MiB, 0, "")], "DRAM", backends=["POSIX"])
    a.register_memory([(0, MiB, fd, "")], "FILE", backends=["POSIX"])
    f = a.get_xfer_descs([(0, MiB, fd)], "FILE")
    assert a.xfer("WRITE", a.get_xfer_descs([(src.data_ptr(), MiB, 0)], "DRAM"), f, backend="POSIX") == "DONE"
    assert a.xfer("READ", a.get_xfer_descs([(dst.data_ptr(), MiB, 0)], "DRAM"), f, backend="POSIX") == "DONE"
    assert torch.equal(src, dst)
    os.close(fd)


def test_auth_with_secret_file(memkv_server, tmp_path, nixl_agent):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-for-nixl\n")
    s = memkv_server(extra=["--secret-file", str(secret)])
    nixl_agent.memkv(s, secret_file=str(secret))
    src = blocks(1, 8 * KiB)
    remote, (lsrc,) = obj_setup(nixl_agent, ["auth/0"], 8 * KiB, src)
    assert nixl_agent.xfer("WRITE", lsrc, remote) == "DONE"
    with Client([s.endpoint], namespace="nixl-test", secret_file=str(secret)) as c:
        assert c.exists([b"auth/0"]) == [True]


def test_cli_prints_a_plugin_dir_a_non_python_host_can_use():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "memkv_nixl.cli", "nixl-plugin-dir"], capture_output=True,
                       text=True, timeout=60)
    path = r.stdout.strip()
    assert r.returncode == 0 and os.path.realpath(os.path.join(path, "libplugin_MEMKV.so")).endswith(
        "memkv_nixl/nixl/libplugin_MEMKV.so")
    assert os.path.exists(os.path.join(path, "libplugin_POSIX.so"))


def test_vram_is_offered_only_where_cuda_exists(server, nixl_agent, capfd):
    nixl_agent.memkv(server)
    mems = nixl_agent.get_backend_mem_types("MEMKV")
    if torch.cuda.is_available():  # not exercised on the CPU-only machines this was built on
        assert "VRAM_SEG" in mems
    else:
        assert mems == ["DRAM_SEG", "OBJ_SEG", "FILE_SEG"]
        err = capfd.readouterr().err
        assert err.count("VRAM_SEG is not offered") == 1
