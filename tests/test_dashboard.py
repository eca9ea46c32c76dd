"""The dashboard's hub and HTTP side: JSON API, server-sent events, bounded memory, port errors."""

from __future__ import annotations

import asyncio
import json
import math
import socket

import aiohttp
import pytest
import synthetic_run

from hetero_ps.errors import ConfigError
from hetero_ps.observe.dashboard import MetricsHub, start_dashboard

TIMEOUT = 30.0  # a bound for a hung test, not a speed requirement: loaded CI machines are slow


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def strict_json(text: str):
    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name} in a dashboard answer")

    return json.loads(text, parse_constant=no_constants)


class Served:
    """A hub fed with a synthetic run, served on 127.0.0.1:0, plus an HTTP client."""

    def __init__(self, n_steps=60, **hub_kw):
        self.hub = MetricsHub(**hub_kw)
        self.job, self.steps, self.epochs, self.events = synthetic_run.feed(self.hub, n_steps)

    async def __aenter__(self):
        self.dash = await start_dashboard(self.hub, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.dash.port}"
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        await self.dash.close()

    async def get(self, path, status=200):
        async with self.http.get(self.base + path) as r:
            text = await r.text()
            assert r.status == status, text
            return strict_json(text) if r.content_type == "application/json" else text


async def read_sse(resp, want, timeout=TIMEOUT):
    """Read server-sent messages until ``want(kind, data)`` is true; returns every (kind, data) read."""
    seen, kind, data = [], None, []

    async def loop():
        nonlocal kind, data
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and kind is not None:
                msg = (kind, strict_json("\n".join(data)))
                seen.append(msg)
                kind, data = None, []
                if want(*msg):
                    return
        raise AssertionError(f"stream ended before the expected message; got {[k for k, _ in seen]}")

    await asyncio.wait_for(loop(), timeout)
    return seen


# -- hub ----------------------------------------------------------------------------------------------


def test_hub_status_derives_progress_totals_and_worker_rows():
    hub = MetricsHub()
    job, steps, epochs, events = synthetic_run.feed(hub, 60)
    st = hub.status()
    assert st["state"] == "training"
    assert st["progress"]["step"] == 60 and st["progress"]["total_steps"] == 60
    assert st["progress"]["fraction"] == 1.0
    assert st["totals"]["samples"] == sum(r["samples"] for r in steps)
    recent = steps[-20:]
    want_sps = sum(r["samples"] for r in recent) / sum(r["step_s"] for r in recent)
    assert st["totals"]["samples_per_s"] == pytest.approx(want_sps)
    assert st["totals"]["efficiency"] == pytest.approx(want_sps / synthetic_run.ideal_samples_per_s())
    slowest = sum(max(w["compute_s"] for w in r["workers"].values()) for r in steps)
    assert st["totals"]["communication_overhead"] == pytest.approx(1 - slowest / sum(r["step_s"] for r in steps))
    rows = {w["rank"]: w for w in st["workers"]}
    assert sorted(rows) == [0, 1, 2]
    last = steps[-1]
    for r, w in last["workers"].items():
        row = rows[int(r)]
        assert row["batch"] == w["batch"]
        assert row["share"] == pytest.approx(w["batch"] / last["samples"])
        assert row["samples_per_s"] == pytest.approx(w["batch"] / last["step_s"])
        assert row["status"] == "training" and row["host"] == f"node{r}.lan"
    assert sum(w["samples_per_s"] for w in rows.values()) == pytest.approx(last["samples_per_s"])
    assert rows[1]["gpu_util"] == 87.0 and rows[0]["gpu_util"] is None
    hub.finish({"samples_per_s": 1.0})
    assert hub.status()["state"] == "finished" and hub.status()["progress"]["eta_s"] == 0.0


def test_hub_worker_events_update_the_table_and_bad_fields_are_refused():
    hub = MetricsHub()
    hub.add_event({"event": "worker_joined", "step": 0, "t": 1.0, "rank": 4, "host": "h", "device": "cpu"})
    assert hub.workers()[0]["status"] == "joined" and hub.workers()[0]["device"] == "cpu"
    hub.add_event({"event": "worker_suspended", "step": 1, "t": 1.5, "rank": 4, "waited_s": 2.1, "limit_s": 2.0})
    assert hub.workers()[0]["status"] == "suspended" and hub.workers()[0]["batch"] == 0
    hub.add_step({"step": 1, "samples": 8, "step_s": 0.1, "workers": {"4": {"batch": 0}}})
    assert hub.workers()[0]["status"] == "suspended"  # a step record does not undo it; resuming does
    hub.add_event({"event": "worker_resumed", "step": 2, "t": 1.8, "rank": 4})
    assert hub.workers()[0]["status"] == "training"
    hub.add_event({"event": "worker_role", "step": 2, "t": 1.9, "rank": 4, "role": "standby", "reason": "its link"})
    assert hub.workers()[0]["status"] == "standby" and hub.workers()[0]["batch"] == 0
    hub.add_event({"event": "worker_role", "step": 2, "t": 1.9, "rank": 4, "role": "training", "reason": "fits"})
    assert hub.workers()[0]["status"] == "training"
    hub.add_event({"event": "worker_lost", "step": 3, "t": 2.0, "rank": 4, "host": "h", "reason": "timeout"})
    assert hub.workers()[0]["status"] == "lost" and hub.workers()[0]["batch"] == 0
    assert [e["seq"] for e in hub.events()] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown worker field"):
        hub.update_worker(4, speed=3)
    with pytest.raises(ValueError, match="status"):
        hub.update_worker(4, status="sleeping")
    with pytest.raises(ValueError, match="ideal"):
        hub.set_ideal(float("nan"))


def test_hub_keeps_only_the_last_steps_and_pages_them():
    hub = MetricsHub(max_steps=50)
    _, steps, _, _ = synthetic_run.feed(hub, 120)
    kept = hub.steps_since(-1)
    assert [r["step"] for r in kept] == list(range(70, 120))
    assert [r["step"] for r in hub.steps_since(100)] == list(range(101, 120))
    assert [r["step"] for r in hub.steps_since(100, limit=5)] == list(range(101, 106))
    assert hub.steps_since(119) == []
    # Totals still cover the whole run, not just what is kept.
    assert hub.status()["totals"]["steps"] == 120


def test_hub_copies_records_and_makes_them_json_safe():
    hub = MetricsHub()
    rec = {
        "step": 0,
        "epoch": 0,
        "loss": float("nan"),
        "samples": 4,
        "step_s": 0.5,
        "workers": {"0": {"batch": 4, "compute_s": float("inf")}},
    }
    hub.add_step(rec)
    rec["loss"] = 1.0  # the master reusing its dict must not change what the hub holds
    got = hub.steps_since(-1)[0]
    assert got["loss"] is None and got["workers"]["0"]["compute_s"] is None
    strict_json(json.dumps(hub.status(), allow_nan=False))


def test_slow_subscriber_never_blocks_and_stays_bounded():
    async def main():
        hub = MetricsHub(queue_size=8)
        q = hub.subscribe()
        j, steps, _, _ = synthetic_run.make_run(500)
        for rec in steps:
            hub.add_step(rec)  # synchronous: it cannot block on a subscriber
            assert q.qsize() <= 8
        kinds = []
        while not q.empty():
            kinds.append(q.get_nowait())
        # The backlog was dropped for a resync marker; the newest messages survive.
        assert any(k == "resync" for k, _ in kinds)
        assert kinds[-1][0] in ("step", "workers")
        last_step = max(p["step"] for k, p in kinds if k == "step")
        assert last_step == 499
        assert q.dropped > 0
        hub.unsubscribe(q)
        assert hub.subscribers == 0

    run(main())


# -- HTTP ---------------------------------------------------------------------------------------------


def test_json_api():
    async def main():
        async with Served(60) as s:
            st = await s.get("/api/status")
            assert st["progress"]["step"] == 60
            assert [w["rank"] for w in st["workers"]] == [0, 1, 2]
            assert st["totals"]["ideal_samples_per_s"] == synthetic_run.ideal_samples_per_s()
            assert st["job"]["experiment"] == "synthetic"
            # Paging through the steps gives each exactly once, in order.
            got, since = [], -1
            while True:
                m = await s.get(f"/api/metrics?since={since}&limit=25")
                got += m["steps"]
                since = m["last_step"]
                if not m["more"]:
                    break
            assert [r["step"] for r in got] == list(range(60))
            assert got[17] == strict_json(json.dumps(s.steps[17]))
            assert [e["epoch"] for e in m["epochs"]] == [0, 1, 2]
            ev = (await s.get("/api/events"))["events"]
            assert [e["event"] for e in ev] == [e["event"] for e in s.events]
            assert [e["seq"] for e in (await s.get("/api/events?since=3"))["events"]] == list(range(4, len(ev)))
            sched = [e for e in ev if e["event"] == "schedule"]
            assert sched and all({"policy", "sizes", "reason", "predicted_step_s"} <= set(e) for e in sched)
            await s.get("/api/metrics?since=abc", status=400)

    run(main())


def test_page_and_static_files_are_served_without_external_urls():
    async def main():
        async with Served(5) as s:
            page = await s.get("/")
            assert '<table id="workers"' in page and 'id="chart-loss"' in page
            for name in ("app.js", "charts.js", "style.css"):
                body = await s.get(f"/static/{name}")
                assert "http://" not in body and "https://" not in body, f"{name} refers to an external URL"
            assert "https://" not in page and "http://" not in page
            await s.get("/static/../server.py", status=404)
            await s.get("/static/nope.js", status=404)

    run(main())


def test_sse_delivers_a_step_pushed_after_connecting():
    async def main():
        async with Served(10) as s:
            async with s.http.get(s.base + "/api/stream") as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                hello = await read_sse(resp, lambda k, d: k == "hello")
                assert hello[-1][1]["progress"]["step"] == 10
                _, more, _, _ = synthetic_run.make_run(12)
                s.hub.add_step(more[10])
                s.hub.add_event(
                    {
                        "event": "schedule",
                        "step": 10,
                        "t": 0.0,
                        "policy": "dynamic",
                        "sizes": {"0": 1},
                        "reason": "test",
                    }
                )
                s.hub.update_worker(0, cpu_util=12.5)
                s.hub.update_worker(1, cpu_util=13.5)
                got = await read_sse(resp, lambda k, d: k == "workers")
                assert [d["step"] for k, d in got if k == "step"] == [10]
                ev = [d for k, d in got if k == "event"]
                assert len(ev) == 1 and ev[0]["reason"] == "test" and ev[0]["seq"] == len(s.events)
                # The table changed three times in one loop iteration: it is sent once, up to date.
                assert [k for k, _ in got].count("workers") == 1
                table = got[-1][1]
                assert [w["cpu_util"] for w in table] == [12.5, 13.5, 52.0]
                assert [w["batch"] for w in table] == [more[10]["workers"][str(r)]["batch"] for r in range(3)]

    run(main())


def test_stalled_http_client_does_not_grow_the_server():
    """A client that opens the stream and never reads: the hub queue stays bounded, others still get data."""

    async def main():
        async with Served(1, queue_size=16) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.dash.port)
            writer.write(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)  # headers only, then stop reading
            async with s.http.get(s.base + "/api/stream") as resp:
                await read_sse(resp, lambda k, d: k == "hello")
                assert s.hub.subscribers == 2
                _, steps, _, _ = synthetic_run.make_run(3000)
                for i, rec in enumerate(steps[1:]):
                    s.hub.add_step(rec)
                    if i % 200 == 0:
                        await asyncio.sleep(0)  # let the server run between bursts, as the master's loop would
                for q in s.hub._subs:
                    assert q.qsize() <= 16
                # The healthy client catches up: it sees the last step or is told to resync.
                got = await read_sse(resp, lambda k, d: k == "resync" or (k == "step" and d["step"] == 2999))
                assert got[-1][0] in ("resync", "step")
            writer.close()
            await writer.wait_closed()

    run(main())


def test_close_ends_open_streams():
    async def main():
        hub = MetricsHub()
        dash = await start_dashboard(hub, "127.0.0.1", 0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            async with http.get(f"http://127.0.0.1:{dash.port}/api/stream") as resp:
                await read_sse(resp, lambda k, d: k == "hello")
                assert hub.subscribers == 1
                await asyncio.wait_for(dash.close(), TIMEOUT)
                rest = await asyncio.wait_for(resp.content.read(), TIMEOUT)  # returns at end of stream
                assert b"event: step" not in rest
        assert hub.subscribers == 0
        await dash.close()  # idempotent

    run(main())


def test_port_in_use_names_the_port_and_the_flags():
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError) as ei:
                await start_dashboard(MetricsHub(), "127.0.0.1", port)
        msg = str(ei.value)
        assert str(port) in msg and "--dashboard-port" in msg and "--no-dashboard" in msg

    run(main())


def test_clean_handles_numpy_scalars():
    np = pytest.importorskip("numpy")
    hub = MetricsHub()
    hub.add_step(
        {"step": np.int64(0), "loss": np.float32(0.5), "samples": 2, "step_s": np.float64(math.nan), "workers": {}}
    )
    rec = hub.steps_since(-1)[0]
    assert rec["step"] == 0 and isinstance(rec["step"], int)
    assert rec["loss"] == 0.5 and rec["step_s"] is None
