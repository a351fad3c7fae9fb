"""CONTRACT.md "Bounds and bad input" (the store's capacity, bad configuration) and the stats
that count every outcome. A full store's policies, shares and memory are test_capacity.py's."""

import uuid

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, stat_deltas, wait_for
from support.client import call
from support.envoy import Envoy, EnvoyError


# -- bounds: store capacity and configuration ------------------------------------------------------

def _fill(envoy, n, prefix):
    keys = [f"{prefix}-{uuid.uuid4()}" for _ in range(n)]
    return keys, [call(envoy, k) for k in keys]


def test_store_never_holds_more_records_than_capacity_records(envoy_with, upstream):
    envoy = envoy_with({"capacity_records": 4, "max_share": 1, "when_full": "reject"})
    keys, answers = _fill(envoy, 12, "cap")
    stored = [k for k, a in zip(keys, answers) if a.status == 201]
    assert 1 <= len(stored) <= 4, f"{len(stored)} records stored with capacity_records 4"


@pytest.mark.parametrize("config,field", [
    ({"ttl": "soon"}, "ttl"),
    ({"tll": "1s"}, "tll"),
    ({"when_full": "drop"}, "when_full"),
    ({"max_wait": -1}, "max_wait"),
])
def test_bad_configuration_is_refused_at_load_naming_the_field(run_dir, upstream, config, field):
    envoy = Envoy(run_dir, config, upstream.port)
    try:
        with pytest.raises(EnvoyError):
            envoy.start()
    finally:
        envoy.stop()
    lines = [line for line in envoy.log_text().splitlines()
             if "[wasm]" in line and ("[error]" in line or "[critical]" in line)]
    assert any(f"`{field}`" in line or f'"{field}"' in line or f" {field}" in line for line in lines), \
        "no error line names the field:\n" + "\n".join(lines)


# -- stats --------------------------------------------------------------------------------------

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
