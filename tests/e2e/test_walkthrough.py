"""The README's "Walkthrough", run for real: the demo upstream with its compose command, and Envoy
with the compose file's command line in a working directory laid out like the container's
(envoy/envoy.yaml and the module at its relative path), through the README's curl lines and the
counters it points to."""

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest

from support.checks import filter_metrics, wait_for
from support.envoy import WASM_PATH
from support.processes import free_port
from support.shipped import (DEMO_CONFIG, ENVOY_DIR, WASM_RELATIVE, compose, load, localise, option,
                             ShippedEnvoy)


@pytest.fixture
def compose_demo(tmp_path):
    """The compose services run here as the containers would run them: the demo upstream with
    its compose command, Envoy with its compose command line in a working directory laid out
    like the container's (envoy/envoy.yaml + the module at its relative path). Only ports
    change: the upstream's to a free one, Envoy's listener and admin to kernel-picked ones."""
    services = compose()["services"]
    upstream_port = free_port()
    up_cmd = [sys.executable if arg == "python3" else arg for arg in services["upstream"]["command"]]
    up_cmd[up_cmd.index("-u") + 1] = str(ENVOY_DIR / "demo_upstream.py")
    up_cmd[up_cmd.index("--port") + 1] = str(upstream_port)
    up_log = tmp_path / "upstream.log"
    with open(up_log, "wb") as log:
        upstream = subprocess.Popen(up_cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for_port(upstream_port, upstream)
        envoy_service = services["envoy"]
        srv = tmp_path / "srv"
        module = srv / WASM_RELATIVE
        module.parent.mkdir(parents=True)
        module.symlink_to(WASM_PATH)
        command = envoy_service["command"]
        envoy = ShippedEnvoy(tmp_path, localise(load(DEMO_CONFIG), upstream_port, wasm_path=None),
                             args=command[1:], cwd=srv, config_name=option(command, "-c"),
                             expect_upstream=False).start()
        try:
            yield envoy, up_log
        finally:
            envoy.stop()
    finally:
        upstream.terminate()
        upstream.wait(timeout=5)


def _wait_for_port(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the demo upstream exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def test_compose_command_line_runs_the_demo_walkthrough(compose_demo):
    """The README's curl walkthrough, against the compose command line and envoy.yaml."""
    envoy, up_log = compose_demo
    # The compose-only admin override took effect (inside a container it must not be loopback).
    assert envoy.admin_address().startswith("0.0.0.0:")

    key = f"demo-{uuid.uuid4()}"
    auth = {"authorization": "Bearer ic_live_demo", "idempotency-key": key,
            "content-type": "application/json"}
    create = json.dumps({"externalId": f"crm-{key}", "fullName": "Jane Doe",
                         "email": "jane@example.com"}).encode()
    first = envoy.request("POST", "/v1/customers", auth, create)
    assert first.status == 201, first
    replay = envoy.request("POST", "/v1/customers", auth, create)
    assert replay.status == 201 and replay.header("idempotent-replayed") == "true", replay
    assert replay.body == first.body

    conflict = envoy.request("POST", "/v1/customers", auth,
                             json.dumps({"externalId": f"crm-{key}", "fullName": "Janet Doe"}).encode())
    assert conflict.status == 409, conflict
    assert conflict.header("content-type") == "application/problem+json"
    assert conflict.json()["code"] == "idempotency_conflict"

    customer = first.json()["id"]
    patch = envoy.request("PATCH", f"/v1/customers/{customer}", auth, b'{"email":"jane@doe.example"}')
    assert patch.status == 200 and patch.header("idempotent-replayed") is None, patch

    executed = [line for line in up_log.read_text().splitlines() if "EXECUTED" in line and key in line]
    assert len(executed) == 2, executed  # the POST once (not its replay, not the conflict), the PATCH

    # Envoy's access log says what the filter did with each (written out within a second).
    def outcomes():
        lines = [line for line in envoy.log_path.read_text().splitlines() if f"key={key}" in line]
        return [line.split("idempotency=", 1)[1].split()[0] for line in lines]
    assert wait_for(lambda: outcomes() == ["claimed", "replayed", "conflict", "claimed"], timeout=5), outcomes()

    # The counters under the names the docs give, in /stats and in Prometheus' exposition.
    stats = envoy.stats()
    assert stats["wasmcustom.idempotency.replayed"] == 1
    assert stats["wasmcustom.idempotency.conflict"] == 1
    samples, types = envoy.prometheus()
    assert samples["idempotency_replayed{}"] == 1
    assert samples["idempotency_conflict{}"] == 1
    assert samples["idempotency_claimed{}"] == 2
    # Every metric the filter defines, of its kind, under the Prometheus name docs/deploying.md
    # gives it.
    for name, kind in filter_metrics().items():
        prometheus = name.replace(".", "_")
        assert types.get(prometheus) == kind, (prometheus, types.get(prometheus))
        series = f"{prometheus}_count{{}}" if kind == "histogram" else f"{prometheus}{{}}"
        assert series in samples, series
