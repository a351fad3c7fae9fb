"""docs/deploying.md's upgrades and failure policy, in a running Envoy: a build with another
record format loaded over live records (and rolled back), a configuration change delivered by
LDS, and a VM that traps under FAIL_RELOAD. Envoy reads its listener from a file it watches.
"""

import json
import os
import uuid
from pathlib import Path

import pytest

from support.checks import wait_for
from support.client import call, in_background
from support.envoy import WASM_PATH, Envoy, envoy_config
from support.processes import ROOT, free_port


# -- an upgrade in a running Envoy: a build with another record format ---------------------------

# The module of the last commit that wrote record format 2 (SHA-256 fingerprints), which
# `make integration` builds from the repository's history (target/previous-format/).
PREVIOUS_WASM = Path(os.environ.get("PREVIOUS_WASM", ROOT / "target" / "previous-format" / "idempotency_filter.wasm"))


class LdsEnvoy(Envoy):
    """The test bootstrap, but with its listener delivered by LDS from a file Envoy watches, so
    that the filter's module and configuration can change in the running process (`load`)."""

    def __init__(self, workdir, upstream_port, wasm_path):
        super().__init__(workdir, {}, upstream_port, wasm_path=wasm_path)
        self.listener_port = free_port()
        self.lds_dir = self.workdir / "lds"

    def listener(self, wasm_path):
        config = envoy_config(self.upstream_port, self.plugin_config, wasm_path)
        listener = config["static_resources"]["listeners"][0]
        listener["address"]["socket_address"]["port_value"] = self.listener_port
        return {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}

    def write_listener(self, wasm_path):
        self.lds_dir.mkdir(parents=True, exist_ok=True)
        staged = self.lds_dir / "lds.json.next"
        staged.write_text(json.dumps({"resources": [self.listener(wasm_path)]}))
        staged.rename(self.lds_dir / "lds.json")  # a move, which the watch sees as one change

    def bootstrap(self):
        config = envoy_config(self.upstream_port, {}, self.wasm_path)
        del config["static_resources"]["listeners"]
        self.write_listener(self.wasm_path)
        config["node"] = {"id": "upgrade-test", "cluster": "upgrade-test"}  # LDS needs one
        config["dynamic_resources"] = {"lds_config": {"path_config_source": {
            "path": str(self.lds_dir / "lds.json"), "watched_directory": {"path": str(self.lds_dir)}}}}
        return config

    def load(self, wasm_path, plugin_config=None):
        """Delivers the listener again with another module or configuration, and waits until it
        serves."""
        before = self.counter("listener_manager.lds.update_success")
        if plugin_config is not None:
            self.plugin_config = plugin_config
        self.write_listener(wasm_path)
        assert wait_for(lambda: self.counter("listener_manager.lds.update_success") > before, 10)
        assert wait_for(lambda: self.counter("listener_manager.total_listeners_warming") == 0, 10)
        self.wasm_path = wasm_path


@pytest.fixture
def upgraded_envoy(tmp_path, upstream):
    assert PREVIOUS_WASM.is_file(), f"{PREVIOUS_WASM} is missing: `make integration` builds it"
    envoy = LdsEnvoy(tmp_path, upstream.port, PREVIOUS_WASM).start()
    yield envoy
    envoy.stop()


def test_an_upgrade_to_another_record_format_never_misreads_a_record(upgraded_envoy, upstream):
    """Format 2 fingerprints with SHA-256, format 3 with XXH3-128: the new build must never
    compare an old fingerprint with a new one. Records live under their format (t2/, t4/), so
    across the upgrade a retry runs its work again (docs/deploying.md says so), and a rollback finds
    the old records again; no answer is ever another request's, and no store error is seen."""
    envoy = upgraded_envoy
    old_key, new_key = f"before-{uuid.uuid4()}", f"after-{uuid.uuid4()}"
    first = call(envoy, old_key)
    assert first.status == 201 and call(envoy, old_key).header("idempotent-replayed") == "true"

    envoy.load(WASM_PATH)
    across = call(envoy, old_key)
    assert across.status == 201 and across.header("idempotent-replayed") is None, across
    assert upstream.count(key=old_key) == 2
    assert call(envoy, old_key, body=b'{"other": 1}').status == 409, "the new record is the new run's"
    stored = call(envoy, new_key)
    assert call(envoy, new_key).body == stored.body
    assert upstream.count(key=new_key) == 1

    envoy.load(PREVIOUS_WASM)
    back = call(envoy, old_key)
    assert back.header("idempotent-replayed") == "true" and back.body == first.body, back
    assert call(envoy, new_key).header("idempotent-replayed") is None
    assert envoy.counter("idempotency.store_error") == 0
    assert "panicked" not in envoy.log_text()


def test_a_configuration_change_by_lds_keeps_the_records_unless_it_moves_the_table(tmp_path, upstream):
    """A new configuration delivered while records are live: records made before still replay,
    unless the change starts a new table (capacity_records, key_prefix), as docs/deploying.md says;
    then a retry runs its work again and never meets another request's answer."""
    envoy = LdsEnvoy(tmp_path, upstream.port, WASM_PATH).start()
    try:
        key = f"live-{uuid.uuid4()}"
        first = call(envoy, key)
        envoy.load(WASM_PATH, {"max_wait": "5s", "ttl": "12h", "require_key": True})
        replay = call(envoy, key)
        assert replay.header("idempotent-replayed") == "true" and replay.body == first.body, replay
        assert call(envoy, None).status == 400, "the new configuration serves"

        envoy.load(WASM_PATH, {"capacity_records": 50_000})
        again = call(envoy, key)
        assert again.status == 201 and again.header("idempotent-replayed") is None, again
        assert upstream.count(key=key) == 2
        assert call(envoy, key).header("idempotent-replayed") == "true"
        assert envoy.counter("idempotency.store_error") == 0
    finally:
        envoy.stop()


FAULT_WASM = Path(os.environ.get("FAULT_WASM", ROOT / "target" / "fault-injection" / "wasm32-wasip1"
                                  / "release" / "idempotency_filter.wasm"))


def test_fail_reload_after_a_vm_crash_keeps_every_record(tmp_path, upstream):
    """A VM that traps (the test build traps on `x-idempotency-fault`) is replaced under
    FAIL_RELOAD; shared data outlives it. A stored record still replays, and a claim the dead VM
    held keeps its work from running again until its lease ends, then frees itself (the README's
    Install says so: the answer to the dead VM's client is never stored)."""
    assert FAULT_WASM.is_file(), f"{FAULT_WASM} is missing: `make integration` builds it"
    # One worker, so that the trap kills the VM holding the claim.
    envoy = Envoy(tmp_path, {"lease": "3s"}, upstream.port, wasm_path=FAULT_WASM,
                  failure_policy="FAIL_RELOAD", concurrency=1).start()
    try:
        stored, running = f"stored-{uuid.uuid4()}", f"running-{uuid.uuid4()}"
        first = call(envoy, stored)
        assert first.status == 201
        slow, _ = in_background(lambda: call(envoy, running, headers=[("x-test-delay-ms", "1500")]))
        assert wait_for(lambda: upstream.count(key=running) == 1)

        crashed = call(envoy, f"crash-{uuid.uuid4()}", headers=[("x-idempotency-fault", "trap")])
        assert crashed.status >= 500, crashed
        assert "RuntimeError: unreachable" in envoy.log_text()
        slow.join()  # whatever the dying VM's client got, its record must hold

        replay = call(envoy, stored)
        assert replay.header("idempotent-replayed") == "true" and replay.body == first.body, replay
        # The retry waits on the dead VM's claim and takes it over only once its lease is over.
        retry = call(envoy, running)
        assert retry.status == 201 and retry.header("idempotent-replayed") is None, retry
        runs = upstream.executions(key=running)
        assert len(runs) == 2 and runs[1].at - runs[0].at > 2.8, [r.at for r in runs]
        assert upstream.count(key=stored) == 1
        assert envoy.counter("idempotency.store_error") == 0
    finally:
        envoy.stop()
