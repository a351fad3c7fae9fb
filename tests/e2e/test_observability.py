"""What an operator's Prometheus and Grafana see: a real Prometheus (Debian's) scrapes a real
Envoy running the filter under traffic, with the shipped alert rules loaded, and every query of
the shipped Grafana dashboard (envoy/observability/dashboard.json) returns data from it."""

import json
import math
import re
import time

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, exported_series, wait_for
from support.client import call, unique_path
from support.envoy import Envoy
from support.processes import ROOT
from support.prometheus import Prometheus

DASHBOARD = ROOT / "envoy" / "observability" / "dashboard.json"
# A table of one bucket whose records may be evicted 2 s after they are stored (half their ttl),
# so that the traffic below shows evictions and the real retry window.
SMALL_STORE = {"capacity_records": 16, "max_share": 1, "ttl": "4s"}


def dashboard_queries():
    """(panel title, PromQL) for every target, with Grafana's variables as Grafana would fill
    them for every Envoy over a short range."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"].replace("$__rate_interval", "30s").replace("$instance", ".*"))
            for panel in panels for target in panel["targets"]]


@pytest.fixture(scope="module")
def scraped(run_dir, upstream):
    """An Envoy with the filter after traffic of every common outcome, and a Prometheus that has
    scraped it through that traffic."""
    envoy = Envoy(run_dir / "observed", SMALL_STORE, upstream.port).start()
    prometheus = Prometheus(run_dir / "prometheus", [envoy]).start()
    try:
        path = unique_path()
        # Twelve records fill most of the one bucket; twelve more, past the grace, evict them.
        keys = [f"observed-{n}-{path[-8:]}" for n in range(24)]
        for key in keys[:12]:
            original = call(envoy, key, path=path)
            assert_original(original)
            assert_replay_of(call(envoy, key, path=path), original)
        assert_problem(call(envoy, keys[0], path=path, body=b"{}"), 409, "idempotency_conflict")
        time.sleep(2.5)  # past the eviction grace of the first records
        for key in keys[12:]:
            assert_original(call(envoy, key, path=path))
        assert wait_for(lambda: envoy.counter("idempotency.evicted") > 0)
        # Two scrapes after the last request, so that every rate sees it.
        time.sleep(2.5)
        yield envoy, prometheus
    finally:
        prometheus.stop()
        envoy.stop()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped):
    _, prometheus = scraped
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
    assert empty == [], empty


def test_the_dashboard_s_figures_say_what_the_traffic_did(scraped):
    _, prometheus = scraped
    queries = dict((title, expr) for title, expr in dashboard_queries())

    def value(title):
        (sample,) = prometheus.query(queries[title])
        return float(sample["value"][1])
    assert 0.2 < value("Replay ratio") < 0.5, "12 replays beside 24 first attempts"
    window = value("Real retry window")
    assert not math.isnan(window) and 2 <= window < 30, window


def test_no_dashboard_query_names_a_metric_the_filter_does_not_export():
    exported = exported_series()
    for title, expr in dashboard_queries():
        named = set(re.findall(r"\bidempotency_[a-z_]+", expr))
        assert named and named <= exported, (title, named - exported)


def test_prometheus_loads_every_shipped_alert_rule(scraped):
    _, prometheus = scraped
    shipped = re.findall(r"^ *- alert: (\w+)", (ROOT / "envoy" / "observability" / "alerts.yaml").read_text(),
                         re.MULTILINE)
    assert len(shipped) >= 8 and prometheus.rule_names() == set(shipped)
