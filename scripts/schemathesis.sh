#!/usr/bin/env bash
# Checks a real `retryq run` daemon against the OpenAPI document it serves
# (/v1/openapi.json), with schemathesis (from PyPI): every response must be
# documented (status, content type, body schema), and none may be a 500.
#
#   scripts/schemathesis.sh            # builds, installs schemathesis if needed, runs
#   MAX_EXAMPLES=50 scripts/schemathesis.sh
#
# The chaos transport fails every push (retried an hour later), so what the
# run creates stays there to be read back. GET /v1/events is left out: it streams until the daemon stops, which a
# request-per-example tool reads as a timeout (tests/console_api.rs covers it).
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${MAX_EXAMPLES:-25}"
TOKEN="schemathesis-token-0123456789"

if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
  python3 -m pip install -q schemathesis
fi
# Its command, found through the interpreter that has it (a fresh pyenv may
# not have its shim yet).
ST="$(python3 -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "st"))')"

cargo build -q --bin retryq -p retryq -p retryq-chaos
# Where that build went (CI and developers may set CARGO_TARGET_DIR).
TARGET="$(realpath "${CARGO_TARGET_DIR:-target}")/debug"
WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat >"$WORK/retryq.toml" <<TOML
[store]
path = "$WORK/queue.db"
[worker]
interval = "500ms"
max_attempts = 1000000
[backoff]
base = "1h"
max = "1h"
[plugins]
search_path = ["$TARGET"]
[pusher]
name = "chaos"
[pusher.settings]
failure_rate = 1.0
[admin]
listen = "127.0.0.1:$PORT"
[log]
level = "warn"
TOML

RETRYQ_ADMIN_TOKEN="$TOKEN" "$TARGET/retryq" --config "$WORK/retryq.toml" run >"$WORK/retryq.log" 2>&1 &
DAEMON=$!
cleanup() {
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

status=0
# From the scratch folder: whatever schemathesis keeps (.schemathesis/) goes
# with it, not into the work tree.
cd "$WORK"
"$ST" run "http://127.0.0.1:$PORT/v1/openapi.json" \
  --header "Authorization: Bearer $TOKEN" \
  --checks all \
  --exclude-path /v1/events \
  --max-examples "$MAX_EXAMPLES" \
  --request-timeout 10 \
  --generation-deterministic \
  --no-color || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- daemon log (last 40 lines)"
  tail -n 40 "$WORK/retryq.log"
fi
exit "$status"
