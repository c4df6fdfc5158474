#!/usr/bin/env bash
# Measures what renkei-agent costs on a Raspberry Pi-class box: the stripped size of the
# release-small binary (target ≤ 6 MB) and, for one site reporting to a local Mosquitto every
# second for DURATION seconds, the resident memory (target ≤ 10 MB) and CPU time. The staff web
# form is on and fetched every 10 s, as a phone at the shelter would.
#
# Usage: scripts/agent-footprint.sh [DURATION_S]      (default 60; needs /usr/sbin/mosquitto)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-60}"
MOSQUITTO=/usr/sbin/mosquitto

cargo build --profile release-small -p renkei-agent
BIN=target/release-small/renkei-agent
SIZE=$(stat -c %s "$BIN")
echo "binary: $BIN $SIZE bytes ($(awk "BEGIN{printf \"%.2f\", $SIZE/1048576}") MiB, stripped by the profile; target ≤ 6 MB)"
if rustup target list --installed 2>/dev/null | grep -q aarch64; then
  echo "aarch64 target: installed"
else
  echo "aarch64 target: not installed (the numbers above are x86_64)"
fi

WORK=$(mktemp -d)
cleanup() {
  # Wait for the agent's graceful exit: it writes its cursor and status on the way out.
  [[ -n "${AGENT_PID:-}" ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  [[ -n "${BROKER_PID:-}" ]] && kill "$BROKER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
FORM_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >/dev/null 2>&1 &
BROKER_PID=$!
sleep 0.5
cat > "$WORK/agent.toml" <<CONF
broker = "mqtt://127.0.0.1:$PORT"
ward = 131041
site = "footprint"
name = "footprint"
mode = "test"
interval = "1s"
state_dir = "$WORK/state"
evacuees = 120
capacity = 450
form_listen = "127.0.0.1:$FORM_PORT"
CONF
RUST_LOG=warn "$BIN" run --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT_PID=$!
TICKS=$(getconf CLK_TCK)
MAX_RSS=0
SUM_RSS=0
N=0
for _ in $(seq "$DURATION"); do
  sleep 1
  RSS=$(awk '/VmRSS/{print $2}' "/proc/$AGENT_PID/status")
  (( RSS > MAX_RSS )) && MAX_RSS=$RSS
  SUM_RSS=$((SUM_RSS + RSS)); N=$((N + 1))
  # A staff report every 10 s, so the outbox path is exercised too.
  if (( N % 10 == 0 )); then
    "$BIN" report --config "$WORK/agent.toml" shelter --evacuees "$N" >/dev/null
    # And the web form's page, over a plain socket (no curl needed).
    { exec 3<>"/dev/tcp/127.0.0.1/$FORM_PORT" &&
      printf 'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3 &&
      cat <&3 >/dev/null; exec 3<&-; } 2>/dev/null || echo "web form did not answer"
  fi
done
read -r UTIME STIME < <(awk '{print $14, $15}' "/proc/$AGENT_PID/stat")
CPU_S=$(awk "BEGIN{printf \"%.2f\", ($UTIME+$STIME)/$TICKS}")
echo "run: ${DURATION}s, 1 s heartbeats + a report and a web form page every 10 s"
echo "rss: max $MAX_RSS KiB, mean $((SUM_RSS / N)) KiB (target ≤ 10 MB)"
echo "cpu: $CPU_S s in ${DURATION}s ($(awk "BEGIN{printf \"%.2f\", 100*$CPU_S/$DURATION}") % of one core)"
"$BIN" status --config "$WORK/agent.toml" | sed 's/^/status: /'
