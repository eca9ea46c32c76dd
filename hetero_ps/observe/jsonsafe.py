"""Strict JSON for records: what the experiment files and the dashboard both write.

``json.dumps(sanitize(obj), allow_nan=False)`` never fails on a record: non-finite floats (a NaN
loss) become ``null``, numpy and torch scalars become Python numbers, arrays and tensors become
lists, keys become strings, and anything else its ``str``. Kept free of torch and numpy imports:
it recognises them by their ``item``/``tolist`` methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]


def sanitize(obj: object) -> JSON:
    """A JSON-safe deep copy of ``obj`` (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    for method in ("item", "tolist"):  # a one-element numpy/torch value first, then a whole array
        fn: Callable[[], object] | None = getattr(obj, method, None)
        if callable(fn):
            try:
                return sanitize(fn())
            except (TypeError, ValueError, RuntimeError):  # torch raises RuntimeError for numel > 1
                pass
    return str(obj)


def sanitize_record(rec: Mapping[Any, Any]) -> dict[str, Any]:
    """``sanitize`` for a record (a mapping); its values typed ``Any`` for code that reads them back."""
    return {str(k): sanitize(v) for k, v in rec.items()}
