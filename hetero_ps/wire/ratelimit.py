"""How often one address may open a connection: a token bucket per source address (docs/PROTOCOL.md, §3).

The in-flight handshake caps bound how many unauthenticated connections live at once; this bounds
how fast one host may start them, so a host that reconnects in a tight loop (a bug, a scanner, a
flood) costs the master little: each connection may cost a TLS handshake and an HMAC. A refused
connection takes no token, so clients that retry with backoff always get in once the bucket has
refilled.

The state is bounded: an address whose bucket is full again is forgotten (it is the same as never
seen), and past ``max_addresses`` the least recently seen ones go first.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class AddressRateLimiter:
    """``burst`` connections from one address at once, then ``rate`` per second."""

    def __init__(
        self, rate: float, burst: int, *, max_addresses: int = 4096, clock: Callable[[], float] = time.monotonic
    ):
        if rate <= 0 or burst < 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got rate {rate} and burst {burst}")
        self.rate, self.burst = float(rate), int(burst)
        self.max_addresses = max_addresses
        self._clock = clock
        # address -> (tokens, when they were counted); least recently seen first
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address: str) -> bool:
        """Take a token for one new connection from ``address``; False if it has none left."""
        now = self._clock()
        self._forget_idle(now)
        tokens, then = self._buckets.pop(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[address] = (tokens, now)  # now the most recently seen
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        return allowed

    def _forget_idle(self, now: float) -> None:
        # Oldest first: once one was seen too recently to be surely full again, so were all after it.
        full_after = self.burst / self.rate
        while self._buckets:
            _, then = next(iter(self._buckets.values()))
            if now - then < full_after:
                return
            self._buckets.popitem(last=False)
