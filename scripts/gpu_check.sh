#!/usr/bin/env bash
# The GPU paths on a machine with CUDA, in a few minutes: tests/test_gpu.py (the trainer on CUDA against
# the CPU, the kernels' refusal of device tensors, the hardware profile's GPU fields and NVML, a CUDA
# worker beside a CPU worker in one BSP job with the union-batch step, throughput and the dashboard's
# GPU columns, the profiler trace of a CUDA step, a CUDA worker beside a CPU worker on the gloo plane, an
# nccl plane with a GPU per member), then the kernel, codec and collective-plane tests, and the figures
# into gpu_check.jsonl (or $1). On a machine without CUDA every GPU test skips with its reason and the
# script still passes: it says so at the end.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv
cd "$ROOT"

out="${1:-$ROOT/gpu_check.jsonl}"
: > "$out"
"$PYTHON" - "$out" <<'PY'
import json, sys, torch
info = {"check": "machine", "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
print(f"[gpu_check] torch {info['torch']}, CUDA {info['cuda']}, GPUs: {info['gpus'] or 'none'}")
open(sys.argv[1], "a").write(json.dumps(info) + "\n")
PY
collective=()  # (CI runs them on the CPU already; here for their CUDA cases)
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && collective=(tests/test_collective.py)
HETERO_PS_GPU_REPORT="$out" "$PYTHON" -m pytest -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_kernels.py \
  tests/test_codecs.py "${collective[@]}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu_check] no CUDA here: the GPU checks skipped (reasons above); figures: $out"
else
  echo "[gpu_check] done; figures: $out"
fi
