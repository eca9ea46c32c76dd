"""Reading the experiment's JSON-lines files (``metrics/*.jsonl``): the one reader every part uses.

A file may be read while its writer appends to it, or after a crash cut its last line short: a last
line without its newline is a record being written, not a broken one, so it is dropped. Anything
else that is not a JSON object is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hetero_ps.errors import DataError


def read_jsonl(path: str, required: bool = True) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a missing file is empty unless ``required``."""
    if not os.path.exists(path):
        if required:
            raise DataError(f"{path} does not exist")
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # no newline after it: the writer was interrupted
                break
            raise DataError(f"{path}:{i + 1}: not a JSON record ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out
