"""The dashboard of a real 2-worker run, in a real headless Chromium (issue: watching a run)."""

from __future__ import annotations

import asyncio
import base64
import os
import re

import pytest
from conftest import metrics_path, read_jsonl, still_running, wait_until
from test_dashboard_browser import CHROMIUM, Browser

from hetero_ps.testing import LocalCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]


def _wait_for_dashboard(c: LocalCluster, timeout: float = 120.0) -> str:
    """The dashboard's URL, once the run has logged 10 steps (so the page has history to draw)."""

    def ready():
        still_running(c.server, lambda: c.output("server"))
        m = re.search(r"dashboard: (http://\S+)", c.output("server"))
        return m and len(read_jsonl(metrics_path(c.workdir, "dash", "steps"), missing_ok=True)) >= 10 and m.group(1)

    return wait_until(ready, timeout, what="the dashboard and 10 steps")


def test_dashboard_of_a_two_worker_run(tmp_path):
    # Far more epochs than the test needs: it stops the run when it has looked, so the run is still
    # training (rows say "training", new steps arrive) however slow or fast the machine is.
    args = [
        "--world-size",
        "3",
        "--no-local-worker",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--epochs",
        "10000",
        "--enable-load-balancing",
        "--rebalance-interval",
        "5",
        "--experiment",
        "dash",
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2", "--simulate-slowdown", "2"]]) as c:
        url = _wait_for_dashboard(c)

        async def look():
            async with Browser(str(tmp_path / "profile")) as b:
                await b.page("Page.navigate", url=url)
                await b.wait_for(
                    "document.body.dataset.ready === '1' && "
                    "document.querySelectorAll('#workers tbody tr').length === 2",
                    "both workers",
                )
                # Live: more steps arrive over the stream while the page is open.
                first = int(await b.eval("document.body.dataset.steps"))
                await b.wait_for(f"+document.body.dataset.steps > {first + 5}", "live steps")
                rows = await b.eval(
                    "[...document.querySelectorAll('#workers tbody tr')].map("
                    "tr => [...tr.cells].map(td => td.textContent.trim()))"
                )
                points = await b.eval(
                    "Object.fromEntries([...document.querySelectorAll('canvas')].map(c => [c.id, +c.dataset.points]))"
                )
                await b.page(
                    "Emulation.setDeviceMetricsOverride",
                    width=1400,
                    height=int(await b.eval("document.documentElement.scrollHeight")),
                    deviceScaleFactor=1,
                    mobile=False,
                )
                shot = await b.page("Page.captureScreenshot", format="png")
                return rows, points, base64.b64decode(shot["data"]), b.exceptions

        rows, points, png, exceptions = asyncio.run(asyncio.wait_for(look(), 150))
    assert [r[0] for r in rows] == ["1", "2"] and all(r[3] == "training" for r in rows), rows
    for chart in ("chart-loss", "chart-throughput", "chart-shares", "chart-split", "chart-bytes"):
        assert points[chart] > 0, (chart, points)
    assert not exceptions, exceptions
    (tmp_path / "dashboard.png").write_bytes(png)
    if os.environ.get("HETERO_PS_SCREENSHOT"):
        with open(os.environ["HETERO_PS_SCREENSHOT"], "wb") as f:
            f.write(png)
