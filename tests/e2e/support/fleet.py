"""The fixtures the etcd store's tests share (test_fleet.py, test_fleet_failures.py,
test_etcd_cluster.py). A test module takes them by importing them by name; pytest finds
fixtures in a module's namespace, the autouse one included.

    sources          every Envoy and etcd the module started, for the logs of a failed test
    run_dir          the module's own directory (not the shared .run/pytest: other runs may be
                     going on)
    module_started   a Started shared by the module's tests; started: one test's own
    etcd             a single-member etcd, "main", for the module
    pair, pass_pair  Envoys A and B on it with the defaults (when_full "reject"), and C and D
                     with when_full "pass"
    keep_logs_of_failures
                     autouse: a failed test's report gets every log written during it
"""
import re

import pytest

from support.etcd import LogWindow, Started, fleet_config, private_run_dir


@pytest.fixture(scope="module")
def sources():
    return []


@pytest.fixture(scope="module")
def run_dir():
    return private_run_dir()


@pytest.fixture(scope="module")
def module_started(run_dir, sources):
    with Started(run_dir, sources) as started:
        yield started


@pytest.fixture
def started(run_dir, sources):
    with Started(run_dir, sources) as started:
        yield started


@pytest.fixture(scope="module")
def etcd(module_started):
    return module_started.etcd("main")


@pytest.fixture(scope="module")
def pair(module_started, upstream, etcd):
    return module_started.pair(upstream, etcd, fleet_config())


@pytest.fixture(scope="module")
def pass_pair(module_started, upstream, etcd):
    return module_started.pair(upstream, etcd, fleet_config(when_full="pass"))


@pytest.fixture(autouse=True)
def keep_logs_of_failures(request, run_dir, sources):
    window = LogWindow(list(sources))
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        out = run_dir / "failed" / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        # What started during the test, from its first line.
        late = [s for s in sources if all(s is not t for t, _ in window.starts)]
        window.starts += [(s, 0) for s in late]
        report.sections.append(("Envoy and etcd logs during the test", window.save(out)))
