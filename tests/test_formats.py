"""The Python descriptions of the wire and disk formats agree with the C header byte for byte."""
from memkv_nixl import diskformat, native, protocol
from memkv_nixl._native._memkv import ffi, lib


def test_wire_struct_sizes_equal_c():
    assert protocol.FRAME.size == ffi.sizeof("struct memkv_frame_hdr") == 32
    assert protocol.REQ_DESC.size == ffi.sizeof("struct memkv_req_desc")
    assert protocol.GET_REP.size == ffi.sizeof("struct memkv_get_rep")
    assert protocol.MAGIC == lib.MEMKV_WIRE_MAGIC and protocol.VERSION == lib.MEMKV_WIRE_VERSION
    assert protocol.MAX_KEY == lib.MEMKV_MAX_KEY


def test_wire_enums_equal_c():
    for op in protocol.Op:
        assert getattr(lib, f"MEMKV_OP_{op.name}") == op.value
    for st in protocol.Status:
        assert getattr(lib, f"MEMKV_ST_{st.name}") == st.value


def test_frame_field_offsets_equal_c():
    packed = protocol.pack_frame(7, status=3, flags=0x0102, count=5, keys_len=9, req_id=11, body_len=13)
    buf = bytearray(packed)
    hdr = ffi.from_buffer("struct memkv_frame_hdr[]", buf)[0]
    assert (hdr.op, hdr.status, hdr.flags, hdr.count, hdr.keys_len, hdr.req_id, hdr.body_len) == \
        (7, 3, 0x0102, 5, 9, 11, 13)


def test_record_header_layout_equals_c():
    assert diskformat.REC_HEADER.size == ffi.sizeof("struct memkv_rec_hdr") == diskformat.REC_HDR
    assert diskformat.REC_MAGIC == lib.MEMKV_REC_MAGIC and diskformat.ALIGN == lib.MEMKV_ALIGN
    assert ffi.offsetof("struct memkv_rec_hdr", "hdr_csum") == diskformat.REC_HEADER.size - 8


def test_io_row_layout_equals_c():
    assert native.IO.size == ffi.sizeof("struct memkv_io")
    assert native.IO_STATUS_AT == ffi.offsetof("struct memkv_io", "status")
    assert native.IO_RESULT_AT == ffi.offsetof("struct memkv_io", "result")
    row = bytearray(native.IO.size)
    assert native.IO_ACTION_AT == ffi.offsetof("struct memkv_io", "action")
    native.IO.pack_into(row, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 12, 13)
    c = ffi.from_buffer("struct memkv_io[]", row)[0]
    assert (c.fd, c.ns_id, c.off, c.len, c.csum, c.seq, c.cap, int(ffi.cast("uintptr_t", c.key)),
            c.key_len, c.action, c.status, c.result, c.ram, c.fill) == \
        (3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 12, 13)


def test_descriptor_table_built_in_c_parses_in_python():
    from array import array
    table = native.build_descs(array("H", [3, 5]), array("Q", [4096, 8192]))
    descs = list(protocol.REQ_DESC.iter_unpack(table))
    assert descs == [(4096, 0, 0, 3, 0), (8192, 0, 3, 5, 0)]
    assert native.check_descs(table + b"abcdefgh", 2, 8, 4096, 8192) == 12288


def test_descriptor_check_names_the_problem():
    from array import array
    import pytest
    from memkv_nixl.errors import ProtocolError
    table = native.build_descs(array("H", [3]), array("Q", [1 << 40]))
    with pytest.raises(ProtocolError, match="length 1099511627776 outside the server's 4096..67108864"):
        native.check_descs(table + b"abc", 1, 3, 4096, 64 << 20)
    with pytest.raises(ProtocolError, match="beyond the 2-byte keys blob"):
        native.check_descs(table + b"ab", 1, 2, 0, 1 << 41)


def test_status_codes_are_contiguous_from_zero():
    # the client maps wire codes to Status by tuple index
    assert [s.value for s in protocol.Status] == list(range(len(protocol.Status)))
