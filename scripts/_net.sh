# Sourced by master.sh and start_worker.sh: network interface, IP and CUDA detection, as the seed
# guide describes. Every function prints its answer; nothing here needs root.

# detect_interface [TARGET]: the interface to use.
#   1. $NETWORK_INTERFACE if set (the manual override);
#   2. with TARGET (a worker, given MASTER_ADDR): the interface of the route to it (ip route get);
#      without (the master): the interface of the default route;
#   3. the guide's order: wlan0, wlp*, eth0, enp*; 4. lo.
detect_interface() {
  if [ -n "${NETWORK_INTERFACE:-}" ]; then echo "$NETWORK_INTERFACE"; return; fi
  local dev=""
  if [ -n "${1:-}" ]; then
    dev=$(ip route get "$1" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
  else
    dev=$(ip route show default 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
  fi
  if [ -n "$dev" ]; then echo "$dev"; return; fi
  local pat name
  for pat in wlan0 'wlp*' eth0 'enp*'; do
    for name in /sys/class/net/$pat; do
      [ -e "$name" ] && { basename "$name"; return; }
    done
  done
  echo lo
}

# interface_ip IFACE: its first IPv4 address (empty if none).
interface_ip() {
  ip -4 -o addr show dev "$1" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1
}

# detect_cuda: exports CUDA_HOME/PATH/LD_LIBRARY_PATH from the newest /usr/local/cuda*, prints
# "cuda" when torch can use a GPU, else "cpu" (the fallback the guide promises).
detect_cuda() {
  local d
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -d "$d/bin" ]; then
      export CUDA_HOME="$d" PATH="$d/bin:$PATH" LD_LIBRARY_PATH="$d/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
  if "${PYTHON:-python3}" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo cuda
  else
    echo cpu
  fi
}
