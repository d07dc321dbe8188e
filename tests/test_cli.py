"""The memkv command line: serve settings from TOML and flags, quick put/get/stat, clear errors."""
import dataclasses
import os
import subprocess
import sys
import tomllib

import pytest

from memkv_nixl.errors import ConfigError
from memkv_nixl.server import config


def memkv(*args, **kw):
    return subprocess.run([sys.executable, "-m", "memkv_nixl.cli", *args], capture_output=True,
                          timeout=60, **kw)


def test_put_get_stat_on_the_command_line(server, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(10000))
    ep = ["--endpoint", server.endpoint, "--namespace", "cli"]
    r = memkv("put", "my-key", str(src), *ep)
    assert r.returncode == 0 and b"my-key: OK (10000 bytes)" in r.stdout, r.stderr
    out = tmp_path / "out.bin"
    r = memkv("get", "my-key", str(out), *ep)
    assert r.returncode == 0 and out.read_bytes() == src.read_bytes(), r.stderr
    r = memkv("stat", "my-key", "other", *ep)
    assert r.stdout.decode().splitlines() == ["my-key: present", "other: absent"]
    r = memkv("stat", *ep)
    assert b'"blocks": 1' in r.stdout
    r = memkv("get", "nope", *ep)
    assert r.returncode == 1 and b"nope: MISS" in r.stderr


def test_toml_config_with_flags_overriding(tmp_path):
    f = tmp_path / "memkv.toml"
    f.write_text('[server]\ndata = "/tmp/x"\ncapacity = "2GiB"\nmax-block = "16MiB"\n'
                 'durability = "async"\n')
    cfg = config.load(str(f), {"durability": "sync", "data": None})
    assert (cfg.data, cfg.capacity, cfg.max_block, cfg.durability) == (["/tmp/x"], 2 << 30, 16 << 20, "sync")


def test_quotas_from_toml_and_flags(tmp_path):
    f = tmp_path / "memkv.toml"
    f.write_text('[server.quota]\n"llama3-8b/bf16/p16/tp0" = "200GiB"\n"*" = "50GiB"\n')
    cfg = config.load(str(f), {})
    assert cfg.quota == {"llama3-8b/bf16/p16/tp0": 200 << 30, "*": 50 << 30}
    cfg = config.load(str(f), {"quota": ["a/b=1GiB", "*=2GiB"]})  # flags replace the file's
    assert cfg.quota == {"a/b": 1 << 30, "*": 2 << 30}
    for bad, why in ((["a/b"], "expected NAMESPACE=SIZE"), (["a=lots"], "quota of namespace 'a'"),
                     (["a=0"], "must be above 0")):
        with pytest.raises(ConfigError, match=why):
            config.load(None, {"quota": bad})
    r = memkv("serve", "--data", str(tmp_path / "d"), "--quota", "tp0", "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and b"quota 'tp0': expected NAMESPACE=SIZE" in r.stderr, r.stderr


def test_bad_settings_are_reported_together(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('capacity = "lots"\n')
    with pytest.raises(ConfigError, match="capacity: cannot read 'lots' as a size"):
        config.load(str(f), {})
    f.write_text('colour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load(str(f), {})
    cfg = config.load(None, {"data": [str(tmp_path / "d")], "durability": "fast",
                             "min_block": "1MiB", "max_block": "4KiB"})
    with pytest.raises(ConfigError) as e:
        cfg.resolved()
    assert "durability 'fast'" in str(e.value) and "block-size range" in str(e.value)


def test_serve_refuses_a_capacity_too_small_for_its_blocks(tmp_path):
    r = memkv("serve", "--data", str(tmp_path / "d"), "--capacity", "64MiB", "--listen", "127.0.0.1:0")
    assert r.returncode == 2
    assert b"too small for two blocks of the maximum size" in r.stderr


def test_serve_defaults_to_the_memkv_data_directory(tmp_path):
    env = dict(os.environ, MEMKV_DATA=str(tmp_path / "home-data"))
    cfg = config.load(None, {})
    os.environ["MEMKV_DATA"], saved = env["MEMKV_DATA"], os.environ.get("MEMKV_DATA")
    try:
        resolved = cfg.resolved()
    finally:
        if saved is None:
            del os.environ["MEMKV_DATA"]
        else:
            os.environ["MEMKV_DATA"] = saved
    assert resolved.data == [str(tmp_path / "home-data")]
    assert resolved.listen == "127.0.0.1:9900" and resolved.durability == "sync"
    assert resolved.capacity >= 256 << 20


def test_the_example_config_names_every_setting_and_loads():
    """examples/memkv.toml documents every server setting; it must load as it stands."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "memkv.toml")
    with open(path, "rb") as f:
        named = set(tomllib.load(f)["server"])
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(config.ServerConfig)}
    assert named == fields, f"missing: {fields - named}; unknown: {named - fields}"
    cfg = config.load(path, {})
    assert cfg.capacity == 1536 << 30 and cfg.quota["*"] == 100 << 30 and cfg.max_batch == 4096
