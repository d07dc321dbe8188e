"""The memkv wire format: the single Python description of every frame (C twin: _native/memkv.h).

A connection starts with HELLO (version, namespace) -> CHALLENGE (limits, nonce, whether a secret
is required, the server's id and unix socket) -> AUTH (HMAC-SHA256 of the nonce) -> AUTH reply. Then requests, one at a time per
connection: a 32-byte frame header, `count` request descriptors, the keys blob, and for PUT the
payloads in descriptor order followed by a trailer of `count` little-endian u64 xxh3-64 checksums
(the client hashes each block right after sending it, so hashing overlaps the transfer). Replies
use the same header; PUT/EXISTS/DELETE/PIN/UNPIN reply with one status byte per descriptor, GET
streams (reply descriptor + payload) per descriptor, STATS replies with JSON.

cma (client and server on one host, over a unix socket): the HELLO asks for it and names 8 bytes of
client memory with their value; the server, which has the client's pid from the kernel
(SO_PEERCRED), reads them back with process_vm_readv and grants cma in the CHALLENGE. PUT and GET
frames flagged CMA then carry a table of `count` u64 buffer addresses after the keys instead of
payloads and checksums: the server copies straight from (PUT, hashing as it copies) and into (GET)
the client's memory, and a GET reply streams only the reply descriptors. A client that reached
the server over TCP from the same host moves to the unix socket the CHALLENGE names, when the
server there has the same id and grants cma.

A frame-level problem is answered by an ERROR frame (status + UTF-8 message), after which the
server closes the connection. All integers are little-endian.
This module must stay free of I/O: it only packs, unpacks and names things.
"""
import enum
import hashlib
import hmac
import struct
from typing import NamedTuple

from .errors import ProtocolError

MAGIC = 0x31564B4D  # b"MKV1" read as little-endian u32
VERSION = 2  # 2: cma, and the server id + unix socket after the CHALLENGE
MAX_KEY = 128
MAX_NAMESPACE = 128
MAX_BATCH = 8192
MAX_ERROR_TEXT = 4096
NONCE_LEN = 32
MAC_LEN = 32


class Op(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    PUT = 3
    GET = 4
    EXISTS = 5
    DELETE = 6
    PIN = 7
    UNPIN = 8
    STATS = 9
    ERROR = 15


class FrameFlag(enum.IntFlag):
    REPLACE = 1  # PUT: overwrite committed keys (region mode: a file-shaped tier rewrites its slots)
    CMA = 2      # PUT/GET on a cma connection: an address table replaces the payload bytes


HELLO_CMA = 1    # HELLO flag: the client (on a unix socket) asks for cma; 16 probe bytes follow
FEATURE_CMA = 1  # CHALLENGE features: cma granted
CMA_PROBE = struct.Struct("<QQ")  # address of 8 bytes in the client, and their value
SERVER_ID_LEN = 16     # after the CHALLENGE: a random id of the server process, then the path of
MAX_UNIX_PATH = 107    # its unix socket (empty when none): a TCP client on the same host moves there


class Status(enum.IntEnum):
    """Per-key outcome of a batched call (and the frame-level status of a reply)."""

    OK = 0
    MISS = 1
    FULL = 2                # back-pressure: nothing evictable right now; retry later
    CHECKSUM_MISMATCH = 3   # the bytes did not match their checksum; nothing stored / served
    BAD_LENGTH = 4          # block length outside the server's block-size range
    BAD_KEY = 5             # key empty or longer than MAX_KEY bytes
    IO_ERROR = 6
    UNREACHABLE = 7         # the server owning the key could not be reached (client side)
    AUTH_FAILED = 8
    BAD_REQUEST = 9
    BUFFER_TOO_SMALL = 10   # GET: the block is larger than the caller's buffer
    VERSION_MISMATCH = 11
    SERVER_ERROR = 12

    @property
    def ok(self) -> bool:
        return self is Status.OK


FRAME = struct.Struct("<IBBHIIQQ")      # magic op status flags count keys_len req_id body_len
REQ_DESC = struct.Struct("<QQIHH")      # len csum(reserved, 0) key_off key_len reserved
CSUM = struct.Struct("<Q")              # one entry of the PUT checksum trailer
GET_REP = struct.Struct("<B7xQQ")       # status len csum
HELLO = struct.Struct("<HHI")           # version namespace_len flags; namespace bytes follow
CHALLENGE = struct.Struct("<HBB4xQQI4x32s")  # version auth_required features max_block min_block max_batch nonce


class Frame(NamedTuple):
    op: int
    status: int
    flags: int
    count: int
    keys_len: int
    req_id: int
    body_len: int


def pack_frame(op: int, *, status: int = 0, flags: int = 0, count: int = 0, keys_len: int = 0,
               req_id: int = 0, body_len: int = 0) -> bytes:
    return FRAME.pack(MAGIC, op, status, flags, count, keys_len, req_id, body_len)


def unpack_frame(data: bytes, peer: str) -> Frame:
    magic, *rest = FRAME.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"{peer}: bad frame magic 0x{magic:08x} (expected 0x{MAGIC:08x}); "
                            "is this a memkv endpoint?")
    return Frame(*rest)


def error_frame(status: int, message: str) -> bytes:
    body = message.encode()[:MAX_ERROR_TEXT]
    return pack_frame(Op.ERROR, status=status, body_len=len(body)) + body


class Limits(NamedTuple):
    """What the server announces in its CHALLENGE."""

    max_block: int
    min_block: int
    max_batch: int


def endpoint_name(host: str, port: int) -> str:
    """How a server is named in messages and seeded in placement ('host:port', or the unix socket
    path for port 0); the NIXL plugin names servers the same way."""
    return f"{host}:{port}" if port else host


def auth_mac(secret: bytes, nonce: bytes, namespace: bytes) -> bytes:
    """Response to a server challenge: binds the secret to this nonce and namespace."""
    return hmac.new(secret, b"memkv-auth-v1\0" + nonce + namespace, hashlib.sha256).digest()
