#!/usr/bin/env bash
# Cross-agent throughput on loopback, one run, side by side: iperf3 straight to its server;
# through two agents of the same cluster (HBONE over TCP); through two agents of different
# clusters (HBONE inside P2P QUIC, direct path). Prints Gbit/s and the ratios.
# usage: bench/p2p_bench.sh [path/to/weft] [seconds]
set -euo pipefail
WEFT=$(realpath "${1:-build/release/weft}")
SECS=${2:-5}
PY=/usr/bin/python3
work=$(mktemp -d /tmp/weft-p2pbench-XXXXXX)
pids=()
cleanup() {
  # run_pair runs in a subshell ($(...)), so its agents are listed in a file.
  for p in "${pids[@]}" $(cat "$work/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_file() { for _ in $(seq 1000); do [ -s "$1" ] && return 0; sleep 0.02; done; echo "timed out waiting for $1" >&2; exit 1; }
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gbps() { $PY -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$1"; }
cd "$work"

"$WEFT" ca init --trust-domain bench.local --out ca >/dev/null
"$WEFT" control --ca ca --data-dir control --listen 127.0.0.1:0 --address-file control.addr \
  --stun-listen 127.0.0.1:0 --relay-listen 127.0.0.1:0 --heartbeat-interval 1s > control.log 2>&1 & pids+=($!)
wait_file control.addr
CONTROL=https://$(cat control.addr)
TOKEN=$(cat control/admin.token)
KEY=$("$WEFT" control keys create --data-dir control --ttl 10m --reusable 2>/dev/null)
IPERF_PORT=$(free_port)
iperf3 -s -p "$IPERF_PORT" -B 127.0.0.1 > iperf-server.log 2>&1 & pids+=($!)

run_pair() {  # label cluster-of-client [agent flags]; prints Gbit/s
  local label=$1 client_cluster=$2 extra=${3:-} mesh_port
  mesh_port=$(free_port)
  "$WEFT" agent --control "$CONTROL" --control-ca ca/ca.crt --auth-key "$KEY" --state "srv-$label" \
    --name "srv-$label" --cluster-id server --port 0 --address-file "srv-$label.addr" \
    --hbone-listen 127.0.0.1:0 --quic-port 0 --heartbeat-interval 1s \
    --proxies "$mesh_port:127.0.0.1:$IPERF_PORT" $extra > "srv-$label.log" 2>&1 & echo $! >> pids
  "$WEFT" agent --control "$CONTROL" --control-ca ca/ca.crt --auth-key "$KEY" --state "cli-$label" \
    --name "cli-$label" --cluster-id "$client_cluster" --port 0 --address-file "cli-$label.addr" \
    --hbone-listen 127.0.0.1:0 --quic-port 0 --heartbeat-interval 1s \
    --resource-address 127.0.0.4 $extra > "cli-$label.log" 2>&1 & echo $! >> pids
  wait_file "srv-$label.addr"; wait_file "cli-$label.addr"
  curl -s --cacert ca/ca.crt -H "Authorization: Bearer $TOKEN" -X PUT "$CONTROL/v1/policies/p-$label" \
    -d "{\"service\":\"proxy-$mesh_port\",\"allow\":[\"spiffe://bench.local/cluster/$client_cluster/*\"]}" >/dev/null
  measure 127.0.0.4 "$mesh_port" "$label.json"
  gbps "$label.json"
}

measure() {  # host port out.json: retries while the server is busy or not yet listening
  for _ in $(seq 100); do
    iperf3 -c "$1" -p "$2" -t "$SECS" -J > "$3" 2>/dev/null || true
    grep -q '"sum_received"' "$3" && return 0
    sleep 0.2
  done
  echo "iperf3 to $1:$2 never ran" >&2; exit 1
}
measure 127.0.0.1 "$IPERF_PORT" direct.json
DIRECT=$(gbps direct.json)
HBONE=$(run_pair hbone server)   # same cluster: HBONE over TCP between the agents' data planes
QUIC=$(run_pair quic east)       # other cluster: HBONE inside P2P QUIC
RELAY=$(run_pair relay west "--p2p-paths relay-only")  # other cluster, through control's relay
PATH_NOW=$(curl -s "http://$(cat cli-quic.addr)/status" | $PY -c 'import json,sys; print(",".join(p["path"] for p in json.load(sys.stdin)["p2p"]["peers"]))')
echo "| path (loopback, iperf3 ${SECS}s, 1 stream) | Gbit/s | vs direct |"
echo "|---|---|---|"
echo "| direct, no tunnel | $DIRECT | 1.00 |"
echo "| two agents, same cluster: HBONE (mTLS, HTTP/2) | $HBONE | $($PY -c "print('%.2f' % ($HBONE/$DIRECT))") |"
echo "| two agents, other clusters: HBONE inside P2P QUIC ($PATH_NOW path) | $QUIC | $($PY -c "print('%.2f' % ($QUIC/$DIRECT))") |"
echo "| two agents, other clusters: HBONE inside P2P QUIC, relay only | $RELAY | $($PY -c "print('%.2f' % ($RELAY/$DIRECT))") |"
echo
echo "control's relay after the run:"
curl -s --cacert ca/ca.crt -H "Authorization: Bearer $TOKEN" "$CONTROL/metrics" | grep '^weft_relay' || true
