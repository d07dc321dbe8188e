"""The NIXL backend MEMKV: make the installed NIXL wheel load libplugin_MEMKV.so.

    import memkv_nixl.nixl as mk
    mk.activate()                      # before the first nixl_agent of the process
    agent = nixl_agent("me", nixl_agent_config(backends=[]))
    agent.create_backend("MEMKV", {"endpoints": "memkv://127.0.0.1:9900", "namespace": "..."})

NIXL reads ONE plugin directory per process (NIXL_PLUGIN_DIR), which replaces its own. activate()
prepares a directory holding MEMKV beside links to the wheel's plugins, mirroring the wheel's
layout so that their $ORIGIN-relative library paths still resolve (plain links to the plugins
alone fail to load UCX and POSIX). Non-Python hosts: set NIXL_PLUGIN_DIR to the path that
`memkv nixl-plugin-dir` prints. The plugin itself needs no Python at run time.
"""
import importlib
import importlib.metadata
import logging
import os
import sys

from ..errors import MemkvError

log = logging.getLogger("memkv.nixl")

PLUGIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libplugin_MEMKV.so")
FLAVOURS = ("nixl_cu12", "nixl_cu13")
SUPPORTED = ((1, 5, 0), (1, 6, 0))  # tested NIXL range: [1.5.0, 1.6.0)


def nixl_module(flavour: str | None = None):
    """The NIXL flavour this process uses: the one already imported, else the first importable."""
    names = [flavour] if flavour else [n for n in FLAVOURS if n in sys.modules] or list(FLAVOURS)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MemkvError(f"no NIXL wheel found (tried {', '.join(names)}); pip install nixl-cu12")


def _check_version(dist: str) -> str:
    version = importlib.metadata.version(dist)
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if not SUPPORTED[0] <= parts < SUPPORTED[1]:
        raise MemkvError(f"{dist} {version} is outside the NIXL range MEMKV supports "
                         f"({'.'.join(map(str, SUPPORTED[0]))} <= v < {'.'.join(map(str, SUPPORTED[1]))}): "
                         "its plugin ABI may differ")
    return version


def plugin_dir(flavour: str | None = None) -> str:
    """Prepare (idempotently) and return the plugin directory for the given NIXL flavour."""
    if not os.path.exists(PLUGIN_FILE):
        raise MemkvError(f"{PLUGIN_FILE} is not built; run scripts/setup.sh")
    mod = nixl_module(flavour)
    name = mod.__name__
    version = _check_version(name.replace("_", "-"))
    site = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
    libs = os.path.join(site, f".{name}.mesonpy.libs")
    if not os.path.isdir(os.path.join(libs, "plugins")):
        raise MemkvError(f"{name} {version} has no plugin directory at {libs}/plugins")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    root = os.path.join(cache, "memkv", "nixl", f"{name}-{version}")
    lib = os.path.join(root, "lib")
    plugins = os.path.join(lib, "plugins")
    os.makedirs(plugins, exist_ok=True)
    links = {os.path.join(root, f"{name}.libs"): os.path.join(site, f"{name}.libs")}
    for f in os.listdir(libs):
        if ".so" in f:
            links[os.path.join(lib, f)] = os.path.join(libs, f)
    for f in os.listdir(os.path.join(libs, "plugins")):
        links[os.path.join(plugins, f)] = os.path.join(libs, "plugins", f)
    links[os.path.join(plugins, "libplugin_MEMKV.so")] = PLUGIN_FILE
    for link, target in links.items():
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic, so concurrent activations agree
    return plugins


def activate(flavour: str | None = None) -> str:
    """Point this process's NIXL at a plugin directory with MEMKV; returns that directory.
    Must run before the process creates its first nixl_agent (NIXL reads the setting once)."""
    os.environ.setdefault("UCX_MODULES", "^efa")
    path = plugin_dir(flavour)
    current = os.environ.get("NIXL_PLUGIN_DIR")
    if current and current != path:
        log.warning("NIXL_PLUGIN_DIR was %s; MEMKV replaces it with %s", current, path)
    os.environ["NIXL_PLUGIN_DIR"] = path
    return path
