"""Property tests of the decoder: valid frames always round-trip, however they are cut; anything
else raises a hetero_ps ProtocolError and nothing else (no IndexError, no MemoryError, no hang)."""

from __future__ import annotations

import struct

import crc32c
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetero_ps.errors import ProtocolError
from hetero_ps.wire.protocol import PREFIX_SIZE, FrameDecoder, Limits, MsgType, encode_frame

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "seg"), values, max_size=6)
segment_lists = st.lists(st.binary(max_size=300), max_size=5)
msg_types = st.sampled_from(list(MsgType))


def _frames_bytes(frames) -> bytes:
    return b"".join(bytes(b) for f in frames for b in f.buffers)


def _chunks(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _drain(dec: FrameDecoder, data_chunks) -> list:
    """Feed chunk by chunk; only ProtocolError may escape (the test fails on anything else)."""
    out = []
    try:
        for c in data_chunks:
            dec.feed(c)
            while (m := dec.next_message()) is not None:
                out.append(m)
    except ProtocolError:
        return out
    return out


@FUZZ
@given(
    st.lists(st.tuples(msg_types, headers, segment_lists, st.booleans()), min_size=1, max_size=4),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_valid_frames_round_trip_however_cut(specs, cuts):
    frames = [encode_frame(t, h, s, payload_checksum=c) for t, h, s, c in specs]
    dec = FrameDecoder()
    got = []
    for chunk in _chunks(_frames_bytes(frames), cuts):
        dec.feed(chunk)
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert len(got) == len(specs)
    for m, (t, h, s, _) in zip(got, specs):
        assert m.type == t
        assert m.header == msgpack.unpackb(msgpack.packb(h, use_bin_type=True), raw=False)
        assert [bytes(x) for x in m.segments] == s
    assert not dec.mid_frame


@st.composite
def mutated(draw):
    specs = draw(st.lists(st.tuples(msg_types, headers, segment_lists), min_size=1, max_size=3))
    data = bytearray(_frames_bytes(encode_frame(t, h, s) for t, h, s in specs))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "prefix_field"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=20))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 20))]
        elif op == "prefix_field" and len(data) >= PREFIX_SIZE:
            # rewrite a length with a valid header CRC, so the decoder must survive the lie itself
            hlen = draw(st.integers(0, 2**32 - 1) | st.integers(0, 64))
            plen = draw(st.integers(0, 2**64 - 1) | st.integers(0, 400))
            struct.pack_into("<IQ", data, 8, hlen, plen)
            hend = min(len(data), PREFIX_SIZE + hlen)
            crc = crc32c.crc32c(bytes(data[PREFIX_SIZE:hend]), crc32c.crc32c(bytes(data[:24])))
            struct.pack_into("<I", data, 24, crc)
    return bytes(data)


@FUZZ
@given(mutated(), st.lists(st.integers(min_value=0), max_size=10), st.booleans())
def test_mutated_frames_raise_only_protocol_errors(data, cuts, authenticated):
    lim = Limits(max_payload_bytes=1 << 20, max_header_bytes=1 << 16)
    _drain(FrameDecoder(lim, authenticated=authenticated), _chunks(data, cuts))


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=10))
def test_random_bytes_raise_only_protocol_errors(data, cuts):
    _drain(FrameDecoder(), _chunks(data, cuts))


@FUZZ
@given(st.binary(max_size=400))
def test_random_headers_behind_a_valid_prefix(hb):
    head = struct.pack("<4sHBBIQI", b"HTPS", 1, 6, 1, len(hb), 0, 0)
    frame = head + struct.pack("<I", crc32c.crc32c(hb, crc32c.crc32c(head))) + hb
    if not hb:
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(frame)
        return
    msgs = _drain(FrameDecoder(), [frame])
    for m in msgs:
        assert isinstance(m.header, dict) and "seg" not in m.header
