"""Helpers shared by the tests (``from conftest import wait_until, read_jsonl, find``).

Tests of live runs must not depend on how fast the machine is: they poll for what the run decided
(``wait_until``) with a generous timeout instead of sleeping, read metrics files that a live
process is still appending to (``read_jsonl``), and search records by their fields (``find``)
instead of indexing a step number that depends on timing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    what: str | Callable[[], str] = "the condition",
) -> Any:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    After ``timeout`` s raises AssertionError naming ``what`` (a callable: called then, to describe
    what was seen) and the predicate's last value.
    Exceptions from the predicate propagate at once: a predicate that finds the awaited thing can
    never happen (see ``still_running``) fails the test without waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def still_running(proc, log: Callable[[], str], tail: int = 4000) -> bool:
    """True while ``proc`` (a Popen) runs; once it has exited, AssertionError with the tail of ``log()``."""
    if proc.poll() is None:
        return True
    raise AssertionError(f"the process exited with {proc.returncode} before the awaited condition:\n{log()[-tail:]}")


def read_jsonl(path, missing_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file that a live process may still be appending to.

    A last line without its newline is a record being written, not a broken one: it is skipped.
    With ``missing_ok`` a file that does not exist yet reads as no records.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    lines = text.split("\n")[:-1]  # the piece after the last newline is partial (or empty)
    return [json.loads(line) for line in lines if line.strip()]


def metrics_path(workdir, experiment: str, stream: str) -> str:
    """``<workdir>/experiments/<experiment>/metrics/<stream>.jsonl``, as a LocalCluster run writes it."""
    return os.path.join(os.fspath(workdir), "experiments", experiment, "metrics", f"{stream}.jsonl")


def _matches(rec: dict, match: dict) -> bool:
    for key, want in match.items():
        if key not in rec:
            return False
        if callable(want):
            if not want(rec[key]):
                return False
        elif rec[key] != want:
            return False
    return True


def find_all(records, **match) -> list[dict]:
    """The records whose fields equal ``match`` (a callable value is a test: ``step=lambda s: s > 3``)."""
    return [r for r in records if _matches(r, match)]


def find(records, **match) -> dict | None:
    """The first record that ``find_all`` would return, or None."""
    return next((r for r in records if _matches(r, match)), None)


def async_test(timeout: float = 15.0):
    """Run an async test in a fresh loop under ``timeout``; fail on errors the loop swallowed."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            errors = []

            async def main():
                asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
                async with asyncio.timeout(timeout):
                    await fn(*args, **kwargs)

            asyncio.run(main())
            assert not errors, f"unhandled event-loop errors: {errors}"

        return wrapper

    return deco
