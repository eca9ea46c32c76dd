"""Logging set-up for the two commands (only the CLIs configure logging; modules just log)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        d = {
            "t": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def _formatter(fmt: str, role: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    f = logging.Formatter(f"%(asctime)s {role} %(levelname)s %(message)s", "%H:%M:%S")
    f.converter = time.localtime
    return f


def setup_logging(role: str, level: str = "INFO", fmt: str = "plain") -> None:
    """Console logging for ``role`` (``master`` or ``worker-N``)."""
    root = logging.getLogger()
    root.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_formatter(fmt, role))
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def set_role(role: str, fmt: str = "plain") -> None:
    """Rename this process in every log line from now on (a worker learns its rank from the master)."""
    for h in logging.getLogger().handlers:
        h.setFormatter(_formatter(fmt, role))


def add_file_log(path: str, role: str, fmt: str = "plain") -> None:
    """Also write every log record to ``path`` (the experiment's ``logs/`` folder)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    h = logging.FileHandler(path)
    h.setFormatter(_formatter(fmt, role))
    logging.getLogger().addHandler(h)


def remove_file_logs() -> None:
    """Close and detach the handlers ``add_file_log`` added (before their folder is removed)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
