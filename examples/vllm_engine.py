"""One vLLM (CPU) engine with the memkv connector, driven by JSON lines on stdin.

The TTFT demo and the tests start this as a fresh process per "worker", so a hit really comes
from memkv and not from the engine's own prefix cache. Each reply is one stdout line starting
with REPLY_TAG (vLLM logs on the same stream). Commands:
  {"op": "generate", "ids": [...] | "n": N, "seed": S, "max_tokens": K}
      -> {"ttft": seconds, "tokens": [...], "logprobs": [[[id, logprob] x5] per token],
          "external_hits": vllm:external_prefix_cache_hits so far, "stats": connector counters}
  {"op": "quit"}
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPLY_TAG = "MEMKV-ENGINE "
SPEED_ENV = {  # vLLM's CPU prefill is several times faster with these malloc settings
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1073741824:"
                      "glibc.malloc.trim_threshold=17179869184",
}


def engine_env(rpc_dir: str) -> dict:
    """Environment for an engine process on this CPU-only machine (no downloads, loopback only)."""
    os.makedirs(rpc_dir, exist_ok=True)
    return {**os.environ, **SPEED_ENV, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_HOST_IP": "127.0.0.1", "VLLM_RPC_BASE_PATH": rpc_dir,
            "TOKENIZERS_PARALLELISM": "false"}


def kv_transfer_config(endpoint: str, **extra) -> dict:
    return {"kv_connector": "MemKVConnector",
            "kv_connector_module_path": "memkv_nixl.integrations.vllm", "kv_role": "kv_both",
            "kv_connector_extra_config": {"endpoints": endpoint, **extra}}


class Engine:
    """The parent's handle on one engine process."""

    def __init__(self, model: str, ktc: dict, workdir: str, name: str, *,
                 block_size: int | None = None, prefix_caching: bool = True):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--model", model,
             "--kv-transfer-config", json.dumps(ktc),
             *(["--block-size", str(block_size)] if block_size else []),
             *([] if prefix_caching else ["--no-prefix-caching"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=engine_env(os.path.join(workdir, f"rpc-{name}")),
            start_new_session=True)  # its own process group: close() also ends vLLM's children
        try:
            self.ready = self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY_TAG):
                return json.loads(line[len(REPLY_TAG):])
            self.log.write(line)
            self.log.flush()
        raise RuntimeError(f"engine {self.name} exited with {self.proc.wait()}; see {self.log_path}")

    def generate(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps({"op": "generate", **cmd}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self._read()
                for line in self.proc.stdout:  # shutdown logs
                    self.log.write(line)
                self.proc.wait(60)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stray engine-core/worker processes
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def reply(obj) -> None:
    sys.stdout.write(REPLY_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _external_hits(llm) -> int:
    for m in llm.get_metrics():
        if m.name == "vllm:external_prefix_cache_hits":
            return int(m.value)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-transfer-config", required=True, help="JSON, as vLLM takes it")
    ap.add_argument("--max-model-len", type=int, default=8448)
    ap.add_argument("--block-size", type=int, help="tokens per KV block (vLLM's default if unset)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="no local prefix cache: every repeated prompt goes to memkv")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_llama import prompt_ids
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    ktc = json.loads(a.kv_transfer_config)
    llm = LLM(model=a.model, dtype="float32", max_model_len=a.max_model_len, enforce_eager=True,
              seed=0, disable_log_stats=False, kv_transfer_config=ktc,
              enable_prefix_caching=not a.no_prefix_caching,
              **({"block_size": a.block_size} if a.block_size else {}))
    stats_file = ktc.get("kv_connector_extra_config", {}).get("stats_file")
    reply({"ready": True, "start_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        ids = cmd.get("ids") or prompt_ids(cmd["n"], cmd["seed"])
        sp = SamplingParams(max_tokens=cmd.get("max_tokens", 1), temperature=0.0, logprobs=5)
        t = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0].outputs[0]
        ttft = time.perf_counter() - t
        stats = {}
        if stats_file and os.path.exists(stats_file):
            with open(stats_file) as f:
                stats = json.load(f)
        reply({"ttft": ttft, "tokens": list(out.token_ids),
               "logprobs": [sorted(([tok, lp.logprob] for tok, lp in pos.items()),
                                   key=lambda x: -x[1]) for pos in out.logprobs],
               "external_hits": _external_hits(llm), "stats": stats})
    reply({"bye": True})


if __name__ == "__main__":
    main()
