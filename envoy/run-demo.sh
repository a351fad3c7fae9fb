#!/usr/bin/env bash
# Start the demo upstream (127.0.0.1:8080) and Envoy with envoy/envoy.yaml
# (127.0.0.1:10000, admin 127.0.0.1:9901) in the foreground. Ctrl-C stops both.
# Run from the repository root, after `make wasm` (or just use `make run`).
set -euo pipefail

ENVOY=${ENVOY:-.venv/bin/envoy}
WASM=target/wasm32-wasip1/release/idempotency_filter.wasm
[[ -f $WASM ]] || { echo "missing $WASM: run 'make wasm' first" >&2; exit 1; }

upstream_pid=""
envoy_pid=""
cleanup() {
  trap - EXIT INT TERM
  [[ -n $envoy_pid ]] && kill "$envoy_pid" 2>/dev/null || true
  [[ -n $upstream_pid ]] && kill "$upstream_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

python3 -u envoy/demo_upstream.py --port 8080 &
upstream_pid=$!

cat <<'TRY'

Try it (in another terminal). Run the first command twice: the second answer is
replayed by Envoy (idempotent-replayed: true) and the upstream logs no second EXECUTED line.

  curl -si localhost:10000/v1/customers -H 'Authorization: Bearer ic_live_demo' \
    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' \
    -d '{"externalId":"crm-7741","fullName":"Jane Doe","email":"jane@example.com"}'

Same key, different body -> 409 idempotency_conflict:

  curl -si localhost:10000/v1/customers -H 'Authorization: Bearer ic_live_demo' \
    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' \
    -d '{"externalId":"crm-7741","fullName":"Janet Doe"}'

Same key on a PATCH does not collide with the POST:

  curl -si -X PATCH localhost:10000/v1/customers/cus_000001 -H 'Authorization: Bearer ic_live_demo' \
    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{"email":"jane@doe.example"}'

Filter counters:

  curl -s localhost:9901/stats?filter=idempotency

Ctrl-C stops Envoy and the upstream.

TRY

# Quiet Envoy except for the filter's own log lines (LOG_LEVEL=info for everything).
"$ENVOY" -c envoy/envoy.yaml --concurrency 2 --log-level "${LOG_LEVEL:-warn}" \
  --component-log-level "wasm:${WASM_LOG_LEVEL:-info}" &
envoy_pid=$!
# Exit as soon as either process ends (or on Ctrl-C, via the trap).
wait -n "$envoy_pid" "$upstream_pid" || true
