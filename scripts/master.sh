#!/usr/bin/env bash
# Start the master (rank 0) by hand, as the seed guide describes. Configure with the environment:
#   WORLD_SIZE        nodes in the job, this one included (default 2)
#   MASTER_PORT       port to listen on (default 29500)
#   HETERO_PS_TOKEN   shared secret every worker must also have (recommended)
#   HETERO_PS_TLS_CERT, HETERO_PS_TLS_KEY  TLS on every connection with this certificate and key
#                     (python -m hetero_ps.tools.tls make-cert --out certs writes a pair); same as --tls-cert/--tls-key
#   NETWORK_INTERFACE override interface detection (else default route, then wlan0, wlp*, eth0, enp*)
# Any arguments are passed to `python -m hetero_ps.server` (e.g. --model, --dataset, --epochs).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
source "$(dirname "$0")/_net.sh"
ensure_venv
cd "$ROOT"

export WORLD_SIZE="${WORLD_SIZE:-2}" MASTER_PORT="${MASTER_PORT:-29500}" RANK=0
IFACE=$(detect_interface)
export GLOO_SOCKET_IFNAME="$IFACE" NCCL_SOCKET_IFNAME="$IFACE"
MASTER_IP=$(interface_ip "$IFACE")
DEVICE=$(detect_cuda)

echo "=========================================="
echo "Master Node - Rank 0 ($(uname -s))"
echo "=========================================="
echo "Using network interface: $IFACE"
echo "Network Interface: $IFACE"
echo "Master IP: ${MASTER_IP:-unknown}"
echo "Device: $DEVICE"
echo "Waiting for $((WORLD_SIZE - 1)) workers to connect..."
TOKEN_HINT="HETERO_PS_TOKEN=<the token the master prints below> "   # it makes one when none is set
if [ -n "${HETERO_PS_TOKEN:-}" ]; then
  TOKEN_HINT="HETERO_PS_TOKEN=$HETERO_PS_TOKEN "   # the workers need the same secret
fi
TLS_HINT=""
if [ -n "${HETERO_PS_TLS_CERT:-}" ]; then   # the workers pin this certificate
  TLS_HINT="HETERO_PS_TLS_FINGERPRINT=$("$PYTHON" -m hetero_ps.tools.tls fingerprint "$HETERO_PS_TLS_CERT" || echo '<the fingerprint the master prints below>') "
fi
echo "On each worker: ${TOKEN_HINT}${TLS_HINT}RANK=<n> WORLD_SIZE=$WORLD_SIZE MASTER_ADDR=${MASTER_IP:-<this ip>} MASTER_PORT=$MASTER_PORT scripts/start_worker.sh"
echo "=========================================="
exec "$PYTHON" -m hetero_ps.server --world-size "$WORLD_SIZE" --port "$MASTER_PORT" --local-device "$DEVICE" "$@"
