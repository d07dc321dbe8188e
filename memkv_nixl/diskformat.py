"""The memkv on-disk format: the single Python description of every persistent structure
(C twin for the block record: _native/memkv.h). Nothing here does I/O.

A data path (file or block device) starts with a 4 KiB superblock, then a ring of records.
A record is a 256-byte header (magic, version, namespace id, key, sequence number, length,
xxh3 of the payload, xxh3 of the header) followed by the payload, padded to 4 KiB, written in
one O_DIRECT write. The index lives in memory and is persisted by append-only journals of
fixed-size records (meta dir: journal.<id>, each opening with JOURNAL_HDR) and a periodic
checkpoint (index.ckpt) that holds the same records and names the last journal it covers; each
record carries a magic and an xxh3, so a torn tail is detected and ignored. Recovery loads the
checkpoint, then replays every journal with a higher id, oldest first.
"""
import enum
import struct

ALIGN = 4096
REC_HDR = 256
SUPERBLOCK_LEN = ALIGN
REC_MAGIC = 0x52564B4D  # b"MKVR"
REC_VERSION = 1

# Data file superblock: magic version reserved uuid size created_unix
SUPERBLOCK = struct.Struct("<IHH16sQQ")
SUPERBLOCK_MAGIC = 0x44564B4D  # b"MKVD"

# Block record header (the C struct memkv_rec_hdr): its size is asserted against C in the tests.
REC_HEADER = struct.Struct("<IHHIIQQQ128s80xQ")

# Journal/checkpoint record: magic type key_len file ns_id flags seq off len csum key rec_csum
META_REC = struct.Struct("<IBBHIIQQQQ128sQ")
META_MAGIC = 0x4A564B4D  # b"MKVJ"
META_BODY = META_REC.size - 8  # bytes covered by rec_csum

# Journal file header: magic version reserved journal_id
JOURNAL_HDR = struct.Struct("<IHHQ")
JOURNAL_MAGIC = 0x4C564B4D  # b"MKVL"

# Checkpoint: header, one (uuid, head) per data file, META_REC records, then xxh3 of all before it
CKPT_HDR = struct.Struct("<IHHQQII")  # magic version reserved journal_id next_seq n_files n_records
CKPT_FILE = struct.Struct("<16sQ")
CKPT_MAGIC = 0x43564B4D  # b"MKVC"
CKPT_TRAILER = struct.Struct("<Q")
FORMAT_VERSION = 1

FLAG_PINNED = 1


class MetaType(enum.IntEnum):
    NAMESPACE = 1  # key = namespace name, ns_id = its id
    PUT = 2        # a committed block: file, off, len, csum, seq
    EVICT = 3      # the block (ns_id, key, seq) was evicted by the ring
    DELETE = 4     # (ns_id, key) deleted by a client
    PIN = 5
    UNPIN = 6


def record_length(payload_len: int) -> int:
    """Bytes a block occupies in the ring: header + payload rounded up to the alignment."""
    return -(-(REC_HDR + payload_len) // ALIGN) * ALIGN
