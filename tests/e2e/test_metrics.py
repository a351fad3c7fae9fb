"""The README's "Metrics": every outcome is counted, and every counter the filter defines is in
the deploying guide under both names Envoy gives it."""

from support.checks import (assert_original, assert_problem, assert_replay_of, filter_counters, stat_deltas,
                            wait_for)
from support.client import call
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


def test_the_deploying_guide_lists_every_counter_under_both_names():
    guide = (ROOT / "docs" / "deploying.md").read_text()
    for name in filter_counters():
        row = f"| `wasmcustom.{name}` | `{name.replace('.', '_')}` |"
        assert row in guide, f"docs/deploying.md has no row for {name}"
