"""The sans-I/O wire format: round trips, zero-copy decoding, every limit, every way a frame can be bad."""

from __future__ import annotations

import os
import struct
import tracemalloc

import crc32c
import msgpack
import numpy as np
import pytest

from hetero_ps.errors import (
    ChecksumError,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    UnknownMessage,
    VersionMismatch,
)
from hetero_ps.wire.protocol import (
    FLAG_PAYLOAD_CRC,
    MAGIC,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    Limits,
    Message,
    MsgType,
    encode_frame,
    raise_if_error,
)


def raw_frame(
    mtype: int,
    header,
    payload: bytes = b"",
    *,
    header_bytes: bytes | None = None,
    version: int = 1,
    flags: int = FLAG_PAYLOAD_CRC,
    magic: bytes = MAGIC,
    pcrc: int | None = None,
    hcrc: int | None = None,
    hlen: int | None = None,
    plen: int | None = None,
) -> bytes:
    """A frame built by hand (crc32c package, not our code), with any field overridable."""
    hb = header_bytes if header_bytes is not None else msgpack.packb(header, use_bin_type=True)
    hlen = len(hb) if hlen is None else hlen
    plen = len(payload) if plen is None else plen
    if pcrc is None:
        pcrc = crc32c.crc32c(payload) if flags & FLAG_PAYLOAD_CRC else 0
    head = struct.pack("<4sHBBIQI", magic, version, mtype, flags, hlen, plen, pcrc)
    if hcrc is None:
        hcrc = crc32c.crc32c(hb, crc32c.crc32c(head))
    return head + struct.pack("<I", hcrc) + hb + payload


def joined(frame) -> bytes:
    return b"".join(bytes(b) for b in frame.buffers)


def decode_all(data: bytes, limits: Limits | None = None, **kw) -> list[Message]:
    dec = FrameDecoder(limits or Limits(), **kw)
    dec.feed(data)
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


SEGMENT_CASES = {
    "none": [],
    "one_empty": [b""],
    "empties": [b"", b"", b""],
    "one": [b"abc"],
    "mixed": [b"x", b"", bytearray(b"yz"), memoryview(b"0123456789")],
    "many_small": [bytes([i]) * i for i in range(200)],
    "big": [os.urandom(3 << 20), os.urandom(5)],
}


@pytest.mark.parametrize("checksum", [True, False], ids=["crc", "nocrc"])
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_round_trip(case, checksum):
    segs = SEGMENT_CASES[case]
    header = {
        "step": 7,
        "name": "w",
        "shape": [2, 3],
        "f": 0.5,
        "b": b"\x00\xff",
        "n": None,
        "ok": True,
        "nested": {"a": [1, {"b": "c"}]},
    }
    frame = encode_frame(MsgType.PUSH, header, segs, payload_checksum=checksum)
    data = joined(frame)
    assert frame.nbytes == len(data) == PREFIX_SIZE + len(data) - PREFIX_SIZE
    (msg,) = decode_all(data)
    assert msg.type is MsgType.PUSH
    assert msg.header == header
    assert [bytes(s) for s in msg.segments] == [bytes(s) for s in segs]
    assert msg.payload_nbytes == sum(len(bytes(s)) for s in segs)
    assert all(isinstance(s, memoryview) and s.format == "B" for s in msg.segments)


def test_numpy_segments_are_referenced_not_copied():
    a = np.arange(1 << 16, dtype=np.float32)
    b = np.ones((3, 4), dtype=np.float16)
    frame = encode_frame(MsgType.PARAMS, {"k": 1}, [a, b])
    assert frame.buffers[1].obj is a and frame.buffers[2].obj is b  # views, not copies
    (msg,) = decode_all(joined(frame))
    np.testing.assert_array_equal(np.frombuffer(msg.segments[0], np.float32), a)
    np.testing.assert_array_equal(np.frombuffer(msg.segments[1], np.float16).reshape(3, 4), b)


def test_torch_tensors_are_sent_without_a_copy():
    torch = pytest.importorskip("torch")
    t = torch.arange(1000, dtype=torch.float32)
    b = torch.ones(7, dtype=torch.bfloat16)
    frame = encode_frame(MsgType.PUSH, {}, [t, b])
    assert np.shares_memory(np.frombuffer(frame.buffers[1], np.uint8), t.numpy())
    (msg,) = decode_all(joined(frame))
    assert torch.equal(torch.frombuffer(bytearray(msg.segments[0]), dtype=torch.float32), t)
    assert bytes(msg.segments[1]) == b.view(torch.int16).numpy().tobytes()
    with pytest.raises(LocalProtocolError, match="contiguous"):
        encode_frame(MsgType.PUSH, {}, [torch.zeros(4, 4)[:, 1]])


def test_frame_is_reusable_for_many_receivers():
    frame = encode_frame(MsgType.PARAMS, {"v": 1}, [os.urandom(1000)])
    msgs = [decode_all(joined(frame))[0] for _ in range(3)]
    assert len({bytes(m.segments[0]) for m in msgs}) == 1


def test_prefix_layout_matches_the_spec():
    frame = encode_frame(MsgType.HELLO, {"a": 1}, [b"xyz"])
    data = joined(frame)
    magic, ver, mt, flags, hlen, plen, pcrc, hcrc = struct.unpack_from("<4sHBBIQII", data)
    assert (magic, ver, mt, flags, plen) == (b"HTPS", PROTOCOL_VERSION, 1, 1, 3)
    hb = data[28 : 28 + hlen]
    assert msgpack.unpackb(hb) == {"a": 1, "seg": [3]}
    assert pcrc == crc32c.crc32c(b"xyz")
    assert hcrc == crc32c.crc32c(data[:24] + hb)
    assert data == raw_frame(1, {"a": 1, "seg": [3]}, b"xyz")


def test_byte_by_byte_feeding():
    frames = [encode_frame(MsgType.PUSH, {"i": i}, [os.urandom(50 * i)]) for i in range(3)]
    data = b"".join(joined(f) for f in frames)
    dec = FrameDecoder()
    got, ends = [], set()
    pos = 0
    for f in frames:
        pos += f.nbytes
        ends.add(pos)
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        m = dec.next_message()
        if m is not None:
            assert i + 1 in ends, "a message came out before its last byte"
            got.append(m)
        else:
            assert i + 1 not in ends
    assert [m.header["i"] for m in got] == [0, 1, 2]
    assert not dec.mid_frame


def test_several_frames_in_one_feed_and_lazy_allocation():
    frames = [encode_frame(MsgType.PARAMS, {"i": i}, [bytes([i]) * 100]) for i in range(5)]
    calls = []
    shared = bytearray(100)

    def alloc(mt, header, n):
        calls.append(header["i"])
        return memoryview(shared)

    dec = FrameDecoder()
    dec.set_payload_allocator(alloc)
    dec.feed(b"".join(joined(f) for f in frames))
    for i in range(5):
        m = dec.next_message()
        # frame i+1 is not allocated (and so cannot overwrite the shared buffer) before i is taken
        assert calls == list(range(i + 1))
        assert m.header["i"] == i and bytes(m.segments[0]) == bytes([i]) * 100
        assert m.segments[0].obj is shared
    assert dec.next_message() is None


def test_zero_copy_allocator_path_reads_exactly_the_payload():
    payload = os.urandom(10_000)
    frame = encode_frame(MsgType.PUSH, {"x": 1}, [payload[:4000], payload[4000:]])
    data = joined(frame)
    head_len = len(frame.buffers[0])
    dest = bytearray(20_000)
    seen = []

    def alloc(mt, header, n):
        seen.append((mt, header, n))
        return memoryview(dest)[5000 : 5000 + n]

    dec = FrameDecoder()
    dec.set_payload_allocator(alloc)
    # the prefix + header arrive, then the transport asks for a buffer: it is the destination,
    # exactly as long as the payload, so no byte of a following frame can be read into it
    view = dec.get_buffer()
    view[:head_len] = data[:head_len]
    dec.buffer_updated(head_len)
    assert seen == [(MsgType.PUSH, {"x": 1}, 10_000)]
    view = dec.get_buffer()
    assert len(view) == 10_000 and view.obj is dest
    view[:6000] = payload[:6000]
    dec.buffer_updated(6000)
    view = dec.get_buffer()
    assert len(view) == 4000
    view[:] = payload[6000:]
    dec.buffer_updated(4000)
    m = dec.next_message()
    assert bytes(dest[5000:15000]) == payload
    assert [s.obj for s in m.segments] == [dest, dest]
    assert bytes(m.segments[0]) + bytes(m.segments[1]) == payload


def test_over_read_bytes_land_in_the_destination_once():
    payload = os.urandom(3000)
    data = joined(encode_frame(MsgType.PUSH, {}, [payload]))
    dest = bytearray(3000)
    dec = FrameDecoder()
    dec.set_payload_allocator(lambda mt, h, n: memoryview(dest))
    view = dec.get_buffer()  # a prefix read may take more than the prefix...
    assert len(view) >= len(data)
    view[: len(data) - 10] = data[:-10]
    dec.buffer_updated(len(data) - 10)
    view = dec.get_buffer()  # ...whatever it took of the payload was moved to dest
    assert len(view) == 10
    view[:] = data[-10:]
    dec.buffer_updated(10)
    assert bytes(dec.next_message().segments[0]) == payload == bytes(dest)


def test_allocator_may_return_more_and_must_return_enough():
    frame = joined(encode_frame(MsgType.PUSH, {}, [b"abcd"]))
    big = bytearray(100)
    dec = FrameDecoder()
    dec.set_payload_allocator(lambda mt, h, n: big)
    dec.feed(frame)
    assert bytes(dec.next_message().segments[0]) == b"abcd" and big[:4] == b"abcd"
    for bad in (lambda mt, h, n: bytearray(2), lambda mt, h, n: b"readonly", lambda mt, h, n: 42):
        dec = FrameDecoder()
        dec.set_payload_allocator(bad)
        with pytest.raises(LocalProtocolError):
            dec.feed(frame)


def test_allocator_returning_none_gets_a_fresh_buffer():
    dec = FrameDecoder()
    dec.set_payload_allocator(lambda mt, h, n: None)
    dec.feed(joined(encode_frame(MsgType.PUSH, {}, [b"abcd"])))
    assert bytes(dec.next_message().segments[0]) == b"abcd"


# -- limits (as msgpack's test_limits: at the limit passes, one over fails) -----------------------


def _header_of_size(n: int) -> dict:
    """A header whose msgpack encoding is exactly n bytes (n >= 40)."""
    base = len(msgpack.packb({"p": ""}))
    for pad in range(n - base, n - base - 6, -1):
        h = {"p": "x" * pad}
        if len(msgpack.packb(h)) == n:
            return h
    raise AssertionError(n)


def test_limit_header_bytes():
    lim = Limits(max_header_bytes=1000)
    decode_all(joined(encode_frame(MsgType.HEARTBEAT, _header_of_size(1000))), lim)
    with pytest.raises(LimitExceeded, match="header of 1001 bytes"):
        decode_all(joined(encode_frame(MsgType.HEARTBEAT, _header_of_size(1001))), lim)
    with pytest.raises(LocalProtocolError):
        encode_frame(MsgType.HEARTBEAT, _header_of_size(1001), limits=lim)


def test_limit_payload_bytes():
    lim = Limits(max_payload_bytes=100)
    decode_all(joined(encode_frame(MsgType.PUSH, {}, [b"x" * 100])), lim)
    with pytest.raises(LimitExceeded, match="payload of 101 bytes"):
        decode_all(joined(encode_frame(MsgType.PUSH, {}, [b"x" * 101])), lim)
    with pytest.raises(LocalProtocolError):
        encode_frame(MsgType.PUSH, {}, [b"x" * 101], limits=lim)


def test_limit_segments():
    lim = Limits(max_segments=3)
    decode_all(joined(encode_frame(MsgType.PUSH, {}, [b"a"] * 3)), lim)
    with pytest.raises(LimitExceeded, match="4 segments"):
        decode_all(raw_frame(6, {"seg": [1] * 4}, b"aaaa"), lim)
    with pytest.raises(LocalProtocolError):
        encode_frame(MsgType.PUSH, {}, [b"a"] * 4, limits=lim)


@pytest.mark.parametrize(
    "field,value_at,value_over",
    [
        ("max_str_len", "x" * 10, "x" * 11),
        ("max_bin_len", b"x" * 10, b"x" * 11),
        ("max_array_len", list(range(10)), list(range(11))),
        ("max_map_len", None, None),
    ],
)
def test_msgpack_limits(field, value_at, value_over):
    lim = Limits(**{field: 10}, **({"max_segments": 10} if field == "max_array_len" else {}))
    if field == "max_map_len":
        at = {f"k{i}": i for i in range(10)}
        over = {f"k{i}": i for i in range(11)}
    else:
        at, over = {"v": value_at}, {"v": value_over}
    assert decode_all(raw_frame(10, at), lim)[0].header == at
    with pytest.raises(LimitExceeded, match="exceeds max"):
        decode_all(raw_frame(10, over), lim)


def test_unauthenticated_limits():
    lim = Limits(max_unauth_header_bytes=1000)
    decode_all(joined(encode_frame(MsgType.HELLO, _header_of_size(1000))), lim, authenticated=False)
    with pytest.raises(LimitExceeded, match="before authentication"):
        decode_all(joined(encode_frame(MsgType.HELLO, _header_of_size(1001))), lim, authenticated=False)
    with pytest.raises(LimitExceeded, match="payload of 1 bytes is over the limit of 0 before authentication"):
        decode_all(joined(encode_frame(MsgType.HELLO, {}, [b"x"])), lim, authenticated=False)
    # the same frames are fine once authenticated
    decode_all(joined(encode_frame(MsgType.HELLO, _header_of_size(1001), [b"x"])), lim, authenticated=True)


def test_huge_lengths_are_rejected_before_any_allocation():
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for kw in ({"plen": 2**62}, {"plen": 2**64 - 1}, {"hlen": 2**32 - 1}, {"hlen": 2**31}):
            frame = raw_frame(6, {}, **kw)[:PREFIX_SIZE]
            with pytest.raises(LimitExceeded):
                decode_all(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    assert peak - base < 1 << 20


def test_limits_validate_themselves():
    for kw in (
        {"max_header_bytes": 0},
        {"max_payload_bytes": -1},
        {"max_segments": 1.5},
        {"max_array_len": 10},
        {"frame_timeout": 0},
        {"max_payload_bytes": 2**64},
    ):
        with pytest.raises(ValueError):
            Limits(**kw)
    assert Limits().frame_deadline(10 << 20) == pytest.approx(30.0 + 10.0)


# -- bad frames -----------------------------------------------------------------------------------


def test_truncated_frame_waits_and_reports_mid_frame():
    data = joined(encode_frame(MsgType.PUSH, {"a": 1}, [b"x" * 100]))
    for cut in (1, 10, PREFIX_SIZE, PREFIX_SIZE + 3, len(data) - 1):
        dec = FrameDecoder()
        dec.feed(data[:cut])
        assert dec.next_message() is None and dec.mid_frame
    dec = FrameDecoder()
    dec.feed(data[:PREFIX_SIZE])
    assert dec.frame_nbytes == len(data)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x00" * 40, b"HTTX", b"H" + os.urandom(60)])
def test_wrong_magic_fails_fast(data):
    dec = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="not a hetero_ps frame"):
        dec.feed(data[:4])


def test_bad_magic_in_full_prefix():
    with pytest.raises(RemoteProtocolError, match="magic"):
        decode_all(raw_frame(1, {}, magic=b"HTPX"))


def test_version_mismatch_names_both_versions():
    with pytest.raises(VersionMismatch, match="version 7.*version 1"):
        decode_all(raw_frame(1, {}, version=7))


@pytest.mark.parametrize("where", ["prefix_type", "prefix_length", "header_body", "header_crc_field"])
def test_bad_header_checksum(where):
    frame = bytearray(raw_frame(6, {"step": 1, "seg": [4]}, b"abcd"))
    pos = {"prefix_type": 6, "prefix_length": 12, "header_body": PREFIX_SIZE + 3, "header_crc_field": 25}[where]
    frame[pos] ^= 0x01
    with pytest.raises(ChecksumError, match="header checksum"):
        decode_all(bytes(frame))


def test_bad_payload_checksum():
    frame = bytearray(joined(encode_frame(MsgType.PUSH, {}, [os.urandom(1000)])))
    frame[-500] ^= 0x80
    with pytest.raises(ChecksumError, match="payload checksum"):
        decode_all(bytes(frame))
    # without the flag, corruption of the payload is not detected (TCP's own checksum only)
    frame = bytearray(joined(encode_frame(MsgType.PUSH, {}, [b"a" * 1000], payload_checksum=False)))
    frame[-500] ^= 0x80
    assert bytes(decode_all(bytes(frame))[0].segments[0]).count(b"a") == 999


def test_unknown_message_type():
    with pytest.raises(UnknownMessage, match="200"):
        decode_all(raw_frame(200, {}))
    with pytest.raises(UnknownMessage):
        decode_all(raw_frame(0, {}))


def test_bad_flags_and_empty_header():
    with pytest.raises(RemoteProtocolError, match="flag"):
        decode_all(raw_frame(1, {}, flags=0x81))
    with pytest.raises(RemoteProtocolError, match="flag is clear"):
        decode_all(raw_frame(1, {}, flags=0, pcrc=5))
    with pytest.raises(RemoteProtocolError, match="empty header"):
        decode_all(raw_frame(1, None, header_bytes=b""))


@pytest.mark.parametrize(
    "hb,match",
    [
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb(5), "not a map"),
        (msgpack.packb({1: 2}), "map key"),
        (msgpack.packb({b"k": 2}), "not a str"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"xyz")}), "ext type"),
        (b"\x81\xa1a\xc7\x00\x05", "only maps"),  # a 0-byte ext passes max_ext_len=0
        (b"\x81\xa1a\xd6\xff\x00\x00\x00\x01", "ext type"),  # timestamp ext
        (b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0", "not valid msgpack"),  # too deep for the unpacker
        (b"\x81\xa1a\xa5ab", "not valid msgpack"),  # truncated str
        (b"\x81\xa1a\xa2\xff\xfe", "not valid msgpack"),  # invalid UTF-8
    ],
)
def test_bad_msgpack_headers(hb, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(raw_frame(10, None, header_bytes=hb))


@pytest.mark.parametrize(
    "seg,payload,match",
    [
        ([3, 3], b"abcde", "sum to 6"),
        ([1], b"abcde", "sum to 1"),
        (None, b"abcde", 'no "seg"'),
        ("abc", b"abc", "list of non-negative"),
        ([-1, 4], b"abc", "list of non-negative"),
        ([True, 2], b"abc", "list of non-negative"),
        ([1.0, 2], b"abc", "list of non-negative"),
    ],
)
def test_segments_must_describe_the_payload(seg, payload, match):
    h = {} if seg is None else {"seg": seg}
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(raw_frame(6, h, payload))


def test_segments_may_be_empty_with_an_empty_payload():
    (m,) = decode_all(raw_frame(6, {"seg": [0, 0]}))
    assert [bytes(s) for s in m.segments] == [b"", b""]


def test_garbage_after_a_good_frame():
    good = joined(encode_frame(MsgType.BYE, {"reason": "done"}))
    dec = FrameDecoder()
    dec.feed(good + os.urandom(100))
    assert dec.next_message().header == {"reason": "done"}
    with pytest.raises(RemoteProtocolError):
        dec.next_message()


def test_decoder_is_dead_after_an_error():
    dec = FrameDecoder()
    with pytest.raises(VersionMismatch):
        dec.feed(raw_frame(1, {}, version=2))
    with pytest.raises(VersionMismatch):
        dec.next_message()
    with pytest.raises(VersionMismatch):
        dec.feed(joined(encode_frame(MsgType.BYE, {})))
    with pytest.raises(VersionMismatch):
        dec.get_buffer()


def test_buffer_updated_misuse_is_local():
    dec = FrameDecoder()
    view = dec.get_buffer()
    with pytest.raises(LocalProtocolError):
        dec.buffer_updated(len(view) + 1)


def test_all_errors_are_protocol_errors():
    for exc in (ChecksumError, LimitExceeded, UnknownMessage, VersionMismatch, RemoteProtocolError):
        assert issubclass(exc, ProtocolError)


# -- encoding errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        ((99, {}), "unknown message type"),
        ((MsgType.PUSH, [1]), "must be a dict"),
        ((MsgType.PUSH, {1: 2}), "keys must be str"),
        ((MsgType.PUSH, {"seg": [1]}), "reserved"),
        ((MsgType.PUSH, {"x": object()}), "cannot be encoded"),
        ((MsgType.PUSH, {}, [np.zeros((4, 4), np.float32)[:, 1]]), "not C-contiguous"),
        ((MsgType.PUSH, {}, ["text"]), "does not expose a buffer"),
        ((MsgType.PUSH, {}, [42]), "does not expose a buffer"),
    ],
)
def test_encode_rejects_what_the_protocol_forbids(args, match):
    with pytest.raises(LocalProtocolError, match=match):
        encode_frame(*args)


def test_raise_if_error():
    ok = Message(MsgType.BYE, {})
    assert raise_if_error(ok) is ok
    with pytest.raises(RemoteError) as ei:
        raise_if_error(Message(MsgType.ERROR, {"code": "auth_failed", "message": "wrong token"}))
    assert ei.value.code == "auth_failed" and ei.value.message == "wrong token"
    with pytest.raises(RemoteError) as ei:
        raise_if_error(Message(MsgType.ERROR, {"code": 5}))
    assert ei.value.code == "error"


def test_long_stream_in_uneven_chunks():
    """Hundreds of frames cut at random places: exercises the staging buffer's compaction and growth."""
    rng = np.random.default_rng(0)
    specs = [(int(rng.integers(0, 3000)), int(rng.integers(0, 200))) for _ in range(300)]
    frames = [
        encode_frame(MsgType.PUSH, {"i": i, "pad": "p" * h}, [bytes([i % 256]) * n]) for i, (n, h) in enumerate(specs)
    ]
    data = b"".join(joined(f) for f in frames)
    dec = FrameDecoder()
    got, pos = [], 0
    while pos < len(data):
        step = int(rng.choice([1, 7, 28, 100, 4000, 70000]))
        dec.feed(data[pos : pos + step])
        pos += step
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert [m.header["i"] for m in got] == list(range(300))
    assert all(bytes(m.segments[0]) == bytes([i % 256]) * specs[i][0] for i, m in enumerate(got))
