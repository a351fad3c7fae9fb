"""docs/metrics.md: every outcome is counted; the gauges are the whole Envoy's and the
histograms measure what they say; every metric the filter defines is in the deploying guide under
both names Envoy gives it; each request's outcome is in the access log; the shipped alert rules
watch only what the filter exports."""

import re

import yaml

from support.checks import (assert_original, assert_problem, assert_replay_of, exported_series, filter_metrics,
                            stat_deltas, wait_for)
from support.client import CUSTOMER, call, in_background, unique_path
from support.envoy import worker_connections
from support.processes import ROOT


def test_stats_count_each_outcome(envoy, upstream, key):
    names = ["idempotency.claimed", "idempotency.stored", "idempotency.replayed",
             "idempotency.conflict", "idempotency.key_invalid"]
    before = envoy.stats()
    original = call(envoy, key)
    assert_original(original)
    assert_replay_of(call(envoy, key), original)
    assert_replay_of(call(envoy, key), original)
    assert_problem(call(envoy, key, body=b"{}"), 409, "idempotency_conflict")
    assert_problem(call(envoy, None, headers=[("idempotency-key", "")]), 400, "idempotency_key_invalid")
    assert upstream.count(key=key) == 1
    expected = {"idempotency.claimed": 1, "idempotency.stored": 1, "idempotency.replayed": 2,
                "idempotency.conflict": 1, "idempotency.key_invalid": 1}
    wait_for(lambda: stat_deltas(envoy, before, names) == expected)
    assert stat_deltas(envoy, before, names) == expected


def test_the_gauges_are_the_whole_envoy_s_and_the_histograms_measure_waits_and_responses(envoy_with, upstream,
                                                                                          key):
    """Records made by both workers count once in records_held (read from shared data, not one
    worker's view); in-flight claims and waiting duplicates are the sum of the workers' parts."""
    envoy = envoy_with({"capacity_records": 1000, "max_wait": "10s"}, fresh=True)
    keys = [f"{key}-{n}" for n in range(40)]
    for each in keys:
        assert_original(call(envoy, each))
    assert len([w for w, n in worker_connections(envoy).items() if n > 0]) == 2, "both workers made records"

    def level(name):
        return envoy.prometheus()[0].get(f"idempotency_{name}{{}}")
    assert wait_for(lambda: level("records_held") == 40, timeout=5), level("records_held")
    assert level("capacity_records") == 1000
    assert level("capacity_bytes") == 128 << 20
    assert 40 * len(CUSTOMER) <= level("bytes_held") < 40 * 4096

    slow = f"{key}-slow"
    original = in_background(lambda: call(envoy, slow, headers=[("x-test-delay-ms", "2500")]))
    assert wait_for(lambda: upstream.count(key=slow) == 1)
    duplicate = in_background(lambda: call(envoy, slow))
    assert wait_for(lambda: (level("claims_in_flight"), level("waiting")) == (1, 1), timeout=5)
    for thread, _ in (original, duplicate):
        thread.join()
    assert_replay_of(duplicate[1]["result"], original[1]["result"])
    assert wait_for(lambda: (level("claims_in_flight"), level("waiting"), level("records_held")) == (0, 0, 41),
                    timeout=5)

    def histogram():
        samples = envoy.prometheus()[0]
        return {series: value for series, value in samples.items()
                if series.startswith(("idempotency_wait_ms", "idempotency_stored_response_bytes",
                                       "idempotency_replayed_age_ms"))}
    assert wait_for(lambda: histogram().get("idempotency_stored_response_bytes_count{}") == 41, timeout=5)
    seen = histogram()
    assert seen["idempotency_wait_ms_count{}"] == 1
    assert seen["idempotency_replayed_age_ms_count{}"] == 1, "the duplicate's replay"
    # The duplicate came once the original was running, and waited for the rest of its 2.5 s.
    assert seen['idempotency_wait_ms_bucket{le="100"}'] == 0
    assert seen['idempotency_wait_ms_bucket{le="10000"}'] == 1
    # Envoy keeps a histogram's values to two significant digits.
    assert abs(seen["idempotency_stored_response_bytes_sum{}"] / 41 - len(CUSTOMER)) <= 1
    assert seen['idempotency_stored_response_bytes_bucket{le="128"}'] == 41, "the upstream echoes the body"


def test_the_deploying_guide_lists_every_metric_under_both_names():
    guide = (ROOT / "docs" / "deploying.md").read_text()
    for name in filter_metrics():
        row = f"| `wasmcustom.{name}` | `{name.replace('.', '_')}` |"
        assert row in guide, f"docs/deploying.md has no row for {name}"


def test_every_shipped_envoy_config_buckets_each_histogram_as_the_guide_says():
    guide = (ROOT / "docs" / "deploying.md").read_text()
    shipped = sorted((ROOT / "envoy").glob("envoy*.yaml"))
    assert len(shipped) >= 5
    for path in shipped:
        settings = yaml.safe_load(path.read_text())["stats_config"]["histogram_bucket_settings"]
        buckets = {setting["match"]["suffix"]: setting["buckets"] for setting in settings}
        assert set(buckets) == set(filter_metrics("histogram")), path.name
        for name, bounds in buckets.items():
            row = re.search(rf"\| `wasmcustom\.{re.escape(name)}` \| `[a-z_]+` \| ([^|]+) \|", guide)
            assert bounds == [int(bound) for bound in row.group(1).split(", ")], (path.name, name)


def test_each_request_s_outcome_is_in_the_access_log(envoy_with, upstream, key):
    """The filter marks its outcome as filter state, which the access log prints as
    %FILTER_STATE(wasm.idempotency_outcome:PLAIN)%; a request the filter does not cover has none."""
    envoy = envoy_with({"max_wait": "0s"})
    same, slow, invalid, anonymous, read = (unique_path() for _ in range(5))
    original = call(envoy, key, path=same)
    assert_problem(call(envoy, key, path=same, body=b"{}"), 409, "idempotency_conflict")
    thread, box = in_background(lambda: call(envoy, key, path=slow, headers=[("x-test-delay-ms", "1500")]))
    assert wait_for(lambda: upstream.count(path=slow) == 1)
    assert_problem(call(envoy, key, path=slow), 503, "idempotency_in_progress")
    thread.join()
    assert_original(box["result"])
    # Replayed after the slow request, from a record at least 1.5 s old.
    assert_replay_of(call(envoy, key, path=same), original)
    assert_problem(call(envoy, None, path=invalid, headers=[("idempotency-key", "")]), 400,
                   "idempotency_key_invalid")
    assert_original(call(envoy, key, path=anonymous, auth=None))
    assert envoy.request("GET", read).status == 200

    expected = sorted([(same, "claimed"), (same, "replayed"), (same, "conflict"), (slow, "claimed"),
                       (slow, "in_progress"), (invalid, "key_invalid"), (anonymous, "bypassed"),
                       (read, None)], key=str)
    paths = {path for path, _ in expected}

    def logged():
        lines = [line for line in envoy.access_log() if line["path"] in paths]
        return sorted(((line["path"], line["idempotency"]) for line in lines), key=str)
    assert wait_for(lambda: logged() == expected, timeout=5), logged()
    # A replay also logs its record's age (wasm.idempotency_record_age_ms); nothing else does.
    ages = {line["idempotency"]: line["record_age_ms"] for line in envoy.access_log() if line["path"] in paths}
    assert 1500 <= int(ages.pop("replayed")) < 60_000
    assert set(ages.values()) == {None}, ages


def test_every_alert_rule_names_only_the_filter_s_counters_and_has_a_firing_and_a_quiet_test():
    """envoy/observability/alerts.yaml is run by promtool (make alerts); this says that its unit
    tests leave no alert out and that no rule watches a series the filter never exports."""
    folder = ROOT / "envoy" / "observability"
    rules = yaml.safe_load((folder / "alerts.yaml").read_text())["groups"][0]["rules"]
    exported = exported_series()
    for rule in rules:
        watched = set(re.findall(r"\bidempotency_[a-z_]+", rule["expr"]))
        assert watched and watched <= exported, (rule["alert"], watched - exported)
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    tests = yaml.safe_load((folder / "alerts.test.yaml").read_text())["tests"]
    checked = {}
    for test in tests:
        for check in test["alert_rule_test"]:
            checked.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    assert checked == {rule["alert"]: {True, False} for rule in rules}
