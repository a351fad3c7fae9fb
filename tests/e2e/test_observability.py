"""What an operator's Prometheus and Grafana see: a real Prometheus (Debian's) scrapes a real
Envoy running the filter under traffic, with the shipped alert rules loaded, and every query of
the shipped Grafana dashboard (envoy/observability/dashboard.json) returns data from it."""

import json
import math
import os
import re
import signal
import subprocess
import time

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, exported_series, wait_for
from support.client import burst, call, in_background, unique_path
from support.envoy import ENVOY_BIN, Envoy
from support.etcd import EtcdEnvoy, Started, fleet_config
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
    """An Envoy with the filter after traffic of every common outcome (evictions and a waiting
    duplicate among them), one on etcd after a burst, and a Prometheus that has scraped both
    through that traffic."""
    with Started(run_dir, []) as started:
        envoy = Envoy(run_dir / "observed", SMALL_STORE, upstream.port).start()
        fleet = EtcdEnvoy(run_dir / "observed-etcd", fleet_config(), upstream.port,
                          started.etcd("observed")).start()
        prometheus = Prometheus(run_dir / "prometheus", [envoy, fleet]).start()
        try:
            path = unique_path()
            # Twelve records fill most of the one bucket; twelve more, past the grace, evict them.
            keys = [f"observed-{n}-{path[-8:]}" for n in range(24)]
            for key in keys[:12]:
                original = call(envoy, key, path=path)
                assert_original(original)
                assert_replay_of(call(envoy, key, path=path), original)
            assert_problem(call(envoy, keys[0], path=path, body=b"{}"), 409, "idempotency_conflict")
            slow, box = in_background(lambda: call(envoy, keys[12], path=path,
                                                   headers=[("x-test-delay-ms", "300")]))
            assert wait_for(lambda: upstream.count(key=keys[12]) == 1)
            assert_replay_of(call(envoy, keys[12], path=path), slow.join() or box["result"])
            burst(16, lambda i: assert_original(call(fleet, f"{keys[i]}-fleet", path=path)))
            time.sleep(2.5)  # past the eviction grace of the first records
            for key in keys[13:]:
                assert_original(call(envoy, key, path=path))
            assert wait_for(lambda: envoy.counter("idempotency.evicted") > 0)
            # Two scrapes after the last request and the last histogram flush, so that every
            # rate sees them.
            time.sleep(2.5)
            yield envoy, fleet, prometheus
        finally:
            prometheus.stop()
            envoy.stop()
            fleet.stop()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped):
    *_, prometheus = scraped
    queries = dashboard_queries()
    assert len(queries) >= 30
    # A query answers NaN where a ratio or quantile has nothing to divide: that is no data.
    empty = [(title, expr) for title, expr in queries
             if all(math.isnan(float(sample["value"][1])) for sample in prometheus.query(expr))]
    assert empty == [], empty


def test_the_dashboard_s_figures_say_what_the_traffic_did(scraped):
    envoy, fleet, prometheus = scraped
    queries = {}
    for title, expr in dashboard_queries():
        queries.setdefault(title, []).append(expr)

    def value(title, of=envoy, target=0):
        instance = f"127.0.0.1:{of.admin_port}"
        (sample,) = [sample for sample in prometheus.query(queries[title][target])
                     if sample["metric"]["instance"] == instance]
        return float(sample["value"][1])
    assert 0.2 < value("Replay ratio") < 0.5, "13 replays beside 24 first attempts"
    window = value("Real retry window")
    assert not math.isnan(window) and 2 <= window < 30, window
    assert 0 < value("Store fill") <= 1, "records of the traffic, in a table of 16"
    # The duplicate waited for the rest of its original's 300 ms, in milliseconds.
    assert 50 < value("Duplicates' waits", target=1) < 10_000
    # Each claim, then each finish, went out in a call, or several in one.
    assert 1 <= value("etcd batching and queues", of=fleet) <= 16
    assert 20 < value("etcd call latency", of=fleet) < 1_000_000, "microseconds"


def test_no_dashboard_query_names_a_metric_the_filter_does_not_export():
    exported = exported_series()
    for title, expr in dashboard_queries():
        named = set(re.findall(r"\bidempotency_[a-z_]+", expr))
        assert named and named <= exported, (title, named - exported)


def shipped_alerts():
    alerts = (ROOT / "envoy" / "observability" / "alerts.yaml").read_text()
    return set(re.findall(r"^ *- alert: (\w+)", alerts, re.MULTILINE))


def test_prometheus_loads_every_shipped_alert_rule(scraped):
    *_, prometheus = scraped
    assert len(shipped_alerts()) >= 10 and prometheus.rule_names() == shipped_alerts()


def test_make_run_starts_prometheus_on_the_demo_envoy_with_the_shipped_rules(tmp_path):
    """`make run` (envoy/run-demo.sh) also starts Prometheus on 127.0.0.1:9090, scraping the
    demo Envoy (admin 127.0.0.1:9901) with the shipped alert rules loaded."""
    env = {**os.environ, "RUN_DIR": str(tmp_path), "ENVOY": ENVOY_BIN}
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen(["envoy/run-demo.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        prometheus = Prometheus.started_by(demo, 9090, ["127.0.0.1:9901"], tmp_path / "prometheus" / "prometheus.log")
        assert prometheus.rule_names() == shipped_alerts()
        # The demo Envoy's gauges, as Prometheus scraped them (every 5 s).
        assert wait_for(lambda: [float(sample["value"][1]) for sample in
                                 prometheus.query("idempotency_capacity_records")] == [100_000], timeout=20)
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=20)
