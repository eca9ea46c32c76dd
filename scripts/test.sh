#!/usr/bin/env bash
# The README's test command. On a fresh machine it creates .venv, installs the pinned packages and
# builds the extension, then runs every test and every benchmark in quick mode (once, never timed).
# Extra arguments go to pytest (e.g. scripts/test.sh -k kernels).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"

run_pytest() {
  # pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
  local rc=0
  "$PYTHON" -m pytest -p no:cacheprovider --benchmark-disable "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "[test] pytest collected no tests: failing" >&2; return 1; fi
  return "$rc"
}

echo "[test] full suite on the native kernels"
run_pytest tests benchmarks "$@"

if [ $# -eq 0 ]; then
  # The numpy twin of every kernel must carry the wire protocol and codecs on its own too.
  echo "[test] kernel, codec and protocol tests again with HETERO_PS_KERNELS=reference"
  HETERO_PS_KERNELS=reference run_pytest -q $(ls tests/test_kernels.py tests/test_codecs.py tests/test_protocol*.py tests/test_transport.py 2>/dev/null)
fi
