"""Content-addressed keys for engine KV blocks, the same in every process, machine and restart.

A block's key is a hash chain over the token ids of the prompt up to and including that block,
seeded by a *fingerprint* of everything else that changes the KV bytes: the model's weights,
dtype, block geometry, layer layout, parallel layout, and per request the LoRA adapter, cache
salt and multimodal inputs. Two workers serving the same model share blocks; anything that
would change a single byte of KV gets different keys.

vLLM's own prefix hash is not used: its chain starts from a random root unless PYTHONHASHSEED
is set, so two processes would never agree on a key.
"""
import hashlib
import json
import os
import sys
from array import array

from .. import native

KEY_FORMAT = 1           # bump when the key derivation changes: old blocks then simply miss
DIGEST = 32              # bytes of a chain hash; a per-rank suffix of 2 bytes follows
SAMPLE = 1 << 16         # bytes hashed at each of a few places of every weight file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST)
    for p in parts:
        h.update(p)
    return h.digest()


def weights_identity(model: str, revision: str | None) -> dict:
    """What identifies a model's weights. A local directory is identified by its contents (config
    plus samples of every weight file, so two random initialisations or two fine-tunes differ)
    and not by its path, so copies of one model on different machines share blocks. A hub id is
    identified by id and revision."""
    if not os.path.isdir(model):
        return {"hub_id": model, "revision": revision or "main"}
    files = {}
    for name in sorted(os.listdir(model)):
        path = os.path.join(model, name)
        if name == "config.json":
            with open(path, "rb") as f:
                files[name] = native.xxh3(f.read())
        elif name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(path):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                samples = []
                for off in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                    f.seek(off)
                    samples.append(native.xxh3(f.read(SAMPLE)))
            files[name] = [size, *samples]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in files):
        raise ValueError(f"model directory {model} holds no weight files "
                         f"({', '.join(WEIGHT_SUFFIXES)}); set model_id in the connector config")
    return {"local_files": files}


def fingerprint(identity: dict) -> bytes:
    """Hash of a JSON-able description of everything but the tokens that shapes the KV bytes."""
    text = json.dumps({"key_format": KEY_FORMAT, **identity}, sort_keys=True, default=str)
    return _h(text.encode())


def request_seed(model_fp: bytes, *, lora: str | None = None, cache_salt: str | None = None,
                 extra: list | None = None) -> bytes:
    """Root of one request's chain: the model fingerprint plus what the request adds."""
    text = json.dumps({"lora": lora, "salt": cache_salt, "extra": extra}, sort_keys=True,
                      default=str)
    return _h(model_fp, text.encode())


def extend_chain(chain: list[bytes], seed: bytes, token_ids, block_size: int, upto: int) -> None:
    """Append keys to `chain` until it covers `upto` full blocks of token_ids."""
    prev = chain[-1] if chain else seed
    for b in range(len(chain), upto):
        tokens = array("I", token_ids[b * block_size:(b + 1) * block_size])
        if sys.byteorder == "big":
            tokens.byteswap()  # keys hash little-endian u32 on every machine
        prev = _h(prev, tokens.tobytes())
        chain.append(prev)


def rank_key(chain_key: bytes, rank: int) -> bytes:
    """A block's key for one worker rank (each tensor/pipeline-parallel rank stores its own slice)."""
    return chain_key + rank.to_bytes(2, "little")
