"""A simulated slow link: pace a worker's pushes and pulls to a given bandwidth (``--simulate-bandwidth``).

Token bucket. The link earns ``rate = mbit · 10⁶ / 8`` bytes/s of credit, up to ``burst`` bytes
(64 KiB: a short message goes out at once, as on a real link with some buffering). Every transfer
of ``n`` bytes spends ``n`` at once — after the bytes went, so the caller paces *after* each chunk —
and when the balance is negative the caller waits until it is back to zero:

    wait = max(0, −(credit − n)) / rate

Because spending happens before anyone waits, concurrent callers queue behind each other's debt,
and over any long interval ``bytes ≤ rate · seconds + burst``: the long-run rate is ``mbit`` Mbit/s.
``set_rate`` changes the bandwidth at run time (0 or None: unlimited); callers already waiting
re-plan at once with the new rate. One asyncio loop; ``reserve`` is the same accounting for code
that sleeps by itself (a thread).
"""

from __future__ import annotations

import asyncio
import math
import time

BURST_BYTES = 64 * 1024


def _rate_bytes(mbit: float | None) -> float:
    """Bytes per second for ``mbit`` Mbit/s; 0.0 means unlimited."""
    if mbit is None or mbit == 0:
        return 0.0
    mbit = float(mbit)
    if not (mbit > 0 and math.isfinite(mbit)):
        raise ValueError(f"a simulated bandwidth must be a positive number of Mbit/s (or 0 for unlimited), got {mbit}")
    return mbit * 1e6 / 8.0


class BandwidthPacer:
    """Holds a stream of transfers to ``mbit`` Mbit/s on average; see the module docstring."""

    def __init__(self, mbit: float | None, burst: int = BURST_BYTES, clock=time.monotonic):
        if burst < 0:
            raise ValueError(f"burst must be non-negative, got {burst}")
        self.burst = float(burst)
        self._clock = clock
        self._rate = _rate_bytes(mbit)
        self._credit = self.burst  # bytes that may go without waiting (negative: debt)
        self._stamp = clock()
        self._changed: asyncio.Event | None = None
        self.bytes_paced = 0  # total bytes accounted
        self.seconds_waited = 0.0  # total time callers were told to wait

    @property
    def mbit(self) -> float:
        """The current bandwidth in Mbit/s (0.0 = unlimited)."""
        return self._rate * 8.0 / 1e6

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            self._credit = min(self.burst, self._credit + (now - self._stamp) * self._rate)
        else:
            self._credit = self.burst
        self._stamp = now

    def set_rate(self, mbit: float | None) -> None:
        """Change the bandwidth now (0 or None: unlimited); waiting callers re-plan with it."""
        rate = _rate_bytes(mbit)
        self._refill()  # credit earned so far was earned at the old rate
        self._rate = rate
        if not rate:
            self._credit = self.burst  # unlimited: forgive any debt
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _debt_wait(self) -> float:
        self._refill()
        if not self._rate or self._credit >= 0:
            return 0.0
        return -self._credit / self._rate

    def reserve(self, nbytes: int) -> float:
        """Spend ``nbytes`` and return the seconds the caller should wait before its next transfer."""
        if nbytes < 0:
            raise ValueError(f"cannot pace a negative number of bytes ({nbytes})")
        self._refill()
        self.bytes_paced += nbytes
        if not self._rate:
            return 0.0
        self._credit -= nbytes
        wait = self._debt_wait()
        self.seconds_waited += wait
        return wait

    async def pace(self, nbytes: int) -> float:
        """Account ``nbytes`` just transferred and sleep until the link has caught up; returns seconds slept."""
        wait = self.reserve(nbytes)
        if wait <= 0:
            return 0.0
        t0 = self._clock()
        while wait > 0:
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=wait)
            except TimeoutError:
                pass
            wait = self._debt_wait()
        return self._clock() - t0
