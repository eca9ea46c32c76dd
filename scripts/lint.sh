#!/usr/bin/env bash
# The linters CI runs before the tests (scripts/test.sh): ruff (lint and format), mypy on the package
# and clang-format on csrc/. Every finding fails. Their settings: pyproject.toml, .clang-format.
# Arguments, if any, are the Python paths to check instead of the whole tree (mypy still checks
# hetero_ps).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"

rc=0
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(.)
echo "[lint] ruff check"
ruff check "${paths[@]}" || rc=1
echo "[lint] ruff format --check"
ruff format --check --output-format concise "${paths[@]}" || rc=1
echo "[lint] mypy hetero_ps"
"$PYTHON" -m mypy || rc=1
echo "[lint] clang-format csrc/"
clang-format --dry-run -Werror csrc/*.cpp csrc/*.h || rc=1
[ "$rc" -eq 0 ] && echo "[lint] clean" || echo "[lint] findings above: fix them (ruff format FILE, clang-format -i FILE)" >&2
exit "$rc"
