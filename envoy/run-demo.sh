#!/usr/bin/env bash
# Start the demo upstream (127.0.0.1:8080), Envoy with envoy/envoy.yaml (127.0.0.1:10000, admin
# 127.0.0.1:9901) and Prometheus scraping it (127.0.0.1:9090) in the foreground. Ctrl-C stops
# them all.
#
# With "fleet": etcd on 127.0.0.1:2379 (or the one already listening there) and two Envoys
# with envoy/envoy-etcd.yaml sharing it: A on 10000 (admin 9901), B on 10001 (admin 9902).
#
# PLUGIN_CONFIG (JSON) replaces the filter's configuration in envoy/envoy.yaml ({}), e.g.
#   make run PLUGIN_CONFIG='{"outlive_client": {}}'
#
# Run from the repository root, after `make wasm` (or just use `make run` / `make run-etcd`).
set -euo pipefail

ENVOY=${ENVOY:-.venv/bin/envoy}
WASM=target/wasm32-wasip1/release/idempotency_filter.wasm
RUN_DIR=${RUN_DIR:-.run}
[[ -f $WASM ]] || { echo "missing $WASM: run 'make wasm' first" >&2; exit 1; }

pids=()
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Quiet Envoy except for the filter's own log lines (LOG_LEVEL=info for everything).
envoy() {
  "$ENVOY" "$@" --concurrency 2 --log-level "${LOG_LEVEL:-warn}" \
    --component-log-level "wasm:${WASM_LOG_LEVEL:-info}" --file-flush-interval-msec 1000 &
  pids+=($!)
}

etcd_answers() {
  curl -sf -X POST http://127.0.0.1:2379/v3/kv/range -d '{"key":"AA=="}' >/dev/null 2>&1
}

# Prometheus on 127.0.0.1:9090 scraping the demo's Envoys, with the shipped alert rules loaded
# (envoy/observability/alerts.yaml); PROMETHEUS=0 leaves it out.
prometheus() {
  [[ ${PROMETHEUS:-1} == 1 ]] || return 0
  command -v prometheus >/dev/null || { echo "no prometheus on PATH: run 'make setup'" >&2; return 0; }
  mkdir -p "$RUN_DIR/prometheus"
  cat > "$RUN_DIR/prometheus/prometheus.yml" <<YAML
global: { scrape_interval: 5s, evaluation_interval: 5s }
rule_files: [ "$PWD/envoy/observability/alerts.yaml" ]
scrape_configs:
  - job_name: envoy
    metrics_path: /stats/prometheus
    static_configs: [ { targets: [ $1 ] } ]
YAML
  command prometheus --config.file="$RUN_DIR/prometheus/prometheus.yml" \
    --storage.tsdb.path="$RUN_DIR/prometheus/data" --web.listen-address=127.0.0.1:9090 \
    > "$RUN_DIR/prometheus/prometheus.log" 2>&1 &
  pids+=($!)
  echo "Prometheus: http://127.0.0.1:9090 (alerts: http://127.0.0.1:9090/alerts), log $RUN_DIR/prometheus/prometheus.log"
}

python3 -u envoy/demo_upstream.py --port 8080 &
pids+=($!)

if [[ ${1:-} == fleet ]]; then
  if etcd_answers; then
    echo "using the etcd already listening on 127.0.0.1:2379"
  else
    etcd --name demo --data-dir "$RUN_DIR/demo-etcd" \
      --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
      --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
      --initial-cluster demo=http://127.0.0.1:2380 --auto-compaction-retention 1h \
      --log-level warn > "$RUN_DIR/demo-etcd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do etcd_answers && break; sleep 0.1; done
    etcd_answers || { echo "etcd did not start: see $RUN_DIR/demo-etcd.log" >&2; exit 1; }
  fi
  # Envoy B: the same file on the next ports.
  sed -e 's/port_value: 10000/port_value: 10001/' -e 's/port_value: 9901/port_value: 9902/' \
    envoy/envoy-etcd.yaml > "$RUN_DIR/envoy-etcd-b.yaml"
  cat <<'TRY'

Try it (in another terminal). The first request goes through Envoy A, its retry through
Envoy B: B replays A's answer from etcd (idempotent-replayed: true), and the upstream logs one
EXECUTED line.

  curl -si localhost:10000/v1/customers -H 'Authorization: Bearer ic_live_demo' \
    -H 'Idempotency-Key: fleet-1' -H 'Content-Type: application/json' \
    -d '{"externalId":"crm-7741","fullName":"Jane Doe","email":"jane@example.com"}'

  curl -si localhost:10001/v1/customers -H 'Authorization: Bearer ic_live_demo' \
    -H 'Idempotency-Key: fleet-1' -H 'Content-Type: application/json' \
    -d '{"externalId":"crm-7741","fullName":"Jane Doe","email":"jane@example.com"}'

What etcd holds (keys are hashes; nothing of the key or the credential):

  curl -s -X POST localhost:2379/v3/kv/range -d '{"key":"aWRlbXBvdGVuY3kv","range_end":"aWRlbXBvdGVuY3kw","keys_only":true}'

Counters, and the calls each Envoy made to etcd:

  curl -s 'localhost:9902/stats?filter=idempotency|cluster.etcd.upstream_rq_total'

Ctrl-C stops the Envoys, etcd and the upstream.

TRY
  prometheus "'127.0.0.1:9901', '127.0.0.1:9902'"
  envoy -c envoy/envoy-etcd.yaml
  envoy -c "$RUN_DIR/envoy-etcd-b.yaml" --base-id 1
  wait -n "${pids[@]}" || true
  exit
fi

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

Filter metrics, and the alerts Prometheus evaluates on them:

  curl -s localhost:9901/stats?filter=idempotency
  curl -s localhost:9090/api/v1/alerts

Ctrl-C stops Envoy and the upstream.

TRY

config=envoy/envoy.yaml
if [[ -n ${PLUGIN_CONFIG:-} ]]; then
  mkdir -p "$RUN_DIR"
  config=$RUN_DIR/envoy.yaml
  PLUGIN_CONFIG=$PLUGIN_CONFIG python3 -c '
import os, sys
text = open("envoy/envoy.yaml").read()
old = "value: '"'"'{}'"'"'"
assert text.count(old) == 1, "envoy/envoy.yaml: no configuration value {} to replace"
sys.stdout.write(text.replace(old, "value: %r" % os.environ["PLUGIN_CONFIG"]))' > "$config"
  echo "filter configuration: $PLUGIN_CONFIG"
fi
prometheus "'127.0.0.1:9901'"
envoy -c "$config"
# Exit as soon as any process ends (or on Ctrl-C, via the trap).
wait -n "${pids[@]}" || true
