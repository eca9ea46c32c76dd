# Sourced by the scripts: make sure .venv exists with the pinned packages and the built extension.
# Idempotent and cheap when nothing changed (stamps hold the hashes of what was installed).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HETERO_PS_VENV:-$ROOT/.venv}"

_hash() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

ensure_venv() {
  local py="${PYTHON:-python3}"
  # The pinned numpy, torch and transformers need Python 3.11 or newer: say so before pip fails.
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "[setup] hetero_ps needs Python 3.11 or newer; $py is $("$py" -V 2>&1 || echo 'not found')." \
         "Install python3.11 and run again with PYTHON=python3.11" >&2
    return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$py" -m venv "$VENV" || { echo "[setup] python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2; return 1; }
  fi
  local req_hash; req_hash=$(_hash "$ROOT/requirements.txt")
  if [ "$(cat "$VENV/.requirements.sha" 2>/dev/null)" != "$req_hash" ]; then
    echo "[setup] installing pinned packages (requirements.txt; torch is ~5 GB, a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
    echo "$req_hash" > "$VENV/.requirements.sha"
  fi
  local src_hash; src_hash=$(_hash "$ROOT"/csrc/* "$ROOT/CMakeLists.txt" "$ROOT/setup.py" "$ROOT/pyproject.toml")
  if [ "$(cat "$VENV/.build.sha" 2>/dev/null)" != "$src_hash" ] || ! "$VENV/bin/python" -c "import hetero_ps._C" 2>/dev/null; then
    echo "[setup] building the C++ extension (hetero_ps._C)"
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
    echo "$src_hash" > "$VENV/.build.sha"
  fi
  export PATH="$VENV/bin:$PATH"
  export PYTHON="$VENV/bin/python"
}
