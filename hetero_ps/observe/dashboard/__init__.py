"""Watching a run: live state (``MetricsHub``) and the web dashboard that shows it.

The master feeds a :class:`MetricsHub` from its asyncio loop; :func:`start_dashboard` serves it over
HTTP (JSON API + server-sent events) with a static page that draws its own charts, so a browser on
any machine that can reach ``http://<master-ip>:3000`` sees the run live with nothing fetched from
the internet.
"""

from hetero_ps.observe.dashboard.hub import MetricsHub

__all__ = ["MetricsHub", "start_dashboard", "Dashboard"]


def __getattr__(name):
    # aiohttp is imported only when the dashboard is actually served, so the hub (and the master with
    # --no-dashboard) work without it.
    if name in ("start_dashboard", "Dashboard"):
        from hetero_ps.observe.dashboard import server

        return getattr(server, name)
    raise AttributeError(name)
