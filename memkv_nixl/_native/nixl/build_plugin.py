"""Build libplugin_MEMKV.so: the C++ engine plus the C client it shares with the Python package.

Reads plugin.toml (the manifest), writes the generated plugin_manifest.h next to the engine,
compiles with g++/gcc (C++20, -fPIC, hidden visibility; only libstdc++/libc/libcrypto needed at
run time, no NIXL library), and returns the path of the .so.
"""
import os
import re
import subprocess
import sys
import tempfile
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(NATIVE))
C_SOURCES = ["wire.c", "conn.c", "hash.c", "hash_avx2.c"]


def manifest() -> dict:
    with open(os.path.join(ROOT, "plugin.toml"), "rb") as f:
        return tomllib.load(f)


def _cstr(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_header() -> str:
    m = manifest()
    p = m["plugin"]
    params = m["params"]
    lines = [
        "// Generated from plugin.toml by build_plugin.py: do not edit.",
        "#pragma once",
        f"#define MEMKV_PLUGIN_NAME {_cstr(p['name'])}",
        f"#define MEMKV_PLUGIN_VERSION {_cstr(p['version'])}",
        "#define MEMKV_PLUGIN_MEMS nixl_mem_list_t{" + ", ".join(p["mems"]) + "}",
        "#define MEMKV_PLUGIN_DEFAULTS nixl_b_params_t{" + ", ".join(
            "{" + _cstr(k) + ", " + _cstr(v["default"]) + "}" for k, v in params.items()) + "}",
        f"#define MEMKV_PLUGIN_PARAM_NAMES {_cstr(', '.join(params))}",
    ]
    path = os.path.join(HERE, "plugin_manifest.h")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _version() -> str:
    with open(os.path.join(ROOT, "memkv_nixl", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def build(out_dir: str) -> str:
    write_header()
    name = manifest()["plugin"]["name"]
    out = os.path.join(out_dir, f"libplugin_{name}.so")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        objs = []
        for src in C_SOURCES:
            obj = os.path.join(tmp, src + ".o")
            subprocess.run(["gcc", "-O2", "-std=gnu11", "-fPIC", "-fvisibility=hidden",
                            f'-DMEMKV_VERSION="{_version()}"', "-I", NATIVE, "-c",
                            os.path.join(NATIVE, src), "-o", obj], check=True)
            objs.append(obj)
        subprocess.run(["g++", "-O2", "-std=c++20", "-fPIC", "-fvisibility=hidden",
                        "-D_GLIBCXX_USE_CXX11_ABI=1", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-I", NATIVE, "-I", HERE, "-shared", "-o", out,
                        os.path.join(HERE, "memkv_engine.cpp"), *objs,
                        "-lcrypto", "-lpthread"], check=True)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "memkv_nixl", "nixl")))
