"""Keys of engine KV blocks: deterministic across processes, separate for anything that changes KV."""
import os
import shutil
import subprocess
import sys

import pytest

from memkv_nixl.integrations import block_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import tiny_llama  # noqa: E402

BS = 16


def _chain(tokens, seed, upto=None):
    chain = []
    block_keys.extend_chain(chain, seed, tokens, BS, upto if upto is not None else len(tokens) // BS)
    return chain


def test_keys_equal_in_other_processes_whatever_the_hash_seed():
    code = ("from memkv_nixl.integrations import block_keys as b; c=[]; "
            "s=b.request_seed(b.fingerprint({'m': 1}), cache_salt='x'); "
            "b.extend_chain(c, s, list(range(100)), 16, 6); print(b''.join(c).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": hs}).stdout.strip()
            for hs in ("1", "2", "random")}
    here = b"".join(_chain(list(range(100)), block_keys.request_seed(
        block_keys.fingerprint({"m": 1}), cache_salt="x"), 6)).hex()
    assert outs == {here}


def test_chain_shares_prefixes_and_diverges_after_a_changed_token():
    seed = block_keys.request_seed(block_keys.fingerprint({"m": 1}))
    a = list(range(1000, 1000 + 5 * BS))
    b = a[:2 * BS + 3] + [7] + a[2 * BS + 4:]
    ka, kb = _chain(a, seed), _chain(b, seed)
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:]))  # every later block depends on the change
    assert len(set(ka)) == len(ka)
    longer = _chain(a + list(range(BS)), seed)
    assert longer[:len(ka)] == ka
    # extending a chain step by step gives the same keys as at once
    chain = []
    for upto in (1, 3, 5):
        block_keys.extend_chain(chain, seed, a, BS, upto)
    assert chain == ka


@pytest.mark.parametrize("change", [
    {"fp": {"m": 2}}, {"lora": "adapter-a"}, {"cache_salt": "tenant-b"}, {"extra": [["img", 0, 9]]},
])
def test_anything_that_changes_kv_changes_every_key(change):
    tokens = list(range(4 * BS))
    base = _chain(tokens, block_keys.request_seed(block_keys.fingerprint({"m": 1})))
    fp = block_keys.fingerprint(change.pop("fp", {"m": 1}))
    other = _chain(tokens, block_keys.request_seed(fp, **change))
    assert not set(base) & set(other)


def test_rank_keys_differ_per_rank():
    k = _chain(list(range(BS)), b"s" * 32)[0]
    assert len({block_keys.rank_key(k, r) for r in range(8)}) == 8


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return tiny_llama.build(str(d / "m0"), seed=0), tiny_llama.build(str(d / "m1"), seed=1)


def test_weights_identity_follows_contents_not_path(tiny_models, tmp_path):
    m0, m1 = tiny_models
    copy = shutil.copytree(m0, tmp_path / "elsewhere" / "same-model")
    id0 = block_keys.weights_identity(m0, None)
    assert block_keys.weights_identity(str(copy), None) == id0
    # same architecture and file sizes, other weights: a different model
    assert block_keys.weights_identity(m1, None) != id0
    assert block_keys.weights_identity("org/model", None) == {"hub_id": "org/model", "revision": "main"}


def test_weights_identity_of_a_directory_without_weights_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files.*model_id"):
        block_keys.weights_identity(str(tmp_path), None)
