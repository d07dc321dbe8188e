"""memkv: a shared, persistent KV-cache block store for LLM inference (package memkv_nixl).

    from memkv_nixl import Client, Status
    with Client(["memkv://127.0.0.1:9900"], namespace="llama3-8b/bf16/p16/tp0") as c:
        c.put(keys, buffers); c.get(keys, buffers)
"""
from ._version import __version__
from .client import Client
from .errors import (AuthError, ConfigError, ConnectionFailed, InvalidArgument, MemkvError,
                     ProtocolError, ServerError, StoreError)
from .protocol import Status

__all__ = ["Client", "Status", "__version__", "MemkvError", "InvalidArgument", "ConfigError",
           "ConnectionFailed", "AuthError", "ProtocolError", "ServerError", "StoreError"]
