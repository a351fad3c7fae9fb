"""Run the Envoy configs the project ships (envoy/*.yaml) with the real Envoy, as shipped.

Only what has to differ on a test machine is changed (``localise``): every listener and the
admin take a port the kernel picks, every static cluster endpoint points at the test upstream,
and a wasm ``filename`` is pointed at the built module. Everything else (filters, routes,
per-route config, plugin configuration) is the file's own.

    config = localise(load(ROOT / "envoy" / "envoy.yaml"), upstream.port)
    envoy = ShippedEnvoy(workdir, config).start()     # same API as support.envoy.Envoy
"""

import copy
import json
from pathlib import Path

import yaml

from support.envoy import ENVOY_BIN, WASM_PATH, Envoy
from support.processes import ROOT

ENVOY_DIR = ROOT / "envoy"


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def walk(node):
    """Every dict in a parsed document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def wasm_filters(config):
    """The typed_config of every envoy.filters.http.wasm filter in a bootstrap."""
    return [node["typed_config"] for node in walk(config)
            if node.get("name") == "envoy.filters.http.wasm" and "typed_config" in node]


def plugin_configuration(config):
    """The plugin JSON configuration of the (single) wasm filter, parsed."""
    (wasm,) = wasm_filters(config)
    return json.loads(wasm["config"]["configuration"]["value"])


def localise(config, upstream_port, wasm_path=WASM_PATH):
    """A copy of a shipped bootstrap runnable here (see the module docstring). With
    ``wasm_path=None`` the module's filename is kept as written (relative to Envoy's cwd)."""
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
    for cluster in resources.get("clusters", []):
        for endpoint in walk(cluster.get("load_assignment", {})):
            if "socket_address" in endpoint:
                endpoint["socket_address"]["port_value"] = upstream_port
    if wasm_path is not None:
        for node in walk(config):
            if str(node.get("filename", "")).endswith(".wasm"):
                node["filename"] = str(wasm_path)
    return config


class ShippedEnvoy(Envoy):
    """support.envoy.Envoy running a whole bootstrap of our choosing.

    ``args`` replaces the default ``-c <bootstrap> --concurrency 2 --log-level info
    --component-log-level wasm:debug`` (for running a command line as another tool, e.g.
    docker compose, would); the harness's own flags (base id, admin address file, drain
    time) are always added. ``cwd`` is Envoy's working directory (default: the repository).
    ``config_name`` is where the bootstrap is written, relative to ``cwd`` when ``args`` are
    given (so they can name it), else inside the instance's work directory."""

    def __init__(self, workdir, config, upstream_port=None, args=None, cwd=None,
                 config_name="envoy.json", expect_upstream=True):
        super().__init__(workdir, plugin_config=None, upstream_port=upstream_port,
                         wasm_path=None, expect_upstream=expect_upstream)
        self._bootstrap = config
        self.args = args
        self.cwd = Path(cwd) if cwd else ROOT
        self.config_name = config_name

    def bootstrap(self):
        return self._bootstrap

    def __repr__(self):
        return f"<ShippedEnvoy #{self.number} port={self.port} log={self.log_path}>"

    def start(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.args is None:
            config_path = self.workdir / self.config_name
            cmd = [ENVOY_BIN, "-c", str(config_path), "--concurrency", "2",
                   "--log-level", "info", "--component-log-level", "wasm:debug"]
        else:
            config_path = self.cwd / self.config_name
            cmd = [ENVOY_BIN, *self.args]
        config_path.parent.mkdir(parents=True, exist_ok=True)
        if config_path.suffix in (".yaml", ".yml"):
            config_path.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        else:
            config_path.write_text(json.dumps(self.bootstrap(), indent=2))
        self._launch(cmd, cwd=self.cwd)
        return self

    def admin_address(self):
        return (self.workdir / "admin-address").read_text().strip()


# -- the compose file --------------------------------------------------------------------------

COMPOSE_FILE = ENVOY_DIR / "docker-compose.yaml"
DEMO_CONFIG = ENVOY_DIR / "envoy.yaml"
WASM_RELATIVE = "target/wasm32-wasip1/release/idempotency_filter.wasm"


def compose():
    return load(COMPOSE_FILE)


def option(command, flag):
    return command[command.index(flag) + 1]
