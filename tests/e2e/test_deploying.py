"""The README's "Install" and docs/deploying.md: the ways users deploy the filter, checked as far as this machine
allows.

- docker compose (envoy/docker-compose.yaml): no Docker engine runs here, so the file is checked
  for what it mounts and runs, and handed to `docker compose config` when a compose client is
  installed (test_walkthrough.py runs its command line).
- The OCI image Istio pulls (`make image`, tools/oci_image.py): a valid OCI image layout whose
  single layer holds plugin.wasm, byte for byte the built module, read back the way Istio's
  puller reads it.
- Istio (envoy/istio/*.yaml): manifests parsed and their key fields checked; the Envoy filter
  the EnvoyFilter installs is run in the real Envoy as Istio's agent hands it over (the OCI
  module replaced by the local file).
- Scope from a verified identity (envoy/envoy-jwt.yaml): the shipped example removes any
  client-sent x-org-id, lets jwt_authn write the token's org_id claim into it, and scopes
  records by it ("scope_header": "x-org-id"). The tests run that file as shipped (ports and the
  module path aside) and show that a forged scope header never reaches another organisation's
  records. The tokens are the test-only ones in envoy/jwt-test-tokens.json.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from support.client import call
from support.envoy import WASM_PATH, envoy_config
from support.processes import ROOT
from support.shipped import (COMPOSE_FILE, DEMO_CONFIG, ENVOY_DIR, WASM_RELATIVE, compose, load, localise,
                             option, plugin_configuration, walk, ShippedEnvoy)


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
    (filename,) = [n["filename"] for n in walk(load(DEMO_CONFIG)) if "filename" in n]
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
    (endpoint,) = [n["socket_address"] for n in walk(cluster) if "socket_address" in n]
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
    assert config["failure_policy"] == "FAIL_RELOAD"
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
        assert settings["failStrategy"] == "FAIL_RELOAD"
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


# -- scope from a verified identity: envoy/envoy-jwt.yaml -------------------------------------------

JWT_CONFIG = ENVOY_DIR / "envoy-jwt.yaml"
TOKENS = json.loads((ENVOY_DIR / "jwt-test-tokens.json").read_text())["tokens"]
BODY = json.dumps({"externalId": "crm-1", "fullName": "Jane Doe"}).encode()


@pytest.fixture(scope="module")
def jwt_envoy(run_dir, upstream):
    # The readiness probe has no token: jwt_authn answers it 401, which is an answer.
    instance = ShippedEnvoy(run_dir / "identity", localise(load(JWT_CONFIG), upstream.port),
                            upstream.port, expect_upstream=False).start()
    yield instance
    instance.stop()


def post_as(envoy, key, token=None, forged_org=None):
    """A covered POST with the test token ``token`` (None: no Authorization), and an ``x-org-id``
    the client forges, if given; the upstream answers 200."""
    auth = None if token is None else f"Bearer {TOKENS[token]}"
    forged = [] if forged_org is None else [("x-org-id", forged_org)]
    return call(envoy, key, body=BODY, auth=auth, headers=[("x-test-status", "200"), *forged])


def test_the_example_scopes_records_by_the_header_jwt_authn_writes():
    config = load(JWT_CONFIG)
    assert plugin_configuration(config)["scope_header"] == "x-org-id"
    names = [f["name"] for f in config["static_resources"]["listeners"][0]["filter_chains"][0]
             ["filters"][0]["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
                     "envoy.filters.http.wasm", "envoy.filters.http.router"]


def test_a_forged_scope_header_never_reaches_another_organisations_records(jwt_envoy, upstream):
    key = f"identity-{uuid.uuid4()}"
    original = post_as(jwt_envoy, key, token="org_a")
    assert original.status == 200 and original.header("idempotent-replayed") is None, original

    # org_b's client claims to be org_a, with org_a's key and the same body: had the header
    # been trusted, this would be org_a's record and a replay of org_a's response.
    forged = post_as(jwt_envoy, key, token="org_b", forged_org="org_a")
    assert forged.status == 200, forged
    assert forged.header("idempotent-replayed") is None, "org_b was served org_a's record"
    assert forged.header("x-upstream-execution") != original.header("x-upstream-execution")
    assert upstream.count(key=key) == 2

    # What reached the upstream (and the filter) was the verified claim, once, each time.
    executions = upstream.executions(key=key)
    assert [[v for n, v in e.headers if n == "x-org-id"] for e in executions] == [["org_a"], ["org_b"]]

    # org_b's own retry is served from org_b's record, not org_a's.
    retry = post_as(jwt_envoy, key, token="org_b", forged_org="org_a")
    assert retry.header("idempotent-replayed") == "true", retry
    assert retry.header("x-upstream-execution") == forged.header("x-upstream-execution")
    assert upstream.count(key=key) == 2


def test_the_organisation_not_the_credential_owns_the_records(jwt_envoy, upstream):
    """Two users of org_a (two different tokens) share org_a's keys."""
    key = f"identity-{uuid.uuid4()}"
    first = post_as(jwt_envoy, key, token="org_a")
    second = post_as(jwt_envoy, key, token="org_a_second_user")
    assert second.header("idempotent-replayed") == "true", second
    assert second.body == first.body
    assert upstream.count(key=key) == 1


@pytest.mark.parametrize("case", ["no token", "only a forged header", "tampered claim"])
def test_a_request_without_a_valid_token_is_refused_before_the_filter(jwt_envoy, upstream, case):
    key = f"identity-{uuid.uuid4()}"
    post_as(jwt_envoy, key, token="org_a")  # org_a's record exists
    if case == "no token":
        resp = post_as(jwt_envoy, key)
    elif case == "only a forged header":
        resp = post_as(jwt_envoy, key, forged_org="org_a")
    else:
        # org_b's token with its claim rewritten to org_a: the signature no longer matches.
        header, payload, signature = TOKENS["org_b"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["org_id"] = "org_a"
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        resp = jwt_envoy.request("POST", "/v1/customers", [
            ("content-type", "application/json"), ("idempotency-key", key),
            ("authorization", f"Bearer {header}.{payload}.{signature}")], BODY)
    assert resp.status == 401, resp
    assert resp.header("idempotent-replayed") is None
    assert upstream.count(key=key) == 1  # only org_a's original


def test_the_test_tokens_match_the_inlined_test_jwks():
    config = load(JWT_CONFIG)
    (provider,) = [n for n in walk(config) if "local_jwks" in n]
    keys = json.loads(provider["local_jwks"]["inline_string"])["keys"]
    for token in TOKENS.values():
        header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                          for part in token.split(".")[:2])
        assert header["kid"] in {k["kid"] for k in keys}
        assert claims["iss"] == provider["issuer"] and claims["aud"] in provider["audiences"]
        assert claims["exp"] >= 4102444800  # 2100: the committed tokens do not expire under CI


def test_a_valid_token_without_the_claim_cannot_borrow_a_forged_header(jwt_envoy, upstream):
    """A token without the claim leaves no scope header at all (the request passes without
    idempotency, counted as bypassed): a client's own x-org-id never stands in for the claim.
    Envoy 1.40's jwt_authn drops a client's copy of a claim header itself; the header_mutation
    filter in front makes the example independent of that, and of rules that let a request
    through without a token."""
    key = f"identity-{uuid.uuid4()}"
    original = post_as(jwt_envoy, key, token="org_a")
    borrowed = post_as(jwt_envoy, key, token="no_org", forged_org="org_a")
    assert borrowed.status == 200, borrowed
    assert borrowed.header("idempotent-replayed") is None, "a forged header selected org_a's record"
    assert borrowed.header("x-upstream-execution") != original.header("x-upstream-execution")
    executions = upstream.executions(key=key)
    assert [[v for n, v in e.headers if n == "x-org-id"] for e in executions] == [["org_a"], []]
