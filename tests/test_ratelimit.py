"""The per-address connection-attempt rate limit (docs/PROTOCOL.md, section 3): the bucket, and a real server."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from conftest import async_test

from hetero_ps.wire.protocol import Limits, MsgType
from hetero_ps.wire.ratelimit import AddressRateLimiter
from hetero_ps.wire.transport import connect, start_server

TOKEN = "s3cret"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_then_the_refill_rate():
    clock = Clock()
    rl = AddressRateLimiter(rate=2.0, burst=4, clock=clock)
    assert [rl.allow("10.0.0.1") for _ in range(5)] == [True] * 4 + [False]
    assert rl.allow("10.0.0.2")  # one address's flood costs the others nothing
    assert not rl.allow("10.0.0.1")  # refused attempts take no token...
    clock.t += 0.5  # ...so one refill period later exactly one more gets in
    assert rl.allow("10.0.0.1") and not rl.allow("10.0.0.1")
    clock.t += 10.0  # never more than the burst, however long it waited
    assert [rl.allow("10.0.0.1") for _ in range(5)] == [True] * 4 + [False]


def test_a_client_retrying_with_backoff_always_gets_in():
    clock = Clock()
    rl = AddressRateLimiter(rate=2.0, burst=16, clock=clock)
    # 64 clients from one address at once, each retrying after 0.2 s, doubling up to 5 s (the worker's backoff)
    delay = {i: 0.2 for i in range(64)}
    next_try = {i: 0.0 for i in range(64)}
    start, admitted = clock.t, {}
    while len(admitted) < 64:
        for i in sorted(next_try, key=next_try.get):
            if i in admitted or next_try[i] > clock.t - start:
                continue
            if rl.allow("127.0.0.1"):
                admitted[i] = clock.t - start
            else:
                next_try[i] = clock.t - start + delay[i]
                delay[i] = min(delay[i] * 2, 5.0)
        clock.t += 0.05
        assert clock.t - start < 60, f"only {len(admitted)} of 64 got in within a minute"
    assert max(admitted.values()) < (64 - 16) / 2.0 + 6  # the refill rate, plus one backoff step


def test_the_state_stays_bounded():
    clock = Clock()
    rl = AddressRateLimiter(rate=2.0, burst=16, max_addresses=100, clock=clock)
    for i in range(1000):  # a flood from many addresses
        rl.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(rl) == 100
    clock.t += 8.0  # burst / rate: every bucket is full again, the same as never seen
    rl.allow("10.9.9.9")
    assert len(rl) == 1
    with pytest.raises(ValueError):
        AddressRateLimiter(rate=0, burst=1)


def test_limits_check_the_rate_fields():
    with pytest.raises(ValueError, match="connect_rate_per_address"):
        Limits(connect_rate_per_address=-1)
    with pytest.raises(ValueError, match="connect_burst_per_address"):
        Limits(connect_burst_per_address=0)
    Limits(connect_rate_per_address=0, connect_burst_per_address=0)  # off


async def welcome(conn, hello):
    return {}


async def until_closed(conn) -> None:
    try:
        while (await conn.recv(timeout=10)).type != MsgType.BYE:
            pass
    except Exception:
        pass


async def joins(port: int) -> bool:
    conn, _ = await connect("127.0.0.1", port, token=TOKEN, hello={}, timeout=5)
    await conn.send(MsgType.BYE, {})
    await conn.close()
    return True


async def refused_at_once(port: int) -> bool:
    """Connected, then closed by the server before it read or wrote a byte."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        try:
            return await asyncio.wait_for(loop.sock_recv(s, 1), 5) == b""
        except ConnectionResetError:
            return True
    finally:
        s.close()


@async_test(30.0)
async def test_a_burst_past_the_bucket_is_refused_and_after_the_refill_one_gets_in(caplog):
    limits = Limits(connect_burst_per_address=3, connect_rate_per_address=1.0, rate_limit_loopback=True)
    async with await start_server(
        "127.0.0.1", 0, token=TOKEN, on_hello=welcome, on_connection=until_closed, limits=limits
    ) as srv:
        with caplog.at_level(logging.WARNING, logger="hetero_ps.wire.transport"):
            for _ in range(3):
                assert await joins(srv.port)
            assert await refused_at_once(srv.port)  # (a token comes back each second: this is well within it)
            assert "refusing connections from 127.0.0.1: more than 3 new connections at once" in caplog.text
            await asyncio.sleep(1.0)  # one refill period
            assert await joins(srv.port)


@async_test(30.0)
async def test_loopback_is_not_rate_limited_by_default():
    """Many workers on one machine (tests, simulations, the master's own worker) are this machine's own."""
    async with await start_server(
        "127.0.0.1", 0, token=TOKEN, on_hello=welcome, on_connection=until_closed, limits=Limits()
    ) as srv:
        assert all(await asyncio.gather(*(joins(srv.port) for _ in range(8))))
        for _ in range(Limits().connect_burst_per_address + 8):
            assert await joins(srv.port)
