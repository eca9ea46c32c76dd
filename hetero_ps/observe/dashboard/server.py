"""The dashboard's HTTP server (aiohttp): a static page, a JSON API and a server-sent event stream.

Routes (all read-only; nothing here can change the run):

=========================== ===========================================================================
``GET /``                   the page (``static/index.html``)
``GET /static/...``         its script and style sheet
``GET /api/status``         :meth:`MetricsHub.status` — job, state, progress, totals, worker table
``GET /api/metrics``        ``?since=STEP&limit=N``: step records with ``step > STEP`` (oldest first, at
                            most N, default 2000) and every epoch record; ``more`` says whether to page on
``GET /api/events``         every event the hub still holds (``?since=SEQ`` for those after SEQ)
``GET /api/stream``         ``text/event-stream``: ``hello`` (the status) on connect, then ``step``,
                            ``epoch``, ``event``, ``workers``, ``status`` and ``resync`` messages
=========================== ===========================================================================

A client opens the stream first and then fetches ``/api/metrics`` and ``/api/events`` when it gets
``hello`` (or ``resync``): since the subscription exists before the fetch, nothing falls in between,
and records it already has are recognised by their step number / ``seq``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
from dataclasses import dataclass

from aiohttp import web

from hetero_ps.errors import ConfigError
from hetero_ps.observe.dashboard.hub import MetricsHub

log = logging.getLogger("hetero_ps.observe.dashboard")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PING_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
DEFAULT_PAGE = 2000  # step records per /api/metrics answer unless ?limit= says otherwise
MAX_PAGE = 10_000
HUB_KEY = web.AppKey("hub", MetricsHub)
STREAMS_KEY = web.AppKey("streams", set)


def _dumps(obj) -> str:
    # The hub already made everything finite; allow_nan=False turns a slip into an error, not bad JSON.
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def _json(obj) -> web.Response:
    return web.Response(text=_dumps(obj), content_type="application/json", headers={"Cache-Control": "no-store"})


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"?{name}= must be an integer, got {raw!r}") from None
    return max(lo, min(hi, v))


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-store"})


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[HUB_KEY].status())


async def _metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    since = _int_query(request, "since", -1, -1, 2**62)
    limit = _int_query(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    steps = hub.steps_since(since, limit + 1)
    more = len(steps) > limit
    steps = steps[:limit]
    return _json(
        {"steps": steps, "epochs": hub.epochs(), "more": more, "last_step": steps[-1]["step"] if steps else since}
    )


async def _events(request: web.Request) -> web.Response:
    since = _int_query(request, "since", -1, -1, 2**62)
    return _json({"events": [e for e in request.app[HUB_KEY].events() if e["seq"] > since]})


async def _stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    q = hub.subscribe()
    request.app[STREAMS_KEY].add(q)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    try:
        await resp.prepare(request)
        await resp.write(_sse("hello", hub.status()))
        while True:
            try:
                kind, payload = await asyncio.wait_for(q.get(), timeout=PING_S)
            except TimeoutError:
                await resp.write(b": ping\n\n")
                continue
            if kind == "close":
                break
            await resp.write(_sse(kind, payload))
    except ConnectionError:
        pass  # the browser went away
    finally:
        hub.unsubscribe(q)
        request.app[STREAMS_KEY].discard(q)
    return resp


def _sse(kind: str, payload) -> bytes:
    # One JSON document per message: it never contains a raw newline, so one data: line suffices.
    return f"event: {kind}\ndata: {_dumps(payload)}\n\n".encode()


def make_app(hub: MetricsHub) -> web.Application:
    app = web.Application()
    app[HUB_KEY] = hub
    app[STREAMS_KEY] = set()
    app.router.add_get("/", _index)
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/metrics", _metrics)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/api/stream", _stream)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, with a clear error when the port is taken."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"dashboard: cannot resolve host {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets a restarted master take the port out of TIME_WAIT; Linux still refuses a
        # port that another socket is listening on, which is the case we must report.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"dashboard port {port} on {host or '*'} is already in use (another master or program is "
                f"listening there): pick a free one with --dashboard-port PORT, or run without the "
                f"dashboard with --no-dashboard"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError(
                f"dashboard: not allowed to listen on port {port} (ports below 1024 need root); "
                f"use --dashboard-port with a higher port, or --no-dashboard"
            ) from None
        raise ConfigError(
            f"dashboard: cannot listen on {host}:{port}: {exc}; use --dashboard-port/--no-dashboard"
        ) from None
    return sock


@dataclass
class Dashboard:
    """A running dashboard; ``port`` is the port actually bound (useful with port 0)."""

    host: str
    port: int
    _runner: web.AppRunner
    _app: web.Application

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        """End every live stream, then stop serving (idempotent)."""
        streams = self._app[STREAMS_KEY]  # a local: inside list() mypy infers the wrong AppKey type
        for q in list(streams):
            q.offer(("close", None))
        await self._runner.cleanup()


async def start_dashboard(hub: MetricsHub, host: str = "0.0.0.0", port: int = 3000) -> Dashboard:
    """Serve ``hub`` on http://host:port/ from the running event loop; raises ConfigError if the port is taken."""
    sock = _bind(host, port)
    runner = web.AppRunner(make_app(hub), handle_signals=False, access_log=None, shutdown_timeout=2.0)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    d = Dashboard(host=host, port=sock.getsockname()[1], _runner=runner, _app=runner.app)
    if host in ("0.0.0.0", "::", ""):
        log.info("dashboard at http://<master-ip>:%d/ (every interface; locally %s)", d.port, d.url)
    else:
        log.info("dashboard at %s", d.url)
    return d
