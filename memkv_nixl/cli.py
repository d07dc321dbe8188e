"""The `memkv` command: serve, quick manual put/get/stat, the demo and the benchmark."""
import argparse
import json
import logging
import os
import sys

from .errors import MemkvError
from .units import parse_size

os.environ.setdefault("UCX_MODULES", "^efa")  # before NIXL may load (crash at exit otherwise)


def _serve(a) -> None:
    from .server import config
    from .server.server import run
    overrides = {"data": a.data, "capacity": a.capacity, "listen": a.listen,
                 "listen_unix": a.listen_unix,
                 "durability": a.durability, "secret_file": a.secret_file, "min_block": a.min_block,
                 "max_block": a.max_block, "meta_dir": a.meta_dir, "io_threads": a.io_threads,
                 "ram_cache": a.ram_cache, "quota": a.quota, "staging_memory": a.staging_memory,
                 "journal_max": a.journal_max}
    cfg = config.load(a.config, overrides).resolved()
    logging.getLogger().setLevel(cfg.log_level)
    run(cfg)


def _client(a):
    from .client import Client
    return Client(a.endpoint, namespace=a.namespace, secret_file=a.secret_file)


def _put(a) -> None:
    with open(a.file, "rb") as f:
        data = f.read()
    with _client(a) as c:
        st = c.put([a.key.encode()], [data])[0]
    print(f"{a.key}: {st.name} ({len(data)} bytes)")
    sys.exit(0 if st.ok else 1)


def _get(a) -> None:
    buf = bytearray(parse_size(a.max_size, "--max-size"))
    lengths: list = []
    with _client(a) as c:
        st = c.get([a.key.encode()], [buf], lengths=lengths)[0]
    if not st.ok:
        print(f"{a.key}: {st.name}", file=sys.stderr)
        sys.exit(1)
    data = memoryview(buf)[:lengths[0]]
    if a.output and a.output != "-":
        with open(a.output, "wb") as f:
            f.write(data)
        print(f"{a.key}: OK ({len(data)} bytes) -> {a.output}")
    else:
        sys.stdout.buffer.write(data)


def _stat(a) -> None:
    with _client(a) as c:
        if a.keys:
            for k, present in zip(a.keys, c.exists([k.encode() for k in a.keys])):
                print(f"{k}: {'present' if present else 'absent'}")
        else:
            print(json.dumps(c.stats(), indent=2))


def _nixl_plugin_dir(a) -> None:
    from .nixl import plugin_dir
    print(plugin_dir(a.flavour))


def _demo(a) -> None:
    from .demo import main as demo_main
    demo_main(a)


def _add_client_args(p) -> None:
    p.add_argument("--endpoint", default="memkv://127.0.0.1:9900",
                   help="server(s), comma separated (default %(default)s)")
    p.add_argument("--namespace", default="default", help="namespace (default %(default)s)")
    p.add_argument("--secret-file", help="shared secret file, as given to the server")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memkv", description="memkv: shared persistent KV-cache store")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a server (defaults: ~/.local/share/memkv, 127.0.0.1:9900)")
    s.add_argument("--config", help="TOML file; flags override its settings")
    s.add_argument("--data", action="append", help="data directory or block device (repeatable)")
    s.add_argument("--capacity", help="total bytes for blocks, e.g. 2GiB (default: fits the disk)")
    s.add_argument("--listen", help="host:port (default 127.0.0.1:9900)")
    s.add_argument("--listen-unix", metavar="PATH",
                   help="also listen on this unix socket (default: memkv.sock in the meta dir; "
                        "'off': none): clients on this host get same-host copies (cma) there")
    s.add_argument("--durability", choices=["sync", "async"],
                   help="sync: acknowledged puts survive a crash (default); async: puts are "
                        "acknowledged from the DRAM cache and written behind, the newest may be "
                        "lost on a crash, nothing is ever served corrupt")
    s.add_argument("--secret-file", help="require clients to prove they hold this secret")
    s.add_argument("--min-block", help="smallest block accepted (default 4KiB)")
    s.add_argument("--max-block", help="largest block accepted (default 64MiB)")
    s.add_argument("--meta-dir", help="where the journal and checkpoint live (default: first --data)")
    s.add_argument("--io-threads", type=int, help="O_DIRECT I/O threads (default 4)")
    s.add_argument("--ram-cache", help="DRAM cache for hot blocks (and, with async durability, the "
                   "write-behind buffer), e.g. 4GiB (default 1GiB; 0: off)")
    s.add_argument("--staging-memory", help="aligned buffers that requests in flight stage blocks "
                   "in, kept for reuse up to this much in all (default 512MiB); a connection "
                   "holds one only during a request")
    s.add_argument("--journal-max", help="write an index checkpoint once the journal holds this "
                   "much (default 32MiB): larger means fewer checkpoints, a longer start-up")
    s.add_argument("--quota", action="append", metavar="NAMESPACE=SIZE",
                   help="most payload bytes a namespace may hold (repeatable; '*=SIZE' for every "
                        "namespace not named); at its quota a namespace's own least recently used "
                        "unpinned blocks are evicted first")
    s.set_defaults(func=_serve)

    p = sub.add_parser("put", help="store a file's bytes under a key")
    p.add_argument("key")
    p.add_argument("file")
    _add_client_args(p)
    p.set_defaults(func=_put)

    g = sub.add_parser("get", help="load a key's bytes (to a file or stdout)")
    g.add_argument("key")
    g.add_argument("output", nargs="?", default="-")
    g.add_argument("--max-size", default="64MiB", help="largest block expected (default %(default)s)")
    _add_client_args(g)
    g.set_defaults(func=_get)

    t = sub.add_parser("stat", help="server statistics, or whether keys exist")
    t.add_argument("keys", nargs="*")
    _add_client_args(t)
    t.set_defaults(func=_stat)

    n = sub.add_parser("nixl-plugin-dir", help="prepare and print a NIXL_PLUGIN_DIR holding MEMKV "
                                               "and the NIXL wheel's own plugins")
    n.add_argument("--flavour", choices=["nixl_cu12", "nixl_cu13"], help="default: the installed one")
    n.set_defaults(func=_nixl_plugin_dir)

    d = sub.add_parser("demo", help="start a local server on the default data directory, store "
                                    "and reload KV-sized blocks across a restart")
    d.add_argument("--data", help="data directory (default: MEMKV_DATA or ~/.local/share/memkv)")
    d.set_defaults(func=_demo)
    return ap


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except MemkvError as e:
        print(f"memkv: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
