"""The hetero_ps wire format, sans-I/O: frames in, messages out, no sockets and no asyncio.

A frame (all integers little-endian; docs/PROTOCOL.md is the normative description)::

    offset  size  field
         0     4  magic            b"HTPS"
         4     2  version          PROTOCOL_VERSION (1)
         6     1  message type     MsgType
         7     1  flags            bit 0: the payload checksum is present; other bits must be 0
         8     4  header length    H, bytes of msgpack header that follow the prefix (>= 1)
        12     8  payload length   P, bytes of raw payload that follow the header
        20     4  payload CRC-32C  of the P payload bytes (0 when flag bit 0 is clear)
        24     4  header CRC-32C   of prefix bytes [0, 24) followed by the H header bytes
        28     H  msgpack header   a map with str keys; key "seg" lists the segment lengths
    28 + H     P  payload          the segments, back to back

Tensor bytes only ever travel in the payload: msgpack is for small metadata (DESIGN.md measured
msgpack of a 64 MiB ``bytes`` at 0.77 GB/s, five times slower than the socket).

Two ways to decode:

* ``FrameDecoder.feed(data)`` + ``next_message()`` for tests and small data;
* ``get_buffer()`` / ``buffer_updated(n)``, which the transport uses: while a payload is being read,
  ``get_buffer`` returns a view straight into the payload's destination (from the allocator set with
  ``set_payload_allocator``), exactly as long as what is missing, so the socket writes the bytes
  where they will be used and the payload CRC is computed on each piece while it is still in cache.

Every length read from the wire is checked against ``Limits`` before anything is allocated.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hetero_ps.errors import (
    ChecksumError,
    LimitExceeded,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    UnknownMessage,
    VersionMismatch,
)
from hetero_ps.kernels import checksum

MAGIC = b"HTPS"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<4sHBBIQII")
PREFIX_SIZE = PREFIX.size  # 28
CRC_PREFIX_BYTES = 24  # the header CRC covers prefix[0:24] (everything before itself) + header
FLAG_PAYLOAD_CRC = 0x01
KNOWN_FLAGS = FLAG_PAYLOAD_CRC
SEG_KEY = "seg"  # reserved header key: the segment lengths, written by the encoder
_MAX_U32 = 2**32 - 1
_READ_CHUNK = 64 << 10  # how much a prefix/header read may ask for (bounds any over-read)


class MsgType(enum.IntEnum):
    """Message types (the prefix's type byte). docs/PROTOCOL.md lists each one's header keys."""

    HELLO = 1  # client -> server: protocol/software versions, client nonce, who I am
    CHALLENGE = 2  # server -> client: server nonce
    AUTH = 3  # client -> server: HMAC proving the client knows the token
    WELCOME = 4  # server -> client: HMAC proving the server knows the token + the job
    SCHEDULE = 5  # server -> worker: what to compute next (batch size, sample slice)
    PUSH = 6  # worker -> server: one encoded gradient chunk
    PARAMS = 7  # server -> worker: one encoded parameter chunk
    PULL = 8  # worker -> server: ask for parameters
    METRICS = 9  # worker -> server: timings and counters
    HEARTBEAT = 10  # either way: liveness
    ERROR = 11  # either way: a fatal error, the sender closes afterwards
    BYE = 12  # either way: orderly goodbye
    CONTROL = 13  # server -> worker: out-of-band commands


@dataclass(frozen=True)
class Limits:
    """Bounds on everything a peer can make us allocate or wait for.

    Lengths are bytes unless named otherwise; times are seconds. The ``max_unauth_*`` limits apply
    until the handshake has authenticated the peer (``FrameDecoder.authenticated``), capped by the
    authenticated ones.
    """

    max_header_bytes: int = 1 << 20  # msgpack header H of an authenticated peer's frame
    max_payload_bytes: int = 4 << 30  # payload P of one frame
    max_segments: int = 65536  # entries of the "seg" list
    max_str_len: int = 1 << 20  # one msgpack str in a header
    max_bin_len: int = 1 << 20  # one msgpack bin in a header
    max_array_len: int = 1 << 17  # one msgpack array (>= max_segments: "seg" is one)
    max_map_len: int = 1 << 16  # one msgpack map
    max_unauth_header_bytes: int = 64 << 10  # header H before authentication
    max_unauth_payload_bytes: int = 0  # payload P before authentication (HELLO/AUTH carry none)
    frame_timeout: float = 30.0  # a frame whose first byte arrived must finish within this...
    min_frame_rate: float = float(1 << 20)  # ...plus its size / this many bytes/s (so big frames get time)
    handshake_timeout: float = 10.0  # HELLO -> WELCOME, all of it
    max_handshakes: int = 64  # connections still in their handshake, from everyone together...
    max_handshakes_per_address: int = 8  # ...and from one address; more are closed at once
    connect_burst_per_address: int = 16  # new connections one address may open at once...
    connect_rate_per_address: float = 2.0  # ...then this many per second (0: no rate limit)
    rate_limit_loopback: bool = False  # loopback peers are this machine's own (tests, many local workers)

    def __post_init__(self) -> None:
        for name in (
            "max_header_bytes",
            "max_payload_bytes",
            "max_segments",
            "max_str_len",
            "max_bin_len",
            "max_array_len",
            "max_map_len",
            "max_unauth_header_bytes",
            "max_unauth_payload_bytes",
            "max_handshakes",
            "max_handshakes_per_address",
            "connect_burst_per_address",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {v!r}")
        if not 1 <= self.max_header_bytes <= _MAX_U32:
            raise ValueError(f"Limits.max_header_bytes must be in [1, 2**32), got {self.max_header_bytes}")
        if self.max_payload_bytes >= 2**64:
            raise ValueError("Limits.max_payload_bytes must be below 2**64 (the prefix field is a u64)")
        if self.max_array_len < self.max_segments:
            raise ValueError("Limits.max_array_len must be >= max_segments (the segment list is an array)")
        for name in ("frame_timeout", "min_frame_rate", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.connect_rate_per_address >= 0:
            raise ValueError(f"Limits.connect_rate_per_address must be >= 0, got {self.connect_rate_per_address!r}")
        if self.connect_rate_per_address and self.connect_burst_per_address < 1:
            raise ValueError("Limits.connect_burst_per_address must be >= 1 while connect_rate_per_address is on")

    def frame_deadline(self, frame_nbytes: int) -> float:
        """Seconds a frame of ``frame_nbytes`` may take once its first byte arrived."""
        return self.frame_timeout + frame_nbytes / self.min_frame_rate


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Frame:
    """An encoded frame, ready to be written (to one connection, or the same bytes to many).

    ``buffers[0]`` is the prefix + msgpack header; the rest are byte views of the caller's segments
    (not copies): they must stay unchanged until every send of this frame has finished, because the
    payload CRC in the prefix was computed when the frame was encoded.
    """

    type: MsgType
    buffers: tuple  # tuple[bytes | memoryview, ...]
    nbytes: int  # sum of the buffers' lengths: 28 + H + P


@dataclass(frozen=True)
class Message:
    """A decoded frame.

    ``header`` is the msgpack map without the reserved ``"seg"`` key; ``segments`` are memoryviews
    (format ``"B"``) into the payload buffer, in order. With a payload allocator, that buffer is the
    one it returned, so the segments are valid as long as the allocator does not reuse it.
    """

    type: MsgType
    header: dict
    segments: tuple = field(default=())  # tuple[memoryview, ...]

    @property
    def payload_nbytes(self) -> int:
        return sum(len(s) for s in self.segments)


# -- encoding ------------------------------------------------------------------------------------


def _as_bytes_view(seg: Any, i: int) -> memoryview:  # Any: whatever the caller passed, checked below
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch was imported
    if torch is not None and isinstance(seg, torch.Tensor):
        if seg.device.type != "cpu" or not seg.is_contiguous():
            raise LocalProtocolError(
                f"segment {i} is a {seg.device} tensor that is not a contiguous CPU tensor; "
                "copy it to a contiguous CPU buffer first"
            )
        seg = seg.detach().reshape(-1).view(torch.uint8).numpy()  # a view, any dtype (bfloat16 too)
    try:
        mv = memoryview(seg)
    except TypeError:
        raise LocalProtocolError(
            f"segment {i} is a {type(seg).__name__}, which does not expose a buffer; pass bytes, a bytearray, "
            "a memoryview, a numpy array or a CPU torch tensor"
        ) from None
    if not mv.c_contiguous:
        raise LocalProtocolError(f"segment {i} is not C-contiguous; copy it first (numpy.ascontiguousarray)")
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B")
        except TypeError as exc:
            raise LocalProtocolError(f"segment {i} (format {mv.format!r}) cannot be viewed as bytes: {exc}") from None
    return mv


def encode_frame(
    msg_type: int,
    header: dict,
    segments: Iterable = (),
    *,
    payload_checksum: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> Frame:
    """Encode one frame. The segments are referenced, not copied.

    ``header`` is a dict with str keys whose values are msgpack-native (str, bytes, int, float, bool,
    None, lists and dicts of those); ``"seg"`` is reserved. ``limits`` are the ones the receiver is
    expected to apply: a frame it would refuse is a ``LocalProtocolError`` here, before anything is sent.
    """
    try:
        mt = MsgType(msg_type)
    except ValueError:
        raise LocalProtocolError(f"unknown message type {msg_type!r}") from None
    if not isinstance(header, dict):
        raise LocalProtocolError(f"a frame header must be a dict, got {type(header).__name__}")
    for k in header:
        if not isinstance(k, str):
            raise LocalProtocolError(f"header keys must be str, got {k!r}")
    if SEG_KEY in header:
        raise LocalProtocolError(f'the header key "{SEG_KEY}" is reserved for the segment lengths')
    views = [_as_bytes_view(s, i) for i, s in enumerate(segments)]
    if len(views) > limits.max_segments:
        raise LocalProtocolError(f"{len(views)} segments, over the limit of {limits.max_segments}")
    seg_lens = [mv.nbytes for mv in views]
    plen = sum(seg_lens)
    if plen > limits.max_payload_bytes:
        raise LocalProtocolError(f"payload of {plen} bytes is over the limit of {limits.max_payload_bytes}")
    full = dict(header)
    if views:
        full[SEG_KEY] = seg_lens
    try:
        hbytes = msgpack.packb(full, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"{mt.name} header cannot be encoded with msgpack: {exc}") from None
    if len(hbytes) > limits.max_header_bytes:
        raise LocalProtocolError(
            f"{mt.name} header is {len(hbytes)} bytes, over the limit of "
            f"{limits.max_header_bytes}; tensor data belongs in segments"
        )
    flags, pcrc = 0, 0
    if payload_checksum:
        flags |= FLAG_PAYLOAD_CRC
        for mv in views:
            pcrc = checksum(mv, pcrc)
    head = PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(mt), flags, len(hbytes), plen, pcrc, 0)[:CRC_PREFIX_BYTES]
    hcrc = checksum(hbytes, checksum(head))
    first = head + struct.pack("<I", hcrc) + hbytes
    buffers = (first, *(mv for mv in views if mv.nbytes))
    return Frame(mt, buffers, len(first) + plen)


def raise_if_error(msg: Message) -> Message:
    """Return ``msg`` unless it is an ERROR frame, which becomes ``RemoteError(code, message)``."""
    if msg.type == MsgType.ERROR:
        code, text = msg.header.get("code"), msg.header.get("message")
        raise RemoteError(
            code if isinstance(code, str) and code else "error", text if isinstance(text, str) else repr(text)
        )
    return msg


# -- decoding ------------------------------------------------------------------------------------

_ALLOWED_SCALARS = (str, bytes, int, float, bool, type(None))


def _check_header_values(header: dict) -> None:
    """Only msgpack-native types: the unpacker's ``max_ext_len=0`` still lets a 0-byte ext through."""
    stack = [header]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, bytes)):
                    raise RemoteProtocolError(f"header map key {k!r} is not a str")
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
        elif not isinstance(v, _ALLOWED_SCALARS):
            raise RemoteProtocolError(
                f"header holds a {type(v).__name__}; only maps, arrays, str, bin, int, float, bool and nil are allowed"
            )


# decoder states
_PREFIX, _HEADER, _PAYLOAD = 0, 1, 2

PayloadAllocator = Callable[[MsgType, dict, int], "memoryview | None"]


def not_hetero_ps(start: bytes) -> RemoteProtocolError:
    """The peer does not speak this protocol; an HTTP peer is most likely the dashboard's port, a
    TLS one a node given --tls-* flags talking to one without them."""
    if start[:1] == b"\x16" and start[1:2] in (b"", b"\x03"):  # a TLS handshake record
        return RemoteProtocolError(
            f"not a hetero_ps frame: the peer speaks TLS ({start!r}) and this side does not; give the master "
            "--tls-cert and --tls-key and every worker --tls-fingerprint or --tls-ca, or give no node TLS flags"
        )
    if start.startswith((b"HTTP", b"GET ", b"POST")):
        return RemoteProtocolError(
            f"not a hetero_ps frame: the peer speaks HTTP ({start!r}), so this is a web port (the master's "
            "dashboard is on --dashboard-port, 3000 by default); point workers at the master's port "
            "(MASTER_PORT, --port, 29500 by default), which the master prints as 'listening on HOST:PORT'"
        )
    return RemoteProtocolError(
        f"not a hetero_ps frame: bad magic {start!r} instead of {MAGIC!r} (is another program talking to this port?)"
    )


class FrameDecoder:
    """Turns a byte stream into ``Message``s; one per connection and direction.

    ``authenticated`` selects the limits: before the handshake succeeds, headers may be at most
    ``max_unauth_header_bytes`` and payloads ``max_unauth_payload_bytes``. The transport sets it;
    the default (True) suits tests and trusted pipes.

    Frames are parsed lazily: frame k+1 is not parsed (and its payload not allocated) before
    ``next_message()`` has handed out frame k. So an allocator may hand out the same buffer for every
    frame, provided the consumer is done with one message before asking for the next.

    Any error is final: the stream cannot be resynchronised, and every later call raises it again.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, authenticated: bool = True):
        self.limits = limits
        self.authenticated = authenticated
        self._alloc: PayloadAllocator | None = None
        self._stage = bytearray(_READ_CHUNK)  # prefix + header bytes (and any over-read)
        self._r = 0  # unparsed bytes are _stage[_r:_w]
        self._w = 0
        self._state = _PREFIX
        self._pending: Message | None = None
        self._error: BaseException | None = None
        # the frame being decoded
        self._type = MsgType.HELLO
        self._mtype_raw = 0
        self._flags = 0
        self._hlen = 0
        self._plen = 0
        self._pcrc = 0
        self._hcrc = 0
        self._header: dict = {}
        self._seg: list = []
        self._dest: memoryview | None = None
        self._filled = 0
        self._crc = 0
        self._view_is_payload = False
        self._view_len = 0

    # -- configuration -----------------------------------------------------------------------
    def set_payload_allocator(self, fn: PayloadAllocator | None) -> None:
        """``fn(msg_type, header, nbytes)`` returns a writable byte view of ``nbytes`` (or more; it is
        cut to ``nbytes``) for the payload, or None for a fresh ``bytearray``. ``header`` has been
        checked (CRC, msgpack limits) but its values are the peer's: validate what you use."""
        self._alloc = fn

    # -- state ---------------------------------------------------------------------------------
    @property
    def mid_frame(self) -> bool:
        """True when some bytes of a frame that is not complete yet have been received."""
        return self._state != _PREFIX or self._w > self._r

    @property
    def frame_nbytes(self) -> int | None:
        """Size of the frame being decoded, once its prefix has been parsed (else None)."""
        if self._state == _PREFIX:
            return None
        return PREFIX_SIZE + self._hlen + self._plen

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, data) -> None:
        """Append received bytes (any buffer). Payload bytes are copied straight to their destination."""
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        while len(src):
            view = self.get_buffer()
            n = min(len(view), len(src))
            view[:n] = src[:n]
            view.release()
            self.buffer_updated(n)
            src = src[n:]

    def get_buffer(self) -> memoryview:
        """A writable view for the next received bytes; call ``buffer_updated(n)`` after writing n."""
        self._raise_if_dead()
        if self._state == _PAYLOAD and self._pending is None:
            dest = self._dest
            assert dest is not None, "a payload in progress has its buffer"
            view = dest[self._filled :]
            self._view_is_payload = True
        else:
            avail = self._w - self._r
            need = (PREFIX_SIZE if self._state == _PREFIX else PREFIX_SIZE + self._hlen) - avail
            free = len(self._stage) - self._w
            if free < need or free < 1024:
                self._make_room(avail, max(need, _READ_CHUNK))
                free = len(self._stage) - self._w
            view = memoryview(self._stage)[self._w : self._w + max(need, min(free, _READ_CHUNK))]
            self._view_is_payload = False
        self._view_len = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last ``get_buffer()`` view."""
        self._raise_if_dead()
        if not 0 <= nbytes <= self._view_len:
            raise LocalProtocolError(f"buffer_updated({nbytes}) but the buffer handed out was {self._view_len} bytes")
        self._view_len = 0
        if self._view_is_payload:
            if self._flags & FLAG_PAYLOAD_CRC:
                dest = self._dest
                assert dest is not None, "a payload in progress has its buffer"
                self._crc = checksum(dest[self._filled : self._filled + nbytes], self._crc)
            self._filled += nbytes
        else:
            self._w += nbytes
        self._advance()

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        self._raise_if_dead()
        self._advance()
        msg, self._pending = self._pending, None
        return msg

    # -- internals -----------------------------------------------------------------------------
    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise self._error

    def _make_room(self, avail: int, want: int) -> None:
        # Never resize in place: a view handed out earlier may still exist, and a bytearray with
        # exports cannot be resized. Moving the unread bytes to the front keeps the size.
        if self._r and len(self._stage) - avail >= want:
            self._stage[:avail] = self._stage[self._r : self._w]
        else:
            new = bytearray(max(avail + want, 2 * len(self._stage)))
            new[:avail] = self._stage[self._r : self._w]
            self._stage = new
        self._r, self._w = 0, avail

    def _advance(self) -> None:
        try:
            while self._pending is None:
                if self._state == _PREFIX:
                    if not self._parse_prefix():
                        return
                elif self._state == _HEADER:
                    if self._w - self._r < PREFIX_SIZE + self._hlen:
                        return
                    self._parse_header()
                elif self._filled < self._plen:
                    return
                else:
                    self._finish_payload()
        except Exception as exc:
            self._error = exc
            self._dest = None
            raise

    def _parse_prefix(self) -> bool:
        avail = self._w - self._r
        st = self._stage
        if avail < PREFIX_SIZE:
            # fail fast on a peer that is not speaking this protocol at all
            k = min(avail, len(MAGIC))
            if st[self._r : self._r + k] != MAGIC[:k]:
                raise not_hetero_ps(bytes(st[self._r : self._r + k]))
            return False
        magic, version, mtype, flags, hlen, plen, pcrc, hcrc = PREFIX.unpack_from(st, self._r)
        if magic != MAGIC:
            raise not_hetero_ps(bytes(magic))
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"the peer speaks hetero_ps protocol version {version}, this side speaks "
                f"version {PROTOCOL_VERSION}; install the same hetero_ps version on every node"
            )
        if flags & ~KNOWN_FLAGS:
            raise RemoteProtocolError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x} in the frame prefix")
        if not flags & FLAG_PAYLOAD_CRC and pcrc:
            raise RemoteProtocolError("payload CRC field is set but the checksum flag is clear")
        lim = self.limits
        max_h, max_p = lim.max_header_bytes, lim.max_payload_bytes
        if not self.authenticated:
            max_h, max_p = min(max_h, lim.max_unauth_header_bytes), min(max_p, lim.max_unauth_payload_bytes)
        phase = "" if self.authenticated else " before authentication"
        if hlen == 0:
            raise RemoteProtocolError("frame has an empty header (a msgpack map is required)")
        if hlen > max_h:
            raise LimitExceeded(f"frame header of {hlen} bytes is over the limit of {max_h}{phase}")
        if plen > max_p:
            raise LimitExceeded(f"frame payload of {plen} bytes is over the limit of {max_p}{phase}")
        self._mtype_raw, self._flags, self._hlen, self._plen = mtype, flags, hlen, plen
        self._pcrc, self._hcrc = pcrc, hcrc
        self._state = _HEADER  # _r stays at the frame start: the header CRC covers the prefix
        return True

    def _parse_header(self) -> None:
        lim = self.limits
        st = memoryview(self._stage)
        hstart = self._r + PREFIX_SIZE
        hview = st[hstart : hstart + self._hlen]
        crc = checksum(hview, checksum(st[self._r : self._r + CRC_PREFIX_BYTES]))
        if crc != self._hcrc:
            raise ChecksumError(
                f"frame header checksum mismatch (got 0x{self._hcrc:08x}, computed 0x{crc:08x}): "
                "the bytes were corrupted on the way"
            )
        try:
            self._type = MsgType(self._mtype_raw)
        except ValueError:
            raise UnknownMessage(f"unknown message type {self._mtype_raw} (this side knows 1-{max(MsgType)})") from None
        try:
            header = msgpack.unpackb(
                hview,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=lim.max_str_len,
                max_bin_len=lim.max_bin_len,
                max_array_len=lim.max_array_len,
                max_map_len=lim.max_map_len,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises ValueError subclasses, OutOfData, TypeError...
            text = str(exc)
            if "max_ext_len" in text:
                raise RemoteProtocolError(
                    f"{self._type.name} header holds a msgpack ext type; none is allowed"
                ) from None
            if "exceeds max" in text:
                raise LimitExceeded(f"{self._type.name} header: {text}") from None
            raise RemoteProtocolError(
                f"{self._type.name} header is not valid msgpack: {type(exc).__name__}: {text}"
            ) from None
        finally:
            hview.release()
            st.release()
        if not isinstance(header, dict):
            raise RemoteProtocolError(f"{self._type.name} header is a {type(header).__name__}, not a map")
        for k in header:
            if not isinstance(k, str):
                raise RemoteProtocolError(f"{self._type.name} header key {k!r} is not a str")
        _check_header_values(header)
        seg = header.pop(SEG_KEY, None)
        if seg is None:
            if self._plen:
                raise RemoteProtocolError(f'{self._type.name} frame has a payload but no "{SEG_KEY}" header key')
            seg = []
        elif (
            not isinstance(seg, list) or len(seg) > lim.max_segments or not all(type(x) is int and x >= 0 for x in seg)
        ):
            if isinstance(seg, list) and len(seg) > lim.max_segments:
                raise LimitExceeded(f"{len(seg)} segments, over the limit of {lim.max_segments}")
            raise RemoteProtocolError(f'"{SEG_KEY}" must be a list of non-negative ints')
        if sum(seg) != self._plen:
            raise RemoteProtocolError(f"segment lengths sum to {sum(seg)} but the payload is {self._plen} bytes")
        self._r += PREFIX_SIZE + self._hlen
        self._header, self._seg = header, seg
        if self._plen == 0:
            self._complete(memoryview(b""))
            return
        self._dest = self._allocate()
        self._filled, self._crc = 0, 0
        self._state = _PAYLOAD
        # bytes already read past the header (over-read) go to the destination first
        k = min(self._w - self._r, self._plen)
        if k:
            self._dest[:k] = self._stage[self._r : self._r + k]
            if self._flags & FLAG_PAYLOAD_CRC:
                self._crc = checksum(self._dest[:k])
            self._r += k
            self._filled = k

    def _allocate(self) -> memoryview:
        n = self._plen
        view = self._alloc(self._type, self._header, n) if self._alloc is not None else None
        if view is None:
            return memoryview(bytearray(n))
        try:
            mv = memoryview(view)
        except TypeError:
            raise LocalProtocolError(f"the payload allocator returned a {type(view).__name__}, not a buffer") from None
        if mv.readonly or not mv.c_contiguous:
            raise LocalProtocolError("the payload allocator must return a writable, C-contiguous buffer")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.nbytes < n:
            raise LocalProtocolError(f"the payload allocator returned {mv.nbytes} bytes for a {n}-byte payload")
        return mv[:n]

    def _finish_payload(self) -> None:
        if self._flags & FLAG_PAYLOAD_CRC and self._crc != self._pcrc:
            raise ChecksumError(
                f"{self._type.name} payload checksum mismatch (got 0x{self._pcrc:08x}, "
                f"computed 0x{self._crc:08x}): the bytes were corrupted on the way"
            )
        dest, self._dest = self._dest, None
        assert dest is not None, "a payload in progress has its buffer"
        self._complete(dest)

    def _complete(self, payload: memoryview) -> None:
        segs, off = [], 0
        for n in self._seg:
            segs.append(payload[off : off + n])
            off += n
        self._pending = Message(self._type, self._header, tuple(segs))
        self._state = _PREFIX
        self._header, self._seg = {}, []
        if self._w == self._r:
            self._r = self._w = 0
