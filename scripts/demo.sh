#!/usr/bin/env bash
# The README's run command. On a fresh machine it sets itself up (.venv, pinned packages, the C++
# build), then runs a small heterogeneous cluster on 127.0.0.1: a master and two workers, one of them
# slowed 3x, training simple_cnn on scikit-learn's digits with dynamic load balancing. It prints
# where the experiment is and its summary, checks the accuracy, and stops every process it started.
# Extra arguments go to the master (e.g. scripts/demo.sh --epochs 3 --compression int8); an
# --experiment NAME or --experiments-dir DIR among them is honoured (the workers log there too).
# DEMO_EPOCHS sets the default epoch count, DEMO_MIN_ACCURACY the accuracy the demo insists on (0.95).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"

NAME="demo-$(date +%Y%m%d-%H%M%S)"
EXP_ROOT=experiments
# The last --experiment / --experiments-dir wins (argparse's rule), so read them the same way.
prev=""
for arg in "$@"; do
  case "$prev" in
    --experiment) NAME="$arg" ;;
    --experiments-dir) EXP_ROOT="$arg" ;;
  esac
  case "$arg" in
    --experiment=*) NAME="${arg#*=}" ;;
    --experiments-dir=*) EXP_ROOT="${arg#*=}" ;;
  esac
  prev="$arg"
done
RUN_DIR=$(mktemp -d)
export HETERO_PS_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM

"$PYTHON" -m hetero_ps.server --host 127.0.0.1 --port 0 --port-file "$RUN_DIR/port" \
  --world-size 3 --no-local-worker --model simple_cnn --dataset digits \
  --global-batch-size 64 --epochs "${DEMO_EPOCHS:-10}" --lr 0.05 --optimizer momentum --lr-schedule cosine \
  --enable-load-balancing --load-balance-policy dynamic --rebalance-interval 5 \
  --experiment "$NAME" "$@" > >(tee "$RUN_DIR/master.out") &
MASTER=$!
PIDS+=("$MASTER")
for _ in $(seq 300); do [ -s "$RUN_DIR/port" ] && break; kill -0 "$MASTER" 2>/dev/null || break; sleep 0.2; done
[ -s "$RUN_DIR/port" ] || { echo "[demo] the master did not start" >&2; exit 1; }
PORT=$(cat "$RUN_DIR/port")
"$PYTHON" -m hetero_ps.worker --master-addr 127.0.0.1 --master-port "$PORT" --rank 1 --torch-threads 1 \
  --experiments-dir "$EXP_ROOT" &
PIDS+=("$!")
"$PYTHON" -m hetero_ps.worker --master-addr 127.0.0.1 --master-port "$PORT" --rank 2 --torch-threads 1 \
  --experiments-dir "$EXP_ROOT" --simulate-slowdown 3 &
PIDS+=("$!")

rc=0
wait "$MASTER" || rc=$?
[ "$rc" -eq 0 ] || { echo "[demo] the master exited with status $rc" >&2; exit "$rc"; }
# The master says where the run went: a name that already holds a run gets a -2, -3, ... suffix.
EXP=$(sed -n 's/^hetero_ps master listening on .*; experiment //p' "$RUN_DIR/master.out" | tail -n1)
[ -n "$EXP" ] || EXP="$EXP_ROOT/$NAME"
echo
echo "[demo] experiment written to $EXP (config.json, logs/, metrics/, summary.json, model.pt)"
"$PYTHON" - "$EXP/summary.json" "${DEMO_MIN_ACCURACY:-0.95}" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
acc, need = s["final_eval_accuracy"], float(sys.argv[2])
print(f"[demo] {s['steps']} steps, {s['samples_per_s']:.0f} samples/s, final test accuracy {100 * acc:.2f} %")
if acc < need:
    print(f"[demo] accuracy below the {100 * need:.0f} % the demo expects", file=sys.stderr)
sys.exit(0 if acc >= need else 1)
PY
