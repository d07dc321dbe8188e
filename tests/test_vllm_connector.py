"""The vLLM connector on real vLLM (CPU) engines in their own processes, against real memkv servers.

Three engines run at once: A and B serve the same model, C a model with other weights and no room
for saves in flight (every save is dropped). B keeps no local prefix cache, so each of its
requests goes to memkv first.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from memkv_nixl.diskformat import REC_HDR, REC_HEADER, REC_MAGIC, SUPERBLOCK_LEN, record_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import tiny_llama  # noqa: E402
from vllm_engine import Engine, engine_env, kv_transfer_config  # noqa: E402

from conftest import MemkvServer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

N = 1000            # prompt tokens: 7 full blocks of 128 (vLLM's CPU default) and a tail
BLOCKS = (N - 1) // 128
OUT = 4             # generated tokens compared


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    m0 = tiny_llama.build(str(d / "model0"), seed=0)
    m1 = tiny_llama.build(str(d / "model1"), seed=1)
    # no DRAM cache: the corruption test must reach the bytes on disk
    server = MemkvServer(d, "memkv", capacity="512MiB", extra=["--ram-cache", "0"])
    stats = {n: str(d / f"{n}-stats.json") for n in "ABC"}
    specs = {"A": (m0, True, {}), "B": (m0, False, {}), "C": (m1, True, {"save_buffer_mib": 0})}
    engines, errors = {}, []

    def start(name):
        model, prefix_caching, extra = specs[name]
        try:
            engines[name] = Engine(model, kv_transfer_config(server.endpoint, stats_file=stats[name],
                                                             **extra),
                                   str(d), name, prefix_caching=prefix_caching)
        except Exception as e:  # noqa: BLE001 - reported below with the engine's log
            errors.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield server, engines, d
    finally:
        for e in engines.values():
            e.close()
        server.kill9()
        shutil.rmtree(server.data, ignore_errors=True)


def _wait_saved(engine, blocks, timeout=60):
    """Saves are asynchronous: wait until the engine's worker stored `blocks` blocks in all."""
    end = time.time() + timeout
    while time.time() < end:
        s = engine.generate(n=1, seed=0)["stats"]
        if s.get("saved_blocks", 0) >= blocks:
            return s
        time.sleep(0.2)
    raise AssertionError(f"engine {engine.name} stored only {s} after {timeout} s")


def _same_output(a, b):
    assert a["tokens"] == b["tokens"]
    for pa, pb in zip(a["logprobs"], b["logprobs"]):
        assert [t for t, _ in pa] == [t for t, _ in pb]
        assert max(abs(x - y) for (_, x), (_, y) in zip(pa, pb)) < 1e-3


def _hits(engine, **req):
    before = engine.generate(n=1, seed=0)
    out = engine.generate(**req, max_tokens=OUT)
    return out, out["external_hits"] - before["external_hits"]


def test_second_worker_loads_the_prompt_from_memkv_and_answers_the_same(env):
    server, eng, _ = env
    miss, hits = _hits(eng["A"], n=N, seed=1)
    assert hits == 0
    saved = _wait_saved(eng["A"], BLOCKS)
    assert saved["saved_bytes"] == BLOCKS * saved["block_bytes"]
    loaded_before = eng["B"].generate(n=1, seed=0)["stats"].get("loaded_blocks", 0)
    hit, hits = _hits(eng["B"], n=N, seed=1)
    assert hits == BLOCKS * 128, "external cache hits must cover every full block but the tail"
    assert hit["stats"]["loaded_blocks"] - loaded_before == BLOCKS
    _same_output(miss, hit)


def test_concurrent_engines_share_blocks_both_ways(env):
    _, eng, _ = env
    saved_before = eng["B"].generate(n=1, seed=0)["stats"].get("saved_blocks", 0)
    first, hits = _hits(eng["B"], n=N + 200, seed=2)
    assert hits == 0
    _wait_saved(eng["B"], saved_before + (N + 200) // 128)
    second, hits = _hits(eng["A"], n=N + 200, seed=2)
    assert hits == (N + 200 - 1) // 128 * 128
    _same_output(first, second)


def test_saves_of_prompts_of_different_lengths_reuse_buffers_and_all_land(env):
    _, eng, _ = env
    before = eng["A"].generate(n=1, seed=0)["stats"]
    blocks = 0
    for n, seed in ((300, 20), (N, 21), (N, 22), (300, 23)):  # short, long, long: reused buffers
        eng["A"].generate(n=n, seed=seed, max_tokens=1)
        blocks += n // 128
        after = _wait_saved(eng["A"], before.get("saved_blocks", 0) + blocks)
    assert after.get("save_failed", 0) == before.get("save_failed", 0)


def test_another_model_never_gets_these_blocks(env):
    _, eng, _ = env
    _, hits = _hits(eng["C"], n=N, seed=1)  # stored by A for model0 in the first test
    assert hits == 0


def test_saves_beyond_the_buffer_are_dropped_and_counted_never_blocking(env):
    _, eng, _ = env
    out, _ = _hits(eng["C"], n=N, seed=3)
    assert len(out["tokens"]) == OUT
    stats = out["stats"]
    assert stats["saved_blocks"] == 0 and stats["save_dropped"] >= N // 128


def test_server_down_means_recompute_with_a_warning_then_hits_again(env):
    server, eng, d = env
    reference, _ = _hits(eng["A"], n=N, seed=1)
    server.stop()
    try:
        out, hits = _hits(eng["B"], n=N, seed=1)
        assert hits == 0
        _same_output(reference, out)
        log = open(d / "B.log").read() if os.path.exists(d / "B.log") else ""
        assert "unreachable" in log
    finally:
        server.start()
    time.sleep(1.5)  # past the client's first back-off
    out, hits = _hits(eng["B"], n=N, seed=1)
    assert hits == BLOCKS * 128
    _same_output(reference, out)


def _corrupt_every_record(server):
    """Flip one payload byte of every block record in the server's data file."""
    path = server.data / "blocks.dat"
    flipped = 0
    with open(path, "r+b") as f:
        off = SUPERBLOCK_LEN
        while True:
            f.seek(off)
            hdr = f.read(REC_HDR)
            if len(hdr) < REC_HDR or REC_HEADER.unpack(hdr)[0] != REC_MAGIC:
                break
            length = REC_HEADER.unpack(hdr)[6]
            f.seek(off + REC_HDR + length // 2)
            b = f.read(1)
            f.seek(off + REC_HDR + length // 2)
            f.write(bytes([b[0] ^ 0x5A]))
            flipped += 1
            off += record_length(length)
        f.flush()
        os.fsync(f.fileno())
    return flipped


def test_corrupt_blocks_are_recomputed_never_served(env):
    server, eng, _ = env
    reference, _ = _hits(eng["A"], n=N, seed=1)
    assert _corrupt_every_record(server) >= BLOCKS
    before = eng["B"].generate(n=1, seed=0)["stats"]
    out, _ = _hits(eng["B"], n=N, seed=1)
    _same_output(reference, out)
    after = out["stats"]
    assert after["load_failed"] > before.get("load_failed", 0)
    with server.client("vllm") as c:
        assert c.stats()[server.address]["counters"]["get_corrupt"] >= 1


def test_unknown_or_bad_settings_are_named_with_the_known_ones():
    from memkv_nixl.integrations.vllm import connector_settings
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config key\(s\) \['endpoint'\].*"
                                         r"known keys: \[.*'endpoints'"):
        connector_settings({"endpoint": "memkv://x:1"})
    with pytest.raises(ValueError, match="timeout_s must be a number"):
        connector_settings({"timeout_s": "soon"})
    assert connector_settings(None)["endpoints"] == "memkv://127.0.0.1:9900"


def test_readme_documents_every_connector_setting_with_its_default():
    from memkv_nixl.integrations.vllm import SETTINGS
    readme = open(os.path.join(ROOT, "README.md")).read().split("## vLLM and Dynamo")[1]
    for key, (default, meaning) in SETTINGS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"README has no row for connector setting {key}"
        assert meaning in row
        if default is not None:
            assert f"`{default:g}`" in row if isinstance(default, float) else f"`{default}`" in row


def test_openai_server_takes_the_same_json_and_hits(env):
    """vLLM's OpenAI server with the same --kv-transfer-config: a text prompt whose blocks engine A
    stored (the tiny tokenizer maps the word wN to token N) is answered from memkv."""
    server, eng, d = env
    reference, _ = _hits(eng["A"], n=N, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = str(d / "model0")
    log = open(d / "openai.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "2048",
         "--kv-transfer-config", json.dumps(kv_transfer_config(server.endpoint))],
        stdout=log, stderr=subprocess.STDOUT, env=engine_env(str(d / "rpc-openai")),
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 600
        while True:
            assert proc.poll() is None, open(d / "openai.log").read()[-3000:]
            try:
                if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                    break
            except OSError:
                assert time.time() < end, "OpenAI server did not become healthy"
                time.sleep(1)
        prompt = " ".join(f"w{t}" for t in tiny_llama.prompt_ids(N, 1))
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": OUT,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        text = json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["text"]
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        hits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.split("{")[0].split(" ")[0] in ("vllm:external_prefix_cache_hits",
                                                             "vllm:external_prefix_cache_hits_total"))
        assert hits == BLOCKS * 128
        if all(t >= tiny_llama.FIRST_WORD for t in reference["tokens"]):
            assert text.split() == [f"w{t}" for t in reference["tokens"]]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
