"""This machine as the bench uses it: the binaries it runs, the CPUs it pins them to, and the
system's units."""

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
ENVOY = Path(os.environ.get("ENVOY", ROOT / ".venv" / "bin" / "envoy"))
FILTER_WASM = Path(os.environ.get(
    "FILTER_WASM", ROOT / "target" / "wasm32-wasip1" / "release" / "idempotency_filter.wasm"))
# This filter as it was before its gauges, histograms and access-log facts (make bench builds
# it from the history): what they cost is the filter's CPU above it.
UNOBSERVED_WASM = Path(os.environ.get(
    "UNOBSERVED_WASM", ROOT / "bench" / ".target" / "unobserved" / "idempotency_filter.wasm"))
EMPTY_WASM = Path(os.environ.get(
    "EMPTY_WASM", BENCH / ".target" / "wasm32-wasip1" / "release" / "empty_filter.wasm"))
PROBE_WASM = Path(os.environ.get(
    "PROBE_WASM", BENCH / ".target" / "wasm32-wasip1" / "release" / "probe_filter.wasm"))
# The floor variant's probe: buckets of the filter's size (16 entries of 71 B and a header), as
# many as the bench's table has (250,000 records).
FLOOR_PROBE = "op=floor phase=body size=1140 buckets=15625"

PROXY_CPU = "0"
LOAD_CPU = "1"
# wrk connections: enough to keep one proxy worker busy through the upstream's round trips.
CONNECTIONS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
