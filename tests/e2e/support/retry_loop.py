"""The API document's client retry loop (retry_loop.js, as its users copy it), run by node
against an Envoy: unchanged but for its URL, with fetch watched to record what each attempt got.

    run_retry_loop(port, key, customer) -> {"returned": <the loop's result>, "seen": [...]}
                                        or {"threw": <its error's message>, "seen": [...]}
    compact(customer)                   the body the loop sends (JSON.stringify's bytes)

From the command line (docs/giving-up.md), against `make run`:

    python3 tests/e2e/support/retry_loop.py --key demo-2
"""

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

LOOP = Path(__file__).with_name("retry_loop.js")
DOCUMENT_URL = "https://app.instantcompliance.ai/api/v1/customers"

# Each attempt's answer, as the loop's fetch got it; the loop itself is left as it is.
WATCH_AND_RUN = """
const seen = [];
const send = globalThis.fetch;
globalThis.fetch = async (url, init) => {
  const res = await send(url, init);
  seen.push({status: res.status, replayed: res.headers.get('idempotent-replayed'),
             retryAfter: res.headers.get('retry-after'), body: await res.clone().text()});
  return res;
};
ingestCustomerWithRetry(JSON.parse(process.env.CUSTOMER), {idempotencyKey: process.env.KEY}).then(
  (returned) => console.log(JSON.stringify({returned, seen})),
  (error) => console.log(JSON.stringify({threw: error.message, seen})));
"""


def compact(customer):
    return json.dumps(customer, separators=(",", ":")).encode()


def run_retry_loop(port, key, customer, api_key="ic_live_org_a", timeout=60):
    """Runs the loop once against 127.0.0.1:``port`` with ``key`` for ``customer`` (a dict);
    Authorization is ``Bearer <api_key>``, as the loop builds it from IC_API_KEY."""
    node = shutil.which("node")
    assert node, "node is missing: `make setup` installs it"
    source = LOOP.read_text()
    assert source.count(DOCUMENT_URL) == 1, "the loop's URL is not the document's"
    program = source.replace(DOCUMENT_URL, f"http://127.0.0.1:{port}/v1/customers") + WATCH_AND_RUN
    env = {**os.environ, "KEY": key, "CUSTOMER": json.dumps(customer), "IC_API_KEY": api_key}
    run = subprocess.run([node, "-"], input=program, capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def summary(body):
    """A problem's code, or the body on one line."""
    try:
        return json.loads(body)["code"]
    except (ValueError, KeyError, TypeError):
        return " ".join(body.split())


def main():
    parser = argparse.ArgumentParser(description="Run the API document's retry loop once.")
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument("--key", required=True, help="its Idempotency-Key")
    parser.add_argument("--api-key", default="ic_live_demo", help="IC_API_KEY")
    parser.add_argument("--customer", default='{"externalId":"crm-7741","fullName":"Jane Doe",'
                                              '"email":"jane@example.com"}')
    args = parser.parse_args()
    started = time.monotonic()
    outcome = run_retry_loop(args.port, args.key, json.loads(args.customer), args.api_key)
    for n, seen in enumerate(outcome["seen"], 1):
        extra = "".join(f", {name}: {seen[field]}" for name, field in
                        [("idempotent-replayed", "replayed"), ("retry-after", "retryAfter")] if seen[field])
        print(f"attempt {n}: {seen['status']}{extra}  {summary(seen['body'])}")
    result = (f"returned {json.dumps(outcome['returned'])}" if "returned" in outcome
              else f"threw: {outcome['threw']}")
    print(f"after {time.monotonic() - started:.1f} s the loop {result}")


if __name__ == "__main__":
    main()
