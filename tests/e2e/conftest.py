"""Fixtures: a counting upstream and real Envoys with the filter in front of it.

    upstream                        module-scoped support.upstream.Upstream (loopback, free port)
    upstream_factory(port=0)        start another Upstream (stopped after the test)
    envoy_with(config=None, route_timeout="5s", upstream=None, upstream_port=None, fresh=False)
                                    an Envoy running the filter with this plugin config (dict).
                                    Instances with the same arguments are shared by the tests of a
                                    module (use a unique key per test); fresh=True gives a private
                                    one, stopped after the test. upstream_port points the cluster at
                                    a port where nothing need listen yet.
    envoy                           envoy_with({}): the defaults
    key                             a unique Idempotency-Key for the test

When a test fails, the Envoy log lines written during it are saved under
.run/pytest/failed/<test>/ and their tail is shown in the report.
"""

import json
import re
import shutil
import uuid

import pytest

from support.envoy import Envoy
from support.processes import ROOT
from support.upstream import Upstream

RUN_DIR = ROOT / ".run" / "pytest"


@pytest.fixture(scope="session")
def run_dir():
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    return RUN_DIR


@pytest.fixture(scope="module")
def upstream():
    up = Upstream().start()
    yield up
    up.stop()


@pytest.fixture
def upstream_factory():
    started = []

    def start(port=0):
        up = Upstream(port=port).start()
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


class _Pool:
    """Envoys shared by the tests of one module, keyed by their arguments."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.shared = {}
        self.active = []  # instances a test touched, for its failure log (reset per test)

    def get(self, config, route_timeout, upstream_port, expect_upstream, fresh, private):
        key = (json.dumps(config, sort_keys=True), route_timeout, upstream_port)
        envoy = None if fresh else self.shared.get(key)
        log_start = envoy.log_size() if envoy is not None else 0
        if envoy is None or envoy.proc is None or envoy.proc.poll() is not None:
            envoy = Envoy(self.run_dir, config, upstream_port, route_timeout, expect_upstream=expect_upstream)
            self.active.append((envoy, 0))  # started in this test: its whole log is relevant
            envoy.start()
            if fresh:
                private.append(envoy)
            else:
                self.shared[key] = envoy
        elif envoy not in [e for e, _ in self.active]:
            self.active.append((envoy, log_start))
        return envoy

    def stop_all(self):
        for envoy in self.shared.values():
            envoy.stop()
        self.shared.clear()


@pytest.fixture(scope="module")
def _envoy_pool(run_dir):
    pool = _Pool(run_dir)
    yield pool
    pool.stop_all()


@pytest.fixture
def envoy_with(_envoy_pool, request):
    private = []
    _envoy_pool.active = []

    def make(config=None, route_timeout="5s", upstream=None, upstream_port=None, fresh=False):
        if upstream_port is not None:
            port = upstream_port
        else:
            port = (upstream or request.getfixturevalue("upstream")).port
        return _envoy_pool.get({} if config is None else config, route_timeout, port,
                               expect_upstream=upstream_port is None, fresh=fresh, private=private)

    yield make
    _save_logs_if_failed(request, _envoy_pool.active)
    _envoy_pool.active = []
    for envoy in private:
        envoy.stop()


@pytest.fixture
def envoy(envoy_with):
    return envoy_with({})


@pytest.fixture
def key():
    return f"test-{uuid.uuid4()}"


# -- failure logs ---------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def _save_logs_if_failed(request, active):
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or not active:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    out_dir = RUN_DIR / "failed" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for envoy, start in active:
        text = envoy.log_text(start)
        path = out_dir / f"envoy-{envoy.number}.log"
        path.write_text(text)
        tail = "\n".join(text.splitlines()[-30:])
        sections.append(f"{envoy!r}\nsaved: {path}\n{tail}")
    report.sections.append(("Envoy log during the test", "\n\n".join(sections)))
