#!/usr/bin/env bash
# Runs every benchmark for real (the issues' sizes, several repeats) and writes benchmarks/RESULTS.md
# with this machine's description. Extra arguments go to pytest (e.g. scripts/bench.sh -k transport);
# such a partial run writes benchmarks/RESULTS.partial.md instead.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
HETERO_PS_BENCH_FULL=1 HETERO_PS_BENCH_OUT="$out" "$PYTHON" -m pytest -p no:cacheprovider -s \
  --benchmark-disable benchmarks "$@"
# A run of selected benchmarks (any pytest argument) must not replace the tracked table with its
# few rows: it goes beside it, untracked.
dest=benchmarks/RESULTS.md
if [ $# -gt 0 ]; then dest=benchmarks/RESULTS.partial.md; fi
"$PYTHON" -m benchmarks.render_results "$out" "$dest"
echo "[bench] wrote $dest"
