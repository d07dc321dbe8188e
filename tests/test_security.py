"""Authentication, and bad input that must never hurt other clients or committed data."""
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import recv_exactly
from memkv_nixl import AuthError, Client, Status
from memkv_nixl.protocol import FRAME, HELLO, MAGIC, VERSION, Op, auth_mac, pack_frame


@pytest.fixture
def secret_server(memkv_server, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    s = memkv_server(extra=["--secret-file", str(secret)])
    return s, str(secret)


def test_right_secret_works(secret_server):
    s, secret = secret_server
    with Client([s.endpoint], namespace="n", secret_file=secret) as c:
        assert c.put([b"k"], [bytes(4096)]) == [Status.OK]


def test_wrong_secret_is_refused_with_a_clear_error(secret_server, tmp_path):
    s, _ = secret_server
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret")
    with Client([s.endpoint], namespace="n", secret_file=str(wrong)) as c:
        with pytest.raises(AuthError, match=f"authentication failed at {s.address}"):
            c.put([b"k"], [bytes(4096)])
    with Client([s.endpoint], namespace="n") as c:
        with pytest.raises(AuthError, match="requires a shared secret; pass secret_file="):
            c.exists([b"k"])
    assert "authentication failed" in s.log()


def _raw(s):
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    return sock


def _handshake(sock, ns=b"fuzz"):
    sock.sendall(pack_frame(Op.HELLO, body_len=HELLO.size + len(ns)) + HELLO.pack(VERSION, len(ns), 0) + ns)
    hdr = recv_exactly(sock, FRAME.size)
    body = recv_exactly(sock, struct.unpack_from("<Q", hdr, 24)[0])
    nonce = body[32:64]  # CHALLENGE: ... nonce at 32..64, then the server id and unix path
    sock.sendall(pack_frame(Op.AUTH, body_len=32) + auth_mac(b"", nonce, ns))
    recv_exactly(sock, FRAME.size)


def _error_text(sock) -> str:
    """Read frames until an ERROR frame or EOF; return its text ('' on plain close)."""
    try:
        hdr = recv_exactly(sock, FRAME.size)
    except OSError:
        return ""
    if len(hdr) < FRAME.size:
        return ""
    magic, op, status = struct.unpack_from("<IBB", hdr)
    assert magic == MAGIC
    if op != Op.ERROR:
        return ""
    return recv_exactly(sock, struct.unpack_from("<Q", hdr, 24)[0]).decode()


@pytest.mark.parametrize("frame,expect", [
    (b"GARBAGE!" * 4, "bad frame magic"),
    (pack_frame(99), "unknown or unexpected op 99"),
    (pack_frame(Op.GET, count=100000), "exceeds the server's max batch"),
    (pack_frame(Op.PUT, count=1, keys_len=500), "keys blob of 500 bytes is larger than 1 keys"),
    (pack_frame(Op.EXISTS, count=1, keys_len=1, body_len=3), "does not match 1 descriptors"),
])
def test_malformed_frames_get_an_error_naming_the_problem(server, frame, expect):
    with _raw(server) as sock:
        _handshake(sock)
        sock.sendall(frame)
        assert expect in _error_text(sock)
    with server.client() as c:  # the server keeps serving
        assert c.put([b"after"], [bytes(4096)]) == [Status.OK]


def test_oversized_put_length_is_refused_before_any_payload(server):
    from array import array
    from memkv_nixl import native
    table = native.build_descs(array("H", [1]), array("Q", [1 << 40]))
    with _raw(server) as sock:
        _handshake(sock)
        sock.sendall(pack_frame(Op.PUT, count=1, keys_len=1, body_len=len(table) + 1 + (1 << 40) + 8)
                     + table + b"k")
        assert "outside the server's 4096..67108864" in _error_text(sock)


def test_client_vanishing_mid_put_loses_nothing_committed(server):
    from array import array
    from memkv_nixl import native
    with server.client() as c:
        c.put([b"committed"], [b"C" * 8192])
    table = native.build_descs(array("H", [4]), array("Q", [1 << 20]))
    with _raw(server) as sock:
        _handshake(sock)
        sock.sendall(pack_frame(Op.PUT, count=1, keys_len=4, body_len=len(table) + 4 + (1 << 20) + 8)
                     + table + b"half" + b"x" * 1000)
    with server.client() as c:
        out = bytearray(8192)
        assert c.get([b"committed"], [out]) == [Status.OK] and bytes(out) == b"C" * 8192
        assert c.exists([b"half"]) == [False]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=600), after_handshake=st.booleans(),
       op=st.sampled_from([int(o) for o in Op] + [0, 200]))
def test_fuzzed_frames_never_hurt_the_server(server, data, after_handshake, op):
    with server.client() as c:
        if not c.exists([b"sentinel"])[0]:
            c.put([b"sentinel"], [b"S" * 4096])
    with _raw(server) as sock:
        if after_handshake:
            _handshake(sock)
        # a plausible header with random fields, then random bytes
        hdr = bytearray(pack_frame(op))
        hdr[8:32] = (data + bytes(24))[:24]
        try:
            sock.sendall(bytes(hdr) + data)
            sock.shutdown(socket.SHUT_WR)
            _error_text(sock)
        except OSError:
            pass  # the server may close first: that is an allowed answer
    with server.client() as c:
        out = bytearray(4096)
        assert c.get([b"sentinel"], [out]) == [Status.OK] and bytes(out) == b"S" * 4096


def test_a_server_reachable_beyond_loopback_without_a_secret_warns(memkv_server, tmp_path):
    open_ = memkv_server("open", extra=["--listen", "0.0.0.0:0"])
    assert "without --secret-file: anyone who can reach this address" in open_.log()
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    closed = memkv_server("closed", extra=["--listen", "0.0.0.0:0", "--secret-file", str(secret)])
    local = memkv_server("local")
    assert "without --secret-file" not in closed.log() + local.log()
