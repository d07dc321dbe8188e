"""Server settings: defaults, the TOML config file and command-line flags, in that order of
precedence (flags win). Validation reports every problem at once."""
import collections
import dataclasses
import os
import shutil
import tomllib

from ..errors import ConfigError
from ..protocol import MAX_BATCH, MAX_UNIX_PATH
from ..units import format_size, parse_size

DEFAULT_PORT = 9900
DATA_FILE = "blocks.dat"  # in each data directory


def default_data_dir() -> str:
    base = os.environ.get("MEMKV_DATA") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "memkv")
    return base


@dataclasses.dataclass
class ServerConfig:
    data: list[str] = dataclasses.field(default_factory=list)
    capacity: int = 0                 # 0: default (fits the disk)
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    listen_unix: str | None = None    # unix socket for clients on this host (cma); default
                                      # <meta-dir>/memkv.sock, "off": none
    durability: str = "sync"
    secret_file: str | None = None
    min_block: int = 4 << 10
    max_block: int = 64 << 20
    max_batch: int = MAX_BATCH
    meta_dir: str | None = None       # journal + checkpoint; default: the first data directory
    io_threads: int = 4
    ram_cache: int = 1 << 30          # DRAM read cache for hot blocks; 0: off
    staging_memory: int = 512 << 20   # staging buffers kept for reuse by requests in flight
    journal_max: int = 32 << 20       # checkpoint once the journal holds this much
    idle_timeout: float = 300.0
    quota: dict = dataclasses.field(default_factory=dict)  # namespace (or "*": any other) -> bytes
    log_level: str = "INFO"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    def resolved(self) -> "ServerConfig":
        """Fill defaults that depend on the machine, validate, and return a new config."""
        c = dataclasses.replace(self)
        if not c.data:
            c.data = [default_data_dir()]
        c.data = [os.path.abspath(os.path.expanduser(p)) for p in c.data]
        dirs = [p for p in c.data if not is_block_device(p)]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        if c.meta_dir is None:
            c.meta_dir = dirs[0] if dirs else os.path.join(default_data_dir(), "meta")
        if not c.capacity:
            # capacity is split evenly over the data paths: the default fits the smallest share
            on_fs = collections.Counter(os.stat(d).st_dev for d in dirs)
            c.capacity = len(c.data) * min(_default_share(p, on_fs) for p in c.data)
        problems = []
        if c.durability not in ("sync", "async"):
            problems.append(f"durability {c.durability!r} is not one of sync, async")
        if not 4096 <= c.min_block <= c.max_block:
            problems.append(f"block-size range {c.min_block}..{c.max_block} must satisfy "
                            "4KiB <= min <= max")
        if c.max_block > 1 << 30:
            problems.append(f"max block {format_size(c.max_block)} is above the 1GiB limit")
        if not 1 <= c.max_batch <= MAX_BATCH:
            problems.append(f"max batch {c.max_batch} outside 1..{MAX_BATCH}")
        if c.listen_unix is None:
            c.listen_unix = os.path.join(c.meta_dir, "memkv.sock")
            if len(c.listen_unix.encode()) > MAX_UNIX_PATH:
                c.listen_unix = None  # a default too long for sun_path: TCP only (see the log)
        elif c.listen_unix in ("", "off"):
            c.listen_unix = None
        else:
            c.listen_unix = os.path.abspath(os.path.expanduser(c.listen_unix))
            if len(c.listen_unix.encode()) > MAX_UNIX_PATH:
                problems.append(f"unix socket path {c.listen_unix} is longer than {MAX_UNIX_PATH} "
                                "bytes; choose a shorter one")
        if c.secret_file and not os.path.isfile(c.secret_file):
            problems.append(f"secret file {c.secret_file} does not exist")
        try:
            c.host_port
        except ValueError:
            problems.append(f"listen address {c.listen!r} is not host:port")
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))
        return c

    def data_files(self) -> list[str]:
        return [p if is_block_device(p) else os.path.join(p, DATA_FILE) for p in self.data]

    def secret(self) -> bytes | None:
        if not self.secret_file:
            return None
        with open(self.secret_file, "rb") as f:
            s = f.read().strip()
        if not s:
            raise ConfigError(f"secret file {self.secret_file} is empty")
        return s


_SIZE_FIELDS = {"capacity", "min_block", "max_block", "ram_cache", "staging_memory", "journal_max"}


def load(config_file: str | None, overrides: dict) -> ServerConfig:
    """Defaults <- TOML file (keys as the long flags, e.g. max-block = "16MiB") <- flags."""
    values: dict = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {config_file}: {e}") from e
        raw = raw.get("server", raw)
        fields = {f.name for f in dataclasses.fields(ServerConfig)}
        unknown = [k for k in raw if k.replace("-", "_") not in fields]
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(f.replace('_', '-') for f in fields))}")
        values.update({k.replace("-", "_"): v for k, v in raw.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    for k in _SIZE_FIELDS & values.keys():
        values[k] = parse_size(values[k], k.replace("_", "-"))
    if "quota" in values:
        values["quota"] = parse_quotas(values["quota"])
    return ServerConfig(**values)


def parse_quotas(raw) -> dict[str, int]:
    """--quota NAMESPACE=SIZE (repeatable), or in TOML a table {namespace = size} or a list of
    "NAMESPACE=SIZE"; the namespace "*" stands for every namespace not named."""
    items = raw.items() if isinstance(raw, dict) else []
    if isinstance(raw, (list, tuple)):
        items = []
        for entry in raw:
            ns, eq, size = str(entry).rpartition("=")
            if not eq or not ns:
                raise ConfigError(f"quota {entry!r}: expected NAMESPACE=SIZE, e.g. "
                                  "llama3-8b/bf16/p16/tp0=200GiB or *=50GiB")
            items.append((ns, size))
    elif not isinstance(raw, dict):
        raise ConfigError(f"quota: expected NAMESPACE=SIZE entries, got {raw!r}")
    out = {}
    for ns, size in items:
        out[ns] = parse_size(size, f"quota of namespace {ns!r}")
        if out[ns] <= 0:
            raise ConfigError(f"quota of namespace {ns!r} must be above 0")
    return out


def _default_share(path: str, dirs_on_fs: collections.Counter) -> int:
    """A data path's size when none is configured: a block device's size; in a directory, the
    size of its existing data file (a store keeps its size), else half the free space of its
    filesystem (split between the data directories on it), from 256MiB up to 16GiB."""
    if is_block_device(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    existing = os.path.join(path, DATA_FILE)
    if os.path.isfile(existing):
        return os.path.getsize(existing)
    free = shutil.disk_usage(path).free // dirs_on_fs[os.stat(path).st_dev]
    return max(256 << 20, min(16 << 30, free // 2)) // (1 << 20) * (1 << 20)


def is_block_device(path: str) -> bool:
    import stat
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
