"""Scope from a verified identity (envoy/envoy-jwt.yaml), in the real Envoy.

The shipped example removes any client-sent x-org-id, lets jwt_authn write the token's org_id
claim into it, and scopes records by it ("scope_header": "x-org-id"). These tests run that file
as shipped (ports and the module path aside) and show that a forged scope header never reaches
another organisation's records. The tokens are the test-only ones in envoy/jwt-test-tokens.json.
"""

import base64
import json
import uuid

import pytest

from support.client import call
from support.shipped import ENVOY_DIR, load, localise, plugin_configuration, ShippedEnvoy

CONFIG = ENVOY_DIR / "envoy-jwt.yaml"
TOKENS = json.loads((ENVOY_DIR / "jwt-test-tokens.json").read_text())["tokens"]
BODY = json.dumps({"externalId": "crm-1", "fullName": "Jane Doe"}).encode()


@pytest.fixture(scope="module")
def envoy(run_dir, upstream):
    # The readiness probe has no token: jwt_authn answers it 401, which is an answer.
    instance = ShippedEnvoy(run_dir / "identity", localise(load(CONFIG), upstream.port),
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
    config = load(CONFIG)
    assert plugin_configuration(config)["scope_header"] == "x-org-id"
    names = [f["name"] for f in config["static_resources"]["listeners"][0]["filter_chains"][0]
             ["filters"][0]["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
                     "envoy.filters.http.wasm", "envoy.filters.http.router"]


def test_a_forged_scope_header_never_reaches_another_organisations_records(envoy, upstream):
    key = f"identity-{uuid.uuid4()}"
    original = post_as(envoy, key, token="org_a")
    assert original.status == 200 and original.header("idempotent-replayed") is None, original

    # org_b's client claims to be org_a, with org_a's key and the same body: had the header
    # been trusted, this would be org_a's record and a replay of org_a's response.
    forged = post_as(envoy, key, token="org_b", forged_org="org_a")
    assert forged.status == 200, forged
    assert forged.header("idempotent-replayed") is None, "org_b was served org_a's record"
    assert forged.header("x-upstream-execution") != original.header("x-upstream-execution")
    assert upstream.count(key=key) == 2

    # What reached the upstream (and the filter) was the verified claim, once, each time.
    executions = upstream.executions(key=key)
    assert [[v for n, v in e.headers if n == "x-org-id"] for e in executions] == [["org_a"], ["org_b"]]

    # org_b's own retry is served from org_b's record, not org_a's.
    retry = post_as(envoy, key, token="org_b", forged_org="org_a")
    assert retry.header("idempotent-replayed") == "true", retry
    assert retry.header("x-upstream-execution") == forged.header("x-upstream-execution")
    assert upstream.count(key=key) == 2


def test_the_organisation_not_the_credential_owns_the_records(envoy, upstream):
    """Two users of org_a (two different tokens) share org_a's keys."""
    key = f"identity-{uuid.uuid4()}"
    first = post_as(envoy, key, token="org_a")
    second = post_as(envoy, key, token="org_a_second_user")
    assert second.header("idempotent-replayed") == "true", second
    assert second.body == first.body
    assert upstream.count(key=key) == 1


@pytest.mark.parametrize("case", ["no token", "only a forged header", "tampered claim"])
def test_a_request_without_a_valid_token_is_refused_before_the_filter(envoy, upstream, case):
    key = f"identity-{uuid.uuid4()}"
    post_as(envoy, key, token="org_a")  # org_a's record exists
    if case == "no token":
        resp = post_as(envoy, key)
    elif case == "only a forged header":
        resp = post_as(envoy, key, forged_org="org_a")
    else:
        # org_b's token with its claim rewritten to org_a: the signature no longer matches.
        header, payload, signature = TOKENS["org_b"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["org_id"] = "org_a"
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        resp = envoy.request("POST", "/v1/customers", [
            ("content-type", "application/json"), ("idempotency-key", key),
            ("authorization", f"Bearer {header}.{payload}.{signature}")], BODY)
    assert resp.status == 401, resp
    assert resp.header("idempotent-replayed") is None
    assert upstream.count(key=key) == 1  # only org_a's original


def test_the_test_tokens_match_the_inlined_test_jwks():
    config = load(CONFIG)
    (provider,) = [n for n in _dicts(config) if "local_jwks" in n]
    keys = json.loads(provider["local_jwks"]["inline_string"])["keys"]
    for token in TOKENS.values():
        header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                          for part in token.split(".")[:2])
        assert header["kid"] in {k["kid"] for k in keys}
        assert claims["iss"] == provider["issuer"] and claims["aud"] in provider["audiences"]
        assert claims["exp"] >= 4102444800  # 2100: the committed tokens do not expire under CI


def _dicts(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dicts(value)


def test_a_valid_token_without_the_claim_cannot_borrow_a_forged_header(envoy, upstream):
    """A token without the claim leaves no scope header at all (the request passes without
    idempotency, counted as bypassed): a client's own x-org-id never stands in for the claim.
    Envoy 1.40's jwt_authn drops a client's copy of a claim header itself; the header_mutation
    filter in front makes the example independent of that, and of rules that let a request
    through without a token."""
    key = f"identity-{uuid.uuid4()}"
    original = post_as(envoy, key, token="org_a")
    borrowed = post_as(envoy, key, token="no_org", forged_org="org_a")
    assert borrowed.status == 200, borrowed
    assert borrowed.header("idempotent-replayed") is None, "a forged header selected org_a's record"
    assert borrowed.header("x-upstream-execution") != original.header("x-upstream-execution")
    executions = upstream.executions(key=key)
    assert [[v for n, v in e.headers if n == "x-org-id"] for e in executions] == [["org_a"], []]
