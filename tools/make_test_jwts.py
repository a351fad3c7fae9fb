#!/usr/bin/env python3
"""Regenerate the TEST-ONLY signing key material of envoy/envoy-jwt.yaml and its tokens.

    python3 tools/make_test_jwts.py

Makes a fresh RSA key with the `openssl` CLI, writes its public half as the JWKS inlined in
envoy/envoy-jwt.yaml (between the BEGIN/END TEST JWKS markers), and writes RS256 tokens signed
with it to envoy/jwt-test-tokens.json, one per organisation, expiring in the year 2100. The
private key is thrown away: to add a token, run this again (every token is re-issued).

These tokens and this key exist for the example and its tests. Anyone can read them here, so
they prove nothing: a real deployment points jwt_authn at its identity provider's JWKS.
"""

import base64
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "envoy" / "envoy-jwt.yaml"
TOKENS = ROOT / "envoy" / "jwt-test-tokens.json"

ISSUER = "https://issuer.example.test"
AUDIENCE = "idempotency-demo"
KEY_ID = "test-only-2100"
ISSUED_AT = 1767225600  # 2026-01-01T00:00:00Z
EXPIRES = 4102444800  # 2100-01-01T00:00:00Z
# name -> (subject, organisation claim or None for a valid token without one)
SUBJECTS = {
    "org_a": ("user-ann", "org_a"),
    "org_a_second_user": ("user-abe", "org_a"),
    "org_b": ("user-bob", "org_b"),
    "no_org": ("user-nina", None),
}


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def openssl(*args, data=None):
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


def jwks(key_path):
    text = openssl("rsa", "-in", str(key_path), "-noout", "-modulus").decode()
    modulus = bytes.fromhex(text.strip().split("=", 1)[1])
    return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": KEY_ID,
                      "n": b64url(modulus), "e": b64url((65537).to_bytes(3, "big"))}]}


def token(key_path, subject, org):
    header = {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "org_id": org,
              "iat": ISSUED_AT, "exp": EXPIRES}
    if org is None:
        del claims["org_id"]
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    signature = openssl("dgst", "-sha256", "-sign", str(key_path), data=signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "test-only.pem"
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
        keys = jwks(key)
        tokens = {name: token(key, subject, org) for name, (subject, org) in SUBJECTS.items()}

    text = CONFIG.read_text()
    block = re.compile(r"(# BEGIN TEST JWKS[^\n]*\n)(.*?)(\n[ \t]*# END TEST JWKS)", re.DOTALL)
    match = block.search(text)
    if match is None:
        sys.exit(f"{CONFIG}: no BEGIN/END TEST JWKS markers")
    indent = re.match(r"[ \t]*", match.group(2)).group(0)
    line = f"{indent}inline_string: '{json.dumps(keys, separators=(',', ':'))}'"
    CONFIG.write_text(text[:match.start(2)] + line + text[match.end(2):])

    TOKENS.write_text(json.dumps({
        "_comment": "TEST ONLY: signed by the throwaway key whose public half is inlined in "
                    "envoy-jwt.yaml; regenerate with tools/make_test_jwts.py",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "tokens": tokens,
    }, indent=2) + "\n")
    print(f"wrote the JWKS into {CONFIG.relative_to(ROOT)} and {len(tokens)} tokens to {TOKENS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
