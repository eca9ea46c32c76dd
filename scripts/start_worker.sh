#!/usr/bin/env bash
# Start a worker by hand, as the seed guide describes. Configure with the environment instead of
# editing this file:
#   RANK              this worker's rank, 1, 2, ... (default: the master assigns one)
#   WORLD_SIZE        nodes in the job (informational; the master counts)
#   MASTER_ADDR       the master's IP address (required)
#   MASTER_PORT       the master's port (default 29500)
#   HETERO_PS_TOKEN   the master's shared secret
#   HETERO_PS_TLS_FINGERPRINT  a TLS master: pin its certificate (the master prints the fingerprint), or
#   HETERO_PS_TLS_CA  a TLS master: check its certificate against this file (its cert.pem)
#   NETWORK_INTERFACE override interface detection (else the route to MASTER_ADDR, then wlan0, ...)
# Any arguments are passed to `python -m hetero_ps.worker` (e.g. --device cpu).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
source "$(dirname "$0")/_net.sh"
if [ -z "${MASTER_ADDR:-}" ]; then
  echo "MASTER_ADDR is not set: run as MASTER_ADDR=<master ip> RANK=1 $0 (the master prints its IP)" >&2
  exit 2
fi
ensure_venv
cd "$ROOT"

export MASTER_PORT="${MASTER_PORT:-29500}"
IFACE=$(detect_interface "$MASTER_ADDR")
export GLOO_SOCKET_IFNAME="$IFACE" NCCL_SOCKET_IFNAME="$IFACE"
DEVICE="${HETERO_PS_DEVICE:-$(detect_cuda)}"

echo "=========================================="
echo "Worker Node - Rank ${RANK:-auto} ($(uname -s))"
echo "=========================================="
echo "Network Interface: $IFACE ($(interface_ip "$IFACE"))"
echo "Master: $MASTER_ADDR:$MASTER_PORT"
echo "Device: $DEVICE"
echo "=========================================="
exec "$PYTHON" -m hetero_ps.worker --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --device "$DEVICE" "$@"
