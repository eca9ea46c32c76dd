"""The dashboard page in a real headless Chromium, driven over the DevTools protocol.

The page loads a synthetic run, then the test pushes more records into the hub and waits for the
page to show them without a reload (server-sent events). Chromium is the Debian package
(``apt-get install -y chromium``); the test is skipped, saying so, where it is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil

import aiohttp
import pytest
import synthetic_run

from hetero_ps.observe.dashboard import MetricsHub, start_dashboard

CHROMIUM = os.environ.get("HETERO_PS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]
TIMEOUT = 90.0  # a bound for a hung test, not a speed requirement: loaded CI machines are slow

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


class Browser:
    """A Chromium process and one page, over the DevTools protocol (a websocket of JSON messages)."""

    def __init__(self, profile_dir: str):
        self.profile_dir = profile_dir
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.exceptions: list[str] = []

    async def __aenter__(self):
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={self.profile_dir}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            ws_url = await asyncio.wait_for(self._devtools_url(), TIMEOUT)
            self.http = aiohttp.ClientSession()
            self.ws = await self.http.ws_connect(
                ws_url, max_msg_size=64 << 20, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            )
            self.reader = asyncio.create_task(self._read())
            target = (await self.send("Target.createTarget", url="about:blank"))["targetId"]
            self.session = (await self.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
            await self.page("Runtime.enable")
            await self.page("Page.enable")
            await self.page(
                "Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc):
        await self._stop()

    async def _devtools_url(self) -> str:
        # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" once it is ready.
        lines = []
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                raise RuntimeError("chromium exited before opening DevTools:\n" + "".join(lines[-20:]))
            text = line.decode(errors="replace")
            lines.append(text)
            if text.startswith("DevTools listening on "):
                asyncio.get_running_loop().create_task(self._drain_stderr())
                return text.split(" on ", 1)[1].strip()

    async def _drain_stderr(self):
        while await self.proc.stderr.readline():
            pass

    async def _read(self):
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            fut = self.waiting.pop(m.get("id"), None)
            if fut is not None and not fut.done():
                if "error" in m:
                    fut.set_exception(RuntimeError(f"DevTools error: {m['error']}"))
                else:
                    fut.set_result(m.get("result", {}))
            elif m.get("method") == "Runtime.exceptionThrown":
                d = m["params"]["exceptionDetails"]
                self.exceptions.append(d.get("exception", {}).get("description") or d.get("text"))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the DevTools connection closed"))

    async def send(self, method: str, session: str | None = None, **params):
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[i] = fut
        msg = {"id": i, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, TIMEOUT)

    async def page(self, method: str, **params):
        return await self.send(method, self.session, **params)

    async def eval(self, expression: str):
        r = await self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(
                f"{expression[:200]}...: {r['exceptionDetails'].get('exception', {}).get('description')}"
            )
        return r["result"].get("value")

    async def wait_for(self, condition: str, what: str, timeout_ms: int = 60000):
        """Wait in the page until the JS expression ``condition`` is truthy (checked every 50 ms)."""
        return await self.eval(f"""new Promise((resolve, reject) => {{
            const t0 = Date.now();
            (function check() {{
                let v; try {{ v = ({condition}); }} catch (e) {{ v = false; }}
                if (v) return resolve(v);
                if (Date.now() - t0 > {timeout_ms}) return reject(new Error("timed out waiting for: {what}"));
                setTimeout(check, 50);
            }})();
        }})""")

    async def _stop(self):
        try:
            if getattr(self, "ws", None) is not None and not self.ws.closed:
                try:
                    await asyncio.wait_for(self.send("Browser.close"), 5)
                except (TimeoutError, RuntimeError, ConnectionError):
                    pass
                await self.ws.close()
            if getattr(self, "http", None) is not None:
                await self.http.close()
            if getattr(self, "reader", None) is not None:
                await asyncio.wait_for(self.reader, 5)
        finally:
            if self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()


CHARTS = ("loss", "accuracy", "throughput", "shares", "split", "bytes")


def test_dashboard_page_shows_workers_and_charts_live(tmp_path):
    async def main():
        hub = MetricsHub()
        j, steps, epochs, events = synthetic_run.feed(hub, 60)
        dash = await start_dashboard(hub, "127.0.0.1", 0)
        try:
            async with Browser(str(tmp_path / "profile")) as b:
                await b.page("Page.navigate", url=dash.url)
                await b.wait_for(
                    "document.body.dataset.ready === '1' && document.body.dataset.steps === '60'"
                    " && document.querySelectorAll('#workers tbody tr').length === 3",
                    "the first sync",
                )
                await b.wait_for("document.getElementById('conn').classList.contains('live')", "a live stream")
                rows = await b.eval(
                    "[...document.querySelectorAll('#workers tbody tr')].map("
                    "tr => [...tr.cells].map(td => td.textContent.trim()))"
                )
                assert [r[0] for r in rows] == ["0", "1", "2"]
                assert [r[1] for r in rows] == ["node0.lan", "node1.lan", "node2.lan"]
                assert [r[2] for r in rows] == ["cpu", "cuda:0", "cpu"]
                assert all(r[3] == "training" for r in rows)
                assert [int(r[4]) for r in rows] == [steps[-1]["workers"][str(k)]["batch"] for k in range(3)]
                points = await b.eval(
                    "Object.fromEntries([...document.querySelectorAll('canvas')].map(c => [c.id, +c.dataset.points]))"
                )
                assert points["chart-loss"] == 60 + len(epochs)
                assert points["chart-accuracy"] == len(epochs)
                assert points["chart-throughput"] == 60 * 4 + 2  # 3 workers + total, and the ideal line
                assert points["chart-shares"] == 60 and points["chart-split"] == 60
                assert points["chart-bytes"] == 120
                # Decisions that keep the split are folded into the entry of the one that set it.
                sched = [e for e in events if e["event"] == "schedule"]
                changes = [e for i, e in enumerate(sched) if i == 0 or e["sizes"] != sched[i - 1]["sizes"]]
                counts = await b.eval(
                    "[...document.querySelectorAll('#timeline li[data-event=schedule]')].map(li => +li.dataset.count)"
                )
                assert len(counts) == len(changes) < len(sched) and sum(counts) == len(sched)
                await b.page(
                    "Emulation.setDeviceMetricsOverride",
                    width=1400,
                    height=int(await b.eval("document.documentElement.scrollHeight")),
                    deviceScaleFactor=1,
                    mobile=False,
                )
                shot = await b.page("Page.captureScreenshot", format="png")
                png = base64.b64decode(shot["data"])
                assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
                (tmp_path / "dashboard.png").write_bytes(png)
                if os.environ.get("HETERO_PS_SCREENSHOT"):
                    with open(os.environ["HETERO_PS_SCREENSHOT"], "wb") as f:
                        f.write(png)

                # Live: a new worker, a rebalance and a step arrive while the page is open.
                _, more, _, _ = synthetic_run.make_run(62)
                hub.add_event(
                    {"event": "worker_joined", "step": 60, "t": 0.0, "rank": 3, "host": "late.lan", "device": "cuda:1"}
                )
                hub.add_event(
                    {
                        "event": "schedule",
                        "step": 60,
                        "t": 0.0,
                        "policy": "dynamic",
                        "sizes": {"0": 30, "1": 150, "2": 12, "3": 64},
                        "reason": "rank 3 joined",
                        "predicted_step_s": 0.09,
                        "previous_predicted_s": 0.11,
                    }
                )
                rec = dict(more[60], workers=dict(more[60]["workers"], **{"3": dict(more[60]["workers"]["1"])}))
                hub.add_step(rec)
                await b.wait_for(
                    "document.body.dataset.steps === '61'"
                    " && document.querySelectorAll('#workers tbody tr').length === 4"
                    " && +document.getElementById('chart-throughput').dataset.points === 61 * 5 + 2",
                    "the live step",
                )
                reason = await b.eval("document.querySelector('#timeline li').textContent")
                assert "rank 3 joined" in reason
                assert (
                    await b.eval("document.querySelector('#workers tbody tr[data-rank=\"3\"]').cells[1].textContent")
                    == "late.lan"
                )
                assert b.exceptions == [], b.exceptions
        finally:
            await dash.close()

    asyncio.run(asyncio.wait_for(main(), 240))
