"""memkv as a vLLM KV connector: a worker skips the prefill of every prompt prefix memkv holds.

Select it with one entry (vLLM's OpenAI server, `LLM(kv_transfer_config=...)` or
`python -m dynamo.vllm`):
    --kv-transfer-config '{"kv_connector": "MemKVConnector",
        "kv_connector_module_path": "memkv_nixl.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"endpoints": "memkv://127.0.0.1:9900"}}'

vLLM runs two halves of a connector in two processes:
- the scheduler half (engine core) asks memkv how many leading full blocks of a new prompt it
  holds (one EXISTS batch) and plans, per step, which blocks the worker loads and saves;
- the worker half loads planned blocks into the paged KV cache before the forward pass and,
  after it, copies newly completed blocks out and stores them from a background thread.

One memkv value is one engine block with all of its layers (a few hundred KiB to several MiB:
the sizes memkv's store is built for). Blocks move with memkv's client directly rather than
through the NIXL backend: the client moves CPU memory in C with the GIL released, and NIXL would
add a descriptor registration and a progress thread to the same TCP path. Nothing here fails a
request: a miss, an unreachable server, a failed or corrupt load all end in recomputation.
"""
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                KVConnectorMetadata,
                                                                KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.kv_cache_interface import AttentionSpec

from ..client import Client
from ..protocol import Status
from . import block_keys

log = logging.getLogger("vllm.memkv")  # under vLLM's logger, so its handler and level apply

SETTINGS = {  # kv_connector_extra_config key -> (default, meaning)
    "endpoints": ("memkv://127.0.0.1:9900", "memkv servers, a list or a comma-separated string"),
    "namespace": ("vllm", "memkv namespace (tenant) for these blocks"),
    "secret_file": (None, "file with the servers' shared secret"),
    "timeout_s": (5.0, "per-request network timeout; a lookup never waits longer"),
    "save_buffer_mib": (256, "host memory for blocks waiting to be stored; beyond it saves drop"),
    "model_id": (None, "name the model's weights explicitly instead of fingerprinting them"),
    "stats_file": (None, "the worker rewrites its counters here as JSON after each transfer"),
}


def connector_settings(extra: dict | None) -> dict:
    """kv_connector_extra_config with defaults; an unknown key is an error that lists the known."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(SETTINGS))
    if unknown:
        raise ValueError(f"MemKVConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                         f"known keys: {sorted(SETTINGS)}")
    out = {k: extra.get(k, default) for k, (default, _) in SETTINGS.items()}
    try:
        out["timeout_s"] = float(out["timeout_s"])
        out["save_buffer_mib"] = int(out["save_buffer_mib"])
    except (TypeError, ValueError):
        raise ValueError("MemKVConnector: timeout_s must be a number of seconds and "
                         "save_buffer_mib a whole number of MiB") from None
    if out["timeout_s"] <= 0 or out["save_buffer_mib"] < 0:
        raise ValueError("MemKVConnector: timeout_s must be > 0 and save_buffer_mib >= 0")
    return out


COUNTERS = ("loaded_blocks", "loaded_bytes", "load_seconds", "load_network_seconds", "load_failed",
            "saved_blocks", "saved_bytes", "save_failed", "save_dropped")


@dataclass
class MemKVStats(KVConnectorStats):
    """Counters of one interval, summed over workers; vLLM logs them as "KV Transfer metrics"."""

    def __post_init__(self):
        for k in COUNTERS:
            self.data.setdefault(k, 0)

    def reset(self):
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: "MemKVStats") -> "MemKVStats":
        for k in COUNTERS:
            self.data[k] += other.data.get(k, 0)
        return self

    def reduce(self) -> dict:
        d = self.data
        secs = d["load_seconds"]
        return {"memkv_loaded_blocks": d["loaded_blocks"],
                "memkv_load_GBps": round(d["loaded_bytes"] / secs / 1e9, 2) if secs else 0.0,
                "memkv_load_failed": d["load_failed"], "memkv_saved_blocks": d["saved_blocks"],
                "memkv_save_failed": d["save_failed"], "memkv_save_dropped": d["save_dropped"]}

    def is_empty(self) -> bool:
        return not any(self.data[k] for k in COUNTERS)


@dataclass
class MemKVConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers. Keys are chain keys (without the rank suffix)."""
    load_keys: list[bytes] = field(default_factory=list)
    load_blocks: list[int] = field(default_factory=list)
    save_keys: list[bytes] = field(default_factory=list)
    save_blocks: list[int] = field(default_factory=list)


def _model_fingerprint(vllm_config, kv_cache_config, settings) -> bytes:
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    groups = []
    for g in kv_cache_config.kv_cache_groups:
        spec = g.kv_cache_spec
        groups.append([type(spec).__name__, g.layer_names, spec.block_size,
                       getattr(spec, "num_kv_heads", None), getattr(spec, "head_size", None),
                       str(getattr(spec, "dtype", None)), spec.page_size_bytes])
    weights = ({"model_id": settings["model_id"]} if settings["model_id"]
               else block_keys.weights_identity(mc.model, mc.revision))
    return block_keys.fingerprint({
        "weights": weights, "dtype": mc.dtype, "kv_cache_dtype": cc.cache_dtype,
        "quantization": mc.quantization, "groups": groups,
        "layout": kv_cache_config.kv_cache_layout, "device": vllm_config.device_config.device_type,
        "tp": pc.tensor_parallel_size, "pp": pc.pipeline_parallel_size,
    })


def _check_supported(kv_cache_config) -> None:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"MemKVConnector supports models with one attention KV cache group; this "
                         f"model has {kinds}. Remove the connector for this model.")


class MemKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = connector_settings(self._kv_transfer_config.kv_connector_extra_config)
        _check_supported(kv_cache_config)
        self._client = Client(settings["endpoints"], namespace=settings["namespace"],
                              secret_file=settings["secret_file"], timeout=settings["timeout_s"])
        fp = _model_fingerprint(vllm_config, kv_cache_config, settings)
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        pc = vllm_config.parallel_config
        if role == KVConnectorRole.SCHEDULER:
            # memkv is a cache: a block that cannot be loaded is recomputed, never a failed
            # request. vLLM's default policy ("fail") is meant for disaggregated prefill, where
            # the producer is gone; the scheduler reads it right after creating this connector.
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.info("MemKVConnector: kv_load_failure_policy set to 'recompute' (a failed "
                         "load is a cache miss)")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            ranks = pc.tensor_parallel_size * pc.pipeline_parallel_size
            self._side = _SchedulerSide(self._client, fp, block_size, ranks)
        else:
            self._side = _WorkerSide(self._client, kv_cache_config, settings)
        log.info("MemKVConnector (%s) on %s namespace %r, model fingerprint %s, block %d tokens",
                 role.name.lower(), ",".join(self._client.endpoints), settings["namespace"],
                 fp.hex()[:16], block_size)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save lost to preemption is a future miss, never lost data

    # ---- scheduler half ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._side.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._side.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._side.build_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        if connector_output.invalid_block_ids:
            self._side.load_failed(connector_output.invalid_block_ids)

    def request_finished(self, request, block_ids):
        self._side.finished(request.request_id)
        return False, None  # saves copy their blocks out first, so vLLM may free them now

    # ---- worker half -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches):
        self._side.register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if meta.load_keys:
            self._side.load(meta.load_keys, meta.load_blocks)

    def wait_for_layer_load(self, layer_name):
        pass  # loads complete in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        pass  # whole blocks are copied out once all layers are computed, in wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if meta.save_keys:
            self._side.save(meta.save_keys, meta.save_blocks)

    def get_block_ids_with_load_errors(self):
        return self._side.take_load_errors()

    def get_kv_connector_stats(self):
        return self._side.take_interval_stats()

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return MemKVStats(data=dict(data or {}))

    def shutdown(self):
        self._side.shutdown()
        self._client.close()


class _Request:
    """What the scheduler half keeps per live request."""
    __slots__ = ("request", "seed", "chain", "block_ids", "stored_upto", "hits")

    def __init__(self, request, seed: bytes):
        self.request, self.seed = request, seed
        self.chain: list[bytes] = []
        self.block_ids: list[int] = []
        self.stored_upto = 0      # leading blocks known to be in memkv (loaded, cached, or saved)
        self.hits = None          # (first block, blocks to load) from the last lookup


class _SchedulerSide:
    def __init__(self, client: Client, model_fp: bytes, block_size: int, ranks: int):
        self.client, self.model_fp, self.block_size, self.ranks = client, model_fp, block_size, ranks
        self.requests: dict[str, _Request] = {}
        self.pending_loads: set[str] = set()

    def _state(self, request) -> _Request | None:
        st = self.requests.get(request.request_id)
        if st is None:
            if getattr(request, "prompt_embeds", None) is not None:
                return None  # the token ids are placeholders: nothing to key the blocks by
            lora = request.lora_request.lora_name if request.lora_request else None
            mm = [[f.identifier, f.mm_position.offset, f.mm_position.length]
                  for f in request.mm_features] or None
            seed = block_keys.request_seed(self.model_fp, lora=lora, cache_salt=request.cache_salt,
                                           extra=mm)
            st = self.requests[request.request_id] = _Request(request, seed)
        return st

    def _keys(self, st: _Request, upto: int) -> list[bytes]:
        block_keys.extend_chain(st.chain, st.seed, st.request.all_token_ids, self.block_size, upto)
        return st.chain

    def matched_tokens(self, request, num_computed: int) -> int:
        st = self._state(request)
        if st is None:
            return 0
        bs = self.block_size
        first = num_computed // bs
        last = (request.num_prompt_tokens - 1) // bs  # vLLM computes at least the last token
        st.stored_upto = max(st.stored_upto, first)
        st.hits = None
        if first >= last:
            return 0
        chain = self._keys(st, last)[first:last]
        try:
            present = self.client.exists([block_keys.rank_key(k, r)
                                          for k in chain for r in range(self.ranks)])
        except Exception as e:  # a lookup must never fail the request
            log.warning("memkv lookup failed (%s); computing the prompt", e)
            return 0
        hits = 0
        while hits < len(chain) and all(present[hits * self.ranks:(hits + 1) * self.ranks]):
            hits += 1
        if hits:
            st.hits = (first, hits)
        return hits * bs

    def after_alloc(self, request, num_external_tokens: int) -> None:
        st = self.requests.get(request.request_id)
        if st is not None and num_external_tokens > 0 and st.hits:
            first, n = st.hits
            st.hits = (first, min(n, num_external_tokens // self.block_size))
            self.pending_loads.add(request.request_id)

    def build_meta(self, so) -> MemKVConnectorMetadata:
        meta = MemKVConnectorMetadata()
        for new in so.scheduled_new_reqs:
            st = self.requests.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._plan(meta, st, new.req_id,
                           new.num_computed_tokens + so.num_scheduled_tokens[new.req_id])
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.requests.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after preemption: the whole block list anew
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan(meta, st, req_id,
                       cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id])
        return meta

    def _plan(self, meta: MemKVConnectorMetadata, st: _Request, req_id: str, done_tokens: int):
        if req_id in self.pending_loads:
            self.pending_loads.discard(req_id)
            first, n = st.hits
            meta.load_keys += st.chain[first:first + n]
            meta.load_blocks += st.block_ids[first:first + n]
            st.stored_upto = max(st.stored_upto, first + n)
        # blocks whose every token is known and computed by the end of this step
        full = min(done_tokens, len(st.request.all_token_ids)) // self.block_size
        full = min(full, len(st.block_ids))
        if full > st.stored_upto:
            chain = self._keys(st, full)
            meta.save_keys += chain[st.stored_upto:full]
            meta.save_blocks += st.block_ids[st.stored_upto:full]
            st.stored_upto = full

    def load_failed(self, block_ids: set[int]) -> None:
        # vLLM recomputes from the first block that failed; those blocks are saved again then
        for st in self.requests.values():
            bad = [i for i, b in enumerate(st.block_ids[:st.stored_upto]) if b in block_ids]
            if bad:
                st.stored_upto = bad[0]

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
        self.pending_loads.discard(req_id)

    def take_interval_stats(self) -> None:
        return None  # transfers happen in the workers, which report them

    def shutdown(self) -> None:
        pass


class _Layer:
    """One layer's paged cache as rows of words: index `dim` selects a block, `page` bytes each.
    Copies move 8-byte words (torch's index ops are several times slower on single bytes)."""
    __slots__ = ("words", "dim", "page", "offset", "page_shape")

    def __init__(self, tensor: torch.Tensor, num_blocks: int, offset: int):
        page = tensor.numel() * tensor.element_size() // num_blocks
        word = torch.int64 if page % 8 == 0 and tensor.stride(-1) == 1 else torch.uint8
        words = tensor.view(torch.uint8).view(word)
        dims = [d for d, n in enumerate(words.shape) if n == num_blocks]
        if not dims:
            raise ValueError(f"MemKVConnector: no dimension of size {num_blocks} (blocks) in a KV "
                             f"cache tensor of shape {tuple(tensor.shape)}")
        self.dim = max(dims, key=lambda d: words.stride(d))  # blocks: the widest-strided such dim
        self.words = words
        self.offset = offset
        self.page = page
        self.page_shape = tuple(n for d, n in enumerate(words.shape) if d != self.dim)


class _WorkerSide:
    def __init__(self, client: Client, kv_cache_config, settings: dict):
        from vllm.distributed.parallel_state import (get_pp_group,
                                                     get_tensor_model_parallel_rank,
                                                     get_tensor_model_parallel_world_size)
        self.client = client
        self.num_blocks = kv_cache_config.num_blocks
        self.layer_names = kv_cache_config.kv_cache_groups[0].layer_names
        self.rank = (get_pp_group().rank_in_group * get_tensor_model_parallel_world_size()
                     + get_tensor_model_parallel_rank())
        self.layers: list[_Layer] = []
        self.block_bytes = 0
        self.device = torch.device("cpu")
        self.load_errors: set[int] = set()
        self.load_buf: torch.Tensor | None = None
        self.stats_file = settings["stats_file"]
        self.save_budget = settings["save_buffer_mib"] << 20
        self.save_inflight = 0
        self.dropping = False
        self.saves: queue.Queue = queue.Queue()
        self.spare: list[torch.Tensor] = []  # save buffers back from the saver, for reuse
        self.lock = threading.Lock()
        self.stats = dict.fromkeys(COUNTERS, 0)     # since start (the stats file)
        self.reported = dict.fromkeys(COUNTERS, 0)  # what vLLM's stats have seen
        self.saver = threading.Thread(target=self._save_loop, name="memkv-vllm-save", daemon=True)
        self.saver.start()

    def register(self, kv_caches: dict) -> None:
        names = [n for n in self.layer_names if n in kv_caches]
        offset = 0
        for n in names:
            layer = _Layer(kv_caches[n], self.num_blocks, offset)
            self.layers.append(layer)
            offset += layer.page
        self.block_bytes = offset
        self.device = kv_caches[names[0]].device
        log.info("memkv: %d layers, %d KiB per block, rank %d", len(names), offset >> 10, self.rank)

    def _keys(self, chain_keys) -> list[bytes]:
        return [block_keys.rank_key(k, self.rank) for k in chain_keys]

    def _host_buffer(self, n: int) -> torch.Tensor:
        return torch.empty((n, self.block_bytes), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")

    # ---- load: memkv -> staging -> paged cache, before the forward pass ----------------------
    def load(self, chain_keys: list[bytes], block_ids: list[int]) -> None:
        t0 = time.perf_counter()
        n, bb = len(block_ids), self.block_bytes
        ok = [False] * n
        t_get = 0.0
        try:
            if self.load_buf is None or self.load_buf.shape[0] < n:
                self.load_buf = self._host_buffer(max(n, 64))  # reused: no page faults per load
            buf = self.load_buf[:n]
            base = buf.data_ptr()
            lengths: list = []
            statuses = self.client.get(self._keys(chain_keys), [(base + i * bb, bb) for i in range(n)],
                                       lengths=lengths)
            t_get = time.perf_counter() - t0
            ok = [st == Status.OK and ln == bb for st, ln in zip(statuses, lengths)]
            rows = [i for i in range(n) if ok[i]]
            if rows:
                self._scatter(buf, rows, [block_ids[i] for i in rows])
        except Exception as e:
            log.warning("memkv load of %d blocks failed (%s); vLLM recomputes them", n, e)
            ok = [False] * n
        failed = [b for b, good in zip(block_ids, ok) if not good]
        with self.lock:
            self.load_errors.update(failed)
            s = self.stats
            s["loaded_blocks"] += n - len(failed)
            s["loaded_bytes"] += (n - len(failed)) * bb
            s["load_failed"] += len(failed)
            s["load_seconds"] += time.perf_counter() - t0
            s["load_network_seconds"] += t_get
        if failed:
            log.warning("memkv: %d of %d blocks could not be loaded (missing, evicted or failed "
                        "their checksum); vLLM recomputes them", len(failed), n)
        self._write_stats()

    def _scatter(self, buf: torch.Tensor, rows: list[int], block_ids: list[int]) -> None:
        src = buf if len(rows) == buf.shape[0] else buf[torch.tensor(rows)]
        src = src.to(self.device, non_blocking=True)
        idx = torch.tensor(block_ids, device=self.device)
        for layer in self.layers:
            part = src[:, layer.offset:layer.offset + layer.page].view(layer.words.dtype)
            part = part.view(len(rows), *layer.page_shape)
            layer.words.index_copy_(layer.dim, idx, part.movedim(0, layer.dim))

    def take_interval_stats(self) -> MemKVStats | None:
        """What changed since the last call, for vLLM's own transfer metrics."""
        with self.lock:
            delta = {k: self.stats[k] - self.reported[k] for k in COUNTERS}
            self.reported = dict(self.stats)
        out = MemKVStats(data=delta)
        return None if out.is_empty() else out

    def take_load_errors(self) -> set[int]:
        with self.lock:
            out, self.load_errors = self.load_errors, set()
        return out

    # ---- save: paged cache -> staging (now) -> memkv (background) ----------------------------
    def save(self, chain_keys: list[bytes], block_ids: list[int]) -> None:
        n = len(block_ids)
        nbytes = n * self.block_bytes
        with self.lock:
            full = self.save_inflight + nbytes > self.save_budget
            if full:
                self.stats["save_dropped"] += n
            else:
                self.save_inflight += nbytes
            warn, self.dropping = full and not self.dropping, full
        if full:
            if warn:  # once per episode of back-pressure, not per step
                log.warning("memkv: saves in flight fill save_buffer_mib; dropping new saves "
                            "(counted as save_dropped) until memkv catches up")
            self._write_stats()
            return
        try:
            whole = self._save_buffer(n)
            buf = whole[:n]
            idx = torch.tensor(block_ids, device=self.device)
            for layer in self.layers:
                part = buf[:, layer.offset:layer.offset + layer.page].view(layer.words.dtype)
                part.view(n, *layer.page_shape).copy_(
                    layer.words.index_select(layer.dim, idx).movedim(layer.dim, 0))
        except Exception as e:  # a save must never fail the step
            log.warning("memkv: copying %d blocks out for saving failed (%s); not saved", n, e)
            with self.lock:
                self.save_inflight -= nbytes
                self.stats["save_failed"] += n
            return
        self.saves.put((self._keys(chain_keys), whole))

    def _save_buffer(self, n: int) -> torch.Tensor:
        """A host buffer of at least n blocks: a spare one if it fits (fresh memory would pay a
        page fault per 4 KiB on the model's thread), else a new one."""
        with self.lock:
            fits = [i for i, b in enumerate(self.spare) if b.shape[0] >= n]
            if fits:  # by position: list.remove would compare tensors element by element
                return self.spare.pop(min(fits, key=lambda i: self.spare[i].shape[0]))
        return self._host_buffer(n)

    def _save_loop(self) -> None:
        while True:
            item = self.saves.get()
            if item is None:
                return
            keys, buf = item  # buf may hold more rows than keys (a reused buffer)
            n, bb = len(keys), self.block_bytes
            base = buf.data_ptr()
            try:
                statuses = self.client.put(keys, [(base + i * bb, bb) for i in range(n)])
                stored = sum(st == Status.OK for st in statuses)
            except Exception as e:
                log.warning("memkv save of %d blocks failed: %s", n, e)
                stored = 0
            with self.lock:
                self.save_inflight -= n * bb
                if sum(b.numel() for b in self.spare) + buf.numel() <= self.save_budget:
                    self.spare.append(buf)
                self.stats["saved_blocks"] += stored
                self.stats["saved_bytes"] += stored * bb
                self.stats["save_failed"] += n - stored
            self._write_stats()

    def _write_stats(self) -> None:
        if not self.stats_file:
            return
        with self.lock:
            body = json.dumps({**self.stats, "rank": self.rank, "block_bytes": self.block_bytes})
        tmp = f"{self.stats_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, self.stats_file)

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Store what is queued (bounded wait), then stop the saver."""
        self.saves.put(None)
        self.saver.join(wait_s)
        if self.saver.is_alive():
            log.warning("memkv: saves still pending after %.0f s at shutdown; they are dropped",
                        wait_s)
