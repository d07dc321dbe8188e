"""cffi build script for memkv_nixl._native._memkv (API mode).

The C declarations come from memkv.h itself (preprocessor lines stripped), so the header is the
one place where the wire structs, the record header and the entry points are written down.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _package_version() -> str:
    with open(os.path.join(ROOT, "memkv_nixl", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _cdef_from_header() -> str:
    lines = []
    for name in ("memkv.h", "memkv_conn.h"):
        with open(os.path.join(HERE, name)) as f:
            lines += f.read().splitlines()
    keep = []
    for line in lines:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#define MEMKV_"):
            continue  # include guards and includes; cffi takes plain integer #defines only
        if s.startswith(("#define MEMKV_H", "#define MEMKV_CONN_H")) or s in ('extern "C" {', "}"):
            continue  # guards, and the C++ linkage block of memkv_conn.h
        keep.append(re.sub(r"/\*.*?\*/", "", line))
    text = "\n".join(keep)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "memkv_nixl._native._memkv",
    '#include "memkv.h"\n#include "memkv_conn.h"',
    sources=[os.path.join("memkv_nixl", "_native", n)
             for n in ("wire.c", "conn.c", "storage_io.c", "hash.c", "hash_avx2.c")],
    include_dirs=[HERE],
    define_macros=[("MEMKV_VERSION", '"%s"' % _package_version())],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread", "crypto"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=ROOT, verbose=True)
