"""The ways users deploy the filter, checked as far as this machine allows.

- docker compose (envoy/docker-compose.yaml): no Docker engine runs here, so the file is checked
  for what it mounts and runs, handed to `docker compose config` when a compose client is
  installed, and its Envoy command line is run for real against the same envoy/envoy.yaml, laid
  out as in the container, with the demo upstream, through the README's curl walkthrough.
- The OCI image Istio pulls (`make image`, tools/oci_image.py): a valid OCI image layout whose
  single layer holds plugin.wasm, byte for byte the built module, read back the way Istio's
  puller reads it.
- Istio (envoy/istio/*.yaml): manifests parsed and their key fields checked; the Envoy filter
  the EnvoyFilter installs is run in the real Envoy as Istio's agent hands it over (the OCI
  module replaced by the local file).
"""

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from support.envoy import WASM_PATH, envoy_config
from support.processes import ROOT, free_port
from support.shipped import ENVOY_DIR, load, localise, ShippedEnvoy

COMPOSE_FILE = ENVOY_DIR / "docker-compose.yaml"
DEMO_CONFIG = ENVOY_DIR / "envoy.yaml"
WASM_RELATIVE = "target/wasm32-wasip1/release/idempotency_filter.wasm"


def compose():
    return load(COMPOSE_FILE)


def mounts(service):
    """{target: source resolved against the compose file's directory}."""
    out = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict) and volume["type"] == "bind", volume
        assert volume.get("read_only") is True, volume
        # A missing source must fail, not be created as an empty directory on the host.
        assert volume.get("bind", {}).get("create_host_path") is False, volume
        out[volume["target"]] = (COMPOSE_FILE.parent / volume["source"]).resolve()
    return out


def option(command, flag):
    return command[command.index(flag) + 1]


# -- docker compose -------------------------------------------------------------------------

def test_compose_runs_the_official_envoy_image_overridable_by_ENVOY_IMAGE():
    envoy = compose()["services"]["envoy"]
    assert envoy["image"].startswith("${ENVOY_IMAGE:-envoyproxy/envoy:v1.40"), envoy["image"]
    assert envoy["image"].endswith("}")


def test_compose_mounts_the_shipped_config_and_the_built_module_where_the_config_names_it():
    envoy = compose()["services"]["envoy"]
    workdir = envoy["working_dir"]
    command = envoy["command"]
    assert command[0] == "envoy"
    config_in_container = f"{workdir}/{option(command, '-c')}"
    envoy_mounts = mounts(envoy)
    assert envoy_mounts[config_in_container] == DEMO_CONFIG.resolve()

    # envoy.yaml names the module relative to Envoy's working directory: the container has the
    # built module at that same relative path, mounted from where `make wasm` writes it.
    (filename,) = [n["filename"] for n in _dicts(load(DEMO_CONFIG)) if "filename" in n]
    assert filename == WASM_RELATIVE
    assert envoy_mounts[f"{workdir}/{filename}"] == (ROOT / WASM_RELATIVE).resolve()
    makefile = (ROOT / "Makefile").read_text()
    assert f"WASM := target/$(WASM_TARGET)/release/idempotency_filter.wasm" in makefile


def test_compose_shares_the_upstream_network_namespace_so_the_config_needs_no_second_copy():
    services = compose()["services"]
    envoy, upstream = services["envoy"], services["upstream"]
    assert envoy["network_mode"] == "service:upstream"
    assert "upstream" in envoy["depends_on"]

    config = load(DEMO_CONFIG)
    (cluster,) = config["static_resources"]["clusters"]
    (endpoint,) = [n["socket_address"] for n in _dicts(cluster) if "socket_address" in n]
    command = upstream["command"]
    assert (option(command, "--host"), int(option(command, "--port"))) == \
        (endpoint["address"], endpoint["port_value"])
    assert mounts(upstream)[command[command.index("-u") + 1]] == (ENVOY_DIR / "demo_upstream.py").resolve()

    # Published on the upstream service (it owns the namespace): Envoy's listener and admin,
    # on the host's loopback only.
    (listener,) = config["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]
    assert listen["address"] == "0.0.0.0", "a published port reaches only a non-loopback bind"
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    assert sorted(upstream["ports"]) == sorted([
        f"127.0.0.1:{listen['port_value']}:{listen['port_value']}",
        f"127.0.0.1:{admin_port}:{admin_port}",
    ])


def _compose_client():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run(cmd + ["version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd, probe.stdout
    return None, ""


def test_compose_file_is_accepted_by_the_compose_client(tmp_path):
    cmd, version = _compose_client()
    if cmd is None:
        pytest.skip("no docker compose client installed")
    path = COMPOSE_FILE
    if cmd == ["docker-compose"] and "version 1." in version:
        # Compose v1 predates the top-level `name` and bind `create_host_path` (Compose v2
        # has both); check the rest with it.
        doc = compose()
        doc.pop("name")
        for service in doc["services"].values():
            for volume in service.get("volumes", []):
                volume.pop("bind", None)
        path = tmp_path / "docker-compose.yaml"
        path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, ENVOY_IMAGE="registry.example/envoy:test")
    out = subprocess.run(cmd + ["-f", str(path), "--project-directory", str(ENVOY_DIR), "config"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)
    assert rendered["services"]["envoy"]["image"] == "registry.example/envoy:test"


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
    import socket
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

    # The counters under the names the docs give, in /stats and in Prometheus' exposition.
    stats = envoy.stats()
    assert stats["wasmcustom.idempotency.replayed"] == 1
    assert stats["wasmcustom.idempotency.conflict"] == 1
    status, text = envoy.admin_get("/stats/prometheus")
    assert status == 200
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples["idempotency_replayed{}"] == "1"
    assert samples["idempotency_conflict{}"] == "1"
    assert samples["idempotency_claimed{}"] == "2"
    # Every counter the filter defines, under the Prometheus name docs/deploying.md gives it.
    for name in filter_counters():
        prometheus = name.replace(".", "_")
        assert f"{prometheus}{{}}" in samples, prometheus
        assert f"# TYPE {prometheus} counter" in text


def filter_counters():
    """The counter names src/core/counters.rs defines (idempotency.<outcome>)."""
    source = (ROOT / "src" / "core" / "counters.rs").read_text()
    names = sorted(set(re.findall(r'=> "(idempotency\.[a-z_]+)"', source)))
    assert len(names) >= 15, names
    return names


def test_the_deploying_guide_lists_every_counter_under_both_names():
    guide = (ROOT / "docs" / "deploying.md").read_text()
    for name in filter_counters():
        row = f"| `wasmcustom.{name}` | `{name.replace('.', '_')}` |"
        assert row in guide, f"docs/deploying.md has no row for {name}"


def _dicts(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dicts(value)


# -- the OCI image (make image) ---------------------------------------------------------------

TOOLS = ROOT / "tools"


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("oci")
    run = subprocess.run([sys.executable, str(TOOLS / "oci_image.py"), str(WASM_PATH), str(out),
                          "--tag", "9.9.9"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    digest = next(line.split()[-1] for line in run.stdout.splitlines() if line.startswith("manifest digest"))
    return out / "idempotency-filter", out / "idempotency-filter.tar", digest


def _blob(layout, digest):
    algorithm, hexdigest = digest.split(":")
    assert algorithm == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


def _checked(layout, descriptor):
    data = _blob(layout, descriptor["digest"])
    assert len(data) == descriptor["size"], descriptor
    return data


def test_image_layout_is_a_valid_oci_layout_whose_layer_is_the_built_module(oci_image):
    layout, _, manifest_digest = oci_image
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "9.9.9"
    assert entry["digest"] == manifest_digest
    manifest = json.loads(_checked(layout, entry))
    assert entry["mediaType"] == manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["schemaVersion"] == 2

    config = json.loads(_checked(layout, manifest["config"]))
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = manifest["layers"]
    compressed = _checked(layout, layer)
    uncompressed = gzip.decompress(compressed)
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]}

    # Read back as Istio's puller does for an OCI image (the "compat" variant): the last layer,
    # of type application/vnd.oci.image.layer.v1.tar+gzip, a gzipped tar with plugin.wasm in it.
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    with tarfile.open(fileobj=io.BytesIO(uncompressed)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "plugin.wasm" and member.isfile()
        assert tar.extractfile(member).read() == Path(WASM_PATH).read_bytes()


def test_image_archive_holds_the_same_layout(oci_image):
    layout, archive, _ = oci_image
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    on_disk = {str(p.relative_to(layout)): p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    assert files == on_disk


def test_image_is_reproducible(oci_image, tmp_path):
    layout, _, digest = oci_image
    again = subprocess.run([sys.executable, str(TOOLS / "oci_image.py"), str(WASM_PATH), str(tmp_path),
                            "--tag", "9.9.9"], capture_output=True, text=True, check=True)
    assert f"manifest digest   {digest}" in again.stdout


def test_image_is_read_by_an_oci_client_when_one_is_installed(oci_image, tmp_path):
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    layout, archive, digest = oci_image
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{layout}:9.9.9"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == digest
    # A copy verifies every blob against its digest.
    copy = subprocess.run(["skopeo", "copy", f"oci-archive:{archive}:9.9.9", f"dir:{tmp_path / 'copy'}"],
                          capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr


def test_make_image_and_the_dockerfile_build_that_image():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nimage: wasm\n\tpython3 tools/oci_image.py $(WASM) target/oci\n" in makefile
    lines = [l for l in (ROOT / "Dockerfile").read_text().splitlines() if l and not l.startswith("#")]
    assert lines == ["FROM scratch", f"COPY {WASM_RELATIVE} ./plugin.wasm"]
    ignore = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert ignore == ["*", f"!{WASM_RELATIVE}"]


# -- Istio ------------------------------------------------------------------------------------

ISTIO_DIR = ENVOY_DIR / "istio"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def istio(name):
    return load(ISTIO_DIR / name)


def _patches(envoy_filter, apply_to):
    return [p for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == apply_to]


def envoy_filter_wasm():
    """The wasm filter config the EnvoyFilter serves over ECDS, and its extension name."""
    (extension,) = _patches(istio("envoyfilter.yaml"), "EXTENSION_CONFIG")
    assert extension["patch"]["operation"] == "ADD"  # the only operation Istio applies to ECDS
    value = extension["patch"]["value"]
    assert value["typed_config"]["@type"] == WASM_TYPE
    return value["name"], value["typed_config"]


def test_istio_manifests_are_the_resources_istio_expects():
    kinds = {name: (doc["apiVersion"], doc["kind"]) for name, doc in
             ((n, istio(n)) for n in ("envoyfilter.yaml", "wasmplugin.yaml", "trafficextension.yaml",
                                      "etcd-cluster.yaml"))}
    assert kinds == {
        "envoyfilter.yaml": ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        "etcd-cluster.yaml": ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        "wasmplugin.yaml": ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        "trafficextension.yaml": ("extensions.istio.io/v1alpha1", "TrafficExtension"),
    }


def test_envoyfilter_installs_the_filter_with_the_flag_it_needs_after_authn_and_authz():
    envoy_filter = istio("envoyfilter.yaml")
    name, wasm = envoy_filter_wasm()
    config = wasm["config"]
    assert config["allow_on_headers_stop_iteration"] is True
    assert config["failure_policy"] == "FAIL_CLOSED"
    assert config["root_id"] == "idempotency"
    assert config["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    remote = config["vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"].startswith("oci://")
    assert remote["http_uri"]["cluster"] and remote["http_uri"]["timeout"]  # required by Envoy's schema
    assert remote["sha256"] == "MANIFEST_DIGEST"

    (http_filter,) = _patches(envoy_filter, "HTTP_FILTER")
    assert http_filter["patch"]["operation"] == "ADD"
    assert http_filter["patch"]["filterClass"] == "AUTHZ"  # after Istio's authn and authz filters
    value = http_filter["patch"]["value"]
    assert value["name"] == name  # the HTTP filter refers to the ECDS resource by name
    assert value["config_discovery"]["type_urls"] == [WASM_TYPE]
    assert "ads" in value["config_discovery"]["config_source"]
    assert http_filter["match"]["listener"]["filterChain"]["filter"]["name"] == \
        "envoy.filters.network.http_connection_manager"

    (listener,) = _patches(envoy_filter, "LISTENER")
    assert listener["patch"]["operation"] == "MERGE"
    plugin = json.loads(config["configuration"]["value"])
    limit = listener["patch"]["value"]["per_connection_buffer_limit_bytes"]
    assert limit > plugin.get("max_request_body_bytes", 1 << 20)

    contexts = {p["match"]["context"] for p in envoy_filter["spec"]["configPatches"]}
    assert contexts == {"GATEWAY"}
    assert envoy_filter["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}


def test_the_etcd_cluster_envoyfilter_patches_the_same_gateways_as_the_filter():
    filter_spec, cluster_spec = istio("envoyfilter.yaml")["spec"], istio("etcd-cluster.yaml")["spec"]
    assert cluster_spec["workloadSelector"] == filter_spec["workloadSelector"]
    assert {p["match"]["context"] for p in cluster_spec["configPatches"]} == {"GATEWAY"}


def test_wasmplugin_and_trafficextension_carry_the_same_settings_as_the_envoyfilter():
    _, wasm = envoy_filter_wasm()
    plugin = json.loads(wasm["config"]["configuration"]["value"])
    url = wasm["config"]["vm_config"]["code"]["remote"]["http_uri"]["uri"]
    sha = wasm["config"]["vm_config"]["code"]["remote"]["sha256"]

    wasm_plugin = istio("wasmplugin.yaml")["spec"]
    extension = istio("trafficextension.yaml")["spec"]
    for spec, settings in ((wasm_plugin, wasm_plugin), (extension, extension["wasm"])):
        assert spec["selector"] == {"matchLabels": {"istio": "ingressgateway"}}
        assert spec["phase"] == "STATS"  # after Istio's authn and authz filters
        assert settings["url"] == url and settings["sha256"] == sha
        assert settings["failStrategy"] == "FAIL_CLOSE"
        assert settings["pluginName"] == wasm["config"]["root_id"]
        assert settings["pluginConfig"] == plugin


def test_istio_manifests_say_what_replaces_the_placeholders():
    for name in ("envoyfilter.yaml", "wasmplugin.yaml", "trafficextension.yaml"):
        text = (ISTIO_DIR / name).read_text()
        assert "REGISTRY" in text and "MANIFEST_DIGEST" in text and "make image" in text, name


def test_envoyfilter_wasm_filter_runs_in_envoy_as_istios_agent_hands_it_over(tmp_path, upstream):
    """The EnvoyFilter's filter config, with the OCI source replaced by the local module as Istio's
    agent does, in front of the test upstream with the LISTENER patch's buffer limit."""
    _, wasm = envoy_filter_wasm()
    wasm = json.loads(json.dumps(wasm))
    wasm["config"]["vm_config"]["code"] = {"local": {"filename": str(WASM_PATH)}}
    config = envoy_config(upstream.port, {}, WASM_PATH)
    (listener,) = config["static_resources"]["listeners"]
    (patch,) = _patches(istio("envoyfilter.yaml"), "LISTENER")
    listener.update(patch["patch"]["value"])
    http_filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert http_filters[0]["name"] == "envoy.filters.http.wasm"
    http_filters[0]["typed_config"] = wasm
    envoy = ShippedEnvoy(tmp_path, config, upstream.port).start()
    try:
        key = f"istio-{uuid.uuid4()}"
        headers = {"authorization": "Bearer istio", "idempotency-key": key, "content-type": "application/json"}
        first = envoy.request("POST", "/v1/orders", headers, b'{"sku":"a"}')
        again = envoy.request("POST", "/v1/orders", headers, b'{"sku":"a"}')
        assert first.status == 200 and first.header("idempotent-replayed") is None, first
        assert again.header("idempotent-replayed") == "true" and again.body == first.body, again
        assert upstream.count(key=key, path="/v1/orders") == 1
        # exclude_paths from the same configuration: never idempotent, runs every time.
        for _ in range(2):
            assert envoy.request("POST", "/healthz", headers, b"{}").header("idempotent-replayed") is None
        assert upstream.count(key=key, path="/healthz") == 2
    finally:
        envoy.stop()
