#!/usr/bin/env bash
# The README's test command. On a fresh machine it creates .venv, installs the pinned packages and
# builds the extension, then runs every test and every benchmark in quick mode (once, never timed).
# Without arguments it runs the linters first (scripts/lint.sh): any finding fails the run, after
# the tests have run too, so one CI run reports both.
# Extra arguments go to pytest (e.g. scripts/test.sh -k kernels) and skip the linters.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"

# The dashboard's browser test drives Debian's Chromium; install it when we can (root + apt).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${HETERO_PS_CHROMIUM:-}" ] && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium for the dashboard's browser test"
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "[setup] could not install chromium; the browser test will say why it skips" >&2
fi

lint_rc=0
if [ $# -eq 0 ]; then
  echo "[test] linters (scripts/lint.sh)"
  bash "$ROOT/scripts/lint.sh" || lint_rc=$?
fi

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
  HETERO_PS_KERNELS=reference run_pytest -q -rfE $(ls tests/test_kernels.py tests/test_codecs.py tests/test_protocol*.py tests/test_transport.py 2>/dev/null)
fi

if [ "$lint_rc" -ne 0 ]; then
  echo "[test] the linters reported findings (scripts/lint.sh, above): failing" >&2
  exit 1
fi
